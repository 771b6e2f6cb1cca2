//! Every Prometheus metric the gateway exports, registered once into the gateway's own registry
//! and passed down. Names carry the `agentwire_` prefix and base units; no label ever holds a
//! thread, run, user or connection id.
//!
//! The ledger totals (emitted, delivered, acked, pending, lost) are not counted here on the hot
//! path: they are summed from the per-channel ledgers by a snapshot at most
//! `ledger.snapshot_interval` old (see [`Metrics::render`]), so the exposition always shows a
//! balanced `emitted = delivered + pending + lost`.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

use crate::ledger::{LostReason, Totals};

/// A closed set of label values that a stage produces (an enum beside its producer). The stage
/// exports them at 0 when it starts ([`export`]), so `rate()` and alerts see every value at once,
/// and a new value is one edit in the stage's enum.
pub trait Label: Copy + 'static {
    const ALL: &'static [Self];
    fn as_str(self) -> &'static str;
}

/// Exports every value of `L` at 0 in `vec`.
pub fn export<L: Label>(vec: &IntCounterVec) {
    for label in L::ALL {
        vec.with_label_values(&[label.as_str()]);
    }
}

/// Counts one occurrence of `label` in `vec`.
pub fn count<L: Label>(vec: &IntCounterVec, label: L) {
    vec.with_label_values(&[label.as_str()]).inc();
}

/// What `/metrics` reads from the gateway's state at scrape time.
pub struct Scraped {
    /// The broker's balanced sum of every channel's ledger, from a snapshot.
    pub totals: Totals,
    /// When the computation of `totals` started.
    pub totals_at: Instant,
    pub pending_resolution: usize,
    pub pending_resolution_bytes: usize,
    pub deadletters: usize,
    /// Bytes all channels' history holds, and the events `history.max_bytes` evicted.
    pub history: (usize, u64),
    /// The cluster's ledger (embedded: this instance's), when it could be read for this scrape.
    pub cluster: Option<ClusterLedger>,
}

/// The figures of the cluster-wide ledger view (`GET /v1/ledger`) a scrape shows: the same on
/// every replica, so dashboards and alerts take `max()` over replicas, not `sum()`.
pub struct ClusterLedger {
    pub pending: i64,
    pub unbalanced: u64,
    pub as_of: SystemTime,
}

pub struct Metrics {
    registry: Registry,
    /// Held while a scrape renders; holds when the ledger totals shown were computed.
    scrape: Mutex<Option<Instant>>,
    pub events_ingested: IntCounter,
    pub events_rejected: IntCounterVec,
    pub events_duplicate: IntCounter,
    events_emitted: IntCounter,
    events_delivered: IntCounter,
    events_acked: IntCounter,
    pub events_lost: IntCounterVec,
    /// Events taken for ingest that could not be emitted (a broker error that is ours): added to
    /// the channel ledgers' own `internal` in `agentwire_events_lost_total{reason="internal"}`.
    lost_internal_ingest: AtomicU64,
    events_pending: IntGauge,
    events_pending_oldest_age: Gauge,
    events_pending_resolution: IntGauge,
    pub unresolved_run_ids: IntCounter,
    pub runs_registered: IntCounter,
    pub runs_refused: IntCounterVec,
    pub live_delivery_latency: Histogram,
    pub replay_age: Histogram,
    pub fanout_frames_sent: IntCounter,
    channels: IntGauge,
    pub connections: IntGauge,
    pub sse_streams: IntGauge,
    pub connections_opened: IntCounter,
    pub connections_closed: IntCounterVec,
    pub subscriptions: IntGauge,
    pub resumes: IntCounterVec,
    pub slow_consumer_closes: IntCounterVec,
    pub client_errors: IntCounterVec,
    pub broker_up: IntGauge,
    pub broker_errors: IntCounter,
    pub reports_dropped: IntCounterVec,
    pub broker_refused: IntCounterVec,
    pub redis_subscriptions_reconciled: IntCounterVec,
    pub redis_connections_replaced: IntCounter,
    pub ledger_snapshots: IntCounterVec,
    pub broker_latency: Histogram,
    pub event_age: Histogram,
    pub runs_active: IntGauge,
    pub runs_started: IntCounter,
    pub runs_stalled: IntCounter,
    pub runs_completed: IntCounterVec,
    pub runs_evicted: IntCounter,
    pub run_duration: Histogram,
    pub lifecycle_violations: IntCounterVec,
    pub runs_closed: IntCounterVec,
    pub run_streams_refused: IntCounterVec,
    pub run_streams: IntGauge,
    deadletter_events: IntGauge,
    history_bytes: IntGauge,
    history_evicted: IntCounter,
    pub deadletters_dropped: IntCounter,
    pending_resolution_bytes: IntGauge,
    pub pending_refused: IntCounterVec,
    pub events_redriven: IntCounter,
    pub events_generated: IntCounter,
    pub accept_errors: IntCounterVec,
    pub upgrades_refused: IntCounterVec,
    pub auth_refused: IntCounterVec,
    pub api_refused: IntCounterVec,
    pub subscribe_webhook: IntCounterVec,
    pub upstream_messages: IntCounterVec,
    events_offered_undelivered_oldest_age: Gauge,
    cluster_events_pending: IntGauge,
    cluster_unbalanced_channels: IntGauge,
    cluster_ledger_timestamp: Gauge,
}

/// How an event reached the socket that first wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryPath {
    /// Queued to the socket when the event was published.
    Live,
    /// Queued by a subscribe or a resume, from the channel's history.
    Replay,
}

/// Run duration buckets from 100 ms to 1 h.
const DURATION_BUCKETS: [f64; 12] = [
    0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0,
];

/// Latency buckets from 100 µs to 30 s.
const LATENCY_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    10.0, 30.0,
];

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let r = &registry;
        let metrics = Self {
            events_ingested: counter(
                r,
                "agentwire_events_ingested_total",
                "Valid events received from producers (including duplicates).",
            ),
            events_rejected: counter_vec(
                r,
                "agentwire_events_rejected_total",
                "Producer events refused as invalid, by reason.",
                "reason",
            ),
            events_duplicate: counter(
                r,
                "agentwire_events_duplicate_total",
                "Events dropped because their event_id was seen within the dedupe window.",
            ),
            events_emitted: counter(
                r,
                "agentwire_events_emitted_total",
                "Events accepted into a channel and given a seq.",
            ),
            events_delivered: counter(
                r,
                "agentwire_events_delivered_total",
                "Events written to at least one subscribed socket (first time only).",
            ),
            events_acked: counter(
                r,
                "agentwire_events_acked_total",
                "Events confirmed by a client ack.",
            ),
            events_lost: counter_vec(
                r,
                "agentwire_events_lost_total",
                "Events that will never be delivered, by reason.",
                "reason",
            ),
            lost_internal_ingest: AtomicU64::new(0),
            events_pending: gauge(
                r,
                "agentwire_events_pending",
                "Events emitted, not yet delivered, still in history.",
            ),
            events_pending_oldest_age: Gauge::with_opts(Opts::new(
                "agentwire_events_pending_oldest_age_seconds",
                "Age of the oldest pending event.",
            ))
            .map(|g| register(r, g))
            .unwrap_or_else(|e| panic!("metric definition: {e}")),
            cluster_events_pending: gauge(
                r,
                "agentwire_cluster_events_pending",
                "Events pending across the cluster (every replica reads the same shared ledger).",
            ),
            cluster_unbalanced_channels: gauge(
                r,
                "agentwire_cluster_ledger_unbalanced_channels",
                "Channels whose shared ledger does not balance: emitted != delivered + pending + lost.",
            ),
            cluster_ledger_timestamp: Gauge::with_opts(Opts::new(
                "agentwire_cluster_ledger_timestamp_seconds",
                "When the cluster figures shown were read (Unix time; 0 before the first read).",
            ))
            .map(|g| register(r, g))
            .unwrap_or_else(|e| panic!("metric definition: {e}")),
            events_pending_resolution: gauge(
                r,
                "agentwire_events_pending_resolution",
                "Events waiting for their run_id to be registered.",
            ),
            unresolved_run_ids: counter(
                r,
                "agentwire_unresolved_run_ids_total",
                "Run ids whose events found no channel within the grace period.",
            ),
            runs_registered: counter(
                r,
                "agentwire_runs_registered_total",
                "Run registrations (POST /v1/runs or agent_started with a thread).",
            ),
            runs_refused: counter_vec(
                r,
                "agentwire_runs_refused_total",
                "Run registrations refused, by reason (conflict, full).",
                "reason",
            ),
            live_delivery_latency: histogram(
                r,
                "agentwire_live_delivery_latency_seconds",
                "Time from emit to the first socket write, for events first written as a live delivery (queued to the socket when they were published).",
                &LATENCY_BUCKETS,
            ),
            replay_age: histogram(
                r,
                "agentwire_replay_age_seconds",
                "Time from emit to the first socket write, for events first written by a replay (queued by a subscribe or a resume).",
                &DURATION_BUCKETS,
            ),
            fanout_frames_sent: counter(
                r,
                "agentwire_fanout_frames_sent_total",
                "Event frames written to sockets, every subscriber and replay counted.",
            ),
            channels: gauge(r, "agentwire_channels", "Channels held in the broker."),
            connections: gauge(
                r,
                "agentwire_connections",
                "Open client connections: WebSockets and Server-Sent Events streams.",
            ),
            sse_streams: gauge(
                r,
                "agentwire_sse_streams",
                "Open Server-Sent Events streams (also counted in agentwire_connections).",
            ),
            connections_opened: counter(
                r,
                "agentwire_connections_opened_total",
                "WebSocket connections accepted.",
            ),
            connections_closed: counter_vec(
                r,
                "agentwire_connections_closed_total",
                "WebSocket connections closed, by reason.",
                "reason",
            ),
            subscriptions: gauge(
                r,
                "agentwire_subscriptions",
                "Channel subscriptions held by open connections (user channels included).",
            ),
            resumes: counter_vec(
                r,
                "agentwire_resumes_total",
                "Subscriptions with `since`, by outcome (recovered, not_recovered).",
                "outcome",
            ),
            slow_consumer_closes: counter_vec(
                r,
                "agentwire_slow_consumer_closes_total",
                "Connections closed as slow consumers (4008: a full queue or a timed-out write), by whether the close frame was written (sent) or the connection was cut (not_sent).",
                "close",
            ),
            client_errors: counter_vec(
                r,
                "agentwire_client_errors_total",
                "Error frames sent to clients, by code.",
                "code",
            ),
            broker_up: gauge(r, "agentwire_broker_up", "1 when the broker is reachable."),
            broker_errors: counter(
                r,
                "agentwire_broker_errors_total",
                "Broker operations that failed.",
            ),
            reports_dropped: counter_vec(
                r,
                "agentwire_reports_dropped_total",
                "Reports to Redis (first deliveries, acks, dead letters) dropped because their queue was full, by report.",
                "report",
            ),
            broker_refused: counter_vec(
                r,
                "agentwire_broker_refused_total",
                "Publishes and registrations a reachable broker refused, by reason (oom: Redis at maxmemory); answered 503.",
                "reason",
            ),
            redis_subscriptions_reconciled: counter_vec(
                r,
                "agentwire_redis_subscriptions_reconciled_total",
                "Redis pub/sub subscriptions that did not match the watched channels and were fixed, by action (unsubscribed, subscribed).",
                "action",
            ),
            redis_connections_replaced: counter(
                r,
                "agentwire_redis_connections_replaced_total",
                "Redis command connections that stopped answering while a fresh one answered, and were replaced by it.",
            ),
            ledger_snapshots: counter_vec(
                r,
                "agentwire_ledger_snapshots_total",
                "Recomputations of the ledger snapshots behind GET /v1/ledger and /metrics, by view (ledger, replica); at most one per ledger.snapshot_interval each.",
                "view",
            ),
            broker_latency: histogram(
                r,
                "agentwire_broker_latency_seconds",
                "Time a broker publish takes.",
                &LATENCY_BUCKETS,
            ),
            event_age: histogram(
                r,
                "agentwire_event_age_seconds",
                "Time from the producer's `ts` to the first socket write (events with an RFC 3339 UTC ts).",
                &LATENCY_BUCKETS,
            ),
            runs_active: gauge(
                r,
                "agentwire_runs_active",
                "Runs the watchdog follows that have not ended.",
            ),
            runs_started: counter(
                r,
                "agentwire_runs_started_total",
                "Runs that sent agent_started.",
            ),
            runs_stalled: counter(
                r,
                "agentwire_runs_stalled_total",
                "Runs with no event for watchdog.run_idle_timeout.",
            ),
            runs_completed: counter_vec(
                r,
                "agentwire_runs_completed_total",
                "Runs ended, by outcome (completed, error, stalled).",
                "outcome",
            ),
            runs_evicted: counter(
                r,
                "agentwire_runs_evicted_total",
                "Runs the watchdog stopped following because watchdog.max_runs was reached.",
            ),
            run_duration: histogram(
                r,
                "agentwire_run_duration_seconds",
                "Time from a run's first event to its end.",
                &DURATION_BUCKETS,
            ),
            lifecycle_violations: counter_vec(
                r,
                "agentwire_lifecycle_violations_total",
                "Out-of-order or unpaired lifecycle events, by kind (delivered as sent).",
                "kind",
            ),
            runs_closed: counter_vec(
                r,
                "agentwire_runs_closed_total",
                "Runs the gateway closed for their viewers because the stream bound to them (native or AG-UI) ended while they were open, by reason.",
                "reason",
            ),
            run_streams_refused: counter_vec(
                r,
                "agentwire_run_streams_refused_total",
                "Streams bound to one run (native and AG-UI) and AG-UI agent runs refused before anything was read or forwarded, by reason.",
                "reason",
            ),
            run_streams: gauge(
                r,
                "agentwire_run_streams",
                "Streams bound to one run being read now (native and AG-UI producer streams, AG-UI agent runs).",
            ),
            deadletter_events: gauge(
                r,
                "agentwire_deadletter_events",
                "Unresolved events kept for GET /v1/deadletter and redrive.",
            ),
            deadletters_dropped: counter(
                r,
                "agentwire_deadletters_dropped_total",
                "Dead letters dropped, oldest first, because the kept ones reached deadletter.capacity or deadletter.max_bytes (embedded broker), or trimmed from the shared stream past deadletter.capacity (Redis).",
            ),
            pending_resolution_bytes: gauge(
                r,
                "agentwire_events_pending_resolution_bytes",
                "Bytes the events waiting for their run's registration weigh (resolve.max_pending_bytes).",
            ),
            pending_refused: counter_vec(
                r,
                "agentwire_pending_refused_total",
                "Events that could not wait for their run's registration, by the budget that had no room (they are dead-lettered at once and counted lost unresolved).",
                "reason",
            ),
            history_bytes: gauge(
                r,
                "agentwire_history_bytes",
                "Bytes held by every channel's history on this replica (history.max_bytes).",
            ),
            history_evicted: counter(
                r,
                "agentwire_history_evicted_total",
                "History events evicted because all history reached history.max_bytes (the undelivered among them are also counted lost).",
            ),
            events_redriven: counter(
                r,
                "agentwire_events_redriven_total",
                "Dead-lettered events that a redrive delivered to a channel.",
            ),
            events_generated: counter(
                r,
                "agentwire_events_generated_total",
                "Events the gateway made itself (the agent_error of a stalled run, the events that close a run whose stream ended while it was open).",
            ),
            accept_errors: counter_vec(
                r,
                "agentwire_accept_errors_total",
                "Connections the listener could not accept, by reason (fd_limit, other).",
                "reason",
            ),
            upgrades_refused: counter_vec(
                r,
                "agentwire_upgrades_refused_total",
                "WebSocket upgrades refused before a session existed, by reason (origin, not_loopback).",
                "reason",
            ),
            subscribe_webhook: counter_vec(
                r,
                "agentwire_subscribe_webhook_total",
                "Subscribe webhook answers, by outcome (allow, deny, error: refused).",
                "outcome",
            ),
            api_refused: counter_vec(
                r,
                "agentwire_api_refused_total",
                "Internal-door requests refused for their key, by reason (missing, invalid, wrong_role).",
                "reason",
            ),
            auth_refused: counter_vec(
                r,
                "agentwire_auth_refused_total",
                "Browser tokens and subscriptions refused, by reason.",
                "reason",
            ),
            upstream_messages: counter_vec(
                r,
                "agentwire_upstream_messages_total",
                "HLink messages from clients, by outcome (delivered, failed, busy, refused, invalid).",
                "outcome",
            ),
            events_offered_undelivered_oldest_age: register(r, Gauge::with_opts(Opts::new("agentwire_events_offered_undelivered_oldest_age_seconds", "Age of the oldest event queued to a subscriber and still not written to any socket (a stuck delivery).")).unwrap_or_else(|e| panic!("metric definition: {e}"))),
            registry,
            scrape: Mutex::new(None),
        };
        let build = IntGaugeVec::new(
            Opts::new("agentwire_build_info", "Build of the running gateway."),
            &["version"],
        )
        .unwrap_or_else(|e| panic!("metric definition: {e}"));
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        register(&metrics.registry, build);
        #[cfg(target_os = "linux")]
        if let Err(error) = metrics.registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        )) {
            tracing::warn!(%error, "Process metrics are not available.");
        }
        // Label values of the layers below are exported at 0 here, so that rate() and alerts see
        // them at once; the stages above export their own ([`export`]) when they are built.
        for reason in LostReason::ALL {
            metrics.events_lost.with_label_values(&[reason.as_str()]);
        }
        for code in crate::protocol::event::RefusalCode::ALL {
            metrics.events_rejected.with_label_values(&[code.as_str()]);
        }
        for code in crate::protocol::server::ErrorCode::ALL {
            metrics.client_errors.with_label_values(&[code.as_str()]);
        }

        metrics.broker_up.set(1);
        metrics
    }

    /// The exposition text. `totals` is the broker's balanced sum of every channel's ledger.
    /// `state` is read under the scrape lock, and ledger totals older than those already shown are
    /// not applied (two scrapes may get their snapshots in one order and render in the other), so
    /// the ledger series always come from one snapshot and never mix old and new figures.
    pub fn render(&self, state: impl FnOnce() -> Scraped) -> String {
        let mut shown = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        let Scraped {
            totals,
            totals_at,
            pending_resolution,
            pending_resolution_bytes,
            deadletters,
            history,
            cluster,
        } = state();
        self.events_pending_resolution
            .set(to_i64(pending_resolution as u64));
        self.deadletter_events.set(to_i64(deadletters as u64));
        self.pending_resolution_bytes
            .set(to_i64(pending_resolution_bytes as u64));
        self.history_bytes.set(to_i64(history.0 as u64));
        raise(&self.history_evicted, history.1);
        if shown.is_none_or(|at| at <= totals_at) {
            *shown = Some(totals_at);
            self.show_ledger(&totals);
        }
        if let Some(cluster) = cluster {
            self.show_cluster(&cluster);
        }
        let mut out = Vec::with_capacity(16 * 1024);
        if let Err(error) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(%error, "Cannot encode metrics.");
        }
        String::from_utf8(out).unwrap_or_default()
    }

    /// Counts an event taken for ingest that cannot be emitted because of a broker error that is
    /// ours: shown in `agentwire_events_lost_total{reason="internal"}` from the next scrape on,
    /// beside the channel ledgers' own `internal` (one sum, so the series never goes down).
    pub fn lose_internal(&self) {
        self.lost_internal_ingest.fetch_add(1, Ordering::Relaxed);
    }

    /// Sets the cluster series from one ledger view, unless the ones shown are from a later one.
    fn show_cluster(&self, cluster: &ClusterLedger) {
        let at = cluster
            .as_of
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        if at < self.cluster_ledger_timestamp.get() {
            return;
        }
        self.cluster_ledger_timestamp.set(at);
        self.cluster_events_pending.set(cluster.pending);
        self.cluster_unbalanced_channels
            .set(to_i64(cluster.unbalanced));
    }

    /// Sets the ledger series from one snapshot of the totals.
    fn show_ledger(&self, totals: &Totals) {
        raise(&self.events_emitted, totals.emitted);
        raise(&self.events_delivered, totals.delivered);
        raise(&self.events_acked, totals.acked);
        for reason in LostReason::CHANNEL {
            let mut lost = totals.lost[reason as usize];
            if reason == LostReason::Internal {
                lost += self.lost_internal_ingest.load(Ordering::Relaxed);
            }
            raise(
                &self.events_lost.with_label_values(&[reason.as_str()]),
                lost,
            );
        }
        self.events_pending.set(totals.pending);
        self.events_pending_oldest_age
            .set(totals.oldest_pending_age.as_secs_f64());
        self.events_offered_undelivered_oldest_age
            .set(totals.oldest_offered_pending_age.as_secs_f64());
        self.channels.set(to_i64(totals.channels));
    }

    /// Records the first socket write of an event, `since_emit` after it was sequenced: a live
    /// delivery's latency, or the age of an event a replay brought to a new subscriber (a user
    /// coming back to a run nobody watched), kept apart so replays do not read as slow deliveries.
    pub fn observe_delivery(&self, path: DeliveryPath, since_emit: Duration) {
        match path {
            DeliveryPath::Live => &self.live_delivery_latency,
            DeliveryPath::Replay => &self.replay_age,
        }
        .observe(since_emit.as_secs_f64());
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Moves a counter up to an externally kept total (never down).
fn raise(counter: &IntCounter, total: u64) {
    let current = counter.get();
    if total > current {
        counter.inc_by(total - current);
    }
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

// Metric definitions are constants of this file: a failure here is a programming error caught by
// every test, never a run-time condition.
fn register<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: M) -> M {
    registry
        .register(Box::new(metric.clone()))
        .unwrap_or_else(|e| panic!("metric registration: {e}"));
    metric
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    register(
        registry,
        IntCounter::new(name, help).unwrap_or_else(|e| panic!("metric definition: {e}")),
    )
}

fn counter_vec(registry: &Registry, name: &str, help: &str, label: &str) -> IntCounterVec {
    register(
        registry,
        IntCounterVec::new(Opts::new(name, help), &[label])
            .unwrap_or_else(|e| panic!("metric definition: {e}")),
    )
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    register(
        registry,
        Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
            .unwrap_or_else(|e| panic!("metric definition: {e}")),
    )
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    register(
        registry,
        IntGauge::new(name, help).unwrap_or_else(|e| panic!("metric definition: {e}")),
    )
}
