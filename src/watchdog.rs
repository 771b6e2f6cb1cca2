//! The run watchdog: follows every run from `agent_started` to `agent_completed` / `agent_error`,
//! counts lifecycle violations, and declares a run stalled when it has been quiet for
//! `watchdog.run_idle_timeout`, so that its channel gets a gateway-made `agent_error` with
//! `payload.reason = "stalled"` instead of an endless spinner.
//!
//! State is sharded by run id (no global lock on the event path) and bounded: each shard holds at
//! most `max_runs / SHARDS` runs; a full shard evicts its least recently active run (counted).
//! Ended runs are kept for `watchdog.retain` so `GET /v1/runs/{run_id}` can still show them.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;

use crate::config::WatchdogConfig;
use crate::metrics::{Label, Metrics, count};
use crate::protocol::ChannelName;
use crate::protocol::event::{Event, EventType};
use crate::telemetry::Throttle;

const SHARDS: usize = 16;
/// Open tool calls remembered per run.
const MAX_OPEN_TOOLS: usize = 256;

/// Where a run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Events arrived but `agent_started` has not (yet).
    Unstarted,
    Running,
    Completed,
    Errored,
    Stalled,
}

impl RunState {
    fn is_open(self) -> bool {
        matches!(self, Self::Unstarted | Self::Running)
    }
}

/// How a run ended, counted in `agentwire_runs_completed_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunOutcome {
    Completed,
    Error,
    Stalled,
}

impl Label for RunOutcome {
    const ALL: &'static [Self] = &[Self::Completed, Self::Error, Self::Stalled];

    fn as_str(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::Error => "error",
            Self::Stalled => "stalled",
        }
    }
}

/// Lifecycle violations, counted in `agentwire_lifecycle_violations_total{kind}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Violation {
    ToolCompletedWithoutExecuting,
    EventBeforeStart,
    EventAfterEnd,
    EventAfterStall,
    EndedWithOpenTools,
    DuplicateStart,
}

impl crate::metrics::Label for Violation {
    const ALL: &'static [Self] = &[
        Self::ToolCompletedWithoutExecuting,
        Self::EventBeforeStart,
        Self::EventAfterEnd,
        Self::EventAfterStall,
        Self::EndedWithOpenTools,
        Self::DuplicateStart,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::ToolCompletedWithoutExecuting => "tool_completed_without_executing",
            Self::EventBeforeStart => "event_before_start",
            Self::EventAfterEnd => "event_after_end",
            Self::EventAfterStall => "event_after_stall",
            Self::EndedWithOpenTools => "ended_with_open_tools",
            Self::DuplicateStart => "duplicate_start",
        }
    }
}

#[derive(Debug)]
struct Run {
    state: RunState,
    channel: ChannelName,
    thread_id: Option<String>,
    user_id: Option<String>,
    first_event: Instant,
    last_event: Instant,
    ended: Option<Instant>,
    /// Open tool calls in the order they started.
    open_tools: Vec<String>,
    counts: BTreeMap<&'static str, u64>,
    violations: BTreeMap<&'static str, u64>,
}

/// A run as `GET /v1/runs/{run_id}` shows it.
#[derive(Debug, Serialize)]
pub struct RunReport {
    pub run_id: String,
    pub state: RunState,
    pub channel: String,
    pub thread_id: Option<String>,
    pub user_id: Option<String>,
    pub counts: BTreeMap<&'static str, u64>,
    pub open_tools: Vec<String>,
    pub seconds_since_last_event: f64,
    pub duration_seconds: Option<f64>,
    pub violations: BTreeMap<&'static str, u64>,
}

/// A run the sweep found stalled: what its channel must be told.
#[derive(Debug)]
pub struct Stalled {
    pub run_id: String,
    pub channel: ChannelName,
    pub user_id: Option<String>,
    pub open_tools: Vec<String>,
    pub idle: Duration,
}

impl Stalled {
    /// The gateway-made `agent_error` that ends the run for the UI.
    pub fn event(&self) -> Event {
        let payload = json!({
            "reason": "stalled",
            "message": format!("no event from this run for {} s; the gateway ended it", self.idle.as_secs()),
            "idle_seconds": self.idle.as_secs_f64(),
            "open_tools": self.open_tools,
            "source": "agentwire",
        });
        Event {
            kind: EventType::AgentError,
            run_id: Some(self.run_id.clone()),
            thread_id: None,
            user_id: self.user_id.clone(),
            event_id: None,
            ts: None,
            traceparent: None,
            payload: match payload {
                serde_json::Value::Object(map) => map,
                _ => serde_json::Map::new(),
            },
            producer: None,
        }
    }
}

pub struct Watchdog {
    config: WatchdogConfig,
    shards: Box<[Mutex<HashMap<String, Run>>]>,
}

impl Watchdog {
    pub fn new(config: WatchdogConfig) -> Self {
        let shards = (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect();
        Self { config, shards }
    }

    fn shard(&self, run_id: &str) -> MutexGuard<'_, HashMap<String, Run>> {
        let mut hasher = DefaultHasher::new();
        run_id.hash(&mut hasher);
        self.shards[(hasher.finish() as usize) % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Follows one emitted event of a run.
    pub fn observe(&self, event: &Event, channel: &ChannelName, metrics: &Metrics) {
        let Some(run_id) = event.run_id.as_deref() else {
            return;
        };
        if event.kind == EventType::Custom {
            // Custom events keep a run alive but are not part of its lifecycle.
            if let Some(run) = self.shard(run_id).get_mut(run_id) {
                run.last_event = Instant::now();
                *run.counts.entry(event.kind.as_str()).or_default() += 1;
            }
            return;
        }
        let now = Instant::now();
        let mut shard = self.shard(run_id);
        if !shard.contains_key(run_id) {
            self.make_room(&mut shard, metrics);
            let state = if event.kind == EventType::AgentStarted {
                metrics.runs_started.inc();
                metrics.runs_active.inc();
                RunState::Running
            } else {
                metrics.runs_active.inc();
                RunState::Unstarted
            };
            shard.insert(
                run_id.to_string(),
                Run {
                    state,
                    channel: channel.clone(),
                    thread_id: event.thread_id.clone(),
                    user_id: event.user_id.clone(),
                    first_event: now,
                    last_event: now,
                    ended: None,
                    open_tools: Vec::new(),
                    counts: BTreeMap::new(),
                    violations: BTreeMap::new(),
                },
            );
            if event.kind == EventType::AgentStarted {
                if let Some(run) = shard.get_mut(run_id) {
                    *run.counts.entry(event.kind.as_str()).or_default() += 1;
                }
                return;
            }
        }
        let Some(run) = shard.get_mut(run_id) else {
            return;
        };
        run.last_event = now;
        *run.counts.entry(event.kind.as_str()).or_default() += 1;
        if run.thread_id.is_none() {
            run.thread_id = event.thread_id.clone();
        }
        if run.user_id.is_none() {
            run.user_id = event.user_id.clone();
        }
        let violation = |run: &mut Run, kind: Violation| {
            *run.violations.entry(kind.as_str()).or_default() += 1;
            metrics
                .lifecycle_violations
                .with_label_values(&[kind.as_str()])
                .inc();
            tracing::debug!(run_id, channel = %run.channel, kind = kind.as_str(), "Lifecycle violation.");
        };
        match run.state {
            RunState::Stalled => return violation(run, Violation::EventAfterStall),
            RunState::Completed | RunState::Errored => {
                let kind = if event.kind == EventType::AgentStarted {
                    Violation::DuplicateStart
                } else {
                    Violation::EventAfterEnd
                };
                return violation(run, kind);
            }
            RunState::Unstarted | RunState::Running => {}
        }
        match event.kind {
            EventType::AgentStarted if run.state == RunState::Unstarted => {
                run.state = RunState::Running;
                metrics.runs_started.inc();
            }
            EventType::AgentStarted => violation(run, Violation::DuplicateStart),
            _ if run.state == RunState::Unstarted && run.counts.values().sum::<u64>() == 1 => {
                violation(run, Violation::EventBeforeStart)
            }
            _ => {}
        }
        let tool_call_id = || {
            event
                .payload
                .get("tool_call_id")
                .and_then(|v| v.as_str())
                .map(str::to_string)
        };
        match event.kind {
            EventType::ToolExecuting => {
                if let Some(id) = tool_call_id() {
                    // Bounded: the list is shown at /v1/runs and sent in the stall notice.
                    if run.open_tools.len() < MAX_OPEN_TOOLS {
                        run.open_tools.push(id);
                    }
                }
            }
            EventType::ToolCompleted => {
                let id = tool_call_id().unwrap_or_default();
                match run.open_tools.iter().position(|open| *open == id) {
                    Some(index) => {
                        run.open_tools.remove(index);
                    }
                    None => violation(run, Violation::ToolCompletedWithoutExecuting),
                }
            }
            EventType::AgentCompleted | EventType::AgentError => {
                if !run.open_tools.is_empty() {
                    violation(run, Violation::EndedWithOpenTools);
                }
                let (state, outcome) = if event.kind == EventType::AgentCompleted {
                    (RunState::Completed, RunOutcome::Completed)
                } else {
                    (RunState::Errored, RunOutcome::Error)
                };
                end(run, state, outcome, now, metrics);
            }
            _ => {}
        }
    }

    /// Evicts the least recently active run of a full shard.
    fn make_room(&self, shard: &mut HashMap<String, Run>, metrics: &Metrics) {
        let per_shard = self.config.max_runs.div_ceil(SHARDS).max(1);
        while shard.len() >= per_shard {
            let Some(oldest) = shard
                .iter()
                .min_by_key(|(_, run)| (run.state.is_open(), run.last_event))
                .map(|(id, _)| id.clone())
            else {
                return;
            };
            if let Some(run) = shard.remove(&oldest) {
                if run.state.is_open() {
                    metrics.runs_active.dec();
                }
                metrics.runs_evicted.inc();
                static FULL: Throttle = Throttle::every(Duration::from_secs(10));
                if let Some(held_back) = FULL.allow() {
                    tracing::warn!(run_id = %oldest, state = ?run.state, held_back, "Watchdog is full: stopped following a run (watchdog.max_runs); held_back more since the last line.");
                }
            }
        }
    }

    /// Forgets ended runs past `retain` and returns the open runs quiet for longer than
    /// `run_idle_timeout`: candidates for [`Self::stall`] (in Redis mode, once the run's shared
    /// activity confirmed that no replica saw it either).
    pub fn sweep(&self) -> Vec<String> {
        let now = Instant::now();
        let mut quiet = Vec::new();
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            shard.retain(|_, run| {
                run.ended
                    .is_none_or(|ended| now.saturating_duration_since(ended) <= self.config.retain)
            });
            quiet.extend(
                shard
                    .iter()
                    .filter(|(_, run)| {
                        run.state.is_open()
                            && now.saturating_duration_since(run.last_event)
                                > self.config.run_idle_timeout
                    })
                    .map(|(run_id, _)| run_id.clone()),
            );
        }
        quiet
    }

    /// Ends a quiet run as stalled; `None` if it is no longer open and quiet.
    pub fn stall(&self, run_id: &str, metrics: &Metrics) -> Option<Stalled> {
        let now = Instant::now();
        let mut shard = self.shard(run_id);
        let run = shard.get_mut(run_id)?;
        let idle = now.saturating_duration_since(run.last_event);
        if !run.state.is_open() || idle <= self.config.run_idle_timeout {
            return None;
        }
        tracing::warn!(%run_id, channel = %run.channel, thread_id = run.thread_id.as_deref(), idle_seconds = idle.as_secs_f64(), open_tools = run.open_tools.len(), "Run stalled.");
        metrics.runs_stalled.inc();
        end(run, RunState::Stalled, RunOutcome::Stalled, now, metrics);
        Some(Stalled {
            run_id: run_id.to_string(),
            channel: run.channel.clone(),
            user_id: run.user_id.clone(),
            open_tools: run.open_tools.clone(),
            idle,
        })
    }

    /// Redis mode: another replica saw an event of this run `ago`: it is not quiet.
    pub fn seen_elsewhere(&self, run_id: &str, ago: Duration) {
        if let Some(run) = self.shard(run_id).get_mut(run_id) {
            let at = Instant::now().checked_sub(ago).unwrap_or(run.last_event);
            run.last_event = run.last_event.max(at);
        }
    }

    /// Redis mode: the run ended through another replica, which counted its end; stop following it.
    pub fn ended_elsewhere(&self, run_id: &str, metrics: &Metrics) {
        if let Some(run) = self.shard(run_id).remove(run_id)
            && run.state.is_open()
        {
            metrics.runs_active.dec();
        }
    }

    pub fn report(&self, run_id: &str) -> Option<RunReport> {
        let shard = self.shard(run_id);
        let run = shard.get(run_id)?;
        let now = Instant::now();
        Some(RunReport {
            run_id: run_id.to_string(),
            state: run.state,
            channel: run.channel.to_string(),
            thread_id: run.thread_id.clone(),
            user_id: run.user_id.clone(),
            counts: run.counts.clone(),
            open_tools: run.open_tools.clone(),
            seconds_since_last_event: now.saturating_duration_since(run.last_event).as_secs_f64(),
            duration_seconds: run.ended.map(|ended| {
                ended
                    .saturating_duration_since(run.first_event)
                    .as_secs_f64()
            }),
            violations: run.violations.clone(),
        })
    }
}

fn end(run: &mut Run, state: RunState, outcome: RunOutcome, now: Instant, metrics: &Metrics) {
    run.state = state;
    run.ended = Some(now);
    metrics.runs_active.dec();
    count(&metrics.runs_completed, outcome);
    metrics
        .run_duration
        .observe(now.saturating_duration_since(run.first_event).as_secs_f64());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::event;

    fn run_event(kind: &str, run: &str) -> Event {
        event::parse(
            &format!(r#"{{"type":"{kind}","run_id":"{run}","thread_id":"t"}}"#),
            1024,
        )
        .unwrap()
    }

    fn watchdog(max_runs: usize, retain: Duration) -> Watchdog {
        Watchdog::new(WatchdogConfig {
            run_idle_timeout: Duration::from_secs(60),
            stalled_event: true,
            max_runs,
            retain,
        })
    }

    #[test]
    fn a_full_watchdog_evicts_the_least_recently_active_and_counts_it() {
        let metrics = Metrics::new();
        let dog = watchdog(SHARDS, Duration::from_secs(60));
        let channel = ChannelName::thread("t");
        for n in 0..100 {
            dog.observe(
                &run_event("agent_started", &format!("run_{n}")),
                &channel,
                &metrics,
            );
        }
        let followed = (0..100)
            .filter(|n| dog.report(&format!("run_{n}")).is_some())
            .count();
        assert!(followed <= SHARDS, "bounded by max_runs: {followed}");
        assert_eq!(metrics.runs_evicted.get() as usize, 100 - followed);
        assert_eq!(metrics.runs_active.get() as usize, followed);
        assert!(dog.report("run_99").is_some(), "the newest run is kept");
    }

    #[test]
    fn ended_runs_are_forgotten_after_retain() {
        let metrics = Metrics::new();
        let dog = watchdog(100, Duration::ZERO);
        let channel = ChannelName::thread("t");
        dog.observe(&run_event("agent_started", "run_a"), &channel, &metrics);
        dog.observe(&run_event("agent_completed", "run_a"), &channel, &metrics);
        dog.observe(&run_event("agent_started", "run_b"), &channel, &metrics);
        assert_eq!(
            dog.report("run_a").map(|r| r.state),
            Some(RunState::Completed)
        );
        std::thread::sleep(Duration::from_millis(5));
        assert!(dog.sweep().is_empty());
        assert!(dog.report("run_a").is_none(), "ended and past retain");
        assert_eq!(
            dog.report("run_b").map(|r| r.state),
            Some(RunState::Running),
            "open runs stay"
        );
    }
}
