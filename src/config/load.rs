//! Reading the configuration once: built-in defaults < `agentwire.toml` (or `--config FILE`) <
//! `AGENTWIRE_*` environment variables, then the rules serde cannot express. A value that cannot
//! be used stops the start with its key and the reason.

use std::path::Path;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};

use super::Config;

/// An API key shorter than this is refused: it could be guessed.
const MIN_API_KEY_BYTES: usize = 16;

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
        // namespace with a Service named `agentwire`, and AGENTWIRE_PROBE_* / AGENTWIRE_BENCH_*
        // are the tools' own: none of those are configuration.
        let env = Env::prefixed("AGENTWIRE_").split("__").filter(|key| {
            let key = key.as_str().to_ascii_lowercase();
            !(key.starts_with("service_")
                || key == "port"
                || key.starts_with("port_")
                || key.starts_with("probe_")
                || key.starts_with("bench_"))
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
        let positive: [(&str, usize); 17] = [
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
            ("resolve.registry_ttl", self.resolve.registry_ttl),
            ("watchdog.run_idle_timeout", self.watchdog.run_idle_timeout),
            (
                "broker.redis_reconcile_interval",
                self.broker.redis_reconcile_interval,
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
        if let Err(error) = tracing_subscriber::EnvFilter::try_new(&self.log_level) {
            return fail("log_level", &format!("not a tracing filter: {error}"));
        }
        Ok(())
    }
}

/// `redis://host…`, `rediss://host…` (TLS) or a Unix socket (`redis+unix://`, `unix://`).
fn check_redis_url(raw: &str) -> Result<(), String> {
    let url = url::Url::parse(raw).map_err(|e| e.to_string())?;
    match url.scheme() {
        "redis" | "rediss" if url.has_host() => Ok(()),
        "redis" | "rediss" => Err("no host".into()),
        "redis+unix" | "unix" => Ok(()),
        other => Err(format!(
            "the scheme is {other}, not redis, rediss or redis+unix"
        )),
    }
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
            jail.set_env("AGENTWIRE_PROBE_TOKEN", "a-token-for-the-probe");
            jail.set_env("AGENTWIRE_BENCH_JWT_SECRET", "a-secret-for-the-bench");
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
