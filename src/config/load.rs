//! Reading the configuration once: built-in defaults < `agentwire.toml` (or `--config FILE`) <
//! `AGENTWIRE_*` environment variables, then the rules serde cannot express. A value that cannot
//! be used stops the start with its key and the reason.

use std::path::Path;

use figment::Figment;
use figment::error::Kind;
use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::Value;

use super::Config;

/// An API key shorter than this is refused: it could be guessed.
const MIN_API_KEY_BYTES: usize = 16;

/// The levels a `log_level` (or `RUST_LOG`) directive may name.
const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

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
        with_file.merge(environment())
    }

    /// The log filter in force: `RUST_LOG` when it is set and not blank, else `log_level` (both
    /// checked by [`Config::load`]).
    pub fn log_filter(&self) -> String {
        match std::env::var("RUST_LOG") {
            Ok(filter) if !filter.trim().is_empty() => filter,
            _ => self.log_level.clone(),
        }
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
        check_environment()?;
        let config = Self::from_figment(&Self::figment(file))?;
        match std::env::var("RUST_LOG") {
            Ok(filter) if filter.trim().is_empty() => {}
            Ok(filter) => check_log_filter(&filter).map_err(|reason| ConfigError {
                key: "RUST_LOG".into(),
                reason,
            })?,
            Err(std::env::VarError::NotPresent) => {}
            Err(std::env::VarError::NotUnicode(_)) => {
                return Err(ConfigError {
                    key: "RUST_LOG".into(),
                    reason: "not UTF-8".into(),
                });
            }
        }
        Ok(config)
    }

    /// Rules that span keys or that serde cannot express.
    fn validate(&self) -> Result<(), ConfigError> {
        let fail = |key: &str, reason: &str| {
            Err(ConfigError {
                key: key.to_string(),
                reason: reason.to_string(),
            })
        };
        let positive: [(&str, usize); 20] = [
            ("session.max_connections", self.session.max_connections),
            ("session.message_rate", self.session.message_rate as usize),
            ("session.message_burst", self.session.message_burst as usize),
            ("ingest.max_inflight_bytes", self.ingest.max_inflight_bytes),
            ("ingest.min_upload_rate", self.ingest.min_upload_rate),
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
            ("broker.ui_events_max_len", self.broker.ui_events_max_len),
            ("ingest.max_streams", self.ingest.max_streams),
            ("agui.max_input_bytes", self.agui.max_input_bytes),
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
            ("session.frame_timeout", self.session.frame_timeout),
            ("sse.heartbeat", self.sse.heartbeat),
            ("sse.retry", self.sse.retry),
            ("resolve.registry_ttl", self.resolve.registry_ttl),
            ("watchdog.run_idle_timeout", self.watchdog.run_idle_timeout),
            ("upstream.timeout", self.upstream.timeout),
            (
                "auth.subscribe_webhook_timeout",
                self.auth.subscribe_webhook_timeout,
            ),
            (
                "broker.redis_reconcile_interval",
                self.broker.redis_reconcile_interval,
            ),
            (
                "ingest.stream_idle_timeout",
                self.ingest.stream_idle_timeout,
            ),
        ];
        for (key, value) in durations {
            if value.is_zero() {
                return fail(key, "must be longer than 0s");
            }
        }
        if self.ingest.max_event_bytes < super::MIN_EVENT_BYTES {
            return fail(
                "ingest.max_event_bytes",
                &format!(
                    "must be at least {} (the gateway's own events must fit)",
                    super::MIN_EVENT_BYTES
                ),
            );
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
        if !(1024..=self.session.max_frame_bytes).contains(&self.session.max_hello_bytes) {
            return fail(
                "session.max_hello_bytes",
                "must be between 1024 and session.max_frame_bytes",
            );
        }
        for (key, percent) in [
            ("resolve.run_share_percent", self.resolve.run_share_percent),
            (
                "resolve.producer_share_percent",
                self.resolve.producer_share_percent,
            ),
        ] {
            if !(1..=100).contains(&percent) {
                return fail(key, "must be between 1 and 100");
            }
            let share = self.resolve.max_pending_bytes as u128 * u128::from(percent) / 100;
            if share < self.ingest.max_event_bytes as u128 * 2 {
                return fail(
                    key,
                    "must leave room for two events of ingest.max_event_bytes in resolve.max_pending_bytes",
                );
            }
        }
        if self.deadletter.max_bytes < self.ingest.max_event_bytes * 2 {
            return fail(
                "deadletter.max_bytes",
                "must hold at least two events of ingest.max_event_bytes",
            );
        }
        if self.history.max_bytes_per_channel < self.ingest.max_event_bytes * 2 {
            return fail(
                "history.max_bytes_per_channel",
                "must hold at least two events of ingest.max_event_bytes",
            );
        }
        if self.history.max_bytes < self.history.max_bytes_per_channel {
            return fail(
                "history.max_bytes",
                "must be at least history.max_bytes_per_channel",
            );
        }
        if self.ingest.max_inflight_bytes < self.ingest.max_request_bytes {
            return fail(
                "ingest.max_inflight_bytes",
                "must hold at least one body of ingest.max_request_bytes",
            );
        }
        if self.session.client_timeout <= self.session.heartbeat {
            return fail(
                "session.client_timeout",
                "must be longer than session.heartbeat",
            );
        }
        if self.upstream.queue_per_user == 0 || self.upstream.queue_per_user > self.upstream.queue {
            return fail(
                "upstream.queue_per_user",
                "must be between 1 and upstream.queue",
            );
        }
        if self
            .upstream
            .signing_secret
            .as_ref()
            .is_some_and(|s| s.len() < MIN_API_KEY_BYTES)
        {
            return fail("upstream.signing_secret", "must be at least 16 bytes");
        }
        let check = match self.auth.insecure {
            true => crate::outbound::check_url,
            false => crate::outbound::check_trusted_url,
        };
        if let Some(url) = &self.auth.jwks_url
            && let Err(error) = check(url)
        {
            return fail("auth.jwks_url", &error);
        }
        if let Some(url) = &self.auth.subscribe_webhook
            && let Err(error) = check(url)
        {
            return fail("auth.subscribe_webhook", &error);
        }
        if let Some(url) = &self.upstream.webhook_url
            && let Err(error) = crate::outbound::check_url(url)
        {
            return fail("upstream.webhook_url", &error);
        }
        if let Some(url) = &self.broker.redis_url
            && let Err(error) = check_redis_url(url)
        {
            return fail("broker.redis_url", &format!("not a Redis URL: {error}"));
        }
        let exposed = !self.internal_listen.ip().is_loopback() && !self.auth.insecure;
        for (key, keys) in [
            ("auth.producer_keys", &self.auth.producer_keys),
            ("auth.operator_keys", &self.auth.operator_keys),
        ] {
            if keys.iter().any(|k| k.len() < MIN_API_KEY_BYTES) {
                return fail(key, "each key must be at least 16 bytes");
            }
            if exposed && keys.is_empty() {
                return fail(
                    key,
                    "required when internal_listen is not a loopback address (or set auth.insecure)",
                );
            }
        }
        if let Err(reason) = self.auth.decoding_key() {
            let key = match (&self.auth.jwt_secret, &self.auth.jwks_url) {
                (Some(_), _) => "auth.jwt_secret",
                (None, Some(_)) => "auth.jwks_url",
                (None, None) => "auth.jwt_public_key",
            };
            return fail(key, &reason);
        }
        for (key, path) in [
            ("broker.redis_ca_file", &self.broker.redis_ca_file),
            ("tls_ca_file", &self.tls_ca_file),
        ] {
            let Some(path) = path else { continue };
            match std::fs::read(path) {
                Ok(pem) if pem.starts_with(b"-----BEGIN CERTIFICATE-----") => {}
                Ok(_) => return fail(key, "not a PEM certificate"),
                Err(error) => return fail(key, &error.to_string()),
            }
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
        if let Err(reason) = check_log_filter(&self.log_level) {
            return fail("log_level", &reason);
        }
        if let Err((key, reason)) = self.agui.check() {
            return fail(&key, &reason);
        }
        Ok(())
    }
}

/// The `AGENTWIRE_*` variables that are configuration: not those Kubernetes injects into every pod
/// of a namespace with a Service whose name starts with `agentwire` (`AGENTWIRE_SERVICE_HOST`,
/// `AGENTWIRE_PORT_8000_TCP`, and for a Service `agentwire-internal` `AGENTWIRE_INTERNAL_PORT`,
/// `AGENTWIRE_INTERNAL_SERVICE_HOST`…: a top-level name with the word `port` or `service`, which no
/// key has), nor the tools' own (`AGENTWIRE_PROBE_*`, `AGENTWIRE_BENCH_*`).
fn environment() -> Env {
    Env::prefixed("AGENTWIRE_").split("__").filter(|key| {
        let key = key.as_str().to_ascii_lowercase();
        let service_link = !key.contains('.')
            && key
                .split('_')
                .any(|word| word == "port" || word == "service");
        !(service_link || key.starts_with("probe_") || key.starts_with("bench_"))
    })
}

/// An `AGENTWIRE_*` variable that names no key stops the start, named as the variable the operator
/// set (not as a field of the merged configuration), with the variable meant when a single `_`
/// stands where `__` should (`AGENTWIRE_SESSION_HEARTBEAT` → `AGENTWIRE_SESSION__HEARTBEAT`).
fn check_environment() -> Result<(), ConfigError> {
    // The environment alone: serde names the first variable no field takes. Any other error is
    // the merged configuration's to report.
    let Err(error) = Figment::from(environment()).extract::<Config>() else {
        return Ok(());
    };
    let Kind::UnknownField(field, _) = &error.kind else {
        return Ok(());
    };
    // figment's path ends with the unknown field itself; the sections are before it.
    let mut path: Vec<&str> = error.path.iter().map(String::as_str).collect();
    if path.last() == Some(&field.as_str()) {
        path.pop();
    }
    let variable = |path: &[&str]| format!("AGENTWIRE_{}", path.join("__").to_ascii_uppercase());
    let named = variable(&[path.as_slice(), &[field.as_str()]].concat());
    let defaults = Figment::from(Serialized::defaults(Config::default()));
    let meant = path.is_empty().then(|| {
        field.match_indices('_').find_map(|(at, _)| {
            let (section, key) = (&field[..at], &field[at + 1..]);
            matches!(defaults.find_value(section), Ok(Value::Dict(..)))
                .then(|| variable(&[section, key]))
        })
    });
    let reason = match meant.flatten() {
        Some(meant) => format!(
            "not a configuration key; did you mean {meant}? (`__` separates a section from its key)"
        ),
        None => "not a configuration key (`__` separates a section from its key; \
                 docs/configuration.md lists the keys)"
            .to_string(),
    };
    Err(ConfigError { key: named, reason })
}

/// `log_level` and `RUST_LOG`: comma-separated directives, each a level or `target=level`, where
/// the level is one of [`LEVELS`]. A bare word that is not a level would be read by `tracing` as
/// a target to log everything of, and nothing else: it is refused.
fn check_log_filter(filter: &str) -> Result<(), String> {
    let directives: Vec<&str> = filter
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    if directives.is_empty() {
        return Err("names no level (e.g. `info` or `info,agentwire=debug`)".into());
    }
    for directive in directives {
        let level = directive
            .rsplit_once('=')
            .map_or(directive, |(_, level)| level);
        if !LEVELS.iter().any(|l| l.eq_ignore_ascii_case(level.trim())) {
            return Err(format!(
                "`{directive}`: each directive is a level or `target=level`, the level one of {}",
                LEVELS.join(", ")
            ));
        }
    }
    tracing_subscriber::EnvFilter::try_new(filter)
        .map(drop)
        .map_err(|error| format!("not a tracing filter: {error}"))
}

/// `redis://host…`, `rediss://host…` (TLS) or a Unix socket (`redis+unix://`, `unix://`); or
/// the seed nodes of a Redis Cluster (`redis+cluster://`, `rediss+cluster://`).
fn check_redis_url(raw: &str) -> Result<(), String> {
    if let Some(nodes) = cluster_seeds(raw)? {
        return nodes.iter().try_for_each(|node| check_redis_url(node));
    }
    let url = url::Url::parse(raw).map_err(|e| e.to_string())?;
    if url.port() == Some(0) {
        return Err("port 0: the port must be between 1 and 65535".into());
    }
    match url.scheme() {
        "redis" | "rediss" if url.has_host() => Ok(()),
        "redis" | "rediss" => Err("no host".into()),
        "redis+unix" | "unix" => Ok(()),
        other => Err(format!(
            "the scheme is {other}, not redis, rediss, redis+unix, redis+cluster or rediss+cluster"
        )),
    }
}

/// The seed nodes of a Redis Cluster URL, each as a `redis://` (or `rediss://`) URL with the
/// same credentials: `redis+cluster://[user[:password]@]host:port[,host:port…][/]`. `None` for
/// any other URL. A Cluster has one database, so the URL names none.
pub fn cluster_seeds(raw: &str) -> Result<Option<Vec<String>>, String> {
    let Some((scheme, rest)) = raw.split_once("://") else {
        return Ok(None);
    };
    let scheme = match scheme {
        "redis+cluster" => "redis",
        "rediss+cluster" => "rediss",
        _ => return Ok(None),
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains(['/', '?', '#']) {
        return Err("a cluster URL has no database, path or query".into());
    }
    let (userinfo, hosts) = match rest.rsplit_once('@') {
        Some((userinfo, hosts)) => (format!("{userinfo}@"), hosts),
        None => (String::new(), rest),
    };
    let nodes: Vec<String> = hosts
        .split(',')
        .map(|host| format!("{scheme}://{userinfo}{}/", host.trim()))
        .collect();
    for (node, host) in nodes.iter().zip(hosts.split(',')) {
        let url = url::Url::parse(node).map_err(|e| format!("`{}`: {e}", host.trim()))?;
        if url.port().is_none() {
            return Err(format!("`{}`: each seed node names its port", host.trim()));
        }
    }
    Ok(Some(nodes))
}

#[cfg(test)]
// figment's Jail closures return figment::Error, which is large by design.
#[allow(clippy::result_large_err)]
mod tests {
    use std::time::Duration;

    use figment::Jail;

    use super::*;

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
    fn kubernetes_service_links_and_tool_variables_are_not_configuration() {
        Jail::expect_with(|jail| {
            jail.set_env("AGENTWIRE_SERVICE_HOST", "10.0.0.1");
            jail.set_env("AGENTWIRE_PORT", "tcp://10.0.0.1:8000");
            jail.set_env("AGENTWIRE_PORT_8000_TCP_PORT", "8000");
            // A Service `agentwire-internal` (the chart's internal door, outside the chart).
            jail.set_env("AGENTWIRE_INTERNAL_SERVICE_HOST", "10.0.0.2");
            jail.set_env("AGENTWIRE_INTERNAL_SERVICE_PORT_INTERNAL", "8001");
            jail.set_env("AGENTWIRE_INTERNAL_PORT", "tcp://10.0.0.2:8001");
            jail.set_env("AGENTWIRE_INTERNAL_PORT_8001_TCP_ADDR", "10.0.0.2");
            jail.set_env("AGENTWIRE_PROBE_TOKEN", "a-token-for-the-probe");
            jail.set_env("AGENTWIRE_BENCH_JWT_SECRET", "a-secret-for-the-bench");
            jail.set_env("AGENTWIRE_HISTORY__MAX_EVENTS", "9");
            let config = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(config.history.max_events, 9);
            Ok(())
        });
    }

    #[test]
    fn agents_and_their_headers_come_from_the_environment() {
        Jail::expect_with(|jail| {
            jail.set_env(
                "AGENTWIRE_AGUI__AGENTS__RESEARCH__URL",
                "http://agent:8123/run",
            );
            jail.set_env(
                "AGENTWIRE_AGUI__AGENTS__RESEARCH__HEADERS",
                r#"{x-api-key="k-1", authorization="Bearer b"}"#,
            );
            let config = Config::load(None).map_err(|e| e.to_string())?;
            let agent = &config.agui.agents["research"];
            assert_eq!(agent.url, "http://agent:8123/run");
            assert_eq!(agent.headers["x-api-key"].expose(), "k-1");
            assert_eq!(agent.headers["authorization"].expose(), "Bearer b");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env(
                "AGENTWIRE_AGUI__AGENTS__RESEARCH__URL",
                "http://agent:8123/run",
            );
            jail.set_env(
                "AGENTWIRE_AGUI__AGENTS__RESEARCH__HEADERS",
                r#"{content-type="text/plain"}"#,
            );
            let error = Config::load(None).expect_err("must fail");
            assert_eq!(error.key, "agui.agents.research.headers.content-type");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env("AGENTWIRE_AGUI__AGENTS__RESEARCH__URL", "ftp://agent/run");
            let error = Config::load(None).expect_err("must fail");
            assert_eq!(error.key, "agui.agents.research.url");
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
            jail.set_env("AGENTWIRE_INGEST__MAX_EVENT_BYTES", "2047");
            let error = Config::load(None).expect_err("must fail");
            assert_eq!(error.key, "ingest.max_event_bytes");
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
            (
                "AGENTWIRE_INTERNAL_LISTEN",
                "0.0.0.0:8001",
                "auth.producer_keys",
            ),
            (
                "AGENTWIRE_AUTH__PRODUCER_KEYS",
                "[short]",
                "auth.producer_keys",
            ),
            ("AGENTWIRE_AUTH__JWT_SECRET", "short", "auth.jwt_secret"),
            (
                "AGENTWIRE_TLS_CA_FILE",
                "/nonexistent/ca.pem",
                "tls_ca_file",
            ),
            (
                "AGENTWIRE_BROKER__REDIS_CA_FILE",
                "Cargo.toml",
                "broker.redis_ca_file",
            ),
            ("AGENTWIRE_BROKER__CLAIM_IDLE", "1h", "broker.claim_idle"),
            (
                "AGENTWIRE_BROKER__INGEST_STREAM",
                "",
                "broker.ingest_stream",
            ),
            ("AGENTWIRE_UPSTREAM__TIMEOUT", "0s", "upstream.timeout"),
            (
                "AGENTWIRE_AUTH__SUBSCRIBE_WEBHOOK_TIMEOUT",
                "0s",
                "auth.subscribe_webhook_timeout",
            ),
            (
                "AGENTWIRE_BROKER__UI_EVENTS_MAX_LEN",
                "0",
                "broker.ui_events_max_len",
            ),
            ("AGENTWIRE_LOG_LEVEL", "verbose", "log_level"),
            ("AGENTWIRE_LOG_LEVEL", "info,agentwire=loud", "log_level"),
            ("AGENTWIRE_LOG_LEVEL", " , ", "log_level"),
        ] {
            Jail::expect_with(|jail| {
                jail.set_env(key, value);
                let error = Config::load(None).expect_err("must fail");
                assert_eq!(error.key, named, "{key}={value}: {error}");
                Ok(())
            });
        }
    }

    #[test]
    fn log_filters_name_levels() {
        for good in [
            "info",
            "WARN",
            "off",
            "info,agentwire=debug",
            "agentwire::session=trace,hyper=warn",
        ] {
            assert!(check_log_filter(good).is_ok(), "{good}");
        }
        for bad in [
            "verbose",
            "agentwire",
            "info,agentwire",
            "agentwire=loud",
            "",
        ] {
            assert!(check_log_filter(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_bad_rust_log_stops_the_start() {
        Jail::expect_with(|jail| {
            jail.set_env("RUST_LOG", "verbose");
            let error = Config::load(None).expect_err("must fail");
            assert_eq!(error.key, "RUST_LOG");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env("RUST_LOG", "agentwire=debug");
            jail.set_env("AGENTWIRE_LOG_LEVEL", "warn");
            let config = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(config.log_filter(), "agentwire=debug");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env("RUST_LOG", " ");
            jail.set_env("AGENTWIRE_LOG_LEVEL", "warn");
            let config = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(config.log_filter(), "warn");
            Ok(())
        });
    }

    #[test]
    fn url_ports_out_of_range_are_refused() {
        for (variable, key, scheme) in [
            (
                "AGENTWIRE_UPSTREAM__WEBHOOK_URL",
                "upstream.webhook_url",
                "http",
            ),
            ("AGENTWIRE_AUTH__JWKS_URL", "auth.jwks_url", "https"),
            (
                "AGENTWIRE_AUTH__SUBSCRIBE_WEBHOOK",
                "auth.subscribe_webhook",
                "https",
            ),
            ("AGENTWIRE_BROKER__REDIS_URL", "broker.redis_url", "redis"),
        ] {
            for port in ["99999", "65536", "0"] {
                Jail::expect_with(|jail| {
                    jail.set_env(variable, format!("{scheme}://host:{port}/"));
                    let error = Config::load(None).expect_err("must fail");
                    assert_eq!(error.key, key, "{variable} port {port}: {error}");
                    Ok(())
                });
            }
            Jail::expect_with(|jail| {
                jail.set_env(variable, format!("{scheme}://host:65535/"));
                if let Err(error) = Config::load(None) {
                    assert_ne!(error.key, key, "{error}");
                }
                Ok(())
            });
        }
    }

    #[test]
    fn unknown_environment_variables_are_named() {
        for (variable, hint) in [
            (
                "AGENTWIRE_SESSION_HEARTBEAT",
                Some("did you mean AGENTWIRE_SESSION__HEARTBEAT?"),
            ),
            (
                "AGENTWIRE_UPSTREAM_WEBHOOK_URL",
                Some("did you mean AGENTWIRE_UPSTREAM__WEBHOOK_URL?"),
            ),
            ("AGENTWIRE_SESSION__HEARTBEATS", None),
            ("AGENTWIRE_VERBOSE", None),
        ] {
            Jail::expect_with(|jail| {
                jail.set_env(variable, "5s");
                let error = Config::load(None).expect_err("must fail");
                assert_eq!(error.key, variable, "{error}");
                assert!(error.reason.contains("__"), "{error}");
                if let Some(hint) = hint {
                    assert!(error.reason.contains(hint), "{error}");
                }
                Ok(())
            });
        }
    }

    #[test]
    fn a_cluster_url_lists_its_seed_nodes_with_the_same_credentials() {
        assert_eq!(
            cluster_seeds("rediss+cluster://u:pw@a:7000, b:7001/"),
            Ok(Some(vec![
                "rediss://u:pw@a:7000/".to_string(),
                "rediss://u:pw@b:7001/".to_string()
            ]))
        );
        assert_eq!(cluster_seeds("redis://a:6379/0"), Ok(None));
        assert!(check_redis_url("redis+cluster://a:7000").is_ok());
        for wrong in [
            "redis+cluster://a:7000/1",
            "redis+cluster://a",
            "redis+cluster://a:7000,",
            "redis+cluster://a:0",
        ] {
            assert!(check_redis_url(wrong).is_err(), "{wrong}");
        }
    }
}
