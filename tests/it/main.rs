//! The integration tests: each module drives a real gateway over real sockets.
// Tests fail loudly: unwrap is the assertion.
#![allow(clippy::unwrap_used)]

mod abuse;
mod agui;
mod agui_stream;
mod agui_support;
mod agui_ws;
mod auth;
mod bad_input;
mod delivery;
mod failover;
mod faults;
mod held;
mod ledger_snapshot;
mod operations;
mod process;
mod redis_budgets;
mod replicas;
mod resolution;
mod resume;
mod security;
mod shutdown;
mod slow_consumer;
mod support;
mod tidy;
mod traces;
mod upstream;
mod watchdog;
