//! What recovery and appends do with bytes of a framed file: copy damaged bytes aside, cut
//! a torn tail or a failed append off, overwrite kept-aside corruption with a stand-in.

use super::{Damaged, Framing};
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Why damaged bytes could not be copied aside.
#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct AsideError {
    /// The file or folder the failure was on.
    pub path: PathBuf,
    /// What failed.
    #[source]
    pub source: io::Error,
}

fn at(path: &Path) -> impl FnOnce(io::Error) -> AsideError + '_ {
    move |source| AsideError {
        path: path.to_path_buf(),
        source,
    }
}

/// Copies the damaged bytes `d` of `file` to a new file in the folder `aside`, named
/// `NAME.OFFSET.torn` or `NAME.OFFSET.corrupt` (with `.1`, `.2`... when taken), and syncs
/// it and the folder. `before` is called with the new file's path before the copy (a hook
/// for injected failures). A copy cut short is removed: what is kept aside is always whole.
pub fn keep_aside(
    file: &File,
    d: &Damaged,
    aside: &Path,
    before: &dyn Fn(&Path) -> io::Result<()>,
) -> Result<PathBuf, AsideError> {
    crate::fsmode::create_dir_all(aside).map_err(at(aside))?;
    let name = d
        .path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("framed");
    let what = if d.torn { "torn" } else { "corrupt" };
    let base = format!("{name}.{}.{what}", d.offset);
    let mut out = None;
    for i in 0..100u32 {
        let p = match i {
            0 => aside.join(&base),
            _ => aside.join(format!("{base}.{i}")),
        };
        match crate::fsmode::options()
            .write(true)
            .create_new(true)
            .open(&p)
        {
            Ok(f) => {
                out = Some((p, f));
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(at(&p)(e)),
        }
    }
    let Some((p, mut f)) = out else {
        return Err(at(aside)(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("no free name for {base}"),
        )));
    };
    let copied = before(&p)
        .map_err(at(&p))
        .and_then(|()| copy(file, d, &mut f, &p));
    if copied.is_err() {
        drop(f);
        let _ = fs::remove_file(&p);
    }
    copied?;
    File::open(aside)
        .and_then(|d| d.sync_all())
        .map_err(at(aside))?;
    Ok(p)
}

/// Copies the damaged bytes `d` of `file` into `out` (at `p`) and syncs it.
fn copy(file: &File, d: &Damaged, out: &mut File, p: &Path) -> Result<(), AsideError> {
    let mut buf = vec![0u8; (1 << 20).min(d.len as usize)];
    let mut pos = d.offset;
    let end = d.offset + d.len;
    while pos < end {
        let k = buf.len().min((end - pos) as usize);
        file.read_exact_at(&mut buf[..k], pos)
            .map_err(at(&d.path))?;
        out.write_all(&buf[..k]).map_err(at(p))?;
        pos += k as u64;
    }
    out.sync_all().map_err(at(p))
}

/// Cuts `file` back to `len` and syncs it: a torn tail found at start, or an append that
/// failed (before anything else is written after it).
pub fn cut(file: &File, len: u64) -> io::Result<()> {
    file.set_len(len)?;
    file.sync_all()
}

/// Overwrites the corruption `d` (kept aside first) with a stand-in record of the same
/// length whose body is zeros, and syncs: the file reads whole again and no record after
/// it moves. `Ok(false)` when the framing has no stand-in that long (nothing is written).
pub fn fill<F: Framing>(f: &F, file: &File, d: &Damaged) -> io::Result<bool> {
    let Some(h) = f.filler(d.len) else {
        return Ok(false);
    };
    let zeros = vec![0u8; (1 << 20).min(d.len as usize)];
    file.write_all_at(&h, d.offset)?;
    let mut pos = d.offset + h.len() as u64;
    let end = d.offset + d.len;
    while pos < end {
        let k = zeros.len().min((end - pos) as usize);
        file.write_all_at(&zeros[..k], pos)?;
        pos += k as u64;
    }
    file.sync_data()?;
    Ok(true)
}
