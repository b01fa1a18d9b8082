//! `coexist status`, `coexist drain` and `coexist reload`: the running server's readiness,
//! its drain switch and its config, through the admin API.

use super::Api;
use crate::admin::types::{ConfigReloadReply, DrainReply, HopCondition, HopView, Ready};

/// Arguments of `coexist drain`.
#[derive(clap::Args)]
pub struct DrainArgs {
    /// Stop draining.
    #[arg(long)]
    pub off: bool,
    /// Where the running server is.
    #[command(flatten)]
    pub api: Api,
}

/// Prints the server's readiness (a draining server is an answer, not an error).
pub fn status(api: &Api) -> anyhow::Result<()> {
    let r = api.client()?.ready()?;
    api.print(&r, ready_text)
}

/// Starts or (with `--off`) stops draining.
pub fn drain(args: &DrainArgs) -> anyhow::Result<()> {
    let r = args.api.client()?.drain(!args.off)?;
    args.api.print(&r, drain_text)
}

/// Has the server re-read its config file.
pub fn reload(api: &Api) -> anyhow::Result<()> {
    let r = api.client()?.config_reload()?;
    api.print(&r, reload_text)
}

/// The LDAP source's line: its current reason while it fails, the last good round, and
/// where the next delta starts.
fn ldap_text(l: &crate::directory::ldap::LdapHealth) -> String {
    let or = |v: &Option<String>| v.clone().unwrap_or_else(|| "never".into());
    let mut out = match &l.error {
        Some(e) => format!(
            "LDAP source: FAILING since {}: {e} ({} failed rounds; next try at {})",
            or(&l.error_since),
            l.failures,
            or(&l.next_try)
        ),
        None if l.healthy => format!("LDAP source: ok, {} mailboxes", l.mailboxes),
        None => "LDAP source: no round on this node yet (in a fleet, the node holding the LDAP lock runs them)".to_string(),
    };
    out.push_str(&format!(
        "\nLDAP last good round: {} ({}); last full read: {}",
        or(&l.last_sync),
        if l.mark.is_empty() { "-" } else { &l.mark },
        or(&l.last_full_sync)
    ));
    if let Some(usn) = l.usn {
        out.push_str(&format!(
            "; cursor: highestCommittedUSN {usn}, invocationId {}",
            l.invocation_id.as_deref().unwrap_or("-")
        ));
    } else if let Some(ts) = &l.timestamp {
        out.push_str(&format!("; cursor: modifyTimestamp {ts}"));
    }
    out
}

/// Readiness, drain state, open sessions and directory size, then the last directory file
/// reload and the last refused one with its reason.
pub fn ready_text(r: &Ready) -> String {
    let mut out = format!(
        "ready: {}; draining: {}; SMTP sessions open: {}; directory entries: {}",
        r.ready, r.draining, r.sessions_open, r.directory_entries
    );
    if !r.directory_source_up {
        out.push_str(
            "\ndirectory source: DOWN (the directory in force stays; unknown recipients get 451 4.4.3)",
        );
    }
    if let Some(l) = &r.directory_ldap {
        out.push('\n');
        out.push_str(&ldap_text(l));
    }
    if let Some(up) = r.fleet_postgres_up {
        out.push_str(&format!(
            "\nfleet: PostgreSQL {}; behind the fleet (draining): {}",
            if up { "connected" } else { "UNREACHABLE" },
            r.fleet_behind
        ));
    }
    if let Some(why) = &r.shadow_unavailable {
        out.push_str(&format!("\nshadow copies: CANNOT BE STORED: {why}"));
    }
    if r.shadow_lease_held == Some(false) {
        out.push_str(
            "\nshadow lease: NOT HELD (fenced: this node delivers nothing until it is renewed)",
        );
    }
    for line in hops_text(&r.hops) {
        out.push('\n');
        out.push_str(&line);
    }
    let d = &r.directory_reload;
    if let (Some(res), Some(t)) = (&d.last_result, &d.last_time) {
        out.push_str(&format!("\nlast directory file reload: {res} at {t}"));
    }
    if let Some(f) = &d.last_refused {
        out.push_str(&format!(
            "\nlast refused directory file reload: {} at {}: {}",
            f.result, f.time, f.reason
        ));
    }
    out
}

/// One line per next hop that is not up: throttled (its limit, pause and last throttling
/// reply) or circuit open (its last error).
pub fn hops_text(hops: &[HopView]) -> Vec<String> {
    hops.iter()
        .filter(|h| h.state != HopCondition::Up)
        .map(|h| {
            let mut line = format!("next hop {}: {}", h.next_hop, h.state.as_str());
            if let Some(limits) = h.limit_text() {
                line.push_str(&format!(" ({limits})"));
            } else if h.resumes_in_s > 0 {
                line.push_str(&format!(" (next probe in {} s)", h.resumes_in_s));
            }
            if let Some(r) = &h.route {
                line.push_str(&format!(" on route {r}"));
            }
            if let Some(r) = &h.last_reply {
                line.push_str(&format!("; last reply: {r}"));
            }
            line
        })
        .collect()
}

/// The drain state after the change.
pub fn drain_text(r: &DrainReply) -> String {
    format!(
        "draining: {}; SMTP sessions still open: {}",
        r.draining, r.sessions_open
    )
}

/// The config sections the reload changed (as a JSON list, as this command always printed).
pub fn reload_text(r: &ConfigReloadReply) -> String {
    let changed = serde_json::to_string(&r.changed).unwrap_or_default();
    format!("config reloaded; changed sections: {changed}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::types::{RefusedReload, ReloadStatus};

    #[test]
    fn status_shows_the_last_refused_directory_reload() {
        let r = Ready {
            ready: false,
            draining: true,
            sessions_open: 1,
            directory_entries: 104,
            directory_reload: ReloadStatus {
                last_result: Some("ok".into()),
                last_time: Some("2026-11-25T10:00:00Z".into()),
                last_refused: Some(RefusedReload {
                    time: "2026-11-25T09:00:00Z".into(),
                    result: "refused_shrink".into(),
                    reason: "too small".into(),
                }),
            },
            directory_source_up: true,
            directory_ldap: None,
            fleet_behind: false,
            fleet_postgres_up: None,
            fleet_log_mismatch: None,
            shadow_unavailable: None,
            shadow_lease_held: None,
            hops: vec![
                HopView {
                    next_hop: "127.0.0.1:25".into(),
                    state: HopCondition::Up,
                    limit: 10,
                    full_limit: 10,
                    resumes_in_s: 0,
                    since: None,
                    last_reply: None,
                    route: None,
                },
                HopView {
                    next_hop: "10.0.0.9:25".into(),
                    state: HopCondition::Throttled,
                    limit: 2,
                    full_limit: 10,
                    resumes_in_s: 25,
                    since: Some(1),
                    last_reply: Some("451 4.7.500 Server busy".into()),
                    route: Some("cloud".into()),
                },
            ],
        };
        assert_eq!(
            ready_text(&r),
            "ready: false; draining: true; SMTP sessions open: 1; directory entries: 104\n\
             next hop 10.0.0.9:25: throttled (2 of 10 transactions at once, paused for 25 s more) \
             on route cloud; last reply: 451 4.7.500 Server busy\n\
             last directory file reload: ok at 2026-11-25T10:00:00Z\n\
             last refused directory file reload: refused_shrink at 2026-11-25T09:00:00Z: too small"
        );
    }

    #[test]
    fn reload_lists_the_changed_sections() {
        let r = ConfigReloadReply {
            reloaded: true,
            changed: vec!["queue".into(), "routes".into()],
        };
        assert_eq!(
            reload_text(&r),
            "config reloaded; changed sections: [\"queue\",\"routes\"]"
        );
    }
}
