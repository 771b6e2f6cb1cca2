//! `RunAgentInput`, what AG-UI's `HttpAgent` POSTs to start a run: `threadId`, `runId` and
//! `messages` required; `state`, `tools`, `context`, `forwardedProps` optional (and `parentRunId`).
//! Checked for shape only: the agent reads the rest. The ids follow the gateway's id rules, since
//! the thread names a channel and the run is followed by the watchdog.

use serde_json::Value;

use crate::protocol::channel::check_id;
use crate::protocol::event::{Refusal, RefusalCode};
use crate::protocol::json::JsonError;

/// A valid input's run and thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAgentInput {
    pub thread_id: String,
    pub run_id: String,
}

impl RunAgentInput {
    /// Checks a body; the refusal names the field.
    pub fn check(body: &[u8]) -> Result<Self, Refusal> {
        let refusal = |code, field: Option<&str>, reason: String| Refusal {
            code,
            field: field.map(str::to_string),
            reason,
        };
        let value = crate::protocol::json::parse_slice(body).map_err(|error| {
            let field = match &error {
                JsonError::DuplicateKey(key) => Some(key.as_str()),
                JsonError::Invalid(_) => None,
            };
            refusal(RefusalCode::InvalidJson, field, error.to_string())
        })?;
        let Value::Object(fields) = value else {
            return Err(refusal(
                RefusalCode::InvalidJson,
                None,
                "a RunAgentInput is a JSON object".into(),
            ));
        };
        let id = |name: &str| match fields.get(name) {
            Some(Value::String(id)) => check_id(id)
                .map(|()| id.clone())
                .map_err(|e| refusal(RefusalCode::InvalidField, Some(name), e.to_string())),
            Some(_) => Err(refusal(
                RefusalCode::InvalidField,
                Some(name),
                "must be a string".into(),
            )),
            None => Err(refusal(
                RefusalCode::MissingField,
                Some(name),
                "required".into(),
            )),
        };
        let thread_id = id("threadId")?;
        let run_id = id("runId")?;
        if fields.contains_key("parentRunId") {
            id("parentRunId")?;
        }
        match fields.get("messages") {
            Some(Value::Array(messages)) => {
                if let Some(at) = messages.iter().position(|m| !m.is_object()) {
                    return Err(refusal(
                        RefusalCode::InvalidField,
                        Some(&format!("messages.{at}")),
                        "a message is an object".into(),
                    ));
                }
            }
            Some(_) => {
                return Err(refusal(
                    RefusalCode::InvalidField,
                    Some("messages"),
                    "must be an array".into(),
                ));
            }
            None => {
                return Err(refusal(
                    RefusalCode::MissingField,
                    Some("messages"),
                    "required".into(),
                ));
            }
        }
        for name in ["tools", "context"] {
            match fields.get(name) {
                None | Some(Value::Array(_)) => {}
                Some(_) => {
                    return Err(refusal(
                        RefusalCode::InvalidField,
                        Some(name),
                        "must be an array".into(),
                    ));
                }
            }
        }
        Ok(Self { thread_id, run_id })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(body: &str) -> (Option<String>, RefusalCode) {
        let refusal = RunAgentInput::check(body.as_bytes()).unwrap_err();
        (refusal.field, refusal.code)
    }

    #[test]
    fn inputs_are_checked_field_by_field() {
        let ok = RunAgentInput::check(
            br#"{"threadId":"t1","runId":"r1","messages":[],"state":{},"tools":[],"context":[],"forwardedProps":{}}"#,
        )
        .unwrap();
        assert_eq!((ok.thread_id.as_str(), ok.run_id.as_str()), ("t1", "r1"));
        use RefusalCode::*;
        assert_eq!(
            field(r#"{"runId":"r","messages":[]}"#),
            (Some("threadId".into()), MissingField)
        );
        assert_eq!(
            field(r#"{"threadId":"t","runId":5,"messages":[]}"#),
            (Some("runId".into()), InvalidField)
        );
        assert_eq!(
            field(r#"{"threadId":"t","runId":"r"}"#),
            (Some("messages".into()), MissingField)
        );
        assert_eq!(
            field(r#"{"threadId":"t","runId":"r","messages":[1]}"#),
            (Some("messages.0".into()), InvalidField)
        );
        assert_eq!(
            field(r#"{"threadId":"t","runId":"r","messages":[],"tools":{}}"#),
            (Some("tools".into()), InvalidField)
        );
        assert_eq!(
            field(r#"{"threadId":"a b","runId":"r","messages":[]}"#),
            (Some("threadId".into()), InvalidField)
        );
        assert_eq!(
            field(r#"{"threadId":"t","threadId":"u","runId":"r","messages":[]}"#),
            (Some("threadId".into()), InvalidJson)
        );
        assert_eq!(field("[]"), (None, InvalidJson));
    }
}
