//! `coexist gen-certs`: a development CA and server certificate (see [`crate::certs`]).

use anyhow::Context;
use std::path::PathBuf;

/// Arguments of `coexist gen-certs`.
#[derive(clap::Args)]
pub struct GenCertsArgs {
    /// Output directory.
    #[arg(long, default_value = "certs")]
    pub out: PathBuf,
    /// Host name for the certificate.
    #[arg(long, default_value = "mx1.coexist.test")]
    pub hostname: String,
}

/// Writes `ca.crt`, `server.crt` and `server.key` into the output directory.
pub fn gen_certs(args: GenCertsArgs) -> anyhow::Result<()> {
    crate::certs::write(&args.out, &args.hostname).context("writing certificates")?;
    println!(
        "wrote {}/ca.crt, server.crt, server.key for {}",
        args.out.display(),
        args.hostname
    );
    Ok(())
}
