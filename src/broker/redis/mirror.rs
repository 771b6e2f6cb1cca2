//! The channels this replica's clients watch, mirrored into a local channel store: the first
//! local subscriber attaches a channel (pub/sub first, then the stream, merged by seq), the last one
//! detaches it; live messages and resyncs after a gap keep the mirror in seq order.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};

use bytes::Bytes;
use tokio::sync::OnceCell;

use super::keys::{Entry, Keys, sequenced};
use super::publish::new_epoch;
use super::reports::Report;
use super::{RedisBroker, live};
use crate::broker::{AckError, BrokerError, Sequenced, Snapshot};
use crate::fanout::{Feed, Outbox};
use crate::protocol::ChannelName;
use crate::protocol::client::Since;
use crate::protocol::server::Subscribed;

/// A channel this replica mirrors: how many local subscriptions hold it, and its first load.
pub(super) struct Attachment {
    users: usize,
    ready: Arc<OnceCell<()>>,
}

/// `epoch \n seq \n emitted_ms \n produced_ms \n body`, as the publish script sends it.
pub(super) fn parse_live(payload: &[u8]) -> Option<(Arc<str>, Sequenced)> {
    let mut parts = payload.splitn(5, |b| *b == b'\n');
    let epoch = std::str::from_utf8(parts.next()?).ok()?;
    let number = |raw: &[u8]| std::str::from_utf8(raw).ok()?.parse::<u64>().ok();
    let seq = number(parts.next()?)?;
    let emitted_ms = number(parts.next()?)?;
    let produced_ms = number(parts.next()?);
    let body = Bytes::copy_from_slice(parts.next()?);
    Some((
        epoch.into(),
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

    /// Subscribes a local connection: the first one here attaches the channel (pub/sub first,
    /// then the stream, merged by seq), later ones join the mirror at once.
    pub async fn subscribe(
        &self,
        name: &ChannelName,
        since: Option<&Since>,
        outbox: &Arc<Outbox>,
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
            self.release(name);
            return Err(error);
        }
        let subscribed = self.mirror.subscribe(name, since, outbox);
        if subscribed.is_none() {
            self.release(name);
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

    /// One local subscription fewer; the last one detaches the channel.
    pub(super) fn release(&self, name: &ChannelName) {
        let mut attachments = self.attachments();
        let Some(attachment) = attachments.get_mut(name) else {
            return;
        };
        attachment.users -= 1;
        if attachment.users == 0 {
            attachments.remove(name);
            self.mirror.detach(name);
            // Queued behind any earlier subscribe, so the order on the pub/sub connection holds.
            // A full queue leaves a stale subscription, whose messages the mirror ignores.
            let _ = self.live.try_send(live::Command::Unsubscribe(name.clone()));
        }
    }

    pub fn unsubscribe(&self, name: &ChannelName, outbox: &Arc<Outbox>) -> bool {
        let removed = self.mirror.unsubscribe(name, outbox);
        if removed {
            self.release(name);
        }
        removed
    }

    pub fn ack(&self, name: &ChannelName, seq: u64, outbox: &Arc<Outbox>) -> Result<u64, AckError> {
        let newly = self.mirror.ack(name, seq, outbox)?;
        if newly > 0
            && let Some((epoch, _)) = self.mirror.position(name)
        {
            let _ = self
                .reports
                .try_send(Report::Acked(name.clone(), epoch, seq));
        }
        Ok(newly)
    }

    /// The channel's epoch, last seq and entries from `from` on, read atomically.
    pub(crate) async fn snapshot(
        &self,
        name: &ChannelName,
        from: u64,
    ) -> Result<Snapshot, BrokerError> {
        let keys = Keys::of(name);
        let (seen_epoch, seen_last) = self
            .mirror
            .position(name)
            .unwrap_or_else(|| (Arc::from(""), 0));
        let mut conn = self.conn();
        let (epoch, last_seq, entries): (String, u64, Vec<Entry>) = self
            .scripts
            .snapshot
            .key(&keys.log)
            .key(&keys.meta)
            .arg(from)
            .arg(new_epoch())
            .arg(self.history.max_age.as_millis() as u64)
            .arg(&*seen_epoch)
            .arg(seen_last)
            .invoke_async(&mut conn)
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
    pub(crate) fn apply_live(&self, name: &ChannelName, payload: &[u8]) -> bool {
        let Some((epoch, event)) = parse_live(payload) else {
            tracing::warn!(channel = %name, "Ignored a malformed live message.");
            return true;
        };
        self.mirror.apply(name, &epoch, event)
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
            snapshot = self.snapshot(name, 1).await?;
        }
        self.mirror.merge(name, snapshot);
        Ok(())
    }
}
