//! AG-UI with software nobody here wrote: the scripted agent (Python `ag-ui-protocol`) and the
//! official `@ag-ui/client` on Node. These first tests check the harness itself, without the
//! gateway: what the client assembles from the agent directly is the reference the gateway's
//! AG-UI door is compared with.

use serde_json::Value;

use crate::agui_support::{AguiAgent, node, run_input};

/// The messages `run-agent.mjs` assembled for the scripted run `run_id`.
fn assert_scripted_messages(messages: &Value, run_id: &str) {
    let messages = messages.as_array().unwrap();
    let ids: Vec<&str> = messages.iter().map(|m| m["id"].as_str().unwrap()).collect();
    let r = run_id;
    assert_eq!(
        ids,
        [
            format!("{r}-m1"),
            format!("{r}-tr1"),
            format!("{r}-tr2"),
            format!("{r}-m2")
        ],
        "{messages:#?}"
    );
    let first = &messages[0];
    assert_eq!(first["role"], "assistant");
    assert_eq!(
        first["content"],
        "Let me check the weather in Paris and Berlin."
    );
    let calls = first["toolCalls"].as_array().unwrap();
    assert_eq!(calls.len(), 2, "{first:#?}");
    for (call, (n, city)) in calls.iter().zip([(1, "Paris"), (2, "Berlin")]) {
        assert_eq!(call["id"], format!("{r}-tc{n}"));
        assert_eq!(call["function"]["name"], "get_weather");
        let args: Value =
            serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(args, serde_json::json!({ "city": city }));
    }
    for (result, (n, city, temp)) in messages[1..3]
        .iter()
        .zip([(1, "Paris", 18), (2, "Berlin", 12)])
    {
        assert_eq!(result["role"], "tool");
        assert_eq!(result["toolCallId"], format!("{r}-tc{n}"));
        let content: Value = serde_json::from_str(result["content"].as_str().unwrap()).unwrap();
        assert_eq!(content, serde_json::json!({ "city": city, "temp_c": temp }));
    }
    assert_eq!(messages[3]["role"], "assistant");
    assert_eq!(
        messages[3]["content"],
        "Paris is 18 °C and Berlin is 12 °C."
    );
}

#[tokio::test]
async fn agent_runs_directly_with_the_official_client() {
    let agent = AguiAgent::start(&[]);
    let out = node(
        "run-agent.mjs",
        &["--url", &agent.url, "--thread", "t-direct", "--run", "r1"],
    )
    .await;
    // ok: runAgent resolved, and runAgent always verifies (enforce, chunks, verifyEvents).
    assert_eq!(out["ok"], true, "{out:#}\n{}", agent.stderr());
    assert_eq!(out["error"], Value::Null, "{out:#}");
    assert_eq!(out["finished"], true, "{out:#}");
    assert_eq!(out["warnings"], serde_json::json!([]), "{out:#}");
    let types = out["types"].as_array().unwrap();
    assert_eq!(types.len(), 23, "{out:#}");
    assert_eq!(types[0], "RUN_STARTED");
    assert_eq!(types[22], "RUN_FINISHED");
    assert_scripted_messages(&out["messages"], "r1");
    assert_eq!(
        out["state"],
        serde_json::json!({ "weather": { "Paris": 18, "Berlin": 12 }, "lastRunId": "r1" })
    );
    assert_eq!(out["result"], serde_json::json!({ "cities": 2 }));

    // What HttpAgent sent: a RunAgentInput asking for an event stream.
    let requests = agent.requests().await;
    let request = &requests[0];
    assert_eq!(request["headers"]["accept"], "text/event-stream");
    let body: Value = serde_json::from_str(request["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["threadId"], "t-direct");
    assert_eq!(body["runId"], "r1");
}

#[tokio::test]
async fn sse_reader_verifies_the_agent_stream() {
    let agent = AguiAgent::start(&[]);
    let input = run_input("t-sse", "r1").to_string();

    let whole = node(
        "sse-read.mjs",
        &["--url", &agent.url, "--post-json", &input, "--until-end"],
    )
    .await;
    assert_eq!(whole["ok"], true, "{whole:#}\n{}", agent.stderr());
    assert_eq!(whole["verified"], true, "{whole:#}");
    assert_eq!(whole["end"], "terminal", "{whole:#}");
    assert_eq!(whole["content_type"], "text/event-stream");
    let events = whole["events"].as_array().unwrap();
    assert_eq!(events.len(), 23, "{whole:#}");
    assert_eq!(events[0]["type"], "RUN_STARTED");
    assert_eq!(events[0]["threadId"], "t-sse");
    assert_eq!(events[22]["type"], "RUN_FINISHED");
    // The Python encoder writes `data:` lines only: no ids, no event names.
    assert!(whole["ids"].as_array().unwrap().iter().all(Value::is_null));
    assert_eq!(whole["last_id"], Value::Null);
    assert_eq!(whole["other"], serde_json::json!([]));

    // A browser that drops after 3 events: what it read verifies, and it has no id to resume from.
    let dropped = node(
        "sse-read.mjs",
        &[
            "--url",
            &agent.url,
            "--post-json",
            &input,
            "--stop-after",
            "3",
        ],
    )
    .await;
    assert_eq!(dropped["ok"], true, "{dropped:#}");
    assert_eq!(dropped["verified"], true, "{dropped:#}");
    assert_eq!(dropped["end"], "stopped", "{dropped:#}");
    assert_eq!(
        dropped["events"].as_array().unwrap().len(),
        3,
        "{dropped:#}"
    );
    assert_eq!(dropped["events"].as_array().unwrap()[..], events[..3]);
    assert_eq!(dropped["last_id"], Value::Null);
}

/// The agent's failure modes, as the stock client sees them without a gateway in between: the
/// behaviour the gateway's closing of dead runs is there to improve.
#[tokio::test]
async fn the_client_alone_cannot_tell_an_ended_stream_from_a_finished_run() {
    // Ends cleanly after 5 events, with a message open and no RUN_FINISHED: runAgent resolves.
    let ended = AguiAgent::start(&["--end-after", "5"]);
    let out = node(
        "run-agent.mjs",
        &["--url", &ended.url, "--thread", "t-end", "--run", "r1"],
    )
    .await;
    assert_eq!(out["ok"], true, "{out:#}");
    assert_eq!(out["finished"], false, "{out:#}");
    assert_eq!(out["types"].as_array().unwrap().len(), 5, "{out:#}");

    // Cut off mid-body after 5 events: the run fails with a transport error.
    let died = AguiAgent::start(&["--die-after", "5"]);
    let out = node(
        "run-agent.mjs",
        &["--url", &died.url, "--thread", "t-die", "--run", "r1"],
    )
    .await;
    assert_eq!(out["ok"], false, "{out:#}");
    assert_eq!(out["types"].as_array().unwrap().len(), 5, "{out:#}");
    assert!(
        out["error"].as_str().unwrap().contains("terminated"),
        "{out:#}"
    );

    // A required header is missing: HTTP 401 fails the run before any event.
    let guarded = AguiAgent::start(&["--require-header", "Authorization: Bearer s3cret"]);
    let out = node(
        "run-agent.mjs",
        &["--url", &guarded.url, "--thread", "t-auth", "--run", "r1"],
    )
    .await;
    assert_eq!(out["ok"], false, "{out:#}");
    assert!(
        out["error"].as_str().unwrap().starts_with("HTTP 401"),
        "{out:#}"
    );
    let out = node(
        "run-agent.mjs",
        &[
            "--url",
            &guarded.url,
            "--thread",
            "t-auth",
            "--run",
            "r2",
            "--header",
            "Authorization: Bearer s3cret",
        ],
    )
    .await;
    assert_eq!(out["ok"], true, "{out:#}");
    assert_scripted_messages(&out["messages"], "r2");
}

/// A stalled agent keeps the response open and sends nothing: a reader waits until it gives up.
#[tokio::test]
async fn a_stalled_agent_keeps_readers_waiting() {
    let agent = AguiAgent::start(&["--delay-ms", "10", "--stall-after", "4"]);
    let input = run_input("t-stall", "r1").to_string();
    let out = node(
        "sse-read.mjs",
        &[
            "--url",
            &agent.url,
            "--post-json",
            &input,
            "--until-end",
            "--timeout-ms",
            "1500",
        ],
    )
    .await;
    assert_eq!(out["ok"], false, "{out:#}");
    assert_eq!(out["end"], "timeout", "{out:#}");
    assert_eq!(out["events"].as_array().unwrap().len(), 4, "{out:#}");
    assert_eq!(out["verified"], true, "{out:#}");
    assert!(agent.stderr().contains("stalling after 4 events"));
}
