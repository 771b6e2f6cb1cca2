//! Tidy tests: the rules ARCHITECTURE.md states, checked on the source tree and the docs, so they
//! stay true (in the style of rust-analyzer's `tidy.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::support::{Gateway, binary};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `.rs` file under `src/`, as (path relative to `src/`, text).
fn sources() -> Vec<(String, String)> {
    fn walk(dir: &Path, base: &Path, out: &mut Vec<(String, String)>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().flatten().collect();
        entries.sort_by_key(|e| e.path());
        for entry in entries {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, base, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let relative = path
                    .strip_prefix(base)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                out.push((relative, std::fs::read_to_string(&path).unwrap()));
            }
        }
    }
    let src = root().join("src");
    let mut out = Vec::new();
    walk(&src, &src, &mut out);
    out
}

/// The code of a file without comment lines (doc comments name paths freely).
fn code_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim_start().starts_with("//"))
        .map(|(n, line)| (n + 1, line))
}

/// Each occurrence of `needle` in the code of files not under an allowed prefix.
fn offenders(needle: &str, allowed: &[&str], starts_path: bool) -> Vec<String> {
    let mut found = Vec::new();
    for (path, text) in sources() {
        if allowed.iter().any(|prefix| path.starts_with(prefix)) {
            continue;
        }
        for (n, line) in code_lines(&text) {
            let hit = line.match_indices(needle).any(|(at, _)| {
                // A path that starts here: `redis::x`, not `broker::redis::x`.
                let before = line[..at].chars().next_back();
                !starts_path || !before.is_some_and(|c| c == ':' || c.is_alphanumeric() || c == '_')
            });
            if hit {
                found.push(format!("src/{path}:{n}: {}", line.trim()));
            }
        }
    }
    found
}

#[test]
fn only_broker_names_the_broker_mode() {
    let found = [
        offenders("Broker::Memory", &["broker/"], false),
        offenders("Broker::Redis", &["broker/"], false),
        offenders("broker::redis", &["broker/"], false),
        offenders("RedisBroker", &["broker/"], false),
    ]
    .concat();
    assert!(
        found.is_empty(),
        "mode decided outside broker/:\n{}",
        found.join("\n")
    );
}

#[test]
fn only_broker_redis_speaks_redis() {
    let found = offenders("redis::", &["broker/redis/"], true);
    assert!(
        found.is_empty(),
        "the redis crate used outside broker/redis/:\n{}",
        found.join("\n")
    );
}

/// Tasks have owners: a stage's `TaskTracker` spawns them and shutdown drains it. The tools (the
/// client, the bench) and `main`'s signal listener are not on a path that holds events.
#[test]
fn no_bare_spawn_on_the_event_path() {
    let found = offenders("tokio::spawn", &["tools/", "main.rs"], false);
    assert!(found.is_empty(), "bare tokio::spawn:\n{}", found.join("\n"));
}

/// Which top-level module (the data path's stage) each `crate::` path of a file names; `Gateway`
/// and `Shutdown` are `lib`.
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let files = sources();
    let modules: BTreeSet<String> = files
        .iter()
        .map(|(path, _)| stage_of(path))
        .filter(|stage| stage != "main")
        .collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (path, text) in &files {
        let from = stage_of(path);
        if from == "main" {
            continue;
        }
        let edges = graph.entry(from.clone()).or_default();
        for (_, line) in code_lines(text) {
            let mut rest = line;
            while let Some(at) = rest.find("crate::") {
                rest = &rest[at + "crate::".len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                let to = match name.as_str() {
                    "Gateway" | "Shutdown" => "lib".to_string(),
                    name if modules.contains(name) => name.to_string(),
                    _ => continue,
                };
                if to != from {
                    edges.insert(to);
                }
            }
            // lib.rs names its modules without `crate::`.
            if from == "lib"
                && let Some(used) = line.trim().strip_prefix("use ")
                && let Some((name, _)) = used.split_once("::")
                && modules.contains(name)
            {
                edges.insert(name.to_string());
            }
        }
    }
    graph
}

fn stage_of(path: &str) -> String {
    let first = path.split('/').next().unwrap_or(path);
    first.strip_suffix(".rs").unwrap_or(first).to_string()
}

/// The module graph has no circle: every dependency points one way down the data path. The
/// order this prints (`cargo test --test it tidy::module_graph -- --nocapture`) is the layering
/// ARCHITECTURE.md shows.
#[test]
fn module_graph_has_no_circle() {
    let graph = module_graph();
    let mut order = Vec::new();
    let mut state: BTreeMap<&str, u8> = BTreeMap::new();
    fn visit<'a>(
        node: &'a str,
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<&'a str, u8>,
        path: &mut Vec<&'a str>,
        order: &mut Vec<&'a str>,
    ) {
        match state.get(node) {
            Some(2) => return,
            Some(1) => {
                let start = path.iter().position(|n| *n == node).unwrap_or(0);
                panic!(
                    "a circle in the module graph: {} -> {node}",
                    path[start..].join(" -> ")
                );
            }
            _ => {}
        }
        state.insert(node, 1);
        path.push(node);
        for next in graph.get(node).into_iter().flatten() {
            visit(next, graph, state, path, order);
        }
        path.pop();
        state.insert(node, 2);
        order.push(node);
    }
    for node in graph.keys() {
        visit(node, &graph, &mut state, &mut Vec::new(), &mut order);
    }
    println!("modules, each depending only on those before it:");
    for node in &order {
        let deps: Vec<_> = graph.get(*node).into_iter().flatten().cloned().collect();
        println!("  {node:<12} -> {}", deps.join(", "));
    }
}

/// The layers ARCHITECTURE.md draws: each module, in reading order.
fn layers() -> Vec<String> {
    let doc = std::fs::read_to_string(root().join("ARCHITECTURE.md")).unwrap();
    let section = doc.split("## Layers").nth(1).unwrap();
    let block = section.split("```").nth(1).unwrap();
    block
        .lines()
        .filter_map(|line| line.split("   ").next())
        .flat_map(|modules| modules.split_whitespace())
        .filter(|name| name.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        .map(str::to_string)
        .collect()
}

/// Every dependency points to a module drawn before it in ARCHITECTURE.md's layers.
#[test]
fn module_dependencies_follow_the_documented_layers() {
    let layers = layers();
    let graph = module_graph();
    let mut wrong = Vec::new();
    for (from, deps) in &graph {
        let Some(at) = layers.iter().position(|l| l == from) else {
            wrong.push(format!("{from} is not in ARCHITECTURE.md's layers"));
            continue;
        };
        for to in deps {
            if !layers[..at].contains(to) {
                wrong.push(format!("{from} -> {to} points up (or sideways)"));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// `docs/configuration.md`'s table lists exactly the keys and defaults `agentwire config` prints,
/// and as `unset` exactly the optional keys it prints as comments (`# key = ""  # unset: …`).
#[test]
fn the_configuration_table_is_what_agentwire_config_prints() {
    let output = binary()
        .arg("config")
        .env_clear()
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let mut printed = BTreeMap::new();
    let mut commented = BTreeSet::new();
    let mut section = String::new();
    for line in String::from_utf8(output.stdout).unwrap().lines() {
        let line = line.trim();
        if let Some(comment) = line.strip_prefix('#') {
            if let Some((key, _)) = comment.trim().split_once(" = ") {
                commented.insert(format!("{section}{key}"));
            }
        } else if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = format!("{name}.");
        } else if let Some((key, value)) = line.split_once(" = ") {
            printed.insert(
                format!("{section}{key}"),
                value.trim_matches('"').to_string(),
            );
        }
    }
    let doc = std::fs::read_to_string(root().join("docs/configuration.md")).unwrap();
    let mut documented = BTreeMap::new();
    let mut unset = BTreeSet::new();
    for row in doc.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let key = cells[1].trim_matches('`').to_string();
        // Optional keys have no default: printed as comments.
        if cells[2] == "unset" {
            unset.insert(key);
        } else {
            documented.insert(key, cells[2].trim_matches('`').to_string());
        }
    }
    assert_eq!(
        documented, printed,
        "docs/configuration.md vs agentwire config"
    );
    assert_eq!(
        unset, commented,
        "docs/configuration.md's unset keys vs agentwire config's comments"
    );
}

/// Every metric `docs/metrics.md` names is exported, and every exported `agentwire_` metric is
/// documented there.
#[tokio::test]
async fn every_documented_metric_exists_and_every_metric_is_documented() {
    let gateway = Gateway::start().await;
    let exposition = gateway.metrics().await;
    let exported: BTreeSet<String> = exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| name.starts_with("agentwire_"))
        .map(str::to_string)
        .collect();
    let doc = std::fs::read_to_string(root().join("docs/metrics.md")).unwrap();
    let documented: BTreeSet<String> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .filter(|name| name.starts_with("agentwire_"))
        .map(|name| name.split('{').next().unwrap_or(name).to_string())
        .collect();
    let missing: Vec<_> = documented.difference(&exported).collect();
    assert!(missing.is_empty(), "documented, not exported: {missing:?}");
    let undocumented: Vec<_> = exported.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "exported, not documented: {undocumented:?}"
    );
}

/// Every module says what it owns.
#[test]
fn every_module_has_a_doc_comment() {
    let missing: Vec<String> = sources()
        .into_iter()
        .filter(|(_, text)| !text.trim_start().starts_with("//!"))
        .map(|(path, _)| format!("src/{path}"))
        .collect();
    assert!(missing.is_empty(), "no //! doc comment: {missing:?}");
}

/// A user of the repository has only the repository: nothing points at the design notes it was
/// built from.
#[test]
fn nothing_points_outside_the_repository() {
    let mut found = Vec::new();
    let mut files: Vec<PathBuf> = sources()
        .into_iter()
        .map(|(path, _)| root().join("src").join(path))
        .collect();
    for top in ["README.md", "ARCHITECTURE.md"] {
        files.push(root().join(top));
    }
    for entry in std::fs::read_dir(root().join("docs")).unwrap().flatten() {
        files.push(entry.path());
    }
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        for (n, line) in text.lines().enumerate() {
            if line.contains("DESIGN.md") || line.contains("../shared") {
                found.push(format!("{}:{}: {}", path.display(), n + 1, line.trim()));
            }
        }
    }
    assert!(found.is_empty(), "{}", found.join("\n"));
}
