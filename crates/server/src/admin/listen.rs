//! The admin listener: accepts at most `admin.max_connections` connections, speaks TLS when
//! `admin.tls_cert` is set, and closes a connection whose client is slow or idle.
//!
//! Why not `axum::serve`: it has no connection cap and no timeout, so idle or slow clients
//! can hold as many descriptors as the process has, and the SMTP listener then cannot
//! accept (issue 24). Why not hyper's `header_read_timeout` alone: its clock runs from the
//! moment hyper waits for a request head, idle keep-alive time included, and stops at the
//! end of the head, so it can neither keep the idle and request limits apart nor bound the
//! body. Each connection is therefore served by hyper's HTTP/1 connection under a small
//! watchdog that follows the connection's phase ([`Phase`]):
//!
//! - idle (just accepted, or its last response written): closed after `idle_timeout`;
//! - a request arriving (from its first byte until its body is read to the end, or dropped
//!   unread by the handler): closed `request_timeout` after that first byte;
//! - busy (a handler runs, its answer is being written): not limited here.
//!
//! A connection is closed by dropping it: the client sees the socket close, with no answer.
//! At the cap, a new connection is closed as soon as it is accepted, before anything is read
//! or written (no TLS handshake, no 503): it costs one descriptor for an instant, so the
//! admin listener never holds more than `max_connections` (+1) descriptors, whatever its
//! clients do. One client (not on loopback) holds at most a quarter of them ([`super::share`]),
//! so a single host cannot take them all. Refusals are logged once per burst.

use crate::accept::AcceptErrors;
use crate::metrics as m;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{HeaderValue, Request};
use axum::Router;
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

/// The limits of the admin listener (from `[admin]`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once.
    pub max_connections: usize,
    /// From a request's first byte to the end of its body (and for a TLS handshake).
    pub request_timeout: Duration,
    /// With no request in progress.
    pub idle_timeout: Duration,
}

impl Limits {
    /// The limits `[admin]` sets.
    pub fn of(admin: &crate::config::AdminConfig) -> Limits {
        Limits {
            max_connections: admin.max_connections.max(1),
            request_timeout: admin.request_timeout,
            idle_timeout: admin.idle_timeout,
        }
    }
}

/// Where a connection is, for its watchdog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No request in progress since this instant.
    Idle(Instant),
    /// A request has been arriving since this instant (its first byte).
    Request(Instant),
    /// A handler runs or its answer is being written.
    Busy,
}

/// A connection's phase, shared by its stream, its request and response bodies and its
/// watchdog, which is woken at each change (a change can bring its deadline closer).
#[derive(Debug)]
struct Watch {
    phase: Mutex<Phase>,
    changed: Notify,
}

impl Watch {
    fn new() -> Arc<Watch> {
        Arc::new(Watch {
            phase: Mutex::new(Phase::Idle(Instant::now())),
            changed: Notify::new(),
        })
    }

    fn get(&self) -> Phase {
        *self.phase.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies `f` to the phase; wakes the watchdog when it changed.
    fn update(&self, f: impl FnOnce(Phase) -> Phase) {
        let mut p = self.phase.lock().unwrap_or_else(|p| p.into_inner());
        let next = f(*p);
        if next != *p {
            *p = next;
            self.changed.notify_one();
        }
    }

    /// Bytes arrived: an idle connection now has a request arriving.
    fn bytes_read(&self) {
        self.update(|p| match p {
            Phase::Idle(_) => Phase::Request(Instant::now()),
            p => p,
        });
    }

    /// A request's head was read: it keeps arriving while it has a body to come.
    fn head_read(&self, body_to_come: bool) {
        self.update(|p| match (p, body_to_come) {
            (_, false) => Phase::Busy,
            (Phase::Request(t), true) => Phase::Request(t),
            (_, true) => Phase::Request(Instant::now()),
        });
    }

    /// The request body is read to its end, or dropped unread.
    fn body_done(&self) {
        self.update(|p| match p {
            Phase::Request(_) => Phase::Busy,
            p => p,
        });
    }

    /// The answer is written: a busy connection is idle from now (one whose next request
    /// is already arriving keeps that request's clock).
    fn answered(&self) {
        self.update(|p| match p {
            Phase::Busy => Phase::Idle(Instant::now()),
            p => p,
        });
    }

    /// When to look again, and whether the connection is past its limit now (with why).
    fn check(&self, limits: &Limits, now: Instant) -> (Instant, Option<&'static str>) {
        match self.get() {
            Phase::Idle(t) => {
                let end = t + limits.idle_timeout;
                (end, (now >= end).then_some("idle"))
            }
            Phase::Request(t) => {
                let end = t + limits.request_timeout;
                (end, (now >= end).then_some("request"))
            }
            // Busy ends with a phase whose clock starts then: looking again after the
            // shorter limit is never too late.
            Phase::Busy => (now + limits.idle_timeout.min(limits.request_timeout), None),
        }
    }
}

/// A stream that tells its [`Watch`] when bytes arrive.
struct Watched<S> {
    inner: S,
    watch: Arc<Watch>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.watch.bytes_read();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, b)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A request body that tells its [`Watch`] when it is read to the end or dropped.
struct RequestBody {
    inner: Incoming,
    watch: Arc<Watch>,
}

impl HttpBody for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(None) = r {
            this.watch.body_done();
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        self.watch.body_done();
    }
}

/// A response body that makes its connection idle again once it is written (dropped).
struct ResponseBody {
    inner: Body,
    watch: Arc<Watch>,
}

impl HttpBody for ResponseBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        self.watch.answered();
    }
}

/// Accepts admin connections on `listener` until the task is dropped, serving `app` on
/// each (over TLS with `tls`) within `limits`.
pub async fn serve(listener: TcpListener, app: Router, limits: Limits, tls: Option<TlsAcceptor>) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let shares = super::share::Shares::new(limits.max_connections);
    let mut errors = AcceptErrors::new("admin");
    // Connections closed because their client held its share, since the last one admitted.
    let mut over_share: u64 = 0;
    // Connections closed at the cap since the last one admitted.
    let mut refused: u64 = 0;
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                errors.failed(&e).await;
                continue;
            }
        };
        errors.accepted();
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            // Closed unread: see the module doc.
            drop(tcp);
            metrics::counter!(m::ADMIN_REFUSED).increment(1);
            if refused == 0 {
                warn!(
                    client = %peer,
                    max_connections = limits.max_connections,
                    "admin: admin.max_connections connections are open; closing new ones at once (logged once until one is admitted again)"
                );
            }
            refused += 1;
            continue;
        };
        let Some(held) = shares.take(peer.ip()) else {
            drop(tcp);
            metrics::counter!(m::ADMIN_REFUSED).increment(1);
            if over_share == 0 {
                warn!(
                    client = %peer,
                    per_client = shares.per_client(),
                    "admin: a client holds its share of admin.max_connections (a quarter); closing its new connections at once (logged once until one is admitted again)"
                );
            }
            over_share += 1;
            continue;
        };
        over_share = 0;
        if refused > 0 {
            info!(
                refused,
                "admin: a connection is admitted again after connections were closed at admin.max_connections"
            );
            refused = 0;
        }
        let app = app.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            match tls {
                None => connection(tcp, peer, app, limits, false).await,
                Some(acceptor) => {
                    match tokio::time::timeout(limits.request_timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => connection(stream, peer, app, limits, true).await,
                        Ok(Err(e)) => {
                            debug!(client = %peer, error = %e, "admin: TLS handshake failed")
                        }
                        Err(_) => {
                            metrics::counter!(m::ADMIN_TIMEOUTS, "reason" => "request")
                                .increment(1);
                            debug!(client = %peer, "admin: TLS handshake not finished within admin.request_timeout; closed")
                        }
                    }
                }
            }
            drop(held);
            drop(permit);
        });
    }
}

/// Serves one connection until it ends or its watchdog closes it.
async fn connection<S>(stream: S, peer: SocketAddr, app: Router, limits: Limits, tls: bool)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let watch = Watch::new();
    let io = hyper_util::rt::TokioIo::new(Watched {
        inner: stream,
        watch: watch.clone(),
    });
    let svc_watch = watch.clone();
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let watch = svc_watch.clone();
        watch.head_read(!req.body().is_end_stream());
        let mut req = req.map(|inner| {
            Body::new(RequestBody {
                inner,
                watch: watch.clone(),
            })
        });
        req.extensions_mut().insert(ConnectInfo(peer));
        if tls {
            // No proxy in between: the request came over TLS (the console marks its cookie
            // `Secure` on this header), whatever the client wrote in it.
            req.headers_mut()
                .insert("x-forwarded-proto", HeaderValue::from_static("https"));
        }
        let mut app = app.clone();
        async move {
            let res = tower_service::Service::call(&mut app, req).await?;
            Ok::<_, std::convert::Infallible>(res.map(|inner| ResponseBody { inner, watch }))
        }
    });
    let conn = hyper::server::conn::http1::Builder::new().serve_connection(io, svc);
    tokio::pin!(conn);
    loop {
        let (next, expired) = watch.check(&limits, Instant::now());
        if let Some(reason) = expired {
            metrics::counter!(m::ADMIN_TIMEOUTS, "reason" => reason).increment(1);
            debug!(client = %peer, reason, "admin: connection past its timeout; closed");
            return;
        }
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    debug!(client = %peer, error = %e, "admin: connection ended with an error");
                }
                return;
            }
            _ = tokio::time::sleep_until(next) => {}
            _ = watch.changed.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_follow_a_request_and_its_answer() {
        let limits = Limits {
            max_connections: 1,
            request_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
        };
        let w = Watch::new();
        let t0 = Instant::now();
        let (next, exp) = w.check(&limits, t0);
        assert!(exp.is_none() && next >= t0 + Duration::from_secs(29));
        assert_eq!(
            w.check(&limits, t0 + Duration::from_secs(31)).1,
            Some("idle")
        );
        w.bytes_read();
        assert!(matches!(w.get(), Phase::Request(_)));
        assert_eq!(
            w.check(&limits, t0 + Duration::from_secs(11)).1,
            Some("request")
        );
        w.head_read(true);
        assert!(matches!(w.get(), Phase::Request(_)));
        w.body_done();
        assert_eq!(w.get(), Phase::Busy);
        assert_eq!(w.check(&limits, t0 + Duration::from_secs(3600)).1, None);
        w.answered();
        assert!(matches!(w.get(), Phase::Idle(_)));
        w.head_read(false);
        assert_eq!(w.get(), Phase::Busy);
    }
}
