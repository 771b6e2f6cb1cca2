//! The channels this replica's clients watch, mirrored into a local channel store: the first
//! local subscriber attaches a channel (pub/sub first, then the stream, merged by seq), the last one
//! detaches it; live messages and resyncs after a gap keep the mirror in seq order.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};

use bytes::Bytes;
use tokio::sync::{OnceCell, mpsc};

use super::keys::{Entry, Keys, key, sequenced};
use super::reports::Report;
use super::{RedisBroker, live};
use crate::broker::channels::new_epoch;
use crate::broker::{AckError, BrokerError, Sequenced, Snapshot};
use crate::fanout::{DroppedReport, Feed, Outbox, dropped_report};
use crate::metrics::Metrics;
use crate::protocol::ChannelName;
use crate::protocol::client::Since;
use crate::protocol::server::Subscribed;

/// A channel this replica mirrors: how many local subscriptions hold it, and its first load.
pub(super) struct Attachment {
    users: usize,
    ready: Arc<OnceCell<()>>,
}

/// `epoch \n seq \n emitted_ms \n produced_ms \n body`, as the publish script sends it.
pub(super) fn parse_live(payload: &Bytes) -> Option<(&str, Sequenced)> {
    let mut parts = payload.splitn(5, |b| *b == b'\n');
    let epoch = std::str::from_utf8(parts.next()?).ok()?;
    let number = |raw: &[u8]| std::str::from_utf8(raw).ok()?.parse::<u64>().ok();
    let seq = number(parts.next()?)?;
    let emitted_ms = number(parts.next()?)?;
    let produced_ms = number(parts.next()?);
    // The body is the message's tail, shared rather than copied.
    let body = payload.slice_ref(parts.next()?);
    Some((
        epoch,
        Sequenced {
            seq,
            body,
            emitted_ms,
            produced_ms,
        },
    ))
}

impl RedisBroker {
    pub(super) fn attachments(&self) -> MutexGuard<'_, HashMap<ChannelName, Attachment>> {
        self.attachments.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The channels this replica mirrors now.
    pub(crate) fn attached(&self) -> Vec<ChannelName> {
        self.attachments().keys().cloned().collect()
    }

    pub(super) fn is_attached(&self, name: &ChannelName) -> bool {
        self.attachments().contains_key(name)
    }

    /// The channels attached now, and those of them whose first load is done (their pub/sub
    /// subscription was confirmed).
    pub(super) fn attached_and_loaded(&self) -> (HashSet<ChannelName>, HashSet<ChannelName>) {
        let attachments = self.attachments();
        let loaded = attachments
            .iter()
            .filter(|(_, attachment)| attachment.ready.initialized())
            .map(|(name, _)| name.clone())
            .collect();
        (attachments.keys().cloned().collect(), loaded)
    }

    /// Tests only: subscribes (`true`) or unsubscribes the pub/sub connection to `name` without
    /// touching the attachments, as a lost command would; reconciliation is to repair it.
    #[doc(hidden)]
    pub async fn stray_subscription(&self, name: &ChannelName, subscribe: bool) {
        let (done, handled) = tokio::sync::oneshot::channel();
        if self
            .live
            .send(live::Command::Stray(name.clone(), subscribe, done))
            .await
            .is_ok()
        {
            let _ = handled.await;
        }
    }

    /// Subscribes a local connection: the first one here attaches the channel (pub/sub first,
    /// then the stream, merged by seq), later ones join the mirror at once.
    pub async fn subscribe(
        &self,
        name: &ChannelName,
        since: Option<&Since>,
        outbox: &Arc<Outbox>,
        run_context: bool,
    ) -> Result<Option<Subscribed>, BrokerError> {
        let ready = {
            let mut attachments = self.attachments();
            let attachment = attachments
                .entry(name.clone())
                .or_insert_with(|| Attachment {
                    users: 0,
                    ready: Arc::default(),
                });
            attachment.users += 1;
            Arc::clone(&attachment.ready)
        };
        if let Err(error) = ready.get_or_try_init(|| self.attach(name)).await {
            self.release(name).await;
            return Err(error);
        }
        let subscribed = self.mirror.subscribe(name, since, outbox, run_context);
        if subscribed.is_none() {
            self.release(name).await;
        }
        Ok(subscribed)
    }

    pub(super) async fn attach(&self, name: &ChannelName) -> Result<(), BrokerError> {
        let feed = Arc::new(Feed {
            channel: name.clone(),
            epoch: "".into(),
            deliveries: self.deliveries.clone(),
        });
        self.mirror.prepare(name, &feed);
        let (confirmed, reply) = tokio::sync::oneshot::channel();
        self.live
            .send(live::Command::Subscribe(name.clone(), confirmed))
            .await
            .map_err(|_| BrokerError::Unavailable("the pub/sub task stopped".into()))?;
        reply
            .await
            .map_err(|_| BrokerError::Unavailable("the pub/sub task stopped".into()))??;
        let generation = self.generation.load(Ordering::Acquire);
        let snapshot = self.snapshot(name, 1).await?;
        self.mirror.merge(name, snapshot);
        // The pub/sub link was made again while the stream was read: the reconnect skipped this
        // channel (still loading), so read what was published meanwhile.
        if self.generation.load(Ordering::Acquire) != generation {
            self.resync(name).await?;
        }
        Ok(())
    }

    /// One local subscription fewer; the last one detaches the channel and unsubscribes the
    /// pub/sub connection from it. That command is never dropped: when the queue is full it waits
    /// for room (a stale subscription would count the channel's events as offered to someone).
    pub(super) async fn release(&self, name: &ChannelName) {
        let waiting = {
            let mut attachments = self.attachments();
            let Some(attachment) = attachments.get_mut(name) else {
                return;
            };
            attachment.users -= 1;
            if attachment.users > 0 {
                return;
            }
            attachments.remove(name);
            self.mirror.detach(name);
            match self.live.try_send(live::Command::Unsubscribe(name.clone())) {
                Err(mpsc::error::TrySendError::Full(command)) => command,
                // Queued, or the pub/sub task has stopped (and its connection with it).
                Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => return,
            }
        };
        // Out of order is harmless: the task unsubscribes only a channel still not attached.
        let _ = self.live.send(waiting).await;
    }

    pub async fn unsubscribe(&self, name: &ChannelName, outbox: &Arc<Outbox>) -> bool {
        let removed = self.mirror.unsubscribe(name, outbox);
        if removed {
            self.release(name).await;
        }
        removed
    }

    pub fn ack(
        &self,
        name: &ChannelName,
        seq: u64,
        outbox: &Arc<Outbox>,
        metrics: &Metrics,
    ) -> Result<u64, AckError> {
        let newly = self.mirror.ack(name, seq, outbox)?;
        if newly > 0
            && let Some((epoch, _)) = self.mirror.position(name)
            && let Err(mpsc::error::TrySendError::Full(_)) =
                self.reports
                    .try_send(Report::Acked(name.clone(), epoch, seq))
        {
            dropped_report(metrics, DroppedReport::Acked);
        }
        Ok(newly)
    }

    /// The channel's epoch, last seq and entries from `from` on, read atomically. A channel
    /// nobody published to has epoch `""`: reading it writes nothing. When Redis no longer holds
    /// what this replica saw (the channel is gone, or its last seq went back), the channel gets a
    /// new epoch first (`renew.lua`) and is read again from its start.
    pub(crate) async fn snapshot(
        &self,
        name: &ChannelName,
        from: u64,
    ) -> Result<Snapshot, BrokerError> {
        let seen = self.mirror.position(name);
        let snapshot = self.read(name, from).await?;
        let Some((seen_epoch, seen_last)) = seen else {
            return Ok(snapshot);
        };
        let lost = snapshot.epoch.is_empty()
            || (snapshot.epoch == seen_epoch && snapshot.last_seq < seen_last);
        if seen_epoch.is_empty() || !lost {
            return Ok(snapshot);
        }
        let _epoch: String = self
            .scripts
            .renew
            .key(key(name, "meta"))
            .arg(&*seen_epoch)
            .arg(seen_last)
            .arg(new_epoch())
            .arg(self.history.max_age.as_millis() as u64)
            .invoke_async(&mut self.conn())
            .await?;
        self.read(name, 1).await
    }

    /// One read of the channel (`snapshot.lua`, read-only).
    async fn read(&self, name: &ChannelName, from: u64) -> Result<Snapshot, BrokerError> {
        let keys = Keys::of(name);
        let (epoch, last_seq, entries): (String, u64, Vec<Entry>) = self
            .scripts
            .snapshot
            .key(keys.log())
            .key(keys.meta())
            .arg(from)
            .invoke_async(&mut self.conn())
            .await?;
        let events = entries
            .into_iter()
            .filter_map(|(id, fields)| sequenced(&id, &fields))
            .collect();
        Ok(Snapshot {
            epoch: epoch.into(),
            last_seq,
            events,
        })
    }

    /// Applies one live pub/sub message to the mirror; `false` when the stream must be read.
    pub(crate) fn apply_live(&self, name: &str, payload: &Bytes) -> bool {
        let Some((epoch, event)) = parse_live(payload) else {
            tracing::warn!(channel = %name, "Ignored a malformed live message.");
            return true;
        };
        self.mirror.apply(name, epoch, event)
    }

    /// Brings the mirror of `name` up to the stream (after a gap, a new epoch or a reconnect).
    pub(crate) async fn resync(&self, name: &ChannelName) -> Result<(), BrokerError> {
        let from = self.mirror.position(name).map_or(1, |(_, last)| last + 1);
        let mut snapshot = self.snapshot(name, from).await?;
        if self
            .mirror
            .position(name)
            .is_some_and(|(epoch, _)| epoch != snapshot.epoch)
        {
            snapshot = self.read(name, 1).await?;
        }
        self.mirror.merge(name, snapshot);
        Ok(())
    }
}
