//! The subscribe webhook: the application decides who may read a thread. The gateway POSTs
//! `{"user_id","thread_id"}` (signed like HLink requests when `upstream.signing_secret` is set) and
//! reads `{"allow": bool, "cache_seconds": n}`; the answer is cached per user and thread. A timeout,
//! an error or an answer it cannot read is a refusal: it fails closed.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use serde::Deserialize;
use tokio::time::Instant;

use crate::config::{AuthConfig, Secret};
use crate::metrics::{Label, Metrics, count};
use crate::upstream::signature;

/// Decisions remembered at most; past this the expired ones go, then all.
const CACHE_CAPACITY: usize = 100_000;

/// What the webhook said, counted in `agentwire_subscribe_webhook_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny,
    /// No usable answer (timeout, error status, unreadable body): refused.
    Error,
}

impl Label for Decision {
    const ALL: &'static [Self] = &[Self::Allow, Self::Deny, Self::Error];

    fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::Error => "error",
        }
    }
}

#[derive(Deserialize)]
struct Answer {
    allow: bool,
    cache_seconds: Option<u64>,
}

pub struct SubscribeWebhook {
    client: reqwest::Client,
    url: String,
    /// How long an answer is kept when it does not say.
    ttl: Duration,
    signing: Option<Secret>,
    cache: Mutex<HashMap<(String, String), (bool, Instant)>>,
}

impl SubscribeWebhook {
    /// `None` without `auth.subscribe_webhook`.
    pub fn new(
        config: &AuthConfig,
        signing: Option<Secret>,
        ca_file: Option<&std::path::Path>,
    ) -> anyhow::Result<Option<Self>> {
        let Some(url) = &config.subscribe_webhook else {
            return Ok(None);
        };
        Ok(Some(Self {
            client: crate::outbound::client(config.subscribe_webhook_timeout, ca_file)?,
            url: url.clone(),
            ttl: config.subscribe_cache_ttl,
            signing,
            cache: Mutex::default(),
        }))
    }

    /// Whether the application lets `user_id` read `thread_id`.
    pub async fn allows(&self, user_id: &str, thread_id: &str, metrics: &Metrics) -> bool {
        let key = (user_id.to_string(), thread_id.to_string());
        let now = Instant::now();
        if let Some((allow, until)) = self.lock().get(&key)
            && *until > now
        {
            return *allow;
        }
        let (decision, ttl) = self.ask(user_id, thread_id).await;
        count(&metrics.subscribe_webhook, decision);
        let allow = decision == Decision::Allow;
        if decision != Decision::Error {
            let mut cache = self.lock();
            if cache.len() >= CACHE_CAPACITY {
                cache.retain(|_, (_, until)| *until > now);
                if cache.len() >= CACHE_CAPACITY {
                    cache.clear();
                }
            }
            let until = now.checked_add(ttl).unwrap_or(now + self.ttl);
            cache.insert(key, (allow, until));
        }
        allow
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), (bool, Instant)>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn ask(&self, user_id: &str, thread_id: &str) -> (Decision, Duration) {
        let body = serde_json::json!({"user_id": user_id, "thread_id": thread_id}).to_string();
        let mut request = self
            .client
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.clone());
        if let Some(secret) = &self.signing {
            for (name, value) in signature::headers(secret.expose(), &body) {
                request = request.header(name, value);
            }
        }
        let answer = match request.send().await {
            Ok(response) if response.status().is_success() => response
                .bytes()
                .await
                .map_err(|e| e.without_url().to_string())
                .and_then(|body| {
                    serde_json::from_slice::<Answer>(&body).map_err(|e| e.to_string())
                }),
            Ok(response) => {
                tracing::warn!(status = %response.status(), thread_id, "The subscribe webhook refused to answer; the subscription is refused.");
                return (Decision::Error, self.ttl);
            }
            Err(error) => {
                tracing::warn!(error = %error.without_url(), thread_id, "The subscribe webhook did not answer; the subscription is refused.");
                return (Decision::Error, self.ttl);
            }
        };
        match answer {
            Ok(answer) => (
                if answer.allow {
                    Decision::Allow
                } else {
                    Decision::Deny
                },
                // At most a day: an answer is a cache entry, not a grant for ever.
                answer
                    .cache_seconds
                    .map_or(self.ttl, |s| Duration::from_secs(s.min(86_400))),
            ),
            Err(error) => {
                tracing::warn!(%error, thread_id, "The subscribe webhook's answer is not {{\"allow\": bool}}; the subscription is refused.");
                (Decision::Error, self.ttl)
            }
        }
    }
}
