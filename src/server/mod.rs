//! The listener: HTTP/1.1 with upgrades on one port, background housekeeping, and graceful
//! shutdown in three parts: decide (the caller's `stop` token), tell (readiness turns 503 at once,
//! then after `shutdown.drain_delay` every session gets close 1012 at a random moment within
//! `shutdown.close_window`), wait (the session tracker, bounded by `close_window + timeout`), then
//! drain in the order events flow: ingest stops (HTTP connections, housekeeping), events still held
//! for their run are dead-lettered, and the broker's tasks end (the webhook queue drained within
//! `upstream::DRAIN`, the rest counted), then ingest's consumer.
//! Hyper forgets upgraded connections, so sessions are tracked apart from HTTP connections.

mod header_timer;
mod housekeeping;
mod routes;

use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Gateway;
use crate::metrics;
use crate::session;
use crate::shutdown::Signal;
use header_timer::HeaderTimer;

/// Raises the open-file soft limit to the hard limit (each connection is a file) and returns it.
pub fn raise_file_limit() -> Option<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            return limit.maximum;
        }
    }
    limit.current
}

/// Why an accept failed, counted in `agentwire_accept_errors_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptError {
    /// The process reached its open-file limit.
    FdLimit,
    Other,
}

impl metrics::Label for AcceptError {
    const ALL: &'static [Self] = &[Self::FdLimit, Self::Other];

    fn as_str(self) -> &'static str {
        match self {
            Self::FdLimit => "fd_limit",
            Self::Other => "other",
        }
    }
}

/// The two listeners: the public door for browsers, the internal one for producers, operators and
/// Prometheus.
pub struct Doors {
    pub public: TcpListener,
    pub internal: TcpListener,
}

/// Which door a connection came through; it decides which routes exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Door {
    Public,
    Internal,
}

/// Serves until `stop` is cancelled, then drains and returns.
pub async fn run(gateway: Arc<Gateway>, doors: Doors, stop: CancellationToken) {
    let counted = &gateway.metrics;
    metrics::export::<session::Ended>(&counted.connections_closed);
    metrics::export::<session::CloseSent>(&counted.slow_consumer_closes);
    metrics::export::<session::Resume>(&counted.resumes);
    metrics::export::<routes::BodyRefusal>(&counted.events_rejected);
    metrics::export::<AcceptError>(&counted.accept_errors);
    metrics::export::<crate::ingest::RunRefusal>(&counted.runs_refused);
    metrics::export::<routes::UpgradeRefused>(&counted.upgrades_refused);
    metrics::export::<routes::RequestRefusal>(&counted.api_refused);
    metrics::export::<routes::StreamRefusal>(&counted.run_streams_refused);
    metrics::export::<crate::ingest::run_stream::CloseReason>(&counted.runs_closed);
    if gateway.config.auth.authenticates_browsers() {
        tracing::info!("Browsers authenticate with a JWT in hello.");
    } else if gateway.config.auth.insecure {
        tracing::warn!(
            "auth.insecure: anyone who reaches the public door may open /ws and say who they are."
        );
    } else {
        tracing::warn!(
            "Protected mode: browser authentication is not configured, so only loopback clients may open /ws (auth.insecure = true opens it to every peer)."
        );
    }
    // One tracker per stage, each drained at shutdown in the order the data flows.
    let http = TaskTracker::new();
    let housekeeping = TaskTracker::new();
    let housekeeping_stop = CancellationToken::new();
    housekeeping.spawn(self::housekeeping::run(
        Arc::clone(&gateway),
        housekeeping_stop.clone(),
    ));
    // Stopped only once the sessions have ended, so their last deliveries are recorded.
    let broker = TaskTracker::new();
    let broker_stop = CancellationToken::new();
    let ingest = TaskTracker::new();
    if let Some(upward) =
        gateway
            .broker
            .start(&broker, broker_stop.clone(), Arc::clone(&gateway.metrics))
    {
        crate::ingest::consume(Arc::clone(&gateway), upward, &ingest);
    }

    accept_until(&gateway, &doors, &http, stop.cancelled()).await;

    gateway.shutdown.start_draining();
    tracing::info!(drain_delay = ?gateway.config.shutdown.drain_delay, "Draining: /readyz is 503, new WebSocket upgrades are refused.");
    accept_until(
        &gateway,
        &doors,
        &http,
        tokio::time::sleep(gateway.config.shutdown.drain_delay),
    )
    .await;
    drop(doors);

    let sessions = &gateway.shutdown;
    let window = gateway.config.shutdown.close_window;
    tracing::info!(sessions = sessions.tracker.len(), close_window = ?window, "Closing sessions with 1012.");
    // Sessions, event streams and HTTP connections alike: an idle keep-alive connection closes,
    // a request being answered is answered first.
    sessions.close.raise();
    housekeeping_stop.cancel();
    sessions.tracker.close();
    let bound = window + gateway.config.shutdown.timeout;
    if tokio::time::timeout(bound, sessions.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            left = sessions.tracker.len(),
            "Sessions did not end within shutdown.close_window + shutdown.timeout."
        );
    }
    // Ingest stops: open HTTP requests finish (a registration's release with them) and
    // housekeeping ends, so nothing takes an event in or holds one any more.
    // Streams bound to one run were told with the sessions and close their open runs, through ingest.
    let deadline = tokio::time::Instant::now() + INGEST_BOUND;
    for (stage, tracker) in [
        ("run streams", &gateway.shutdown.run_streams),
        ("http", &http),
        ("housekeeping", &housekeeping),
    ] {
        wait_stage(stage, tracker, deadline).await;
    }
    // What is still held for its run is dead-lettered, each event counted lost `unresolved`.
    if tokio::time::timeout_at(deadline, crate::ingest::dead_letter_held(&gateway))
        .await
        .is_err()
    {
        tracing::warn!(
            "Dead letters of held events were not all written within the bound (they are counted lost)."
        );
    }
    // Then the broker's tasks: in Redis mode they write the last deliveries and acks, in
    // embedded mode the webhook worker drains the HLink queue within `upstream::DRAIN` and counts
    // what it could not deliver; ingest's consumer ends after them.
    broker_stop.cancel();
    let deadline = tokio::time::Instant::now() + crate::upstream::DRAIN + Duration::from_secs(1);
    for (stage, tracker) in [("broker", &broker), ("ingest", &ingest)] {
        wait_stage(stage, tracker, deadline).await;
    }
    tracing::info!("Stopped.");
}

/// How long open HTTP requests and housekeeping have, together with the dead-lettering of held
/// events, once the sessions have ended.
const INGEST_BOUND: Duration = Duration::from_secs(2);

/// Closes a stage's tracker and waits for its tasks until `deadline`.
async fn wait_stage(stage: &str, tracker: &TaskTracker, deadline: tokio::time::Instant) {
    tracker.close();
    if tokio::time::timeout_at(deadline, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            stage,
            left = tracker.len(),
            "Tasks did not end within the stage's shutdown bound."
        );
    }
}

async fn accept_until(
    gateway: &Arc<Gateway>,
    doors: &Doors,
    http: &TaskTracker,
    until: impl Future<Output = ()>,
) {
    tokio::pin!(until);
    loop {
        let (accepted, door) = tokio::select! {
            _ = &mut until => return,
            accepted = doors.public.accept() => (accepted, Door::Public),
            accepted = doors.internal.accept() => (accepted, Door::Internal),
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and the like: say so, breathe, go on.
                let reason = match error.raw_os_error() {
                    Some(23 | 24) => AcceptError::FdLimit,
                    _ => AcceptError::Other,
                };
                metrics::count(&gateway.metrics.accept_errors, reason);
                if reason == AcceptError::FdLimit {
                    tracing::error!(%error, connections = gateway.metrics.connections.get(), "Cannot accept: the process reached its open-file limit (raise `ulimit -n` / LimitNOFILE).");
                } else {
                    tracing::warn!(%error, "Accept failed.");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let gateway = Arc::clone(gateway);
        // Raised by an event stream that ended: its connection closes (see below). A `Signal`,
        // not a `CancellationToken`: the connection's task polls both waits on every request it
        // reads, and a token's wait takes its locks each time (the shutdown one shared by every
        // connection), where a `Signal`'s reads a flag.
        let cut = Arc::new(Signal::default());
        http.spawn(async move {
            let write_timeout = gateway.config.session.write_timeout;
            let service = {
                let (gateway, cut) = (Arc::clone(&gateway), Arc::clone(&cut));
                service_fn(move |request| {
                    routes::handle(Arc::clone(&gateway), door, peer, Arc::clone(&cut), request)
                })
            };
            // A timer is what makes hyper enforce the header read timeout at all.
            let connection = http1::Builder::new()
                .timer(HeaderTimer::default())
                .header_read_timeout(Duration::from_secs(30))
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = gateway.shutdown.close.raised() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
                // An event stream ended: the response ends, then the connection closes. A client
                // that does not read what is left within `session.write_timeout` (a slow consumer)
                // has its connection dropped, so neither it nor its unread bytes stay held here.
                () = cut.raised() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(write_timeout, connection).await;
                }
            }
        });
    }
}
