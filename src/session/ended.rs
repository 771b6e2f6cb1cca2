//! Why a connection ended, counted in `agentwire_connections_closed_total{reason}`, and whether a
//! slow consumer's 4008 reached its socket, counted in `agentwire_slow_consumer_closes_total{close}`.

use crate::metrics::Label;

/// Why a connection ended, as counted in `agentwire_connections_closed_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    ClientClosed,
    /// The TCP connection ended without a close frame.
    ClientGone,
    HelloTimeout,
    HelloMissing,
    ClientTimeout,
    TooLarge,
    ProtocolError,
    /// The client stopped taking what it is sent: its queue overflowed, or a write to its socket
    /// did not finish within `session.write_timeout`. Closed with 4008 when the socket takes it.
    SlowConsumer,
    Shutdown,
    /// The socket refused a write with an error (a reset, a broken pipe): no close is possible.
    WriteFailed,
    /// `hello`'s token was missing or refused (4003).
    Unauthorized,
    /// The connection's token expired without a `refresh` (4004).
    TokenExpired,
    /// A frame begun and not finished within `session.frame_timeout` (1008).
    FrameTimeout,
    /// More messages than `session.message_rate` allows (4029).
    RateLimited,
    /// A text message that is not UTF-8 (1007).
    InvalidUtf8,
}

impl Label for Ended {
    const ALL: &'static [Self] = &[
        Self::ClientClosed,
        Self::ClientGone,
        Self::HelloTimeout,
        Self::HelloMissing,
        Self::ClientTimeout,
        Self::TooLarge,
        Self::ProtocolError,
        Self::SlowConsumer,
        Self::Shutdown,
        Self::WriteFailed,
        Self::Unauthorized,
        Self::TokenExpired,
        Self::FrameTimeout,
        Self::RateLimited,
        Self::InvalidUtf8,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::ClientClosed => "client_closed",
            Self::ClientGone => "client_gone",
            Self::HelloTimeout => "hello_timeout",
            Self::HelloMissing => "hello_missing",
            Self::ClientTimeout => "client_timeout",
            Self::TooLarge => "too_large",
            Self::ProtocolError => "protocol_error",
            Self::SlowConsumer => "slow_consumer",
            Self::Shutdown => "shutdown",
            Self::WriteFailed => "write_failed",
            Self::Unauthorized => "unauthorized",
            Self::TokenExpired => "token_expired",
            Self::FrameTimeout => "frame_timeout",
            Self::RateLimited => "rate_limited",
            Self::InvalidUtf8 => "invalid_utf8",
        }
    }
}

/// Whether a slow consumer's close frame (4008) was written to its socket, so the client reads it
/// if it reads on, or the socket did not take it within `session.write_timeout` (or refused it) and
/// the connection was reset (the client sees 1006).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseSent {
    Sent,
    NotSent,
}

impl Label for CloseSent {
    const ALL: &'static [Self] = &[Self::Sent, Self::NotSent];

    fn as_str(self) -> &'static str {
        match self {
            Self::Sent => "sent",
            Self::NotSent => "not_sent",
        }
    }
}
