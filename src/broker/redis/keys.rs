//! Redis key names: the keys of one channel (its hash tag keeps them in one Cluster slot), the
//! shared keys across channels, and how a stream entry's fields are read.

use std::collections::HashMap;

use bytes::Bytes;

use crate::broker::Sequenced;
use crate::protocol::ChannelName;

/// The keys of one channel, made in one string: a publish names six of them, and each delivery
/// report three.
pub struct Keys {
    text: String,
    /// Where each key ends in `text`, in the order of [`SUFFIXES`].
    ends: [usize; 6],
}

const SUFFIXES: [&str; 6] = ["log", "meta", "seen", "delivered", "offered", "live"];

impl Keys {
    pub fn of(name: &ChannelName) -> Self {
        let room = SUFFIXES.iter().map(|s| s.len() + 6).sum::<usize>() + 6 * name.as_str().len();
        let mut text = String::with_capacity(room);
        push_key(&mut text, name, SUFFIXES[0]);
        let prefix = text.len() - SUFFIXES[0].len();
        let mut ends = [text.len(); 6];
        // Each further key copies the first one's prefix (`aw:{name}:`).
        for (end, suffix) in ends.iter_mut().zip(SUFFIXES).skip(1) {
            text.extend_from_within(..prefix);
            text.push_str(suffix);
            *end = text.len();
        }
        Self { text, ends }
    }

    fn nth(&self, i: usize) -> &str {
        let start = i.checked_sub(1).map_or(0, |before| self.ends[before]);
        &self.text[start..self.ends[i]]
    }

    pub fn log(&self) -> &str {
        self.nth(0)
    }

    pub fn meta(&self) -> &str {
        self.nth(1)
    }

    pub fn seen(&self) -> &str {
        self.nth(2)
    }

    pub fn delivered(&self) -> &str {
        self.nth(3)
    }

    pub fn offered(&self) -> &str {
        self.nth(4)
    }

    pub fn live(&self) -> &str {
        self.nth(5)
    }

    /// The channel a `:live` pub/sub name belongs to.
    pub fn channel_of_live(live: &str) -> Option<ChannelName> {
        ChannelName::parse(Self::name_of_live(live)?)
    }

    /// The text of that channel's name, not checked: for a lookup among the channels watched.
    pub fn name_of_live(live: &str) -> Option<&str> {
        live.strip_prefix("aw:{")?.strip_suffix("}:live")
    }
}

/// One key of a channel (`suffix` is one of [`Keys`]' names), for a caller that needs only it.
/// Built at its size: `format!` grows a key several times.
pub fn key(name: &ChannelName, suffix: &str) -> String {
    let mut key = String::with_capacity(name.as_str().len() + suffix.len() + 6);
    push_key(&mut key, name, suffix);
    key
}

fn push_key(text: &mut String, name: &ChannelName, suffix: &str) {
    text.push_str("aw:{");
    text.push_str(name.as_str());
    text.push_str("}:");
    text.push_str(suffix);
}

/// A stream entry as read: id and fields.
pub(super) type Entry = (String, HashMap<String, Bytes>);

/// The run registry: run id → its target as JSON (with its channel), and run id → when its
/// registration expires (ms). One hash tag, so `register.lua` touches one Cluster slot.
pub(super) const RUN_TARGETS: &str = "aw:{runs}:target";
pub(super) const RUN_EXPIRY: &str = "aw:{runs}:expiry";

pub(super) fn run_seen_key(run_id: &str) -> String {
    let mut key = String::with_capacity(run_id.len() + 13);
    key.push_str("aw:runseen:{");
    key.push_str(run_id);
    key.push('}');
    key
}

/// Pub/sub channel on which a registration is announced to every replica.
pub const REGISTERED: &str = "aw:registered";

/// Sorted set of channels by last publish (ms), for the age sweep and `GET /v1/ledger`.
pub(super) const CHANNELS: &str = "aw:channels";

/// The shared dead letters: fields `run_id`, `reason`, `lost_ms`, `event` (the event as sent).
pub const DEADLETTERS: &str = "aw:deadletters";

pub(super) fn seq_of(id: &str) -> Option<u64> {
    id.split('-').next()?.parse().ok()
}

/// One field of a stream entry, as text.
pub(super) fn field<'a>(fields: &'a HashMap<String, Bytes>, key: &str) -> Option<&'a str> {
    std::str::from_utf8(fields.get(key)?).ok()
}

pub(super) fn sequenced(id: &str, fields: &HashMap<String, Bytes>) -> Option<Sequenced> {
    let number = |key: &str| field(fields, key)?.parse::<u64>().ok();
    Some(Sequenced {
        seq: seq_of(id)?,
        body: fields.get("b")?.clone(),
        emitted_ms: number("t")?,
        produced_ms: number("p"),
    })
}
