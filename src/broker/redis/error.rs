//! Whose fault a Redis error is, read from its kind and code (never from its text): the link or
//! a Redis that cannot serve now is `Unavailable` (503, retry); a Redis at `maxmemory` refusing a
//! script at its start is `Refused` (503, counted `oom`); anything else, a script error or a reply
//! of the wrong shape, is `Internal` (500, an `ERROR` log: an operator must look).

use std::time::Duration;

use redis::{ErrorKind, RedisError, ServerErrorKind};

use crate::broker::{BrokerError, Refusal};
use crate::telemetry::Throttle;

impl From<RedisError> for BrokerError {
    fn from(error: RedisError) -> Self {
        // Every script declares its flags, so Redis checks memory before the first write and
        // an OOM refusal means nothing of the operation was applied.
        if error.code() == Some("OOM") {
            Self::Refused(Refusal::Oom, error.to_string())
        } else if is_unavailable(&error) {
            Self::Unavailable(error.to_string())
        } else {
            // At most one line per interval: a broken script or key fails every call that
            // reaches it, and each caller answers 500 and counts what it lost.
            static INTERNAL: Throttle = Throttle::every(Duration::from_secs(10));
            if let Some(held_back) = INTERNAL.allow() {
                tracing::error!(%error, held_back, "Redis answered with an error that is ours to fix (held_back more since the last line).");
            }
            Self::Internal(error.to_string())
        }
    }
}

fn is_unavailable(error: &RedisError) -> bool {
    // Replies the client library has no kind for: a script running too long, memory full, too
    // few replicas. Redis cannot serve now; a retry later can succeed.
    matches!(error.code(), Some("BUSY" | "NOREPLICAS"))
        || error.is_io_error()
        || error.is_timeout()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || matches!(
            error.kind(),
            ErrorKind::ClusterConnectionNotFound
                | ErrorKind::Server(
                    ServerErrorKind::BusyLoading
                        | ServerErrorKind::TryAgain
                        | ServerErrorKind::ClusterDown
                        | ServerErrorKind::MasterDown
                        | ServerErrorKind::ReadOnly
                        // Still refused after the script was loaded: a failover in between.
                        | ServerErrorKind::NoScript
                        | ServerErrorKind::Moved
                        | ServerErrorKind::Ask
                )
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_and_failover_are_unavailable_the_rest_is_ours() {
        let io = RedisError::from(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "reset",
        ));
        assert!(matches!(BrokerError::from(io), BrokerError::Unavailable(_)));
        let loading =
            RedisError::from((ErrorKind::Server(ServerErrorKind::BusyLoading), "loading"));
        assert!(matches!(
            BrokerError::from(loading),
            BrokerError::Unavailable(_)
        ));
        let script = RedisError::from((
            ErrorKind::Server(ServerErrorKind::ResponseError),
            "ERR script",
        ));
        assert!(matches!(
            BrokerError::from(script),
            BrokerError::Internal(_)
        ));
        let shape = RedisError::from((ErrorKind::UnexpectedReturnType, "not a number"));
        assert!(matches!(BrokerError::from(shape), BrokerError::Internal(_)));
    }
}
