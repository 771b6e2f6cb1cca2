//! What an operator reads: one channel's ledger, one run as the watchdog sees it, the ledger's
//! worst channels, the dead letters and their redrive.

use hyper::{Response, StatusCode};
use serde_json::json;

use super::{Body, broker_error, error, json_response, percent_decode};
use crate::Gateway;
use crate::deadletter;
use crate::ingest;
use crate::protocol::ChannelName;
use crate::protocol::channel::check_id;

/// `POST /v1/deadletter/redrive`: every dead letter resolved again, with a summary.
pub(super) async fn redrive(gateway: &Gateway) -> Response<Body> {
    use ingest::RedriveOutcome;
    let results = match ingest::redrive(gateway).await {
        Ok(results) => results,
        Err(e) => return broker_error(gateway, &e),
    };
    let count = |f: fn(&RedriveOutcome) -> bool| results.iter().filter(|r| f(&r.outcome)).count();
    let summary = json!({
        "delivered": count(|o| matches!(o, RedriveOutcome::Delivered { .. })),
        "duplicate": count(|o| matches!(o, RedriveOutcome::Duplicate)),
        "unresolved": count(|o| matches!(o, RedriveOutcome::Unresolved)),
        "results": results,
    });
    json_response(StatusCode::OK, &summary)
}

pub(super) async fn channel(gateway: &Gateway, raw: &str) -> Response<Body> {
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

pub(super) fn run(gateway: &Gateway, raw: &str) -> Response<Body> {
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

/// The first page an operator opens when an alert fires: totals and the worst channels, from a
/// snapshot at most `ledger.snapshot_interval` old (the ingest and run figures are live).
pub(super) async fn ledger(gateway: &Gateway, query: Option<&str>) -> Response<Body> {
    let top = url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .find(|(key, _)| key == "top")
        .and_then(|(_, n)| n.parse::<usize>().ok())
        .unwrap_or(10)
        .min(crate::ledger::MAX_TOP);
    let view = match gateway.broker.ledger(&gateway.metrics).await {
        Ok(view) => view,
        Err(e) => return broker_error(gateway, &e),
    };
    let age = view.at.elapsed();
    let view = &*view.value;
    let (totals, ranked) = (&view.totals, view.ranked.top(top));
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
                "unbalanced": totals.unbalanced,
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
            "busiest": ranked.busiest,
            "top_pending": ranked.top_pending,
            "top_lost": ranked.top_lost,
            "snapshot": {
                "as_of": humantime::format_rfc3339_millis(view.as_of).to_string(),
                "age_seconds": age.as_secs_f64(),
                "channel_limit": view.channel_limit,
                "limit_reached": view.limit_reached,
            },
        }),
    )
}

/// `GET /v1/deadletter?limit=N&after=ID`: one page of letters, oldest first (in Redis mode the
/// shared letters, and the malformed ingest stream entries that were set aside).
pub(super) async fn dead_letters(gateway: &Gateway, query: Option<&str>) -> Response<Body> {
    let mut limit = deadletter::PAGE_DEFAULT;
    let mut after = None;
    for (key, value) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match &*key {
            "limit" => match value.parse::<usize>() {
                Ok(n) if (1..=deadletter::PAGE_MAX).contains(&n) => limit = n,
                _ => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "invalid_query",
                        &format!("limit must be a number from 1 to {}", deadletter::PAGE_MAX),
                        Some("limit"),
                    );
                }
            },
            "after" => {
                let letter_id =
                    |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
                let valid = value.len() <= 64
                    && match value.split_once('-') {
                        Some((ms, seq)) => letter_id(ms) && letter_id(seq),
                        None => letter_id(&value),
                    };
                if !valid {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "invalid_query",
                        "after must be the id of a letter (as `next` gave it)",
                        Some("after"),
                    );
                }
                after = Some(value.into_owned());
            }
            _ => {}
        }
    }
    match gateway
        .broker
        .list_dead_letters(after.as_deref(), limit)
        .await
    {
        Ok(list) => {
            let mut body = json!({
                "count": list.page.total,
                "events": list.page.events,
                "next": list.page.next,
            });
            if let Some(malformed) = list.malformed {
                body["malformed"] = malformed.into();
            }
            json_response(StatusCode::OK, &body)
        }
        Err(e) => broker_error(gateway, &e),
    }
}
