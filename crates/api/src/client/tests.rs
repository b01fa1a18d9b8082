use super::*;

/// The token never goes in clear to a peer off loopback (see [`Target::may_carry_token`]).
#[test]
fn a_peer_over_clear_http_off_loopback_is_not_sent_the_token() {
    let e = AdminClient::for_peer(
        &Target::http("10.0.0.5:8025".parse().unwrap()),
        "3f9a1c7e5b2d4086a1e9c3b7d5f20486".into(),
        std::time::Duration::from_secs(1),
        None,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.starts_with("not sending the admin token to http://10.0.0.5:8025"),
        "{e}"
    );
}

fn answer(status: u16, text: &str) -> Answer {
    Answer {
        status,
        text: text.into(),
    }
}

#[test]
fn answers_are_read_as_the_api_type_or_refused_with_the_api_error() {
    let ok: FlushReply =
        AdminClient::typed("POST /f", answer(200, r#"{"flushed":3}"#), None).unwrap();
    assert_eq!(ok.flushed, 3);
    let e = AdminClient::typed::<MessageView>(
        "GET /v1/queue/X",
        answer(404, r#"{"error":"no message X in the queue"}"#),
        None,
    )
    .unwrap_err();
    assert_eq!(e.to_string(), "404 no message X in the queue");
    let e = AdminClient::typed::<FlushReply>("POST /f", answer(200, r#"{"flush":3}"#), None)
        .unwrap_err();
    assert!(
        e.to_string().starts_with(
            "unexpected answer from the admin API to POST /f: missing field `flushed`"
        ),
        "{e}"
    );
}

#[test]
fn a_draining_server_still_answers_ready() {
    let body = r#"{"ready":false,"draining":true,"sessions_open":2,"directory_entries":4,
        "directory_reload":{"last_result":null,"last_time":null,"last_refused":null}}"#;
    let r: Ready = AdminClient::typed("GET /v1/ready", answer(503, body), Some(503)).unwrap();
    assert!(r.draining && !r.ready);
    let e =
        AdminClient::typed::<Ready>("GET /v1/ready", answer(503, "busy"), Some(503)).unwrap_err();
    assert_eq!(e.to_string(), "503 busy");
}
