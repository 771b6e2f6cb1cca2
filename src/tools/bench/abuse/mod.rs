//! `bench abuse`: the attacks the resource budgets answer (issue #12), one after the other against
//! one gateway, each bounded in time. For each: the server's resident memory after it (and the
//! highest seen during it), the budget refusals it triggered (the counters of `/metrics` that
//! moved), and what a legitimate client beside the attacker saw meanwhile: its events' publish →
//! receive latency and whether every one arrived. The attackers use the source addresses after the
//! first; the legitimate client has the first to itself.

mod attacks;
mod legit;
mod raw;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use serde_json::{Map, Value, json};

use super::{Server, ensure_open_files, now_us, run_tag};
use crate::tools::client::Target;

#[derive(Debug, Clone, clap::Args)]
pub struct Abuse {
    /// Multiplies every attack's counts and timed phases (1: the full attacks; 0.01: a quick check).
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
    /// Each attack stops after this long, finished or not.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub max_attack_time: Duration,
    /// Only these attacks (comma-separated): history, unknown-run, open-tools, connections,
    /// slow-bodies, run-flood, ledger-loop. All by default.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
}

/// The attacks, in the order they run.
const ATTACKS: [&str; 7] = [
    "history",
    "unknown-run",
    "open-tools",
    "connections",
    "slow-bodies",
    "run-flood",
    "ledger-loop",
];

/// The counters a budget's refusal (or its eviction, or a connection's close) moves: reported
/// when they moved.
const REFUSALS: [&str; 14] = [
    "agentwire_events_rejected_total",
    "agentwire_pending_refused_total",
    "agentwire_deadletters_dropped_total",
    "agentwire_events_lost_total",
    "agentwire_runs_refused_total",
    "agentwire_runs_evicted_total",
    "agentwire_connections_closed_total",
    "agentwire_upgrades_refused_total",
    "agentwire_api_refused_total",
    "agentwire_history_evicted_total",
    "agentwire_unresolved_run_ids_total",
    "agentwire_broker_refused_total",
    "agentwire_slow_consumer_closes_total",
    "agentwire_accept_errors_total",
];

/// What the gateway holds, read after each attack.
const HELD: [&str; 7] = [
    "agentwire_history_bytes",
    "agentwire_channels",
    "agentwire_events_pending_resolution",
    "agentwire_events_pending_resolution_bytes",
    "agentwire_deadletter_events",
    "agentwire_runs_active",
    "agentwire_connections",
];

/// What an attack needs: the gateway, its own addresses, its size and its time.
pub(super) struct Ctx<'a> {
    server: &'a Server,
    attackers: &'a [IpAddr],
    tag: &'a str,
    scale: f64,
    /// The attack stops sending at this instant.
    deadline: Instant,
}

impl Ctx<'_> {
    /// `full` at this run's scale (at least 1).
    fn n(&self, full: usize) -> usize {
        ((full as f64 * self.scale).round() as usize).max(1)
    }

    /// A timed phase of `full` at this run's scale: at least a second, within the deadline.
    fn time(&self, full: Duration) -> Duration {
        full.mul_f64(self.scale)
            .max(Duration::from_secs(1))
            .min(self.deadline.saturating_duration_since(Instant::now()))
    }

    fn attacker(&self, i: usize) -> IpAddr {
        self.attackers[i % self.attackers.len()]
    }

    fn api(&self) -> &Target {
        &self.server.api
    }
}

pub(super) async fn run(server: &Server, sources: &[IpAddr], args: Abuse) -> anyhow::Result<Value> {
    ensure!(args.scale > 0.0, "--scale must be above 0");
    for name in &args.only {
        ensure!(
            ATTACKS.contains(&name.as_str()),
            "unknown attack `{name}` (one of {})",
            ATTACKS.join(", ")
        );
    }
    // The connection flood holds its sockets and the trickling ones at once.
    let scaled = |full: f64| (full * args.scale).round() as u64;
    ensure_open_files(scaled(8_000.0) + scaled(1_000.0) + 256)?;
    let tag = run_tag();
    let attackers = if sources.len() > 1 {
        &sources[1..]
    } else {
        sources
    };
    let legit = legit::Legit::open(server, sources[0], &tag, ATTACKS.len()).await?;
    let start = server.usage().await?;
    let mut reports = Vec::new();
    let (mut sent, mut received) = (0u64, 0u64);
    for (index, name) in ATTACKS.iter().enumerate() {
        if !args.only.is_empty() && !args.only.iter().any(|only| only == name) {
            continue;
        }
        let before = counters(server).await?;
        let sampler = Sampler::start(server);
        let producing = legit.start(index);
        let started = Instant::now();
        let ctx = Ctx {
            server,
            attackers,
            tag: &tag,
            scale: args.scale,
            deadline: started + args.max_attack_time,
        };
        let detail = match *name {
            "history" => attacks::history(&ctx).await,
            "unknown-run" => attacks::unknown_run(&ctx).await,
            "open-tools" => attacks::open_tools(&ctx).await,
            "connections" => attacks::connections(&ctx).await,
            "slow-bodies" => attacks::slow_bodies(&ctx).await,
            "run-flood" => attacks::run_flood(&ctx).await,
            _ => attacks::ledger_loop(&ctx).await,
        }
        .with_context(|| format!("attack {name}"))?;
        let seconds = started.elapsed().as_secs_f64();
        let delivery = legit.finish(producing).await?;
        let peak = sampler.stop().await;
        let after = server.usage().await?;
        let after_counters = counters(server).await?;
        let moved: Map<String, Value> = after_counters
            .iter()
            .filter(|(key, _)| REFUSALS.iter().any(|family| family_of(key) == *family))
            .filter_map(|(key, value)| {
                let delta = value - before.get(key).copied().unwrap_or(0.0);
                (delta != 0.0).then(|| (key.clone(), json!(delta)))
            })
            .collect();
        let held: Map<String, Value> = HELD
            .iter()
            .filter_map(|name| Some((name.to_string(), json!(*after_counters.get(*name)?))))
            .collect();
        let missing = delivery.sent.saturating_sub(delivery.received);
        eprintln!(
            "abuse {name}: {seconds:.1} s; server RSS after {:.1} MiB (peak {:.1}); legit p50 {:.2} ms p99 {:.2} ms max {:.2} ms, {}/{} received{}; refusals: {}",
            after.rss_bytes / 1048576.0,
            peak.max(after.rss_bytes) / 1048576.0,
            delivery.p50_ms,
            delivery.p99_ms,
            delivery.max_ms,
            delivery.received,
            delivery.sent,
            if missing > 0 {
                format!(" ({missing} MISSING)")
            } else {
                String::new()
            },
            if moved.is_empty() {
                "none".to_string()
            } else {
                moved
                    .iter()
                    .map(|(key, delta)| format!("{key} +{delta}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        );
        eprintln!("  {name}: {detail}");
        sent += delivery.sent;
        received += delivery.received;
        reports.push(json!({
            "name": name,
            "seconds": seconds,
            "server_rss_after_mib": after.rss_bytes / 1048576.0,
            "server_rss_peak_mib": peak.max(after.rss_bytes) / 1048576.0,
            "legit": delivery.json,
            "refusals": moved,
            "held": held,
            "attack": detail,
        }));
    }
    let ledger = legit.ledger().await?;
    let result = json!({
        "scenario": "abuse",
        "scale": args.scale,
        "server_rss_start_mib": start.rss_bytes / 1048576.0,
        "attacks": reports,
        "deliveries_expected": sent,
        "deliveries_received": received,
        "ledger": ledger,
    });
    ensure!(
        received == sent,
        "the legitimate client missed {} of {sent} events: {result}",
        sent - received
    );
    Ok(result)
}

/// Every sample of `/metrics`, keyed by name and labels as exposed (`name{label="value"}`).
async fn counters(server: &Server) -> anyhow::Result<BTreeMap<String, f64>> {
    let (status, text) = server.api.http("GET", "/metrics", None).await?;
    ensure!(status == 200, "GET /metrics answered {status}");
    Ok(text
        .as_str()
        .unwrap_or_default()
        .lines()
        .filter(|line| line.starts_with("agentwire_"))
        .filter_map(|line| {
            let (key, value) = line.rsplit_once(' ')?;
            Some((key.to_string(), value.parse().ok()?))
        })
        .collect())
}

fn family_of(key: &str) -> &str {
    key.split_once('{').map_or(key, |(family, _)| family)
}

/// Reads the server's resident memory every 200 ms during an attack; its highest value.
struct Sampler {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<f64>,
}

impl Sampler {
    fn start(server: &Server) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (stopped, server) = (Arc::clone(&stop), server.clone());
        let task = tokio::spawn(async move {
            let mut peak = 0.0f64;
            while !stopped.load(Ordering::Relaxed) {
                if let Ok(usage) = server.usage().await {
                    peak = peak.max(usage.rss_bytes);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            peak
        });
        Self { stop, task }
    }

    async fn stop(self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap_or(0.0)
    }
}
