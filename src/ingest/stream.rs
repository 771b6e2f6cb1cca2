//! Ingest from Redis: producers `XADD` events to `broker.ingest_stream` (field `event`: the same
//! JSON object a `POST /v1/events` item is). Every replica reads through one consumer group and
//! acknowledges an entry only once it is sequenced into its channel (or dead-lettered), with the
//! entry id recorded by the publish script. An entry a dead replica left unacknowledged is claimed
//! after `broker.claim_idle` and published again, which the script answers as a duplicate if the
//! first publish happened: every entry is published exactly once.
//!
//! An entry whose run is not registered yet stays unacknowledged and is retried every second
//! until `resolve.grace` after it was added; then it is dead-lettered like an HTTP event. Later
//! entries of that run wait behind it, so a run's events keep their order. A malformed entry is
//! moved to `<ingest_stream>:dead` with its reason and acknowledged, so it never blocks the group.
//!
//! The stream belongs to agentwire: entries the group has acknowledged are trimmed, and consumers
//! of replicas gone for a while with nothing pending are removed.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use redis::streams::{
    StreamAutoClaimReply, StreamId, StreamInfoConsumersReply, StreamInfoGroupsReply,
    StreamPendingReply, StreamReadOptions, StreamReadReply,
};
use redis::{AsyncCommands, RedisResult};
use tokio_util::sync::CancellationToken;

use super::{dead_letter_now, emit, register_start, resolve};
use crate::Gateway;
use crate::broker::{Broker, BrokerError, now_ms};
use crate::protocol::event;
use crate::telemetry;

const BATCH: usize = 100;

/// What became of one entry.
enum Taken {
    /// Published, a duplicate, dead-lettered or moved aside: acknowledge it.
    Done,
    /// Its run is not registered yet: leave it pending and try again.
    Later,
}

/// Reads the ingest stream until `stop` (Redis mode only).
pub async fn run(gateway: Arc<Gateway>, stop: CancellationToken) {
    let Broker::Redis(redis) = &gateway.broker else {
        return;
    };
    let config = &gateway.config.broker;
    let consumer = format!(
        "{}-{:08x}",
        std::env::var("HOSTNAME").unwrap_or_else(|_| "agentwire".into()),
        rand::random::<u32>()
    );
    // Its own connection: a blocking XREADGROUP must not hold up the publishes behind it.
    let manager = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(Duration::from_secs(3)))
        .set_number_of_retries(1);
    let mut conn = match ConnectionManager::new_lazy_with_config(redis.client.clone(), manager) {
        Ok(conn) => conn,
        Err(error) => {
            tracing::error!(%error, "Cannot read the ingest stream.");
            return;
        }
    };
    tracing::info!(stream = %config.ingest_stream, group = %config.ingest_group, %consumer, "Reading the ingest stream.");
    let mut group_ready = false;
    let mut last_own = Instant::now();
    let mut last_claim = Instant::now();
    // Runs with an entry waiting in this consumer's pending list (rebuilt on each pass over it).
    let mut blocked: HashSet<String> = HashSet::new();
    // After a round that stopped early, the pending list is read first, so nothing overtakes it.
    let mut own_due = true;
    loop {
        if stop.is_cancelled() {
            return;
        }
        let round = async {
            if !group_ready {
                create_group(&mut conn, &config.ingest_stream, &config.ingest_group).await?;
                group_ready = true;
            }
            if own_due || last_own.elapsed() >= Duration::from_secs(1) {
                last_own = Instant::now();
                own_due = false;
                blocked.clear();
                // Page through the whole pending list, in id order.
                let mut after = "0".to_string();
                loop {
                    let own = read(&mut conn, config, &consumer, &after, None).await?;
                    let Some(last) = own.last().map(|entry| entry.id.clone()) else {
                        break;
                    };
                    take_all(&gateway, &mut conn, own, &mut blocked).await?;
                    after = last;
                }
            }
            if last_claim.elapsed() >= config.claim_idle / 2 {
                last_claim = Instant::now();
                let claimed: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
                    .arg(&config.ingest_stream)
                    .arg(&config.ingest_group)
                    .arg(&consumer)
                    .arg(config.claim_idle.as_millis() as u64)
                    .arg("0-0")
                    .arg("COUNT")
                    .arg(BATCH)
                    .query_async(&mut conn)
                    .await?;
                if !claimed.claimed.is_empty() {
                    tracing::info!(
                        entries = claimed.claimed.len(),
                        "Claimed ingest entries another replica left unacknowledged."
                    );
                }
                take_all(&gateway, &mut conn, claimed.claimed, &mut blocked).await?;
                tidy(&mut conn, config, &consumer).await?;
            }
            let new = read(&mut conn, config, &consumer, ">", Some(1000)).await?;
            take_all(&gateway, &mut conn, new, &mut blocked).await
        };
        let wait = tokio::select! {
            _ = stop.cancelled() => return,
            round = round => match round {
                Ok(()) => None,
                Err(error) => {
                    own_due = true;
                    if error.to_string().contains("NOGROUP") {
                        group_ready = false;
                    }
                    Some(error)
                }
            },
        };
        if let Some(error) = wait {
            tracing::debug!(%error, "Ingest stream read failed; retrying.");
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }
}

async fn create_group(conn: &mut ConnectionManager, stream: &str, group: &str) -> RedisResult<()> {
    let created: RedisResult<()> = conn.xgroup_create_mkstream(stream, group, "0").await;
    match created {
        Err(error) if error.to_string().contains("BUSYGROUP") => Ok(()),
        other => other,
    }
}

async fn read(
    conn: &mut ConnectionManager,
    config: &crate::config::BrokerConfig,
    consumer: &str,
    from: &str,
    block_ms: Option<usize>,
) -> RedisResult<Vec<StreamId>> {
    let mut options = StreamReadOptions::default()
        .group(&config.ingest_group, consumer)
        .count(BATCH);
    if let Some(ms) = block_ms {
        options = options.block(ms);
    }
    let reply: Option<StreamReadReply> = conn
        .xread_options(&[&config.ingest_stream], &[from], &options)
        .await?;
    Ok(reply
        .into_iter()
        .flat_map(|reply| reply.keys)
        .flat_map(|key| key.ids)
        .collect())
}

/// Trims what the group has acknowledged and removes long-gone consumers with nothing pending.
async fn tidy(
    conn: &mut ConnectionManager,
    config: &crate::config::BrokerConfig,
    consumer: &str,
) -> RedisResult<()> {
    let (stream, group) = (&config.ingest_stream, &config.ingest_group);
    // The last delivered id is read before the pending list: an entry delivered in between is
    // after it (kept), or in the pending list (kept from its id on).
    let groups: StreamInfoGroupsReply = conn.xinfo_groups(stream).await?;
    let Some(info) = groups.groups.into_iter().find(|g| &g.name == group) else {
        return Ok(());
    };
    let pending: StreamPendingReply = conn.xpending(stream, group).await?;
    let oldest_needed = match pending {
        StreamPendingReply::Data(data) => data.start_id,
        // Everything up to the last delivered id was acknowledged: keep only what follows.
        _ => next_id(&info.last_delivered_id),
    };
    let () = redis::cmd("XTRIM")
        .arg(stream)
        .arg("MINID")
        .arg(&oldest_needed)
        .query_async(conn)
        .await?;
    let consumers: StreamInfoConsumersReply = conn.xinfo_consumers(stream, group).await?;
    let gone_after = config.claim_idle.as_millis() as usize * 10;
    for gone in consumers
        .consumers
        .iter()
        .filter(|c| c.name != consumer && c.pending == 0 && c.idle > gone_after)
    {
        let _: RedisResult<()> = redis::cmd("XGROUP")
            .arg("DELCONSUMER")
            .arg(stream)
            .arg(group)
            .arg(&gone.name)
            .query_async(conn)
            .await;
    }
    Ok(())
}

/// The smallest stream id after `id` (`ms-seq` → `ms-(seq+1)`).
fn next_id(id: &str) -> String {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    format!("{ms}-{}", seq.parse::<u64>().unwrap_or(0).saturating_add(1))
}

async fn take_all(
    gateway: &Gateway,
    conn: &mut ConnectionManager,
    entries: Vec<StreamId>,
    blocked: &mut HashSet<String>,
) -> Result<(), redis::RedisError> {
    let config = &gateway.config.broker;
    for entry in entries {
        let taken = match take(gateway, conn, &entry, blocked).await {
            Ok(taken) => taken,
            // Left pending; the round ends so that nothing after it overtakes it.
            Err(BrokerError::Unavailable(reason)) => {
                tracing::debug!(id = %entry.id, reason, "Ingest entry left for later.");
                return Err(redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "broker unavailable",
                    reason,
                )));
            }
        };
        if let Taken::Done = taken {
            let () = conn
                .xack(&config.ingest_stream, &config.ingest_group, &[&entry.id])
                .await?;
        }
    }
    Ok(())
}

async fn take(
    gateway: &Gateway,
    conn: &mut ConnectionManager,
    entry: &StreamId,
    blocked: &mut HashSet<String>,
) -> Result<Taken, BrokerError> {
    let text: Option<String> = entry.get("event");
    let event = match text.as_deref() {
        None => {
            gateway
                .metrics
                .events_rejected
                .with_label_values(&["missing_field"])
                .inc();
            set_aside(gateway, conn, entry, "", "the entry has no `event` field").await?;
            return Ok(Taken::Done);
        }
        Some(text) => match event::parse(text, gateway.config.ingest.max_event_bytes) {
            Ok(event) => event,
            Err(refusal) => {
                gateway
                    .metrics
                    .events_rejected
                    .with_label_values(&[refusal.code.as_str()])
                    .inc();
                let reason = match &refusal.field {
                    Some(field) => format!("{field}: {}", refusal.reason),
                    None => refusal.reason.to_string(),
                };
                set_aside(gateway, conn, entry, text, &reason).await?;
                return Ok(Taken::Done);
            }
        },
    };
    // An earlier entry of this run waits for its registration, or held events of the run are
    // being released here: keep the run's order.
    if let Some(run_id) = &event.run_id
        && (blocked.contains(run_id) || gateway.resolver.is_waiting(run_id))
    {
        return Ok(Taken::Later);
    }
    register_start(gateway, &event).await?;
    match resolve(gateway, &event).await? {
        Some(channel) => {
            let span = telemetry::ingest_span(&event);
            emit(gateway, &channel, &event, Some(&entry.id), &span).await?;
            gateway.metrics.events_ingested.inc();
            Ok(Taken::Done)
        }
        None if added_ms(&entry.id) + gateway.config.resolve.grace.as_millis() as u64
            > now_ms() =>
        {
            if let Some(run_id) = &event.run_id {
                blocked.insert(run_id.clone());
            }
            Ok(Taken::Later)
        }
        None => {
            let Broker::Redis(redis) = &gateway.broker else {
                return Ok(Taken::Later);
            };
            let run_id = event.run_id.clone().unwrap_or_default();
            dead_letter_now(
                gateway,
                redis,
                &run_id,
                &event,
                "no channel within resolve.grace",
            )
            .await?;
            gateway.metrics.events_ingested.inc();
            Ok(Taken::Done)
        }
    }
}

/// Moves a malformed entry to `<ingest_stream>:dead` with its reason.
async fn set_aside(
    gateway: &Gateway,
    conn: &mut ConnectionManager,
    entry: &StreamId,
    raw: &str,
    reason: &str,
) -> Result<(), BrokerError> {
    let config = &gateway.config.broker;
    let dead = format!("{}:dead", config.ingest_stream);
    let () = redis::cmd("XADD")
        .arg(&dead)
        .arg("MAXLEN")
        .arg("~")
        .arg(gateway.config.deadletter.capacity)
        .arg("*")
        .arg("entry")
        .arg(&entry.id)
        .arg("reason")
        .arg(reason)
        .arg("event")
        .arg(raw)
        .query_async(conn)
        .await?;
    tracing::warn!(target: "agentwire::deadletter", id = %entry.id, reason, stream = %dead, "Malformed ingest entry set aside.");
    Ok(())
}

/// The milliseconds part of a stream entry id: when it was added.
fn added_ms(id: &str) -> u64 {
    id.split('-')
        .next()
        .and_then(|ms| ms.parse().ok())
        .unwrap_or(0)
}
