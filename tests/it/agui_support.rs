//! The AG-UI harness, software nobody here wrote: a scripted upstream agent made with the Python
//! `ag-ui-protocol` package (tests/agui/agent.py) and the official `@ag-ui/client` on Node
//! (tests/agui/*.mjs). Both are installed, at the versions their lock files pin, by
//! `scripts/agui-deps` (which `scripts/test` runs).

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long one Node script may run before the test fails.
pub const NODE_LIMIT: Duration = Duration::from_secs(60);

/// The harness directory, tests/agui.
pub fn harness_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/agui")
}

fn python() -> PathBuf {
    let python = harness_dir().join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/agui-deps (it installs ag-ui-protocol from tests/agui/requirements.lock)",
        python.display()
    );
    python
}

fn node_modules() -> PathBuf {
    let modules = harness_dir().join("node_modules/@ag-ui/client");
    assert!(
        modules.exists(),
        "{} is missing: run scripts/agui-deps (it runs npm ci in tests/agui)",
        modules.display()
    );
    modules
}

/// The scripted AG-UI agent (tests/agui/agent.py) on 127.0.0.1, killed on drop.
pub struct AguiAgent {
    child: Child,
    /// Kept open: the agent's stdout after its `PORT` line.
    _stdout: BufReader<ChildStdout>,
    pub addr: SocketAddr,
    /// `http://127.0.0.1:<port>/`, where `POST` runs the scripted run.
    pub url: String,
    /// The agent's stderr (its request log).
    pub log: PathBuf,
}

impl AguiAgent {
    /// Starts `agent.py --port 0` with extra `args` (`--delay-ms`, `--die-after`, `--end-after`,
    /// `--stall-after`, `--require-header`) and waits for its `PORT n` line.
    pub fn start(args: &[&str]) -> Self {
        let python = python();
        let log = std::env::temp_dir().join(format!(
            "agentwire-agui-agent-{}-{}.log",
            std::process::id(),
            next_id()
        ));
        let mut child = Command::new(python)
            .arg(harness_dir().join("agent.py"))
            .args(["--port", "0"])
            .args(args)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut line = String::new();
            let read = stdout.read_line(&mut line);
            let _ = tx.send(read.map(|_| line));
            stdout
        });
        let line = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(Ok(line)) => line,
            Ok(Err(error)) => {
                let _ = child.kill();
                panic!("agent.py: {error}; stderr: {}", read_log(&log))
            }
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "agent.py printed no PORT line in 20 s; stderr: {}",
                    read_log(&log)
                )
            }
        };
        let stdout = reader.join().unwrap();
        let Some(port) = line
            .trim()
            .strip_prefix("PORT ")
            .and_then(|p| p.parse::<u16>().ok())
        else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "agent.py did not start (stdout {line:?}); stderr: {}",
                read_log(&log)
            );
        };
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        Self {
            child,
            _stdout: stdout,
            addr,
            url: format!("http://{addr}/"),
            log,
        }
    }

    /// What the agent logged so far (one line per request, plus how each stream ended).
    pub fn stderr(&self) -> String {
        read_log(&self.log)
    }

    /// The POSTs the agent received so far: `[{"path", "headers" (lower-case names), "body"}]`.
    pub async fn requests(&self) -> Value {
        let (status, body) = crate::support::http(self.addr, "GET", "/requests", None).await;
        assert!(status.is_success(), "GET /requests: {status} {body}");
        serde_json::from_str(&body).unwrap()
    }
}

impl Drop for AguiAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn next_id() -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A RunAgentInput as `HttpAgent` sends it (camelCase), for POSTs made without the client.
pub fn run_input(thread_id: &str, run_id: &str) -> Value {
    serde_json::json!({
        "threadId": thread_id,
        "runId": run_id,
        "messages": [],
        "tools": [],
        "context": [],
        "state": {},
        "forwardedProps": {},
    })
}

/// Runs `node tests/agui/<script> <args>` (at most [`NODE_LIMIT`]) and returns the one JSON
/// object it prints. Panics, with its stderr, when it fails, times out or prints no JSON.
pub async fn node(script: &str, args: &[&str]) -> Value {
    node_modules();
    let dir = harness_dir();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let shown = format!("node {script} {}", args.join(" "));
    let script = dir.join(script);
    tokio::task::spawn_blocking(move || {
        let mut child = Command::new("node")
            .arg(&script)
            .args(&args)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{shown}: cannot start node ({e}): run scripts/agui-deps"));
        let stdout = drain(child.stdout.take().unwrap());
        let stderr = drain(child.stderr.take().unwrap());
        let deadline = Instant::now() + NODE_LIMIT;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{shown}: still running after {NODE_LIMIT:?}; stderr: {}",
                    stderr.join().unwrap()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let (stdout, stderr) = (stdout.join().unwrap(), stderr.join().unwrap());
        assert!(
            status.success(),
            "{shown}: {status}; stdout: {stdout}; stderr: {stderr}"
        );
        let line = stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or_else(|| panic!("{shown}: printed nothing; stderr: {stderr}"));
        serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("{shown}: not JSON ({e}): {line}; stderr: {stderr}"))
    })
    .await
    .unwrap()
}

/// Reads a pipe to its end on a thread of its own (so neither pipe can fill and block the child).
fn drain(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    })
}
