//! `bench idle`: resident memory and server CPU per subscribed connection, without or with a
//! browser token in `hello` (HS256 or ES256).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use super::{Server, run_tag};
use crate::tools::client::Socket;

/// Connections being set up at once.
const CONCURRENT_HANDSHAKES: usize = 256;

pub(super) async fn run(
    server: &Server,
    sources: &[IpAddr],
    n: usize,
    settle: Duration,
) -> anyhow::Result<Value> {
    let signer = &server.signer;
    let tag = run_tag();
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX);
    anyhow::ensure!(
        (n as u64) + 64 <= limit,
        "{n} connections need {n} open files and this process may hold {limit} (ulimit -n)"
    );
    // Tokens are signed before the clock starts: the client's cost is not the server's.
    let hellos = (0..n)
        .map(|i| {
            let id = format!("bench-{tag}-{i}");
            signer.hello(&id, &id)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = server.usage().await?;
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(CONCURRENT_HANDSHAKES));
    let mut tasks = Vec::with_capacity(n);
    for (i, hello) in hellos.into_iter().enumerate() {
        let (server, source, gate, tag) = (
            server.clone(),
            sources[i % sources.len()],
            Arc::clone(&gate),
            tag.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await?;
            server
                .viewer(source, &hello, &format!("bench-{tag}-{i}"))
                .await
                .with_context(|| format!("connection {i}"))
        }));
    }
    let mut sockets: Vec<Socket> = Vec::with_capacity(n);
    for task in tasks {
        sockets.push(task.await??);
    }
    let connected_in = started.elapsed();
    let connected = server.usage().await?;
    tokio::time::sleep(settle).await;
    let after = server.usage().await?;
    let per_connection = (after.rss_bytes - before.rss_bytes) / n as f64;
    // Accept, upgrade, hello (with its token check) and subscribe, per connection.
    let cpu_us = (connected.cpu_seconds - before.cpu_seconds) * 1e6 / n as f64;
    drop(sockets);

    let result = json!({
        "scenario": "idle",
        "protocol": server.protocol,
        "connections": n,
        "connect_seconds": connected_in.as_secs_f64(),
        "server_rss_before_bytes": before.rss_bytes,
        "server_rss_after_bytes": after.rss_bytes,
        "server_bytes_per_connection": per_connection.round(),
        "token": signer.name(),
        "server_cpu_us_per_connection": (cpu_us * 10.0).round() / 10.0,
    });
    eprintln!(
        "idle: {n} subscribed connections (token: {}) in {:.1} s; server RSS {:.1} MiB -> {:.1} MiB = {:.2} KiB per connection; server CPU {:.0} µs per connection",
        signer.name(),
        connected_in.as_secs_f64(),
        before.rss_bytes / 1048576.0,
        after.rss_bytes / 1048576.0,
        per_connection / 1024.0,
        cpu_us
    );
    Ok(result)
}
