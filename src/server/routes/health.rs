//! Probes and scrapes: `/readyz` (draining, broker answered once since start) and `/metrics`.

use std::time::Duration;

use bytes::Bytes;
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};
use serde_json::json;

use super::{Body, json_response};
use crate::Gateway;

pub(super) fn ready(gateway: &Gateway) -> Response<Body> {
    let broker = gateway.broker.kind();
    let broker_up = gateway.broker.is_up();
    if gateway.shutdown.is_draining() {
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"status": "draining", "broker": broker, "broker_up": broker_up}),
        )
    } else if !gateway.broker.has_answered() {
        // Never reached Redis since start (a wrong URL, a closed egress): take no traffic. Once
        // it has answered, an outage leaves readiness alone: Redis is shared by every replica,
        // ingest answers 503 meanwhile and `AgentwireBrokerDown` is the signal.
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"status": "broker_unavailable", "broker": broker, "broker_up": broker_up}),
        )
    } else {
        json_response(
            StatusCode::OK,
            &json!({"status": "ready", "broker": broker, "broker_up": broker_up}),
        )
    }
}

/// How long a scrape waits for the cluster's ledger view (Redis mode: a bounded read of Redis)
/// before it renders without it, leaving the cluster series as the last read set them.
const CLUSTER_READ: Duration = Duration::from_secs(2);

pub(super) async fn metrics(gateway: &Gateway) -> Response<Body> {
    let (totals, totals_at) = gateway.broker.totals(&gateway.metrics).await;
    // The same view `GET /v1/ledger` serves (memory mode: the one `totals` came from, so no
    // second walk). Unreadable (a Redis outage): the cluster series keep their last values, and
    // their timestamp says how old they are.
    let cluster =
        match tokio::time::timeout(CLUSTER_READ, gateway.broker.ledger(&gateway.metrics)).await {
            Ok(Ok(view)) => Some(crate::metrics::ClusterLedger {
                pending: view.value.totals.pending,
                unbalanced: view.value.totals.unbalanced,
                as_of: view.value.as_of,
            }),
            Ok(Err(_)) | Err(_) => None,
        };
    let text = gateway.metrics.render(|| crate::metrics::Scraped {
        totals,
        totals_at,
        pending_resolution: gateway.resolver.pending_count(),
        pending_resolution_bytes: gateway.resolver.pending_bytes(),
        deadletters: gateway.broker.dead_letter_count(),
        history: gateway.broker.history_usage(),
        cluster,
    });
    let mut response = Response::new(super::full(Bytes::from(text)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}
