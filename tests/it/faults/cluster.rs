//! The system under fault: gateway processes on one real `redis-server` (or a real Redis
//! Cluster), and the doors the workload may use (a replica leaves them when it is told to stop, as a Service endpoint does
//! when its readiness fails).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::StatusCode;
use serde_json::Value;

use super::wire;
use crate::support::{Process, Redis, wait_ready};

/// The replicas' doors now serving: (public, internal).
#[derive(Clone, Default)]
pub struct Doors(Arc<Mutex<Vec<(SocketAddr, SocketAddr)>>>);

impl Doors {
    fn list(&self) -> std::sync::MutexGuard<'_, Vec<(SocketAddr, SocketAddr)>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A serving replica's doors, picked at random (`None` while none serves).
    pub fn pick(&self) -> Option<(SocketAddr, SocketAddr)> {
        let list = self.list();
        (!list.is_empty()).then(|| list[rand::random_range(0..list.len())])
    }

    /// Every serving replica's internal door.
    pub fn internals(&self) -> Vec<SocketAddr> {
        self.list().iter().map(|d| d.1).collect()
    }

    fn add(&self, doors: (SocketAddr, SocketAddr)) {
        self.list().push(doors);
    }

    fn remove(&self, public: SocketAddr) {
        self.list().retain(|d| d.0 != public);
    }
}

/// The gateway replicas, on `redis`: a [`Redis`], or a [`crate::support::RedisCluster`].
pub struct Cluster<R = Redis> {
    pub redis: R,
    replicas: Vec<Process>,
    env: Vec<(String, String)>,
    pub doors: Doors,
}

impl Cluster {
    /// `n` replicas on a fresh `redis-server` started with `redis_args`, each with `env`.
    pub async fn start(n: usize, redis_args: &[&str], env: &[(&str, &str)]) -> Self {
        let redis = Redis::start_with(redis_args).await;
        let url = redis.url();
        Cluster::on(redis, &url, n, env).await
    }
}

impl<R> Cluster<R> {
    /// `n` replicas on `redis`, reached at `url`, each with `env`.
    pub async fn on(redis: R, url: &str, n: usize, env: &[(&str, &str)]) -> Self {
        let mut cluster = Self {
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .chain([("AGENTWIRE_BROKER__REDIS_URL".into(), url.to_string())])
                .collect(),
            redis,
            replicas: Vec::new(),
            doors: Doors::default(),
        };
        for _ in 0..n {
            cluster.add_replica().await;
        }
        cluster
    }

    /// Starts one more replica and opens its doors once it is ready.
    pub async fn add_replica(&mut self) {
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let process = Process::start(&env).await;
        wait_ready(process.internal, StatusCode::OK).await;
        self.doors.add((process.addr, process.internal));
        self.replicas.push(process);
    }

    /// SIGTERM to the oldest replica; waits for its exit. Its exit code and how long it took.
    pub async fn terminate_oldest(&mut self) -> (Option<i32>, Duration) {
        let mut process = self.replicas.remove(0);
        self.doors.remove(process.addr);
        let started = Instant::now();
        process.signal("TERM");
        let code = process.exit_code(Duration::from_secs(30)).await;
        (code, started.elapsed())
    }

    /// The oldest replica's doors: the next one `terminate_oldest` or `kill_oldest` stops.
    pub fn oldest(&self) -> (SocketAddr, SocketAddr) {
        (self.replicas[0].addr, self.replicas[0].internal)
    }

    /// SIGKILL to the oldest replica.
    pub fn kill_oldest(&mut self) {
        let mut process = self.replicas.remove(0);
        self.doors.remove(process.addr);
        process.signal("KILL");
        let _ = process.child.wait();
    }

    /// The cluster's ledger from any serving replica (`GET /v1/ledger`).
    pub async fn ledger(&self) -> Value {
        for internal in self.doors.internals() {
            if let Ok((StatusCode::OK, ledger)) = wire::get(internal, "/v1/ledger?top=5").await {
                return ledger;
            }
        }
        panic!("no replica answered GET /v1/ledger");
    }
}
