//! `GET /v1/threads/{thread_id}/events` over real sockets: the native frames with their ids, the
//! ledger, resume with `Last-Event-ID`, the heartbeat, a slow consumer cut beside a healthy
//! stream, authentication and authorisation (nothing created when refused), CORS, shutdown, and a
//! stream on one Redis replica fed by another.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, Bytes};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::{TcpSocket, TcpStream};

use crate::replicas::{on_redis, thinking};
use crate::support::{Gateway, Redis, WAIT, eventually, metric_value};

const SECRET: &str = "a-test-secret-of-at-least-32-bytes!!";

/// One SSE event block as the client parsed it.
#[derive(Debug, Default, Clone)]
pub(crate) struct Block {
    pub(crate) id: Option<String>,
    pub(crate) event: Option<String>,
    pub(crate) data: Option<String>,
    retry: Option<u64>,
    comment: Option<String>,
}

impl Block {
    pub(crate) fn json(&self) -> Value {
        serde_json::from_str(self.data.as_deref().unwrap()).unwrap()
    }
}

/// A client reading one event stream.
pub(crate) struct Stream {
    body: Incoming,
    buffer: Vec<u8>,
}

async fn request(
    stream: TcpStream,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> hyper::Response<Incoming> {
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .header("accept", "text/event-stream");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    tokio::time::timeout(
        WAIT,
        sender.send_request(request.body(Empty::<Bytes>::new()).unwrap()),
    )
    .await
    .expect("an answer in time")
    .unwrap()
}

impl Stream {
    pub(crate) async fn open(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Self {
        match Self::try_open(addr, path, headers).await {
            Ok(stream) => stream,
            Err((status, body)) => panic!("{path}: {status} {body}"),
        }
    }

    pub(crate) async fn try_open(
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Self, (StatusCode, Value)> {
        let stream = TcpStream::connect(addr).await.unwrap();
        Self::on(stream, addr, path, headers).await
    }

    async fn on(
        stream: TcpStream,
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Self, (StatusCode, Value)> {
        let response = request(stream, addr, "GET", path, headers).await;
        let status = response.status();
        if status != StatusCode::OK {
            let body = response.into_body().collect().await.unwrap().to_bytes();
            return Err((status, serde_json::from_slice(&body).unwrap()));
        }
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        Ok(Self {
            body: response.into_body(),
            buffer: Vec::new(),
        })
    }

    /// The next block; `None` when the stream ended.
    pub(crate) async fn next(&mut self) -> Option<Block> {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buffer.drain(..end + 2).collect();
                let text = String::from_utf8(block).unwrap();
                let mut parsed = Block::default();
                for line in text.lines() {
                    if let Some(comment) = line.strip_prefix(':') {
                        parsed.comment = Some(comment.trim().to_string());
                    } else if let Some((field, value)) = line.split_once(": ") {
                        match field {
                            "id" => parsed.id = Some(value.into()),
                            "event" => parsed.event = Some(value.into()),
                            "data" => parsed.data = Some(value.into()),
                            "retry" => parsed.retry = Some(value.parse().unwrap()),
                            other => panic!("unknown field {other}"),
                        }
                    }
                }
                return Some(parsed);
            }
            match tokio::time::timeout(WAIT, self.body.frame())
                .await
                .expect("stream bytes in time")
            {
                Some(Ok(frame)) => {
                    if let Ok(mut data) = frame.into_data() {
                        while data.has_remaining() {
                            let chunk = data.chunk().to_vec();
                            data.advance(chunk.len());
                            self.buffer.extend_from_slice(&chunk);
                        }
                    }
                }
                _ => return None,
            }
        }
    }

    /// The stream's start: `retry:`, then the `subscribed` event.
    pub(crate) async fn subscribed(&mut self) -> Value {
        let retry = self.next().await.unwrap();
        assert_eq!(retry.retry, Some(1000), "{retry:?}");
        let subscribed = self.next().await.unwrap();
        assert_eq!(
            subscribed.event.as_deref(),
            Some("subscribed"),
            "{subscribed:?}"
        );
        assert_eq!(subscribed.id, None);
        subscribed.json()
    }

    /// The next `n` events (comments skipped).
    pub(crate) async fn events(&mut self, n: usize) -> Vec<Block> {
        let mut events = Vec::new();
        while events.len() < n {
            let block = self.next().await.expect("the stream goes on");
            if block.comment.is_none() {
                events.push(block);
            }
        }
        events
    }
}

fn seqs(events: &[Block]) -> Vec<u64> {
    events
        .iter()
        .map(|e| e.json()["seq"].as_u64().unwrap())
        .collect()
}

async fn publish_n(gateway: &Gateway, thread: &str, range: std::ops::RangeInclusive<usize>) {
    let events: Vec<_> = range.map(|n| thinking(thread, n)).collect();
    gateway.publish(&events).await;
}

#[tokio::test]
async fn events_arrive_in_order_with_ids_as_ws_frames_and_are_delivered() {
    let gateway = Gateway::start().await;
    let mut stream = Stream::open(gateway.addr, "/v1/threads/t_sse/events", &[]).await;
    let subscribed = stream.subscribed().await;
    assert_eq!(subscribed["type"], "subscribed");
    assert_eq!(subscribed["thread_id"], "t_sse");
    let mut ws = gateway.client("u_ws").await;
    ws.subscribe("t_sse", None).await;

    publish_n(&gateway, "t_sse", 1..=5).await;
    let events = stream.events(5).await;
    assert_eq!(seqs(&events), [1, 2, 3, 4, 5]);
    let from_ws = ws.events(5).await;
    for (sse, ws) in events.iter().zip(&from_ws) {
        assert_eq!(sse.json(), *ws, "data is the /ws frame");
        assert_eq!(
            sse.id.as_deref().unwrap(),
            format!("{}:{}", ws["epoch"].as_str().unwrap(), ws["seq"]),
        );
        assert_eq!(sse.event, None, "events are unnamed: onmessage gets them");
    }
    let ledger = gateway.channel("thread:t_sse").await;
    assert_eq!(
        (&ledger["delivered"], &ledger["pending"]),
        (&json!(5), &json!(0))
    );
    let exposition = gateway.metrics().await;
    assert_eq!(metric_value(&exposition, "agentwire_sse_streams"), 1.0);
    assert_eq!(metric_value(&exposition, "agentwire_connections"), 2.0);

    // The client goes away: the stream ends and gives back what it held.
    drop(stream);
    eventually("the stream ends", async || {
        let exposition = gateway.metrics().await;
        match metric_value(&exposition, "agentwire_sse_streams") {
            0.0 => Ok(()),
            open => Err(format!("{open} open")),
        }
    })
    .await;
}

#[tokio::test]
async fn last_event_id_resumes_with_exactly_the_missed_events() {
    let gateway = Gateway::start().await;
    let path = "/v1/threads/t_resume/events";
    let mut stream = Stream::open(gateway.addr, path, &[]).await;
    stream.subscribed().await;
    publish_n(&gateway, "t_resume", 1..=3).await;
    let seen = stream.events(3).await;
    let last_id = seen[1].id.clone().unwrap();
    drop(stream);
    publish_n(&gateway, "t_resume", 4..=5).await;

    // What EventSource sends on its reconnect: the same URL (an old `since` included) and the
    // id of the last event it saw, which wins.
    let mut resumed = Stream::open(
        gateway.addr,
        &format!("{path}?since=0"),
        &[("last-event-id", &last_id)],
    )
    .await;
    let subscribed = resumed.subscribed().await;
    assert_eq!(
        (&subscribed["recovered"], &subscribed["replayed"]),
        (&json!(true), &json!(3))
    );
    assert_eq!(seqs(&resumed.events(3).await), [3, 4, 5]);

    // `since=0` on a first connection: all retained history.
    let mut all = Stream::open(gateway.addr, &format!("{path}?since=0"), &[]).await;
    all.subscribed().await;
    assert_eq!(seqs(&all.events(5).await), [1, 2, 3, 4, 5]);

    // An unknown epoch: recovered false, what history holds.
    let mut other = Stream::open(gateway.addr, &format!("{path}?since=0abc:2"), &[]).await;
    assert_eq!(other.subscribed().await["recovered"], false);
}

#[tokio::test]
async fn malformed_requests_answer_400_naming_the_field() {
    let gateway = Gateway::start().await;
    for (path, headers, field) in [
        ("/v1/threads/t/events?since=nope", vec![], "since"),
        ("/v1/threads/t/events?since=e:1&since=e:2", vec![], "since"),
        (
            "/v1/threads/t/events",
            vec![("last-event-id", "e:x")],
            "last-event-id",
        ),
        ("/v1/threads/t/events?format=ag-ui", vec![], "format"),
        ("/v1/threads/a%20b/events", vec![], "thread_id"),
    ] {
        let Err((status, body)) = Stream::try_open(gateway.addr, path, &headers).await else {
            panic!("{path} opened");
        };
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
        assert_eq!(body["field"], field, "{path}: {body}");
    }
    let (status, _) =
        crate::support::http(gateway.addr, "POST", "/v1/threads/t/events", None).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        gateway.metric("agentwire_channels").await,
        0.0,
        "nothing created"
    );
}

#[tokio::test]
async fn a_quiet_stream_gets_heartbeat_comments() {
    let gateway = Gateway::start_with(|c| c.sse.heartbeat = Duration::from_millis(200)).await;
    let mut stream = Stream::open(gateway.addr, "/v1/threads/t_quiet/events", &[]).await;
    stream.subscribed().await;
    let block = stream.next().await.unwrap();
    assert_eq!(block.comment.as_deref(), Some("heartbeat"), "{block:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_is_not_read_is_cut_while_the_one_beside_it_gets_everything() {
    let gateway = Gateway::start_with(|c| {
        c.session.queue_bytes = 512 * 1024;
        c.session.write_timeout = Duration::from_secs(1);
        c.history.max_bytes_per_channel = 32 * 1024 * 1024;
    })
    .await;
    let path = "/v1/threads/t_big/events";
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let slow_socket = socket.connect(gateway.addr).await.unwrap();
    // Its answer's head is read; its body never is.
    let slow = Stream::on(slow_socket, gateway.addr, path, &[])
        .await
        .unwrap();
    let mut healthy = Stream::open(gateway.addr, path, &[]).await;
    healthy.subscribed().await;

    let filler = "x".repeat(8_000);
    let mut published = 0;
    let mut seen = Vec::new();
    while gateway
        .metric("agentwire_connections_closed_total{reason=\"slow_consumer\"}")
        .await
        == 0.0
    {
        assert!(published < 4_000, "the slow stream was never cut");
        let events: Vec<_> = (1..=20)
            .map(|n| {
                let mut event = thinking("t_big", published + n);
                event["payload"]["text"] = filler.clone().into();
                event
            })
            .collect();
        gateway.publish(&events).await;
        published += 20;
        seen.extend(seqs(&healthy.events(20).await));
    }
    assert_eq!(
        seen,
        (1..=published as u64).collect::<Vec<_>>(),
        "the healthy stream got everything"
    );
    let exposition = gateway.metrics().await;
    assert_eq!(
        metric_value(
            &exposition,
            "agentwire_slow_consumer_closes_total{close=\"sent\"}"
        ) + metric_value(
            &exposition,
            "agentwire_slow_consumer_closes_total{close=\"not_sent\"}"
        ),
        1.0
    );
    assert_eq!(metric_value(&exposition, "agentwire_sse_streams"), 1.0);

    // Read now, it has what reached it, in order, then its connection ends: the gateway closed
    // it (within `session.write_timeout` of the cut) rather than holding it for a client that
    // does not read.
    let mut slow = slow;
    let mut last_seq = 0;
    let mut blocks = 0;
    while let Some(block) = slow.next().await {
        blocks += 1;
        if block.id.is_some() {
            let seq = block.json()["seq"].as_u64().unwrap();
            assert_eq!(seq, last_seq + 1, "in order, no gap");
            last_seq = seq;
        } else if block.event.as_deref() == Some("error") {
            assert_eq!(block.json()["code"], "slow_consumer");
        }
    }
    assert!(
        blocks > 0 && last_seq < published as u64,
        "{blocks} blocks, last {last_seq}"
    );
}

fn token(user: &str, threads: &[&str], thread_id: Option<&str>) -> String {
    let threads: Vec<String> = threads.iter().map(|t| t.to_string()).collect();
    agentwire::auth::mint(SECRET, user, &threads, thread_id, Duration::from_secs(600)).unwrap()
}

#[tokio::test]
async fn credentials_are_checked_like_ws_and_a_refusal_creates_nothing() {
    let gateway = Gateway::start_with(|c| c.auth.jwt_secret = Some(SECRET.into())).await;
    let addr = gateway.addr;
    let connection = token("u_a", &["t_ok"], None);
    let bearer = format!("Bearer {connection}");
    let mut allowed = Stream::open(
        addr,
        "/v1/threads/t_ok/events",
        &[("authorization", &bearer)],
    )
    .await;
    allowed.subscribed().await;

    let subscription = token("u_a", &[], Some("t_sub"));
    let mut by_query = Stream::open(
        addr,
        &format!("/v1/threads/t_sub/events?token={subscription}"),
        &[],
    )
    .await;
    by_query.subscribed().await;
    // A subscription token is also good as a bearer.
    let sub_bearer = format!("Bearer {subscription}");
    Stream::open(
        addr,
        "/v1/threads/t_sub/events",
        &[("authorization", &sub_bearer)],
    )
    .await;

    let cases = [
        (
            format!("/v1/threads/t_no/events?token={connection}"),
            None,
            StatusCode::UNAUTHORIZED,
            "query_connection_token",
        ),
        (
            format!("/v1/threads/t_no/events?token={subscription}"),
            None,
            StatusCode::FORBIDDEN,
            "thread",
        ),
        (
            "/v1/threads/t_no/events".to_string(),
            Some(bearer.clone()),
            StatusCode::FORBIDDEN,
            "thread",
        ),
        (
            "/v1/threads/t_no/events".to_string(),
            None,
            StatusCode::UNAUTHORIZED,
            "missing",
        ),
        (
            "/v1/threads/t_no/events?token=garbage".to_string(),
            None,
            StatusCode::UNAUTHORIZED,
            "invalid",
        ),
    ];
    for (path, bearer, status, reason) in cases {
        let headers: Vec<(&str, &str)> = bearer
            .iter()
            .map(|b| ("authorization", b.as_str()))
            .collect();
        let Err((got, body)) = Stream::try_open(addr, &path, &headers).await else {
            panic!("{path} opened");
        };
        assert_eq!(got, status, "{path}: {body}");
        let series = format!("agentwire_auth_refused_total{{reason=\"{reason}\"}}");
        assert!(gateway.metric(&series).await >= 1.0, "{series}");
    }
    let (status, _) = gateway.get("/v1/channels/thread:t_no").await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "no channel state for refused streams"
    );
    let exposition = gateway.metrics().await;
    assert_eq!(
        metric_value(
            &exposition,
            "agentwire_auth_refused_total{reason=\"query_connection_token\"}"
        ),
        1.0
    );
    let response = request(
        TcpStream::connect(addr).await.unwrap(),
        addr,
        "GET",
        "/v1/threads/t_no/events",
        &[],
    )
    .await;
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
}

#[tokio::test]
async fn an_allowed_origin_gets_cors_and_its_preflight_and_another_is_refused() {
    let gateway = Gateway::start_with(|c| {
        c.auth.jwt_secret = Some(SECRET.into());
        c.auth.allowed_origins = vec!["https://app.example.com".into()];
    })
    .await;
    let addr = gateway.addr;
    let path = "/v1/threads/t_c/events";
    let origin = ("origin", "https://app.example.com");
    let preflight = request(
        TcpStream::connect(addr).await.unwrap(),
        addr,
        "OPTIONS",
        path,
        &[
            origin,
            (
                "access-control-request-headers",
                "authorization, last-event-id",
            ),
        ],
    )
    .await;
    assert_eq!(preflight.status(), StatusCode::NO_CONTENT);
    let headers = preflight.headers();
    assert_eq!(
        headers["access-control-allow-origin"],
        "https://app.example.com"
    );
    let allowed = headers["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_lowercase();
    assert!(
        allowed.contains("authorization") && allowed.contains("last-event-id"),
        "{allowed}"
    );

    let bearer = format!("Bearer {}", token("u_c", &["t_c"], None));
    let response = request(
        TcpStream::connect(addr).await.unwrap(),
        addr,
        "GET",
        path,
        &[origin, ("authorization", &bearer)],
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );

    let Err((status, body)) = Stream::try_open(
        addr,
        path,
        &[
            ("origin", "https://evil.example"),
            ("authorization", &bearer),
        ],
    )
    .await
    else {
        panic!("another origin opened a stream");
    };
    assert_eq!(
        (status, &body["error"]),
        (StatusCode::FORBIDDEN, &json!("origin_not_allowed"))
    );
    assert_eq!(
        gateway
            .metric("agentwire_upgrades_refused_total{reason=\"origin\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn the_connection_budget_counts_streams() {
    let gateway = Gateway::start_with(|c| c.session.max_connections_per_ip = 1).await;
    let mut first = Stream::open(gateway.addr, "/v1/threads/t_b/events", &[]).await;
    first.subscribed().await;
    let Err((status, body)) = Stream::try_open(gateway.addr, "/v1/threads/t_b/events", &[]).await
    else {
        panic!("a second stream opened");
    };
    assert_eq!(
        (status, &body["error"]),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            &json!("too_many_connections")
        )
    );
}

#[tokio::test]
async fn the_tokens_expiry_ends_the_stream() {
    let gateway = Gateway::start_with(|c| {
        c.auth.jwt_secret = Some(SECRET.into());
        c.auth.jwt_leeway = Duration::ZERO;
    })
    .await;
    let short =
        agentwire::auth::mint(SECRET, "u_e", &[], Some("t_e"), Duration::from_secs(2)).unwrap();
    let mut stream = Stream::open(
        gateway.addr,
        &format!("/v1/threads/t_e/events?token={short}"),
        &[],
    )
    .await;
    stream.subscribed().await;
    let mut last = None;
    while let Some(block) = stream.next().await {
        last = Some(block);
    }
    let last = last.expect("an error event");
    assert_eq!(last.event.as_deref(), Some("error"), "{last:?}");
    assert_eq!(last.json()["code"], "token_expired");
    assert_eq!(
        gateway
            .metric("agentwire_connections_closed_total{reason=\"token_expired\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn shutdown_ends_streams_with_a_restart_event() {
    let mut gateway = Gateway::start().await;
    let mut stream = Stream::open(gateway.addr, "/v1/threads/t_down/events", &[]).await;
    stream.subscribed().await;
    let reader = tokio::spawn(async move {
        let mut blocks = Vec::new();
        while let Some(block) = stream.next().await {
            blocks.push(block);
        }
        blocks
    });
    let inner = gateway.shut_down().await;
    let blocks = reader.await.unwrap();
    let last = blocks.last().expect("a restart event");
    assert_eq!(last.event.as_deref(), Some("restart"), "{blocks:?}");
    assert_eq!(last.json()["code"], "restarting");
    assert_eq!(
        inner
            .metrics
            .connections_closed
            .with_label_values(&["shutdown"])
            .get(),
        1
    );
}

#[tokio::test]
async fn a_stream_on_one_redis_replica_gets_what_another_accepted() {
    let redis = Redis::start().await;
    let a = on_redis(&redis, |_| {}).await;
    let b = on_redis(&redis, |_| {}).await;
    let mut stream = Stream::open(b.addr, "/v1/threads/t_redis/events", &[]).await;
    stream.subscribed().await;
    publish_n(&a, "t_redis", 1..=10).await;
    let events = stream.events(10).await;
    assert_eq!(seqs(&events), (1..=10).collect::<Vec<_>>());
    let epoch = events[0].json()["epoch"].as_str().unwrap().to_string();
    assert_eq!(
        events[9].id.as_deref(),
        Some(format!("{epoch}:10").as_str())
    );
    // And a resume on A from B's position.
    let mut resumed = Stream::open(
        a.addr,
        "/v1/threads/t_redis/events",
        &[("last-event-id", &format!("{epoch}:8"))],
    )
    .await;
    assert_eq!(resumed.subscribed().await["recovered"], true);
    assert_eq!(seqs(&resumed.events(2).await), [9, 10]);
}

/// The subscribe webhook decides for a bearer whose token does not list the thread, as on `/ws`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subscribe_webhook_decides_for_a_bearer() {
    use http_body_util::Full;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/may-read", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|request: Request<Incoming>| async move {
                    let body = request.into_body().collect().await?.to_bytes();
                    let asked: Value = serde_json::from_slice(&body).unwrap();
                    let allow = asked["thread_id"] == "t_hook" && asked["user_id"] == "u_h";
                    let answer = format!(r#"{{"allow":{allow}}}"#);
                    Ok::<_, hyper::Error>(hyper::Response::new(Full::new(Bytes::from(answer))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    let gateway = Gateway::start_with(|c| {
        c.auth.jwt_secret = Some(SECRET.into());
        c.auth.subscribe_webhook = Some(url);
    })
    .await;
    let bearer = format!("Bearer {}", token("u_h", &[], None));
    let headers = [("authorization", bearer.as_str())];
    let mut stream = Stream::open(gateway.addr, "/v1/threads/t_hook/events", &headers).await;
    stream.subscribed().await;
    let Err((status, _)) =
        Stream::try_open(gateway.addr, "/v1/threads/t_other/events", &headers).await
    else {
        panic!("the webhook's no opened a stream");
    };
    assert_eq!(status, StatusCode::FORBIDDEN);
    let exposition = gateway.metrics().await;
    for (series, value) in [
        ("agentwire_subscribe_webhook_total{outcome=\"allow\"}", 1.0),
        ("agentwire_subscribe_webhook_total{outcome=\"deny\"}", 1.0),
    ] {
        assert_eq!(metric_value(&exposition, series), value, "{series}");
    }
}
