//! AG-UI delivery: AG-UI events posted in, AG-UI out on `/ws` (`hello.protocol = "ag-ui"`) and on
//! the SSE endpoint (`format=agui`),
//! native and AG-UI clients on one thread, and the prelude a client joining mid-run gets.

use serde_json::{Value, json};

use crate::support::{Client, Gateway, metric_value};

async fn agui_client(gateway: &Gateway, user: &str) -> Client {
    let hello = json!({"type": "hello", "user_id": user, "protocol": "ag-ui"});
    Client::hello_with(Client::connect(gateway.addr).await, hello).await
}

fn types(frame: &Value) -> Vec<String> {
    frame["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_string())
        .collect()
}

async fn post(gateway: &Gateway, events: Value) {
    let (status, body) = gateway.post("/v1/events", &events.to_string()).await;
    assert_eq!(status, 200, "{body}");
    for item in body["results"].as_array().unwrap() {
        assert_eq!(item["status"], "accepted", "{body}");
    }
}

#[tokio::test]
async fn both_kinds_of_client_see_the_same_events_and_joiners_get_a_prelude() {
    let gateway = Gateway::start_with(|_| {}).await;
    let mut agui = agui_client(&gateway, "u1").await;
    assert_eq!(agui.subscribe("t1", None).await["type"], "subscribed");
    let mut native = Client::hello(gateway.addr, "u2").await;
    native.subscribe("t1", None).await;

    post(&gateway, json!([
        {"type": "RUN_STARTED", "threadId": "t1", "runId": "r1"},
        {"type": "TEXT_MESSAGE_START", "run_id": "r1", "messageId": "m1", "role": "assistant"},
        {"type": "TEXT_MESSAGE_CONTENT", "run_id": "r1", "messageId": "m1", "delta": "Hel"},
        {"type": "tool_executing", "run_id": "r1", "payload": {"tool_call_id": "c1", "tool_name": "search", "input": {"q": "x"}}},
    ])).await;
    let frames = agui.events(4).await;
    assert_eq!(
        frames
            .iter()
            .map(|f| f["seq"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    assert!(
        frames
            .iter()
            .all(|f| f["type"] == "agui" && f["channel"] == "thread:t1" && f["epoch"].is_string())
    );
    assert_eq!(
        frames[0]["events"],
        json!([{"type": "RUN_STARTED", "threadId": "t1", "runId": "r1"}])
    );
    assert_eq!(frames[2]["events"][0]["delta"], "Hel");
    assert_eq!(
        types(&frames[3]),
        ["TOOL_CALL_START", "TOOL_CALL_ARGS", "TOOL_CALL_END"]
    );
    let native_frames = native.events(4).await;
    assert_eq!(
        native_frames
            .iter()
            .map(|f| f["type"].as_str().unwrap())
            .collect::<Vec<_>>(),
        [
            "agent_started",
            "custom",
            "agent_thinking",
            "tool_executing"
        ]
    );
    assert_eq!(native_frames[2]["payload"]["agui"]["delta"], "Hel");

    // A viewer joining mid-run gets the run from its start.
    let mut joiner = agui_client(&gateway, "u3").await;
    let subscribed = joiner.subscribe("t1", None).await;
    assert_eq!(subscribed["replayed"], 4, "{subscribed}");
    assert_eq!(types(&joiner.events(1).await[0]), ["RUN_STARTED"]);

    // A client resuming after the text started gets RUN_STARTED and the open message first.
    let mut resumer = agui_client(&gateway, "u4").await;
    let epoch = frames[0]["epoch"].clone();
    resumer
        .subscribe("t1", Some(json!({"epoch": epoch, "seq": 3})))
        .await;
    let prelude = resumer.recv().await;
    assert_eq!(prelude["prelude"], true, "{prelude}");
    assert_eq!(prelude["seq"], 3);
    assert_eq!(
        prelude["events"],
        json!([
            {"type": "RUN_STARTED", "threadId": "t1", "runId": "r1"},
            {"type": "TEXT_MESSAGE_START", "messageId": "m1", "role": "assistant"},
        ])
    );
    let next = resumer.recv().await;
    assert_eq!(
        (next["seq"].as_u64(), types(&next)[0].as_str()),
        (Some(4), "TOOL_CALL_START")
    );

    post(
        &gateway,
        json!([
            {"type": "TEXT_MESSAGE_END", "run_id": "r1", "messageId": "m1"},
            {"type": "RUN_FINISHED", "threadId": "t1", "runId": "r1"},
        ]),
    )
    .await;
    for client in [&mut agui, &mut resumer] {
        let done = client.events(2).await;
        assert_eq!(types(&done[1]), ["RUN_FINISHED"]);
    }
    // The AG-UI writes are deliveries like any other.
    agui.barrier().await;
    let (_, ledger) = gateway.get("/v1/channels/thread:t1").await;
    assert_eq!(ledger["pending"], 0, "{ledger}");
    assert_eq!(ledger["delivered"], 6, "{ledger}");
}

#[tokio::test]
async fn ag_ui_ordering_violations_are_counted_by_kind() {
    let gateway = Gateway::start_with(|_| {}).await;
    post(
        &gateway,
        json!([
            {"type": "RUN_STARTED", "threadId": "t2", "runId": "r2"},
            {"type": "TEXT_MESSAGE_CONTENT", "run_id": "r2", "messageId": "m9", "delta": "x"},
            {"type": "TOOL_CALL_START", "run_id": "r2", "toolCallId": "c1", "toolCallName": "f"},
            {"type": "RUN_FINISHED", "threadId": "t2", "runId": "r2"},
        ]),
    )
    .await;
    let metrics = gateway.metrics().await;
    let count = |kind: &str| {
        metric_value(
            &metrics,
            &format!("agentwire_lifecycle_violations_total{{kind=\"{kind}\"}}"),
        )
    };
    assert_eq!(count("agui_not_started"), 1.0);
    assert_eq!(count("agui_finished_while_open"), 1.0);
    // The native rules do not judge an AG-UI run twice.
    assert_eq!(count("ended_with_open_tools"), 0.0);
    assert_eq!(count("agui_after_run_error"), 0.0);
}

/// Redis mode: a run that an AG-UI client read part of on one replica resumes on another, with
/// the prelude and exactly the missed events.
#[tokio::test]
async fn an_ag_ui_client_resumes_a_run_on_another_replica() {
    let redis = crate::support::Redis::start().await;
    let first = crate::replicas::on_redis(&redis, |_| {}).await;
    let second = crate::replicas::on_redis(&redis, |_| {}).await;
    let mut reader = agui_client(&first, "u1").await;
    reader.subscribe("t3", None).await;
    post(&first, json!([
        {"type": "RUN_STARTED", "threadId": "t3", "runId": "r3"},
        {"type": "TOOL_CALL_START", "run_id": "r3", "toolCallId": "c1", "toolCallName": "search"},
        {"type": "TOOL_CALL_ARGS", "run_id": "r3", "toolCallId": "c1", "delta": "{\"q\":"},
    ])).await;
    let seen = reader.events(3).await;
    drop(reader);
    post(
        &second,
        json!([
            {"type": "TOOL_CALL_ARGS", "run_id": "r3", "toolCallId": "c1", "delta": "1}"},
            {"type": "TOOL_CALL_END", "run_id": "r3", "toolCallId": "c1"},
            {"type": "RUN_FINISHED", "threadId": "t3", "runId": "r3"},
        ]),
    )
    .await;
    let mut resumed = agui_client(&second, "u1").await;
    let since = json!({"epoch": seen[2]["epoch"], "seq": 3});
    assert_eq!(
        resumed.subscribe("t3", Some(since)).await["recovered"],
        true
    );
    let prelude = resumed.recv().await;
    assert_eq!(
        prelude["events"],
        json!([
            {"type": "RUN_STARTED", "threadId": "t3", "runId": "r3"},
            {"type": "TOOL_CALL_START", "toolCallId": "c1", "toolCallName": "search"},
        ])
    );
    let rest = resumed.events(3).await;
    assert_eq!(
        rest.iter()
            .map(|f| f["seq"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [4, 5, 6]
    );
    assert_eq!(types(&rest[2]), ["RUN_FINISHED"]);
}

/// A real agent's run (the Python `ag-ui-protocol` agent) posted in two halves: an AG-UI viewer on
/// `/ws` that joins mid-run and one that resumes mid-run both pass the official client's
/// verification (`enforceEvents`, `transformChunks`, `verifyEvents`) and end with RUN_FINISHED.
#[tokio::test]
async fn viewers_joining_or_resuming_mid_run_pass_the_official_verification() {
    use crate::agui_support::{AguiAgent, node, run_input};
    let agent = AguiAgent::start(&[]);
    let input = run_input("t-v", "r-v").to_string();
    let direct = node(
        "sse-read.mjs",
        &["--url", &agent.url, "--post-json", &input, "--until-end"],
    )
    .await;
    let mut events: Vec<Value> = direct["events"].as_array().unwrap().clone();
    assert!(events.len() > 10, "{direct}");
    for event in &mut events {
        event["run_id"] = "r-v".into();
    }
    let gateway = Gateway::start_with(|_| {}).await;
    let (first, rest) = events.split_at(9);
    let (_, answer) = gateway
        .post("/v1/events", &Value::Array(first.to_vec()).to_string())
        .await;
    let epoch = answer["results"][0]["epoch"].as_str().unwrap().to_string();

    let url = format!("ws://{}/ws", gateway.addr);
    let joiner = tokio::spawn({
        let url = url.clone();
        async move {
            node(
                "ws-read.mjs",
                &["--url", &url, "--thread", "t-v", "--until-end"],
            )
            .await
        }
    });
    let resumer = tokio::spawn({
        let (url, epoch) = (url.clone(), epoch.clone());
        async move {
            node(
                "ws-read.mjs",
                &[
                    "--url",
                    &url,
                    "--thread",
                    "t-v",
                    "--until-end",
                    "--since-epoch",
                    &epoch,
                    "--since-seq",
                    "5",
                ],
            )
            .await
        }
    });
    // Both viewers are subscribed (their user channels and the thread) before the rest comes.
    crate::support::eventually("both viewers subscribe", async || {
        match metric_value(&gateway.metrics().await, "agentwire_subscriptions") {
            4.0 => Ok(()),
            n => Err(format!("{n} subscriptions")),
        }
    })
    .await;
    let (status, answer) = gateway
        .post("/v1/events", &Value::Array(rest.to_vec()).to_string())
        .await;
    assert_eq!(status, 200, "{answer}");

    let joiner = joiner.await.unwrap();
    assert!(
        joiner["ok"].as_bool().unwrap() && joiner["verified"].as_bool().unwrap(),
        "{joiner}"
    );
    assert_eq!(
        joiner["events"].as_array().unwrap().len(),
        events.len(),
        "the whole run: {joiner}"
    );
    let resumer = resumer.await.unwrap();
    assert!(
        resumer["ok"].as_bool().unwrap() && resumer["verified"].as_bool().unwrap(),
        "{resumer}"
    );
    assert_eq!(resumer["frames"][0]["prelude"], true, "{resumer}");
    let resumed_seqs: Vec<u64> = resumer["frames"]
        .as_array()
        .unwrap()
        .iter()
        .skip(1)
        .map(|f| f["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(
        resumed_seqs,
        (6..=events.len() as u64).collect::<Vec<_>>(),
        "exactly the missed events"
    );
}

/// A resume that cannot be recovered restarts the latest run from its first event: never a
/// partial stream.
#[tokio::test]
async fn an_unrecoverable_resume_restarts_the_latest_run() {
    let gateway = Gateway::start_with(|_| {}).await;
    post(
        &gateway,
        json!([
            {"type": "RUN_STARTED", "threadId": "t4", "runId": "r1"},
            {"type": "RUN_FINISHED", "threadId": "t4", "runId": "r1"},
            {"type": "RUN_STARTED", "threadId": "t4", "runId": "r2"},
            {"type": "TEXT_MESSAGE_START", "run_id": "r2", "messageId": "m1"},
        ]),
    )
    .await;
    let mut client = agui_client(&gateway, "u1").await;
    let subscribed = client
        .subscribe("t4", Some(json!({"epoch": "not-this-one", "seq": 2})))
        .await;
    assert_eq!(subscribed["recovered"], false);
    assert_eq!(subscribed["replayed"], 2, "{subscribed}");
    let frames = client.events(2).await;
    assert_eq!(
        frames[0]["events"][0],
        json!({"type": "RUN_STARTED", "threadId": "t4", "runId": "r2"})
    );
    assert_eq!(frames[0]["seq"], 3);
    assert!(frames.iter().all(|f| f["prelude"].is_null()));
}

/// A client that resumes inside a run that has ended since, with another run after it, gets the
/// prelude of the run it was in.
#[tokio::test]
async fn a_resume_inside_an_earlier_run_gets_that_runs_prelude() {
    let gateway = Gateway::start_with(|_| {}).await;
    post(
        &gateway,
        json!([
            {"type": "RUN_STARTED", "threadId": "t5", "runId": "r1"},
            {"type": "TEXT_MESSAGE_START", "run_id": "r1", "messageId": "m1"},
            {"type": "TEXT_MESSAGE_END", "run_id": "r1", "messageId": "m1"},
            {"type": "RUN_FINISHED", "threadId": "t5", "runId": "r1"},
            {"type": "RUN_STARTED", "threadId": "t5", "runId": "r2"},
        ]),
    )
    .await;
    let (_, ledger) = gateway.get("/v1/channels/thread:t5").await;
    let mut client = agui_client(&gateway, "u1").await;
    client
        .subscribe("t5", Some(json!({"epoch": ledger["epoch"], "seq": 2})))
        .await;
    let prelude = client.recv().await;
    assert_eq!(prelude["events"][0]["runId"], "r1", "{prelude}");
    assert_eq!(types(&prelude), ["RUN_STARTED", "TEXT_MESSAGE_START"]);
    let rest = client.events(3).await;
    assert_eq!(
        rest.iter()
            .map(|f| f["seq"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [3, 4, 5]
    );
}

/// SSE with `format=agui`, read by the official client's stages: a reader that drops mid-run and
/// comes back with `Last-Event-ID` gets a prelude and exactly the missed events, and both reads
/// pass verification; every data line is an AG-UI event and only event ends carry ids.
#[tokio::test]
async fn an_sse_reader_drops_and_resumes_with_last_event_id() {
    use crate::agui_support::{AguiAgent, node, run_input};
    let agent = AguiAgent::start(&[]);
    let input = run_input("t-s", "r-s").to_string();
    let direct = node(
        "sse-read.mjs",
        &["--url", &agent.url, "--post-json", &input, "--until-end"],
    )
    .await;
    let mut events: Vec<Value> = direct["events"].as_array().unwrap().clone();
    for event in &mut events {
        event["run_id"] = "r-s".into();
    }
    let gateway = Gateway::start_with(|_| {}).await;
    post(&gateway, Value::Array(events.clone())).await;
    let url = format!(
        "http://{}/v1/threads/t-s/events?format=agui&since=0",
        gateway.addr
    );

    let first = node("sse-read.mjs", &["--url", &url, "--stop-after", "8"]).await;
    assert!(first["verified"].as_bool().unwrap(), "{first}");
    assert_eq!(
        first["other"],
        json!([]),
        "control frames are comments: {first}"
    );
    // The id of the last event it handled (the parser may have read further into its buffer).
    let last_id = first["ids"][7].as_str().unwrap().to_string();
    assert!(last_id.ends_with(":8"), "{first}");

    let second = node(
        "sse-read.mjs",
        &["--url", &url, "--last-event-id", &last_id, "--until-end"],
    )
    .await;
    assert!(
        second["ok"].as_bool().unwrap() && second["verified"].as_bool().unwrap(),
        "{second}"
    );
    let got = second["events"].as_array().unwrap();
    let prelude = second["ids"]
        .as_array()
        .unwrap()
        .iter()
        .take_while(|id| id.is_null())
        .count();
    assert!(prelude >= 1 && got[0]["type"] == "RUN_STARTED", "{second}");
    assert_eq!(
        &got[prelude..],
        &direct["events"].as_array().unwrap()[8..],
        "exactly the missed events, as the agent sent them"
    );
}

/// `agui.strict` on `POST /v1/events`: an AG-UI event out of order where its run stands is refused
/// `out_of_order`, counted once, and reaches no viewer; the events beside it are taken.
#[tokio::test]
async fn strict_mode_refuses_out_of_order_ag_ui_events_on_post() {
    let gateway = Gateway::start_with(|c| c.agui.strict = true).await;
    let mut viewer = Client::hello(gateway.addr, "u1").await;
    viewer.subscribe("t6", None).await;
    let (status, body) = gateway
        .post(
            "/v1/events",
            &json!([
                {"type": "RUN_STARTED", "threadId": "t6", "runId": "r6"},
                {"type": "TEXT_MESSAGE_CONTENT", "run_id": "r6", "messageId": "m1", "delta": "x"},
                {"type": "TEXT_MESSAGE_START", "run_id": "r6", "messageId": "m1"},
                {"type": "TEXT_MESSAGE_CONTENT", "run_id": "r6", "messageId": "m1", "delta": "y"},
            ])
            .to_string(),
        )
        .await;
    assert_eq!(status, 207, "some items refused: {body}");
    let statuses: Vec<&str> = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        ["accepted", "error", "accepted", "accepted"],
        "{body}"
    );
    assert_eq!(body["results"][1]["code"], "out_of_order", "{body}");
    let seen = viewer.events(3).await;
    assert_eq!(seen[1]["payload"]["agui"]["type"], "TEXT_MESSAGE_START");
    viewer.barrier().await;
    let metrics = gateway.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "agentwire_lifecycle_violations_total{kind=\"agui_not_started\"}"
        ),
        1.0
    );
    assert_eq!(
        metric_value(
            &metrics,
            "agentwire_events_rejected_total{reason=\"out_of_order\"}"
        ),
        1.0
    );
}
