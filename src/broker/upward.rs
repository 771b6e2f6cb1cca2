//! What flows up from the broker to ingest (Redis mode), through bounded channels: registrations
//! announced by any replica, and the events read from the ingest stream, answered per entry.

use tokio::sync::{mpsc, oneshot};

use super::BrokerError;
use crate::protocol::event::Event;
use crate::protocol::run::RunTarget;

/// Messages that flow up from the broker to ingest, through bounded channels (Redis mode).
pub struct Upward {
    pub announcements: mpsc::Receiver<Announcement>,
    pub stream: mpsc::Receiver<StreamEvents>,
}

/// What the broker tells ingest about runs.
#[derive(Debug)]
pub enum Announcement {
    /// A run was registered (on any replica): release the events held for it here.
    Registered { run_id: String, target: RunTarget },
    /// Registrations may have been missed (the pub/sub link was down): ask about every held run.
    Resync,
}

/// The valid events of one read of the Redis ingest stream, in stream order, for ingest to take
/// together; the reader acknowledges each entry answered [`Taken::Done`].
#[derive(Debug)]
pub struct StreamEvents {
    pub entries: Vec<StreamEvent>,
    /// One answer per entry, in order, up to the first error: the entries after it are left for
    /// later.
    pub reply: oneshot::Sender<Vec<Result<Taken, BrokerError>>>,
}

/// One valid event read from the Redis ingest stream.
#[derive(Debug)]
pub struct StreamEvent {
    pub event: Event,
    /// The stream entry id, which makes a second publish of the entry a duplicate.
    pub entry_id: String,
    /// When the entry was added (wall-clock ms).
    pub added_ms: u64,
}

/// What became of one ingest stream entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// Published, a duplicate, or dead-lettered: acknowledge it.
    Done,
    /// Its run is not registered yet, or earlier events of the run wait: leave it pending.
    Later,
}
