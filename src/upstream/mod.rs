//! The browser → agent direction: HLink messages a client sends on `/ws` are validated (in
//! `protocol::client`), stamped with the connection's user (from its token, when browsers
//! authenticate) and connection id, and POSTed to the agent backends' webhook
//! (`upstream.webhook_url`) by one worker, signed ([`signature`]), with retries, from a bounded
//! queue that is fair between users ([`fair`]). The client is answered `websocket_ack` once its
//! message is queued. Without a webhook the messages are refused. This is the embedded broker's
//! hand-off; the Redis broker appends to its `ui_events` stream instead.

mod fair;
pub mod signature;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use fair::FairQueue;

use crate::outbound;

use crate::config::UpstreamConfig;
use crate::metrics::{Label, Metrics, count};
use crate::protocol::upstream::Outbound;

/// What became of an HLink message, counted in `agentwire_upstream_messages_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandOffOutcome {
    /// Posted to the webhook, or appended to `ui_events`.
    Delivered,
    /// The webhook did not take it after every retry, or Redis refused it.
    Failed,
    /// The queue was full.
    Busy,
    /// No upstream is configured.
    Refused,
    /// The client's message was not a valid HLink message.
    Invalid,
    /// Queued (the client was answered `websocket_ack`) but not delivered when the gateway
    /// stopped: still queued, or still being tried, when the drain's deadline passed.
    DroppedShutdown,
}

impl Label for HandOffOutcome {
    const ALL: &'static [Self] = &[
        Self::Delivered,
        Self::Failed,
        Self::Busy,
        Self::Refused,
        Self::Invalid,
        Self::DroppedShutdown,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::Delivered => "delivered",
            Self::Failed => "failed",
            Self::Busy => "busy",
            Self::Refused => "refused",
            Self::Invalid => "invalid",
            Self::DroppedShutdown => "dropped_shutdown",
        }
    }
}

/// Why a message was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("no upstream is configured (upstream.webhook_url)")]
    NotConfigured,
    #[error("the upstream queue is full; retry later")]
    Busy,
}

pub struct Upstream {
    /// Present when a webhook is configured.
    queue: Option<Arc<FairQueue>>,
    client: Option<reqwest::Client>,
    config: UpstreamConfig,
}

impl Upstream {
    pub fn new(config: UpstreamConfig, ca_file: Option<&std::path::Path>) -> anyhow::Result<Self> {
        let (queue, client) = match &config.webhook_url {
            Some(_) => (
                Some(Arc::new(FairQueue::new(
                    config.queue,
                    config.queue_per_user,
                ))),
                Some(outbound::client(config.timeout, ca_file)?),
            ),
            None => (None, None),
        };
        Ok(Self {
            queue,
            client,
            config,
        })
    }

    /// Queues a message for the webhook; never waits. `Busy` when the queue, or this user's
    /// share of it, is full.
    pub fn send(&self, message: Outbound, metrics: &Metrics) -> Result<(), Refused> {
        let Some(queue) = &self.queue else {
            count(&metrics.upstream_messages, HandOffOutcome::Refused);
            return Err(Refused::NotConfigured);
        };
        queue.push(message).map_err(|_| {
            count(&metrics.upstream_messages, HandOffOutcome::Busy);
            Refused::Busy
        })
    }

    /// The worker that POSTs queued messages, if a webhook is configured (called once). After
    /// `stop` it drains: the message being tried and then the queued ones are still POSTed, until
    /// the queue is empty or [`DRAIN`] has passed; whatever is left then is counted
    /// `dropped_shutdown` and logged. The queue refuses new messages from `stop` on (`busy`).
    pub fn worker(
        &self,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) -> Option<impl Future<Output = ()> + use<>> {
        let queue = Arc::clone(self.queue.as_ref()?);
        let client = self.client.clone()?;
        let config = self.config.clone();
        Some(async move {
            let poster = Poster {
                client,
                url: config.webhook_url.clone().unwrap_or_default(),
                config,
            };
            // The message being tried when `stop` came, its attempt left running.
            let mut cut = None;
            loop {
                let message = tokio::select! {
                    _ = stop.cancelled() => break,
                    message = queue.pop() => message,
                };
                let mut posting: Posting<'_> = Box::pin(poster.post(message));
                tokio::select! {
                    outcome = &mut posting => count(&metrics.upstream_messages, outcome),
                    _ = stop.cancelled() => {
                        cut = Some(posting);
                        break;
                    }
                }
            }
            drain(&queue, &poster, cut, &metrics).await;
        })
    }
}

/// How long the webhook worker goes on POSTing queued messages after shutdown began.
pub const DRAIN: Duration = Duration::from_secs(1);

/// Shutdown: POSTs what is queued until the queue is empty or [`DRAIN`] has passed, then counts
/// and logs what is left. `cut` is the attempt under way when the drain began.
async fn drain(queue: &FairQueue, poster: &Poster, cut: Option<Posting<'_>>, metrics: &Metrics) {
    let queued = queue.close();
    let deadline = tokio::time::Instant::now() + DRAIN;
    let mut dropped = queued.len();
    let mut left = queued.into_iter();
    let mut next = cut;
    let mut delivered = 0usize;
    loop {
        let posting: Posting<'_> = match next.take() {
            Some(posting) => posting,
            None => match left.next() {
                Some(message) => {
                    dropped -= 1;
                    Box::pin(poster.post(message))
                }
                None => break,
            },
        };
        match tokio::time::timeout_at(deadline, posting).await {
            Ok(outcome) => {
                delivered += usize::from(outcome == HandOffOutcome::Delivered);
                count(&metrics.upstream_messages, outcome);
            }
            Err(_) => {
                dropped += 1;
                break;
            }
        }
    }
    if dropped > 0 {
        metrics
            .upstream_messages
            .with_label_values(&[HandOffOutcome::DroppedShutdown.as_str()])
            .inc_by(dropped as u64);
        tracing::warn!(
            dropped,
            delivered,
            drain = ?DRAIN,
            "Shutdown: HLink messages already acknowledged to their clients were not delivered to the webhook in time and are dropped."
        );
    } else if delivered > 0 {
        tracing::info!(
            delivered,
            "Shutdown: the HLink queue was drained to the webhook."
        );
    }
}

/// One message's delivery, its attempts and retries.
type Posting<'a> = std::pin::Pin<Box<dyn Future<Output = HandOffOutcome> + Send + 'a>>;

/// POSTs one message to the webhook, signed, with retries.
struct Poster {
    client: reqwest::Client,
    url: String,
    config: UpstreamConfig,
}

impl Poster {
    async fn post(&self, message: Outbound) -> HandOffOutcome {
        let config = &self.config;
        // Never an empty body posted for a message the client was told is queued: a failure is
        // ours, counted failed and logged.
        let body = match serde_json::to_string(&message) {
            Ok(body) => body,
            Err(error) => {
                tracing::error!(message_id = %message.message_id, %error, "Cannot serialise an upstream message; not delivered.");
                return HandOffOutcome::Failed;
            }
        };
        let mut backoff = Duration::from_millis(100);
        let mut attempt = 0;
        loop {
            let mut request = self
                .client
                .post(&self.url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.clone());
            // Each attempt signs its own time.
            if let Some(secret) = &config.signing_secret {
                for (name, value) in signature::headers(secret.expose(), &body) {
                    request = request.header(name, value);
                }
            }
            // Errors are printed without the URL: its query or userinfo may hold a secret.
            let error = match request.send().await {
                Ok(answer) if answer.status().is_success() => return HandOffOutcome::Delivered,
                Ok(answer) => format!("answered {}", answer.status()),
                Err(error) => error.without_url().to_string(),
            };
            if attempt >= config.retries {
                tracing::warn!(message_id = %message.message_id, user_id = %message.user_id, %error, attempts = attempt + 1, "Upstream message not delivered to the webhook.");
                return HandOffOutcome::Failed;
            }
            tracing::debug!(message_id = %message.message_id, %error, attempt, "Webhook attempt failed; retrying.");
            tokio::time::sleep(backoff).await;
            backoff *= 2;
            attempt += 1;
        }
    }
}
