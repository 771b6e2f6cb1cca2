//! HLink in Redis mode: a client's message is appended to the `ui_events` stream, where the agent
//! backends read it.

use super::RedisBroker;
use crate::broker::{BrokerError, HandOff, HandOffError};
use crate::metrics::{Metrics, count};
use crate::upstream::HandOffOutcome;

impl RedisBroker {
    /// Appends an HLink message to the `ui_events` stream, under a new entry id.
    pub async fn append_ui_event(
        &self,
        message: &crate::protocol::upstream::Outbound,
        metrics: &Metrics,
    ) -> Result<HandOff, HandOffError> {
        let appended = self.xadd_ui_event(message).await;
        let outcome = if appended.is_ok() {
            HandOffOutcome::Delivered
        } else {
            HandOffOutcome::Failed
        };
        count(&metrics.upstream_messages, outcome);
        Ok(HandOff::Appended(appended?))
    }

    pub(super) async fn xadd_ui_event(
        &self,
        message: &crate::protocol::upstream::Outbound,
    ) -> Result<String, BrokerError> {
        // Never an empty message answered `websocket_ack`: a failure is ours, and the client is
        // told its message was not taken.
        let json = serde_json::to_string(message).map_err(|e| {
            BrokerError::Internal(format!("cannot serialise an HLink message: {e}"))
        })?;
        let id: String = redis::cmd("XADD")
            .arg(&self.config.ui_events_stream)
            .arg("MAXLEN")
            .arg("~")
            .arg(self.config.ui_events_max_len)
            .arg("*")
            .arg("type")
            .arg(message.kind)
            .arg("user_id")
            .arg(&message.user_id)
            .arg("connection_id")
            .arg(&message.connection_id)
            .arg("message")
            .arg(json)
            .query_async(&mut self.conn())
            .await?;
        Ok(id)
    }
}
