//! The `coexist` command. Everything it does lives in the library: the commands in
//! [`coexist::cli`] (one module per command group), the relay they start in
//! [`coexist::relay`].

use clap::Parser;
use coexist::cli::{self, Cli};

/// mimalloc instead of glibc's allocator: the relay allocates and frees small buffers per
/// command, per message and per attempt on every worker thread. Measured with `coexist load`
/// through the relay (README, "Performance"): about a quarter less CPU per relayed message
/// and a quarter more messages per second, at about the same peak memory.
///
/// Built without transparent huge pages (`no_thp`; see [`no_huge_pages`]): mimalloc asks for
/// them on its arenas by default, and a 2 MiB page is resident whole as soon as one byte of
/// it is touched. With a million deferred messages that made 57 MB of the relay's 196 MB of
/// anonymous memory huge pages, and the idle relay 42 MB instead of 24.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Turns transparent huge pages off for this process, also where the system uses them for
/// every mapping (`/sys/kernel/mm/transparent_hugepage/enabled` = `always`), which the
/// `no_thp` build of mimalloc (no `madvise`) does not cover. Best effort: a kernel without
/// the call keeps its setting.
/// The flag passes to child processes (`coexist-report`), which is harmless.
fn no_huge_pages() {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and touches no memory of ours.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

fn main() -> anyhow::Result<()> {
    no_huge_pages();
    let args = Cli::parse();
    if args.cmd.logs() {
        cli::init_logging(args.log_format);
    }
    cli::run(args.cmd)
}
