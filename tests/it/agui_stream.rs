//! AG-UI streams bound to one run (`POST /v1/runs/{run_id}/agui`) and the proxy in front of an
//! AG-UI agent (`POST /agui/{agent}`), over real sockets: bodies sent in chunks with pauses, the
//! limits, and the closing of a run whose stream ended while it was open.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Bytes, Frame};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::agui_support::{AguiAgent, node, run_input};
use crate::support::{Gateway, Streaming, assert_lines, http_with};
use agentwire::config::AgentConfig;

/// The AG-UI event a native frame carries.
fn agui(frame: &Value) -> &Value {
    &frame["payload"]["agui"]
}

fn types(frames: &[Value]) -> Vec<String> {
    frames
        .iter()
        .map(|f| agui(f)["type"].as_str().unwrap_or("?").to_string())
        .collect()
}

fn started(thread_id: &str, run_id: &str) -> Value {
    json!({"type": "RUN_STARTED", "threadId": thread_id, "runId": run_id})
}

#[tokio::test]
async fn ndjson_events_are_published_as_they_arrive() {
    let gateway = Gateway::start().await;
    let mut viewer = gateway.viewer("u1", "t_nd").await;
    let stream = Streaming::open(&gateway, "/v1/runs/r_nd/agui", "application/x-ndjson").await;
    stream.line(started("t_nd", "r_nd")).await;
    let frame = viewer.recv().await;
    assert_eq!(
        (frame["type"].as_str(), agui(&frame)["type"].as_str()),
        (Some("agent_started"), Some("RUN_STARTED")),
        "{frame}"
    );
    // A line split across chunks, with a pause between them.
    stream
        .line(json!({"type": "TEXT_MESSAGE_START", "messageId": "m1", "role": "assistant"}))
        .await;
    stream
        .send(r#"{"type": "TEXT_MESSAGE_CONTENT", "messageId": "m1", "#)
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    stream.send("\"delta\": \"Hel\"}\n").await;
    let frames = viewer.events(2).await;
    assert_eq!(
        types(&frames),
        ["TEXT_MESSAGE_START", "TEXT_MESSAGE_CONTENT"]
    );
    assert_eq!(frames[1]["thread_id"], "t_nd");
    assert_eq!(frames[1]["run_id"], "r_nd");
    stream
        .line(json!({"type": "TEXT_MESSAGE_END", "messageId": "m1"}))
        .await;
    stream
        .line(json!({"type": "RUN_FINISHED", "threadId": "t_nd", "runId": "r_nd"}))
        .await;
    let (status, summary) = stream.finish().await;
    assert_eq!(status, StatusCode::OK, "{summary}");
    assert_eq!(summary["accepted"], 5, "{summary}");
    assert_eq!(summary["failed"], 0, "{summary}");
    assert_eq!(summary["violations"], 0, "{summary}");
    assert_eq!(summary["ended"], "end");
    assert_eq!(summary["closed"], Value::Null);
    assert_eq!(summary["thread_id"], "t_nd");
    assert_eq!(
        types(&viewer.events(2).await),
        ["TEXT_MESSAGE_END", "RUN_FINISHED"]
    );
    gateway.channel("thread:t_nd").await;
}

#[tokio::test]
async fn sse_bodies_take_data_lines_and_ignore_the_other_fields() {
    let gateway = Gateway::start().await;
    let mut viewer = gateway.viewer("u1", "t_sse").await;
    // The thread is named by the query: events before RUN_STARTED have a channel too.
    let stream = Streaming::open(
        &gateway,
        "/v1/runs/r_sse/agui?thread_id=t_sse",
        "text/event-stream",
    )
    .await;
    stream
        .send(&format!(
            ": a comment\r\nevent: message\r\nid: 1\r\ndata: {}\r\n\r\n",
            started("t_sse", "r_sse")
        ))
        .await;
    assert_eq!(types(&viewer.events(1).await), ["RUN_STARTED"]);
    // One event on two data lines, split across chunks.
    stream
        .send("retry: 100\ndata: {\"type\": \"STEP_STARTED\",\n")
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    stream.send("data:  \"stepName\": \"plan\"}\n\n").await;
    assert_eq!(types(&viewer.events(1).await), ["STEP_STARTED"]);
    stream
        .send("data: {\"type\": \"STEP_FINISHED\", \"stepName\": \"plan\"}\n\ndata: not json\n\n")
        .await;
    // The last event has no blank line after it: the end of the body ends it.
    stream
        .send("data: {\"type\": \"RUN_FINISHED\", \"threadId\": \"t_sse\", \"runId\": \"r_sse\"}")
        .await;
    let (status, summary) = stream.finish().await;
    assert_eq!(status, StatusCode::OK, "{summary}");
    assert_eq!(summary["accepted"], 4, "{summary}");
    assert_eq!(summary["failed"], 1, "{summary}");
    assert_eq!(summary["errors"][0]["line"], 12, "{summary}");
    assert_eq!(summary["errors"][0]["code"], "invalid_json", "{summary}");
    assert_eq!(
        types(&viewer.events(2).await),
        ["STEP_FINISHED", "RUN_FINISHED"]
    );
}

#[tokio::test]
async fn an_oversized_event_is_refused_and_the_stream_goes_on() {
    let gateway = Gateway::start_with(|c| c.ingest.max_event_bytes = 2048).await;
    let mut viewer = gateway.viewer("u1", "t_big").await;
    let stream = Streaming::open(&gateway, "/v1/runs/r_big/agui", "application/x-ndjson").await;
    stream.line(started("t_big", "r_big")).await;
    let big = json!({"type": "CUSTOM", "name": "x", "value": "a".repeat(5000)}).to_string();
    // Sent in pieces: none of it is held past the limit.
    for piece in big.as_bytes().chunks(1000) {
        stream.send(std::str::from_utf8(piece).unwrap()).await;
    }
    stream.send("\n").await;
    stream
        .line(json!({"type": "RUN_FINISHED", "threadId": "t_big", "runId": "r_big"}))
        .await;
    let (status, summary) = stream.finish().await;
    assert_eq!(status, StatusCode::OK, "{summary}");
    assert_eq!(summary["accepted"], 2, "{summary}");
    assert_eq!(summary["errors"][0]["line"], 2, "{summary}");
    assert_eq!(summary["errors"][0]["code"], "too_large", "{summary}");
    assert_eq!(
        types(&viewer.events(2).await),
        ["RUN_STARTED", "RUN_FINISHED"]
    );
    assert_eq!(
        gateway
            .metric(r#"agentwire_events_rejected_total{reason="too_large"}"#)
            .await,
        1.0
    );
}

#[tokio::test]
async fn a_silent_stream_ends_and_its_run_is_closed_for_every_viewer() {
    let gateway =
        Gateway::start_with(|c| c.ingest.stream_idle_timeout = Duration::from_millis(300)).await;
    let mut first = gateway.viewer("u1", "t_idle").await;
    let mut second = gateway.viewer("u2", "t_idle").await;
    let stream = Streaming::open(&gateway, "/v1/runs/r_idle/agui", "application/x-ndjson").await;
    stream.line(started("t_idle", "r_idle")).await;
    stream
        .line(json!({"type": "TEXT_MESSAGE_START", "messageId": "m1", "role": "assistant"}))
        .await;
    stream
        .line(json!({"type": "TOOL_CALL_START", "toolCallId": "c1", "toolCallName": "search"}))
        .await;
    // Then nothing: the body stays open.
    let (status, summary) = stream.answer().await;
    assert_eq!(status, StatusCode::OK, "{summary}");
    assert_eq!(summary["ended"], "idle_timeout", "{summary}");
    assert_eq!(summary["closed"], "agent_stalled", "{summary}");
    for viewer in [&mut first, &mut second] {
        let frames = viewer.events(7).await;
        assert_eq!(
            types(&frames[3..]),
            [
                "TEXT_MESSAGE_END",
                "TOOL_CALL_END",
                "TOOL_CALL_RESULT",
                "RUN_ERROR"
            ]
        );
        assert_eq!(agui(&frames[6])["code"], "agent_stalled");
        assert_eq!(frames[6]["type"], "agent_error");
        assert_eq!(agui(&frames[5])["toolCallId"], "c1");
    }
    assert_eq!(
        gateway
            .metric(r#"agentwire_runs_closed_total{reason="agent_stalled"}"#)
            .await,
        1.0
    );
    let (_, run) = gateway.get("/v1/runs/r_idle").await;
    assert_eq!(run["state"], "errored", "{run}");
}

#[tokio::test]
async fn a_stream_that_ends_mid_run_closes_the_run() {
    let gateway = Gateway::start().await;
    let exposition = gateway.metrics().await;
    let mut zero = vec![];
    for reason in [
        "agent_stream_ended",
        "agent_stalled",
        "agent_unreachable",
        "gateway_shutdown",
    ] {
        zero.push(format!(
            r#"agentwire_runs_closed_total{{reason="{reason}"}} 0"#
        ));
    }
    for kind in [
        "agui_before_run_started",
        "agui_run_started_twice",
        "agui_after_run_error",
        "agui_started_twice",
        "agui_not_started",
        "agui_finished_while_open",
    ] {
        zero.push(format!(
            r#"agentwire_lifecycle_violations_total{{kind="{kind}"}} 0"#
        ));
    }
    let zero: Vec<&str> = zero.iter().map(String::as_str).collect();
    assert_lines(&exposition, &zero);

    let mut first = gateway.viewer("u1", "t_eof").await;
    let mut second = gateway.viewer("u2", "t_eof").await;
    let stream = Streaming::open(&gateway, "/v1/runs/r_eof/agui", "application/x-ndjson").await;
    stream.line(started("t_eof", "r_eof")).await;
    stream
        .line(json!({"type": "TEXT_MESSAGE_START", "messageId": "m1", "role": "assistant"}))
        .await;
    stream
        .line(json!({"type": "TEXT_MESSAGE_CONTENT", "messageId": "m1", "delta": "Hi"}))
        .await;
    stream
        .line(json!({"type": "TOOL_CALL_START", "toolCallId": "c1", "toolCallName": "search"}))
        .await;
    stream
        .line(json!({"type": "TOOL_CALL_ARGS", "toolCallId": "c1", "delta": "{"}))
        .await;
    let (status, summary) = stream.finish().await;
    assert_eq!(status, StatusCode::OK, "{summary}");
    assert_eq!(summary["closed"], "agent_stream_ended", "{summary}");
    for viewer in [&mut first, &mut second] {
        let frames = viewer.events(9).await;
        assert_eq!(
            types(&frames[5..]),
            [
                "TEXT_MESSAGE_END",
                "TOOL_CALL_END",
                "TOOL_CALL_RESULT",
                "RUN_ERROR"
            ]
        );
        assert!(
            agui(&frames[7])["content"]
                .as_str()
                .unwrap()
                .starts_with("error: ")
        );
        assert_eq!(agui(&frames[8])["code"], "agent_stream_ended");
    }
    assert_eq!(
        gateway
            .metric(r#"agentwire_runs_closed_total{reason="agent_stream_ended"}"#)
            .await,
        1.0
    );
    // The closing events are in the ledger like any other.
    assert_eq!(gateway.channel("thread:t_eof").await["emitted"], 9);
}

#[tokio::test]
async fn a_producer_that_goes_away_mid_run_has_its_run_closed() {
    let gateway = Gateway::start().await;
    let mut viewer = gateway.viewer("u1", "t_gone").await;
    let stream = Streaming::open(&gateway, "/v1/runs/r_gone/agui", "application/x-ndjson").await;
    stream.line(started("t_gone", "r_gone")).await;
    assert_eq!(types(&viewer.events(1).await), ["RUN_STARTED"]);
    // The connection is cut with the body unfinished.
    stream.connection.abort();
    let frames = viewer.events(1).await;
    assert_eq!(agui(&frames[0])["type"], "RUN_ERROR", "{}", frames[0]);
    assert_eq!(agui(&frames[0])["code"], "agent_stream_ended");
}

#[tokio::test]
async fn streams_past_the_limit_are_refused() {
    let gateway = Gateway::start_with(|c| c.ingest.max_streams = 1).await;
    let mut viewer = gateway.viewer("u1", "t_lim").await;
    let stream = Streaming::open(&gateway, "/v1/runs/r_lim/agui", "application/x-ndjson").await;
    stream.line(started("t_lim", "r_lim")).await;
    viewer.events(1).await;
    let (status, body) = http_with(
        gateway.internal,
        "POST",
        "/v1/runs/r_other/agui",
        &[],
        Some(("application/x-ndjson", "{}\n")),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("too_many_streams"), "{body}");
    assert_eq!(
        gateway
            .metric(r#"agentwire_run_streams_refused_total{reason="too_many_streams"}"#)
            .await,
        1.0
    );
    let (status, body) = http_with(
        gateway.internal,
        "POST",
        "/v1/runs/r_other/agui",
        &[],
        Some(("application/json", "{}")),
    )
    .await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{body}");
    stream
        .line(json!({"type": "RUN_FINISHED", "threadId": "t_lim", "runId": "r_lim"}))
        .await;
    let (status, _) = stream.finish().await;
    assert_eq!(status, StatusCode::OK);
    // Its place is free again.
    let (status, body) = http_with(
        gateway.internal,
        "POST",
        "/v1/runs/r_next/agui",
        &[],
        Some((
            "application/x-ndjson",
            &format!("{}\n", started("t_lim", "r_next")),
        )),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn strict_mode_refuses_what_breaks_the_order() {
    let gateway = Gateway::start_with(|c| c.agui.strict = true).await;
    let mut viewer = gateway.viewer("u1", "t_strict").await;
    let stream = Streaming::open(&gateway, "/v1/runs/r_strict/agui", "application/x-ndjson").await;
    stream.line(started("t_strict", "r_strict")).await;
    stream
        .line(json!({"type": "TEXT_MESSAGE_CONTENT", "messageId": "nope", "delta": "x"}))
        .await;
    stream
        .line(json!({"type": "RUN_FINISHED", "threadId": "t_strict", "runId": "r_strict"}))
        .await;
    let (status, summary) = stream.finish().await;
    assert_eq!(status, StatusCode::OK, "{summary}");
    assert_eq!(summary["accepted"], 2, "{summary}");
    assert_eq!(summary["violations"], 1, "{summary}");
    assert_eq!(summary["errors"][0]["code"], "out_of_order", "{summary}");
    assert_eq!(summary["errors"][0]["line"], 2, "{summary}");
    assert_eq!(
        types(&viewer.events(2).await),
        ["RUN_STARTED", "RUN_FINISHED"]
    );
    let exposition = gateway.metrics().await;
    assert_lines(
        &exposition,
        &[
            r#"agentwire_lifecycle_violations_total{kind="agui_not_started"} 1"#,
            r#"agentwire_events_rejected_total{reason="out_of_order"} 1"#,
        ],
    );
}

#[tokio::test]
async fn events_of_another_run_or_vocabulary_are_refused() {
    let gateway = Gateway::start().await;
    let body = [
        json!({"type": "agent_started", "run_id": "r_x", "thread_id": "t_x"}),
        json!({"type": "RUN_STARTED", "threadId": "t_x", "runId": "r_other"}),
        json!({"type": "RUN_STARTED", "threadId": "t_x", "runId": "r_x", "run_id": "r_y"}),
        json!({"runId": "r_x"}),
    ]
    .iter()
    .map(|e| format!("{e}\n"))
    .collect::<String>();
    let (status, text) = http_with(
        gateway.internal,
        "POST",
        "/v1/runs/r_x/agui",
        &[],
        Some(("application/x-ndjson", &body)),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let summary: Value = serde_json::from_str(&text).unwrap();
    let fields: Vec<(&str, &str)> = summary["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["code"].as_str().unwrap(), e["field"].as_str().unwrap()))
        .collect();
    assert_eq!(
        fields,
        [
            ("invalid_field", "type"),
            ("invalid_field", "run_id"),
            ("invalid_field", "run_id"),
            ("missing_field", "type"),
        ]
    );
}

/// A request the agent received: its headers and its body.
type Seen = (BTreeMap<String, String>, Value);

/// A scripted AG-UI agent: answers every POST with `script` as SSE, one event per chunk, and
/// remembers the requests' headers and bodies. `die_after`: the connection is cut after that many
/// events, mid-run.
struct ScriptedAgent {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl ScriptedAgent {
    async fn start(script: Vec<Value>, die_after: Option<usize>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let recorded = Arc::clone(&seen);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let script = script.clone();
                let recorded = Arc::clone(&recorded);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |request: Request<hyper::body::Incoming>| {
                            let script = script.clone();
                            let recorded = Arc::clone(&recorded);
                            async move {
                                let headers = request
                                    .headers()
                                    .iter()
                                    .map(|(k, v)| {
                                        (k.to_string(), v.to_str().unwrap_or("").to_string())
                                    })
                                    .collect();
                                let body = request.into_body().collect().await.unwrap().to_bytes();
                                let input: Value =
                                    serde_json::from_slice(&body).unwrap_or(Value::Null);
                                recorded.lock().unwrap().push((headers, input));
                                let (tx, rx) =
                                    mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
                                tokio::spawn(async move {
                                    for (at, event) in script.iter().enumerate() {
                                        if die_after == Some(at) {
                                            let _ = tx
                                                .send(Err(std::io::Error::other("the agent died")))
                                                .await;
                                            return;
                                        }
                                        let chunk = format!("data: {event}\n\n");
                                        if tx
                                            .send(Ok(Frame::data(Bytes::from(chunk))))
                                            .await
                                            .is_err()
                                        {
                                            return;
                                        }
                                        tokio::time::sleep(Duration::from_millis(20)).await;
                                    }
                                });
                                let chunks =
                                    futures_util::stream::unfold(rx, |mut rx| async move {
                                        rx.recv().await.map(|chunk| (chunk, rx))
                                    });
                                let response = Response::builder()
                                    .header("content-type", "text/event-stream")
                                    .body(StreamBody::new(chunks))
                                    .unwrap();
                                Ok::<_, Infallible>(response)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { addr, seen }
    }

    fn url(&self) -> String {
        format!("http://{}/agent", self.addr)
    }
}

fn script(thread_id: &str, run_id: &str) -> Vec<Value> {
    vec![
        started(thread_id, run_id),
        json!({"type": "TEXT_MESSAGE_START", "messageId": "m1", "role": "assistant"}),
        json!({"type": "TEXT_MESSAGE_CONTENT", "messageId": "m1", "delta": "Hello"}),
        json!({"type": "TEXT_MESSAGE_END", "messageId": "m1"}),
        json!({"type": "TOOL_CALL_START", "toolCallId": "c1", "toolCallName": "search"}),
        json!({"type": "TOOL_CALL_ARGS", "toolCallId": "c1", "delta": "{\"q\":1}"}),
        json!({"type": "TOOL_CALL_END", "toolCallId": "c1"}),
        json!({"type": "TOOL_CALL_RESULT", "messageId": "m2", "toolCallId": "c1", "content": "found"}),
        json!({"type": "RUN_FINISHED", "threadId": thread_id, "runId": run_id}),
    ]
}

fn input(thread_id: &str, run_id: &str) -> String {
    json!({"threadId": thread_id, "runId": run_id, "messages": [{"id": "u1", "role": "user", "content": "hi"}], "state": {}, "tools": [], "context": [], "forwardedProps": {}}).to_string()
}

async fn run_agent(
    gateway: &Gateway,
    agent: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, Value) {
    let (status, text) = http_with(
        gateway.addr,
        "POST",
        &format!("/agui/{agent}"),
        headers,
        Some(("application/json", body)),
    )
    .await;
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// The SSE events of an answer body: each event's `id:` (if any) and its `data:` as JSON.
fn sse_events(body: &Value) -> Vec<(Option<String>, Value)> {
    let text = body.as_str().unwrap_or_default();
    let mut events = Vec::new();
    for block in text.split("\n\n") {
        let mut id = None;
        for line in block.lines() {
            if let Some(value) = line.strip_prefix("id: ") {
                id = Some(value.to_string());
            }
            if let Some(data) = line.strip_prefix("data: ") {
                events.push((id.clone(), serde_json::from_str(data).unwrap()));
            }
        }
    }
    events
}

fn agent_config(url: String, headers: &[(&str, &str)]) -> AgentConfig {
    AgentConfig {
        url,
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), (*v).into()))
            .collect(),
    }
}

#[tokio::test]
async fn the_proxy_forwards_a_run_with_the_configured_headers_and_ingests_the_answer() {
    let agent = ScriptedAgent::start(script("t_px", "r_px"), None).await;
    let url = agent.url();
    let gateway = Gateway::start_with(move |c| {
        c.agui.agents.insert(
            "scripted".into(),
            agent_config(url, &[("x-api-key", "agent-secret-1")]),
        );
    })
    .await;
    let mut viewer = gateway.viewer("u1", "t_px").await;
    let (status, body) = run_agent(&gateway, "scripted", &input("t_px", "r_px"), &[]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // The answer is the thread's AG-UI stream from this run's start to its end, with ids.
    let answer = sse_events(&body);
    let sent: Vec<&str> = answer
        .iter()
        .map(|(_, e)| e["type"].as_str().unwrap())
        .collect();
    let script_types: Vec<String> = script("t_px", "r_px")
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(sent, script_types, "{body}");
    let seqs: Vec<u64> = answer
        .iter()
        .map(|(id, _)| {
            let id = id.as_deref().expect("every event has an id");
            id.rsplit_once(':').unwrap().1.parse().unwrap()
        })
        .collect();
    assert_eq!(seqs, (1..=9).collect::<Vec<u64>>(), "{body}");
    let frames = viewer.events(9).await;
    let expected: Vec<String> = script("t_px", "r_px")
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(types(&frames), expected);
    let seen = agent.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].0["x-api-key"], "agent-secret-1");
    assert_eq!(seen[0].0["accept"], "text/event-stream");
    assert_eq!(seen[0].1["threadId"], "t_px");
    assert_eq!(seen[0].1["messages"][0]["content"], "hi");

    let (status, body) = run_agent(&gateway, "nobody", &input("t_px", "r_2"), &[]).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("unknown_agent"))
    );
    let (status, body) =
        run_agent(&gateway, "scripted", r#"{"threadId":"t","runId":"r"}"#, &[]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["field"], "messages");
    let (status, body) = run_agent(
        &gateway,
        "scripted",
        &input("t_px", "r_3"),
        &[("origin", "https://evil.example")],
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(
        agent.seen.lock().unwrap().len(),
        1,
        "nothing refused was forwarded"
    );
    assert_eq!(
        gateway
            .metric(r#"agentwire_run_streams_refused_total{reason="unknown_agent"}"#)
            .await,
        1.0
    );
}

#[tokio::test]
async fn the_proxy_authorises_the_thread_like_a_subscription() {
    const SECRET: &str = "0123456789abcdef0123456789abcdef";
    let agent = ScriptedAgent::start(script("t_auth", "r_auth"), None).await;
    let url = agent.url();
    let gateway = Gateway::start_with(move |c| {
        c.auth.jwt_secret = Some(SECRET.into());
        c.agui
            .agents
            .insert("scripted".into(), agent_config(url, &[]));
    })
    .await;
    let allowed = agentwire::auth::mint(
        SECRET,
        "u1",
        &["t_auth".into()],
        None,
        Duration::from_secs(60),
    )
    .unwrap();
    let other = agentwire::auth::mint(
        SECRET,
        "u1",
        &["t_other".into()],
        None,
        Duration::from_secs(60),
    )
    .unwrap();
    let body = input("t_auth", "r_auth");
    let (status, answer) = run_agent(&gateway, "scripted", &body, &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{answer}");
    let bearer = format!("Bearer {other}");
    let (status, answer) =
        run_agent(&gateway, "scripted", &body, &[("authorization", &bearer)]).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
    assert!(
        agent.seen.lock().unwrap().is_empty(),
        "nothing refused was forwarded"
    );
    let (status, _) = gateway.get("/v1/channels/thread:t_auth").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "no state was created");
    let bearer = format!("Bearer {allowed}");
    let (status, answer) =
        run_agent(&gateway, "scripted", &body, &[("authorization", &bearer)]).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    crate::support::eventually("the run's events in the ledger", async || {
        let (_, channel) = gateway.get("/v1/channels/thread:t_auth").await;
        match channel["emitted"].as_u64() {
            Some(9) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let exposition = gateway.metrics().await;
    assert_lines(
        &exposition,
        &[
            r#"agentwire_auth_refused_total{reason="missing"} 1"#,
            r#"agentwire_auth_refused_total{reason="thread"} 1"#,
        ],
    );
}

#[tokio::test]
async fn an_agent_that_dies_mid_run_or_cannot_be_reached_has_its_run_closed() {
    let agent = ScriptedAgent::start(script("t_die", "r_die"), Some(5)).await;
    let url = agent.url();
    // A port nothing listens on.
    let closed = format!("http://127.0.0.1:{}/agent", crate::support::free_port());
    let gateway = Gateway::start_with(move |c| {
        c.agui.agents.insert("dying".into(), agent_config(url, &[]));
        c.agui
            .agents
            .insert("away".into(), agent_config(closed, &[]));
    })
    .await;
    let mut viewer = gateway.viewer("u1", "t_die").await;
    let (status, _) = run_agent(&gateway, "dying", &input("t_die", "r_die"), &[]).await;
    assert_eq!(status, StatusCode::OK);
    let frames = viewer.events(8).await;
    assert_eq!(
        types(&frames[5..]),
        ["TOOL_CALL_END", "TOOL_CALL_RESULT", "RUN_ERROR"]
    );
    assert_eq!(agui(&frames[7])["code"], "agent_stream_ended");

    let mut viewer = crate::support::Client::hello(gateway.addr, "u2").await;
    viewer.subscribe("t_away", None).await;
    let (status, _) = run_agent(&gateway, "away", &input("t_away", "r_away"), &[]).await;
    assert_eq!(status, StatusCode::OK);
    let frames = viewer.events(2).await;
    assert_eq!(types(&frames), ["RUN_STARTED", "RUN_ERROR"]);
    assert_eq!(agui(&frames[1])["code"], "agent_unreachable");
    let exposition = gateway.metrics().await;
    assert_lines(
        &exposition,
        &[
            r#"agentwire_runs_closed_total{reason="agent_stream_ended"} 1"#,
            r#"agentwire_runs_closed_total{reason="agent_unreachable"} 1"#,
        ],
    );
}

#[tokio::test]
async fn shutdown_closes_the_runs_being_streamed() {
    let mut gateway = Gateway::start().await;
    let mut viewer = gateway.viewer("u1", "t_stop").await;
    let stream = Streaming::open(&gateway, "/v1/runs/r_stop/agui", "application/x-ndjson").await;
    stream.line(started("t_stop", "r_stop")).await;
    viewer.events(1).await;
    let inner = gateway.shut_down().await;
    assert_eq!(
        inner
            .metrics
            .runs_closed
            .with_label_values(&["gateway_shutdown"])
            .get(),
        1
    );
    drop(stream);
}

#[tokio::test]
async fn out_of_order_events_are_published_and_counted_once_without_strict_mode() {
    let gateway = Gateway::start().await;
    let mut viewer = gateway.viewer("u1", "t_loose").await;
    let body = [
        started("t_loose", "r_loose"),
        json!({"type": "TEXT_MESSAGE_CONTENT", "messageId": "nope", "delta": "x"}),
        json!({"type": "RUN_FINISHED", "threadId": "t_loose", "runId": "r_loose"}),
    ]
    .iter()
    .map(|e| format!("{e}\n"))
    .collect::<String>();
    let (status, text) = http_with(
        gateway.internal,
        "POST",
        "/v1/runs/r_loose/agui",
        &[],
        Some(("application/x-ndjson", &body)),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let summary: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        (&summary["accepted"], &summary["violations"]),
        (&json!(3), &json!(1))
    );
    assert_eq!(
        types(&viewer.events(3).await),
        ["RUN_STARTED", "TEXT_MESSAGE_CONTENT", "RUN_FINISHED"]
    );
    assert_eq!(
        gateway
            .metric(r#"agentwire_lifecycle_violations_total{kind="agui_not_started"}"#)
            .await,
        1.0
    );
}

/// The real agent's run has 23 events (tests/agui/agent.py).
const AGENT_EVENTS: usize = 23;

#[tokio::test]
async fn a_real_agent_gets_its_header_from_the_configuration_and_its_run_reaches_every_viewer() {
    let agent = AguiAgent::start(&["--require-header", "x-agent-key:agent-key-1"]);
    let (url, bare) = (agent.url.clone(), agent.url.clone());
    let gateway = Gateway::start_with(move |c| {
        c.agui.agents.insert(
            "weather".into(),
            agent_config(url, &[("x-agent-key", "agent-key-1")]),
        );
        c.agui.agents.insert("bare".into(), agent_config(bare, &[]));
    })
    .await;
    let mut native = gateway.viewer("u1", "t-real").await;
    let url = format!("ws://{}/ws", gateway.addr);
    let agui_viewer = tokio::spawn(async move {
        node(
            "ws-read.mjs",
            &["--url", &url, "--thread", "t-real", "--until-end"],
        )
        .await
    });
    crate::support::eventually("the AG-UI viewer subscribes", async || {
        match crate::support::metric_value(&gateway.metrics().await, "agentwire_subscriptions") {
            4.0 => Ok(()),
            n => Err(format!("{n} subscriptions")),
        }
    })
    .await;
    let body = run_input("t-real", "r-real").to_string();
    let (status, answer) = run_agent(&gateway, "weather", &body, &[]).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let frames = native.events(AGENT_EVENTS).await;
    assert_eq!(agui(&frames[0])["type"], "RUN_STARTED");
    assert_eq!(agui(&frames[AGENT_EVENTS - 1])["type"], "RUN_FINISHED");
    let read = agui_viewer.await.unwrap();
    assert!(read["verified"].as_bool().unwrap(), "{read}");
    assert_eq!(
        read["events"].as_array().unwrap().len(),
        AGENT_EVENTS,
        "{read}"
    );
    let requests = agent.requests().await;
    assert_eq!(
        requests[0]["headers"]["x-agent-key"], "agent-key-1",
        "{requests}"
    );
    assert_eq!(
        requests[0]["body"], body,
        "forwarded as received: {requests}"
    );

    // Without the header the agent answers 401: the run is started and closed for its viewers.
    native.subscribe("t-bare", None).await;
    let body = run_input("t-bare", "r-bare").to_string();
    let (status, _) = run_agent(&gateway, "bare", &body, &[]).await;
    assert_eq!(status, StatusCode::OK);
    let frames = native.events(2).await;
    assert_eq!(types(&frames), ["RUN_STARTED", "RUN_ERROR"]);
    assert_eq!(agui(&frames[1])["code"], "agent_unreachable");
    assert_eq!(frames[1]["thread_id"], "t-bare");
}

#[tokio::test]
async fn a_real_agent_dying_mid_stream_has_its_run_closed_for_every_viewer() {
    // Dies with its first tool call's arguments streaming (after TOOL_CALL_START and one ARGS).
    let agent = AguiAgent::start(&["--die-after", "9", "--delay-ms", "10"]);
    let url = agent.url.clone();
    let gateway = Gateway::start_with(move |c| {
        c.agui
            .agents
            .insert("weather".into(), agent_config(url, &[]));
    })
    .await;
    let mut first = gateway.viewer("u1", "t-die").await;
    let mut second = gateway.viewer("u2", "t-die").await;
    let url = format!("ws://{}/ws", gateway.addr);
    let agui_viewer = tokio::spawn(async move {
        node(
            "ws-read.mjs",
            &["--url", &url, "--thread", "t-die", "--until-end"],
        )
        .await
    });
    crate::support::eventually("the AG-UI viewer subscribes", async || {
        match crate::support::metric_value(&gateway.metrics().await, "agentwire_subscriptions") {
            6.0 => Ok(()),
            n => Err(format!("{n} subscriptions")),
        }
    })
    .await;
    let body = run_input("t-die", "r-die").to_string();
    let (status, _) = run_agent(&gateway, "weather", &body, &[]).await;
    assert_eq!(status, StatusCode::OK);
    for viewer in [&mut first, &mut second] {
        let frames = viewer.events(12).await;
        assert_eq!(
            types(&frames[9..]),
            ["TOOL_CALL_END", "TOOL_CALL_RESULT", "RUN_ERROR"]
        );
        assert_eq!(agui(&frames[11])["code"], "agent_stream_ended");
    }
    let read = agui_viewer.await.unwrap();
    assert!(read["verified"].as_bool().unwrap(), "{read}");
    let events = read["events"].as_array().unwrap();
    assert_eq!(events.last().unwrap()["type"], "RUN_ERROR", "{read}");
    assert_eq!(
        events.last().unwrap()["code"],
        "agent_stream_ended",
        "{read}"
    );
    assert_eq!(
        gateway
            .metric(r#"agentwire_runs_closed_total{reason="agent_stream_ended"}"#)
            .await,
        1.0
    );
    assert_eq!(gateway.channel("thread:t-die").await["emitted"], 12);
}

#[tokio::test]
async fn http_agent_through_the_gateway_assembles_what_it_assembles_from_the_agent() {
    const SECRET: &str = "0123456789abcdef0123456789abcdef";
    let agent = AguiAgent::start(&["--require-header", "x-agent-key:agent-key-1"]);
    let url = agent.url.clone();
    let gateway = Gateway::start_with(move |c| {
        c.auth.jwt_secret = Some(SECRET.into());
        c.agui.agents.insert(
            "weather".into(),
            agent_config(url, &[("x-agent-key", "agent-key-1")]),
        );
    })
    .await;
    let direct = node(
        "run-agent.mjs",
        &[
            "--url",
            &agent.url,
            "--thread",
            "t-http",
            "--run",
            "r-direct",
            "--header",
            "x-agent-key: agent-key-1",
        ],
    )
    .await;
    assert!(direct["ok"].as_bool().unwrap(), "{direct}");
    let token = agentwire::auth::mint(
        SECRET,
        "u1",
        &["t-http".into()],
        None,
        Duration::from_secs(60),
    )
    .unwrap();
    let through = node(
        "run-agent.mjs",
        &[
            "--url",
            &format!("http://{}/agui/weather", gateway.addr),
            "--thread",
            "t-http",
            "--run",
            "r-direct",
            "--header",
            &format!("Authorization: Bearer {token}"),
        ],
    )
    .await;
    assert!(through["ok"].as_bool().unwrap(), "{through}");
    assert!(through["finished"].as_bool().unwrap(), "{through}");
    assert_eq!(through["messages"], direct["messages"]);
    assert_eq!(through["state"], direct["state"]);
    assert_eq!(through["types"], direct["types"]);
    assert_eq!(through["result"], direct["result"]);
    // Without a token the gateway forwards nothing.
    let refused = node(
        "run-agent.mjs",
        &[
            "--url",
            &format!("http://{}/agui/weather", gateway.addr),
            "--thread",
            "t-http",
            "--run",
            "r-2",
        ],
    )
    .await;
    assert!(!refused["ok"].as_bool().unwrap(), "{refused}");
    assert_eq!(agent.requests().await.as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn http_agent_sees_the_run_closed_when_the_agent_dies() {
    let agent = AguiAgent::start(&["--die-after", "9"]);
    let url = agent.url.clone();
    let gateway = Gateway::start_with(move |c| {
        c.agui
            .agents
            .insert("weather".into(), agent_config(url, &[]));
    })
    .await;
    let mut native = gateway.viewer("u1", "t-hd").await;
    let through = node(
        "run-agent.mjs",
        &[
            "--url",
            &format!("http://{}/agui/weather", gateway.addr),
            "--thread",
            "t-hd",
            "--run",
            "r-hd",
        ],
    )
    .await;
    assert!(!through["finished"].as_bool().unwrap(), "{through}");
    let types: Vec<&str> = through["types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(
        types[types.len() - 3..],
        ["TOOL_CALL_END", "TOOL_CALL_RESULT", "RUN_ERROR"],
        "{through}"
    );
    // The open tool call was answered with an error, so the client's messages are whole.
    let result = &through["messages"][1];
    assert_eq!(result["toolCallId"], "r-hd-tc1", "{through}");
    assert!(
        result["content"].as_str().unwrap().starts_with("error: "),
        "{through}"
    );
    let frames = native.events(12).await;
    assert_eq!(agui(&frames[11])["code"], "agent_stream_ended");
}

#[tokio::test]
async fn a_caller_that_drops_mid_run_leaves_the_run_going_and_resumes_with_last_event_id() {
    let agent = AguiAgent::start(&["--delay-ms", "40"]);
    let url = agent.url.clone();
    let gateway = Gateway::start_with(move |c| {
        c.agui
            .agents
            .insert("weather".into(), agent_config(url, &[]));
    })
    .await;
    let input = run_input("t-drop", "r-drop").to_string();
    let first = node(
        "sse-read.mjs",
        &[
            "--url",
            &format!("http://{}/agui/weather", gateway.addr),
            "--post-json",
            &input,
            "--stop-after",
            "8",
        ],
    )
    .await;
    assert!(first["verified"].as_bool().unwrap(), "{first}");
    assert_eq!(first["end"], "stopped", "{first}");
    let last_id = first["last_id"].as_str().unwrap().to_string();
    // The gateway reads the agent to the run's end without the caller.
    crate::support::eventually("the whole run in the thread", async || {
        let (_, channel) = gateway.get("/v1/channels/thread:t-drop").await;
        match channel["emitted"].as_u64() {
            Some(n) if n == AGENT_EVENTS as u64 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let rest = node(
        "sse-read.mjs",
        &[
            "--url",
            &format!(
                "http://{}/v1/threads/t-drop/events?format=agui",
                gateway.addr
            ),
            "--last-event-id",
            &last_id,
            "--until-end",
        ],
    )
    .await;
    assert!(rest["verified"].as_bool().unwrap(), "{rest}");
    let ids = |read: &Value| -> Vec<String> {
        read["ids"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|id| id.as_str().map(str::to_string))
            .collect()
    };
    let mut seen = ids(&first);
    seen.extend(ids(&rest));
    let distinct: std::collections::BTreeSet<&String> = seen.iter().collect();
    assert_eq!(
        distinct.len(),
        AGENT_EVENTS,
        "every event once: {first} {rest}"
    );
    assert_eq!(seen.len(), AGENT_EVENTS, "none twice: {first} {rest}");
    let events = rest["events"].as_array().unwrap();
    assert_eq!(events.last().unwrap()["type"], "RUN_FINISHED", "{rest}");
}

#[tokio::test]
async fn redis_mode_a_stream_into_one_replica_is_seen_and_closed_on_another() {
    let redis = crate::support::Redis::start().await;
    let url = redis.url();
    let (a_url, b_url) = (url.clone(), url);
    let producer_side = Gateway::start_with(move |c| c.broker.redis_url = Some(a_url)).await;
    let viewer_side = Gateway::start_with(move |c| c.broker.redis_url = Some(b_url)).await;
    let mut remote = viewer_side.viewer("u1", "t_redis").await;
    let stream = Streaming::open(
        &producer_side,
        "/v1/runs/r_redis/agui",
        "application/x-ndjson",
    )
    .await;
    stream.line(started("t_redis", "r_redis")).await;
    stream
        .line(json!({"type": "TEXT_MESSAGE_START", "messageId": "m1", "role": "assistant"}))
        .await;
    assert_eq!(
        types(&remote.events(2).await),
        ["RUN_STARTED", "TEXT_MESSAGE_START"]
    );
    let (status, summary) = stream.finish().await;
    assert_eq!(status, StatusCode::OK, "{summary}");
    assert_eq!(summary["closed"], "agent_stream_ended", "{summary}");
    let frames = remote.events(2).await;
    assert_eq!(types(&frames), ["TEXT_MESSAGE_END", "RUN_ERROR"]);
    assert_eq!(agui(&frames[1])["code"], "agent_stream_ended");
}

#[tokio::test]
async fn a_stalled_agent_has_its_run_closed_and_the_caller_sees_it_end() {
    let agent = AguiAgent::start(&["--stall-after", "3"]);
    let url = agent.url.clone();
    let gateway = Gateway::start_with(move |c| {
        c.ingest.stream_idle_timeout = Duration::from_millis(500);
        c.agui
            .agents
            .insert("weather".into(), agent_config(url, &[]));
    })
    .await;
    let through = node(
        "run-agent.mjs",
        &[
            "--url",
            &format!("http://{}/agui/weather", gateway.addr),
            "--thread",
            "t-stall",
            "--run",
            "r-stall",
        ],
    )
    .await;
    let types: Vec<&str> = through["types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "RUN_STARTED",
            "TEXT_MESSAGE_START",
            "TEXT_MESSAGE_CONTENT",
            "TEXT_MESSAGE_END",
            "RUN_ERROR"
        ],
        "{through}"
    );
    assert_eq!(
        gateway
            .metric(r#"agentwire_runs_closed_total{reason="agent_stalled"}"#)
            .await,
        1.0
    );
}
