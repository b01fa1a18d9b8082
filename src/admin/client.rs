//! The CLI's side of the admin API: a small blocking HTTP client (ureq) with the token.

use crate::config::Config;
use std::net::SocketAddr;
use std::time::Duration;

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
    /// The server refused the call.
    #[error("{0}")]
    Refused(String),
}

/// A client for one server's admin API.
pub struct AdminClient {
    addr: SocketAddr,
    token: String,
    agent: ureq::Agent,
}

impl AdminClient {
    /// A client for the API named in `config`.
    pub fn from_config(config: &Config) -> Result<AdminClient, ClientError> {
        let admin = config.admin.as_ref().ok_or(ClientError::NoAdmin)?;
        let mut addr = admin.listen;
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        Ok(AdminClient::new(
            addr,
            admin.token().map_err(ClientError::Token)?,
        ))
    }

    /// A client for the API at `addr` with `token`.
    pub fn new(addr: SocketAddr, token: String) -> AdminClient {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(300)))
            .build()
            .new_agent();
        AdminClient { addr, token, agent }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn finish(
        &self,
        res: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<serde_json::Value, ClientError> {
        let mut res = res.map_err(|e| ClientError::Unreachable {
            addr: self.addr,
            reason: e.to_string(),
        })?;
        let status = res.status();
        let text = res
            .body_mut()
            .read_to_string()
            .map_err(|e| ClientError::Unreachable {
                addr: self.addr,
                reason: e.to_string(),
            })?;
        let value: serde_json::Value =
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
        // /v1/ready answers 503 while draining: that is an answer, not a failure.
        if status.is_success() || (status.as_u16() == 503 && value.get("draining").is_some()) {
            Ok(value)
        } else {
            let msg = value
                .get("error")
                .and_then(|e| e.as_str())
                .map(str::to_string)
                .unwrap_or_else(|| value.to_string());
            Err(ClientError::Refused(format!("{} {}", status.as_u16(), msg)))
        }
    }

    /// GET `path` (with its query string).
    pub fn get(&self, path: &str) -> Result<serde_json::Value, ClientError> {
        let res = self
            .agent
            .get(self.url(path))
            .header("Authorization", format!("Bearer {}", self.token))
            .call();
        self.finish(res)
    }

    /// POST raw bytes to `path`.
    pub fn post(
        &self,
        path: &str,
        body: &[u8],
        content_type: &str,
    ) -> Result<serde_json::Value, ClientError> {
        let res = self
            .agent
            .post(self.url(path))
            .header("Authorization", format!("Bearer {}", self.token))
            .header("Content-Type", content_type)
            .send(body);
        self.finish(res)
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
