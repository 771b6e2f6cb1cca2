//! The session's answers to a client's messages: hello, the frames after it (subscribe,
//! unsubscribe, ack, ping, HLink), the error frame, and leaving every channel at the end.

use tokio::time::Instant;

use super::ended::Ended;
use super::message::Message;
use super::{Session, TokenClock};
use crate::auth::{Identity, Refusal, ThreadAccess};
use crate::broker::{HandOff, HandOffError};
use crate::fanout::Outgoing;
use crate::metrics::{Label, count};
use crate::protocol::client::{self, ClientFrame, Since, UpstreamMessage};
use crate::protocol::server::{self, ErrorCode, Format, close};
use crate::protocol::upstream::Outbound;
use crate::protocol::{ChannelName, excerpt};
use crate::upstream::{HandOffOutcome, Refused};

/// Whether a resume found everything the client missed, counted in
/// `agentwire_resumes_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    Recovered,
    NotRecovered,
}

impl Label for Resume {
    const ALL: &'static [Self] = &[Self::Recovered, Self::NotRecovered];

    fn as_str(self) -> &'static str {
        match self {
            Self::Recovered => "recovered",
            Self::NotRecovered => "not_recovered",
        }
    }
}

impl Session {
    /// Answers one message; `Some` when the connection ends.
    pub(super) async fn handle(&mut self, message: Message) -> Option<Ended> {
        match message {
            Message::Text(text) if self.user_id.is_some() => self.frame(&text).await,
            Message::Text(text) => match client::decode(&text) {
                Ok(ClientFrame::Hello {
                    user_id,
                    token,
                    since,
                    format,
                }) => {
                    self.format = format;
                    return self.hello(user_id, token, since).await;
                }
                _ => {
                    self.error(
                        ErrorCode::HelloRequired,
                        "the first frame must be {\"type\":\"hello\",\"user_id\":…}",
                    );
                    return Some(self.close(
                        close::HELLO_MISSING,
                        "hello_required",
                        Ended::HelloMissing,
                    ));
                }
            },
            Message::Binary if self.user_id.is_some() => self.error(
                ErrorCode::BinaryNotSupported,
                "frames are JSON text; binary frames are not read",
            ),
            Message::Binary => {
                self.error(
                    ErrorCode::HelloRequired,
                    "the first frame must be a text hello frame",
                );
                return Some(self.close(
                    close::HELLO_MISSING,
                    "hello_required",
                    Ended::HelloMissing,
                ));
            }
            Message::Ping(payload) => {
                self.outbox.push(Outgoing::Pong(payload));
            }
            Message::Pong => {}
            Message::Close(code) => {
                // The browser discards anything after its close: nothing more is written or counted.
                self.outbox.close();
                self.replay.clear();
                return Some(self.close(code, "", Ended::ClientClosed));
            }
        }
        None
    }

    /// Accepts `hello`: with browser authentication the token names the user; without it the
    /// user is who the client says. `Some` when the connection ends instead.
    pub(super) async fn hello(
        &mut self,
        claimed: Option<String>,
        token: Option<String>,
        since: Option<Since>,
    ) -> Option<Ended> {
        let token = token.or_else(|| self.bearer.take());
        let user_id = match (&self.gateway.verifier, token, claimed) {
            (Some(verifier), Some(token), claimed) => {
                match verifier.connection(&token, claimed.as_deref()).await {
                    Ok(identity) => {
                        let user_id = identity.user_id.clone();
                        self.trust(identity);
                        user_id
                    }
                    Err(refusal) => return Some(self.unauthorized(refusal)),
                }
            }
            (Some(_), None, _) => return Some(self.unauthorized(Refusal::Missing)),
            (None, _, Some(claimed)) => claimed,
            (None, _, None) => {
                self.error(ErrorCode::HelloRequired, "hello needs a user_id");
                return Some(self.close(
                    close::HELLO_MISSING,
                    "hello_required",
                    Ended::HelloMissing,
                ));
            }
        };
        let user_id = user_id.as_str();
        self.user_id = Some(user_id.to_string());
        let heartbeat_ms = self.gateway.config.session.heartbeat.as_millis() as u64;
        self.outbox.push(Outgoing::Frame(server::welcome(
            &self.connection_id.to_string(),
            user_id,
            heartbeat_ms,
        )));
        tracing::debug!(user_id, "Hello.");
        self.join(ChannelName::user(user_id), since).await;
        None
    }

    /// Takes a verified identity: its threads and its expiry (the session holds the user id
    /// itself, so the identity's copy is let go).
    fn trust(&mut self, mut identity: Identity) {
        identity.user_id = String::new();
        let leeway = self.gateway.config.auth.jwt_leeway;
        self.token_clock = Some(TokenClock::new(identity.expires, leeway));
        self.identity = Some(Box::new(identity));
    }

    /// A new token for the same user before the current one expires: the connection goes on,
    /// with the new token's threads and expiry. A refused one changes nothing.
    async fn refresh(&mut self, token: &str) {
        let Some(verifier) = &self.gateway.verifier else {
            return self.error(
                ErrorCode::InvalidFrame,
                "this gateway does not authenticate browsers",
            );
        };
        match verifier.connection(token, self.user_id.as_deref()).await {
            Ok(identity) => {
                self.trust(identity);
                let left = self.token_clock.as_ref().map_or(0, |c| {
                    c.expires_at
                        .saturating_duration_since(Instant::now())
                        .as_millis() as u64
                });
                self.outbox.push(Outgoing::Frame(server::refreshed(left)));
            }
            Err(refusal) => {
                count(&self.gateway.metrics.auth_refused, refusal);
                self.error(ErrorCode::Unauthorized, refusal.message());
            }
        }
    }

    /// Refuses `hello`: counted, told, closed with 4003.
    fn unauthorized(&mut self, refusal: Refusal) -> Ended {
        count(&self.gateway.metrics.auth_refused, refusal);
        self.error(ErrorCode::Unauthorized, refusal.message());
        self.close(close::UNAUTHORIZED, "unauthorized", Ended::Unauthorized)
    }

    /// Whether this connection may read `thread_id`: always without browser authentication;
    /// with it, as [`ThreadAccess::may_read`] decides for this connection's identity.
    async fn may_read(&self, thread_id: &str, token: Option<&str>) -> Result<(), Refusal> {
        let Some(verifier) = &self.gateway.verifier else {
            return Ok(());
        };
        let access = ThreadAccess {
            verifier,
            webhook: self.gateway.subscribe_webhook.as_ref(),
            metrics: &self.gateway.metrics,
        };
        let user_id = self.user_id.as_deref().unwrap_or_default();
        access
            .may_read(self.identity.as_deref(), user_id, thread_id, token)
            .await
    }

    pub(super) async fn frame(&mut self, text: &str) {
        match client::decode(text) {
            Ok(ClientFrame::Hello { .. }) => self.error(
                ErrorCode::AlreadyHello,
                "hello was already accepted on this connection",
            ),
            Ok(ClientFrame::Subscribe {
                thread_id,
                since,
                token,
            }) => {
                let thread_count = self.channels.len().saturating_sub(1);
                if thread_count >= self.gateway.config.session.max_subscriptions {
                    return self.error(
                        ErrorCode::TooManySubscriptions,
                        "session.max_subscriptions reached",
                    );
                }
                // Refused before the broker is asked: no channel state is made anywhere.
                if let Err(refusal) = self.may_read(&thread_id, token.as_deref()).await {
                    count(&self.gateway.metrics.auth_refused, refusal);
                    return self.error(ErrorCode::Forbidden, refusal.message());
                }
                self.join(ChannelName::thread(&thread_id), since).await;
            }
            Ok(ClientFrame::Unsubscribe { thread_id }) => {
                let channel = ChannelName::thread(&thread_id);
                if self
                    .gateway
                    .broker
                    .unsubscribe(&channel, &self.outbox)
                    .await
                {
                    self.channels.retain(|c| c != &channel);
                    self.gateway.metrics.subscriptions.dec();
                    self.outbox
                        .push(Outgoing::Frame(server::unsubscribed(&thread_id)));
                } else {
                    self.error(
                        ErrorCode::NotSubscribed,
                        &format!("not subscribed to {}", excerpt(channel.as_str())),
                    );
                }
            }
            Ok(ClientFrame::Ack { channel, seq }) => {
                if let Err(error) =
                    self.gateway
                        .broker
                        .ack(&channel, seq, &self.outbox, &self.gateway.metrics)
                {
                    self.error(ErrorCode::InvalidAck, &error.to_string());
                }
            }
            Ok(ClientFrame::Refresh { token }) => self.refresh(&token).await,
            Ok(ClientFrame::Ping) => {
                self.outbox.push(Outgoing::Frame(server::pong()));
            }
            Ok(ClientFrame::Upstream(message)) => self.upstream(*message).await,
            Err(error) => {
                if client::is_upstream_frame(text) {
                    count(
                        &self.gateway.metrics.upstream_messages,
                        HandOffOutcome::Invalid,
                    );
                }
                self.error(error.code, &error.message)
            }
        }
    }

    /// Passes an HLink message to the agent backends (the broker decides where: the webhook
    /// queue, or the `ui_events` stream whose entry id the ack carries); the client gets
    /// `websocket_ack` or an error.
    pub(super) async fn upstream(&mut self, message: UpstreamMessage) {
        let client_id = message.id.clone();
        let user_id = self.user_id.clone().unwrap_or_default();
        let outbound = Outbound::new(message, &user_id, &self.connection_id.to_string());
        let message_id = outbound.message_id.clone();
        match self
            .gateway
            .broker
            .hand_off(outbound, &self.gateway.metrics)
            .await
        {
            Ok(handed) => {
                let entry_id = match &handed {
                    HandOff::Queued => None,
                    HandOff::Appended(entry_id) => Some(entry_id.as_str()),
                };
                self.outbox.push(Outgoing::Frame(server::websocket_ack(
                    &message_id,
                    client_id.as_deref(),
                    entry_id,
                )));
            }
            Err(HandOffError::Refused(Refused::NotConfigured)) => self.error(
                ErrorCode::UpstreamNotConfigured,
                "HLink messages need an upstream (upstream.webhook_url); none is configured",
            ),
            Err(HandOffError::Refused(Refused::Busy)) => {
                self.error(ErrorCode::UpstreamBusy, &Refused::Busy.to_string())
            }
            Err(HandOffError::Broker(error)) => {
                self.error(ErrorCode::BrokerUnavailable, &error.to_string())
            }
        }
    }

    pub(super) async fn join(&mut self, channel: ChannelName, since: Option<Since>) {
        match self
            .gateway
            .broker
            .subscribe(
                &channel,
                since.as_ref(),
                &self.outbox,
                self.format == Format::AgUi,
            )
            .await
        {
            Err(error) => self.error(
                ErrorCode::BrokerUnavailable,
                &format!("cannot subscribe to {}: {error}", excerpt(channel.as_str())),
            ),
            Ok(Some(report)) => {
                self.gateway.metrics.subscriptions.inc();
                if since.is_some() {
                    let outcome = if report.recovered {
                        Resume::Recovered
                    } else {
                        Resume::NotRecovered
                    };
                    count(&self.gateway.metrics.resumes, outcome);
                    tracing::debug!(%channel, outcome = outcome.as_str(), replayed = report.replayed, missed = report.missed, "Resumed.");
                }
                self.channels.push(channel);
            }
            Ok(None) => self.error(
                ErrorCode::AlreadySubscribed,
                &format!("already subscribed to {}", excerpt(channel.as_str())),
            ),
        }
    }

    /// The one place an error frame is sent and counted.
    pub(super) fn error(&self, code: ErrorCode, message: &str) {
        self.gateway
            .metrics
            .client_errors
            .with_label_values(&[code.as_str()])
            .inc();
        tracing::debug!(code = code.as_str(), message, "Sent an error frame.");
        self.outbox
            .push(Outgoing::Frame(server::error(code, message)));
    }

    pub(super) async fn leave_all(&mut self) {
        for channel in std::mem::take(&mut self.channels) {
            if self
                .gateway
                .broker
                .unsubscribe(&channel, &self.outbox)
                .await
            {
                self.gateway.metrics.subscriptions.dec();
            }
        }
    }
}
