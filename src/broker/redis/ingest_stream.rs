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
//! An entry ingest fails on by our fault (`BrokerError::Internal`) is dead-lettered, counted and
//! answered done by ingest (acknowledged here), since a retry would fail the same way forever; an
//! unavailable Redis leaves the entry for later.
//!
//! The stream belongs to agentwire: entries the group has acknowledged are trimmed, and consumers
//! of replicas gone for a while with nothing pending are removed.
//!
//! This reader speaks Redis; what becomes of a valid event is ingest's decision, asked through a
//! bounded channel, the valid entries of a read at once ([`StreamEvents`]), and answered per entry.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use redis::streams::{
    StreamAutoClaimReply, StreamId, StreamInfoConsumersReply, StreamInfoGroupsReply,
    StreamPendingReply, StreamReadOptions, StreamReadReply,
};
use redis::{AsyncCommands, RedisResult};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::conn::{Conn, Healing, Health};
use super::{RedisBroker, live};
use crate::broker::{BrokerError, StreamEvent, StreamEvents, Taken};
use crate::config::BrokerConfig;
use crate::metrics::Metrics;
use crate::protocol::event;

const BATCH: usize = 100;
/// Reads on their way to ingest. The reader waits for each answer before it sends the next, so
/// at most one is ever queued; the bound only has to be at least one.
pub const QUEUE: usize = 1;

/// What the reader needs besides its connection.
struct Reader<'a> {
    redis: &'a RedisBroker,
    ingest: mpsc::Sender<StreamEvents>,
    metrics: &'a Metrics,
}

/// Reads the ingest stream until `stop`.
pub async fn run(
    redis: &RedisBroker,
    ingest: mpsc::Sender<StreamEvents>,
    metrics: &Metrics,
    stop: CancellationToken,
) {
    let config = &redis.config;
    let reader = Reader {
        redis,
        ingest,
        metrics,
    };
    let consumer = format!(
        "{}-{:08x}",
        std::env::var("HOSTNAME").unwrap_or_else(|_| "agentwire".into()),
        rand::random::<u32>()
    );
    // Its own connection: a blocking XREADGROUP must not hold up the publishes behind it.
    let healing = match Healing::new(&redis.backend, Duration::from_secs(3), 1) {
        Ok(healing) => healing,
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
        let mut conn = healing.get();
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
                    take_all(&reader, &mut conn, own, &mut blocked).await?;
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
                take_all(&reader, &mut conn, claimed.claimed, &mut blocked).await?;
                tidy(&mut conn, config, &consumer).await?;
            }
            let new = read(&mut conn, config, &consumer, ">", Some(1000)).await?;
            take_all(&reader, &mut conn, new, &mut blocked).await
        };
        let wait = tokio::select! {
            _ = stop.cancelled() => return,
            round = round => match round {
                Ok(()) => None,
                Err(error) => {
                    own_due = true;
                    if error.code() == Some("NOGROUP") {
                        group_ready = false;
                    }
                    Some(error)
                }
            },
        };
        if let Some(error) = wait {
            tracing::debug!(%error, "Ingest stream read failed; retrying.");
            if healing.check(&redis.backend, Duration::from_secs(1)).await == Health::Replaced {
                live::replaced(metrics, "the ingest stream's connection");
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }
}

async fn create_group(conn: &mut Conn, stream: &str, group: &str) -> RedisResult<()> {
    let created: RedisResult<()> = conn.xgroup_create_mkstream(stream, group, "0").await;
    match created {
        Err(error) if error.code() == Some("BUSYGROUP") => Ok(()),
        other => other,
    }
}

async fn read(
    conn: &mut Conn,
    config: &BrokerConfig,
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
async fn tidy(conn: &mut Conn, config: &BrokerConfig, consumer: &str) -> RedisResult<()> {
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

/// Takes `entries` in order, then acknowledges the ones done in one `XACK` (also when a round ends
/// early): an entry published but not acknowledged yet, if this replica dies, is claimed by
/// another and answered a duplicate by the publish script, so acknowledging a batch at once loses
/// nothing and saves a round trip per entry. Malformed entries are set aside first; the valid ones
/// go to ingest together, which publishes what it can of them at once.
async fn take_all(
    reader: &Reader<'_>,
    conn: &mut Conn,
    entries: Vec<StreamId>,
    blocked: &mut HashSet<String>,
) -> Result<(), redis::RedisError> {
    let config = &reader.redis.config;
    let mut done = Vec::with_capacity(entries.len());
    let mut valid = Vec::with_capacity(entries.len());
    let mut stopped = None;
    for entry in &entries {
        match valid_event(reader, conn, entry).await {
            Ok(None) => done.push(entry.id.as_str()),
            // An earlier entry of this run waits for its registration: keep the run's order.
            Ok(Some(event))
                if (event.run_id.as_ref()).is_some_and(|run_id| blocked.contains(run_id)) => {}
            Ok(Some(event)) => valid.push((
                entry.id.as_str(),
                StreamEvent {
                    event,
                    entry_id: entry.id.clone(),
                    added_ms: added_ms(&entry.id),
                },
            )),
            Err(error) => {
                stopped = Some(error);
                break;
            }
        }
    }
    if stopped.is_none() && !valid.is_empty() {
        let runs: Vec<Option<String>> = (valid.iter())
            .map(|(_, entry)| entry.event.run_id.clone())
            .collect();
        let (ids, entries): (Vec<&str>, Vec<StreamEvent>) = valid.into_iter().unzip();
        let answers = ask(reader, entries).await;
        for (i, id) in ids.iter().enumerate() {
            match answers.get(i) {
                Some(Ok(Taken::Done)) => done.push(id),
                Some(Ok(Taken::Later)) => {
                    if let Some(run_id) = &runs[i] {
                        blocked.insert(run_id.clone());
                    }
                }
                // Left pending, and the round ends after this read so that nothing read later
                // overtakes it. Entries of the read after it that ingest did publish (on a
                // Cluster, other slots answer for themselves) are acknowledged all the same:
                // read again, each would count once more as ingested, then as a duplicate.
                Some(Err(error)) => {
                    stopped.get_or_insert_with(|| error.clone());
                }
                None => {
                    stopped
                        .get_or_insert_with(|| BrokerError::Unavailable("ingest stopped".into()));
                    break;
                }
            }
        }
    }
    if !done.is_empty() {
        let () = conn
            .xack(&config.ingest_stream, &config.ingest_group, &done)
            .await?;
    }
    match stopped {
        None => Ok(()),
        Some(error) => {
            tracing::debug!(%error, "Ingest entries left for later.");
            Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "broker unavailable",
                error.to_string(),
            )))
        }
    }
}

/// Ingest's answers for `entries`, in order, up to the first error (none when ingest stopped).
async fn ask(reader: &Reader<'_>, entries: Vec<StreamEvent>) -> Vec<Result<Taken, BrokerError>> {
    let (reply, answer) = oneshot::channel();
    let sent = reader.ingest.send(StreamEvents { entries, reply }).await;
    match sent {
        Ok(()) => answer.await.unwrap_or_default(),
        Err(_) => Vec::new(),
    }
}

/// The entry's event, or `None` once a malformed entry was set aside (counted).
async fn valid_event(
    reader: &Reader<'_>,
    conn: &mut Conn,
    entry: &StreamId,
) -> Result<Option<event::Event>, BrokerError> {
    let rejected = |code: &str| {
        reader
            .metrics
            .events_rejected
            .with_label_values(&[code])
            .inc();
    };
    let text: Option<String> = entry.get("event");
    match text.as_deref() {
        None => {
            rejected("missing_field");
            set_aside(
                reader.redis,
                conn,
                entry,
                "",
                "the entry has no `event` field",
            )
            .await?;
            Ok(None)
        }
        Some(text) => match event::parse(text, reader.redis.max_event_bytes) {
            Ok(event) => Ok(Some(event)),
            Err(refusal) => {
                rejected(refusal.code.as_str());
                let reason = match &refusal.field {
                    Some(field) => format!("{field}: {}", refusal.reason),
                    None => refusal.reason.to_string(),
                };
                set_aside(reader.redis, conn, entry, text, &reason).await?;
                Ok(None)
            }
        },
    }
}

/// Moves a malformed entry to `<ingest_stream>:dead` with its reason.
async fn set_aside(
    redis: &RedisBroker,
    conn: &mut Conn,
    entry: &StreamId,
    raw: &str,
    reason: &str,
) -> Result<(), BrokerError> {
    let dead = format!("{}:dead", redis.config.ingest_stream);
    let () = redis::cmd("XADD")
        .arg(&dead)
        .arg("MAXLEN")
        .arg("~")
        .arg(redis.deadletter_capacity)
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
