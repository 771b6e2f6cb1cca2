//! The fault suite: real gateway processes on a real `redis-server` (or a real Redis Cluster), a
//! retrying producer and resuming clients (see `workload`), one fault per scenario, and one row per
//! scenario (see `tally`): a silent miss, an event out of order, an event accepted twice or an
//! unbalanced ledger fails it. `cargo test` runs the short version (a few seconds each);
//! `scripts/faults` runs the full one (`FAULTS_FULL=1`: the load of docs/reliability.md) and
//! prints the rows as one table.

mod cluster;
mod scenarios;
mod tally;
mod wire;
mod workload;

/// How hard and how long a scenario pushes.
#[derive(Clone, Copy)]
struct Scale {
    load: workload::Load,
    /// Load before the fault, and after it before the producer stops.
    before: std::time::Duration,
    after: std::time::Duration,
    /// Connections held in the idle-then-SIGTERM scenario.
    idle_connections: usize,
}

fn scale() -> Scale {
    use std::time::Duration;
    if std::env::var_os("FAULTS_FULL").is_some() {
        Scale {
            load: workload::Load {
                threads: 50,
                clients: 200,
                rate: 400.0,
                concurrent_retries: false,
                slow_readers: 0,
            },
            before: Duration::from_secs(5),
            after: Duration::from_secs(5),
            idle_connections: 15_000,
        }
    } else {
        Scale {
            load: workload::Load {
                threads: 4,
                clients: 12,
                rate: 60.0,
                concurrent_retries: false,
                slow_readers: 0,
            },
            before: Duration::from_millis(800),
            after: Duration::from_millis(1200),
            idle_connections: 1_000,
        }
    }
}
