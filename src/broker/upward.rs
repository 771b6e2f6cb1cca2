//! What flows up from the broker to ingest (Redis mode), through bounded channels: registrations
//! announced by any replica, and the events read from the ingest stream, each answered.

use tokio::sync::{mpsc, oneshot};

use super::BrokerError;
use crate::protocol::event::Event;
use crate::protocol::run::RunTarget;

/// Messages that flow up from the broker to ingest, through bounded channels (Redis mode).
pub struct Upward {
    pub announcements: mpsc::Receiver<Announcement>,
    pub stream: mpsc::Receiver<StreamEvent>,
}

/// What the broker tells ingest about runs.
#[derive(Debug)]
pub enum Announcement {
    /// A run was registered (on any replica): release the events held for it here.
    Registered { run_id: String, target: RunTarget },
    /// Registrations may have been missed (the pub/sub link was down): ask about every held run.
    Resync,
}

/// One valid event read from the Redis ingest stream, for ingest to take; the reader
/// acknowledges the entry once the answer is [`Taken::Done`].
#[derive(Debug)]
pub struct StreamEvent {
    pub event: Event,
    /// The stream entry id, which makes a second publish of the entry a duplicate.
    pub entry_id: String,
    /// When the entry was added (wall-clock ms).
    pub added_ms: u64,
    pub reply: oneshot::Sender<Result<Taken, BrokerError>>,
}

/// What became of one ingest stream entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// Published, a duplicate, or dead-lettered: acknowledge it.
    Done,
    /// Its run is not registered yet, or earlier events of the run wait: leave it pending.
    Later,
}
