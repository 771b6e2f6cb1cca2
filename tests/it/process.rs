//! The binary as operators run it: configuration layering, exit codes, and SIGTERM.

use std::process::Stdio;
use std::time::Duration;

use crate::support::{Client, Process, binary, free_port, http};

#[test]
fn config_prints_env_over_file_and_refuses_bad_values_with_64() {
    let dir = std::env::temp_dir().join(format!("agentwire-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("agentwire.toml");
    std::fs::write(
        &file,
        "[history]\nmax_events = 50\n[session]\nheartbeat = \"5s\"\n",
    )
    .unwrap();

    let output = binary()
        .args(["config", "--config", file.to_str().unwrap()])
        .env_clear()
        .env("AGENTWIRE_HISTORY__MAX_EVENTS", "70")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let printed = String::from_utf8(output.stdout).unwrap();
    assert!(
        printed.contains("max_events = 70"),
        "the environment wins over the file:\n{printed}"
    );
    assert!(
        printed.contains("heartbeat = \"5s\""),
        "the file wins over defaults:\n{printed}"
    );

    let output = binary()
        .env_clear()
        .env("AGENTWIRE_SESSION__QUEUE_EVENTS", "lots")
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("session.queue_events"), "{stderr}");

    let output = binary()
        .args(["--config", "/nonexistent/agentwire.toml"])
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn sigterm_drains_then_closes_clients_with_1012_and_exits_0() {
    let mut process = Process::start(&[("AGENTWIRE_SHUTDOWN__DRAIN_DELAY", "1s")]).await;
    let mut client = Client::hello(process.addr, "u_1").await;
    assert_eq!(http(process.addr, "GET", "/readyz", None).await.0, 200);

    process.signal("TERM");
    let mut draining = false;
    for _ in 0..40 {
        if http(process.addr, "GET", "/readyz", None).await.0 == 503 {
            draining = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(draining, "/readyz turns 503 during the drain delay");
    assert_eq!(client.closed().await, 1012);

    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = process.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the process must exit"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.code(), Some(0));
    let _ = free_port();
}
