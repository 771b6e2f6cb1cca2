//! Every kind of bad input gets its defined answer, is counted, and harms no one else.

use std::time::Duration;

use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::support::{Client, Gateway, event, raw};

#[tokio::test]
async fn bad_frames_get_error_frames_and_the_connection_stays_open() {
    let gateway = Gateway::start().await;
    let mut bystander = gateway.client("u_ok").await;
    bystander.subscribe("t_1", None).await;
    let mut client = gateway.client("u_1").await;

    let cases: [(Message, &str); 7] = [
        (Message::text("this is not json"), "invalid_json"),
        (Message::text(r#"{"type":"teleport"}"#), "unknown_type"),
        (Message::text(r#"{"type":"subscribe"}"#), "invalid_frame"),
        (
            Message::text(r#"{"type":"hello","user_id":"u_1"}"#),
            "already_hello",
        ),
        (Message::binary(vec![1, 2, 3]), "binary_not_supported"),
        (
            Message::text(r#"{"type":"ack","thread_id":"t_nope","seq":1}"#),
            "invalid_ack",
        ),
        (
            Message::text(
                r#"{"type":"user_message","sender":{"agent_id":"a","role":"user"},"recipient":{"target":"agent"},"payload":{}}"#,
            ),
            "upstream_not_configured",
        ),
    ];
    for (message, code) in cases {
        client.send_raw(message).await;
        let error = client.recv().await;
        assert_eq!(
            (error["type"].as_str(), error["code"].as_str()),
            (Some("error"), Some(code)),
            "{error}"
        );
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    client.subscribe("t_1", None).await;
    client
        .send(json!({"type": "subscribe", "thread_id": "t_1"}))
        .await;
    assert_eq!(client.recv().await["code"], "already_subscribed");
    client
        .send(json!({"type": "unsubscribe", "thread_id": "t_404"}))
        .await;
    assert_eq!(client.recv().await["code"], "not_subscribed");

    gateway
        .publish(&[event("agent_thinking", "r1", "t_1")])
        .await;
    assert_eq!(client.recv().await["seq"], 1, "still served after all that");
    assert_eq!(bystander.recv().await["seq"], 1);
    assert_eq!(
        gateway
            .metric("agentwire_client_errors_total{code=\"invalid_json\"}")
            .await,
        1.0
    );
    assert_eq!(
        gateway
            .metric("agentwire_client_errors_total{code=\"binary_not_supported\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn an_oversized_frame_closes_with_1009_and_others_carry_on() {
    let gateway = Gateway::start_with(|c| c.session.max_frame_bytes = 4096).await;
    let mut bystander = gateway.client("u_ok").await;
    bystander.subscribe("t_1", None).await;
    let mut client = gateway.client("u_1").await;
    client
        .send(json!({"type": "ping", "padding": "x".repeat(5000)}))
        .await;
    assert_eq!(client.closed().await, 1009);
    gateway
        .publish(&[event("agent_thinking", "r1", "t_1")])
        .await;
    assert_eq!(bystander.recv().await["seq"], 1);
    assert_eq!(
        gateway
            .metric("agentwire_connections_closed_total{reason=\"too_large\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn no_hello_closes_with_4001() {
    let gateway =
        Gateway::start_with(|c| c.session.hello_timeout = Duration::from_millis(200)).await;
    let mut late = raw(Client::connect(gateway.addr).await);
    assert_eq!(late.closed().await, 4001);

    let mut rude = raw(Client::connect(gateway.addr).await);
    rude.send(json!({"type": "subscribe", "thread_id": "t_1"}))
        .await;
    assert_eq!(rude.recv().await["code"], "hello_required");
    assert_eq!(rude.closed().await, 4001);
    assert_eq!(
        gateway
            .metric("agentwire_connections_closed_total{reason=\"hello_timeout\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn bad_events_are_refused_per_item_naming_the_field() {
    let gateway = Gateway::start_with(|c| c.ingest.max_event_bytes = 2048).await;
    let mut client = gateway.client("u_1").await;
    client.subscribe("t_1", None).await;
    let batch = json!([
        {"type": "agent_thinking", "thread_id": "t_1"},
        {"type": "agent_dancing", "run_id": "r1", "thread_id": "t_1"},
        {"type": "tool_executing", "run_id": "r1", "thread_id": "t_1", "payload": {}},
        {"type": "agent_thinking", "run_id": "r1", "thread_id": "t_1", "payload": "text"},
        {"type": "agent_thinking", "run_id": "r1", "thread_id": "t_1", "payload": {"text": "x".repeat(3000)}},
        {"type": "agent_thinking", "run_id": "r1", "thread_id": "t_1"},
    ]);
    let (status, body) = gateway.post("/v1/events", &batch.to_string()).await;
    assert_eq!(status, 207, "{body}");
    let results = body["results"].as_array().unwrap();
    let fields: Vec<_> = results
        .iter()
        .map(|r| {
            (
                r["status"].as_str().unwrap(),
                r["field"].as_str().unwrap_or(""),
                r["code"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        fields,
        [
            ("error", "run_id", "missing_field"),
            ("error", "type", "invalid_field"),
            ("error", "payload.tool_call_id", "missing_field"),
            ("error", "payload", "invalid_field"),
            ("error", "", "too_large"),
            ("accepted", "", ""),
        ]
    );
    assert_eq!(
        client.recv().await["seq"],
        1,
        "the valid item went through, alone"
    );
    client.silent_for(Duration::from_millis(100)).await;

    let (status, body) = gateway
        .post("/v1/events", &json!({"type": "agent_thinking"}).to_string())
        .await;
    assert_eq!(
        (status.as_u16(), body["results"][0]["field"].as_str()),
        (400, Some("run_id"))
    );
    let metrics = gateway.metrics().await;
    crate::support::assert_lines(
        &metrics,
        &["agentwire_events_rejected_total{reason=\"missing_field\"} 3"],
    );
}

#[tokio::test]
async fn bad_bodies_and_routes_get_json_errors() {
    let gateway = Gateway::start_with(|c| c.ingest.max_request_bytes = 100_000).await;
    let (status, body) = gateway.post("/v1/events", "{not json").await;
    assert_eq!(
        (status.as_u16(), body["error"].as_str()),
        (400, Some("invalid_json"))
    );
    // One object is checked by its event's parse, not scanned first: a valid event followed by
    // anything, or an invalid one in a body that is not JSON, is still refused whole, and
    // nothing is published.
    let valid = event("agent_thinking", "r_whole", "t_whole").to_string();
    for body in [
        format!("{valid} x"),
        format!("{valid}{valid}"),
        r#"{"type": 5, "run_id": "r_whole", "#.to_string(),
        format!("\u{a0}{valid}"),
    ] {
        let (status, answer) = gateway.post("/v1/events", &body).await;
        assert_eq!(
            (status.as_u16(), answer["error"].as_str()),
            (400, Some("invalid_json")),
            "{body}: {answer}"
        );
    }
    assert_eq!(gateway.get("/v1/channels/thread:t_whole").await.0, 404);
    crate::support::assert_lines(
        &gateway.metrics().await,
        &["agentwire_events_rejected_total{reason=\"invalid_body\"} 5"],
    );
    let (status, _) = gateway.post("/v1/events", &format!(" \n{valid}\r\n")).await;
    assert_eq!(status, 200, "whitespace around one object");
    let huge = format!(
        "[{}]",
        vec![event("agent_thinking", "r", "t").to_string(); 2000].join(",")
    );
    let (status, body) = gateway.post("/v1/events", &huge).await;
    assert_eq!(
        (status.as_u16(), body["error"].as_str()),
        (413, Some("too_large"))
    );
    let (status, body) = gateway
        .post("/v1/runs", &json!({"thread_id": "t"}).to_string())
        .await;
    assert_eq!(
        (status.as_u16(), body["field"].as_str()),
        (400, Some("run_id"))
    );
    let (status, body) = gateway
        .post("/v1/runs", &json!({"run_id": "r"}).to_string())
        .await;
    assert_eq!(
        (status.as_u16(), body["field"].as_str()),
        (400, Some("thread_id"))
    );
    let (status, body) = gateway.get("/nowhere").await;
    assert_eq!(
        (status.as_u16(), body["error"].as_str()),
        (404, Some("not_found"))
    );
    let (status, body) = gateway.get("/v1/events").await;
    assert_eq!(
        (status.as_u16(), body["error"].as_str()),
        (405, Some("method_not_allowed"))
    );
    let (status, body) = gateway.get("/v1/channels/run:r1").await;
    assert_eq!(
        (status.as_u16(), body["error"].as_str()),
        (400, Some("invalid_channel"))
    );
    let (status, body) = gateway.get("/v1/channels/thread%3Anever").await;
    assert_eq!(
        (status.as_u16(), body["error"].as_str()),
        (404, Some("unknown_channel"))
    );
    assert_eq!(gateway.get("/healthz").await.0, 200);
    assert_eq!(gateway.get("/readyz").await.0, 200);
}

#[tokio::test]
async fn too_many_events_in_one_request_is_413() {
    let gateway = Gateway::start_with(|c| c.ingest.max_items = 3).await;
    let batch: Vec<_> = (0..4).map(|_| event("agent_thinking", "r", "t")).collect();
    let (status, body) = gateway
        .post("/v1/events", &serde_json::Value::from(batch).to_string())
        .await;
    assert_eq!(
        (status.as_u16(), body["error"].as_str()),
        (413, Some("too_many_items"))
    );
    assert_eq!(
        gateway
            .metric("agentwire_events_rejected_total{reason=\"too_many_items\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn fragmented_messages_are_reassembled_and_bounded() {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::{Frame, FrameHeader};
    let fragment = |opcode: OpCode, fin: bool, payload: &[u8]| {
        Message::Frame(Frame::from_payload(
            FrameHeader {
                is_final: fin,
                opcode,
                ..FrameHeader::default()
            },
            payload.to_vec().into(),
        ))
    };
    let gateway = Gateway::start_with(|c| c.session.max_frame_bytes = 1024).await;
    let mut client = gateway.client("u_1").await;
    client
        .send_raw(fragment(OpCode::Data(Data::Text), false, br#"{"type":"#))
        .await;
    client
        .send_raw(Message::Ping(b"in between".to_vec().into()))
        .await;
    client
        .send_raw(fragment(OpCode::Data(Data::Continue), true, br#""ping"}"#))
        .await;
    assert_eq!(
        client.recv().await["type"],
        "pong",
        "a message in two fragments, a control frame between them"
    );

    client
        .send_raw(fragment(OpCode::Data(Data::Text), false, &[b' '; 800]))
        .await;
    client
        .send_raw(fragment(OpCode::Data(Data::Continue), true, &[b' '; 800]))
        .await;
    assert_eq!(
        client.closed().await,
        1009,
        "the reassembled message is over the limit"
    );
}

/// A text message is UTF-8 across its fragments: a character split between two is fine, a byte
/// that cannot continue one closes with 1007 (RFC 6455 §8.1), counted as `invalid_utf8`.
#[tokio::test]
async fn text_that_is_not_utf8_across_fragments_closes_with_1007() {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::{Frame, FrameHeader};
    let fragment = |opcode: OpCode, fin: bool, payload: &[u8]| {
        Message::Frame(Frame::from_payload(
            FrameHeader {
                is_final: fin,
                opcode,
                ..FrameHeader::default()
            },
            payload.to_vec().into(),
        ))
    };
    let gateway = Gateway::start().await;
    let mut client = gateway.client("u_1").await;
    // "€" is E2 82 AC: its first two bytes end one fragment, its last begins the next.
    client
        .send_raw(fragment(
            OpCode::Data(Data::Text),
            false,
            b"{\"type\":\"ping\",\"x\":\"\xE2\x82",
        ))
        .await;
    client
        .send_raw(fragment(OpCode::Data(Data::Continue), true, b"\xAC\"}"))
        .await;
    assert_eq!(
        client.recv().await["type"],
        "pong",
        "a split character is text"
    );

    // E2 82 begins a character; "(" cannot continue it.
    client
        .send_raw(fragment(
            OpCode::Data(Data::Text),
            false,
            b"{\"type\":\"ping\",\"x\":\"\xE2\x82",
        ))
        .await;
    client
        .send_raw(fragment(OpCode::Data(Data::Continue), true, b"(\"}"))
        .await;
    assert_eq!(client.closed().await, 1007);
    assert_eq!(
        gateway
            .metric("agentwire_connections_closed_total{reason=\"invalid_utf8\"}")
            .await,
        1.0
    );
    assert_eq!(
        gateway
            .metric("agentwire_connections_closed_total{reason=\"protocol_error\"}")
            .await,
        0.0
    );
}

/// 1012, 1013 and 1014 are registered close codes a client may send: its close is echoed like
/// any other, not refused with 1002.
#[tokio::test]
async fn a_client_closing_with_1012_to_1014_gets_its_close_echoed() {
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    let gateway = Gateway::start().await;
    for code in [1012, 1013, 1014] {
        let mut client = gateway.client("u_1").await;
        client
            .send_raw(Message::Close(Some(CloseFrame {
                code: code.into(),
                reason: "".into(),
            })))
            .await;
        assert_eq!(client.closed().await, code, "echoed");
    }
    assert_eq!(
        gateway
            .metric("agentwire_connections_closed_total{reason=\"client_closed\"}")
            .await,
        3.0
    );
    assert_eq!(
        gateway
            .metric("agentwire_connections_closed_total{reason=\"protocol_error\"}")
            .await,
        0.0
    );
}

#[tokio::test]
async fn a_silent_client_is_closed_with_1001() {
    let gateway = Gateway::start_with(|c| {
        c.session.heartbeat = Duration::from_millis(100);
        c.session.client_timeout = Duration::from_millis(400);
    })
    .await;
    // A raw TCP client that completes the upgrade and the hello, then never answers a ping.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(gateway.addr).await.unwrap();
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        gateway.addr
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let hello = br#"{"type":"hello","user_id":"u_quiet"}"#;
    let mut frame = vec![0x81, 0x80 | hello.len() as u8, 0, 0, 0, 0];
    frame.extend_from_slice(hello);
    stream.write_all(&frame).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let n = stream.read(&mut buf).await.unwrap();
            if n == 0 {
                return;
            }
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    assert!(read.is_ok(), "the gateway ends the connection");
    let close = [0x88, 16, 0x03, 0xE9];
    assert!(
        seen.windows(4).any(|w| w == close),
        "a close frame with 1001 was sent"
    );
    assert!(
        seen.windows(20).any(|w| w == br#"{"type":"heartbeat"}"#),
        "heartbeats came first"
    );
    assert_eq!(
        gateway
            .metric("agentwire_connections_closed_total{reason=\"client_timeout\"}")
            .await,
        1.0
    );
}
