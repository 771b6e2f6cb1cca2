//! Stalled runs told to their channel with a gateway-made `agent_error`, once across replicas.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::Gateway;
use crate::broker::{Activity, BrokerError, Outcome};
use crate::protocol::ChannelName;
use crate::protocol::event::Event;
use crate::telemetry::Throttle;

/// Stalled runs' `agent_error`s waiting to be published again, at most this many.
const UNTOLD: usize = 1_000;

/// The `agent_error`s of stalled runs the broker did not take (Redis away, or refusing): the run
/// was claimed and counted stalled here, so no other replica tells its channel. Published again on
/// each tick, oldest first, for `watchdog.retain`; owned by the housekeeping task.
#[derive(Default)]
pub struct Untold(VecDeque<(ChannelName, Event, Instant)>);

impl Untold {
    /// At shutdown: what is still waiting is never told, each counted and logged.
    pub fn abandon(self, gateway: &Gateway) {
        for (_, event, _) in self.0 {
            let run_id = event.run_id.as_deref().unwrap_or_default();
            given_up(gateway, run_id, "the gateway is stopping");
        }
    }
}

/// Tells the channels of newly stalled runs, with a gateway-made `agent_error`. In Redis mode a
/// run quiet here is first checked against what every replica saw of it (it may have gone on, or
/// ended, through another replica), and one replica wins the report, so its channel is told once.
pub async fn report_stalls(gateway: &Gateway, untold: &mut Untold) {
    tell_again(gateway, untold).await;
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
        match publish(gateway, &stalled.channel, &event).await {
            Ok(_) => gateway.metrics.events_generated.inc(),
            // A retry would fail the same way until an operator fixes the cause, and each would
            // take a seq (as for a producer's event answered `internal`).
            Err(BrokerError::Internal(_)) => {
                given_up(gateway, &stalled.run_id, "the broker failed it")
            }
            Err(error) => {
                // Every stalled run of a sweep fails alike while Redis is away: one line per interval.
                static FAILED: Throttle = Throttle::every(Duration::from_secs(10));
                if let Some(held_back) = FAILED.allow() {
                    tracing::warn!(%error, run_id = %stalled.run_id, held_back, "Cannot tell a stalled run's channel yet: the broker did not take its agent_error (tried again on each tick); held_back more since the last line.");
                }
                keep_untold(gateway, untold, stalled.channel, event);
            }
        }
    }
}

/// Publishes a stalled run's `agent_error` with a dedupe id of its run (Redis mode), so that a
/// retry after an answer that was lost, though the publish ran, is a duplicate.
async fn publish(
    gateway: &Gateway,
    channel: &ChannelName,
    event: &Event,
) -> Result<Outcome, BrokerError> {
    let stall = format!("stalled:{}", event.run_id.as_deref().unwrap_or_default());
    (gateway.broker)
        .publish(channel, event, Some(&stall), |_| None)
        .await
}

/// Publishes the waiting `agent_error`s, oldest first, until Redis is away or refusing (the rest
/// would fail too); one that fails by our fault (its channel's keys) is given up on.
async fn tell_again(gateway: &Gateway, untold: &mut Untold) {
    while let Some((channel, event, since)) = untold.0.front() {
        let run_id = event.run_id.as_deref().unwrap_or_default();
        if since.elapsed() > gateway.config.watchdog.retain {
            given_up(gateway, run_id, "still not taken after watchdog.retain");
        } else {
            match publish(gateway, channel, event).await {
                Ok(_) => gateway.metrics.events_generated.inc(),
                Err(BrokerError::Internal(_)) => given_up(gateway, run_id, "the broker failed it"),
                Err(BrokerError::Unavailable(_) | BrokerError::Refused(..)) => return,
            }
        }
        untold.0.pop_front();
    }
}

fn keep_untold(gateway: &Gateway, untold: &mut Untold, channel: ChannelName, event: Event) {
    if untold.0.len() >= UNTOLD
        && let Some((_, oldest, _)) = untold.0.pop_front()
    {
        let run_id = oldest.run_id.as_deref().unwrap_or_default();
        given_up(gateway, run_id, "too many waiting");
    }
    untold.0.push_back((channel, event, Instant::now()));
}

/// A stalled run whose channel is never told: counted as a failed broker operation, logged.
fn given_up(gateway: &Gateway, run_id: &str, why: &'static str) {
    gateway.metrics.broker_errors.inc();
    static GIVEN_UP: Throttle = Throttle::every(Duration::from_secs(10));
    if let Some(held_back) = GIVEN_UP.allow() {
        tracing::error!(
            run_id,
            why,
            held_back,
            "A stalled run's channel was never told (its agent_error was not published); held_back more since the last line."
        );
    }
}
