//! Why a broker operation could not be done, by whose fault.

/// Why a broker operation could not be done, by whose fault: `Unavailable` is the broker's
/// (I/O, timeout: answer 503, the caller retries); `Internal` is ours (a script error, a reply we
/// cannot read: answer 500 and log an `ERROR`).
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("the broker (Redis) is unavailable: {0}")]
    Unavailable(String),
    #[error("the broker (Redis) failed: {0}")]
    Internal(String),
}
