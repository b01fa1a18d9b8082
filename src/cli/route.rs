//! `coexist route explain`: where mail for each address would go now, and why, as the
//! running server sees it (through the admin API). `directory lookup` prints its answer the
//! same way ([`explain_text`]).

use super::Api;
use crate::admin::types::Explain;
use clap::Subcommand;

/// The route commands.
#[derive(Subcommand)]
pub enum RouteCmd {
    /// Show where mail for each address would go now, and why.
    Explain {
        /// Addresses.
        #[arg(required = true)]
        addresses: Vec<String>,
        /// Where the running server is.
        #[command(flatten)]
        api: Api,
    },
}

/// Runs a route command.
pub fn run(cmd: RouteCmd) -> anyhow::Result<()> {
    match cmd {
        RouteCmd::Explain { addresses, api } => {
            let list = api.client()?.route_explain(&addresses)?;
            api.print(&list, |l| {
                l.iter().map(explain_text).collect::<Vec<_>>().join("\n")
            })
        }
    }
}

/// One address: its mailbox, state and where it comes from, the RCPT verdict, and the route
/// with its next hops and TLS policy (`-` for what does not apply).
pub fn explain_text(e: &Explain) -> String {
    let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let hops = if e.next_hops.is_empty() {
        "-".to_string()
    } else {
        e.next_hops.join(", ")
    };
    format!(
        "{}\n  mailbox {}\n  state   {} (from {})\n  rcpt    {}\n  route   {} -> {} (tls {})",
        e.lookup.address,
        or_dash(&e.lookup.mailbox),
        or_dash(&e.lookup.state),
        e.lookup.origin,
        e.rcpt,
        or_dash(&e.lookup.route),
        hops,
        or_dash(&e.tls),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::Lookup;

    #[test]
    fn an_explanation_names_state_origin_verdict_and_route() {
        let e = Explain {
            lookup: Lookup {
                address: "alice@nhs.test".into(),
                mailbox: Some("alice@nhs.test".into()),
                state: Some("cloud".into()),
                origin: "batch 1".into(),
                route: Some("cloud".into()),
            },
            rcpt: "accept".into(),
            next_hops: vec!["127.0.0.1:2602".into()],
            tls: Some("opportunistic".into()),
        };
        assert_eq!(
            explain_text(&e),
            "alice@nhs.test\n  mailbox alice@nhs.test\n  state   cloud (from batch 1)\n  \
             rcpt    accept\n  route   cloud -> 127.0.0.1:2602 (tls opportunistic)"
        );
        let unlisted = Explain {
            lookup: Lookup {
                address: "x@evil.test".into(),
                mailbox: None,
                state: None,
                origin: "unlisted".into(),
                route: None,
            },
            rcpt: "550 5.7.1 Relay access denied".into(),
            next_hops: vec![],
            tls: None,
        };
        assert!(explain_text(&unlisted).ends_with("route   - -> - (tls -)"));
    }
}
