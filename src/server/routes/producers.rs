//! The producers' door: `POST /v1/events` (one event, a JSON array or NDJSON, answered per item)
//! and `POST /v1/runs` (a run's registration, which releases its held events).

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use serde_json::{Value, json};

use super::body::{self, BodyRefusal};
use super::{
    Body, broker_error, broker_unavailable, error, json_response, json_written, media_type_is,
    unsupported_media_type,
};
use crate::Gateway;
use crate::ingest::{self, ItemResult};
use crate::metrics::count;
use crate::protocol::channel::check_id;
use crate::protocol::json::{JsonError, write_str};
use crate::protocol::run::RunTarget;

/// `producer` is the id of the key that posted (its `event_id`s are its own).
pub(super) async fn events(
    gateway: &Gateway,
    request: Request<Incoming>,
    producer: Option<&Arc<str>>,
) -> Response<Body> {
    if !gateway.broker.is_up() {
        return broker_unavailable(gateway, "Redis is unavailable; nothing was accepted");
    }
    let ndjson = if media_type_is(&request, "application/json") {
        false
    } else if media_type_is(&request, "application/x-ndjson") {
        true
    } else {
        count(&gateway.metrics.events_rejected, BodyRefusal::MediaType);
        return unsupported_media_type("application/json or application/x-ndjson");
    };
    let held = match body::read(
        gateway,
        request,
        gateway.config.ingest.max_request_bytes,
        "ingest.max_request_bytes",
    )
    .await
    {
        Ok(held) => held,
        Err(refused) => {
            count(&gateway.metrics.events_rejected, refused.reason);
            return refused.response;
        }
    };
    let body = &held.bytes;
    let invalid_body = |e: ingest::BodyError| {
        count(&gateway.metrics.events_rejected, BodyRefusal::InvalidBody);
        error(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            &e.to_string(),
            None,
        )
    };
    let items = match ingest::split(body, ndjson) {
        Ok(items) => items,
        Err(e) => return invalid_body(e),
    };
    let len = items.count();
    if len > gateway.config.ingest.max_items {
        count(&gateway.metrics.events_rejected, BodyRefusal::TooManyItems);
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_items",
            &format!(
                "{len} events in one request; ingest.max_items is {}",
                gateway.config.ingest.max_items
            ),
            None,
        );
    }
    let results = match ingest::ingest(gateway, items, producer).await {
        Ok(results) => results,
        Err(e) => return invalid_body(e),
    };
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let count = |f: fn(&ItemResult) -> bool| results.iter().filter(|r| f(r)).count();
    let summary = Summary {
        accepted: count(|r| matches!(r, ItemResult::Accepted { .. })),
        pending_resolution: count(|r| matches!(r, ItemResult::PendingResolution)),
        duplicate: count(|r| matches!(r, ItemResult::Duplicate)),
        failed: results.len() - ok,
        results: &results,
    };
    let unavailable = results
        .iter()
        .any(|r| matches!(r, ItemResult::Unavailable { .. }));
    let internal = results
        .iter()
        .any(|r| matches!(r, ItemResult::Internal { .. }));
    // Retryable items first: a producer that retries sends the internal ones again too, and
    // their `event_id`s make the accepted ones duplicates.
    let status = match ok {
        _ if unavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ if internal => StatusCode::INTERNAL_SERVER_ERROR,
        n if n == len => StatusCode::OK,
        0 => StatusCode::BAD_REQUEST,
        _ => StatusCode::MULTI_STATUS,
    };
    let mut answer = Vec::with_capacity(256);
    let mut response = json_written(status, summary.write(&mut answer).map(|()| answer));
    if unavailable {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

/// The answer to `POST /v1/events`, written straight from the results.
struct Summary<'a> {
    accepted: usize,
    pending_resolution: usize,
    duplicate: usize,
    failed: usize,
    results: &'a [ItemResult],
}

impl Summary<'_> {
    /// The answer's JSON: `{"accepted":…,"pending_resolution":…,"duplicate":…,"failed":…,
    /// "results":[…]}`. An accepted item, nearly every one, is written here field by field (its
    /// strings by `json::write_str`); the others by their `Serialize`, the same text (unit test).
    /// Serde's internally tagged enum cost as much as the rest of a one-event answer.
    fn write(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        let mut number = itoa::Buffer::new();
        for (key, n) in [
            (&b"{\"accepted\":"[..], self.accepted),
            (b",\"pending_resolution\":", self.pending_resolution),
            (b",\"duplicate\":", self.duplicate),
            (b",\"failed\":", self.failed),
        ] {
            out.extend_from_slice(key);
            out.extend_from_slice(number.format(n).as_bytes());
        }
        out.extend_from_slice(b",\"results\":[");
        for (i, result) in self.results.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            match result {
                ItemResult::Accepted {
                    channel,
                    seq,
                    epoch,
                } => {
                    out.extend_from_slice(b"{\"status\":\"accepted\",\"channel\":");
                    write_str(out, channel.as_str());
                    out.extend_from_slice(b",\"seq\":");
                    out.extend_from_slice(number.format(*seq).as_bytes());
                    out.extend_from_slice(b",\"epoch\":");
                    write_str(out, epoch);
                    out.push(b'}');
                }
                other => serde_json::to_writer(&mut *out, other)?,
            }
        }
        out.extend_from_slice(b"]}");
        Ok(())
    }
}

pub(super) async fn runs(gateway: &Gateway, request: Request<Incoming>) -> Response<Body> {
    if !media_type_is(&request, "application/json") {
        return unsupported_media_type("application/json");
    }
    let held = match body::read(
        gateway,
        request,
        gateway.config.ingest.max_event_bytes,
        "ingest.max_event_bytes",
    )
    .await
    {
        Ok(held) => held,
        Err(refused) => return refused.response,
    };
    let body = &held.bytes;
    let parsed = crate::protocol::json::parse_slice(body);
    if let Err(JsonError::DuplicateKey(key)) = &parsed {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            &format!("the key `{key}` appears twice in one object"),
            Some(key),
        );
    }
    let Ok(Value::Object(fields)) = parsed else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            "the body must be a JSON object {run_id, thread_id, user_id}",
            None,
        );
    };
    let mut ids = [("run_id", None), ("thread_id", None), ("user_id", None)];
    for (name, slot) in ids.iter_mut() {
        match fields.get(*name) {
            None | Some(Value::Null) => {}
            Some(Value::String(id)) => {
                if let Err(reason) = check_id(id) {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "invalid_field",
                        &format!("`{name}` {reason}"),
                        Some(name),
                    );
                }
                *slot = Some(id.clone());
            }
            Some(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_field",
                    &format!("`{name}` must be a string"),
                    Some(name),
                );
            }
        }
    }
    let [(_, run_id), (_, thread_id), (_, user_id)] = ids;
    let Some(run_id) = run_id else {
        return error(
            StatusCode::BAD_REQUEST,
            "missing_field",
            "`run_id` is required",
            Some("run_id"),
        );
    };
    let target = RunTarget { thread_id, user_id };
    let Some(channel) = target.channel() else {
        return error(
            StatusCode::BAD_REQUEST,
            "missing_field",
            "`thread_id` or `user_id` is required",
            Some("thread_id"),
        );
    };
    let released = match ingest::register(gateway, &run_id, target).await {
        Ok(released) => released,
        Err(ingest::RegisterError::Full) => {
            let mut response = error(
                StatusCode::SERVICE_UNAVAILABLE,
                "registry_full",
                "the run registry is full (resolve.registry_capacity); retry later",
                None,
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return response;
        }
        Err(ingest::RegisterError::Conflict) => {
            return error(
                StatusCode::CONFLICT,
                "run_conflict",
                "this run is registered to another thread or user; use a new run_id",
                Some("run_id"),
            );
        }
        // By whose fault: 503 (Redis away, retry) or 500 `internal` (ours, logged at ERROR).
        Err(ingest::RegisterError::Broker(e)) => return broker_error(gateway, &e),
    };
    json_response(
        StatusCode::OK,
        &json!({"run_id": run_id, "channel": channel.as_str(), "released": released}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ChannelName;

    #[test]
    fn the_written_answer_is_what_serde_writes() {
        let results = [
            ItemResult::Accepted {
                channel: ChannelName::thread("t_1"),
                seq: 18_446_744_073_709_551_615,
                epoch: "e\"\\\u{1}é".into(),
            },
            ItemResult::Duplicate,
            ItemResult::PendingResolution,
            ItemResult::Unavailable {
                reason: "Redis is away".into(),
            },
        ];
        let summary = Summary {
            accepted: 1,
            pending_resolution: 1,
            duplicate: 1,
            failed: 1,
            results: &results,
        };
        let mut written = Vec::new();
        summary.write(&mut written).unwrap();
        let items: Vec<String> = results
            .iter()
            .map(|r| serde_json::to_string(r).unwrap())
            .collect();
        let expected = format!(
            r#"{{"accepted":1,"pending_resolution":1,"duplicate":1,"failed":1,"results":[{}]}}"#,
            items.join(",")
        );
        assert_eq!(String::from_utf8(written).unwrap(), expected);
    }
}
