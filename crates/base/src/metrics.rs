//! Prometheus metrics: names, the recorder (metrics-exporter-prometheus, rendered by the
//! admin API at `/metrics`), and a few helpers used across modules.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;
use std::time::Duration;

/// SMTP sessions open now (gauge).
pub const SESSIONS_OPEN: &str = "coexist_smtp_sessions_open";
/// SMTP sessions accepted since start.
pub const SESSIONS_TOTAL: &str = "coexist_smtp_sessions_total";
/// Sessions refused at connect (connection limit or drain), by reason.
pub const SESSIONS_REFUSED: &str = "coexist_smtp_sessions_refused_total";
/// Messages at end of data, by `result` (accepted/rejected) and enhanced `status`.
pub const MESSAGES: &str = "coexist_messages_total";
/// Bytes of accepted messages.
pub const MESSAGE_BYTES: &str = "coexist_message_bytes_total";
/// Recipients refused at RCPT, by enhanced `status`.
pub const RCPT_REJECTED: &str = "coexist_recipients_rejected_total";
/// Recipients accepted, by the `route` they resolved to at RCPT time.
pub const RCPT_ACCEPTED: &str = "coexist_recipients_accepted_total";
/// Delivery outcomes per recipient, by `route`, `next_hop` and `outcome` (sent/deferred/bounced).
pub const DELIVERIES: &str = "coexist_delivery_recipients_total";
/// Delivery attempts (one per next-hop transaction), by `route` and `next_hop`.
pub const ATTEMPTS: &str = "coexist_delivery_attempts_total";
/// Outbound sessions used, by `next_hop` and `reused` (yes/no).
pub const CONNECTIONS: &str = "coexist_delivery_connections_total";
/// Outbound sessions reused without `RSET` that turned out closed before their first reply
/// (the transaction went again on a new session), by `next_hop`.
pub const STALE_SESSIONS: &str = "coexist_delivery_stale_sessions_total";
/// Time from acceptance to delivery, by `route` (histogram, seconds).
pub const DELIVERY_LATENCY: &str = "coexist_delivery_latency_seconds";
/// Messages in the queue, by `state` (active, deferred).
pub const QUEUE_MESSAGES: &str = "coexist_queue_messages";
/// Age of the oldest message in the queue, by `state` (seconds).
pub const QUEUE_OLDEST: &str = "coexist_queue_oldest_age_seconds";
/// Syncs (`fdatasync`) made by the spool's commit stage.
pub const SPOOL_SYNCS: &str = "coexist_spool_syncs_total";
/// Records (messages, states, ends) those syncs covered: records / syncs is the group size.
pub const SPOOL_RECORDS: &str = "coexist_spool_records_total";
/// Queued messages whose last outcome (state or end record) the spool could not write yet
/// (disk full, I/O error): kept in memory and written before their next delivery.
pub const QUEUE_UNWRITTEN: &str = "coexist_queue_unwritten_outcomes";
/// Segment files the spool holds.
pub const SPOOL_SEGMENTS: &str = "coexist_spool_segments";
/// Damaged stretches of the spool log found at start, by `kind`: `torn` (the unsynced end of
/// the last commit turn, cut off) or `corrupt` (damage in a synced turn, skipped). Their
/// bytes are kept in `spool/damaged/`; `corrupt_left` counts corruption whose bytes could not
/// be copied there (left in the segment, skipped, moved aside by a later start).
pub const SPOOL_DAMAGED: &str = "coexist_spool_damaged_total";
/// 1 while a route's next hops cannot be reached (its deferred mail waits for a probe), by
/// `route`.
pub const ROUTE_UNREACHABLE: &str = "coexist_route_unreachable";
/// Addresses in the directory.
pub const DIRECTORY_ENTRIES: &str = "coexist_directory_entries";
/// Directory changes applied, by `kind` (apply, rollback, reload).
pub const DIRECTORY_CHANGES: &str = "coexist_directory_changes_total";
/// Directory file reloads (watch, SIGHUP, API, start-up), by `result`: ok, refused_shrink
/// (removes more than `directory.max_shrink`), refused_invalid (unreadable or bad row),
/// failed (the change could not be recorded).
pub const DIRECTORY_RELOADS: &str = "coexist_directory_reloads_total";
/// RCPT-time directory lookup latency (histogram, seconds).
pub const LOOKUP_LATENCY: &str = "coexist_directory_lookup_seconds";
/// Fleet: 1 while this node is connected to PostgreSQL and following the change log.
pub const FLEET_POSTGRES_UP: &str = "coexist_fleet_postgres_up";
/// Fleet: the last change of the fleet log applied on this node.
pub const FLEET_APPLIED: &str = "coexist_fleet_applied_sequence";
/// Fleet: 1 while this node drains because it is behind the fleet (`fleet.max_lag`).
pub const FLEET_BEHIND: &str = "coexist_fleet_behind";
/// Fleet: 1 while PostgreSQL's change log does not hold the history this node applied (a
/// log that moved back: failover, restore); directory changes are refused meanwhile.
pub const FLEET_LOG_MISMATCH: &str = "coexist_fleet_log_mismatch";
/// Fleet: time from a change's commit in PostgreSQL to its application here (histogram,
/// seconds).
pub const FLEET_APPLY_DELAY: &str = "coexist_fleet_apply_delay_seconds";
/// Shadow copies stored on NATS JetStream, by `result` (ok, failed).
pub const SHADOW_PUBLISHES: &str = "coexist_shadow_publishes_total";
/// Time to store one message's shadow copy (histogram, seconds).
pub const SHADOW_PUBLISH_SECONDS: &str = "coexist_shadow_publish_seconds";
/// Messages refused with 451 4.3.0 because no shadow copy could be stored.
pub const SHADOW_REFUSED: &str = "coexist_shadow_refused_total";
/// Messages accepted on the local copy only (`on_failure = "accept"`).
pub const SHADOW_LOCAL_ONLY: &str = "coexist_shadow_local_only_total";
/// Messages of this node with a live shadow copy (its queue, while copies are kept).
pub const SHADOW_BACKLOG: &str = "coexist_shadow_backlog";
/// Shadow copies removed after their message finished, by `result` (ok, failed).
pub const SHADOW_REMOVALS: &str = "coexist_shadow_removals_total";
/// Takeovers of a dead node's queue this node made.
pub const SHADOW_TAKEOVERS: &str = "coexist_shadow_takeovers_total";
/// Messages this node took over from dead nodes (its own earlier life included).
pub const SHADOW_TAKEN: &str = "coexist_shadow_taken_total";
/// Messages this node dropped at its return because a survivor had taken them over.
pub const SHADOW_DROPPED: &str = "coexist_shadow_dropped_total";
/// 1 while this node holds its lease (may deliver its shadowed mail), 0 while fenced.
pub const SHADOW_LEASE_HELD: &str = "coexist_shadow_lease_held";
/// Events written to the tracking log.
pub const TRACKING_EVENTS: &str = "coexist_tracking_events_total";
/// Events of the tracking log lost: its queue was full (`reason="full"`), its disk write
/// failed (`reason="write"`), or they came after it was closed at shutdown
/// (`reason="closed"`).
pub const TRACKING_LOST: &str = "coexist_tracking_lost_total";
/// Bytes the tracking log's files take.
pub const TRACKING_BYTES: &str = "coexist_tracking_bytes";
/// 1 while the last shadow copy could be stored (NATS JetStream reachable).
pub const SHADOW_UP: &str = "coexist_shadow_up";
/// 1 while the directory's source can be read (always 1 for the file source; the LDAP
/// source's last sync succeeded).
pub const DIRECTORY_SOURCE_UP: &str = "coexist_directory_source_up";
/// LDAP syncs, by `kind` (full, delta) and `result` (ok, failed).
pub const LDAP_SYNCS: &str = "coexist_ldap_syncs_total";
/// End of validity (Unix seconds) of this node's certificates, by `cert` (`smtp`: the
/// STARTTLS certificate, `admin`: the admin API's), read at start and at each reload.
pub const TLS_CERT_EXPIRY: &str = "coexist_tls_cert_expiry_timestamp_seconds";
/// TLS handshakes, by `side` (inbound/outbound) and `result` (ok/failed).
pub const TLS_HANDSHAKES: &str = "coexist_tls_handshakes_total";
/// MTA-STS policy fetches over HTTPS, by `result` (ok/failed).
pub const MTA_STS_FETCHES: &str = "coexist_mta_sts_fetches_total";
/// What an MTA-STS policy refused (`mode` enforce: not delivered there; `mode` testing:
/// delivered anyway), by `reason` (mx: MX host not listed; certificate: not valid for it;
/// starttls: not offered).
pub const MTA_STS_REFUSALS: &str = "coexist_mta_sts_refusals_total";
/// DANE TLSA lookups per MX host, by `result`: secure (usable records), unusable (secure
/// but none usable), none (no TLSA), insecure (unsigned), bogus (validation failed).
pub const DANE_LOOKUPS: &str = "coexist_dane_tlsa_lookups_total";
/// Certificates checked against TLSA records, by `result` (match/mismatch).
pub const DANE_VERIFICATIONS: &str = "coexist_dane_verifications_total";
/// Config reloads, by `result` (ok/refused).
pub const CONFIG_RELOADS: &str = "coexist_config_reloads_total";
/// 1 while a next hop is throttled (paused, or ramping back up), by `next_hop`.
pub const HOP_THROTTLED: &str = "coexist_hop_throttled";
/// Transactions a next hop may have in flight now, by `next_hop` (lowered while throttled).
pub const HOP_CONCURRENCY: &str = "coexist_hop_concurrency_limit";
/// Throttling replies ("slow down") from next hops, by `route` and `next_hop`.
pub const HOP_THROTTLE_REPLIES: &str = "coexist_hop_throttle_replies_total";
/// Recipients deferred instead of bounced because their mailbox moved within
/// `directory.move_grace`, by `route`.
pub const MOVE_GRACE_DEFERRALS: &str = "coexist_move_grace_deferrals_total";
/// Recipients failed with 5.4.6 because the message came back from their route's next hop,
/// by `route`.
pub const ROUTING_LOOPS: &str = "coexist_routing_loops_total";
/// Recipients failed because the message is larger than their route takes, by `route`.
pub const ROUTE_TOO_BIG: &str = "coexist_route_message_too_big_total";
/// Failed `accept` calls (out of file descriptors, ...), by `listener` (smtp, admin).
pub const ACCEPT_ERRORS: &str = "coexist_accept_errors_total";
/// Admin connections closed unread because `admin.max_connections` were open.
pub const ADMIN_REFUSED: &str = "coexist_admin_connections_refused_total";
/// Admin connections closed by `admin.idle_timeout` or `admin.request_timeout`, by `reason`
/// (idle, request).
pub const ADMIN_TIMEOUTS: &str = "coexist_admin_connections_timed_out_total";

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide recorder once (later calls return the same handle) and starts
/// its upkeep. Must be called inside a tokio runtime. `None` if another recorder is installed.
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(DELIVERY_LATENCY.into()),
                    &[
                        0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 1800.0, 3600.0, 14400.0,
                        86400.0,
                    ],
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(LOOKUP_LATENCY.into()),
                        &[2.5e-7, 5e-7, 1e-6, 2.5e-6, 1e-5, 1e-4, 1e-3],
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(SHADOW_PUBLISH_SECONDS.into()),
                        &[
                            0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0, 5.0,
                        ],
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(FLEET_APPLY_DELAY.into()),
                        &[
                            0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 30.0, 300.0,
                        ],
                    )
                });
            let handle = builder.ok()?.install_recorder().ok()?;
            let upkeep = handle.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    upkeep.run_upkeep();
                }
            });
            Some(handle)
        })
        .clone()
}
