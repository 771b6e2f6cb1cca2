//! Any stored event as AG-UI: an event that came in as AG-UI is the AG-UI event itself; a native
//! event is translated, one event at a time, without state, so every AG-UI client renders it the
//! same way from any point in the stream.

use serde_json::{Map, Value, json};

use super::PAYLOAD_KEY;

/// The AG-UI events for one native event frame (the JSON `/ws` sends). Empty for a frame that is
/// not an event.
pub fn render(frame: &Value) -> Vec<Value> {
    let text = |value: Option<&Value>| {
        value
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let empty = Map::new();
    let payload = frame
        .get("payload")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    if let Some(agui) = payload.get(PAYLOAD_KEY).filter(|v| v.is_object()) {
        return vec![agui.clone()];
    }
    let run_id = text(frame.get("run_id"));
    let thread_id = text(frame.get("thread_id"));
    let seq = frame.get("seq").and_then(Value::as_u64).unwrap_or_default();
    // A message id of the gateway's own: one per event, so it never collides with another.
    let own_id = |suffix: &str| format!("{run_id}-{seq}-{suffix}");
    let string_of = |value: Option<&Value>| match value {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(text)) => text.clone(),
        Some(other) => other.to_string(),
    };
    let field = |names: &[&str]| names.iter().find_map(|name| payload.get(*name));
    match frame
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or_default()
    {
        "agent_started" => {
            vec![json!({"type": "RUN_STARTED", "threadId": thread_id, "runId": run_id})]
        }
        "agent_thinking" => vec![json!({
            "type": "TEXT_MESSAGE_CHUNK", "messageId": own_id("thinking"), "role": "assistant",
            "delta": string_of(field(&["text", "thought", "content", "message"])),
        })],
        "tool_executing" => {
            let tool_call_id = text(payload.get("tool_call_id"));
            let mut events = vec![json!({
                "type": "TOOL_CALL_START", "toolCallId": tool_call_id,
                "toolCallName": string_of(field(&["tool_name", "name"])),
            })];
            if let Some(args) = field(&["input", "args", "arguments"]) {
                events.push(json!({"type": "TOOL_CALL_ARGS", "toolCallId": tool_call_id, "delta": string_of(Some(args))}));
            }
            events.push(json!({"type": "TOOL_CALL_END", "toolCallId": tool_call_id}));
            events
        }
        "tool_completed" => vec![json!({
            "type": "TOOL_CALL_RESULT", "messageId": own_id("result"), "role": "tool",
            "toolCallId": text(payload.get("tool_call_id")),
            "content": string_of(field(&["output", "result", "content"])),
        })],
        "agent_completed" => {
            let mut finished =
                json!({"type": "RUN_FINISHED", "threadId": thread_id, "runId": run_id});
            if let Some(result) = field(&["result", "output"]).filter(|v| !v.is_null()) {
                finished["result"] = result.clone();
            }
            vec![finished]
        }
        "agent_error" => {
            let mut error =
                json!({"type": "RUN_ERROR", "message": string_of(field(&["message", "error"]))});
            if let Some(code) = field(&["code", "reason"]).and_then(Value::as_str) {
                error["code"] = code.into();
            }
            vec![error]
        }
        "custom" => vec![json!({
            "type": "CUSTOM", "name": text(payload.get("name")), "value": Value::Object(payload.clone()),
        })],
        _ => Vec::new(),
    }
}
