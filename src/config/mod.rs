//! Configuration: built-in defaults < `agentwire.toml` (or `--config FILE`) < `AGENTWIRE_*`
//! environment variables (`__` for nesting). Read and validated once at start.

mod agui;
mod auth;
mod load;
mod secret;
mod show;

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use agui::{AgentConfig, AguiConfig};
pub use auth::AuthConfig;
pub use load::{ConfigError, cluster_seeds};
pub use secret::Secret;

/// The whole effective configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The public door, for browsers: `/ws` and `/healthz`.
    pub listen: SocketAddr,
    /// The internal door, for producers, operators and Prometheus: `/v1/*`, `/metrics`, `/readyz`,
    /// `/healthz`. Never routed from the internet.
    pub internal_listen: SocketAddr,
    /// A PEM CA certificate trusted, besides the system's, by the gateway's own HTTPS requests
    /// (HLink and subscribe webhooks, the JWKS).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// Proxies (CIDRs) whose `X-Forwarded-For` names the client: the per-address budgets
    /// (`session.max_connections_per_ip`, `ingest.max_requests_per_ip`) count that address instead
    /// of the proxy's. Empty: every peer is the client.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// `text` for people, `json` for log pipelines.
    pub log_format: LogFormat,
    /// A `tracing` filter such as `info` or `agentwire=debug`; `RUST_LOG` wins when set.
    pub log_level: String,
    pub ingest: IngestConfig,
    pub resolve: ResolveConfig,
    pub history: HistoryConfig,
    pub session: SessionConfig,
    pub sse: SseConfig,
    pub shutdown: ShutdownConfig,
    pub watchdog: WatchdogConfig,
    pub deadletter: DeadletterConfig,
    pub upstream: UpstreamConfig,
    pub broker: BrokerConfig,
    pub ledger: LedgerConfig,
    pub auth: AuthConfig,
    pub agui: AguiConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// The smallest `ingest.max_event_bytes`: the gateway's own events (a stalled run's `agent_error`,
/// whose ids are at most `protocol::channel::MAX_ID_LEN` bytes each) must fit it.
pub const MIN_EVENT_BYTES: usize = 2048;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Largest single event, in bytes of JSON.
    pub max_event_bytes: usize,
    /// Largest `POST /v1/events` body; larger bodies get 413.
    pub max_request_bytes: usize,
    /// Most events in one `POST /v1/events`; more get 413.
    pub max_items: usize,
    /// How long an `event_id` is remembered to drop a producer's retry.
    #[serde(with = "humantime_serde")]
    pub dedupe_window: Duration,
    /// How many `event_id`s are remembered at most; the oldest go first.
    pub dedupe_capacity: usize,
    /// Request-body bytes held at once over all requests; a body that does not fit gets 503
    /// `ingest_busy` (retry).
    pub max_inflight_bytes: usize,
    /// Requests one client address may have in flight on the internal door; more get 429.
    /// 0: no cap.
    pub max_requests_per_ip: usize,
    /// Slowest accepted upload, in bytes per second, after a 2 s start; a body that trickles more
    /// slowly is cut with 408.
    pub min_upload_rate: usize,
    /// A stream bound to one run (a producer's body on `POST /v1/runs/{run_id}/events` or
    /// `/agui`, or an AG-UI agent's answer) that sends nothing for this long ends, and its run,
    /// if still open, is closed with `agent_stalled`.
    #[serde(with = "humantime_serde")]
    pub stream_idle_timeout: Duration,
    /// Streams bound to one run read at once (native and AG-UI producer streams and AG-UI agent
    /// runs together); more get 503.
    pub max_streams: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResolveConfig {
    /// How long an event that resolves to no channel waits for its run to be registered.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
    /// How many events may wait for resolution at once; past that they are lost `unresolved`.
    pub max_pending: usize,
    /// How many bytes the waiting events may weigh together (kept as their JSON text).
    pub max_pending_bytes: usize,
    /// The share (percent) of `max_pending` and `max_pending_bytes` one run may hold.
    pub run_share_percent: u32,
    /// The share (percent) of `max_pending` and `max_pending_bytes` one producer key may hold
    /// (all producers without a key count as one).
    pub producer_share_percent: u32,
    /// How long a run registration (run_id → thread, user) is kept.
    #[serde(with = "humantime_serde")]
    pub registry_ttl: Duration,
    /// How many runs the registry holds at most; the oldest go first.
    pub registry_capacity: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// Events kept per channel for replay.
    pub max_events: usize,
    /// How long an event stays in a channel's history.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Bytes one channel's history may hold; past it its oldest events go first.
    pub max_bytes_per_channel: usize,
    /// Bytes all channels' history may hold together; past it the least recently active
    /// channels' oldest events go first.
    pub max_bytes: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionConfig {
    /// Time a new connection has to send `hello` before it is closed with 4001.
    #[serde(with = "humantime_serde")]
    pub hello_timeout: Duration,
    /// A quiet connection gets a `heartbeat` frame and a WebSocket ping this often.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// A connection from which nothing (not even a pong) arrives for this long is closed.
    #[serde(with = "humantime_serde")]
    pub client_timeout: Duration,
    /// A write that cannot complete in this time drops the connection (the peer is gone or stuck).
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// Largest client message; larger ones close the connection with 1009.
    pub max_frame_bytes: usize,
    /// Largest client message before `hello` is accepted (so the `hello`, with its token); larger
    /// ones close the connection with 1009.
    pub max_hello_bytes: usize,
    /// A client frame (or fragmented message) once begun must be complete within this; otherwise
    /// the connection is closed with 1008.
    #[serde(with = "humantime_serde")]
    pub frame_timeout: Duration,
    /// Client messages per second one connection may send, sustained (WebSocket pings and pongs
    /// included); over it: a `rate_limited` error frame and close 4029.
    pub message_rate: u32,
    /// Client messages one connection may send in a burst above `message_rate`.
    pub message_burst: u32,
    /// WebSocket connections the process holds at most; more upgrades get 503.
    pub max_connections: usize,
    /// WebSocket connections one client address may hold; more upgrades get 503. 0: no cap.
    pub max_connections_per_ip: usize,
    /// Threads one connection may subscribe to.
    pub max_subscriptions: usize,
    /// Frames waiting for one socket; past this (or `queue_bytes`) the client is closed with 4008.
    pub queue_events: usize,
    /// Bytes waiting for one socket.
    pub queue_bytes: usize,
}

/// Server-Sent Events streams (`GET /v1/threads/{thread_id}/events`); their queue, write
/// timeout and connection budgets are the `session.*` ones.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SseConfig {
    /// A stream that wrote nothing for this long gets a `: heartbeat` comment, so proxies that
    /// cut quiet responses (often after 60 to 100 s) keep it open.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// The reconnection delay a stream announces first (`retry:`): how long an `EventSource`
    /// waits before it reconnects and resumes with `Last-Event-ID`.
    #[serde(with = "humantime_serde")]
    pub retry: Duration,
}

impl Default for SseConfig {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(15),
            retry: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// After SIGTERM, time during which `/readyz` says 503 before clients get 1012, so that load
    /// balancers stop sending new connections first.
    #[serde(with = "humantime_serde")]
    pub drain_delay: Duration,
    /// The 1012 closes are spread over this window, each connection at a random moment in it, so
    /// that thousands of clients do not reconnect in the same millisecond.
    #[serde(with = "humantime_serde")]
    pub close_window: Duration,
    /// After the close window, how long the process waits for sessions to end before it exits.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WatchdogConfig {
    /// A run with no event for this long is stalled.
    #[serde(with = "humantime_serde")]
    pub run_idle_timeout: Duration,
    /// Whether a stalled run's channel gets a gateway-made `agent_error` (reason `stalled`).
    pub stalled_event: bool,
    /// Runs followed at most; past that the least recently active is evicted (counted).
    pub max_runs: usize,
    /// How long an ended run stays visible at `GET /v1/runs/{run_id}`.
    #[serde(with = "humantime_serde")]
    pub retain: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeadletterConfig {
    /// Unresolved events kept for `GET /v1/deadletter` and redrive; the oldest go first.
    pub capacity: usize,
    /// Bytes the kept events may weigh together (embedded broker); the oldest go first.
    pub max_bytes: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LedgerConfig {
    /// How old the ledger totals and rankings behind `GET /v1/ledger` and `/metrics` may be before
    /// a request recomputes them; concurrent requests share one recomputation. 0s: every request
    /// recomputes (still one at a time).
    #[serde(with = "humantime_serde")]
    pub snapshot_interval: Duration,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        Self {
            snapshot_interval: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// Where HLink messages from browsers are POSTed (`http://` or `https://`). Unset: they are
    /// refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
    /// One webhook attempt may take this long.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Attempts after the first, with doubling backoff from 100 ms.
    pub retries: u32,
    /// Messages waiting for the webhook at most; past that a client gets `upstream_busy`.
    pub queue: usize,
    /// Messages one user may have waiting at most (their fair share of `queue`).
    pub queue_per_user: usize,
    /// Signs each webhook request (`X-Agentwire-Signature`, HMAC-SHA256 over the timestamp and
    /// the body), so the backends can tell the gateway's requests from anyone else's.
    pub signing_secret: Option<Secret>,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            webhook_url: None,
            timeout: Duration::from_secs(5),
            retries: 3,
            queue: 1000,
            queue_per_user: 100,
            signing_secret: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// Selects the Redis broker (`redis://[:password@]host:port[/db]`, or `rediss://` for TLS; a
    /// Redis Cluster: `redis+cluster://[:password@]host:port[,host:port…]`, its seed nodes, or
    /// `rediss+cluster://`); unset, the embedded one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_url: Option<String>,
    /// A PEM CA certificate to verify a `rediss://` (or `rediss+cluster://`) server with, instead of
    /// the system's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_ca_file: Option<std::path::PathBuf>,
    /// The stream producers may `XADD` events to (Redis broker only).
    pub ingest_stream: String,
    /// The consumer group every replica reads `ingest_stream` through.
    pub ingest_group: String,
    /// An ingest entry read by a replica and not acknowledged for this long is claimed by another
    /// (the first replica died). Must be longer than `resolve.grace`.
    #[serde(with = "humantime_serde")]
    pub claim_idle: Duration,
    /// The stream HLink messages from browsers are appended to (Redis broker only).
    pub ui_events_stream: String,
    /// `ui_events_stream` is trimmed to about this many entries.
    pub ui_events_max_len: usize,
    /// How often the pub/sub connection's subscriptions are compared with the watched channels
    /// and fixed (Redis broker only).
    #[serde(with = "humantime_serde")]
    pub redis_reconcile_interval: Duration,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            redis_url: None,
            redis_ca_file: None,
            ingest_stream: "aw:ingest".into(),
            ingest_group: "agentwire".into(),
            claim_idle: Duration::from_secs(30),
            ui_events_stream: "ui_events".into(),
            ui_events_max_len: 100_000,
            redis_reconcile_interval: Duration::from_secs(30),
        }
    }
}

impl Default for WatchdogConfig {
    fn default() -> Self {
        Self {
            run_idle_timeout: Duration::from_secs(120),
            stalled_event: true,
            max_runs: 100_000,
            retain: Duration::from_secs(600),
        }
    }
}

impl Default for DeadletterConfig {
    fn default() -> Self {
        Self {
            capacity: 10_000,
            max_bytes: 64 * 1024 * 1024,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8000)),
            internal_listen: SocketAddr::from(([127, 0, 0, 1], 8001)),
            tls_ca_file: None,
            trusted_proxies: Vec::new(),
            log_format: LogFormat::Text,
            log_level: "info".into(),
            ingest: IngestConfig::default(),
            resolve: ResolveConfig::default(),
            history: HistoryConfig::default(),
            session: SessionConfig::default(),
            sse: SseConfig::default(),
            shutdown: ShutdownConfig::default(),
            watchdog: WatchdogConfig::default(),
            deadletter: DeadletterConfig::default(),
            upstream: UpstreamConfig::default(),
            broker: BrokerConfig::default(),
            ledger: LedgerConfig::default(),
            auth: AuthConfig::default(),
            agui: AguiConfig::default(),
        }
    }
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            max_event_bytes: 64 * 1024,
            max_request_bytes: 1024 * 1024,
            max_items: 5_000,
            dedupe_window: Duration::from_secs(300),
            dedupe_capacity: 100_000,
            max_inflight_bytes: 64 * 1024 * 1024,
            max_requests_per_ip: 64,
            min_upload_rate: 16 * 1024,
            stream_idle_timeout: Duration::from_secs(60),
            max_streams: 1000,
        }
    }
}

impl Default for ResolveConfig {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(5),
            max_pending: 10_000,
            max_pending_bytes: 64 * 1024 * 1024,
            run_share_percent: 10,
            producer_share_percent: 50,
            registry_ttl: Duration::from_secs(24 * 3600),
            registry_capacity: 100_000,
        }
    }
}

impl Default for HistoryConfig {
    fn default() -> Self {
        Self {
            max_events: 1000,
            max_age: Duration::from_secs(3600),
            max_bytes_per_channel: 4 * 1024 * 1024,
            max_bytes: 256 * 1024 * 1024,
        }
    }
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            hello_timeout: Duration::from_secs(10),
            heartbeat: Duration::from_secs(15),
            client_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(10),
            max_frame_bytes: 64 * 1024,
            max_hello_bytes: 4 * 1024,
            frame_timeout: Duration::from_secs(10),
            message_rate: 100,
            message_burst: 200,
            max_connections: 100_000,
            max_connections_per_ip: 1_000,
            max_subscriptions: 100,
            queue_events: 1024,
            queue_bytes: 4 * 1024 * 1024,
        }
    }
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            drain_delay: Duration::from_secs(5),
            close_window: Duration::from_secs(5),
            timeout: Duration::from_secs(10),
        }
    }
}
