//! agentwire: a WebSocket gateway that delivers AI-agent execution events from agent backends to
//! the people watching in a browser, and accounts for every one of them.
//!
//! The modules follow the data path:
//!
//! - [`config`]: the configuration, read once (figment: defaults < file < `AGENTWIRE_*` env).
//! - [`server`]: the listener, HTTP routes, WebSocket upgrade and graceful shutdown.
//! - [`shutdown`]: the draining flag, the signal that closes sessions, the trackers that wait.
//! - [`ingest`]: `POST /v1/events` bodies → validated events, deduplicated by `event_id`.
//! - [`resolve`]: which channel an event belongs to; the run registry and the pending set.
//! - [`broker`]: per-channel seq, bounded history, replay: embedded in memory, or in Redis.
//! - [`fanout`]: one event's bytes to every local subscriber's bounded queue.
//! - [`auth`]: browser identity: the JWT in `hello`, thread authorisation.
//! - [`session`]: one client connection: a WebSocket (hello, subscriptions, acks, the writer task)
//!   or a Server-Sent Events stream of one thread.
//! - [`limits`]: connection, request and body-byte budgets, per process and per client address.
//! - [`ledger`]: emitted / delivered / acked / pending / lost, per channel.
//! - [`watchdog`]: every run from start to end; stalls and lifecycle violations.
//! - [`deadletter`]: unresolved events, kept for inspection and redrive.
//! - [`upstream`]: HLink messages from browsers to the agent backends' webhook.
//! - [`metrics`]: the Prometheus registry and every metric.
//! - [`protocol`]: the wire formats, pure decoding and encoding.
//! - [`outbound`]: the gateway's own HTTP(S) requests: webhooks, JWKS.
//! - [`tools`]: `agentwire probe` and `agentwire bench`, which use the gateway from outside.

pub mod auth;
pub mod broker;
pub mod config;
pub mod deadletter;
pub mod fanout;
pub mod hashed;
pub mod ingest;
pub mod ledger;
pub mod limits;
pub mod metrics;
pub mod outbound;
pub mod protocol;
pub mod resolve;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod telemetry;
pub mod tools;
pub mod upstream;
pub mod watchdog;

use std::sync::Arc;

use broker::Broker;
use config::Config;
use metrics::Metrics;
use resolve::Resolver;
use shutdown::Shutdown;
use watchdog::Watchdog;

/// Everything a running gateway shares between its tasks. Built once, passed as `Arc<Gateway>`
/// to the stages above it (ingest, session, server); nothing below them names it.
pub struct Gateway {
    pub config: Config,
    pub metrics: Arc<Metrics>,
    pub broker: Arc<Broker>,
    /// Verifies browser tokens, when `[auth]` configures a key.
    pub verifier: Option<auth::Verifier>,
    /// The internal door's producer and operator keys.
    pub api_keys: auth::ApiKeys,
    /// The application's subscribe webhook, when configured.
    pub subscribe_webhook: Option<auth::SubscribeWebhook>,
    pub resolver: Resolver,
    pub watchdog: Watchdog,
    pub limits: limits::Limits,
    pub shutdown: Shutdown,
    /// The client AG-UI agents are called with (`POST /agui/{agent}`): their answers stream for
    /// as long as a run lasts.
    pub agui_client: reqwest::Client,
}

impl Gateway {
    /// Builds the gateway; the broker is chosen here, once.
    pub fn new(config: Config) -> anyhow::Result<Self> {
        let broker = Broker::new(&config)?;
        let metrics = Metrics::new();
        metrics::export::<watchdog::Violation>(&metrics.lifecycle_violations);
        metrics::export::<crate::protocol::agui::OrderViolation>(&metrics.lifecycle_violations);
        metrics::export::<resolve::PendingFull>(&metrics.pending_refused);
        metrics::export::<fanout::DroppedReport>(&metrics.reports_dropped);
        metrics::export::<auth::Refusal>(&metrics.auth_refused);
        metrics::export::<auth::ApiRefusal>(&metrics.api_refused);
        metrics::export::<auth::Decision>(&metrics.subscribe_webhook);
        metrics::export::<watchdog::RunOutcome>(&metrics.runs_completed);
        metrics::export::<upstream::HandOffOutcome>(&metrics.upstream_messages);
        metrics::export::<broker::Refusal>(&metrics.broker_refused);
        metrics::export::<broker::Reconciled>(&metrics.redis_subscriptions_reconciled);
        metrics.broker_up.set(i64::from(broker.is_up()));
        Ok(Self {
            metrics: Arc::new(metrics),
            broker: Arc::new(broker),
            verifier: auth::Verifier::new(&config.auth, config.tls_ca_file.as_deref())?,
            api_keys: auth::ApiKeys::new(&config.auth),
            subscribe_webhook: auth::SubscribeWebhook::new(
                &config.auth,
                config.upstream.signing_secret.clone(),
                config.tls_ca_file.as_deref(),
            )?,
            resolver: Resolver::new(config.resolve.clone()),
            watchdog: Watchdog::new(config.watchdog.clone()),
            limits: limits::Limits::new(&config),
            shutdown: Shutdown::default(),
            agui_client: outbound::streaming_client(
                config.ingest.stream_idle_timeout,
                config.tls_ca_file.as_deref(),
            )?,
            config,
        })
    }
}
