//! What the agent backends receive for an HLink message (the webhook body, or the `message` field
//! of a `ui_events` entry): the client's message stamped with its connection's user and id.

use std::time::SystemTime;

use serde::Serialize;
use serde_json::{Map, Value};

use super::client::{Recipient, Sender, UpstreamMessage};

/// What the webhook receives.
#[derive(Debug, Serialize)]
pub struct Outbound {
    pub message_id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_message_id: Option<String>,
    pub user_id: String,
    pub connection_id: String,
    pub sender: Sender,
    pub recipient: Recipient,
    pub payload: Map<String, Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Map<String, Value>>,
    pub received_at: String,
}

impl Outbound {
    pub fn new(message: UpstreamMessage, user_id: &str, connection_id: &str) -> Self {
        Self {
            message_id: format!("{:016x}", rand::random::<u64>()),
            kind: message.kind,
            client_message_id: message.id,
            user_id: user_id.to_string(),
            connection_id: connection_id.to_string(),
            sender: message.sender,
            recipient: message.recipient,
            payload: message.payload,
            timestamp: message.timestamp,
            metadata: message.metadata,
            received_at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        }
    }
}
