//! The CLI's side of the admin API: a small blocking HTTP client (ureq) with the token.
//!
//! An API served over TLS (`admin.tls_cert`) is reached with https: the client connects to
//! the listener's address and checks that the certificate carries the node's name (its
//! `server.hostname`) and chains to `admin.tls_ca_file` or the system roots. The token is
//! sent to another node only over TLS or to a loopback address ([`AdminClient::for_peer`]).
//!
//! One method per API call, each returning the type the server answers with (see
//! [`super::types`]): the CLI never picks fields out of untyped JSON. [`AdminClient::get`] and
//! [`AdminClient::post`] stay for callers that want the raw answer (tests, `/metrics`).

use super::types::{
    ApiErrorBody, BatchFormat, BatchReply, ChangeSummary, ConfigReloadReply, DrainReply, Explain,
    ExplainRequest, FleetBatch, FleetStatus, FlushReply, HopView, MessageView, NodeApplied,
    QueueAction, QueueActionReply, QueueFilter, Ready, ReloadReport, Resubmitted, Scheduled,
};
use crate::config::Config;
use serde::de::DeserializeOwned;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

mod trace;
pub use trace::{TraceAsk, TraceField};

/// A failed API call, worded for the admin at the terminal.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The config has no `[admin]` section.
    #[error("the config has no [admin] section: the server has no admin API to talk to")]
    NoAdmin,
    /// The token file cannot be read.
    #[error("cannot read the admin token: {0}")]
    Token(std::io::Error),
    /// Connection or protocol failure.
    #[error("cannot reach the admin API at {addr}: {reason} (is `coexist serve` running with this config?)")]
    Unreachable {
        /// API address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The CA bundle or the system roots for an https admin API cannot be read.
    #[error("admin API TLS: {0}")]
    Tls(String),
    /// The token would cross the network in clear: the call is not made.
    #[error("not sending the admin token to http://{addr}: it is clear HTTP to an address off loopback, where the network could read the token; serve that node's admin API over TLS (admin.tls_cert and admin.tls_key)")]
    ClearText {
        /// The peer's address.
        addr: SocketAddr,
    },
    /// The server refused the call.
    #[error("{0}")]
    Refused(String),
    /// The answer is not the type this CLI expects for the call.
    #[error("unexpected answer from the admin API to {call}: {reason} (is the server the same version as this CLI?)")]
    Unexpected {
        /// Method and path.
        call: String,
        /// What did not fit.
        reason: String,
    },
}

/// A batch file to send to the directory (`coexist directory apply/diff`).
#[derive(Debug, Clone)]
pub struct BatchUpload<'a> {
    /// The CSV file's bytes.
    pub body: &'a [u8],
    /// Its name, recorded in the change log.
    pub source: &'a str,
    /// Target state when the file has no `state` column.
    pub state: Option<&'a str>,
    /// Preview only: change nothing.
    pub dry_run: bool,
    /// Apply at this time (RFC 3339) instead of now.
    pub at: Option<&'a str>,
    /// How the server reads the file (`auto` is not sent, so older servers understand it).
    pub format: BatchFormat,
}

/// An answer: HTTP status and body text.
struct Answer {
    status: u16,
    text: String,
}

pub use crate::fleet::peers::Target;

/// [`crate::fleet::peers::PeerApi`] over this client: what the fleet's lag check uses to
/// ask peers while PostgreSQL is unreachable.
pub struct PeerAsker;

impl crate::fleet::peers::PeerApi for PeerAsker {
    fn applied(
        &self,
        target: &Target,
        token: &str,
        timeout: Duration,
        ca: Option<&Path>,
    ) -> Result<u32, Box<dyn std::error::Error + Send + Sync>> {
        let client = AdminClient::for_peer(target, token.to_string(), timeout, ca)?;
        Ok(client.fleet_node()?.applied)
    }
}

/// A client for one server's admin API.
pub struct AdminClient {
    target: Target,
    token: String,
    agent: ureq::Agent,
}

/// ureq's resolver for a [`Target`]: the URL names the certificate's name, the connection
/// goes to the target's address (as `curl --resolve` does).
#[derive(Debug)]
struct Pinned(SocketAddr);

impl ureq::unversioned::resolver::Resolver for Pinned {
    fn resolve(
        &self,
        _uri: &ureq::http::Uri,
        _config: &ureq::config::Config,
        _timeout: ureq::unversioned::transport::NextTimeout,
    ) -> Result<ureq::unversioned::resolver::ResolvedSocketAddrs, ureq::Error> {
        let mut out = self.empty();
        out.push(self.0);
        Ok(out)
    }
}

/// The roots an https admin API's certificate must chain to: `ca_file`, or the system's.
fn roots(ca_file: Option<&Path>) -> Result<ureq::tls::RootCerts, ClientError> {
    use ureq::tls::Certificate;
    let certs: Vec<Certificate<'static>> = match ca_file {
        Some(path) => crate::certs::load_certs(path)
            .map_err(|e| ClientError::Tls(format!("admin.tls_ca_file: {e}")))?
            .iter()
            .map(|c| Certificate::from_der(c.as_ref()).to_owned())
            .collect(),
        None => rustls_native_certs::load_native_certs()
            .certs
            .iter()
            .map(|c| Certificate::from_der(c.as_ref()).to_owned())
            .collect(),
    };
    if certs.is_empty() {
        return Err(ClientError::Tls(
            "no CA certificates to check the admin certificate with: set admin.tls_ca_file".into(),
        ));
    }
    Ok(ureq::tls::RootCerts::from(certs))
}

impl AdminClient {
    /// A client for the API named in `config` (https when `[admin]` has TLS).
    pub fn from_config(config: &Config) -> Result<AdminClient, ClientError> {
        let admin = config.admin.as_ref().ok_or(ClientError::NoAdmin)?;
        let target = Target::of_config(config).ok_or(ClientError::NoAdmin)?;
        AdminClient::connect(
            &target,
            admin.token().map_err(ClientError::Token)?,
            Duration::from_secs(300),
            admin.tls_ca_file.as_deref(),
        )
    }

    /// A client for the clear-HTTP API at `addr` with `token`.
    pub fn new(addr: SocketAddr, token: String) -> AdminClient {
        AdminClient::with_timeout(addr, token, Duration::from_secs(300))
    }

    /// A clear-HTTP client whose calls give up after `timeout`.
    pub fn with_timeout(addr: SocketAddr, token: String, timeout: Duration) -> AdminClient {
        AdminClient {
            target: Target::http(addr),
            token,
            agent: Self::agent(timeout, None, addr),
        }
    }

    /// A client for `target` whose calls give up after `timeout`; an https target's
    /// certificate must chain to `ca_file` (or the system roots).
    pub fn connect(
        target: &Target,
        token: String,
        timeout: Duration,
        ca_file: Option<&Path>,
    ) -> Result<AdminClient, ClientError> {
        let tls = match &target.tls_name {
            Some(_) => Some(roots(ca_file)?),
            None => None,
        };
        Ok(AdminClient {
            target: target.clone(),
            token,
            agent: Self::agent(timeout, tls, target.addr),
        })
    }

    /// A client for another node's API, as the nodes table names it: refused (with
    /// [`ClientError::ClearText`]) when the token would cross the network in clear.
    pub fn for_peer(
        target: &Target,
        token: String,
        timeout: Duration,
        ca_file: Option<&Path>,
    ) -> Result<AdminClient, ClientError> {
        if !target.may_carry_token() {
            return Err(ClientError::ClearText { addr: target.addr });
        }
        AdminClient::connect(target, token, timeout, ca_file)
    }

    fn agent(
        timeout: Duration,
        roots: Option<ureq::tls::RootCerts>,
        addr: SocketAddr,
    ) -> ureq::Agent {
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(timeout));
        if let Some(roots) = roots {
            config = config.tls_config(
                ureq::tls::TlsConfig::builder()
                    .provider(ureq::tls::TlsProvider::Rustls)
                    .root_certs(roots)
                    .unversioned_rustls_crypto_provider(crate::certs::provider())
                    .build(),
            );
        }
        ureq::Agent::with_parts(
            config.build(),
            ureq::unversioned::transport::DefaultConnector::new(),
            Pinned(addr),
        )
    }

    /// The address of the API this client talks to.
    pub fn addr(&self) -> SocketAddr {
        self.target.addr
    }

    /// The API this client talks to.
    pub fn target(&self) -> &Target {
        &self.target
    }

    fn url(&self, path: &str) -> String {
        match &self.target.tls_name {
            Some(name) => format!("https://{name}:{}{path}", self.target.addr.port()),
            None => format!("http://{}{path}", self.target.addr),
        }
    }

    fn send(
        &self,
        res: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<Answer, ClientError> {
        let unreachable = |e: ureq::Error| ClientError::Unreachable {
            addr: self.target.addr,
            reason: e.to_string(),
        };
        let mut res = res.map_err(unreachable)?;
        let status = res.status().as_u16();
        let text = res.body_mut().read_to_string().map_err(unreachable)?;
        Ok(Answer { status, text })
    }

    fn get_answer(&self, path: &str) -> Result<Answer, ClientError> {
        let res = self
            .agent
            .get(self.url(path))
            .header("Authorization", format!("Bearer {}", self.token))
            .call();
        self.send(res)
    }

    fn post_answer(
        &self,
        path: &str,
        body: &[u8],
        content_type: &str,
    ) -> Result<Answer, ClientError> {
        let res = self
            .agent
            .post(self.url(path))
            .header("Authorization", format!("Bearer {}", self.token))
            .header("Content-Type", content_type)
            .send(body);
        self.send(res)
    }

    /// The refusal of an answer that is not a success: its status and the API's error text.
    fn refused(a: &Answer) -> ClientError {
        let msg = match serde_json::from_str::<ApiErrorBody>(&a.text) {
            Ok(e) => e.error,
            Err(_) => a.text.clone(),
        };
        ClientError::Refused(format!("{} {}", a.status, msg))
    }

    /// Deserializes a successful answer (or, with `also`, an answer of that status) as `T`.
    fn typed<T: DeserializeOwned>(
        call: &str,
        a: Answer,
        also: Option<u16>,
    ) -> Result<T, ClientError> {
        if !(200..300).contains(&a.status) {
            return match serde_json::from_str(&a.text) {
                Ok(v) if Some(a.status) == also => Ok(v),
                _ => Err(Self::refused(&a)),
            };
        }
        serde_json::from_str(&a.text).map_err(|e| ClientError::Unexpected {
            call: call.to_string(),
            reason: e.to_string(),
        })
    }

    fn get_typed<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        Self::typed(&format!("GET {path}"), self.get_answer(path)?, None)
    }

    fn post_typed<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &[u8],
        content_type: &str,
    ) -> Result<T, ClientError> {
        let a = self.post_answer(path, body, content_type)?;
        Self::typed(&format!("POST {path}"), a, None)
    }

    /// The raw answer as JSON (a body that is not JSON, such as `/metrics`, as a JSON string).
    fn raw(a: Answer) -> Result<serde_json::Value, ClientError> {
        let value: serde_json::Value =
            serde_json::from_str(&a.text).unwrap_or(serde_json::Value::String(a.text.clone()));
        // /v1/ready answers 503 while draining: that is an answer, not a failure.
        if (200..300).contains(&a.status) || (a.status == 503 && value.get("draining").is_some()) {
            Ok(value)
        } else {
            Err(Self::refused(&a))
        }
    }

    /// GET `path` (with its query string), untyped.
    pub fn get(&self, path: &str) -> Result<serde_json::Value, ClientError> {
        Self::raw(self.get_answer(path)?)
    }

    /// POST raw bytes to `path`, untyped.
    pub fn post(
        &self,
        path: &str,
        body: &[u8],
        content_type: &str,
    ) -> Result<serde_json::Value, ClientError> {
        Self::raw(self.post_answer(path, body, content_type)?)
    }

    /// `GET /v1/ready`. A draining server answers 503 with the same body: that is an answer
    /// here, not a failure.
    pub fn ready(&self) -> Result<Ready, ClientError> {
        let path = "/v1/ready";
        Self::typed(&format!("GET {path}"), self.get_answer(path)?, Some(503))
    }

    /// `GET /v1/hops`: the next hops and their state.
    pub fn hops(&self) -> Result<Vec<HopView>, ClientError> {
        self.get_typed("/v1/hops")
    }

    /// `GET /v1/queue`: the queued messages that pass `filter`.
    pub fn queue_list(&self, filter: &QueueFilter) -> Result<Vec<MessageView>, ClientError> {
        self.get_typed(&format!("/v1/queue?{}", filter.query()))
    }

    /// `GET /v1/queue/{id}`: one message.
    pub fn queue_show(&self, id: &str) -> Result<MessageView, ClientError> {
        self.get_typed(&format!("/v1/queue/{}", encode(id)))
    }

    /// `POST /v1/queue/{id}/{action}`: hold, release, delete or flush one message.
    pub fn queue_action(
        &self,
        id: &str,
        action: QueueAction,
    ) -> Result<QueueActionReply, ClientError> {
        self.post_typed(
            &format!("/v1/queue/{}/{action}", encode(id)),
            b"",
            "text/plain",
        )
    }

    /// `POST /v1/queue/flush`: attempt every deferred message now, or those with a pending
    /// recipient on `route`.
    pub fn queue_flush(&self, route: Option<&str>) -> Result<FlushReply, ClientError> {
        let path = match route {
            Some(r) => format!("/v1/queue/flush?route={}", encode(r)),
            None => "/v1/queue/flush".to_string(),
        };
        self.post_typed(&path, b"", "text/plain")
    }

    /// `POST /v1/queue/resubmit`: the kept copies of messages delivered through `route`
    /// between `since` and `until` (Unix seconds); queued again unless `preview`.
    pub fn queue_resubmit(
        &self,
        route: &str,
        since: i64,
        until: i64,
        preview: bool,
    ) -> Result<Resubmitted, ClientError> {
        let path = format!(
            "/v1/queue/resubmit?route={}&since={since}&until={until}&preview={preview}",
            encode(route)
        );
        self.post_typed(&path, b"", "text/plain")
    }

    /// `POST /v1/config/reload`: re-read the server's config file.
    pub fn config_reload(&self) -> Result<ConfigReloadReply, ClientError> {
        self.post_typed("/v1/config/reload", b"", "text/plain")
    }

    /// `POST /v1/drain`: start (`on`) or stop draining.
    pub fn drain(&self, on: bool) -> Result<DrainReply, ClientError> {
        self.post_typed(&format!("/v1/drain?on={on}"), b"", "text/plain")
    }

    /// `GET /v1/directory/lookup`: an address's state, origin and route now.
    pub fn directory_lookup(&self, address: &str) -> Result<Explain, ClientError> {
        self.get_typed(&format!("/v1/directory/lookup?address={}", encode(address)))
    }

    /// `GET /v1/directory/batches`: the change log's summaries.
    pub fn directory_batches(&self) -> Result<Vec<ChangeSummary>, ClientError> {
        self.get_typed("/v1/directory/batches")
    }

    /// `POST /v1/directory/batches`: apply (or preview) a batch file.
    pub fn directory_apply(&self, batch: &BatchUpload<'_>) -> Result<BatchReply, ClientError> {
        let mut path = format!(
            "/v1/directory/batches?source={}&dry_run={}",
            encode(batch.source),
            batch.dry_run
        );
        if let Some(s) = batch.state {
            path.push_str(&format!("&state={}", encode(s)));
        }
        if let Some(at) = batch.at {
            path.push_str(&format!("&at={}", encode(at)));
        }
        if batch.format != BatchFormat::Auto {
            path.push_str(&format!("&format={}", batch.format));
        }
        let reply: BatchReply = self.post_typed(&path, batch.body, "text/csv")?;
        // A server that predates `format` ignores it and reads a report as a plain batch,
        // moving every user listed: say so, with the way back.
        if batch.format == BatchFormat::MigrationUsers && reply.report.not_completed.is_none() {
            let what = match reply.report.id {
                Some(id) => format!(
                    "it applied the file as a plain batch, id {id}, moving every user listed, completed or not; undo it with `coexist directory rollback {id}`"
                ),
                None => "it read the file as a plain batch (nothing was applied)".into(),
            };
            return Err(ClientError::Unexpected {
                call: format!("POST {path}"),
                reason: format!("the server does not know format=migration-users: {what}"),
            });
        }
        Ok(reply)
    }

    /// `POST /v1/directory/batches/{id}/rollback`: undo batch `id`.
    pub fn directory_rollback(&self, id: u32) -> Result<BatchReply, ClientError> {
        self.post_typed(
            &format!("/v1/directory/batches/{id}/rollback"),
            b"",
            "text/plain",
        )
    }

    /// `POST /v1/directory/reload`: re-read the directory file (`force`: past
    /// `directory.max_shrink`).
    pub fn directory_reload(&self, force: bool) -> Result<ReloadReport, ClientError> {
        self.post_typed(
            &format!("/v1/directory/reload?force={force}"),
            b"",
            "text/plain",
        )
    }

    /// `GET /v1/directory/scheduled`: the scheduled batches.
    pub fn directory_scheduled(&self) -> Result<Vec<Scheduled>, ClientError> {
        self.get_typed("/v1/directory/scheduled")
    }

    /// `POST /v1/directory/scheduled/{id}/cancel`: cancel a pending scheduled batch.
    pub fn directory_cancel(&self, id: u32) -> Result<Scheduled, ClientError> {
        self.post_typed(
            &format!("/v1/directory/scheduled/{id}/cancel"),
            b"",
            "text/plain",
        )
    }

    /// `POST /v1/directory/import`: a directory file as the fleet's new base.
    pub fn directory_import(
        &self,
        body: &[u8],
        source: &str,
        force: bool,
    ) -> Result<FleetBatch, ClientError> {
        self.post_typed(
            &format!(
                "/v1/directory/import?source={}&force={force}",
                encode(source)
            ),
            body,
            "text/csv",
        )
    }

    /// `GET /v1/fleet`: every node of the fleet with its lag.
    pub fn fleet_status(&self) -> Result<FleetStatus, ClientError> {
        self.get_typed("/v1/fleet")
    }

    /// `GET /v1/fleet/node`: what this node has applied.
    pub fn fleet_node(&self) -> Result<NodeApplied, ClientError> {
        self.get_typed("/v1/fleet/node")
    }

    /// `POST /v1/route/explain`: where mail for each address would go now, and why.
    pub fn route_explain(&self, addresses: &[String]) -> Result<Vec<Explain>, ClientError> {
        let body = ExplainRequest {
            addresses: addresses.to_vec(),
        };
        let body = serde_json::to_vec(&body).map_err(|e| ClientError::Unexpected {
            call: "POST /v1/route/explain".into(),
            reason: e.to_string(),
        })?;
        self.post_typed("/v1/route/explain", &body, "application/json")
    }
}

/// Percent-encodes a query value.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~@".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests;
