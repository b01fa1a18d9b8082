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

/// One address: its mailbox (and the mailbox's routing address when it has one), state and
/// where it comes from, the RCPT verdict, the route with its next hops or MX domain and TLS
/// policy (`-` for what does not apply), then the certificate name, the recipient as sent
/// when the route rewrites it, the route a DSN to it would take, and one line per policy
/// decision that applies (stage, decision, verdict).
pub fn explain_text(e: &Explain) -> String {
    let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let target = match &e.mx {
        Some(mx) => format!("mx {mx}"),
        None if e.next_hops.is_empty() => "-".to_string(),
        None => e.next_hops.join(", "),
    };
    let routing = match &e.lookup.routing_address {
        Some(ra) => format!("\n  routing {ra}"),
        None => String::new(),
    };
    let mut out = format!(
        "{}\n  mailbox {}{routing}\n  state   {} (from {})\n  rcpt    {}\n  route   {} -> {} (tls {})",
        e.lookup.address,
        or_dash(&e.lookup.mailbox),
        or_dash(&e.lookup.state),
        e.lookup.origin,
        e.rcpt,
        or_dash(&e.lookup.route),
        target,
        or_dash(&e.tls),
    );
    if let Some(name) = &e.tls_name {
        out.push_str(&format!("\n  tls name {name}"));
    }
    if let Some(to) = &e.rewritten {
        out.push_str(&format!("\n  sent as {to}"));
    }
    out.push_str(&format!("\n  dsn     {}", or_dash(&e.dsn_route)));
    for (n, p) in e.policy.iter().enumerate() {
        let label = if n == 0 { "policy" } else { "" };
        out.push_str(&format!(
            "\n  {label:<8}{:<10} {:<11} {}",
            p.stage.as_str(),
            p.decision,
            p.verdict
        ));
    }
    out
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
                routing_address: None,
            },
            rcpt: "accept".into(),
            rule: Some(crate::route::Rule::Listed),
            next_hops: vec!["127.0.0.1:2602".into()],
            mx: None,
            rewritten: Some("alice@tenant.mail.onmicrosoft.com".into()),
            tls: Some("verify".into()),
            tls_name: Some("mail.protection.outlook.com".into()),
            dsn_route: Some("cloud".into()),
            policy: Vec::new(),
        };
        assert_eq!(
            explain_text(&e),
            "alice@nhs.test\n  mailbox alice@nhs.test\n  state   cloud (from batch 1)\n  \
             rcpt    accept\n  route   cloud -> 127.0.0.1:2602 (tls verify)\n  \
             tls name mail.protection.outlook.com\n  sent as alice@tenant.mail.onmicrosoft.com\n  \
             dsn     cloud"
        );
        let unlisted = Explain {
            lookup: Lookup {
                address: "x@evil.test".into(),
                mailbox: None,
                state: None,
                origin: "unlisted".into(),
                route: None,
                routing_address: None,
            },
            rcpt: "550 5.7.1 Relay access denied".into(),
            rule: None,
            next_hops: vec![],
            mx: None,
            rewritten: None,
            tls: None,
            tls_name: None,
            dsn_route: None,
            policy: Vec::new(),
        };
        assert!(explain_text(&unlisted).ends_with("route   - -> - (tls -)\n  dsn     -"));
        let mut alias = e.clone();
        alias.lookup.address = "john.smith@other.test".into();
        alias.lookup.routing_address = Some("jsmith@tenant.mail.onmicrosoft.com".into());
        alias.rewritten = alias.lookup.routing_address.clone();
        assert!(
            explain_text(&alias).starts_with(
                "john.smith@other.test\n  mailbox alice@nhs.test\n  \
                 routing jsmith@tenant.mail.onmicrosoft.com\n  state   cloud (from batch 1)\n"
            ),
            "{}",
            explain_text(&alias)
        );
        assert!(explain_text(&alias).contains("\n  sent as jsmith@tenant.mail.onmicrosoft.com\n"));
        let mut decided = e.clone();
        let line = |stage, decision: &str, verdict: &str| crate::policy::Applies {
            stage,
            decision: decision.into(),
            verdict: verdict.into(),
        };
        decided.policy = vec![
            line(crate::policy::Stage::Recipient, "relay", "accept"),
            line(crate::policy::Stage::Delivery, "move grace", "off"),
        ];
        assert!(
            explain_text(&decided).ends_with(
                "\n  dsn     cloud\n  policy  recipient  relay       accept\n          \
                 delivery   move grace  off"
            ),
            "{}",
            explain_text(&decided)
        );
    }
}
