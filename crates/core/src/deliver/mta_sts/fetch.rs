//! The HTTPS GET of an MTA-STS policy (RFC 8461 3.3) on hyper's HTTP/1.1 client: verified
//! TLS to the addresses our own resolver found (`[dns]` nameservers, which tests point at a
//! local server) with the process's rustls provider, one request per connection, under the
//! caller's one deadline. Redirects are never followed (a `3xx` fails the fetch), the
//! answer must be a `200` with `Content-Type: text/plain`, and the body is read up to
//! [`MAX_POLICY_BYTES`]: a longer one fails the fetch without being read further.

use super::MAX_POLICY_BYTES;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::{header, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use std::net::{IpAddr, SocketAddr};
use tokio_rustls::TlsConnector;

/// Largest HTTP response head accepted.
const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Most response header fields accepted.
const MAX_HEADERS: usize = 32;
/// Addresses of the policy host tried, at most.
const MAX_ADDRESSES: usize = 3;
/// The path of the policy on its host.
pub const POLICY_PATH: &str = "/.well-known/mta-sts.txt";

/// Why a policy could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The policy host's name did not resolve.
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        /// The policy host.
        host: String,
        /// The resolver's error.
        #[source]
        source: hickory_resolver::net::NetError,
    },
    /// The policy host's name cannot be a TLS server name.
    #[error("{host} is not a TLS server name: {source}")]
    Name {
        /// The policy host.
        host: String,
        /// Why not.
        #[source]
        source: rustls_pki_types::InvalidDnsNameError,
    },
    /// The name resolved to no address.
    #[error("{0} has no address")]
    NoAddress(String),
    /// Every address was one we may not connect to (see `destination`).
    #[error("{0}")]
    Refused(String),
    /// The TCP connection failed.
    #[error("connect to {ip}: {source}")]
    Connect {
        /// The address tried.
        ip: IpAddr,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake failed (an unverified certificate among others).
    #[error("TLS with {ip}: {source}")]
    Tls {
        /// The address.
        ip: IpAddr,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The request could not be built (a host name that is not a header value).
    #[error("bad request: {0}")]
    Request(#[from] hyper::http::Error),
    /// The HTTP exchange failed (a malformed or cut-short response, among others).
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    /// A redirect, which RFC 8461 3.3 forbids following.
    #[error("HTTP {0}: redirects are not followed (RFC 8461 3.3)")]
    Redirect(u16),
    /// Another status than `200`.
    #[error("HTTP {0}")]
    Status(u16),
    /// The answer is not `text/plain`.
    #[error("Content-Type {0:?} is not text/plain")]
    ContentType(String),
    /// The body is over [`MAX_POLICY_BYTES`].
    #[error("policy larger than {MAX_POLICY_BYTES} bytes")]
    TooLarge,
}

/// Fetches the policy of `host` (`mta-sts.DOMAIN`) from `port`: the body, or why not. The
/// caller bounds the whole fetch with one deadline. Without `allow_private`, addresses that
/// are not global are not connected to.
pub async fn get(
    connector: &TlsConnector,
    resolver: &hickory_resolver::TokioResolver,
    host: &str,
    port: u16,
    allow_private: bool,
) -> Result<Vec<u8>, FetchError> {
    let ips = resolver
        .lookup_ip(format!("{host}."))
        .await
        .map_err(|source| FetchError::Resolve {
            host: host.to_string(),
            source,
        })?;
    let name = ServerName::try_from(host.to_string()).map_err(|source| FetchError::Name {
        host: host.to_string(),
        source,
    })?;
    let mut last = FetchError::NoAddress(host.to_string());
    for ip in ips.iter().take(MAX_ADDRESSES) {
        if let Some(why) =
            crate::deliver::destination::refusal("policy host", host, ip, allow_private)
        {
            last = FetchError::Refused(why);
            continue;
        }
        let tcp = match tokio::net::TcpStream::connect(SocketAddr::new(ip, port)).await {
            Ok(t) => t,
            Err(source) => {
                last = FetchError::Connect { ip, source };
                continue;
            }
        };
        let tls = connector
            .connect(name.clone(), tcp)
            .await
            .map_err(|source| FetchError::Tls { ip, source })?;
        return exchange(TokioIo::new(tls), host).await;
    }
    Err(last)
}

/// One GET of the policy over the connection `io` to `host`: the body, if the answer is a
/// `200` with `text/plain` and a body of at most [`MAX_POLICY_BYTES`].
pub async fn exchange<T>(io: T, host: &str) -> Result<Vec<u8>, FetchError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .max_headers(MAX_HEADERS)
        .max_header_size(MAX_HEAD_BYTES)
        .handshake::<_, Empty<Bytes>>(io)
        .await?;
    let req = Request::get(POLICY_PATH)
        .header(header::HOST, host)
        .header(header::USER_AGENT, "coexist")
        .header(header::ACCEPT, "text/plain")
        .header(header::CONNECTION, "close")
        .body(Empty::new())?;
    let ask = async move {
        let resp = sender.send_request(req).await?;
        read_policy(resp).await
    };
    // The connection is driven alongside the exchange and ends with it (its request
    // sender and body gone, or the server closing).
    let (res, _) = tokio::join!(ask, conn);
    res
}

/// The body of `resp` if it is a `200` with `text/plain`, read up to [`MAX_POLICY_BYTES`].
async fn read_policy(resp: Response<Incoming>) -> Result<Vec<u8>, FetchError> {
    let code = resp.status();
    if code.is_redirection() {
        return Err(FetchError::Redirect(code.as_u16()));
    }
    if code != StatusCode::OK {
        return Err(FetchError::Status(code.as_u16()));
    }
    let ctype = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| {
            String::from_utf8_lossy(v.as_bytes())
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    if ctype.split(';').next().map(str::trim) != Some("text/plain") {
        return Err(FetchError::ContentType(ctype));
    }
    let mut body = resp.into_body();
    if hyper::body::Body::size_hint(&body)
        .exact()
        .is_some_and(|n| n > MAX_POLICY_BYTES as u64)
    {
        return Err(FetchError::TooLarge);
    }
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            if data.len() > MAX_POLICY_BYTES - out.len() {
                return Err(FetchError::TooLarge);
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The result of a fetch from a server that answers `raw` to the request (and then
    /// closes), with the request it got.
    async fn answered(raw: &[u8]) -> (Result<Vec<u8>, FetchError>, String) {
        let (client, mut server) = tokio::io::duplex(1 << 20);
        let raw = raw.to_vec();
        let serve = tokio::spawn(async move {
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match server.read(&mut buf).await {
                    Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                    _ => break,
                }
            }
            let _ = server.write_all(&raw).await;
            let _ = server.shutdown().await;
            String::from_utf8_lossy(&head).into_owned()
        });
        let res = exchange(TokioIo::new(client), "mta-sts.example.com").await;
        (res, serve.await.unwrap())
    }

    fn ok(head: &str, body: &[u8]) -> Vec<u8> {
        [format!("HTTP/1.1 200 OK\r\n{head}\r\n").as_bytes(), body].concat()
    }

    #[tokio::test]
    async fn the_request_and_plain_answers() {
        let raw = ok(
            "Content-Type: text/plain; charset=utf-8\r\nContent-Length: 5\r\n",
            b"hello",
        );
        let (res, req) = answered(&raw).await;
        assert_eq!(res.unwrap(), b"hello");
        assert!(
            req.starts_with("GET /.well-known/mta-sts.txt HTTP/1.1\r\n"),
            "{req}"
        );
        assert!(
            req.to_ascii_lowercase()
                .contains("host: mta-sts.example.com\r\n"),
            "{req}"
        );
        // Read to the close when the server gives no length.
        let (res, _) = answered(&ok("Content-Type: text/plain\r\n", b"to the end")).await;
        assert_eq!(res.unwrap(), b"to the end");
    }

    #[tokio::test]
    async fn chunked_bodies() {
        let raw = ok(
            "Content-Type: text/plain\r\nTransfer-Encoding: chunked\r\n",
            b"3\r\nhel\r\n2;ext=1\r\nlo\r\n0\r\n\r\n",
        );
        assert_eq!(answered(&raw).await.0.unwrap(), b"hello");
        for bad in [
            &b"ffffffffffffffffffff\r\n"[..],
            b"ffffffffffffffff\r\nx",
            b"3\r\nabc",
            b"zz\r\nabc\r\n0\r\n\r\n",
        ] {
            let raw = ok(
                "Content-Type: text/plain\r\nTransfer-Encoding: chunked\r\n",
                bad,
            );
            let res = answered(&raw).await.0;
            assert!(res.is_err(), "{:?}: {res:?}", String::from_utf8_lossy(bad));
        }
    }

    #[tokio::test]
    async fn oversize_bodies_are_refused() {
        let big = vec![b'a'; MAX_POLICY_BYTES + 1];
        let head = format!(
            "Content-Type: text/plain\r\nContent-Length: {}\r\n",
            big.len()
        );
        let res = answered(&ok(&head, &big)).await.0;
        assert!(matches!(res, Err(FetchError::TooLarge)), "{res:?}");
        // Chunks adding up to more, and a body without a length.
        let chunk = format!("{:x}\r\n{}\r\n", 40_000, "a".repeat(40_000));
        let chunked = format!("{chunk}{chunk}0\r\n\r\n");
        let head = "Content-Type: text/plain\r\nTransfer-Encoding: chunked\r\n";
        let res = answered(&ok(head, chunked.as_bytes())).await.0;
        assert!(matches!(res, Err(FetchError::TooLarge)), "{res:?}");
        let res = answered(&ok("Content-Type: text/plain\r\n", &big)).await.0;
        assert!(matches!(res, Err(FetchError::TooLarge)), "{res:?}");
        // Exactly the limit is accepted.
        let max = vec![b'a'; MAX_POLICY_BYTES];
        let head = format!(
            "Content-Type: text/plain\r\nContent-Length: {}\r\n",
            max.len()
        );
        assert_eq!(
            answered(&ok(&head, &max)).await.0.unwrap().len(),
            MAX_POLICY_BYTES
        );
    }

    #[tokio::test]
    async fn redirects_other_statuses_and_types_fail() {
        let redirect = b"HTTP/1.1 301 Moved\r\nLocation: https://x/\r\nContent-Length: 0\r\n\r\n";
        let res = answered(redirect).await.0;
        assert!(res.unwrap_err().to_string().contains("redirect"));
        let res = answered(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            .await
            .0;
        assert!(matches!(res, Err(FetchError::Status(404))), "{res:?}");
        let res = answered(&ok(
            "Content-Type: text/html\r\nContent-Length: 5\r\n",
            b"hello",
        ))
        .await
        .0;
        assert!(matches!(res, Err(FetchError::ContentType(_))), "{res:?}");
        let res = answered(&ok("Content-Length: 5\r\n", b"hello")).await.0;
        assert!(matches!(res, Err(FetchError::ContentType(_))), "{res:?}");
        // A head cut short, a body shorter than its length, a head over the limit.
        assert!(answered(b"HTTP/1.1 200 OK\r\nContent-Ty").await.0.is_err());
        let short = ok(
            "Content-Type: text/plain\r\nContent-Length: 9\r\n",
            b"hello",
        );
        assert!(answered(&short).await.0.is_err());
        let long = format!(
            "Content-Type: text/plain\r\nX: {}\r\n",
            "a".repeat(MAX_HEAD_BYTES)
        );
        assert!(answered(&ok(&long, b"")).await.0.is_err());
    }
}
