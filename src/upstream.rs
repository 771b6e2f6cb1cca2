//! The browser → agent direction: HLink messages a client sends on `/ws` are validated (in
//! `protocol::client`), stamped with the connection's user and connection id, and POSTed to the
//! agent backends' webhook (`upstream.webhook_url`) by one worker, with retries and a bounded
//! queue. The client is answered `websocket_ack` once its message is queued. Without a webhook
//! the messages are refused. This is the embedded broker's hand-off; the Redis broker appends to
//! its `ui_events` stream instead.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::client::Target;
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
}

impl Label for HandOffOutcome {
    const ALL: &'static [Self] = &[
        Self::Delivered,
        Self::Failed,
        Self::Busy,
        Self::Refused,
        Self::Invalid,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::Delivered => "delivered",
            Self::Failed => "failed",
            Self::Busy => "busy",
            Self::Refused => "refused",
            Self::Invalid => "invalid",
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
    sender: Option<mpsc::Sender<Outbound>>,
    /// Taken once by [`Upstream::worker`] when the server starts.
    receiver: Mutex<Option<mpsc::Receiver<Outbound>>>,
    config: UpstreamConfig,
}

impl Upstream {
    pub fn new(config: UpstreamConfig) -> Self {
        let (sender, receiver) = match &config.webhook_url {
            Some(_) => {
                let (sender, receiver) = mpsc::channel(config.queue);
                (Some(sender), Some(receiver))
            }
            None => (None, None),
        };
        Self {
            sender,
            receiver: Mutex::new(receiver),
            config,
        }
    }

    /// Queues a message for the webhook; never waits.
    pub fn send(&self, message: Outbound, metrics: &Metrics) -> Result<(), Refused> {
        let Some(sender) = &self.sender else {
            count(&metrics.upstream_messages, HandOffOutcome::Refused);
            return Err(Refused::NotConfigured);
        };
        sender.try_send(message).map_err(|_| {
            count(&metrics.upstream_messages, HandOffOutcome::Busy);
            Refused::Busy
        })
    }

    /// The worker that POSTs queued messages until `stop`, if a webhook is configured (called
    /// once).
    pub fn worker(
        &self,
        metrics: Arc<Metrics>,
        stop: CancellationToken,
    ) -> Option<impl Future<Output = ()> + use<>> {
        let receiver = self
            .receiver
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()?;
        let target = Target::parse(self.config.webhook_url.as_deref()?).ok()?;
        let config = self.config.clone();
        Some(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = deliver(receiver, target, config, &metrics) => {}
            }
        })
    }
}

async fn deliver(
    mut queue: mpsc::Receiver<Outbound>,
    target: Target,
    config: UpstreamConfig,
    metrics: &Metrics,
) {
    while let Some(message) = queue.recv().await {
        let body = serde_json::to_string(&message).unwrap_or_default();
        let mut backoff = Duration::from_millis(100);
        let mut attempt = 0;
        let outcome = loop {
            let sent = tokio::time::timeout(
                config.timeout,
                target.http("POST", &target.path, Some(body.clone())),
            )
            .await;
            let error = match sent {
                Ok(Ok((status, _))) if (200..300).contains(&status) => {
                    break HandOffOutcome::Delivered;
                }
                Ok(Ok((status, answer))) => format!("answered {status}: {answer}"),
                Ok(Err(error)) => format!("{error:#}"),
                Err(_) => format!("no answer within {} s", config.timeout.as_secs_f64()),
            };
            if attempt >= config.retries {
                tracing::warn!(message_id = %message.message_id, user_id = %message.user_id, %error, attempts = attempt + 1, "Upstream message not delivered to the webhook.");
                break HandOffOutcome::Failed;
            }
            tracing::debug!(message_id = %message.message_id, %error, attempt, "Webhook attempt failed; retrying.");
            tokio::time::sleep(backoff).await;
            backoff *= 2;
            attempt += 1;
        };
        count(&metrics.upstream_messages, outcome);
    }
}
