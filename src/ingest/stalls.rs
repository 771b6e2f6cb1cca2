//! Stalled runs told to their channel with a gateway-made `agent_error`, once across replicas.

use std::time::Duration;

use crate::Gateway;
use crate::broker::Activity;
use crate::telemetry::Throttle;

/// Tells the channels of newly stalled runs, with a gateway-made `agent_error`. In Redis mode a
/// run quiet here is first checked against what every replica saw of it (it may have gone on, or
/// ended, through another replica), and one replica wins the report, so its channel is told once.
pub async fn report_stalls(gateway: &Gateway) {
    for run_id in gateway.watchdog.sweep() {
        match gateway.broker.run_activity(&run_id).await {
            Ok(Some(Activity::Ended)) => {
                gateway.watchdog.ended_elsewhere(&run_id, &gateway.metrics);
                continue;
            }
            Ok(Some(Activity::Seen(ago))) if ago <= gateway.config.watchdog.run_idle_timeout => {
                gateway.watchdog.seen_elsewhere(&run_id, ago);
                continue;
            }
            Ok(_) => {}
            // Cannot tell: decide at a later sweep.
            Err(_) => continue,
        }
        // One replica counts and reports the stall; the others stop following the run.
        match gateway
            .broker
            .claim_stall(&run_id, gateway.config.watchdog.retain)
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                gateway.watchdog.ended_elsewhere(&run_id, &gateway.metrics);
                continue;
            }
            Err(_) => continue,
        }
        let Some(stalled) = gateway.watchdog.stall(&run_id, &gateway.metrics) else {
            continue;
        };
        if !gateway.config.watchdog.stalled_event {
            continue;
        }
        // Published past the watchdog: the run is already ended as stalled. Sized like a
        // producer's event, so that no subscriber's queue is too small for it.
        let event = stalled.event(gateway.config.ingest.max_event_bytes);
        match gateway
            .broker
            .publish(&stalled.channel, &event, None, |_| None)
            .await
        {
            Ok(_) => gateway.metrics.events_generated.inc(),
            Err(error) => {
                // Every stalled run of a sweep fails alike while Redis is away: one line per interval.
                static UNAVAILABLE: Throttle = Throttle::every(Duration::from_secs(10));
                if let Some(held_back) = UNAVAILABLE.allow() {
                    tracing::warn!(%error, run_id = %stalled.run_id, held_back, "Cannot tell a stalled run's channel: Redis is unavailable; held_back more since the last line.");
                }
            }
        }
    }
}
