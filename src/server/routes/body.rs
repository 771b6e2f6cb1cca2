//! Reading a request body within its budgets: at most the endpoint's byte limit, only while the
//! process-wide budget of body bytes in flight (`ingest.max_inflight_bytes`) has room, and no more
//! slowly than `ingest.min_upload_rate` after a short start. The bytes' share of the budget is held
//! until the request has been answered.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use tokio::time::Instant;

use super::{Body, error};
use crate::Gateway;
use crate::limits::HeldBytes;
use crate::metrics::Label;

/// A body read whole, with its share of `ingest.max_inflight_bytes`.
pub(super) struct HeldBody {
    pub bytes: Bytes,
    _budget: Option<HeldBytes>,
}

/// Why a body was not read, counted in `agentwire_events_rejected_total{reason}` on `/v1/events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyRefusal {
    InvalidBody,
    TooLargeBody,
    TooManyItems,
    /// Not `application/json` nor `application/x-ndjson` (415).
    MediaType,
    /// The body arrived more slowly than `ingest.min_upload_rate` (408).
    TooSlowBody,
    /// `ingest.max_inflight_bytes` had no room for it (503).
    IngestBusy,
}

impl Label for BodyRefusal {
    const ALL: &'static [Self] = &[
        Self::InvalidBody,
        Self::TooLargeBody,
        Self::TooManyItems,
        Self::MediaType,
        Self::TooSlowBody,
        Self::IngestBusy,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::InvalidBody => "invalid_body",
            Self::TooLargeBody => "too_large_body",
            Self::TooManyItems => "too_many_items",
            Self::MediaType => "media_type",
            Self::TooSlowBody => "too_slow_body",
            Self::IngestBusy => "ingest_busy",
        }
    }
}

/// A body that trickles is measured against `ingest.min_upload_rate` only after this start, so a
/// connection's first round trips do not count against it.
const UPLOAD_GRACE: Duration = Duration::from_secs(2);

/// A refused body: its label and the answer.
pub(super) struct Refused {
    pub reason: BodyRefusal,
    pub response: Response<Body>,
}

/// Reads a body within `limit` bytes (the limit named by `key` in the error).
pub(super) async fn read(
    gateway: &Gateway,
    request: Request<Incoming>,
    limit: usize,
    key: &str,
) -> Result<HeldBody, Refused> {
    let refused = |reason, status, code: &str, message: &str| Refused {
        reason,
        response: error(status, code, message, None),
    };
    let too_large = || {
        refused(
            BodyRefusal::TooLargeBody,
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            &format!("the body exceeds {key} ({limit} bytes)"),
        )
    };
    let busy = || {
        let mut refusal = refused(
            BodyRefusal::IngestBusy,
            StatusCode::SERVICE_UNAVAILABLE,
            "ingest_busy",
            "the gateway holds ingest.max_inflight_bytes of request bodies; retry",
        );
        refusal
            .response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        refusal
    };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|length| length > limit) {
        return Err(too_large());
    }
    let mut budget = None;
    // A declared length is held before the first byte, so a full budget refuses at once.
    if let Some(length) = declared
        && !gateway.limits.hold_body_bytes(&mut budget, length)
    {
        return Err(busy());
    }
    let min_rate = gateway.config.ingest.min_upload_rate as f64;
    let start = Instant::now();
    let mut body = request.into_body();
    // A body that comes in one piece, nearly every one, is kept as hyper read it; one in many is
    // gathered in `bytes`, sized for what it declared.
    let mut first: Option<Bytes> = None;
    let mut bytes = BytesMut::new();
    loop {
        // What hyper has already read (a body that came with its headers, nearly every one) is
        // taken without a timer: only a frame still to arrive races the minimum rate.
        let ready = body.frame().now_or_never().map(Ok);
        let next = match ready {
            Some(next) => next,
            None => {
                // The moment by which one more byte must have arrived to keep up the minimum rate.
                let received = first.as_ref().map_or(bytes.len(), Bytes::len);
                let due = start
                    + UPLOAD_GRACE
                    + Duration::from_secs_f64((received + 1) as f64 / min_rate);
                tokio::time::timeout_at(due, body.frame()).await
            }
        };
        let frame = match next {
            Err(_) => {
                return Err(refused(
                    BodyRefusal::TooSlowBody,
                    StatusCode::REQUEST_TIMEOUT,
                    "too_slow",
                    &format!(
                        "the body arrived more slowly than ingest.min_upload_rate ({} bytes/s)",
                        gateway.config.ingest.min_upload_rate
                    ),
                ));
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(refused(
                    BodyRefusal::InvalidBody,
                    StatusCode::BAD_REQUEST,
                    "bad_body",
                    &format!("cannot read the body: {e}"),
                ));
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if let Some(first) = first.take() {
            bytes.reserve(declared.unwrap_or(0).max(first.len() + data.len()));
            bytes.extend_from_slice(&first);
        }
        if bytes.len() + data.len() > limit {
            return Err(too_large());
        }
        // Bytes beyond the declared length (none, with a correct one) are held as they come.
        let held = budget.as_ref().map_or(0, HeldBytes::bytes);
        let beyond = (bytes.len() + data.len()).saturating_sub(held);
        if !gateway.limits.hold_body_bytes(&mut budget, beyond) {
            return Err(busy());
        }
        match bytes.is_empty() {
            true => first = Some(data),
            false => bytes.extend_from_slice(&data),
        }
    }
    Ok(HeldBody {
        bytes: first.unwrap_or_else(|| bytes.freeze()),
        _budget: budget,
    })
}
