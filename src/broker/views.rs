//! The operator views of the ledger, served from snapshots: the `GET /v1/ledger` view (totals and
//! rankings over every channel; in memory mode also the totals `/metrics` exports) and, in Redis
//! mode, this replica's totals for `/metrics`. Each is recomputed at most once per
//! `ledger.snapshot_interval`, by one caller at a time, so operators polling these endpoints
//! cost one walk of the channels (or one bounded read of Redis) per interval, whatever their number.

use std::future::Future;
use std::time::Duration;

use super::single_flight::{Computed, SingleFlight};
use crate::ledger::{LedgerView, Totals};
use crate::metrics::{Label, Metrics, count};

/// Which snapshot was recomputed, for `agentwire_ledger_snapshots_total{view}`.
#[derive(Debug, Clone, Copy)]
pub enum View {
    /// The `GET /v1/ledger` view (memory mode: also the `/metrics` totals).
    Ledger,
    /// Redis mode: this replica's totals for `/metrics`.
    Replica,
}

impl Label for View {
    const ALL: &'static [Self] = &[Self::Ledger, Self::Replica];
    fn as_str(self) -> &'static str {
        match self {
            Self::Ledger => "ledger",
            Self::Replica => "replica",
        }
    }
}

pub(super) struct Views {
    interval: Duration,
    ledger: SingleFlight<LedgerView>,
    replica: SingleFlight<Totals>,
}

impl Views {
    pub(super) fn new(interval: Duration) -> Self {
        Self {
            interval,
            ledger: SingleFlight::default(),
            replica: SingleFlight::default(),
        }
    }

    /// The ledger view, from `compute` when the last one is older than the interval.
    pub(super) async fn ledger<E, Fut>(
        &self,
        metrics: &Metrics,
        compute: impl FnOnce() -> Fut,
    ) -> Result<Computed<LedgerView>, E>
    where
        Fut: Future<Output = Result<LedgerView, E>>,
    {
        self.ledger
            .get(self.interval, || {
                count(&metrics.ledger_snapshots, View::Ledger);
                compute()
            })
            .await
    }

    /// This replica's totals (Redis mode), from `compute` when the last are older than the interval.
    pub(super) async fn replica<Fut>(
        &self,
        metrics: &Metrics,
        compute: impl FnOnce() -> Fut,
    ) -> Computed<Totals>
    where
        Fut: Future<Output = Totals>,
    {
        let taken = self
            .replica
            .get(self.interval, || {
                count(&metrics.ledger_snapshots, View::Replica);
                async { Ok::<_, std::convert::Infallible>(compute().await) }
            })
            .await;
        taken.unwrap_or_else(|never| match never {})
    }
}
