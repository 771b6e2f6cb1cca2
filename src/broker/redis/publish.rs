//! Publishing into channels: one script call sequences events of one request for one channel, in
//! order, each deduped by `event_id` and ingest entry id, appended to `:log`, counted in the `:meta`
//! ledger and `PUBLISH`ed to `:live`; then the channel is trimmed. A request's calls for its
//! channels go in one pipeline (one per slot on a Cluster).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use redis::{Cmd, FromRedisValue, Value};

use super::RedisBroker;
use super::keys::Keys;
use super::reports::Report;
use crate::broker::channels::new_epoch;
use crate::broker::{BrokerError, Outcome, Published, ToPublish, now_ms};
use crate::ledger::LostReason;
use crate::protocol::ChannelName;
use crate::protocol::event::{Event, EventType};
use crate::protocol::server;

/// Events sequenced into one channel by one script call: the script blocks Redis while it runs,
/// so a request's many events for one channel go in calls of at most this many, one after the
/// other (in order).
const PER_CALL: usize = 100;

/// One channel's events in a publish, and what became of them so far.
struct ChannelPublish<'a> {
    name: &'a ChannelName,
    events: Vec<(&'a Event, Option<&'a str>)>,
    outcomes: Vec<Outcome>,
    /// What stopped the channel's calls: none of its events from there on was answered sequenced
    /// (a call whose answer timed out may still have run: see `event_id`).
    error: Option<BrokerError>,
}

impl<'a> ChannelPublish<'a> {
    fn new(name: &'a ChannelName) -> Self {
        Self {
            name,
            events: Vec::new(),
            outcomes: Vec::new(),
            error: None,
        }
    }

    /// The events of call `round`, if it has them and nothing stopped it.
    fn chunk(&self, round: usize) -> Option<&[(&'a Event, Option<&'a str>)]> {
        let events = round_of(&self.events, round);
        (self.error.is_none() && !events.is_empty()).then_some(events)
    }
}

/// The events of call `round` among `events` (none past the last call).
fn round_of<T>(events: &[T], round: usize) -> &[T] {
    let from = (round * PER_CALL).min(events.len());
    &events[from..events.len().min(from + PER_CALL)]
}

impl RedisBroker {
    /// Sequences `events` into `name`, in their order: one script call per [`PER_CALL`] events.
    /// The outcomes of the events sequenced, in order, and the error that stopped the rest (none
    /// of them was answered sequenced). `entry` names where an event came from ([`crate::broker::Broker::publish`]).
    pub async fn publish(
        &self,
        name: &ChannelName,
        events: &[(&Event, Option<&str>)],
    ) -> (Vec<Outcome>, Option<BrokerError>) {
        let mut channel = ChannelPublish::new(name);
        channel.events.extend_from_slice(events);
        let mut channels = [channel];
        self.sequence(&mut channels).await;
        let [channel] = channels;
        (channel.outcomes, channel.error)
    }

    /// Sequences the events of one request or read, each into its channel, in their order there.
    /// One result per event, in the order given.
    pub async fn publish_all(
        &self,
        events: &[impl ToPublish],
    ) -> Vec<Result<Outcome, BrokerError>> {
        let mut channels: Vec<ChannelPublish> = Vec::new();
        let mut at: Vec<usize> = Vec::with_capacity(events.len());
        let mut index: HashMap<&ChannelName, usize> = HashMap::new();
        for item in events {
            let name = item.channel();
            let c = *index.entry(name).or_insert_with(|| {
                channels.push(ChannelPublish::new(name));
                channels.len() - 1
            });
            channels[c].events.push((item.event(), item.entry()));
            at.push(c);
        }
        self.sequence(&mut channels).await;
        let mut outcomes: Vec<_> = channels
            .into_iter()
            .map(|channel| (channel.outcomes.into_iter(), channel.error))
            .collect();
        (at.into_iter())
            .map(|c| {
                let (sequenced, error) = &mut outcomes[c];
                match sequenced.next() {
                    Some(outcome) => Ok(outcome),
                    None => Err(error.clone().unwrap_or_else(|| {
                        BrokerError::Internal("an event got no publish answer".into())
                    })),
                }
            })
            .collect()
    }

    /// The script calls of every channel, in rounds: each channel's first call in one pipeline,
    /// then the second calls of the channels that have more (a channel whose call failed stops).
    async fn sequence(&self, channels: &mut [ChannelPublish<'_>]) {
        if !self.is_up() {
            for channel in channels.iter_mut() {
                channel.error = Some(BrokerError::Unavailable("Redis is not answering".into()));
            }
            return;
        }
        let now = now_ms();
        for round in 0.. {
            let calling: Vec<usize> = (0..channels.len())
                .filter(|&c| channels[c].chunk(round).is_some())
                .collect();
            if calling.is_empty() {
                return;
            }
            let calls = || {
                (calling.iter())
                    .filter_map(|&c| {
                        let channel = &channels[c];
                        Some(self.publish_call(channel.name, channel.chunk(round)?, now))
                    })
                    .collect()
            };
            // Each call answers for its channel alone: on a Cluster a slot whose node failed
            // fails its channels, and the channels of the other slots were sequenced.
            let replies = self.call_each(&self.scripts.publish, calls).await;
            for (&c, reply) in calling.iter().zip(replies) {
                let channel = &mut channels[c];
                let answered = match reply {
                    Ok(reply) => self.sequenced(channel, round, now, reply).await,
                    Err(error) => Err(error.into()),
                };
                if let Err(error) = answered {
                    channel.error = Some(error);
                }
            }
        }
    }

    fn publish_call(&self, name: &ChannelName, events: &[(&Event, Option<&str>)], now: u64) -> Cmd {
        let keys = Keys::of(name);
        let bodies: Vec<Vec<u8>> = (events.iter())
            .map(|(event, _)| server::event_body(event, name))
            .collect();
        // The arguments below: eight, then per event its body and up to four more (its produced
        // time, how many ids and the ids: usually under a hundred bytes; longer grow the command).
        let bytes =
            64 + keys.live().len() + bodies.iter().map(|body| body.len() + 100).sum::<usize>();
        let mut call = super::evalsha(
            &self.scripts.publish,
            &[
                keys.log(),
                keys.meta(),
                keys.seen(),
                keys.delivered(),
                keys.offered(),
            ],
            8 + 5 * events.len(),
            bytes,
        );
        call.arg(now)
            .arg(self.history.max_events)
            .arg(now.saturating_sub(self.history.max_age.as_millis() as u64))
            .arg(now.saturating_sub(self.dedupe_window.as_millis() as u64))
            // Fresh for every call, so a later call that lands on another Redis process (a
            // failover between two calls of one request) starts a different epoch.
            .arg(new_epoch())
            .arg(keys.live())
            .arg(self.dedupe_capacity.max(1))
            .arg(self.publish_command());
        for ((event, entry), body) in events.iter().zip(bodies) {
            let produced = event
                .ts
                .as_deref()
                .filter(|ts| ts.ends_with('Z'))
                .and_then(|ts| humantime::parse_rfc3339_weak(ts).ok())
                .and_then(|at| at.duration_since(std::time::SystemTime::UNIX_EPOCH).ok())
                .map(|d| d.as_millis() as u64);
            let dedupe_id = event.dedupe_id();
            call.arg(body);
            match produced {
                Some(ms) => call.arg(ms),
                None => call.arg(""),
            };
            call.arg(usize::from(dedupe_id.is_some()) + usize::from(entry.is_some()));
            if let Some(event_id) = dedupe_id {
                call.arg(format!("e:{event_id}"));
            }
            if let Some(entry) = entry {
                call.arg(format!("x:{entry}"));
            }
        }
        call
    }

    /// Reads the answer to `channel`'s call `round` into its outcomes.
    async fn sequenced(
        &self,
        channel: &mut ChannelPublish<'_>,
        round: usize,
        now: u64,
        reply: Value,
    ) -> Result<(), BrokerError> {
        let answer = Vec::<u8>::from_redis_value(reply).map_err(redis::RedisError::from)?;
        let events = round_of(&channel.events, round);
        let unreadable = || {
            BrokerError::Internal(format!(
                "the publish script's answer for {} events is unreadable",
                events.len()
            ))
        };
        let answer = std::str::from_utf8(&answer).map_err(|_| unreadable())?;
        let mut fields = answer.split(' ');
        let epoch = fields.next().ok_or_else(unreadable)?;
        let mut number = || fields.next().and_then(|field| field.parse::<u64>().ok());
        let (unseen, subscribed) = number().zip(number()).ok_or_else(unreadable)?;
        let seqs: Vec<u64> = std::iter::from_fn(number).take(events.len() + 1).collect();
        if seqs.len() != events.len() {
            return Err(BrokerError::Internal(format!(
                "the publish script answered {} seqs for {} events",
                seqs.len(),
                events.len()
            )));
        }
        self.count_lost(channel.name, unseen, subscribed);
        let epoch: Arc<str> = epoch.into();
        for ((event, _), seq) in events.iter().zip(seqs) {
            if seq == 0 {
                channel.outcomes.push(Outcome::Duplicate);
                continue;
            }
            self.counters.emitted.fetch_add(1, Ordering::Relaxed);
            // The channel index and the run's activity are not in the script: they span channels
            // (Redis Cluster slots). One report, batched by the report task. Waits for room: a
            // dropped one would let another replica call this run stalled. (The queue closes
            // only at shutdown, after ingest has stopped.)
            let _ = self
                .reports
                .send(Report::Published {
                    channel: channel.name.clone(),
                    ms: now,
                    run: event.run_id.clone().map(|run_id| {
                        let ended = matches!(
                            event.kind,
                            EventType::AgentCompleted | EventType::AgentError
                        );
                        (run_id, ended)
                    }),
                })
                .await;
            channel.outcomes.push(Outcome::Published(Published {
                seq,
                epoch: Arc::clone(&epoch),
            }));
        }
        Ok(())
    }

    pub(super) fn count_lost(&self, name: &ChannelName, unseen: u64, subscribed: u64) {
        self.counters.lost[LostReason::ExpiredUnseen as usize].fetch_add(unseen, Ordering::Relaxed);
        self.counters.lost[LostReason::ExpiredSubscribed as usize]
            .fetch_add(subscribed, Ordering::Relaxed);
        if subscribed > 0 {
            tracing::warn!(channel = %name, lost = subscribed, reason = "expired_subscribed", "Events left history undelivered while someone was subscribed.");
        }
    }
}
