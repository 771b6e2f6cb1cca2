//! Test support: a real gateway on 127.0.0.1:0 (in this process, or as a child process), a real
//! WebSocket client and a real HTTP client.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

use agentwire::config::Config;

/// How long any single expected frame or response may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(10);

/// A gateway served by this test's runtime.
pub struct Gateway {
    /// The public door: `/ws`, `/healthz`.
    pub addr: SocketAddr,
    /// The internal door: `/v1/*`, `/metrics`, `/readyz`.
    pub internal: SocketAddr,
    /// The gateway itself, when it runs in this process.
    pub inner: Option<Arc<agentwire::Gateway>>,
    stop: CancellationToken,
    /// The in-process gateway's `server::run`.
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Gateway {
    /// A handle on a gateway this test does not own (a child process).
    pub fn at(process: &Process) -> Self {
        Self {
            addr: process.addr,
            internal: process.internal,
            inner: None,
            stop: CancellationToken::new(),
            task: None,
        }
    }

    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(configure: impl FnOnce(&mut Config)) -> Self {
        Self::start_on("127.0.0.1:0", configure).await
    }

    /// A gateway whose public door listens on `public` (the internal one on loopback).
    pub async fn start_on(public: &str, configure: impl FnOnce(&mut Config)) -> Self {
        let mut config = Config::default();
        config.shutdown.drain_delay = Duration::ZERO;
        config.shutdown.close_window = Duration::ZERO;
        // Tests read the ledger right after publishing: every read recomputes (still one at a
        // time). The tests of the snapshot itself configure an interval.
        config.ledger.snapshot_interval = Duration::ZERO;
        configure(&mut config);
        let doors = agentwire::server::Doors {
            public: tokio::net::TcpListener::bind(public).await.unwrap(),
            internal: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        };
        let addr = doors.public.local_addr().unwrap();
        let internal = doors.internal.local_addr().unwrap();
        let stop = CancellationToken::new();
        let gateway = Arc::new(agentwire::Gateway::new(config).unwrap());
        let task = tokio::spawn(agentwire::server::run(
            Arc::clone(&gateway),
            doors,
            stop.clone(),
        ));
        Self {
            addr,
            internal,
            inner: Some(gateway),
            stop,
            task: Some(task),
        }
    }

    /// Shuts the in-process gateway down as SIGTERM does and waits until its shutdown sequence
    /// has ended; returns the gateway, whose counters are then final.
    pub async fn shut_down(&mut self) -> Arc<agentwire::Gateway> {
        self.stop.cancel();
        let task = self.task.take().expect("an in-process gateway");
        tokio::time::timeout(WAIT, task)
            .await
            .expect("the shutdown ends in time")
            .unwrap();
        Arc::clone(self.inner.as_ref().unwrap())
    }

    pub async fn post(&self, path: &str, body: &str) -> (StatusCode, Value) {
        let (status, text) = http(
            self.internal,
            "POST",
            path,
            Some(("application/json", body)),
        )
        .await;
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub async fn post_ndjson(&self, body: &str) -> (StatusCode, Value) {
        let (status, text) = http(
            self.internal,
            "POST",
            "/v1/events",
            Some(("application/x-ndjson", body)),
        )
        .await;
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Posts events and asserts that every one was taken in.
    pub async fn publish(&self, events: &[Value]) -> Value {
        let (status, body) = self
            .post("/v1/events", &Value::from(events.to_vec()).to_string())
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        let (status, text) = http(self.internal, "GET", path, None).await;
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub async fn channel(&self, name: &str) -> Value {
        let (status, body) = self.get(&format!("/v1/channels/{name}")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["balanced"], true, "ledger must balance: {body}");
        body
    }

    /// Waits until the gateway has noticed that every subscriber of `channel` left.
    pub async fn wait_unwatched(&self, channel: &str) {
        for _ in 0..200 {
            if self.channel(channel).await["subscribers"] == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{channel} still has subscribers");
    }

    pub async fn metrics(&self) -> String {
        http(self.internal, "GET", "/metrics", None).await.1
    }

    /// The value of one exposition line, e.g. `agentwire_events_lost_total{reason="unresolved"}`.
    pub async fn metric(&self, series: &str) -> f64 {
        metric_value(&self.metrics().await, series)
    }

    pub async fn client(&self, user_id: &str) -> Client {
        Client::hello(self.addr, user_id).await
    }

    /// A client of `user_id` on `/ws`, subscribed to `thread_id`.
    pub async fn viewer(&self, user_id: &str, thread_id: &str) -> Client {
        let mut client = self.client(user_id).await;
        client.subscribe(thread_id, None).await;
        client
    }
}

/// Asserts that each line appears, exactly, in a `/metrics` exposition.
pub fn assert_lines(exposition: &str, lines: &[&str]) {
    for line in lines {
        assert!(
            exposition.lines().any(|l| l == *line),
            "missing `{line}` in:\n{exposition}"
        );
    }
}

pub fn metric_value(exposition: &str, series: &str) -> f64 {
    exposition
        .lines()
        .find_map(|line| {
            line.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .unwrap_or_else(|| panic!("no series {series} in:\n{exposition}"))
        .trim()
        .parse()
        .unwrap()
}

/// One HTTP/1.1 request over a fresh connection.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<(&str, &str)>,
) -> (StatusCode, String) {
    http_with(addr, method, path, &[], body).await
}

/// As [`http`], with extra request headers.
pub async fn http_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<(&str, &str)>,
) -> (StatusCode, String) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut request = Request::builder().method(method).uri(path);
    if !headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("host"))
    {
        request = request.header("host", addr.to_string());
    }
    if let Some((content_type, _)) = body {
        request = request.header("content-type", content_type);
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(Full::new(Bytes::from(
            body.map(|(_, b)| b.to_string()).unwrap_or_default(),
        )))
        .unwrap();
    let response = tokio::time::timeout(WAIT, sender.send_request(request))
        .await
        .expect("response in time")
        .unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

/// A lifecycle event for `run_id` on `thread_id`.
pub fn event(kind: &str, run_id: &str, thread_id: &str) -> Value {
    let mut event = json!({"type": kind, "run_id": run_id, "thread_id": thread_id, "payload": {}});
    if kind.starts_with("tool_") {
        event["payload"]["tool_call_id"] = "call_1".into();
    }
    event
}

/// The five lifecycle events of one run, in order.
pub fn full_run(run_id: &str, thread_id: &str) -> Vec<Value> {
    [
        "agent_started",
        "agent_thinking",
        "tool_executing",
        "tool_completed",
        "agent_completed",
    ]
    .iter()
    .map(|kind| event(kind, run_id, thread_id))
    .collect()
}

/// A WebSocket client, as a browser would be.
pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub welcome: Value,
    /// The `subscribed` frame of the user channel.
    pub user_channel: Value,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> WebSocketStream<MaybeTlsStream<TcpStream>> {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
            .await
            .unwrap();
        ws
    }

    /// Connects with a tiny receive buffer, so that a client that stops reading fills up fast.
    pub async fn connect_small_buffer(
        addr: SocketAddr,
    ) -> WebSocketStream<MaybeTlsStream<TcpStream>> {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let stream = socket.connect(addr).await.unwrap();
        let (ws, _) = tokio_tungstenite::client_async(
            format!("ws://{addr}/ws"),
            MaybeTlsStream::Plain(stream),
        )
        .await
        .unwrap();
        ws
    }

    pub async fn hello(addr: SocketAddr, user_id: &str) -> Self {
        Self::hello_on(Self::connect(addr).await, user_id, None).await
    }

    pub async fn hello_on(
        ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
        user_id: &str,
        since: Option<Value>,
    ) -> Self {
        let mut hello = json!({"type": "hello", "user_id": user_id});
        if let Some(since) = since {
            hello["since"] = since;
        }
        Self::hello_with(ws, hello).await
    }

    /// Sends `hello` as given (with `protocol`, say) and reads the welcome and the user channel.
    pub async fn hello_with(ws: WebSocketStream<MaybeTlsStream<TcpStream>>, hello: Value) -> Self {
        let mut client = Self {
            ws,
            welcome: Value::Null,
            user_channel: Value::Null,
        };
        client.send(hello).await;
        client.welcome = client.recv().await;
        assert_eq!(client.welcome["type"], "welcome", "{}", client.welcome);
        client.user_channel = client.recv().await;
        assert_eq!(
            client.user_channel["type"], "subscribed",
            "{}",
            client.user_channel
        );
        client
    }

    pub async fn send(&mut self, frame: Value) {
        self.send_raw(Message::text(frame.to_string())).await;
    }

    pub async fn send_raw(&mut self, message: Message) {
        self.ws.send(message).await.unwrap();
    }

    /// The next data frame, skipping heartbeats. Panics on close or silence.
    pub async fn recv(&mut self) -> Value {
        loop {
            let message = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a frame in time");
            match message {
                Some(Ok(Message::Text(text))) => {
                    let value: Value = serde_json::from_str(&text).unwrap();
                    if value["type"] != "heartbeat" {
                        return value;
                    }
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => panic!("expected a frame, got {other:?}"),
            }
        }
    }

    /// Sends a ping and waits for its pong: everything queued before it has been written and
    /// recorded as delivered.
    pub async fn barrier(&mut self) {
        self.send(json!({"type": "ping"})).await;
        assert_eq!(self.recv().await["type"], "pong");
    }

    /// Subscribes to a thread; returns the `subscribed` frame.
    pub async fn subscribe(&mut self, thread_id: &str, since: Option<Value>) -> Value {
        let mut frame = json!({"type": "subscribe", "thread_id": thread_id});
        if let Some(since) = since {
            frame["since"] = since;
        }
        self.send(frame).await;
        let subscribed = self.recv().await;
        assert_eq!(subscribed["type"], "subscribed", "{subscribed}");
        subscribed
    }

    /// Receives `n` event frames.
    pub async fn events(&mut self, n: usize) -> Vec<Value> {
        let mut events = Vec::with_capacity(n);
        while events.len() < n {
            events.push(self.recv().await);
        }
        events
    }

    /// Reads until the server closes; returns the close code (skipping any frames before it).
    pub async fn closed(&mut self) -> u16 {
        loop {
            let message = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a close in time");
            match message {
                Some(Ok(Message::Close(Some(frame)))) => return u16::from(frame.code),
                Some(Ok(Message::Close(None))) => return u16::from(CloseCode::Status),
                Some(Ok(_)) => {}
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    }

    /// Every data frame until the server closes, and the close code.
    pub async fn until_closed(&mut self) -> (Vec<Value>, u16) {
        let mut frames = Vec::new();
        loop {
            let message = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a close in time");
            match message {
                Some(Ok(Message::Text(text))) => frames.push(serde_json::from_str(&text).unwrap()),
                Some(Ok(Message::Close(Some(frame)))) => return (frames, u16::from(frame.code)),
                Some(Ok(Message::Close(None))) => return (frames, u16::from(CloseCode::Status)),
                Some(Ok(_)) => {}
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    }

    /// Asserts that no data frame (other than heartbeats) arrives for a while.
    pub async fn silent_for(&mut self, duration: Duration) {
        let deadline = tokio::time::Instant::now() + duration;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return,
                Ok(Some(Ok(Message::Text(text)))) if text.contains("\"heartbeat\"") => {}
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
                Ok(other) => panic!("expected silence, got {other:?}"),
            }
        }
    }

    pub fn into_inner(self) -> WebSocketStream<MaybeTlsStream<TcpStream>> {
        self.ws
    }
}

/// Wraps a raw socket whose hello has not been sent.
pub fn raw(ws: WebSocketStream<MaybeTlsStream<TcpStream>>) -> Client {
    Client {
        ws,
        welcome: Value::Null,
        user_channel: Value::Null,
    }
}

/// A gateway run as its own process, for signals, exit codes and the environment.
pub struct Process {
    pub child: Child,
    /// The public door.
    pub addr: SocketAddr,
    /// The internal door.
    pub internal: SocketAddr,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits (at most 15 s: a debug build starting while the rest of the suite loads both cores once
/// took more than 5) until something listens on `addr`.
pub async fn wait_listening(addr: SocketAddr) {
    for _ in 0..600 {
        if TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("nothing listens on {addr}");
}

/// Ports handed out in this process. The tests run at once, each binding its ports a moment after
/// asking for them, and the kernel may give a port it just gave to one test to another in between:
/// two servers on one port (a Redis node answering for another test's cluster) fail at random.
static GIVEN: std::sync::LazyLock<std::sync::Mutex<std::collections::HashSet<u16>>> =
    std::sync::LazyLock::new(Default::default);

/// A port nothing listens on and no other test of this process was given.
pub fn free_port() -> u16 {
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if GIVEN.lock().unwrap().insert(port) {
            return port;
        }
    }
}

pub fn binary() -> Command {
    Command::new(env!("CARGO_BIN_EXE_agentwire"))
}

/// A test CA and a certificate it signed for `localhost` (and 127.0.0.1), made with `openssl` in a
/// directory of their own, removed on drop.
pub struct Certificates {
    pub dir: PathBuf,
    /// The CA's certificate (PEM): what a client must trust.
    pub ca: PathBuf,
    /// The server's certificate (PEM), and its key.
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Certificates {
    pub fn make() -> Self {
        let dir = std::env::temp_dir().join(format!("agentwire-tls-{}", free_port()));
        std::fs::create_dir_all(&dir).unwrap();
        // A test CA, and a server certificate it signed for localhost.
        let file = |name: &str| dir.join(name);
        std::fs::write(
            file("ext.cnf"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
        )
        .unwrap();
        let openssl = |args: &[&str]| openssl(&dir, args);
        make_ca(&dir, "agentwire-test-ca", "ca");
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "key.pem",
            "-out",
            "req.csr",
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            "req.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "ext.cnf",
            "-out",
            "cert.pem",
        ]);
        Self {
            ca: file("ca.pem"),
            cert: file("cert.pem"),
            key: file("key.pem"),
            dir,
        }
    }

    /// Another CA's certificate, which signed nothing here: a trust store without ours.
    pub fn another_ca(&self) -> PathBuf {
        make_ca(&self.dir, "agentwire-other-ca", "other")
    }
}

/// A self-signed CA in `dir` (`<stem>.pem`, key `<stem>.key`), valid for a day; its certificate.
fn make_ca(dir: &Path, name: &str, stem: &str) -> PathBuf {
    let (key, pem) = (format!("{stem}.key"), format!("{stem}.pem"));
    let subject = format!("/CN={name}");
    openssl(
        dir,
        &[
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", &subject,
            "-keyout", &key, "-out", &pem,
        ],
    );
    dir.join(pem)
}

impl Drop for Certificates {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let made = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(made.status.success(), "openssl {args:?}: {made:?}");
}

impl Process {
    pub async fn start(env: &[(&str, &str)]) -> Self {
        let (port, internal_port) = (free_port(), free_port());
        let mut command = binary();
        command
            .env_clear()
            .env("AGENTWIRE_LISTEN", format!("127.0.0.1:{port}"))
            .env(
                "AGENTWIRE_INTERNAL_LISTEN",
                format!("127.0.0.1:{internal_port}"),
            )
            // As in-process gateways: the ledger read right after publishing is fresh.
            .env("AGENTWIRE_LEDGER__SNAPSHOT_INTERVAL", "0s")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // To read what a gateway process logged: each writes `gateway-<port>.log` there.
        if let Some(dir) = std::env::var_os("AGENTWIRE_TEST_LOGS") {
            let log = Path::new(&dir).join(format!("gateway-{port}.log"));
            command.stderr(std::fs::File::create(log).unwrap());
            if let Some(filter) = std::env::var_os("RUST_LOG") {
                command.env("RUST_LOG", filter);
            }
        }
        let child = command.spawn().unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let internal: SocketAddr = format!("127.0.0.1:{internal_port}").parse().unwrap();
        let process = Self {
            child,
            addr,
            internal,
        };
        wait_listening(internal).await;
        process
    }

    /// Waits for the process to exit (panics after `limit`) and returns its exit code.
    pub async fn exit_code(&mut self, limit: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the process must exit within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }
}

/// A real `redis-server` on a free port, without persistence unless its arguments ask for it,
/// stopped when dropped.
pub struct Redis {
    child: Child,
    pub port: u16,
    /// The extra arguments it was started with, used again by `restart` and `reload`.
    args: Vec<String>,
    /// Its data directory, when it persists (removed on drop).
    dir: Option<std::path::PathBuf>,
}

impl Redis {
    pub async fn start() -> Self {
        Self::start_on(free_port(), &[]).await
    }

    /// A server with extra arguments, e.g. `["--maxmemory", "4mb"]`.
    pub async fn start_with(args: &[&str]) -> Self {
        Self::start_on(free_port(), args).await
    }

    /// A server that keeps an RDB file in a directory of its own, written only by [`Self::save`]
    /// (no automatic snapshots), and read again by [`Self::reload`].
    pub async fn start_persistent() -> Self {
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("agentwire-redis-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.to_str().unwrap().to_string();
        let mut redis = Self::start_on(port, &["--dir", &path, "--dbfilename", "dump.rdb"]).await;
        redis.dir = Some(dir);
        redis
    }

    async fn start_on(port: u16, args: &[&str]) -> Self {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/test installs it)");
        let redis = Self {
            child,
            port,
            args,
            dir: None,
        };
        let client = redis.client();
        for _ in 0..200 {
            if let Ok(mut conn) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .is_ok()
            {
                return redis;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("redis-server did not start on port {port}");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).unwrap()
    }

    pub async fn conn(&self) -> redis::aio::MultiplexedConnection {
        self.client()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// Kills the server (SIGKILL: what it had not saved is gone).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Kills the server and starts it again on the same port with the same arguments: empty
    /// without persistence, from its last `SAVE` with a `--dir`.
    pub async fn restart(&mut self) {
        self.reload(Duration::ZERO).await;
    }

    /// Writes the RDB file now (`SAVE`).
    pub async fn save(&self) {
        let mut conn = self.conn().await;
        let () = redis::cmd("SAVE").query_async(&mut conn).await.unwrap();
    }

    /// Kills the server with SIGKILL (no final save), waits `outage`, and starts it again with the
    /// same arguments, on the same port and directory: it loads the last [`Self::save`].
    pub async fn reload(&mut self, outage: Duration) {
        self.stop();
        tokio::time::sleep(outage).await;
        let args: Vec<String> = self.args.clone();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let dir = self.dir.take();
        *self = Self::start_on(self.port, &args).await;
        self.dir = dir;
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A TCP proxy in front of `upstream` whose connections can be made to go silent, as a NAT or a
/// load balancer that forgot them: nothing is passed on either way any more, nothing is closed.
/// Connections made afterwards pass as before. Stopped when dropped.
pub struct SilencingProxy {
    pub port: u16,
    /// Connections numbered below this are silent.
    silent_below: Arc<std::sync::atomic::AtomicU64>,
    /// Connections accepted so far.
    accepted: Arc<std::sync::atomic::AtomicU64>,
    stop: CancellationToken,
}

impl SilencingProxy {
    pub async fn start(upstream: u16) -> Self {
        use std::sync::atomic::{AtomicU64, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let silent_below = Arc::new(AtomicU64::new(0));
        let accepted = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let (silent, count, stopped) = (
            Arc::clone(&silent_below),
            Arc::clone(&accepted),
            stop.clone(),
        );
        tokio::spawn(async move {
            for n in 0u64.. {
                let (client, _) = tokio::select! {
                    _ = stopped.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(_) => continue,
                    },
                };
                count.store(n + 1, Ordering::Release);
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                    continue;
                };
                let (silent, stopped) = (Arc::clone(&silent), stopped.clone());
                tokio::spawn(async move {
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = server.into_split();
                    let pass =
                        async |from: &mut tokio::net::tcp::OwnedReadHalf,
                               to: &mut tokio::net::tcp::OwnedWriteHalf| {
                            use tokio::io::{AsyncReadExt, AsyncWriteExt};
                            let mut buffer = vec![0; 16 * 1024];
                            loop {
                                let read = from.read(&mut buffer).await.unwrap_or(0);
                                if read == 0 {
                                    return;
                                }
                                if n < silent.load(Ordering::Acquire) {
                                    // Swallowed, and everything after it: the socket stays open.
                                    std::future::pending::<()>().await;
                                }
                                if to.write_all(&buffer[..read]).await.is_err() {
                                    return;
                                }
                            }
                        };
                    tokio::select! {
                        _ = stopped.cancelled() => {}
                        _ = pass(&mut client_read, &mut server_write) => {}
                        _ = pass(&mut server_read, &mut client_write) => {}
                    }
                });
            }
        });
        Self {
            port,
            silent_below,
            accepted,
            stop,
        }
    }

    /// Every connection made so far goes silent.
    pub fn silence(&self) {
        use std::sync::atomic::Ordering;
        self.silent_below
            .store(self.accepted.load(Ordering::Acquire), Ordering::Release);
    }
}

impl Drop for SilencingProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Polls `check` every 50 ms until it gives a value; after [`WAIT`] fails naming `what` and the
/// last thing `check` saw.
pub async fn eventually<T>(what: &str, mut check: impl AsyncFnMut() -> Result<T, String>) -> T {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(last) => assert!(
                std::time::Instant::now() < deadline,
                "never: {what}; last: {last}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `GET /readyz` until it answers `status`.
pub async fn wait_ready(addr: SocketAddr, status: StatusCode) {
    for _ in 0..200 {
        if http(addr, "GET", "/readyz", None).await.0 == status {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("/readyz on {addr} never answered {status}");
}

/// Runs `agentwire bench …` to its end and returns its JSON line. Every scenario but `idle` must
/// have received every delivery with nothing lost and the ledger balanced; no speed is asserted.
pub async fn bench(args: &[&str]) -> Value {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let shown = args.join(" ");
    let output = tokio::task::spawn_blocking(move || binary().args(&args).output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{shown}: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let result: Value = serde_json::from_str(stdout.trim()).unwrap();
    if result["scenario"] != "idle" {
        assert_eq!(
            result["deliveries_received"], result["deliveries_expected"],
            "{result}"
        );
        assert_eq!(result["ledger"]["lost"], 0, "{result}");
        assert_eq!(result["ledger"]["balanced"], true, "{result}");
    }
    result
}

/// A real Redis Cluster: `masters` masters with `replicas` replicas each, `redis-server
/// --cluster-enabled yes` processes on free ports in a temporary directory, joined by `redis-cli
/// --cluster create`; killed (and the directory removed) on drop.
pub struct RedisCluster {
    nodes: Vec<(u16, Option<Child>)>,
    dir: PathBuf,
    /// Every node speaks TLS only (clients, the cluster bus and replication), with this
    /// server certificate.
    tls: Option<Certificates>,
}

impl RedisCluster {
    pub async fn start(masters: usize, replicas: usize) -> Self {
        Self::start_with(masters, replicas, None).await
    }

    /// A cluster whose nodes speak only TLS, with a server certificate for 127.0.0.1 that the
    /// test CA signed (`Certificates::ca`).
    pub async fn start_tls(masters: usize, certificates: Certificates) -> Self {
        Self::start_with(masters, 0, Some(certificates)).await
    }

    async fn start_with(masters: usize, replicas: usize, tls: Option<Certificates>) -> Self {
        let count = masters * (1 + replicas);
        let dir = std::env::temp_dir().join(format!(
            "agentwire-cluster-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut cluster = Self {
            nodes: Vec::new(),
            dir,
            tls,
        };
        for _ in 0..count {
            let port = free_cluster_port();
            let mut command = Command::new("redis-server");
            match &cluster.tls {
                None => command.args(["--port", &port.to_string()]),
                Some(tls) => command
                    .args(["--port", "0", "--tls-port", &port.to_string()])
                    .args(["--tls-cluster", "yes", "--tls-replication", "yes"])
                    .args(["--tls-auth-clients", "no"])
                    .arg("--tls-cert-file")
                    .arg(&tls.cert)
                    .arg("--tls-key-file")
                    .arg(&tls.key)
                    .arg("--tls-ca-cert-file")
                    .arg(&tls.ca),
            };
            let child = command
                .args(["--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .args(["--cluster-enabled", "yes"])
                .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
                // A master unreachable for a second is failed over, by a replica however long
                // ago it last heard from it.
                .args(["--cluster-node-timeout", "1000"])
                .args(["--cluster-replica-validity-factor", "0"])
                .args(["--dir", cluster.dir.to_str().unwrap()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server must be installed (scripts/test installs it)");
            cluster.nodes.push((port, Some(child)));
        }
        for &(port, _) in &cluster.nodes {
            let client = cluster.client(port);
            eventually("a cluster node answers", async || {
                let mut conn = client
                    .get_multiplexed_async_connection()
                    .await
                    .map_err(|e| e.to_string())?;
                redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .map_err(|e| e.to_string())
            })
            .await;
        }
        let mut create = Command::new("redis-cli");
        if let Some(tls) = &cluster.tls {
            create.arg("--tls").arg("--cacert").arg(&tls.ca);
        }
        let created = create
            .args(["--cluster", "create"])
            .args(
                cluster
                    .nodes
                    .iter()
                    .map(|(port, _)| format!("127.0.0.1:{port}")),
            )
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli must be installed");
        assert!(created.success(), "redis-cli --cluster create failed");
        cluster.wait_ok(masters).await;
        // Every replica in sync with its master, so that a failover has one to promote.
        for port in cluster.running() {
            eventually("the replicas are in sync", async || {
                let info: String = redis::cmd("INFO")
                    .arg("replication")
                    .query_async(&mut cluster.node(port).await)
                    .await
                    .map_err(|e| e.to_string())?;
                match info.contains("role:master") || info.contains("master_link_status:up") {
                    true => Ok(()),
                    false => Err(info),
                }
            })
            .await;
        }
        cluster
    }

    /// `redis+cluster://` (`rediss+cluster://` with TLS) with every node as seed.
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self
            .nodes
            .iter()
            .map(|(port, _)| format!("127.0.0.1:{port}"))
            .collect();
        let scheme = match self.tls {
            None => "redis+cluster",
            Some(_) => "rediss+cluster",
        };
        format!("{scheme}://{}/", seeds.join(","))
    }

    /// A connection to one node.
    pub async fn node(&self, port: u16) -> redis::aio::MultiplexedConnection {
        self.client(port)
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// A client of one node (with TLS, trusting the test CA).
    fn client(&self, port: u16) -> redis::Client {
        match &self.tls {
            None => redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap(),
            Some(tls) => {
                let _ = rustls::crypto::ring::default_provider().install_default();
                redis::Client::build_with_tls(
                    format!("rediss://127.0.0.1:{port}/"),
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(std::fs::read(&tls.ca).unwrap()),
                    },
                )
                .unwrap()
            }
        }
    }

    /// Ports of the nodes still running.
    pub fn running(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|(_, child)| child.is_some())
            .map(|(port, _)| *port)
            .collect()
    }

    /// Makes the node on `port` hold every write (`CLIENT PAUSE 30000 WRITE`; reads and `PING`
    /// are answered) until [`Self::take_writes`].
    pub async fn hold_writes(&self, port: u16) {
        let () = redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(30_000)
            .arg("WRITE")
            .query_async(&mut self.node(port).await)
            .await
            .unwrap();
    }

    /// Ends [`Self::hold_writes`]: the calls it held run.
    pub async fn take_writes(&self, port: u16) {
        let () = redis::cmd("CLIENT")
            .arg("UNPAUSE")
            .query_async(&mut self.node(port).await)
            .await
            .unwrap();
    }

    /// A thread (named `<prefix><n>`) whose channel's master serves neither the run registry
    /// (`{runs}`) nor the journals of held events (`{held}`), so it can hold writes while those
    /// answer; with that master's port.
    pub async fn thread_apart_from_the_registry(&self, prefix: &str) -> (String, u16) {
        let elsewhere = [
            self.master_of("aw:{runs}:target").await,
            self.master_of("aw:{held}:alive").await,
        ];
        for n in 0..1000 {
            let thread = format!("{prefix}{n}");
            let master = self.master_of(&format!("aw:{{thread:{thread}}}:log")).await;
            if !elsewhere.contains(&master) {
                return (thread, master);
            }
        }
        panic!("no master apart from the registry's and the journals'");
    }

    /// The port of the master that serves `key`'s slot, as a running node sees it.
    pub async fn master_of(&self, key: &str) -> u16 {
        let mut conn = self.node(self.running()[0]).await;
        let slot: i64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
        let ranges: Vec<Vec<redis::Value>> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut conn)
            .await
            .unwrap();
        for range in ranges {
            let number = |v: &redis::Value| match v {
                redis::Value::Int(n) => *n,
                _ => -1,
            };
            if number(&range[0]) <= slot && slot <= number(&range[1]) {
                let redis::Value::Array(master) = &range[2] else {
                    panic!("CLUSTER SLOTS: {range:?}");
                };
                return number(&master[1]) as u16;
            }
        }
        panic!("no master serves slot {slot}");
    }

    /// The port of a replica of the master on `master`.
    pub async fn replica_of(&self, master: u16) -> u16 {
        let nodes: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async(&mut self.node(master).await)
            .await
            .unwrap();
        let port_of = |line: &str| -> u16 {
            let address = line.split(' ').nth(1).unwrap();
            let port = address
                .split('@')
                .next()
                .unwrap()
                .rsplit(':')
                .next()
                .unwrap();
            port.parse().unwrap()
        };
        let id = nodes
            .lines()
            .find(|line| line.contains("myself"))
            .and_then(|line| line.split(' ').next())
            .unwrap();
        let replica = nodes
            .lines()
            .find(|line| line.split(' ').nth(3) == Some(id))
            .unwrap_or_else(|| panic!("no replica of {master}: {nodes}"));
        port_of(replica)
    }

    /// SIGKILL to one node.
    pub fn kill(&mut self, port: u16) {
        for (p, child) in &mut self.nodes {
            if *p == port
                && let Some(mut child) = child.take()
            {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    /// Waits until every running node says `cluster_state:ok` and `masters` masters serve the
    /// slots.
    pub async fn wait_ok(&self, masters: usize) {
        for port in self.running() {
            eventually("the cluster is ok", async || {
                let mut conn = self.node(port).await;
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| e.to_string())?;
                let ok = info.contains("cluster_state:ok")
                    && info.contains(&format!("cluster_size:{masters}"));
                match ok {
                    true => Ok(()),
                    false => Err(info),
                }
            })
            .await;
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for (_, child) in &mut self.nodes {
            if let Some(mut child) = child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A free port whose cluster bus port (10000 above it) is free too.
fn free_cluster_port() -> u16 {
    loop {
        let port = free_port();
        // The node's cluster bus listens on its port + 10000: given to nobody else either.
        if port < 55_000
            && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok()
            && GIVEN.lock().unwrap().insert(port + 10_000)
        {
            return port;
        }
    }
}

type Chunk = Result<Frame<Bytes>, Infallible>;

/// A request whose body is sent piece by piece while the gateway reads it.
pub struct Streaming {
    body: Option<mpsc::Sender<Chunk>>,
    pub connection: tokio::task::JoinHandle<()>,
    answer: tokio::task::JoinHandle<(StatusCode, Value)>,
}

impl Streaming {
    pub async fn open(gateway: &Gateway, path: &str, content_type: &str) -> Self {
        let stream = TcpStream::connect(gateway.internal).await.unwrap();
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        let connection = tokio::spawn(async move {
            let _ = connection.await;
        });
        let (body, chunks) = mpsc::channel::<Chunk>(16);
        let chunks = futures_util::stream::unfold(chunks, |mut chunks| async move {
            chunks.recv().await.map(|chunk| (chunk, chunks))
        });
        let request = Request::builder()
            .method("POST")
            .uri(path)
            .header("host", gateway.internal.to_string())
            .header("content-type", content_type)
            .body(StreamBody::new(chunks))
            .unwrap();
        let answer = tokio::spawn(async move {
            let response = sender.send_request(request).await.unwrap();
            let status = response.status();
            let bytes = response.into_body().collect().await.unwrap().to_bytes();
            (
                status,
                serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            )
        });
        Self {
            body: Some(body),
            connection,
            answer,
        }
    }

    pub async fn send(&self, text: &str) {
        let chunk = Ok(Frame::data(Bytes::from(text.to_string())));
        self.body.as_ref().unwrap().send(chunk).await.unwrap();
    }

    /// One NDJSON line.
    pub async fn line(&self, event: Value) {
        self.send(&format!("{event}\n")).await;
    }

    /// Ends the body; the gateway's answer.
    pub async fn finish(mut self) -> (StatusCode, Value) {
        self.body = None;
        self.answer().await
    }

    /// The answer, without ending the body (the gateway ends the stream).
    pub async fn answer(self) -> (StatusCode, Value) {
        tokio::time::timeout(WAIT, self.answer)
            .await
            .expect("an answer in time")
            .unwrap()
    }
}
