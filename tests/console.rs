//! The web console as an admin sees it, in a real browser (headless Chromium through
//! chromedriver, see `common::browser`), and its session rules as an attacker meets them
//! over plain HTTP.
//!
//! Screenshots of the main pages go to a temporary folder, or to the folder named by
//! `COEXIST_SCREENSHOTS` (the README's come from
//! `COEXIST_SCREENSHOTS=docs/console cargo test --test console`).
#![allow(clippy::disallowed_methods)] // Tests set up and inspect files directly.

mod common;

use common::browser::Browser;
use common::*;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Where screenshots go.
fn shots() -> (PathBuf, Option<tempfile::TempDir>) {
    match std::env::var_os("COEXIST_SCREENSHOTS") {
        Some(d) => (PathBuf::from(d), None),
        None => {
            let t = tempfile::tempdir().unwrap();
            (t.path().to_path_buf(), Some(t))
        }
    }
}

/// A relay whose on-premises next hop is down (mail for alice and dave stays queued) and
/// whose cloud next hop takes everything.
async fn relay_with_onprem_down() -> (Harness, DownPort) {
    let down = DownPort::new();
    let addr = down.addr;
    let h = harness(move |c| {
        c.routes.get_mut("onprem").unwrap().next_hops = vec![addr.into()];
        c.queue.min_backoff = Duration::from_secs(600);
        c.queue.max_backoff = Duration::from_secs(600);
    })
    .await;
    (h, down)
}

async fn login(b: &Browser, api: SocketAddr, token: &str) {
    b.open(&format!("http://{api}/console")).await;
    b.fill("#token", token).await;
    b.click("#login-button").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_watches_and_acts_through_the_console_in_chromium() {
    let (h, _down) = relay_with_onprem_down().await;
    let api = h.relay.admin_addr.unwrap();
    let (dir, _keep) = shots();
    let b = Browser::start().await;

    // A wrong token is refused with a clear message; the right one opens the console.
    login(&b, api, "0123456789abcdef0123456789abcdef").await;
    b.wait_text("#login-error", "Wrong token").await;
    b.screenshot(&dir.join("login.png")).await;
    login(&b, api, TOKEN).await;
    b.wait_text("#ov-shape", "The queue is empty.").await;

    // Mail through the relay: bob (cloud) is delivered, alice (on premises, hop down) waits.
    let r = send_one(h.addr, &["alice@nhs.test", "bob@nhs.test"], "console").await;
    assert_eq!(r.code, 250, "{r:?}");
    let qid = queue_id(&r);
    wait(&h.cloud, 1).await;
    let onprem = b
        .wait_text("#ov-shape tr[data-route=\"onprem\"]", "onprem")
        .await;
    assert!(onprem.contains(&h.onprem_hop()), "{onprem}");
    assert!(
        onprem.starts_with(&format!("onprem {} 1 1 1 0 0 0 0 0", h.onprem_hop())),
        "{onprem}"
    );
    b.wait_text("#ov-hops", "circuit open").await;
    b.wait_text("#ov-legend", "delivered 1").await;
    b.wait_text("#ov-reasons", "4.4.1").await;
    b.screenshot(&dir.join("overview.png")).await;

    // The queue: the message, its detail, hold and release with a confirmation.
    b.open(&format!("http://{api}/console#queue")).await;
    b.click(&format!("#queue-list tr[data-id=\"{qid}\"]")).await;
    b.wait_text("#queue-detail", "alice@nhs.test").await;
    b.click("#q-hold").await;
    b.wait_text("#queue-confirm-text", &format!("Hold message {qid}?"))
        .await;
    b.click("#queue-confirm-yes").await;
    b.wait_text("#queue-phase", "State: held").await;
    b.screenshot(&dir.join("queue.png")).await;
    b.click("#q-release").await;
    b.click("#queue-confirm-yes").await;
    b.wait_text("#queue-phase", "State: deferred").await;

    // A batch: preview the diff, apply it with a confirmation, roll it back. (Dave has no
    // mail queued: alice's message stays where it is.)
    let csv = h.dir.path().join("weekend-1.csv");
    std::fs::write(
        &csv,
        "address,state\ndave@nhs.test,cloud\nbob@nhs.test,cloud\nnobody@nhs.test,cloud\n",
    )
    .unwrap();
    b.open(&format!("http://{api}/console#batches")).await;
    b.fill("#batch-file", csv.to_str().unwrap()).await;
    b.click("#batch-preview").await;
    let diff = b.wait_text("#batch-diff", "Preview of weekend-1.csv").await;
    for want in [
        "rows\n3",
        "changed\n1",
        "already in that state\n1",
        "not found\n1",
    ] {
        assert!(diff.contains(want), "{want:?} in {diff}");
    }
    assert!(diff.contains("Not found: nobody@nhs.test"), "{diff}");
    // What the batch moves, from the tracking log and the queue.
    assert!(
        diff.contains("Traffic on ")
            && diff.contains("to these 3 address(es) in the last 1 day(s)"),
        "{diff}"
    );
    b.wait_text(
        "#batch-confirm-text",
        "Apply weekend-1.csv: 1 mailbox(es) change state?",
    )
    .await;
    b.screenshot(&dir.join("batches.png")).await;
    assert_eq!(
        h.relay
            .directory
            .lookup(&addr("dave@nhs.test"))
            .state
            .as_deref(),
        Some("onprem"),
        "a preview changes nothing"
    );
    b.click("#batch-apply").await;
    let done = b.wait_text("#batch-result", "Done: change #").await;
    assert!(done.contains("changed\n1"), "{done}");
    let entry = b.wait_text("#timeline", "weekend-1.csv").await;
    assert!(entry.contains("apply"), "{entry}");
    assert_eq!(
        h.relay
            .directory
            .lookup(&addr("dave@nhs.test"))
            .state
            .as_deref(),
        Some("cloud")
    );
    b.click("#timeline button.rollback").await;
    b.wait_text("#batch-confirm-text", "Roll back change #")
        .await;
    b.click("#batch-apply").await;
    b.wait_text("#timeline", "rollback").await;
    assert_eq!(
        h.relay
            .directory
            .lookup(&addr("dave@nhs.test"))
            .state
            .as_deref(),
        Some("onprem")
    );

    // Address search: route explain and the recent deliveries.
    b.open(&format!("http://{api}/console#address")).await;
    b.fill("#addr-input", "bob@nhs.test").await;
    b.click("#addr-search").await;
    let x = b.wait_text("#addr-explain", "route").await;
    assert!(
        x.contains("state\ncloud") && x.contains(&h.cloud.addr.to_string()),
        "{x}"
    );
    let t = b.wait_text("#addr-trace", "delivered").await;
    assert!(t.contains(&qid) && t.contains("250"), "{t}");
    b.fill("#addr-input", "alice@nhs.test").await;
    b.click("#addr-search").await;
    b.wait_text("#addr-trace", "deferred").await;
    // The message view: every event of the message, the remote reply in full.
    b.click("#addr-trace a.qid").await;
    let m = b.wait_text("#addr-message", "routed").await;
    assert!(
        m.contains("received") && m.contains("deferred") && m.contains("origin: file "),
        "{m}"
    );
    b.screenshot(&dir.join("address.png")).await;

    // Without the session cookie, an action is refused and nothing happens.
    b.open(&format!("http://{api}/console#queue")).await;
    b.click(&format!("#queue-list tr[data-id=\"{qid}\"]")).await;
    b.wait_text("#queue-detail", "alice@nhs.test").await;
    b.client().delete_all_cookies().await.unwrap();
    b.click("#q-hold").await;
    b.click("#queue-confirm-yes").await;
    b.wait_text("#banner", "log in again").await;
    let e = h.relay.queue.get(&qid).expect("still queued");
    assert_ne!(e.phase, coexist::queue::Phase::Held);
    // And the console page itself asks for a login again.
    b.open(&format!("http://{api}/console")).await;
    b.wait_text("#login-form", "Admin token").await;
    b.close().await;
}

fn addr(a: &str) -> coexist::types::Address {
    coexist::types::Address::parse(a, true).unwrap()
}

trait OnpremHop {
    fn onprem_hop(&self) -> String;
}

impl OnpremHop for Harness {
    /// The on-premises next hop as the config (and the overview) names it.
    fn onprem_hop(&self) -> String {
        let cfg = self.relay.control.config();
        let h = &cfg.routes["onprem"].next_hops[0];
        format!("{}:{}", h.host, h.port)
    }
}

/// One HTTP/1.1 request with extra headers; (status, headers, body).
async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    http_request(addr, method, path, headers, body.as_bytes()).await
}

const FORM: (&str, &str) = ("Content-Type", "application/x-www-form-urlencoded");

/// The `coexist_session=…` pair of a response's Set-Cookie.
fn session_cookie(head: &str) -> String {
    head.lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .and_then(|c| c.split(';').next())
        .unwrap_or_else(|| panic!("no Set-Cookie in {head}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_need_the_token_csrf_token_and_same_origin() {
    let h = harness(|_| {}).await;
    let api = h.relay.admin_addr.unwrap();
    let origin = format!("http://{api}");

    // A wrong token: 401 with a clear message; after a few, logins wait.
    let (code, _, body) = request(
        api,
        "POST",
        "/console/login",
        &[FORM],
        "token=wrong-token-123456",
    )
    .await;
    assert_eq!(code, 401);
    assert!(body.contains("Wrong token"), "{body}");
    // A login posted from another site is refused.
    let (code, _, body) = request(
        api,
        "POST",
        "/console/login",
        &[FORM, ("Origin", "http://evil.test")],
        &format!("token={TOKEN}"),
    )
    .await;
    assert_eq!(code, 403, "{body}");

    // The right token: a session cookie, HttpOnly, SameSite=Strict, with an expiry; Secure
    // when the request came over TLS (a proxy says so).
    let (code, head, _) = request(
        api,
        "POST",
        "/console/login",
        &[FORM],
        &format!("token={TOKEN}"),
    )
    .await;
    assert_eq!(code, 303, "{head}");
    let set = head.lines().find(|l| l.starts_with("set-cookie:")).unwrap();
    for want in ["HttpOnly", "SameSite=Strict", "Max-Age=28800", "Path=/"] {
        assert!(set.contains(want), "{want} in {set}");
    }
    assert!(!set.contains("Secure"), "{set}");
    let (_, tls_head, _) = request(
        api,
        "POST",
        "/console/login",
        &[FORM, ("X-Forwarded-Proto", "https")],
        &format!("token={TOKEN}"),
    )
    .await;
    assert!(tls_head.contains("; Secure"), "{tls_head}");
    let cookie = session_cookie(&head);

    // The console page carries the session's CSRF token; reads need only the cookie.
    let (code, _, page) = request(api, "GET", "/console", &[("Cookie", &cookie)], "").await;
    assert_eq!(code, 200);
    let csrf = page
        .split("name=\"csrf-token\" content=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .expect("CSRF token in the page")
        .to_string();
    let (code, _, body) = request(api, "GET", "/v1/overview", &[("Cookie", &cookie)], "").await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"hops\""), "{body}");

    // A change with the cookie but without the CSRF token, or from another origin: 403.
    let drain = "/v1/drain?on=false";
    let (code, _, body) = request(api, "POST", drain, &[("Cookie", &cookie)], "").await;
    assert_eq!(code, 403);
    assert!(body.contains("CSRF"), "{body}");
    let (code, _, body) = request(
        api,
        "POST",
        drain,
        &[
            ("Cookie", &cookie),
            ("X-CSRF-Token", &csrf),
            ("Origin", "http://evil.test"),
        ],
        "",
    )
    .await;
    assert_eq!(code, 403);
    assert!(body.contains("cross-origin"), "{body}");
    let (code, _, body) = request(
        api,
        "POST",
        drain,
        &[
            ("Cookie", &cookie),
            ("X-CSRF-Token", &csrf),
            ("Origin", &origin),
        ],
        "",
    )
    .await;
    assert_eq!(code, 200, "{body}");

    // Without a cookie the API is what it was: bearer token or 401.
    let (code, _, body) = request(api, "POST", drain, &[("X-CSRF-Token", &csrf)], "").await;
    assert_eq!(code, 401, "{body}");
    let (code, _, _) = request(
        api,
        "GET",
        "/v1/overview",
        &[("Authorization", &format!("Bearer {TOKEN}"))],
        "",
    )
    .await;
    assert_eq!(code, 200);

    // Logout needs the CSRF token; afterwards the cookie opens nothing.
    let (code, _, _) = request(
        api,
        "POST",
        "/console/logout",
        &[FORM, ("Cookie", &cookie)],
        "csrf=nope",
    )
    .await;
    assert_eq!(code, 403);
    let (code, head, _) = request(
        api,
        "POST",
        "/console/logout",
        &[FORM, ("Cookie", &cookie)],
        &format!("csrf={csrf}"),
    )
    .await;
    assert_eq!(code, 303);
    assert!(head.contains("Max-Age=0"), "{head}");
    let (code, _, _) = request(api, "GET", "/v1/overview", &[("Cookie", &cookie)], "").await;
    assert_eq!(code, 401);
    let (_, _, page) = request(api, "GET", "/console", &[("Cookie", &cookie)], "").await;
    assert!(page.contains("id=\"login-form\""), "{page}");

    // Repeated wrong tokens from one address: refused for a while, even the right one.
    for _ in 0..5 {
        request(
            api,
            "POST",
            "/console/login",
            &[FORM],
            "token=wrong-token-123456",
        )
        .await;
    }
    let (code, _, body) = request(
        api,
        "POST",
        "/console/login",
        &[FORM],
        &format!("token={TOKEN}"),
    )
    .await;
    assert_eq!(code, 429);
    assert!(body.contains("Too many failed logins"), "{body}");
}
