//! Reports to the broker that a full queue made this process drop: counted and logged.

use crate::metrics::{Label, Metrics};

/// A report on its way to the broker that a full queue made this process drop, counted in
/// `agentwire_reports_dropped_total{report}` (Redis mode: the reports are batched into Redis by one
/// task; a report that cannot wait is dropped, counted and logged rather than block a socket).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DroppedReport {
    /// A first delivery: the shared ledger keeps the event pending.
    Delivered,
    /// A client's ack: the shared ledger's `acked` stays lower.
    Acked,
    /// A dead letter (also logged with its event).
    DeadLetter,
}

impl Label for DroppedReport {
    const ALL: &'static [Self] = &[Self::Delivered, Self::Acked, Self::DeadLetter];

    fn as_str(self) -> &'static str {
        match self {
            Self::Delivered => "delivered",
            Self::Acked => "acked",
            Self::DeadLetter => "dead_letter",
        }
    }
}

/// Counts a dropped report and logs it at most once per interval, as an `ERROR`: the shared
/// ledger now says less than happened.
pub fn dropped_report(metrics: &Metrics, report: DroppedReport) {
    crate::metrics::count(&metrics.reports_dropped, report);
    static DROPPED: crate::telemetry::Throttle =
        crate::telemetry::Throttle::every(std::time::Duration::from_secs(10));
    if let Some(held_back) = DROPPED.allow() {
        tracing::error!(
            report = report.as_str(),
            held_back,
            "The report queue to Redis is full: a report was dropped (agentwire_reports_dropped_total)."
        );
    }
}
