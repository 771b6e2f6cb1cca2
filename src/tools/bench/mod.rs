//! `agentwire bench <scenario>`: a load generator that talks the public protocol over real
//! sockets (HTTP ingest in, WebSocket out) and prints one JSON line per run plus a human summary.
//! Server CPU and memory come from the gateway's `/metrics` or from `/proc/<pid>` with
//! `--server-pid`. Every loop is bounded in count and time; traffic stays on 127.0.0.0/8.

mod abuse;
mod credentials;
mod fanout;
mod idle;
mod tokens;
mod viewer;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, ensure};
use serde_json::Value;

use crate::tools::client::Target;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub scenario: Scenario,
    /// The gateway under test: its public door (`/ws`).
    #[arg(long, global = true, default_value = "http://127.0.0.1:8000")]
    pub url: String,
    /// Its internal door (`/v1/*`, `/metrics`).
    #[arg(long, global = true, default_value = "http://127.0.0.1:8001")]
    pub api_url: String,
    /// Read the server's CPU and memory from /proc/<pid> instead of its /metrics.
    #[arg(long, global = true)]
    pub server_pid: Option<u32>,
    /// Client sockets are spread over 127.0.0.1 ..= 127.0.0.N (each source has ~28k ports).
    #[arg(long, global = true, default_value_t = 8)]
    pub sources: u8,
    /// What the server under test speaks (`idle`, `fanout` and `saturate` take both).
    #[arg(long, global = true, value_enum, default_value = "agentwire")]
    pub protocol: Protocol,
    /// Viewers authenticate with an HS256 token signed with this secret (the gateway's
    /// auth.jwt_secret).
    #[arg(
        long,
        global = true,
        env = "AGENTWIRE_BENCH_JWT_SECRET",
        hide_env_values = true
    )]
    pub jwt_secret: Option<String>,
    /// Viewers authenticate with an ES256 token signed with this PEM private key (the gateway's
    /// auth.jwt_public_key is its public half).
    #[arg(long, global = true, conflicts_with = "jwt_secret")]
    pub jwt_private_key: Option<std::path::PathBuf>,
    /// Events and runs are posted with this key (one of the gateway's auth.producer_keys).
    #[arg(
        long,
        global = true,
        env = "AGENTWIRE_BENCH_PRODUCER_KEY",
        hide_env_values = true
    )]
    pub producer_key: Option<String>,
    /// The ledger is read with this key (one of the gateway's auth.operator_keys).
    #[arg(
        long,
        global = true,
        env = "AGENTWIRE_BENCH_OPERATOR_KEY",
        hide_env_values = true
    )]
    pub operator_key: Option<String>,
}

/// The protocol of the server under test: agentwire's, the floor's or nchan's, so that one load
/// generator measures all three in the same run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// `hello` and `subscribe` on `/ws`; events POSTed to the internal door's `/v1/events`.
    Agentwire,
    /// The bare fan-out server in `bench/floor/`: `GET /ws/{thread}`, and `POST /events/{thread}`
    /// with one event, which every socket of the thread receives as it was posted.
    Floor,
    /// nchan (nginx + C) as `bench/nchan/nginx.conf` sets it up: a WebSocket subscriber at
    /// `/sub/{thread}`, one event `POST`ed to `/pub/{thread}`, received as it was posted.
    Nchan,
}

impl Protocol {
    /// The path of a bare server's WebSocket for `thread_id` (agentwire has one door, `/ws`).
    fn socket_path(self, thread_id: &str) -> String {
        match self {
            Protocol::Agentwire => "/ws".into(),
            Protocol::Floor => format!("/ws/{thread_id}"),
            Protocol::Nchan => format!("/sub/{thread_id}"),
        }
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum Scenario {
    /// N connections, each with hello and its own thread subscription: memory per connection.
    Idle {
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        /// How long the connections are held before memory is read.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        settle: Duration,
    },
    /// C connections over T threads, P events at a fixed rate: latency and CPU per delivery.
    Fanout(fanout::Load),
    /// As fanout, publishing as fast as the gateway accepts (bounded in flight).
    Saturate(fanout::Load),
    /// As fanout, across two replicas on one Redis (`--url` and `--second-url`): connections and
    /// POSTs alternate between them, so most deliveries cross replicas.
    Redis {
        /// The second replica's public door.
        #[arg(long)]
        second_url: String,
        /// The second replica's internal door.
        #[arg(long)]
        second_api_url: String,
        /// The second replica's pid, for its CPU and memory from /proc.
        #[arg(long)]
        second_pid: Option<u32>,
        /// redis-server's pid, for its CPU per published event from /proc.
        #[arg(long)]
        redis_pid: Option<u32>,
        #[command(flatten)]
        load: fanout::Load,
    },
    /// N runs, each on its own thread with one AG-UI viewer, streaming TEXT_MESSAGE_CONTENT
    /// deltas at a fixed rate as an agent's tokens: CPU per event in and per delivery out,
    /// latency, and nothing lost.
    Tokens(tokens::Tokens),
    /// The attacks the resource budgets answer, one after the other: server memory after each, its
    /// refusals, and a legitimate client's latency during it.
    Abuse(abuse::Abuse),
}

/// Runs a scenario; returns its JSON result (already printed with a summary).
pub async fn run(args: BenchArgs) -> anyhow::Result<Value> {
    // The floor and nchan check nothing: they get neither keys nor tokens, so their requests are
    // no longer than the bare load's.
    let checked = args.protocol == Protocol::Agentwire;
    let signer = Arc::new(match checked {
        true => {
            credentials::Signer::new(args.jwt_secret.as_deref(), args.jwt_private_key.as_deref())?
        }
        false => credentials::Signer::None,
    });
    let producer_key = args.producer_key.as_deref().filter(|_| checked);
    let operator_key = args.operator_key.as_deref().filter(|_| checked);
    let doors = |url: &str, api_url: &str| -> anyhow::Result<(Target, Target, Target)> {
        let api = Target::parse_plain(api_url)?;
        Ok((
            Target::parse_plain(url)?,
            api.with_bearer(producer_key),
            api.with_bearer(operator_key),
        ))
    };
    let (target, api, operator) = doors(&args.url, &args.api_url)?;
    let server = Server {
        target,
        api,
        operator,
        pid: args.server_pid,
        protocol: args.protocol,
        signer: Arc::clone(&signer),
    };
    let first = [server];
    let sources: Vec<IpAddr> = (1..=args.sources.max(1))
        .map(|n| IpAddr::V4(Ipv4Addr::new(127, 0, 0, n)))
        .collect();
    ensure!(
        args.protocol == Protocol::Agentwire
            || matches!(
                args.scenario,
                Scenario::Idle { .. } | Scenario::Fanout(_) | Scenario::Saturate(_)
            ),
        "only idle, fanout and saturate run against the floor and nchan"
    );
    let result = match args.scenario {
        Scenario::Idle {
            connections,
            settle,
        } => idle::run(&first[0], &sources, connections, settle).await?,
        Scenario::Fanout(load) => fanout::run(&first, &sources, load, fanout::Mode::Rate).await?,
        Scenario::Saturate(load) => {
            fanout::run(&first, &sources, load, fanout::Mode::Saturate).await?
        }
        Scenario::Redis {
            second_url,
            second_api_url,
            second_pid,
            redis_pid,
            load,
        } => {
            let [server] = first;
            let (target, api, operator) = doors(&second_url, &second_api_url)?;
            let servers = [
                server,
                Server {
                    target,
                    api,
                    operator,
                    pid: second_pid,
                    protocol: args.protocol,
                    signer,
                },
            ];
            fanout::run(&servers, &sources, load, fanout::Mode::Redis(redis_pid)).await?
        }
        Scenario::Tokens(tokens) => tokens::run(&first[0], &sources, tokens).await?,
        Scenario::Abuse(abuse) => abuse::run(&first[0], &sources, abuse).await?,
    };
    println!("{result}");
    Ok(result)
}

/// A gateway under test: its public door, its internal door as a producer and as an operator, its
/// process for its own figures, and how its viewers say who they are.
#[derive(Clone)]
struct Server {
    target: Target,
    api: Target,
    operator: Target,
    pid: Option<u32>,
    protocol: Protocol,
    signer: Arc<credentials::Signer>,
}

#[derive(Debug, Clone, Copy)]
struct Usage {
    cpu_seconds: f64,
    /// The kernel's part of `cpu_seconds` (stime), where /proc tells it (not through /metrics).
    kernel_seconds: Option<f64>,
    rss_bytes: f64,
}

impl Server {
    /// A WebSocket from `source` that receives `thread_id`'s events from now on; `hello` says who
    /// it is (agentwire only).
    async fn viewer(
        &self,
        source: IpAddr,
        hello: &Value,
        thread_id: &str,
    ) -> anyhow::Result<crate::tools::client::Socket> {
        match self.protocol {
            Protocol::Agentwire => viewer::open(&self.target, source, hello, thread_id).await,
            Protocol::Floor | Protocol::Nchan => {
                let stream = self.target.connect_from(source).await?;
                let path = self.protocol.socket_path(thread_id);
                self.target.websocket_at(stream, &path).await
            }
        }
    }

    async fn usage(&self) -> anyhow::Result<Usage> {
        match self.pid {
            Some(pid) => proc_usage(pid),
            None => {
                let (status, text) = self.api.http("GET", "/metrics", None).await?;
                ensure!(status == 200, "GET /metrics answered {status}");
                let text = text.as_str().unwrap_or_default();
                Ok(Usage {
                    cpu_seconds: exposition_value(text, "process_cpu_seconds_total")?,
                    kernel_seconds: None,
                    rss_bytes: exposition_value(text, "process_resident_memory_bytes")?,
                })
            }
        }
    }
}

/// CPU and memory summed over the replicas.
async fn usage(servers: &[Server]) -> anyhow::Result<Usage> {
    let mut sum = Usage {
        cpu_seconds: 0.0,
        kernel_seconds: Some(0.0),
        rss_bytes: 0.0,
    };
    for server in servers {
        let usage = server.usage().await?;
        sum.cpu_seconds += usage.cpu_seconds;
        sum.kernel_seconds = sum
            .kernel_seconds
            .zip(usage.kernel_seconds)
            .map(|(a, b)| a + b);
        sum.rss_bytes += usage.rss_bytes;
    }
    Ok(sum)
}

fn exposition_value(text: &str, name: &str) -> anyhow::Result<f64> {
    text.lines()
        .find_map(|line| {
            line.strip_prefix(name)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .with_context(|| format!("{name} is not in /metrics (process metrics need Linux)"))
}

/// `seconds` of CPU as microseconds for each of `n` (events, deliveries); 0 for none.
fn us_per(seconds: f64, n: u64) -> f64 {
    match n {
        0 => 0.0,
        n => seconds * 1e6 / n as f64,
    }
}

/// CPU from /proc/<pid>/stat (utime + stime, in USER_HZ = 100 ticks/s on Linux) and VmRSS.
fn proc_usage(pid: u32) -> anyhow::Result<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("no process {pid}"))?;
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("unexpected /proc stat")?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |field: usize| -> anyhow::Result<f64> {
        let value = fields.get(field).context("short /proc stat")?;
        value.parse().context("unexpected /proc stat")
    };
    let (user, kernel) = (ticks(11)?, ticks(12)?);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib: f64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS")?;
    Ok(Usage {
        cpu_seconds: (user + kernel) / 100.0,
        kernel_seconds: Some(kernel / 100.0),
        rss_bytes: rss_kib * 1024.0,
    })
}

/// Time the hypervisor gave this machine's CPUs to other guests (`steal` in /proc/stat), and the
/// CPUs' time in all, in seconds summed over them; `None` off Linux. A run that saw much of it
/// measured a contended machine, whatever its CPU figures say.
fn machine_times() -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: Vec<f64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .filter_map(|t| t.parse().ok())
        .collect();
    let steal = *ticks.get(7)?;
    // user, nice, system, idle, iowait, irq, softirq, steal (guest time is already in user).
    let all: f64 = ticks.iter().take(8).sum();
    Some((steal / 100.0, all / 100.0))
}

/// The share of the machine's CPU time stolen between two [`machine_times`] readings, in percent.
fn steal_percent(before: Option<(f64, f64)>, after: Option<(f64, f64)>) -> Option<f64> {
    let ((steal_before, all_before), (steal_after, all_after)) = (before?, after?);
    let all = all_after - all_before;
    (all > 0.0).then(|| ((steal_after - steal_before) / all * 1000.0).round() / 10.0)
}

/// Says on stderr when the hypervisor took 1% or more of the machine during a run.
fn say_steal(steal: Option<f64>) {
    if let Some(steal) = steal.filter(|steal| *steal >= 1.0) {
        eprintln!("  the hypervisor took {steal}% of this machine's CPU time during the run");
    }
}

/// Wall-clock microseconds: the send time events carry, compared with the receive time on the
/// same machine.
fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64
}

/// Raises this process's open-file limit to its hard limit if it needs more than `needed`.
fn ensure_open_files(needed: u64) -> anyhow::Result<()> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let current = limit.current.unwrap_or(u64::MAX);
    if current < needed {
        let _ = setrlimit(
            Resource::Nofile,
            rustix::process::Rlimit {
                current: limit.maximum,
                maximum: limit.maximum,
            },
        );
    }
    let current = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    ensure!(
        current >= needed,
        "this scenario needs {needed} open files and this process may hold {current} (ulimit -n)"
    );
    Ok(())
}

/// A short random tag so that runs against one gateway do not share threads.
fn run_tag() -> String {
    format!("{:06x}", rand::random::<u32>() & 0xff_ffff)
}
