//! Housekeeping, on a tick: releases of held events that Redis paused are resumed, held events
//! past `resolve.grace` are dead-lettered, those of replicas
//! presumed dead adopted (Redis mode), stalled runs reported, and once a second history past its age, idle channels and old dedupe ids expire.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::Gateway;

/// Resumes paused releases, expires held events past the grace period, reports stalled runs,
/// expires history past its age, idle channels and old dedupe ids.
pub async fn run(gateway: Arc<Gateway>, stop: CancellationToken) {
    let shortest = gateway
        .config
        .resolve
        .grace
        .min(gateway.config.watchdog.run_idle_timeout);
    let tick = (shortest / 5).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut interval = tokio::time::interval(tick);
    let mut last_sweep = Instant::now();
    let mut untold = crate::ingest::Untold::default();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return untold.abandon(&gateway),
            _ = interval.tick() => {}
        }
        crate::ingest::resume_releases(&gateway).await;
        crate::ingest::expire_pending(&gateway).await;
        crate::ingest::adopt_held(&gateway).await;
        crate::ingest::report_stalls(&gateway, &mut untold).await;
        if last_sweep.elapsed() >= Duration::from_secs(1) {
            last_sweep = Instant::now();
            gateway.broker.sweep().await;
        }
    }
}
