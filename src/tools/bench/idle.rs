//! `bench idle`: resident memory per subscribed connection.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use super::{Server, run_tag};
use crate::client::{Socket, Target, expect_type, send};

/// Connections being set up at once.
const CONCURRENT_HANDSHAKES: usize = 256;

pub(super) async fn run(
    target: &Target,
    server: &Server,
    sources: &[IpAddr],
    n: usize,
    settle: Duration,
) -> anyhow::Result<Value> {
    let tag = run_tag();
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX);
    anyhow::ensure!(
        (n as u64) + 64 <= limit,
        "{n} connections need {n} open files and this process may hold {limit} (ulimit -n)"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = server.usage().await?;
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(CONCURRENT_HANDSHAKES));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let (target, source, gate, tag) = (
            target.clone(),
            sources[i % sources.len()],
            Arc::clone(&gate),
            tag.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await?;
            open(&target, source, &format!("bench-{tag}-{i}"))
                .await
                .with_context(|| format!("connection {i}"))
        }));
    }
    let mut sockets: Vec<Socket> = Vec::with_capacity(n);
    for task in tasks {
        sockets.push(task.await??);
    }
    let connected_in = started.elapsed();
    tokio::time::sleep(settle).await;
    let after = server.usage().await?;
    let per_connection = (after.rss_bytes - before.rss_bytes) / n as f64;
    drop(sockets);

    let result = json!({
        "scenario": "idle",
        "connections": n,
        "connect_seconds": connected_in.as_secs_f64(),
        "server_rss_before_bytes": before.rss_bytes,
        "server_rss_after_bytes": after.rss_bytes,
        "server_bytes_per_connection": per_connection.round(),
    });
    eprintln!(
        "idle: {n} subscribed connections in {:.1} s; server RSS {:.1} MiB -> {:.1} MiB = {:.2} KiB per connection",
        connected_in.as_secs_f64(),
        before.rss_bytes / 1048576.0,
        after.rss_bytes / 1048576.0,
        per_connection / 1024.0
    );
    Ok(result)
}

async fn open(target: &Target, source: IpAddr, id: &str) -> anyhow::Result<Socket> {
    let mut ws = target.websocket(target.connect_from(source).await?).await?;
    send(&mut ws, &json!({"type": "hello", "user_id": id})).await?;
    expect_type(&mut ws, "welcome").await?;
    expect_type(&mut ws, "subscribed").await?;
    send(&mut ws, &json!({"type": "subscribe", "thread_id": id})).await?;
    expect_type(&mut ws, "subscribed").await?;
    Ok(ws)
}
