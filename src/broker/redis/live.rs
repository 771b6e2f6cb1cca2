//! This replica's link to Redis outside single commands: the health check behind `/readyz` and
//! `agentwire_broker_up`, and the one pub/sub connection that carries live events of the mirrored
//! channels and run registrations. When the connection is lost it is made again with backoff, and
//! every mirrored channel is read from its stream, so nothing published meanwhile is missed.
//! Registrations go up to ingest as [`Announcement`]s through a bounded channel; when it is full
//! the pub/sub reader waits (Redis buffers meanwhile), so none is dropped.
//!
//! The connection's subscriptions follow the attachments: every `broker.redis_reconcile_interval`
//! the channels it is subscribed to are compared with the attached ones, the extra unsubscribed and
//! the missing subscribed again (and read from their stream), each fix counted in
//! `agentwire_redis_subscriptions_reconciled_total{action}`. A stale subscription would make Redis
//! count its channel's events as offered (`expired_subscribed` instead of `expired_unseen`).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use super::RedisBroker;
use super::conn::Health;
use super::keys::{Keys, REGISTERED, key};
use super::pubsub::{self, Incoming, Messages, Sink};
use super::registry::parse_target;
use crate::broker::{Announcement, BrokerError};
use crate::metrics::{self, Label, Metrics};
use crate::protocol::ChannelName;
use crate::telemetry::Throttle;

/// Announcements waiting for ingest.
pub const ANNOUNCE_QUEUE: usize = 1024;

/// What sessions ask of the pub/sub connection, handled in order.
#[derive(Debug)]
pub enum Command {
    Subscribe(ChannelName, oneshot::Sender<Result<(), BrokerError>>),
    /// Sent when the last local subscription ends; done only if the channel is still not
    /// attached when it is handled, so it never undoes a later subscribe, whatever the order.
    Unsubscribe(ChannelName),
    /// Tests only: subscribes (`true`) or unsubscribes the connection behind the attachments'
    /// back, which is what a lost command leaves, for reconciliation to repair.
    #[doc(hidden)]
    Stray(ChannelName, bool, oneshot::Sender<()>),
}

/// A subscription reconciliation fixed, counted in
/// `agentwire_redis_subscriptions_reconciled_total{action}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reconciled {
    /// Subscribed to a channel nobody here watches: unsubscribed.
    Unsubscribed,
    /// Not subscribed to an attached channel: subscribed again and read from its stream.
    Subscribed,
}

impl Label for Reconciled {
    const ALL: &'static [Self] = &[Self::Unsubscribed, Self::Subscribed];

    fn as_str(self) -> &'static str {
        match self {
            Self::Unsubscribed => "unsubscribed",
            Self::Subscribed => "subscribed",
        }
    }
}

const ANSWER: Duration = Duration::from_secs(2);

/// Pings Redis twice a second; `agentwire_broker_up` and ingest follow the answer, readiness only
/// its first (the "has answered once" latch). A command connection that stops answering while a
/// fresh one answers is replaced (see [`Healing`](super::conn::Healing)).
pub async fn health(broker: &RedisBroker, metrics: &Metrics, stop: CancellationToken) {
    let mut interval = tokio::time::interval(Duration::from_millis(500));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = interval.tick() => {}
        }
        let health = broker
            .conn
            .check(&broker.backend, Duration::from_secs(1))
            .await;
        if health == Health::Replaced {
            replaced(metrics, "the shared command connection");
        }
        let answered = health != Health::Away;
        if answered != broker.is_up() {
            if answered {
                tracing::info!("Redis is reachable.");
            } else {
                tracing::error!(
                    "Redis is not answering: ingest answers 503 (readiness stays on once Redis has answered since start)."
                );
            }
        }
        if !answered {
            metrics.broker_errors.inc();
        }
        broker.set_up(answered);
        metrics.broker_up.set(i64::from(answered));
    }
}

/// Counts and logs a command connection [`Healing`](super::conn::Healing) replaced.
pub(super) fn replaced(metrics: &Metrics, which: &'static str) {
    static REPLACED: Throttle = Throttle::every(Duration::from_secs(10));
    metrics.redis_connections_replaced.inc();
    if let Some(held_back) = REPLACED.allow() {
        tracing::warn!(
            connection = which,
            held_back,
            "A Redis connection stopped answering while a fresh one answered; replaced it."
        );
    }
}

/// Runs the pub/sub connection until `stop`, reconnecting whenever it is lost.
pub async fn run(
    broker: &RedisBroker,
    mut commands: mpsc::Receiver<Command>,
    announce: mpsc::Sender<Announcement>,
    metrics: &Metrics,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        if stop.is_cancelled() {
            return;
        }
        match connect(broker, &announce, metrics, &stop).await {
            Ok((link, stream)) => {
                backoff = Duration::from_millis(100);
                if serve(broker, &announce, link, stream, &mut commands, &stop).await {
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
                    Some(Command::Stray(_, _, done)) => {
                        let _ = done.send(());
                    }
                },
            }
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Opens the connection, subscribes to registrations and every mirrored channel, then reads
/// each mirrored channel's stream from where its mirror stands; the channels whose read failed
/// come back with the link, to be read again.
async fn connect<'a>(
    broker: &RedisBroker,
    announce: &mpsc::Sender<Announcement>,
    metrics: &'a Metrics,
    stop: &CancellationToken,
) -> Result<(Link<'a>, Messages), BrokerError> {
    let (mut sink, stream) = timeout(ANSWER, pubsub::open(&broker.backend))
        .await
        .map_err(|_| BrokerError::Unavailable("connect timed out".into()))??;
    let attached = broker.attached();
    let mut channels = vec![REGISTERED.to_string()];
    channels.extend(attached.iter().map(|name| key(name, "live")));
    // Their confirmations are not resubscriptions (see `Incoming::Resubscribed`).
    let subscribing = match sink.confirms_by_push() {
        true => channels
            .iter()
            .map(|channel| (channel.clone(), 1))
            .collect(),
        false => HashMap::new(),
    };
    timeout(ANSWER, sink.subscribe(channels))
        .await
        .map_err(|_| BrokerError::Unavailable("subscribe timed out".into()))??;
    broker.generation.fetch_add(1, Ordering::AcqRel);
    // Channels still loading read the stream after their subscription anyway (see `attach`).
    let mut unsynced = HashSet::new();
    for name in &attached {
        if broker.mirror.position(name).is_some()
            && let Err(error) = broker.resync(name).await
        {
            tracing::warn!(%error, channel = %name, "Cannot read the channel's stream after a reconnect; retrying.");
            unsynced.insert(name.clone());
        }
    }
    // A registration announced while this replica was away must still release held events.
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = announce.send(Announcement::Resync) => {}
    }
    let link = Link {
        sink,
        subscribed: attached.into_iter().collect(),
        unsynced,
        subscribing,
        unsubscribing: HashMap::new(),
        metrics,
    };
    Ok((link, stream))
}

/// The pub/sub connection's command side: the sink and the channels it is subscribed to.
struct Link<'a> {
    sink: Sink,
    subscribed: HashSet<ChannelName>,
    /// Cluster: the subscriptions this task asked for (pub/sub channel names) whose confirmation
    /// (a push, like the resubscriptions the redis crate makes by itself) has not been read yet.
    subscribing: HashMap<String, usize>,
    /// Cluster: the unsubscriptions this task asked for whose confirmation (a push, like the
    /// unsubscriptions a node makes when its slot moves) has not been read yet.
    unsubscribing: HashMap<ChannelName, usize>,
    /// Channels whose stream could not be read after a reconnect, a gap or a resubscribe: read
    /// again every second until it works, not only when their next live message comes (there
    /// may be none, and the mirror would keep a stale epoch).
    unsynced: HashSet<ChannelName>,
    metrics: &'a Metrics,
}

impl Link<'_> {
    async fn subscribe(&mut self, name: &ChannelName) -> bool {
        let live = key(name, "live");
        if self.sink.confirms_by_push() {
            *self.subscribing.entry(live.clone()).or_default() += 1;
        }
        let done = matches!(
            timeout(ANSWER, self.sink.subscribe(vec![live])).await,
            Ok(Ok(()))
        );
        if done {
            self.subscribed.insert(name.clone());
        }
        done
    }

    async fn unsubscribe(&mut self, name: &ChannelName) -> bool {
        // Counted before it is sent: its confirmation is read by this task, after this returns.
        if self.sink.confirms_by_push() {
            *self.unsubscribing.entry(name.clone()).or_default() += 1;
        }
        let done = matches!(
            timeout(ANSWER, self.sink.unsubscribe(key(name, "live"))).await,
            Ok(Ok(()))
        );
        if done {
            self.subscribed.remove(name);
        }
        done
    }

    /// Whether a subscription confirmed now is one this task asked for (counted off if so).
    fn asked_for(&mut self, channel: &str) -> bool {
        count_off(&mut self.subscribing, channel)
    }

    /// Whether an unsubscription confirmed now is one this task asked for (counted off if so).
    fn confirmed(&mut self, name: &ChannelName) -> bool {
        count_off(&mut self.unsubscribing, name)
    }

    /// Handles one command; `false` when the link failed.
    async fn apply(&mut self, broker: &RedisBroker, command: Command) -> bool {
        match command {
            Command::Subscribe(name, reply) => {
                let ok = self.subscribe(&name).await;
                let _ = reply.send(if ok {
                    Ok(())
                } else {
                    Err(BrokerError::Unavailable("pub/sub subscribe failed".into()))
                });
                ok
            }
            // Attached again since: its subscribe came (or comes) after this, and must hold.
            Command::Unsubscribe(name) if broker.is_attached(&name) => true,
            Command::Unsubscribe(name) => self.unsubscribe(&name).await,
            Command::Stray(name, subscribe, done) => {
                let ok = match subscribe {
                    true => self.subscribe(&name).await,
                    false => self.unsubscribe(&name).await,
                };
                let _ = done.send(());
                ok
            }
        }
    }

    /// Makes the subscriptions match the attachments; `false` when the link failed.
    async fn reconcile(
        &mut self,
        broker: &RedisBroker,
        commands: &mut mpsc::Receiver<Command>,
    ) -> bool {
        // Commands already queued go first: a channel attached or released a moment ago is on
        // its way, not a discrepancy.
        while let Ok(command) = commands.try_recv() {
            if !self.apply(broker, command).await {
                return false;
            }
        }
        // A channel still attaching may not be subscribed yet; one attached at all is not extra.
        let (attached, loaded) = broker.attached_and_loaded();
        let extra: Vec<ChannelName> = self.subscribed.difference(&attached).cloned().collect();
        let missing: Vec<ChannelName> = loaded.difference(&self.subscribed).cloned().collect();
        for name in extra {
            if !self.unsubscribe(&name).await {
                return false;
            }
            self.fixed(Reconciled::Unsubscribed, &name);
        }
        for name in missing {
            if !self.subscribe(&name).await {
                return false;
            }
            self.fixed(Reconciled::Subscribed, &name);
            // Whatever was published while it was not subscribed.
            self.resync(broker, &name, "resubscribing").await;
        }
        true
    }

    /// Brings the mirror of `name` up to its stream; on failure keeps it for [`Self::retry`].
    async fn resync(&mut self, broker: &RedisBroker, name: &ChannelName, after: &str) {
        match broker.resync(name).await {
            Ok(()) => {
                self.unsynced.remove(name);
            }
            Err(error) => {
                tracing::warn!(%error, channel = %name, after, "Cannot read the channel's stream; retrying.");
                self.unsynced.insert(name.clone());
            }
        }
    }

    /// Reads again the streams that could not be read (those no longer mirrored are dropped). The
    /// first failure ends the round: Redis is likely still away, and the live messages wait.
    async fn retry(&mut self, broker: &RedisBroker) {
        let names: Vec<ChannelName> = self.unsynced.iter().cloned().collect();
        for name in names {
            if broker.mirror.position(&name).is_some()
                && let Err(error) = broker.resync(&name).await
            {
                tracing::debug!(%error, channel = %name, "Still cannot read the channel's stream.");
                return;
            }
            self.unsynced.remove(&name);
        }
    }

    fn fixed(&self, action: Reconciled, name: &ChannelName) {
        static FIXED: Throttle = Throttle::every(Duration::from_secs(10));
        metrics::count(&self.metrics.redis_subscriptions_reconciled, action);
        if let Some(held_back) = FIXED.allow() {
            tracing::warn!(action = action.as_str(), channel = %name, held_back, "The pub/sub subscriptions did not match the watched channels; fixed.");
        }
    }
}

/// Serves commands and messages; `true` when the gateway is stopping, `false` on a lost link.
async fn serve(
    broker: &RedisBroker,
    announce: &mpsc::Sender<Announcement>,
    mut link: Link<'_>,
    mut stream: Messages,
    commands: &mut mpsc::Receiver<Command>,
    stop: &CancellationToken,
) -> bool {
    // A half-open connection delivers nothing and reports no error: ping it.
    let mut ping = tokio::time::interval(Duration::from_secs(1));
    let every = broker.config.redis_reconcile_interval;
    let mut reconcile = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    // Made once: a wait made afresh each turn enters and leaves the token's waiter list, a lock
    // shared with every other task waiting on it, once per message.
    let stopping = stop.cancelled();
    tokio::pin!(stopping);
    loop {
        tokio::select! {
            _ = &mut stopping => return true,
            _ = ping.tick() => {
                if !matches!(timeout(ANSWER, link.sink.ping()).await, Ok(Ok(()))) {
                    return false;
                }
                link.retry(broker).await;
            }
            _ = reconcile.tick() => {
                if !link.reconcile(broker, commands).await {
                    return false;
                }
            }
            command = commands.recv() => match command {
                None => return true,
                Some(command) => {
                    if !link.apply(broker, command).await {
                        return false;
                    }
                }
            },
            incoming = stream.next() => match incoming {
                None => return false,
                Some(Incoming::Message { channel, payload }) => {
                    if channel == REGISTERED {
                        if let Some(registered) = registered(&payload) {
                            tokio::select! {
                                _ = stop.cancelled() => return true,
                                _ = announce.send(registered) => {}
                            }
                        }
                    } else if let Some(name) = Keys::name_of_live(&channel)
                        && !broker.apply_live(name, &payload)
                        && let Some(name) = ChannelName::parse(name)
                    {
                        link.resync(broker, &name, "a gap").await;
                    }
                }
                // Cluster: the redis crate subscribed again by itself (it reconnected to a node);
                // what was published meanwhile is in the stream (or in the registry). The
                // confirmation of a subscription this task asked for is not that.
                Some(Incoming::Resubscribed(channel)) => {
                    if link.asked_for(&channel) {
                        // Whoever asked reads the stream after it (attach, connect, reconcile).
                    } else if channel == REGISTERED {
                        if !resync_registrations(announce, stop).await {
                            return true;
                        }
                    } else if let Some(name) = Keys::channel_of_live(&channel)
                        && broker.mirror.position(&name).is_some()
                    {
                        link.resync(broker, &name, "a resubscription").await;
                    }
                }
                // Cluster: a node gave the slot up (a failover, a migration) and ended the
                // subscription. The redis crate may not know yet where the slot went (subscribed
                // again now, the channel can land on the old master, a replica by then, which gets
                // none of the slot's messages), so the connection is made again, after the usual
                // pause: it learns where every slot is, subscribes everything there and reads every
                // watched stream. The confirmation of an unsubscription this task asked for is not
                // such a loss.
                Some(Incoming::Unsubscribed(channel)) => match Keys::channel_of_live(&channel) {
                    Some(name) if link.confirmed(&name) => {}
                    Some(_) => return false,
                    None if channel == REGISTERED => return false,
                    None => {}
                },
                // Cluster: messages were dropped: read every mirrored stream, every registration.
                Some(Incoming::Overflowed) => {
                    static OVERFLOWED: Throttle = Throttle::every(Duration::from_secs(10));
                    if let Some(held_back) = OVERFLOWED.allow() {
                        tracing::warn!(held_back, "Redis pub/sub messages came faster than they were read; reading every watched channel's stream instead.");
                    }
                    link.unsynced.extend(broker.attached());
                    if !resync_registrations(announce, stop).await {
                        return true;
                    }
                }
                Some(Incoming::NodeLost) => return false,
                Some(Incoming::Other) => {}
            },
        }
    }
}

/// Takes one off `key`'s count of confirmations awaited; `false` when none was awaited.
fn count_off<K, Q>(awaited: &mut HashMap<K, usize>, key: &Q) -> bool
where
    K: std::borrow::Borrow<Q> + std::hash::Hash + Eq,
    Q: std::hash::Hash + Eq + ?Sized,
{
    let Some(count) = awaited.get_mut(key) else {
        return false;
    };
    *count -= 1;
    if *count == 0 {
        awaited.remove(key);
    }
    true
}

/// Asks ingest to look up the runs it holds events for; `false` when the gateway is stopping.
async fn resync_registrations(
    announce: &mpsc::Sender<Announcement>,
    stop: &CancellationToken,
) -> bool {
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = announce.send(Announcement::Resync) => true,
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
