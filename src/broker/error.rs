//! Why a broker operation could not be done, by whose fault.

use crate::metrics::Label;

/// Why a broker operation could not be done, by whose fault: `Unavailable` is the broker's
/// (I/O, timeout: answer 503, the caller retries); `Refused` is a reachable broker that cannot
/// take a write now (answer 503, counted by reason); `Internal` is ours (a script error, a reply
/// we cannot read: answer 500 and log an `ERROR`).
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    #[error("the broker (Redis) is unavailable: {0}")]
    Unavailable(String),
    #[error("the broker (Redis) refused the write ({reason}): {1}", reason = .0.as_str())]
    Refused(Refusal, String),
    #[error("the broker (Redis) failed: {0}")]
    Internal(String),
}

/// Why a reachable broker refused a write, counted in `agentwire_broker_refused_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Redis is at `maxmemory` (with `noeviction`): nothing is written until it has room.
    Oom,
}

impl Label for Refusal {
    const ALL: &'static [Self] = &[Self::Oom];

    fn as_str(self) -> &'static str {
        match self {
            Self::Oom => "oom",
        }
    }
}
