//! The command-line tools beside the gateway, which use it from outside like any client: `probe`
//! (an end-to-end delivery check) and `bench` (the load generator behind docs/performance.md).

pub mod bench;
pub mod client;
pub mod probe;
