//! The HTTP surface: `/ws`, `/v1/events`, `/v1/runs`, `/v1/channels/{channel}`, `/healthz`,
//! `/readyz`, `/metrics`. Every error is JSON: `{"error": code, "message": …, "field": …}`.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpStream;

use crate::Gateway;
use crate::broker::BrokerError;
use crate::ingest::{self, ItemResult};
use crate::protocol::ChannelName;
use crate::protocol::channel::check_id;
use crate::protocol::run::RunTarget;

type Body = Full<Bytes>;

pub async fn handle(
    gateway: Arc<Gateway>,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = request.uri().path().to_string();
    let method = request.method().clone();
    let response = match (path.as_str(), &method) {
        ("/ws", &Method::GET) => upgrade(gateway, request),
        ("/v1/events", &Method::POST) => events(&gateway, request).await,
        ("/v1/runs", &Method::POST) => runs(&gateway, request).await,
        (p, &Method::GET) if p.starts_with("/v1/runs/") => run(&gateway, &p["/v1/runs/".len()..]),
        ("/v1/deadletter", &Method::GET) => dead_letters(&gateway).await,
        ("/v1/deadletter/redrive", &Method::POST) => {
            use ingest::RedriveOutcome;
            let results = match ingest::redrive(&gateway).await {
                Ok(results) => results,
                Err(e) => return Ok(broker_error(&gateway, &e)),
            };
            let count =
                |f: fn(&RedriveOutcome) -> bool| results.iter().filter(|r| f(&r.outcome)).count();
            let summary = json!({
                "delivered": count(|o| matches!(o, RedriveOutcome::Delivered { .. })),
                "duplicate": count(|o| matches!(o, RedriveOutcome::Duplicate)),
                "unresolved": count(|o| matches!(o, RedriveOutcome::Unresolved)),
                "results": results,
            });
            json_response(StatusCode::OK, &summary)
        }
        ("/v1/ledger", &Method::GET) => ledger(&gateway, request.uri().query()).await,
        (p, &Method::GET) if p.starts_with("/v1/channels/") => {
            channel(&gateway, &p["/v1/channels/".len()..]).await
        }
        ("/healthz", &Method::GET) => json_response(StatusCode::OK, &json!({"status": "ok"})),
        ("/readyz", &Method::GET) => ready(&gateway),
        ("/metrics", &Method::GET) => metrics(&gateway),
        _ => not_routed(&path, &method),
    };
    Ok(response)
}

fn not_routed(path: &str, method: &Method) -> Response<Body> {
    let allow = match path {
        "/ws" | "/healthz" | "/readyz" | "/metrics" => Some("GET"),
        "/v1/events" | "/v1/runs" | "/v1/deadletter/redrive" => Some("POST"),
        "/v1/deadletter" | "/v1/ledger" => Some("GET"),
        p if p.starts_with("/v1/channels/") || p.starts_with("/v1/runs/") => Some("GET"),
        _ => None,
    };
    match allow {
        Some(allow) => {
            let mut response = error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                &format!("{method} is not allowed on {path}; use {allow}"),
                None,
            );
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
            response
        }
        None => error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("no route for {path}"),
            None,
        ),
    }
}

fn upgrade(gateway: Arc<Gateway>, mut request: Request<Incoming>) -> Response<Body> {
    if gateway.shutdown.is_draining() {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "this replica is shutting down; connect to another",
            None,
        );
    }
    if !fastwebsockets::upgrade::is_upgrade_request(&request) {
        return error(
            StatusCode::BAD_REQUEST,
            "upgrade_required",
            "/ws expects a WebSocket upgrade",
            None,
        );
    }
    let (response, upgraded) = match fastwebsockets::upgrade::upgrade(&mut request) {
        Ok(pair) => pair,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_upgrade", &e.to_string(), None),
    };
    let tracker = gateway.shutdown.tracker.clone();
    tracker.spawn(async move {
        let ws = match upgraded.await {
            Ok(ws) => ws,
            Err(error) => return tracing::debug!(%error, "WebSocket upgrade did not complete."),
        };
        // Take the TCP stream back from hyper: its upgraded wrapper keeps a read buffer per socket.
        match ws
            .into_inner()
            .into_inner()
            .downcast::<TokioIo<TcpStream>>()
        {
            Ok(parts) => {
                let connection_id = format!("{:016x}", rand::random::<u64>());
                crate::session::serve(
                    gateway,
                    parts.io.into_inner(),
                    parts.read_buf,
                    connection_id,
                )
                .await;
            }
            Err(_) => tracing::error!("An upgraded connection is not a TCP stream; closing it."),
        }
    });
    let (parts, _) = response.into_parts();
    Response::from_parts(parts, Body::default())
}

/// Why a body was not read.
enum BodyRefused {
    TooLarge(Response<Body>),
    Unreadable(Response<Body>),
}

impl BodyRefused {
    fn response(self) -> Response<Body> {
        match self {
            Self::TooLarge(response) | Self::Unreadable(response) => response,
        }
    }
}

/// A client has this long to send a request body.
const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Reads a body within `limit` bytes (the limit named by `key` in the error).
async fn read_body(
    request: Request<Incoming>,
    limit: usize,
    key: &str,
) -> Result<Bytes, BodyRefused> {
    let too_large = || {
        BodyRefused::TooLarge(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            &format!("the body exceeds {key} ({limit} bytes)"),
            None,
        ))
    };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|length| length > limit) {
        return Err(too_large());
    }
    let unreadable = |reason: String| {
        BodyRefused::Unreadable(error(StatusCode::BAD_REQUEST, "bad_body", &reason, None))
    };
    match tokio::time::timeout(
        BODY_TIMEOUT,
        Limited::new(request.into_body(), limit).collect(),
    )
    .await
    {
        Err(_) => Err(unreadable(format!(
            "the body did not arrive within {} s",
            BODY_TIMEOUT.as_secs()
        ))),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(e)) => Err(unreadable(format!("cannot read the body: {e}"))),
    }
}

/// 503 with `Retry-After` while the broker cannot keep what it would accept.
/// A broker error, by whose fault: Redis unavailable (503, retry) or ours (500).
fn broker_error(gateway: &Gateway, failure: &BrokerError) -> Response<Body> {
    match failure {
        BrokerError::Unavailable(_) => broker_unavailable(gateway, &failure.to_string()),
        BrokerError::Internal(_) => {
            gateway.metrics.broker_errors.inc();
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                &failure.to_string(),
                None,
            )
        }
    }
}

fn broker_unavailable(gateway: &Gateway, message: &str) -> Response<Body> {
    gateway.metrics.broker_errors.inc();
    let mut response = error(
        StatusCode::SERVICE_UNAVAILABLE,
        "broker_unavailable",
        message,
        None,
    );
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

async fn events(gateway: &Gateway, request: Request<Incoming>) -> Response<Body> {
    if !gateway.broker.is_up() {
        return broker_unavailable(gateway, "Redis is unavailable; nothing was accepted");
    }
    let ndjson = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.starts_with("application/x-ndjson") || v.starts_with("application/jsonl")
        });
    let body = match read_body(
        request,
        gateway.config.ingest.max_request_bytes,
        "ingest.max_request_bytes",
    )
    .await
    {
        Ok(body) => body,
        Err(refused) => {
            let reason = match refused {
                BodyRefused::TooLarge(_) => "too_large_body",
                BodyRefused::Unreadable(_) => "invalid_body",
            };
            gateway
                .metrics
                .events_rejected
                .with_label_values(&[reason])
                .inc();
            return refused.response();
        }
    };
    let items = match ingest::split(&body, ndjson) {
        Ok(items) => items,
        Err(e) => {
            gateway
                .metrics
                .events_rejected
                .with_label_values(&["invalid_body"])
                .inc();
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                &e.to_string(),
                None,
            );
        }
    };
    if items.len() > gateway.config.ingest.max_items {
        gateway
            .metrics
            .events_rejected
            .with_label_values(&["too_many_items"])
            .inc();
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_items",
            &format!(
                "{} events in one request; ingest.max_items is {}",
                items.len(),
                gateway.config.ingest.max_items
            ),
            None,
        );
    }
    let results = ingest::ingest(gateway, &items).await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let count = |f: fn(&ItemResult) -> bool| results.iter().filter(|r| f(r)).count();
    let summary = json!({
        "accepted": count(|r| matches!(r, ItemResult::Accepted { .. })),
        "pending_resolution": count(|r| matches!(r, ItemResult::PendingResolution)),
        "duplicate": count(|r| matches!(r, ItemResult::Duplicate)),
        "failed": results.len() - ok,
        "results": results,
    });
    let unavailable = results
        .iter()
        .any(|r| matches!(r, ItemResult::Unavailable { .. }));
    let status = match ok {
        _ if unavailable => StatusCode::SERVICE_UNAVAILABLE,
        n if n == items.len() => StatusCode::OK,
        0 => StatusCode::BAD_REQUEST,
        _ => StatusCode::MULTI_STATUS,
    };
    let mut response = json_response(status, &summary);
    if unavailable {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

async fn runs(gateway: &Gateway, request: Request<Incoming>) -> Response<Body> {
    let body = match read_body(
        request,
        gateway.config.ingest.max_event_bytes,
        "ingest.max_event_bytes",
    )
    .await
    {
        Ok(body) => body,
        Err(refused) => return refused.response(),
    };
    let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(&body) else {
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
        Err(e) => return broker_error(gateway, &e),
    };
    json_response(
        StatusCode::OK,
        &json!({"run_id": run_id, "channel": channel.as_str(), "released": released}),
    )
}

async fn channel(gateway: &Gateway, raw: &str) -> Response<Body> {
    let name = percent_decode(raw);
    let Some(channel) = name.as_deref().and_then(ChannelName::parse) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_channel",
            "a channel is thread:<thread_id> or user:<user_id>",
            None,
        );
    };
    match gateway.broker.report(&channel).await {
        Ok(Some(report)) => json_response(StatusCode::OK, &report),
        Err(e) => broker_error(gateway, &e),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            "unknown_channel",
            &format!("{channel} has no events and no subscribers"),
            None,
        ),
    }
}

fn run(gateway: &Gateway, raw: &str) -> Response<Body> {
    let Some(run_id) = percent_decode(raw).filter(|id| check_id(id).is_ok()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_run_id",
            "a run id is 1 to 256 printable bytes",
            None,
        );
    };
    match gateway.watchdog.report(&run_id) {
        Some(report) => json_response(StatusCode::OK, &report),
        None => error(
            StatusCode::NOT_FOUND,
            "unknown_run",
            &format!("the watchdog does not follow {run_id}"),
            None,
        ),
    }
}

/// The first page an operator opens when an alert fires: totals and the worst channels.
async fn ledger(gateway: &Gateway, query: Option<&str>) -> Response<Body> {
    let top = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|pair| pair.strip_prefix("top="))
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(10)
        .min(1000);
    let (totals, ranked) = match gateway.broker.ledger(top).await {
        Ok(ledger) => ledger,
        Err(e) => return broker_error(gateway, &e),
    };
    let metrics = &gateway.metrics;
    let lost_unresolved = metrics
        .events_lost
        .with_label_values(&[crate::ledger::LostReason::Unresolved.as_str()])
        .get();
    let lost_channel: u64 = totals.lost.iter().sum();
    json_response(
        StatusCode::OK,
        &json!({
            "channels": {
                "emitted": totals.emitted,
                "delivered": totals.delivered,
                "acked": totals.acked,
                "pending": totals.pending,
                "oldest_pending_age_seconds": totals.oldest_pending_age.as_secs_f64(),
                "lost": crate::ledger::LostReport::from_counts(&crate::ledger::Counts { lost: totals.lost, ..Default::default() }),
                "lost_total": lost_channel,
                "balanced": i128::from(totals.emitted)
                    == i128::from(totals.delivered) + i128::from(totals.pending) + i128::from(lost_channel),
                "count": totals.channels,
            },
            "ingest": {
                "ingested": metrics.events_ingested.get(),
                "duplicates": metrics.events_duplicate.get(),
                "pending_resolution": gateway.resolver.pending_count(),
                "lost_unresolved": lost_unresolved,
                "redriven": metrics.events_redriven.get(),
                "generated": metrics.events_generated.get(),
                "dead_letters": gateway.broker.dead_letter_count(),
            },
            "runs": {
                "active": metrics.runs_active.get(),
                "stalled_total": metrics.runs_stalled.get(),
            },
            "top_pending": ranked.top_pending,
            "top_lost": ranked.top_lost,
        }),
    )
}

fn ready(gateway: &Gateway) -> Response<Body> {
    let broker = gateway.broker.kind();
    if gateway.shutdown.is_draining() {
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"status": "draining", "broker": broker}),
        )
    } else if !gateway.broker.is_up() {
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"status": "broker_unavailable", "broker": broker}),
        )
    } else {
        json_response(
            StatusCode::OK,
            &json!({"status": "ready", "broker": broker}),
        )
    }
}

fn metrics(gateway: &Gateway) -> Response<Body> {
    let text = gateway.metrics.render(|| crate::metrics::Scraped {
        totals: gateway.broker.totals(),
        pending_resolution: gateway.resolver.pending_count(),
        deadletters: gateway.broker.dead_letter_count(),
    });
    let mut response = Response::new(Body::new(Bytes::from(text)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

/// `GET /v1/deadletter`: in Redis mode the shared letters, and the malformed ingest stream entries
/// that were set aside.
async fn dead_letters(gateway: &Gateway) -> Response<Body> {
    match gateway.broker.list_dead_letters().await {
        Ok(list) => {
            let mut body = json!({"count": list.events.len(), "events": list.events});
            if let Some(malformed) = list.malformed {
                body["malformed"] = malformed.into();
            }
            json_response(StatusCode::OK, &body)
        }
        Err(e) => broker_error(gateway, &e),
    }
}

fn json_response(status: StatusCode, value: &impl serde::Serialize) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut response = Response::new(Body::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn error(status: StatusCode, code: &str, message: &str, field: Option<&str>) -> Response<Body> {
    let mut body = json!({"error": code, "message": message});
    if let Some(field) = field {
        body["field"] = field.into();
    }
    json_response(status, &body)
}

/// Decodes `%XX` escapes in a path segment; `None` if they do not form UTF-8.
fn percent_decode(raw: &str) -> Option<String> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}
