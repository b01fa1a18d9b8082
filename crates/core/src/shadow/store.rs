//! The copies on NATS JetStream: connecting (credentials and TLS from `[shadow]`), the
//! stream, storing a message's copy before its `250`, its state and its removal (batched,
//! in order, by one worker), and reading a node's copies back for a takeover.

use super::wire::{self, Delivered, Done};
use super::worker::Work;
use super::ShadowError;
use crate::config::{OnFailure, ShadowConfig};
use crate::metrics as m;
use crate::spool::replica::{CopyFailed, CopyFuture, Replica};
use crate::spool::{DeliveryState, Envelope, RcptStatus};
use crate::types::QueueId;
use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, OnceCell};
use tracing::{info, warn};

/// Room left in each payload for the headers, below the server's `max_payload`.
const HEADROOM: usize = 8 * 1024;

/// A copy read back from the stream.
#[derive(Debug)]
pub struct Copy {
    /// Its queue id on the node that stored it.
    pub qid: String,
    /// The manifest's stream sequence.
    pub seq: u64,
    /// The envelope as that node spooled it.
    pub env: Envelope,
    /// The message bytes.
    pub body: Vec<u8>,
    /// Recipients (indexes) with a final outcome there.
    pub done: Vec<usize>,
}

/// One node's side of the shadow stream.
pub struct Store {
    pub(super) cfg: ShadowConfig,
    node: String,
    client: async_nats::Client,
    pub(super) js: jetstream::Context,
    stream: OnceCell<stream::Stream>,
    work: mpsc::UnboundedSender<Work>,
    /// The last copy could be stored.
    up: AtomicBool,
    /// Why the last copy could not be stored, while it could not.
    last_error: Mutex<Option<String>>,
}

impl Store {
    /// Connects to the JetStream cluster (in the background: a node starts while NATS is
    /// down, and its copies fail until NATS answers) and starts the worker.
    pub async fn connect(cfg: &ShadowConfig, node: &str) -> Result<Arc<Store>, ShadowError> {
        let mut o = async_nats::ConnectOptions::new()
            .name(format!("coexist {node}"))
            .retry_on_initial_connect()
            .connection_timeout(cfg.publish_timeout)
            .request_timeout(Some(cfg.publish_timeout))
            .max_reconnects(None);
        let read = |p: &std::path::Path| {
            #[allow(clippy::disallowed_methods)] // Start-up: a secret file, read once.
            std::fs::read_to_string(p)
                .map(|s| s.trim().to_string())
                .map_err(|e| ShadowError::Secret(format!("{}: {e}", p.display())))
        };
        if let (Some(user), Some(file)) = (&cfg.user, &cfg.password_file) {
            o = o.user_and_password(user.clone(), read(file)?);
        }
        if let Some(file) = &cfg.token_file {
            o = o.token(read(file)?);
        }
        if let Some(file) = &cfg.creds_file {
            o = o.credentials(&read(file)?).map_err(|e| {
                ShadowError::Secret(format!(
                    "{}: not a NATS credentials file: {e}",
                    file.display()
                ))
            })?;
        }
        if cfg.tls_ca.is_some() || cfg.tls_required {
            // Our own client config on the relay's one crypto provider (the client's default
            // would ask the process for one), checking the servers' certificates against
            // `tls_ca`, or the system's CAs.
            let mut roots = rustls::RootCertStore::empty();
            let certs = match &cfg.tls_ca {
                Some(ca) => crate::certs::load_certs(ca)
                    .map_err(|e| ShadowError::Config(format!("shadow.tls_ca: {e}")))?,
                None => crate::certs::system_roots(),
            };
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| ShadowError::Config(format!("shadow TLS roots: {e}")))?;
            }
            let tls = rustls::ClientConfig::builder_with_provider(crate::certs::provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| ShadowError::Config(format!("shadow TLS: {e}")))?
                .with_root_certificates(roots)
                .with_no_client_auth();
            o = o.tls_client_config(tls).require_tls(true);
        }
        let urls: Vec<async_nats::ServerAddr> = cfg
            .nats
            .iter()
            .map(|u| {
                u.parse()
                    .map_err(|e| ShadowError::Config(format!("shadow.nats {u}: {e}")))
            })
            .collect::<Result<_, _>>()?;
        let client = o
            .connect(urls)
            .await
            .map_err(|e| ShadowError::Nats(e.to_string()))?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(cfg.publish_timeout);
        let (tx, rx) = mpsc::unbounded_channel();
        let store = Arc::new(Store {
            cfg: cfg.clone(),
            node: node.to_string(),
            client,
            js,
            stream: OnceCell::new(),
            work: tx,
            up: AtomicBool::new(true),
            last_error: Mutex::new(None),
        });
        tokio::spawn(super::worker::run(Arc::downgrade(&store), rx));
        Ok(store)
    }

    /// The node these copies belong to.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The stream (created with the config's replicas when missing).
    pub async fn stream(&self) -> Result<&stream::Stream, ShadowError> {
        self.stream
            .get_or_try_init(|| async {
                let name = &self.cfg.stream;
                let want = stream::Config {
                    name: name.clone(),
                    subjects: vec![format!("{name}.>")],
                    max_messages_per_subject: 1,
                    num_replicas: self.cfg.replicas,
                    storage: stream::StorageType::File,
                    discard: stream::DiscardPolicy::New,
                    duplicate_window: Duration::from_secs(120),
                    description: Some("coexist: shadow copies of queued messages".into()),
                    ..Default::default()
                };
                let s = self
                    .js
                    .get_or_create_stream(want)
                    .await
                    .map_err(|e| ShadowError::Nats(format!("stream {name}: {e}")))?;
                let have = s.cached_info().config.num_replicas;
                if have != self.cfg.replicas {
                    warn!(stream = %name, replicas = have, configured = self.cfg.replicas, "the shadow stream exists with another number of replicas; it is used as it is (change it with `nats stream edit`)");
                }
                Ok(s)
            })
            .await
    }

    /// Asks JetStream for the stream (while copies cannot be stored, from the lease loop):
    /// readiness comes back without waiting for a message, which a node that is not ready
    /// would not get.
    pub async fn probe(&self) {
        let res = match self.stream().await {
            Ok(s) => s
                .get_info()
                .await
                .map(|_| ())
                .map_err(|e| format!("stream info: {e}")),
            Err(e) => Err(e.to_string()),
        };
        self.mark(&res);
    }

    /// True while the last copy could be stored; else why not.
    pub fn health(&self) -> Result<(), String> {
        if self.up.load(Ordering::SeqCst) {
            return Ok(());
        }
        Err(lock(&self.last_error)
            .clone()
            .unwrap_or_else(|| "unknown".into()))
    }

    fn mark(&self, res: &Result<(), String>) {
        let ok = res.is_ok();
        let was = self.up.swap(ok, Ordering::SeqCst);
        metrics::gauge!(m::SHADOW_UP).set(if ok { 1.0 } else { 0.0 });
        match res {
            Ok(()) if !was => info!("shadow: copies are stored again on NATS JetStream"),
            Ok(()) => {}
            Err(e) => {
                let mut last = lock(&self.last_error);
                if was || last.as_deref() != Some(e) {
                    warn!(error = %e, "shadow: cannot store redundant copies on NATS JetStream");
                }
                *last = Some(e.clone());
            }
        }
    }

    /// Publishes every part of a message and waits for JetStream's acknowledgements (each
    /// after its replicas have it).
    async fn publish_copy(&self, env: &Envelope, body: &[u8]) -> Result<(), ShadowError> {
        self.stream().await?;
        let (stream, node, qid) = (&self.cfg.stream, &self.node, env.id.as_str());
        let env_json =
            serde_json::to_vec(env).map_err(|e| ShadowError::Nats(format!("envelope: {e}")))?;
        let max = match self.client.server_info().max_payload {
            0 => 1024 * 1024,
            n => n,
        };
        let cut = wire::cut(&env_json, body, max.saturating_sub(HEADROOM).max(HEADROOM));
        let nats_err = |e: &dyn std::fmt::Display| ShadowError::Nats(e.to_string());
        let mut acks = Vec::with_capacity(1 + cut.parts.len());
        let mut h = HeaderMap::new();
        h.insert("Nats-Msg-Id", format!("{node}.{qid}.0").as_str());
        h.insert(wire::PARTS, (1 + cut.parts.len()).to_string().as_str());
        h.insert(wire::SIZE, body.len().to_string().as_str());
        acks.push(
            self.js
                .publish_with_headers(wire::manifest(stream, node, qid), h, cut.manifest.into())
                .await
                .map_err(|e| nats_err(&e))?,
        );
        for (i, r) in cut.parts.iter().enumerate() {
            let mut h = HeaderMap::new();
            h.insert("Nats-Msg-Id", format!("{node}.{qid}.{}", i + 1).as_str());
            acks.push(
                self.js
                    .publish_with_headers(
                        wire::part(stream, node, qid, i + 1),
                        h,
                        Bytes::copy_from_slice(&body[r.clone()]),
                    )
                    .await
                    .map_err(|e| nats_err(&e))?,
            );
        }
        for a in acks {
            a.await.map_err(|e| nats_err(&e))?;
        }
        Ok(())
    }

    /// The stream's last sequence now: a takeover takes copies up to it.
    pub async fn last_sequence(&self) -> Result<u64, ShadowError> {
        let s = self.stream().await?;
        let info = s
            .get_info()
            .await
            .map_err(|e| ShadowError::Nats(format!("stream info: {e}")))?;
        Ok(info.state.last_sequence)
    }

    /// The first manifest of `node`'s at or after stream sequence `from`, if any.
    pub async fn next_manifest(
        &self,
        node: &str,
        from: u64,
    ) -> Result<Option<(String, u64)>, ShadowError> {
        let stream = &self.cfg.stream;
        let Some(m) = self
            .first_from(&wire::manifests_of(stream, node), from)
            .await?
        else {
            return Ok(None);
        };
        let qid = wire::qid_of(stream, node, m.subject.as_str())
            .ok_or_else(|| ShadowError::Nats(format!("unexpected subject {}", m.subject)))?;
        Ok(Some((qid.to_string(), m.sequence)))
    }

    /// The first message on `filter` at or after stream sequence `from`, if any.
    async fn first_from(
        &self,
        filter: &str,
        from: u64,
    ) -> Result<Option<StreamMessage>, ShadowError> {
        let s = self.stream().await?;
        match s
            .get_first_raw_message_by_subject(filter, from.max(1))
            .await
        {
            Ok(m) => Ok(Some(m)),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(ShadowError::Nats(format!("reading {filter}: {e}"))),
        }
    }

    /// The last message on `subject`, if any.
    async fn last_on(&self, subject: &str) -> Result<Option<StreamMessage>, ShadowError> {
        let s = self.stream().await?;
        match s.get_last_raw_message_by_subject(subject).await {
            Ok(m) => Ok(Some(m)),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(ShadowError::Nats(format!("{subject}: {e}"))),
        }
    }

    /// Reads `node`'s copy of message `qid` whole: manifest, parts, state. `None` when it
    /// is not whole (removed meanwhile, or its publication never finished: it was never
    /// acknowledged to its sender).
    pub async fn read(&self, node: &str, qid: &str) -> Result<Option<Copy>, ShadowError> {
        self.read_copy(node, qid, false).await
    }

    /// [`Store::read`]; with `kept`, also a delivered message's kept copy (for a
    /// resubmission), else such a copy is `None` (it is never taken over).
    pub async fn read_copy(
        &self,
        node: &str,
        qid: &str,
        kept: bool,
    ) -> Result<Option<Copy>, ShadowError> {
        let stream = &self.cfg.stream;
        let get = |subject: String| async move { self.last_on(&subject).await };
        // A delivered message's kept copy is never taken over, whatever this node's own
        // `keep_delivered` says.
        if !kept && get(wire::kept(stream, node, qid)).await?.is_some() {
            return Ok(None);
        }
        let Some(mf) = get(wire::manifest(stream, node, qid)).await? else {
            return Ok(None);
        };
        let header = |name: &'static str| -> Result<usize, wire::WireError> {
            mf.headers
                .get(name)
                .and_then(|v| v.as_str().parse().ok())
                .ok_or(wire::WireError::Header(name))
        };
        let bad = |e: wire::WireError| ShadowError::Damaged(format!("{node}'s copy of {qid}: {e}"));
        let (parts, size) = (
            header(wire::PARTS).map_err(bad)?,
            header(wire::SIZE).map_err(bad)?,
        );
        let (env, first) = wire::open_manifest(&mf.payload).map_err(bad)?;
        // The header is data from the stream: the bytes are collected as they come, and
        // the capacity asked for up front is bounded.
        let mut body = Vec::with_capacity(size.min(mf.payload.len() * parts.max(1)));
        body.extend_from_slice(first);
        for i in 1..parts {
            match get(wire::part(stream, node, qid, i)).await? {
                Some(p) => body.extend_from_slice(&p.payload),
                None => return Ok(None),
            }
        }
        if body.len() != size {
            return Err(bad(wire::WireError::Size {
                got: body.len(),
                want: size,
            }));
        }
        let done = match get(wire::state(stream, node, qid)).await? {
            Some(st) => serde_json::from_slice::<Done>(&st.payload)
                .map(|d| d.done)
                .unwrap_or_default(),
            None => Vec::new(),
        };
        Ok(Some(Copy {
            qid: qid.to_string(),
            seq: mf.sequence,
            env,
            body,
            done,
        }))
    }

    /// The first delivered record (of any node's) at or after stream sequence `from`:
    /// (node, queue id, sequence, record).
    pub async fn next_kept(
        &self,
        from: u64,
    ) -> Result<Option<(String, String, u64, Delivered)>, ShadowError> {
        let stream = &self.cfg.stream;
        let filter = wire::kept_of_all(stream);
        let mut from = from;
        while let Some(m) = self.first_from(&filter, from).await? {
            from = m.sequence + 1;
            let Some((n, q)) = wire::kept_subject(stream, m.subject.as_str()) else {
                continue;
            };
            if let Ok(d) = serde_json::from_slice::<Delivered>(&m.payload) {
                return Ok(Some((n.to_string(), q.to_string(), m.sequence, d)));
            }
        }
        Ok(None)
    }

    /// Removes `node`'s copy of `qid` (every part), now.
    pub async fn remove(&self, node: &str, qid: &str) -> Result<(), ShadowError> {
        let s = self.stream().await?;
        s.purge()
            .filter(wire::message_filter(&self.cfg.stream, node, qid))
            .await
            .map_err(|e| ShadowError::Nats(format!("removing {node}'s copy of {qid}: {e}")))?;
        Ok(())
    }
}

impl Replica for Store {
    fn copy<'a>(&'a self, env: &'a Envelope, body: &'a Arc<Vec<u8>>) -> CopyFuture<'a> {
        Box::pin(async move {
            let t0 = Instant::now();
            let deadline = t0 + self.cfg.publish_timeout;
            // Tried again until the deadline: a server lost under the client is replaced
            // by another of the cluster within a moment, and JetStream stores a part sent
            // twice once (its Nats-Msg-Id).
            let mut wait = Duration::from_millis(25);
            let mut last = String::new();
            let res = loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, self.publish_copy(env, body)).await {
                    Ok(Ok(())) => break Ok(()),
                    Ok(Err(e)) => last = e.to_string(),
                    Err(_) => {}
                }
                if Instant::now() + wait >= deadline {
                    break Err(if last.is_empty() {
                        format!(
                            "no acknowledgement from JetStream within {} ms",
                            self.cfg.publish_timeout.as_millis()
                        )
                    } else {
                        last
                    });
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_millis(500));
            };
            metrics::histogram!(m::SHADOW_PUBLISH_SECONDS).record(t0.elapsed().as_secs_f64());
            let result = if res.is_ok() { "ok" } else { "failed" };
            metrics::counter!(m::SHADOW_PUBLISHES, "result" => result).increment(1);
            self.mark(&res);
            res.map_err(|reason| {
                let refuse = self.cfg.on_failure == OnFailure::Defer;
                if !refuse {
                    metrics::counter!(m::SHADOW_LOCAL_ONLY).increment(1);
                    warn!(qid = %env.id, error = %reason, "shadow: no redundant copy; the message is kept on this node's spool only (on_failure = \"accept\")");
                }
                CopyFailed { reason, refuse }
            })
        })
    }

    fn progress(&self, id: &QueueId, state: &DeliveryState) {
        // Only the delivered ones: a survivor tries a failed recipient again (it fails again
        // and its DSN is sent), rather than lose the DSN a dead node had not yet sent.
        let done = Done {
            done: (0..state.rcpts.len())
                .filter(|&i| state.rcpts[i].status == RcptStatus::Delivered)
                .collect(),
        };
        if done.done.is_empty() {
            return;
        }
        if let Ok(json) = serde_json::to_vec(&done) {
            let _ = self.work.send(Work::State(id.as_str().to_string(), json));
        }
    }

    fn forget(&self, id: &QueueId, last: Option<&DeliveryState>) {
        let qid = id.as_str().to_string();
        if let (Some(_), Some(last)) = (self.cfg.keep_delivered, last) {
            let mut d = Delivered {
                at: crate::clock::now_secs(),
                ..Default::default()
            };
            for (i, r) in last.rcpts.iter().enumerate() {
                if let (RcptStatus::Delivered, Some(route)) = (r.status, &r.route) {
                    d.routes.entry(route.clone()).or_default().push(i);
                }
            }
            if !d.routes.is_empty() {
                if let Ok(json) = serde_json::to_vec(&d) {
                    let _ = self.work.send(Work::Keep(qid, json));
                    return;
                }
            }
        }
        let _ = self.work.send(Work::Forget(qid));
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
