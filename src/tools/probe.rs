//! `agentwire probe --url http://host:8000` (or `https://`, through a TLS-terminating ingress): a
//! delivery check from the outside, through the public API only. It connects as a client to a
//! private probe thread, publishes a full five-event run, checks that all five arrive in order, and that the gateway's ledger for that
//! channel balances with nothing lost. One line of output; exit 0 or 1.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use fastwebsockets::Frame;
use serde_json::{Value, json};

use crate::tools::client::{Target, expect_type, next_data, send};

const KINDS: [&str; 5] = [
    "agent_started",
    "agent_thinking",
    "tool_executing",
    "tool_completed",
    "agent_completed",
];

/// What a successful probe saw.
pub struct Report {
    pub channel: String,
    pub first_seq: u64,
    pub elapsed: Duration,
    pub ledger: Value,
}

/// Where the probe goes, and what it shows there.
pub struct Doors {
    /// The public door (`/ws`).
    pub url: String,
    /// The internal door (`/v1/*`).
    pub api_url: String,
    pub producer_key: Option<String>,
    pub operator_key: Option<String>,
    /// A browser token that allows `agentwire-probe-*`.
    pub token: Option<String>,
    /// A PEM CA certificate to trust besides the system's, for `https://` doors.
    pub ca_file: Option<PathBuf>,
}

/// Runs the probe through both doors (`http://` or `https://`), within `limit`.
pub async fn run(doors: &Doors, limit: Duration) -> anyhow::Result<Report> {
    let target = Target::parse(&doors.url, doors.ca_file.as_deref())?;
    let api = Target::parse(&doors.api_url, doors.ca_file.as_deref())?;
    let producer = api.with_bearer(doors.producer_key.as_deref());
    let operator = api.with_bearer(doors.operator_key.as_deref());
    let probed = probe(&target, &producer, &operator, doors.token.as_deref());
    tokio::time::timeout(limit, probed)
        .await
        .with_context(|| format!("no complete answer within {} s", limit.as_secs_f64()))?
}

async fn probe(
    target: &Target,
    producer: &Target,
    operator: &Target,
    token: Option<&str>,
) -> anyhow::Result<Report> {
    let id = format!("agentwire-probe-{:08x}", rand::random::<u32>());
    let mut ws = target.websocket(target.connect().await?).await?;

    let hello = match token {
        Some(token) => json!({"type": "hello", "token": token}),
        None => json!({"type": "hello", "user_id": id}),
    };
    send(&mut ws, &hello).await?;
    expect_type(&mut ws, "welcome").await?;
    expect_type(&mut ws, "subscribed").await?;
    send(&mut ws, &json!({"type": "subscribe", "thread_id": id})).await?;
    let subscribed = expect_type(&mut ws, "subscribed").await?;
    let first_seq = subscribed["seq"].as_u64().unwrap_or(0) + 1;

    let run_id = format!("{id}-run");
    let events: Vec<Value> = KINDS
        .iter()
        .map(|kind| json!({"type": kind, "run_id": run_id, "thread_id": id, "payload": {"tool_call_id": "probe_call", "probe": true}}))
        .collect();
    let started = Instant::now();
    let (status, answer) = producer
        .http("POST", "/v1/events", Some(Value::from(events).to_string()))
        .await?;
    ensure!(
        status == 200 && answer["accepted"] == 5,
        "POST /v1/events answered {status}: {answer}"
    );

    for (n, kind) in KINDS.iter().enumerate() {
        let event = next_data(&mut ws).await?;
        let expected_seq = first_seq + n as u64;
        ensure!(
            event["type"] == *kind && event["seq"] == expected_seq,
            "expected {kind} at seq {expected_seq}, received {event}"
        );
    }
    let elapsed = started.elapsed();
    send(
        &mut ws,
        &json!({"type": "ack", "thread_id": id, "seq": first_seq + 4}),
    )
    .await?;
    // The pong comes after the writer has recorded the deliveries.
    send(&mut ws, &json!({"type": "ping"})).await?;
    expect_type(&mut ws, "pong").await?;
    let _ = ws.write_frame(Frame::close(1000, b"")).await;

    let channel = format!("thread:{id}");
    let (status, ledger) = operator
        .http("GET", &format!("/v1/channels/{channel}"), None)
        .await?;
    ensure!(
        status == 200,
        "GET /v1/channels/{channel} answered {status}: {ledger}"
    );
    ensure!(
        ledger["balanced"] == true,
        "the ledger does not balance: {ledger}"
    );
    ensure!(
        ledger["lost_total"] == 0 && ledger["pending"] == 0,
        "events lost or undelivered: {ledger}"
    );
    ensure!(
        ledger["delivered"] == ledger["emitted"],
        "delivered differs from emitted: {ledger}"
    );
    Ok(Report {
        channel,
        first_seq,
        elapsed,
        ledger,
    })
}
