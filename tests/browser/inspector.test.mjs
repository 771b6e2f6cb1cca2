// The inspector (GET /inspect on the internal door) in the distribution's headless Chromium against a real
// gateway started with an operator key: the key typed into the page's password field, a scripted run watched
// by one viewer (the example page), the ledger's figures as the ledger endpoint states them, the run in the
// runs table, the live tail of the thread; a screenshot in target/browser-artifacts/inspector.png; no CSP
// violation or error in the page's console.
import { test } from "node:test";
import assert from "node:assert/strict";
import {
  BIN, browserPage, freePort, gateway, pageServer, postEvents, ready, screenshotPath, until,
} from "./lib.mjs";

const skip = !BIN && "AGENTWIRE_BIN is not set";
const KEY = "operator-key-for-the-browser-test";

test("the inspector shows the ledger's totals, the run and the thread's tail after the operator key is entered", { skip }, async (t) => {
  const web = await pageServer(t);
  const [port, internal] = [await freePort(), await freePort()];
  const gw = gateway(port, internal, {
    AGENTWIRE_AUTH__ALLOWED_ORIGINS: JSON.stringify([web.origin]),
    AGENTWIRE_AUTH__OPERATOR_KEYS: JSON.stringify([KEY]),
  });
  t.after(() => gw.child.kill("SIGKILL"));
  await ready(gw);
  const { browser, page: viewer, problems: viewerProblems } = await browserPage(t);

  // One viewer: the example page on the thread.
  const q = new URLSearchParams({ gateway: `ws://127.0.0.1:${port}/ws`, user: "u_i1", thread: "ti1" });
  await viewer.goto(`${web.origin}/examples/chat/?${q}`);
  await until(() => viewer.evaluate(`window.__agentwire?.subscribed.includes("thread:ti1")`), "the viewer to join thread:ti1");

  // The inspector, in a second tab of the same browser, with its own console record.
  const page = await browser.newPage({ viewport: { width: 1100, height: 1400 } });
  const problems = [];
  page.on("pageerror", (e) => problems.push(`pageerror: ${e.message}`));
  let keyed = false;
  page.on("console", (m) => {
    if (m.type() !== "error" && !/Content Security Policy/i.test(m.text())) return;
    const url = m.location().url || "";
    // Expected: the page's reads before the key is entered are refused (401), and the browser asks the
    // internal door for a favicon it does not serve (404).
    if (/Failed to load resource: .* 401/.test(m.text()) && !keyed) return;
    if (/Failed to load resource: .* 404/.test(m.text()) && url.endsWith("/favicon.ico")) return;
    problems.push(`console ${m.type()}: ${m.text()} (${url})`);
  });
  await page.goto(`http://127.0.0.1:${internal}/inspect`);
  assert.equal(await page.getAttribute("#key", "type"), "password");
  await until(async () => /operator key is needed/.test(await page.textContent("#status")), "the page to ask for a key");
  await page.fill("#key", KEY);
  await page.press("#key", "Enter");
  await until(async () => /^Updated /.test(await page.textContent("#status")), "the inspector to read the gateway with the key");
  keyed = true;

  const r = { run_id: "run_i1" };
  await postEvents(internal, [
    { type: "agent_started", ...r, thread_id: "ti1", user_id: "u_i1" },
    { type: "agent_thinking", ...r, payload: { text: "Inspecting" } },
    { type: "tool_executing", ...r, payload: { tool_call_id: "c1", tool_name: "lookup" } },
    { type: "tool_completed", ...r, payload: { tool_call_id: "c1", output: "found" } },
    { type: "agent_completed", ...r, payload: {} },
  ]);
  await viewer.waitForSelector('.run[data-run-id="run_i1"][data-state="completed"]', { timeout: 20000 });
  // Everything the viewer got is delivered and acked (with keys configured, the operator endpoints need one).
  const operator = (path) => fetch(`http://127.0.0.1:${internal}${path}`, { headers: { Authorization: `Bearer ${KEY}` } }).then((r) => r.json());
  await until(async () => (await operator("/v1/channels/thread:ti1")).acked === 5, "the viewer's five acks");
  const ledger = await operator("/v1/ledger?top=10");
  assert.equal(ledger.channels.balanced, true, JSON.stringify(ledger));
  assert.ok(ledger.channels.emitted >= 5, JSON.stringify(ledger));

  // The page refreshes every 2 s: wait for it to show the ledger's figures and the run.
  await until(async () => (await page.textContent("#totals-emitted")) === String(ledger.channels.emitted), `#totals-emitted to show ${ledger.channels.emitted}`, 20000);
  assert.equal(await page.textContent("#totals-delivered"), String(ledger.channels.delivered));
  assert.equal(await page.textContent("#totals-pending"), String(ledger.channels.pending));
  assert.equal(await page.textContent("#totals-lost"), String(ledger.channels.lost_total));
  assert.equal(await page.textContent("#totals-balanced"), "yes");
  await until(async () => (await page.textContent("#runs-ended")) === "1", "#runs-ended to show 1", 20000);
  const runs = await page.$$eval("#runs tr", (trs) => trs.map((tr) => [...tr.children].map((c) => c.textContent)));
  const row = runs.find((cells) => cells[0] === "run_i1");
  assert.ok(row, JSON.stringify(runs));
  assert.equal(row[1], "completed");
  assert.equal(row[2], "ti1");
  assert.equal(await page.textContent("#runs-running"), "0");
  assert.equal(await page.textContent("#runs-stalled"), "0");
  const channels = await page.$$eval("#channels tr", (trs) => trs.map((tr) => tr.firstElementChild.textContent));
  assert.ok(channels.includes("thread:ti1"), JSON.stringify(channels));

  // The tail replays the thread's five events in order.
  await page.fill("#tail-thread", "ti1");
  await page.click('#tail-form button[type="submit"]');
  const lines = await until(async () => {
    // Event lines are `[epoch:seq] type run …`; the stream's other frames are `(name) …`.
    const l = (await page.$$eval("#tail li", (lis) => lis.map((li) => li.textContent))).filter((x) => x.startsWith("["));
    return l.length >= 5 && l;
  }, "the tail to show the thread's five events", 20000);
  const types = ["agent_started", "agent_thinking", "tool_executing", "tool_completed", "agent_completed"];
  types.forEach((type, i) => {
    assert.match(lines[i], new RegExp(`^\\[[0-9a-f]+:${i + 1}\\] ${type} run_i1`), lines[i]);
  });
  // Live: a sixth event posted now reaches the tail.
  await postEvents(internal, [{ type: "agent_started", run_id: "run_i2", thread_id: "ti1", user_id: "u_i1" }]);
  await until(async () => (await page.$$eval("#tail li", (lis) => lis.map((li) => li.textContent))).some((l) => /:6\] agent_started run_i2/.test(l)), "the tail to follow live", 20000);

  await page.screenshot({ path: screenshotPath("inspector.png"), fullPage: true });
  assert.deepEqual(problems, []);
  assert.deepEqual(viewerProblems, []);
});
