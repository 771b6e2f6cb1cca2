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
    let mut process = Process::start(&[
        ("AGENTWIRE_SHUTDOWN__DRAIN_DELAY", "1s"),
        ("AGENTWIRE_SHUTDOWN__CLOSE_WINDOW", "0s"),
    ])
    .await;
    let mut client = Client::hello(process.addr, "u_1").await;
    assert_eq!(http(process.internal, "GET", "/readyz", None).await.0, 200);

    process.signal("TERM");
    let mut draining = false;
    for _ in 0..40 {
        if http(process.internal, "GET", "/readyz", None).await.0 == 503 {
            draining = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(draining, "/readyz turns 503 during the drain delay");
    assert_eq!(client.closed().await, 1012);

    assert_eq!(process.exit_code(Duration::from_secs(15)).await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_clients_get_1012_spread_over_the_close_window() {
    let mut process = Process::start(&[
        ("AGENTWIRE_SHUTDOWN__DRAIN_DELAY", "500ms"),
        ("AGENTWIRE_SHUTDOWN__CLOSE_WINDOW", "2s"),
    ])
    .await;
    let addr = process.addr;
    let mut clients = Vec::new();
    for chunk in 0..10 {
        let connecting: Vec<_> = (0..100)
            .map(|n| {
                tokio::spawn(async move { Client::hello(addr, &format!("u_{chunk}_{n}")).await })
            })
            .collect();
        for client in connecting {
            clients.push(client.await.unwrap());
        }
    }

    let signalled = std::time::Instant::now();
    process.signal("TERM");
    let closes: Vec<_> = clients
        .into_iter()
        .map(|mut client| tokio::spawn(async move { (client.closed().await, signalled.elapsed()) }))
        .collect();
    let mut times = Vec::new();
    for close in closes {
        let (code, at) = close.await.unwrap();
        assert_eq!(code, 1012);
        times.push(at);
    }
    times.sort();
    let (first, last) = (times[0], times[times.len() - 1]);
    assert!(
        first >= Duration::from_millis(450),
        "no close before the drain delay: {first:?}"
    );
    assert!(
        last <= Duration::from_millis(3500),
        "all within drain delay + window (+ margin): {last:?}"
    );
    assert!(
        last - first >= Duration::from_millis(500),
        "closes are spread, not all at once: {first:?}..{last:?}"
    );

    assert_eq!(process.exit_code(Duration::from_secs(15)).await, Some(0));
}

#[tokio::test]
async fn json_logs_carry_the_connection_id() {
    let port = free_port();
    let child = binary()
        .env_clear()
        .env("AGENTWIRE_LISTEN", format!("127.0.0.1:{port}"))
        .env("AGENTWIRE_LOG_FORMAT", "json")
        .env("AGENTWIRE_LOG_LEVEL", "agentwire=debug")
        .env("AGENTWIRE_SHUTDOWN__DRAIN_DELAY", "0s")
        .env("AGENTWIRE_SHUTDOWN__CLOSE_WINDOW", "0s")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    crate::support::wait_listening(addr).await;
    let client = Client::hello(addr, "u_logged").await;
    let connection_id = client.welcome["connection_id"]
        .as_str()
        .unwrap()
        .to_string();
    drop(client);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let output = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}")))
        .collect();
    assert!(
        lines.iter().any(|l| l["message"] == "Listening."),
        "{stderr}"
    );
    let hello = lines
        .iter()
        .find(|l| l["message"] == "Hello.")
        .unwrap_or_else(|| panic!("{stderr}"));
    assert_eq!(
        hello["span"]["connection_id"],
        connection_id.as_str(),
        "{hello}"
    );
    assert_eq!(hello["user_id"], "u_logged");
}

/// Configuration that would start and do the wrong thing in silence stops the start with 64 and
/// names what is wrong. (`agentwire config` loads exactly as `agentwire serve` does, and exits.)
#[test]
fn silent_misconfigurations_stop_the_start_with_64() {
    for (env, named) in [
        (("AGENTWIRE_LOG_LEVEL", "verbose"), "log_level"),
        (("RUST_LOG", "verbose"), "RUST_LOG"),
        (("AGENTWIRE_UPSTREAM__TIMEOUT", "0s"), "upstream.timeout"),
        (
            ("AGENTWIRE_BROKER__UI_EVENTS_MAX_LEN", "0"),
            "broker.ui_events_max_len",
        ),
        (
            (
                "AGENTWIRE_UPSTREAM__WEBHOOK_URL",
                "http://agent:99999/hlink",
            ),
            "upstream.webhook_url",
        ),
        (
            ("AGENTWIRE_SESSION_HEARTBEAT", "5s"),
            "did you mean AGENTWIRE_SESSION__HEARTBEAT?",
        ),
    ] {
        let output = binary()
            .arg("config")
            .env_clear()
            .env(env.0, env.1)
            .current_dir(std::env::temp_dir())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(64),
            "{}={}: {stderr}",
            env.0,
            env.1
        );
        assert!(stderr.contains(named), "{}={}: {stderr}", env.0, env.1);
    }
}

#[test]
fn the_probe_refuses_a_configuration_file_it_would_not_read() {
    let output = binary()
        .args(["probe", "--config", "agentwire.toml", "--timeout", "1s"])
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(64), "{output:?}");
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("--config"),
        "{output:?}"
    );
}

#[tokio::test]
async fn text_logs_to_a_pipe_have_no_colours() {
    let port = free_port();
    let child = binary()
        .env_clear()
        .env("AGENTWIRE_LISTEN", format!("127.0.0.1:{port}"))
        .env(
            "AGENTWIRE_INTERNAL_LISTEN",
            format!("127.0.0.1:{}", free_port()),
        )
        .env("AGENTWIRE_SHUTDOWN__DRAIN_DELAY", "0s")
        .env("AGENTWIRE_SHUTDOWN__CLOSE_WINDOW", "0s")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    crate::support::wait_listening(addr).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let output = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("Listening."), "{stderr}");
    assert!(
        !stderr.contains("\x1b["),
        "ANSI escapes in a pipe: {stderr:?}"
    );
}

#[tokio::test]
async fn a_second_sigint_exits_at_once() {
    let mut process = Process::start(&[
        ("AGENTWIRE_SHUTDOWN__DRAIN_DELAY", "30s"),
        ("AGENTWIRE_SHUTDOWN__CLOSE_WINDOW", "0s"),
    ])
    .await;
    assert_eq!(http(process.internal, "GET", "/readyz", None).await.0, 200);
    tokio::time::sleep(Duration::from_millis(100)).await;
    process.signal("INT");
    let mut draining = false;
    for _ in 0..100 {
        if http(process.internal, "GET", "/readyz", None).await.0 == 503 {
            draining = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(draining, "the first SIGINT starts the drain");
    process.signal("INT");
    assert_eq!(process.exit_code(Duration::from_secs(3)).await, Some(130));
}
