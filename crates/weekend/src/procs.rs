//! Processes in a host's namespace: started with `ip netns exec` (which execs the program,
//! so the PID is the program's own, optionally through `setpriv` to drop root, which also
//! execs), their output in a log file of the run, stopped by that PID only.

use anyhow::Context;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A process this run started.
pub struct Proc {
    /// What it is (`postgres on pg1`), for messages.
    pub what: String,
    child: Option<Child>,
}

/// Who a process runs as.
pub enum As {
    /// root (the run's own user).
    Root,
    /// The system user of that name (PostgreSQL refuses to run as root).
    User(&'static str),
}

impl Proc {
    /// Starts `program args…` in namespace `ns` as `user`, its stdout and stderr appended to
    /// `log`, with `env` added to its environment.
    pub fn start(
        what: &str,
        ns: &str,
        user: As,
        program: &str,
        args: &[&str],
        env: &[(&str, &str)],
        log: &Path,
    ) -> anyhow::Result<Proc> {
        #[allow(clippy::disallowed_methods)] // A process's log file, opened once at its start.
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = in_ns(ns, &user, program);
        cmd.args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {what}: {program}"))?;
        Ok(Proc {
            what: what.to_string(),
            child: Some(child),
        })
    }

    /// Its PID while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether it has exited (and reaps it).
    pub fn exited(&mut self) -> bool {
        !matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    /// `kill -9` by its PID, and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM by its PID; after `grace` without exiting, SIGKILL. Reaps it.
    pub fn stop(&mut self, grace: Duration) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// `program` to be run in namespace `ns` as `user`: `ip netns exec NS [setpriv …] PROGRAM`
/// (both exec, so the child's PID is the program's own).
pub fn in_ns(ns: &str, user: &As, program: &str) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]);
    if let As::User(name) = user {
        cmd.args([
            "setpriv",
            &format!("--reuid={name}"),
            &format!("--regid={name}"),
            "--init-groups",
        ]);
    }
    cmd.arg(program);
    cmd
}

/// Runs `cmd` (named `what` in errors) to its end; an error carries what it printed.
pub fn run_to_end(mut cmd: Command, what: &str) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        anyhow::bail!(
            "{what}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Waits until `ok()` holds, checking every 100 ms, for at most `limit`; the error says
/// what did not happen.
pub fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            anyhow::bail!("{what}: not within {} s", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether something accepts TCP connections at `addr` (from the run's namespace).
pub fn listening(addr: std::net::SocketAddr) -> bool {
    std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
}
