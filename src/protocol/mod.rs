//! The wire formats: producer events in, client frames in, server frames out.
//! Everything here is pure: decoding and encoding, no I/O.

pub mod channel;
pub mod client;
pub mod event;
pub mod run;
pub mod server;
pub mod upstream;

pub use channel::{ChannelKind, ChannelName};
