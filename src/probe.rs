//! `agentwire probe --url http://host:8000`: a delivery check from the outside, through the
//! public API only. It connects as a client to a private probe thread, publishes a full
//! five-event run, checks that all five arrive in order, and that the gateway's ledger for that
//! channel balances with nothing lost. One line of output; exit 0 or 1.

use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Payload, WebSocket};
use http_body_util::{BodyExt, Empty, Full};
use hyper::upgrade::Upgraded;
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpStream;

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

/// Runs the probe against `url` (http only), within `limit`.
pub async fn run(url: &str, limit: Duration) -> anyhow::Result<Report> {
    let target = Target::parse(url)?;
    tokio::time::timeout(limit, probe(&target))
        .await
        .with_context(|| format!("no complete answer within {} s", limit.as_secs_f64()))?
}

struct Target {
    host: String,
    port: u16,
}

impl Target {
    fn parse(url: &str) -> anyhow::Result<Self> {
        let uri: Uri = url
            .parse()
            .with_context(|| format!("`{url}` is not a URL"))?;
        ensure!(
            uri.scheme_str() == Some("http"),
            "only http:// URLs are supported (got `{url}`)"
        );
        let host = uri.host().context("the URL has no host")?.to_string();
        Ok(Self {
            host,
            port: uri.port_u16().unwrap_or(80),
        })
    }

    fn authority(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    async fn connect(&self) -> anyhow::Result<TcpStream> {
        TcpStream::connect((self.host.as_str(), self.port))
            .await
            .with_context(|| format!("cannot connect to {}", self.authority()))
    }

    async fn http(
        &self,
        method: &str,
        path: &str,
        body: Option<String>,
    ) -> anyhow::Result<(u16, Value)> {
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(self.connect().await?)).await?;
        tokio::spawn(connection);
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.authority())
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let response = sender
            .send_request(request)
            .await
            .with_context(|| format!("{method} {path}"))?;
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await?.to_bytes();
        let value = serde_json::from_slice(&bytes)
            .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Ok((status, value))
    }
}

struct SpawnExecutor;

impl<F> hyper::rt::Executor<F> for SpawnExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        tokio::spawn(future);
    }
}

type Socket = WebSocket<TokioIo<Upgraded>>;

async fn probe(target: &Target) -> anyhow::Result<Report> {
    let id = format!("agentwire-probe-{:08x}", rand::random::<u32>());
    let request = Request::builder()
        .uri("/ws")
        .header("host", target.authority())
        .header("upgrade", "websocket")
        .header("connection", "upgrade")
        .header(
            "sec-websocket-key",
            fastwebsockets::handshake::generate_key(),
        )
        .header("sec-websocket-version", "13")
        .body(Empty::<Bytes>::new())?;
    let (mut ws, _) =
        fastwebsockets::handshake::client(&SpawnExecutor, request, target.connect().await?)
            .await
            .context("WebSocket upgrade on /ws failed")?;

    send(&mut ws, json!({"type": "hello", "user_id": id})).await?;
    expect_type(&mut ws, "welcome").await?;
    expect_type(&mut ws, "subscribed").await?;
    send(&mut ws, json!({"type": "subscribe", "thread_id": id})).await?;
    let subscribed = expect_type(&mut ws, "subscribed").await?;
    let first_seq = subscribed["seq"].as_u64().unwrap_or(0) + 1;

    let run_id = format!("{id}-run");
    let events: Vec<Value> = KINDS
        .iter()
        .map(|kind| json!({"type": kind, "run_id": run_id, "thread_id": id, "payload": {"tool_call_id": "probe_call", "probe": true}}))
        .collect();
    let started = Instant::now();
    let (status, answer) = target
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
        json!({"type": "ack", "thread_id": id, "seq": first_seq + 4}),
    )
    .await?;
    // The pong comes after the writer has recorded the deliveries.
    send(&mut ws, json!({"type": "ping"})).await?;
    expect_type(&mut ws, "pong").await?;
    let _ = ws.write_frame(Frame::close(1000, b"")).await;

    let channel = format!("thread:{id}");
    let (status, ledger) = target
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

async fn send(ws: &mut Socket, frame: Value) -> anyhow::Result<()> {
    let text = frame.to_string();
    ws.write_frame(Frame::text(Payload::Borrowed(text.as_bytes())))
        .await
        .context("writing to the WebSocket")
}

/// The next JSON data frame, skipping heartbeats and control frames.
async fn next_data(ws: &mut Socket) -> anyhow::Result<Value> {
    loop {
        let frame = ws
            .read_frame()
            .await
            .context("reading from the WebSocket")?;
        match frame.opcode {
            OpCode::Text => {
                let value: Value =
                    serde_json::from_slice(&frame.payload).context("a frame that is not JSON")?;
                if value["type"] != "heartbeat" {
                    return Ok(value);
                }
            }
            OpCode::Close => {
                let code = frame
                    .payload
                    .get(..2)
                    .map(|b| u16::from_be_bytes([b[0], b[1]]))
                    .unwrap_or(1005);
                bail!("the gateway closed the connection with {code}");
            }
            _ => {}
        }
    }
}

async fn expect_type(ws: &mut Socket, kind: &str) -> anyhow::Result<Value> {
    let frame = next_data(ws).await?;
    ensure!(
        frame["type"] == kind,
        "expected a {kind} frame, received {frame}"
    );
    Ok(frame)
}
