// The example page (examples/chat) in the distribution's headless Chromium against real gateway processes:
// a scripted run rendered up to its final state (the gateway's own stall notice included), a run streamed
// token by token and cut mid-run (the gateway's close), screenshots in
// target/browser-artifacts/, the ledger's acks; and in Redis mode a SIGTERM (1012) mid-run, the page
// reconnecting to a new replica on the same port and resuming with no gap and no duplicate.
import { test } from "node:test";
import assert from "node:assert/strict";
import {
  BIN, REDIS, browserPage, channel, freePort, gateway, pageServer, postEvents, ready, redisServer, screenshotPath, until,
} from "./lib.mjs";

const skip = !BIN && "AGENTWIRE_BIN is not set";

function pageUrl(origin, port, user, thread) {
  const q = new URLSearchParams({ gateway: `ws://127.0.0.1:${port}/ws`, user, thread });
  return `${origin}/examples/chat/?${q}`;
}

const hook = (page, expr) => page.evaluate(expr);

async function subscribed(page, thread) {
  await until(() => hook(page, `window.__agentwire?.subscribed.includes("thread:${thread}")`), `the page to join thread:${thread}`);
}

test("the example page renders a completed run and a run the gateway declares stalled; the ledger shows them acked", { skip }, async (t) => {
  const web = await pageServer(t);
  const [port, internal] = [await freePort(), await freePort()];
  const gw = gateway(port, internal, {
    AGENTWIRE_AUTH__ALLOWED_ORIGINS: JSON.stringify([web.origin]),
    AGENTWIRE_WATCHDOG__RUN_IDLE_TIMEOUT: "2s",
  });
  t.after(() => gw.child.kill("SIGKILL"));
  await ready(gw);
  const { page, problems } = await browserPage(t);
  await page.goto(pageUrl(web.origin, port, "u_b1", "tb1"));
  await subscribed(page, "tb1");
  assert.equal(await page.textContent("#status"), "connected");

  // Run 1 completes: a tool that succeeds, one that fails.
  const r1 = { run_id: "run_b1" };
  await postEvents(internal, [
    { type: "agent_started", ...r1, thread_id: "tb1", user_id: "u_b1" },
    { type: "agent_thinking", ...r1, payload: { text: "Looking for flights" } },
    { type: "tool_executing", ...r1, payload: { tool_call_id: "c1", tool_name: "search_flights" } },
    { type: "tool_completed", ...r1, payload: { tool_call_id: "c1", output: "3 flights" } },
    { type: "tool_executing", ...r1, payload: { tool_call_id: "c2", tool_name: "book" } },
    { type: "tool_completed", ...r1, payload: { tool_call_id: "c2", error: "card declined" } },
    { type: "agent_completed", ...r1, payload: {} },
  ]);
  // Run 2: a tool completes, the next one never does, and the run goes quiet: the gateway's watchdog
  // (run_idle_timeout 2 s) sends the stall notice, which ends the spinner.
  const r2 = { run_id: "run_b2" };
  await postEvents(internal, [
    { type: "agent_started", ...r2, thread_id: "tb1", user_id: "u_b1" },
    { type: "agent_thinking", ...r2, payload: { text: "Checking the weather" } },
    { type: "tool_executing", ...r2, payload: { tool_call_id: "c3", tool_name: "weather" } },
    { type: "tool_completed", ...r2, payload: { tool_call_id: "c3", output: "sunny" } },
    { type: "tool_executing", ...r2, payload: { tool_call_id: "c4", tool_name: "slow_lookup" } },
  ]);
  await page.waitForSelector('.run[data-run-id="run_b1"][data-state="completed"]', { timeout: 20000 });
  await page.waitForSelector('.tool[data-tool-call-id="c4"]', { timeout: 20000 }); // spinning until the notice
  await page.waitForSelector('.run[data-run-id="run_b2"][data-state="stalled"]', { timeout: 30000 });

  assert.equal(await page.locator(".spinner").count(), 0, "no spinner left");
  const tools = await page.$$eval(".tool", (lis) => lis.map((li) => `${li.dataset.toolCallId}:${li.dataset.state}`));
  assert.deepEqual(tools, ["c1:completed", "c2:error", "c3:completed", "c4:error"]);
  assert.match(await page.textContent('.run[data-run-id="run_b1"] .thinking'), /Looking for flights/);
  assert.match(await page.textContent('.run[data-run-id="run_b2"] .error'), /The gateway ended this run/);
  const stall = await hook(page, `window.__agentwire.events.at(-1)`);
  assert.equal(stall.type, "agent_error");
  assert.equal(stall.payload.reason, "stalled");
  assert.equal(stall.payload.source, "agentwire");
  const seqs = await hook(page, `window.__agentwire.seqs`);
  assert.equal(seqs.length, 13);
  assert.deepEqual(seqs.map((s) => Number(s.split(":")[1])), Array.from({ length: 13 }, (_, i) => i + 1));
  assert.equal(await page.getAttribute("#runs", "aria-live"), "polite");
  await page.screenshot({ path: screenshotPath("chat-run.png"), fullPage: true });

  const ledger = await until(async () => {
    const l = await channel(internal, "thread:tb1");
    return l.acked === 13 && l;
  }, "the ledger to show 13 acks");
  assert.equal(ledger.emitted, 13);
  assert.equal(ledger.delivered, 13);
  assert.equal(ledger.balanced, true);
  assert.deepEqual(problems, []);
});

test("a run streamed token by token shows as it is written, and a stream cut mid-run ends its spinner", { skip }, async (t) => {
  const web = await pageServer(t);
  const [port, internal] = [await freePort(), await freePort()];
  const gw = gateway(port, internal, { AGENTWIRE_AUTH__ALLOWED_ORIGINS: JSON.stringify([web.origin]) });
  t.after(() => gw.child.kill("SIGKILL"));
  await ready(gw);
  const { page, problems } = await browserPage(t);
  await page.goto(pageUrl(web.origin, port, "u_b3", "tb3"));
  await subscribed(page, "tb3");

  // One request carries the run (POST /v1/runs/{run_id}/events): each line is published as it is
  // written, long before the body ends.
  let body;
  const stream = new ReadableStream({ start(controller) { body = controller; } });
  const answer = fetch(`http://127.0.0.1:${internal}/v1/runs/run_s1/events?thread_id=tb3`, {
    method: "POST",
    headers: { "Content-Type": "application/x-ndjson" },
    body: stream,
    duplex: "half",
  });
  const line = (event) => body.enqueue(new TextEncoder().encode(`${JSON.stringify(event)}\n`));
  line({ type: "agent_started" });
  for (const delta of ["Hel", "lo, ", "wor", "ld"]) line({ type: "agent_thinking", payload: { delta } });
  line({ type: "tool_executing", payload: { tool_call_id: "c9", tool_name: "lookup" } });
  await page.waitForSelector('.tool[data-tool-call-id="c9"] .spinner', { timeout: 20000 });
  assert.equal(await page.textContent('.run[data-run-id="run_s1"] .thinking'), "Hello, world");

  // The agent dies: its body ends without agent_completed. The gateway ends the run for the page.
  body.close();
  const summary = await (await answer).json();
  assert.equal(summary.accepted, 6, JSON.stringify(summary));
  assert.equal(summary.closed, "agent_stream_ended", JSON.stringify(summary));
  await page.waitForSelector('.run[data-run-id="run_s1"][data-state="error"]', { timeout: 20000 });
  assert.equal(await page.locator(".spinner").count(), 0, "no spinner left");
  assert.match(await page.textContent('.run[data-run-id="run_s1"] .error'), /The gateway ended this run/);
  const last = await hook(page, `window.__agentwire.events.at(-1)`);
  assert.deepEqual([last.type, last.payload.reason, last.payload.source], ["agent_error", "agent_stream_ended", "agentwire"]);
  await page.screenshot({ path: screenshotPath("chat-stream-cut.png"), fullPage: true });
  assert.deepEqual(problems, []);
});

test("Redis mode: SIGTERM mid-run (1012), the page resumes on a new replica with no gap and no duplicate", { skip: skip || (!REDIS && "redis-server is not installed") }, async (t) => {
  const web = await pageServer(t);
  const broker = { AGENTWIRE_BROKER__REDIS_URL: await redisServer(t), AGENTWIRE_AUTH__ALLOWED_ORIGINS: JSON.stringify([web.origin]) };
  // The page's replica (A, then B on the same public port) and a producer's replica (P) that stays up.
  const [port, internalA, internalB, portP, internalP] = await Promise.all([1, 2, 3, 4, 5].map(() => freePort()));
  let replica = gateway(port, internalA, broker);
  const producer = gateway(portP, internalP, broker);
  t.after(() => replica.child.kill("SIGKILL"));
  t.after(() => producer.child.kill("SIGKILL"));
  await ready(replica);
  await ready(producer);
  const { page, problems } = await browserPage(t);
  await page.goto(pageUrl(web.origin, port, "u_b2", "tb2"));
  await subscribed(page, "tb2");

  const r = { run_id: "run_b3" };
  await postEvents(internalP, [
    { type: "agent_started", ...r, thread_id: "tb2", user_id: "u_b2" },
    { type: "agent_thinking", ...r, payload: { text: "Step one" } },
    { type: "tool_executing", ...r, payload: { tool_call_id: "c1", tool_name: "search" } },
  ]);
  await until(() => hook(page, `window.__agentwire.seqs.length === 3`), "the first three events");
  await page.waitForSelector('.tool[data-tool-call-id="c1"] .spinner');

  replica.child.kill("SIGTERM");
  assert.equal((await replica.exited).code, 0, replica.stderr());
  await until(() => hook(page, `window.__agentwire.closes.includes(1012)`), "the page to see 1012");
  await page.waitForSelector('#status[data-state="disconnected"]');
  // While no replica serves the page, the run goes on.
  await postEvents(internalP, [
    { type: "tool_completed", ...r, payload: { tool_call_id: "c1", output: "found it" } },
    { type: "tool_executing", ...r, payload: { tool_call_id: "c2", tool_name: "summarise" } },
  ]);
  replica = gateway(port, internalB, broker);
  await until(() => hook(page, `window.__agentwire.seqs.length === 5`), "the events posted meanwhile, replayed on resume", 30000);
  await page.waitForSelector('#status[data-state="connected"]');
  await postEvents(internalP, [
    { type: "agent_thinking", ...r, payload: { text: "Step two" } },
    { type: "tool_completed", ...r, payload: { tool_call_id: "c2", output: "done" } },
    { type: "agent_completed", ...r, payload: {} },
  ]);
  await page.waitForSelector('.run[data-run-id="run_b3"][data-state="completed"]', { timeout: 20000 });

  const debug = await hook(page, `({ seqs: window.__agentwire.seqs, resets: window.__agentwire.resets, closes: window.__agentwire.closes })`);
  const epoch = debug.seqs[0].split(":")[0];
  assert.deepEqual(debug.seqs, [1, 2, 3, 4, 5, 6, 7, 8].map((n) => `${epoch}:${n}`), "no gap, no duplicate");
  assert.deepEqual(debug.resets, []);
  assert.equal(await page.locator(".spinner").count(), 0, "no spinner left");
  const tools = await page.$$eval(".tool", (lis) => lis.map((li) => `${li.dataset.toolCallId}:${li.dataset.state}`));
  assert.deepEqual(tools, ["c1:completed", "c2:completed"]);
  assert.equal(await page.textContent(".run .thinking"), "Step one\nStep two");
  await page.screenshot({ path: screenshotPath("chat-resumed-after-1012.png"), fullPage: true });
  const ledger = await until(async () => {
    const l = await channel(internalP, "thread:tb2");
    return l.acked === 8 && l;
  }, "the cluster's ledger to show eight acks");
  assert.equal(ledger.emitted, 8);
  // The browser logs the refused connection attempts while no replica listened: those are expected.
  assert.deepEqual(problems.filter((p) => !/WebSocket connection to .* failed/.test(p)), []);
});
