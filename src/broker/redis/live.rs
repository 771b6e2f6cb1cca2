//! This replica's link to Redis outside single commands: the health check behind `/readyz` and
//! `agentwire_broker_up`, and the one pub/sub connection that carries live events of the mirrored
//! channels and run registrations. When the connection is lost it is made again with backoff, and
//! every mirrored channel is read from its stream, so nothing published meanwhile is missed.
//! Registrations go up to ingest as [`Announcement`]s through a bounded channel; when it is full
//! the pub/sub reader waits (Redis buffers meanwhile), so none is dropped.

use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use redis::AsyncCommands;
use tokio::sync::{mpsc, oneshot};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use super::RedisBroker;
use super::keys::{Keys, REGISTERED};
use super::registry::parse_target;
use crate::broker::{Announcement, BrokerError};
use crate::metrics::Metrics;
use crate::protocol::ChannelName;

/// Announcements waiting for ingest.
pub const ANNOUNCE_QUEUE: usize = 1024;

/// What sessions ask of the pub/sub connection; handled in order, so an unsubscribe queued
/// before a subscribe of the same channel never undoes it.
#[derive(Debug)]
pub enum Command {
    Subscribe(ChannelName, oneshot::Sender<Result<(), BrokerError>>),
    Unsubscribe(ChannelName),
}

const ANSWER: Duration = Duration::from_secs(2);

/// Pings Redis twice a second; readiness and `agentwire_broker_up` follow the answer.
pub async fn health(broker: &RedisBroker, metrics: &Metrics, stop: CancellationToken) {
    let mut interval = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = interval.tick() => {}
        }
        let mut conn = broker.conn();
        let answered = matches!(
            timeout(Duration::from_secs(1), conn.ping::<String>()).await,
            Ok(Ok(_))
        );
        if answered != broker.is_up() {
            if answered {
                tracing::info!("Redis is reachable.");
            } else {
                tracing::error!("Redis is not answering: readiness is off and ingest answers 503.");
            }
        }
        if !answered {
            metrics.broker_errors.inc();
        }
        broker.set_up(answered);
        metrics.broker_up.set(i64::from(answered));
    }
}

/// Runs the pub/sub connection until `stop`, reconnecting whenever it is lost.
pub async fn run(
    broker: &RedisBroker,
    mut commands: mpsc::Receiver<Command>,
    announce: mpsc::Sender<Announcement>,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        if stop.is_cancelled() {
            return;
        }
        match connect(broker, &announce, &stop).await {
            Ok((sink, stream)) => {
                backoff = Duration::from_millis(100);
                if serve(broker, &announce, sink, stream, &mut commands, &stop).await {
                    return;
                }
                tracing::warn!("Lost the Redis pub/sub connection; reconnecting.");
            }
            Err(error) => {
                tracing::debug!(%error, "Cannot open the Redis pub/sub connection yet.");
            }
        }
        // While away, a new subscription is refused at once rather than left waiting.
        let wait = tokio::time::sleep(backoff);
        tokio::pin!(wait);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = &mut wait => break,
                command = commands.recv() => match command {
                    None => return,
                    Some(Command::Subscribe(_, reply)) => {
                        let _ = reply.send(Err(BrokerError::Unavailable("Redis pub/sub is reconnecting".into())));
                    }
                    Some(Command::Unsubscribe(_)) => {}
                },
            }
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Opens the connection, subscribes to registrations and every mirrored channel, then reads
/// each mirrored channel's stream from where its mirror stands.
async fn connect(
    broker: &RedisBroker,
    announce: &mpsc::Sender<Announcement>,
    stop: &CancellationToken,
) -> Result<(redis::aio::PubSubSink, redis::aio::PubSubStream), BrokerError> {
    let pubsub = timeout(ANSWER, broker.client.get_async_pubsub())
        .await
        .map_err(|_| BrokerError::Unavailable("connect timed out".into()))??;
    let (mut sink, stream) = pubsub.split();
    let attached = broker.attached();
    let mut channels = vec![REGISTERED.to_string()];
    channels.extend(attached.iter().map(|name| Keys::of(name).live));
    timeout(ANSWER, sink.subscribe(channels))
        .await
        .map_err(|_| BrokerError::Unavailable("subscribe timed out".into()))??;
    broker.generation.fetch_add(1, Ordering::AcqRel);
    // Channels still loading read the stream after their subscription anyway (see `attach`).
    for name in &attached {
        if broker.mirror.position(name).is_some()
            && let Err(error) = broker.resync(name).await
        {
            tracing::warn!(%error, channel = %name, "Cannot read the channel's stream after a reconnect.");
        }
    }
    // A registration announced while this replica was away must still release held events.
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = announce.send(Announcement::Resync) => {}
    }
    Ok((sink, stream))
}

/// Serves commands and messages; `true` when the gateway is stopping, `false` on a lost link.
async fn serve(
    broker: &RedisBroker,
    announce: &mpsc::Sender<Announcement>,
    mut sink: redis::aio::PubSubSink,
    mut stream: redis::aio::PubSubStream,
    commands: &mut mpsc::Receiver<Command>,
    stop: &CancellationToken,
) -> bool {
    // A half-open connection delivers nothing and reports no error: ping it.
    let mut ping = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return true,
            _ = ping.tick() => {
                if !matches!(timeout(ANSWER, sink.ping::<redis::Value>()).await, Ok(Ok(_))) {
                    return false;
                }
            }
            command = commands.recv() => match command {
                None => return true,
                Some(Command::Subscribe(name, reply)) => {
                    let subscribed = timeout(ANSWER, sink.subscribe(Keys::of(&name).live)).await;
                    let ok = matches!(subscribed, Ok(Ok(())));
                    let _ = reply.send(if ok {
                        Ok(())
                    } else {
                        Err(BrokerError::Unavailable("pub/sub subscribe failed".into()))
                    });
                    if !ok {
                        return false;
                    }
                }
                Some(Command::Unsubscribe(name)) => {
                    if !matches!(timeout(ANSWER, sink.unsubscribe(Keys::of(&name).live)).await, Ok(Ok(()))) {
                        return false;
                    }
                }
            },
            message = stream.next() => {
                let Some(message) = message else { return false };
                let channel = message.get_channel_name();
                if channel == REGISTERED {
                    if let Some(registered) = registered(message.get_payload_bytes()) {
                        tokio::select! {
                            _ = stop.cancelled() => return true,
                            _ = announce.send(registered) => {}
                        }
                    }
                } else if let Some(name) = Keys::channel_of_live(channel)
                    && !broker.apply_live(&name, message.get_payload_bytes())
                    && let Err(error) = broker.resync(&name).await
                {
                    tracing::warn!(%error, channel = %name, "Cannot read the channel's stream after a gap.");
                }
            }
        }
    }
}

/// A run registered on some replica, as announced on [`REGISTERED`].
fn registered(payload: &[u8]) -> Option<Announcement> {
    let (run_id, value) = std::str::from_utf8(payload).ok()?.split_once('\n')?;
    Some(Announcement::Registered {
        run_id: run_id.to_string(),
        target: parse_target(value)?,
    })
}
