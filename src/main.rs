//! The `coexist` command. Everything it does lives in the library: the commands in
//! [`coexist::cli`] (one module per command group), the relay they start in
//! [`coexist::relay`].

use clap::Parser;
use coexist::cli::{self, Cli};

/// mimalloc instead of glibc's allocator: the relay allocates and frees small buffers per
/// command, per message and per attempt on every worker thread. Measured with `coexist load`
/// through the relay (README, "Performance"): about a quarter less CPU per relayed message
/// and a quarter more messages per second, at about the same peak memory.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let args = Cli::parse();
    if args.cmd.logs() {
        cli::init_logging(args.log_format);
    }
    cli::run(args.cmd)
}
