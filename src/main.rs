//! The `coexist` command. Everything it does lives in the library: the commands in
//! [`coexist::cli`] (one module per command group), the relay they start in
//! [`coexist::relay`].

use clap::Parser;
use coexist::cli::{self, Cli};

fn main() -> anyhow::Result<()> {
    let args = Cli::parse();
    if args.cmd.logs() {
        cli::init_logging(args.log_format);
    }
    cli::run(args.cmd)
}
