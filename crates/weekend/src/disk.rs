//! A slow disk for one process: the cgroup v1 `blkio` throttle of this machine's kernel
//! (`blkio.throttle.write_iops_device` and `write_bps_device`) on the block device under the
//! process's spool. Writes a process submits itself (the spool's `fdatasync`, which writes
//! its dirty pages in the caller's context) are held to the limit; the page cache is not.
//! Undone by moving the process back to the root group and removing the group.

use anyhow::{bail, Context};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Where the blkio hierarchy is mounted (cgroup v1).
const BLKIO: &str = "/sys/fs/cgroup/blkio";

/// The group of the process slowed on behalf of `name`.
fn group(name: &str) -> PathBuf {
    Path::new(BLKIO).join(format!("{}slow-{name}", crate::net::PREFIX))
}

/// `MAJOR:MINOR` of the whole disk holding `path` (a partition's parent disk: the throttle
/// takes whole devices).
#[allow(clippy::disallowed_methods)] // Reads sysfs once, when the fault begins.
fn disk_of(path: &Path) -> anyhow::Result<String> {
    let dev = std::fs::metadata(path)
        .with_context(|| format!("stat {}", path.display()))?
        .dev();
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    if sys.join("partition").exists() {
        let parent = std::fs::read_to_string(sys.join("../dev"))
            .with_context(|| format!("parent disk of {major}:{minor}"))?;
        return Ok(parent.trim().to_string());
    }
    Ok(format!("{major}:{minor}"))
}

/// Holds process `pid` (named `name`) to `iops` writes and `bps` bytes a second on the disk
/// under `path`.
#[allow(clippy::disallowed_methods)] // cgroupfs writes, once per fault.
pub fn slow(name: &str, pid: u32, path: &Path, iops: u32, bps: u64) -> anyhow::Result<String> {
    if !Path::new(BLKIO)
        .join("blkio.throttle.write_iops_device")
        .exists()
    {
        bail!("no cgroup v1 blkio throttle at {BLKIO}");
    }
    let disk = disk_of(path)?;
    let g = group(name);
    std::fs::create_dir_all(&g).with_context(|| format!("mkdir {}", g.display()))?;
    std::fs::write(
        g.join("blkio.throttle.write_iops_device"),
        format!("{disk} {iops}"),
    )?;
    std::fs::write(
        g.join("blkio.throttle.write_bps_device"),
        format!("{disk} {bps}"),
    )?;
    std::fs::write(g.join("cgroup.procs"), pid.to_string())
        .with_context(|| format!("moving {pid} into {}", g.display()))?;
    Ok(disk)
}

/// Ends [`slow`] for `name`: every process of its group back to the root group, the group
/// removed.
#[allow(clippy::disallowed_methods)] // cgroupfs writes, once per fault.
pub fn unslow(name: &str) -> anyhow::Result<()> {
    release(&group(name))
}

#[allow(clippy::disallowed_methods)] // cgroupfs reads and writes.
fn release(g: &Path) -> anyhow::Result<()> {
    if !g.exists() {
        return Ok(());
    }
    let procs = std::fs::read_to_string(g.join("cgroup.procs")).unwrap_or_default();
    for pid in procs.split_whitespace() {
        // A process that exited meanwhile is simply gone.
        let _ = std::fs::write(Path::new(BLKIO).join("cgroup.procs"), pid);
    }
    std::fs::remove_dir(g).with_context(|| format!("rmdir {}", g.display()))
}

/// Removes the groups an earlier run left.
#[allow(clippy::disallowed_methods)] // cgroupfs listing at start.
pub fn sweep() {
    let Ok(dir) = std::fs::read_dir(BLKIO) else {
        return;
    };
    for e in dir.flatten() {
        if e.file_name()
            .to_string_lossy()
            .starts_with(crate::net::PREFIX)
        {
            let _ = release(&e.path());
        }
    }
}
