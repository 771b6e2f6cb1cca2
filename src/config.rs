//! Configuration: built-in defaults < `agentwire.toml` (or `--config FILE`) < `AGENTWIRE_*`
//! environment variables (`__` for nesting). Read and validated once at start.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// The whole effective configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address of the one listener (HTTP API, WebSocket and metrics).
    pub listen: SocketAddr,
    /// `text` for people, `json` for log pipelines.
    pub log_format: LogFormat,
    /// A `tracing` filter such as `info` or `agentwire=debug`; `RUST_LOG` wins when set.
    pub log_level: String,
    pub ingest: IngestConfig,
    pub resolve: ResolveConfig,
    pub history: HistoryConfig,
    pub session: SessionConfig,
    pub shutdown: ShutdownConfig,
    pub watchdog: WatchdogConfig,
    pub deadletter: DeadletterConfig,
    pub upstream: UpstreamConfig,
    pub broker: BrokerConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResolveConfig {
    /// How long an event that resolves to no channel waits for its run to be registered.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
    /// How many events may wait for resolution at once; past that they are lost `unresolved`.
    pub max_pending: usize,
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
    /// Threads one connection may subscribe to.
    pub max_subscriptions: usize,
    /// Frames waiting for one socket; past this (or `queue_bytes`) the client is closed with 4008.
    pub queue_events: usize,
    /// Bytes waiting for one socket.
    pub queue_bytes: usize,
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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// Where HLink messages from browsers are POSTed (http:// only). Unset: they are refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
    /// One webhook attempt may take this long.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Attempts after the first, with doubling backoff from 100 ms.
    pub retries: u32,
    /// Messages waiting for the webhook at most; past that a client gets `upstream_busy`.
    pub queue: usize,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            webhook_url: None,
            timeout: Duration::from_secs(5),
            retries: 3,
            queue: 1000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// Selects the Redis broker (`redis://[:password@]host:port[/db]`); unset, the embedded one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_url: Option<String>,
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
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            redis_url: None,
            ingest_stream: "aw:ingest".into(),
            ingest_group: "agentwire".into(),
            claim_idle: Duration::from_secs(30),
            ui_events_stream: "ui_events".into(),
            ui_events_max_len: 100_000,
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
        Self { capacity: 10_000 }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8000)),
            log_format: LogFormat::Text,
            log_level: "info".into(),
            ingest: IngestConfig::default(),
            resolve: ResolveConfig::default(),
            history: HistoryConfig::default(),
            session: SessionConfig::default(),
            shutdown: ShutdownConfig::default(),
            watchdog: WatchdogConfig::default(),
            deadletter: DeadletterConfig::default(),
            upstream: UpstreamConfig::default(),
            broker: BrokerConfig::default(),
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
        }
    }
}

impl Default for ResolveConfig {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(5),
            max_pending: 10_000,
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

/// A configuration that cannot be used, with the key at fault.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: `{key}`: {reason}")]
pub struct ConfigError {
    pub key: String,
    pub reason: String,
}

impl Config {
    /// Builds the layered figment: defaults, then the file, then the environment.
    /// `file` is `--config FILE` (must exist) or `None` for `./agentwire.toml` (if present).
    pub fn figment(file: Option<&Path>) -> Figment {
        let defaults = Figment::from(Serialized::defaults(Config::default()));
        let with_file = match file {
            Some(path) => defaults.merge(Toml::file_exact(path)),
            None => defaults.merge(Toml::file("agentwire.toml")),
        };
        // Kubernetes injects AGENTWIRE_SERVICE_HOST, AGENTWIRE_PORT_8000_TCP… into every pod of a
        // namespace with a Service named `agentwire`: those are not configuration.
        let env = Env::prefixed("AGENTWIRE_").split("__").filter(|key| {
            let key = key.as_str().to_ascii_lowercase();
            !(key.starts_with("service_") || key == "port" || key.starts_with("port_"))
        });
        with_file.merge(env)
    }

    /// Extracts and validates; the error names the key.
    pub fn from_figment(figment: &Figment) -> Result<Self, ConfigError> {
        let config: Config = figment.extract().map_err(|error| {
            let key = if error.path.is_empty() {
                "(file)".to_string()
            } else {
                error.path.join(".")
            };
            ConfigError {
                key,
                reason: error.kind.to_string(),
            }
        })?;
        config.validate()?;
        Ok(config)
    }

    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        if let Some(path) = file
            && !path.exists()
        {
            return Err(ConfigError {
                key: "--config".into(),
                reason: format!("file {} does not exist", path.display()),
            });
        }
        Self::from_figment(&Self::figment(file))
    }

    /// Rules that span keys or that serde cannot express.
    fn validate(&self) -> Result<(), ConfigError> {
        let fail = |key: &str, reason: &str| {
            Err(ConfigError {
                key: key.to_string(),
                reason: reason.to_string(),
            })
        };
        let positive: [(&str, usize); 12] = [
            ("upstream.queue", self.upstream.queue),
            ("ingest.max_items", self.ingest.max_items),
            ("watchdog.max_runs", self.watchdog.max_runs),
            ("deadletter.capacity", self.deadletter.capacity),
            ("ingest.max_event_bytes", self.ingest.max_event_bytes),
            ("ingest.dedupe_capacity", self.ingest.dedupe_capacity),
            ("resolve.max_pending", self.resolve.max_pending),
            ("resolve.registry_capacity", self.resolve.registry_capacity),
            ("history.max_events", self.history.max_events),
            ("session.max_subscriptions", self.session.max_subscriptions),
            ("session.queue_events", self.session.queue_events),
            ("session.queue_bytes", self.session.queue_bytes),
        ];
        for (key, value) in positive {
            if value == 0 {
                return fail(key, "must be greater than 0");
            }
        }
        let durations = [
            ("history.max_age", self.history.max_age),
            ("session.hello_timeout", self.session.hello_timeout),
            ("session.heartbeat", self.session.heartbeat),
            ("session.client_timeout", self.session.client_timeout),
            ("session.write_timeout", self.session.write_timeout),
            ("resolve.registry_ttl", self.resolve.registry_ttl),
            ("watchdog.run_idle_timeout", self.watchdog.run_idle_timeout),
        ];
        for (key, value) in durations {
            if value.is_zero() {
                return fail(key, "must be longer than 0s");
            }
        }
        if self.ingest.max_event_bytes > self.ingest.max_request_bytes {
            return fail(
                "ingest.max_event_bytes",
                "must not exceed ingest.max_request_bytes",
            );
        }
        if self.session.queue_bytes < self.ingest.max_event_bytes {
            return fail(
                "session.queue_bytes",
                "must hold at least one event of ingest.max_event_bytes",
            );
        }
        if self.session.max_frame_bytes < 1024 {
            return fail("session.max_frame_bytes", "must be at least 1024");
        }
        if self.session.client_timeout <= self.session.heartbeat {
            return fail(
                "session.client_timeout",
                "must be longer than session.heartbeat",
            );
        }
        if let Some(url) = &self.upstream.webhook_url
            && let Err(error) = crate::client::Target::parse(url)
        {
            return fail("upstream.webhook_url", &format!("{error:#}"));
        }
        if let Some(url) = &self.broker.redis_url
            && let Err(error) = check_redis_url(url)
        {
            return fail("broker.redis_url", &format!("not a Redis URL: {error}"));
        }
        if self.broker.claim_idle <= self.resolve.grace {
            return fail("broker.claim_idle", "must be longer than resolve.grace");
        }
        // An entry claimed after its id left the dedupe set would be published a second time.
        if self.broker.claim_idle >= self.ingest.dedupe_window {
            return fail(
                "broker.claim_idle",
                "must be shorter than ingest.dedupe_window",
            );
        }
        for (field, value) in [
            ("broker.ingest_stream", &self.broker.ingest_stream),
            ("broker.ingest_group", &self.broker.ingest_group),
            ("broker.ui_events_stream", &self.broker.ui_events_stream),
        ] {
            if value.is_empty() {
                return fail(field, "must not be empty");
            }
        }
        if let Err(error) = tracing_subscriber::EnvFilter::try_new(&self.log_level) {
            return fail("log_level", &format!("not a tracing filter: {error}"));
        }
        Ok(())
    }

    /// The effective configuration as TOML, for `agentwire config`.
    /// Secrets (a password in a URL) are replaced by `***`.
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        shown.upstream.webhook_url = shown.upstream.webhook_url.as_deref().map(hide_password);
        shown.broker.redis_url = shown.broker.redis_url.as_deref().map(hide_password);
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

/// `scheme://user:secret@host/…` → `scheme://user:***@host/…`.
fn hide_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return url.to_string();
    };
    let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
    let hidden = if userinfo.contains(':') {
        format!("{user}:***")
    } else {
        "***".to_string()
    };
    format!("{scheme}://{hidden}@{host}{path}")
}

/// `redis://host…` or a Unix socket (`redis+unix://`, `unix://`); this build has no TLS.
fn check_redis_url(raw: &str) -> Result<(), String> {
    let url = url::Url::parse(raw).map_err(|e| e.to_string())?;
    match url.scheme() {
        "redis" if url.has_host() => Ok(()),
        "redis" => Err("no host".into()),
        "redis+unix" | "unix" => Ok(()),
        other => Err(format!("the scheme is {other}, not redis or redis+unix")),
    }
}

#[cfg(test)]
// figment's Jail closures return figment::Error, which is large by design.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    #[test]
    fn env_overrides_file() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "agentwire.toml",
                "listen = \"127.0.0.1:9000\"\n[history]\nmax_events = 5\n",
            )?;
            jail.set_env("AGENTWIRE_HISTORY__MAX_EVENTS", "7");
            jail.set_env("AGENTWIRE_RESOLVE__GRACE", "250ms");
            let config = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(config.listen.port(), 9000);
            assert_eq!(config.history.max_events, 7);
            assert_eq!(config.resolve.grace, Duration::from_millis(250));
            Ok(())
        });
    }

    #[test]
    fn secrets_are_hidden_when_printed() {
        assert_eq!(
            hide_password("http://hook:s3cret@agent:9000/hlink"),
            "http://hook:***@agent:9000/hlink"
        );
        assert_eq!(
            hide_password("redis://:pw@redis:6379/0"),
            "redis://:***@redis:6379/0"
        );
        assert_eq!(hide_password("http://token@agent/x"), "http://***@agent/x");
        assert_eq!(
            hide_password("http://agent:9000/hlink"),
            "http://agent:9000/hlink"
        );
        let mut config = Config::default();
        config.upstream.webhook_url = Some("http://hook:s3cret@agent:9000/hlink".into());
        assert!(!config.to_toml().contains("s3cret"));
    }

    #[test]
    fn kubernetes_service_links_are_not_configuration() {
        Jail::expect_with(|jail| {
            jail.set_env("AGENTWIRE_SERVICE_HOST", "10.0.0.1");
            jail.set_env("AGENTWIRE_PORT", "tcp://10.0.0.1:8000");
            jail.set_env("AGENTWIRE_PORT_8000_TCP_PORT", "8000");
            jail.set_env("AGENTWIRE_HISTORY__MAX_EVENTS", "9");
            let config = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(config.history.max_events, 9);
            Ok(())
        });
    }

    #[test]
    fn bad_values_name_the_key() {
        Jail::expect_with(|jail| {
            jail.set_env("AGENTWIRE_SESSION__HEARTBEAT", "soon");
            let error = Config::load(None).expect_err("must fail");
            assert_eq!(error.key, "session.heartbeat");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env("AGENTWIRE_LOG_LEVEL", "info,[[[");
            let error = Config::load(None).expect_err("must fail");
            assert_eq!(error.key, "log_level");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env("AGENTWIRE_SESSION__QUEUE_EVENTS", "0");
            let error = Config::load(None).expect_err("must fail");
            assert_eq!(error.key, "session.queue_events");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.create_file("agentwire.toml", "[history]\nmax_evnts = 5\n")?;
            let error = Config::load(None).expect_err("must fail");
            assert!(error.reason.contains("max_evnts"), "{error}");
            Ok(())
        });
        for (key, value, named) in [
            (
                "AGENTWIRE_BROKER__REDIS_URL",
                "http://nope",
                "broker.redis_url",
            ),
            ("AGENTWIRE_BROKER__CLAIM_IDLE", "1s", "broker.claim_idle"),
            ("AGENTWIRE_BROKER__CLAIM_IDLE", "1h", "broker.claim_idle"),
            (
                "AGENTWIRE_BROKER__INGEST_STREAM",
                "",
                "broker.ingest_stream",
            ),
        ] {
            Jail::expect_with(|jail| {
                jail.set_env(key, value);
                let error = Config::load(None).expect_err("must fail");
                assert_eq!(error.key, named, "{key}={value}: {error}");
                Ok(())
            });
        }
    }
}
