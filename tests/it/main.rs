//! The integration tests: each module drives a real gateway over real sockets.
// Tests fail loudly: unwrap is the assertion.
#![allow(clippy::unwrap_used)]

mod abuse;
mod agui;
mod agui_delivery;
mod agui_stream;
mod agui_support;
mod auth;
mod bad_input;
mod delivery;
mod failover;
mod faults;
mod held;
mod inspect;
mod ledger_snapshot;
mod operations;
mod process;
mod redis_budgets;
mod redis_cluster;
mod replicas;
mod resolution;
mod resume;
mod run_stream;
mod security;
mod shutdown;
mod slow_consumer;
mod sse;
mod support;
mod tidy;
mod traces;
mod upstream;
mod watchdog;
