// The client (clients/js/dist) in the distribution's headless Chromium under faults, against real gateway
// processes, through tests/browser/fault-page.html (the client, one thread, what it saw on window.__faults):
// a connection that goes silent without a close frame (heartbeat detection), a refused token (an error, no
// retry), a token that expires mid-run (refreshed through getToken on the same connection), a restarted
// memory-mode gateway (a new epoch: `reset`), and a slow-consumer close (4008) made deterministic by a proxy
// that stops forwarding the gateway's bytes while a burst overflows a 4-frame session queue. Connections are counted by a TCP proxy between page and gateway.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createHmac } from "node:crypto";
import { connect, createServer } from "node:net";
import {
  BIN, browserPage, freePort, gateway, pageServer, postEvents, ready, sleep, until,
} from "./lib.mjs";

const skip = !BIN && "AGENTWIRE_BIN is not set";
const SECRET = "a-browser-test-secret-of-at-least-32-bytes";

/** An HS256 JWT. */
function jwt(claims, secret = SECRET) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64(claims)}`;
  return `${body}.${createHmac("sha256", secret).update(body).digest("base64url")}`;
}
const now = () => Math.floor(Date.now() / 1000);

/** A TCP proxy on a free port to `target`: counts connections; `freeze()` stops forwarding on the open ones
 * (no FIN, no RST: a half-open path, as behind a load balancer) while new ones are forwarded. */
async function proxy(t, target) {
  const pairs = [];
  let opened = 0;
  const server = createServer((client) => {
    opened++;
    const upstream = connect(target, "127.0.0.1");
    const pair = { client, upstream, frozen: false };
    pairs.push(pair);
    client.pipe(upstream);
    upstream.pipe(client);
    const end = () => { client.destroy(); upstream.destroy(); };
    client.on("error", end);
    upstream.on("error", end);
    client.on("close", () => !pair.frozen && upstream.destroy());
    upstream.on("close", () => !pair.frozen && client.destroy());
  });
  const port = await freePort();
  await new Promise((done) => server.listen(port, "127.0.0.1", done));
  const destroyAll = () => pairs.forEach(({ client, upstream }) => { client.destroy(); upstream.destroy(); });
  t.after(() => { destroyAll(); server.close(); });
  return {
    port,
    opened: () => opened,
    freeze() {
      for (const pair of pairs) {
        pair.frozen = true;
        pair.client.unpipe(pair.upstream);
        pair.upstream.unpipe(pair.client);
        pair.client.pause();
        pair.upstream.pause();
      }
    },
    /** Stops forwarding gateway → page on the open connections (the page's frames still go through). */
    stall() {
      for (const pair of pairs) {
        pair.stalled = true;
        pair.upstream.unpipe(pair.client);
        pair.upstream.pause();
      }
    },
    /** Forwards again what the stalled connections hold. */
    unstall() {
      for (const pair of pairs.filter((p) => p.stalled)) {
        pair.stalled = false;
        pair.upstream.pipe(pair.client);
        pair.upstream.resume();
      }
    },
    destroyFrozen() { pairs.filter((p) => p.frozen).forEach(({ client, upstream }) => { client.destroy(); upstream.destroy(); }); },
  };
}

async function faultPage(t, web, start) {
  const { page, problems } = await browserPage(t);
  await page.goto(`${web.origin}/tests/browser/fault-page.html`);
  await page.waitForFunction(() => typeof window.__start === "function");
  await page.evaluate((s) => window.__start(s), start);
  return { page, problems, faults: () => page.evaluate(() => window.__faults) };
}

const run = (id, thread, user, n, from = 0) => Array.from({ length: n }, (_, i) => i + from === 0
  ? { type: "agent_started", run_id: id, thread_id: thread, user_id: user }
  : { type: "agent_thinking", run_id: id, payload: { text: `step ${i + from}` } });

const expectedSeqs = (epoch, n) => Array.from({ length: n }, (_, i) => `${epoch}:${i + 1}`);
// The browser logs failed or dropped WebSocket connections: expected under these faults.
const unexpected = (problems) => problems.filter((p) => !/WebSocket connection to .* failed/.test(p));

test("a connection cut without a close frame: heartbeat detection reconnects and resumes with no gap", { skip }, async (t) => {
  const web = await pageServer(t);
  const [port, internal] = [await freePort(), await freePort()];
  // heartbeat 1 s (lib.mjs): the client drops a connection silent for 2 s.
  const gw = gateway(port, internal, { AGENTWIRE_AUTH__ALLOWED_ORIGINS: JSON.stringify([web.origin]) });
  t.after(() => gw.child.kill("SIGKILL"));
  await ready(gw);
  const lb = await proxy(t, port);
  const { page, problems, faults } = await faultPage(t, web, { url: `ws://127.0.0.1:${lb.port}/ws`, thread: "tf1", userId: "u_f1" });
  await until(async () => (await faults()).subscribed.includes("thread:tf1"), "the page to join thread:tf1");
  await postEvents(internal, run("run_f1", "tf1", "u_f1", 3));
  await until(async () => (await faults()).seqs.length === 3, "the first three events");

  lb.freeze();
  await postEvents(internal, run("run_f1", "tf1", "u_f1", 3, 3)); // sent into the silent path
  const f = await until(async () => {
    const x = await faults();
    return x.seqs.length === 6 && x;
  }, "the page to detect the silent connection, reconnect and resume", 30000);
  lb.destroyFrozen();
  assert.ok(f.errors.some((e) => e.code === "heartbeat_timeout" && !e.fatal), JSON.stringify(f.errors));
  assert.ok(lb.opened() >= 2, "a new connection");
  const epoch = f.seqs[0].split(":")[0];
  await postEvents(internal, run("run_f1", "tf1", "u_f1", 2, 6));
  const g = await until(async () => { const x = await faults(); return x.seqs.length >= 8 && x; }, "events after the resume");
  await sleep(300); // a duplicate would arrive now
  assert.deepEqual((await faults()).seqs, expectedSeqs(epoch, 8), "no gap, no duplicate");
  assert.deepEqual(g.resets, []);
  assert.equal(await page.textContent("#state"), "connected");
  assert.deepEqual(unexpected(problems), []);
});

test("a refused token surfaces a fatal error and the client stops retrying", { skip }, async (t) => {
  const web = await pageServer(t);
  const [port, internal] = [await freePort(), await freePort()];
  const gw = gateway(port, internal, {
    AGENTWIRE_AUTH__ALLOWED_ORIGINS: JSON.stringify([web.origin]),
    AGENTWIRE_AUTH__JWT_SECRET: SECRET,
  });
  t.after(() => gw.child.kill("SIGKILL"));
  await ready(gw);
  const lb = await proxy(t, port);
  const bad = jwt({ sub: "u_f2", exp: now() + 600, threads: ["tf2"] }, "another-secret-that-is-32-bytes-long!!");
  const { page, problems, faults } = await faultPage(t, web, { url: `ws://127.0.0.1:${lb.port}/ws`, thread: "tf2", tokens: [bad] });
  const f = await until(async () => { const x = await faults(); return x.errors.some((e) => e.fatal) && x; }, "a fatal error");
  assert.deepEqual(f.errors.filter((e) => e.fatal).map((e) => e.code), ["unauthorized"], JSON.stringify(f.errors));
  await until(async () => (await page.textContent("#state")) === "closed", "the client to stop");
  // Well past several backoff delays (baseMs 100, maxMs 1000): no new connection attempt.
  await sleep(3000);
  assert.equal(lb.opened(), 1, "one connection attempt only");
  assert.equal((await faults()).tokensGiven, 1);
  assert.equal((await faults()).states.at(-1), "closed");
  assert.deepEqual((await faults()).seqs, []);
  assert.deepEqual(unexpected(problems), []);
});

test("a token that expires mid-run is refreshed through getToken on the same connection, no event lost", { skip }, async (t) => {
  const web = await pageServer(t);
  const [port, internal] = [await freePort(), await freePort()];
  const gw = gateway(port, internal, {
    AGENTWIRE_AUTH__ALLOWED_ORIGINS: JSON.stringify([web.origin]),
    AGENTWIRE_AUTH__JWT_SECRET: SECRET,
    AGENTWIRE_AUTH__JWT_LEEWAY: "0s",
  });
  t.after(() => gw.child.kill("SIGKILL"));
  await ready(gw);
  const lb = await proxy(t, port);
  // The first token lives 6 s (token_expiring at half its remaining life), the second ten minutes.
  const firstExpiry = now() + 6;
  const tokens = [jwt({ sub: "u_f3", exp: firstExpiry, threads: ["tf3"] }), jwt({ sub: "u_f3", exp: now() + 600, threads: ["tf3"] })];
  const { page, problems, faults } = await faultPage(t, web, { url: `ws://127.0.0.1:${lb.port}/ws`, thread: "tf3", tokens });
  await until(async () => (await faults()).subscribed.includes("thread:tf3"), "the page to join thread:tf3");
  await postEvents(internal, run("run_f3", "tf3", "u_f3", 3));
  await until(async () => (await faults()).tokensGiven === 2, "getToken to be called on token_expiring", 20000);
  await postEvents(internal, run("run_f3", "tf3", "u_f3", 3, 3));
  await until(async () => (await faults()).seqs.length === 6, "six events");
  // Past the first token's expiry: the connection follows the new token.
  while (Date.now() < firstExpiry * 1000 + 1500) await sleep(100);
  await postEvents(internal, run("run_f3", "tf3", "u_f3", 2, 6));
  const f = await until(async () => { const x = await faults(); return x.seqs.length >= 8 && x; }, "events after the first token's expiry");
  await sleep(300);
  const epoch = f.seqs[0].split(":")[0];
  assert.deepEqual((await faults()).seqs, expectedSeqs(epoch, 8), "no gap, no duplicate");
  assert.equal(lb.opened(), 1, "the same connection throughout");
  assert.deepEqual(f.errors, []);
  assert.equal(await page.textContent("#state"), "connected");
  assert.deepEqual(unexpected(problems), []);
});

test("a restarted memory-mode gateway (a new epoch): recovered:false reaches the page as reset", { skip }, async (t) => {
  const web = await pageServer(t);
  const [port, internalA, internalB] = [await freePort(), await freePort(), await freePort()];
  const env = { AGENTWIRE_AUTH__ALLOWED_ORIGINS: JSON.stringify([web.origin]) };
  let gw = gateway(port, internalA, env);
  t.after(() => gw.child.kill("SIGKILL"));
  await ready(gw);
  const { problems, faults } = await faultPage(t, web, { url: `ws://127.0.0.1:${port}/ws`, thread: "tf4", userId: "u_f4" });
  await until(async () => (await faults()).subscribed.includes("thread:tf4"), "the page to join thread:tf4");
  await postEvents(internalA, run("run_f4", "tf4", "u_f4", 3));
  await until(async () => (await faults()).seqs.length === 3, "the first three events");
  const before = (await faults()).seqs;

  gw.child.kill("SIGTERM");
  assert.equal((await gw.exited).code, 0, gw.stderr());
  gw = gateway(port, internalB, env);
  await ready(gw);
  const f = await until(async () => { const x = await faults(); return x.resets.length > 0 && x; }, "the page to see reset", 30000);
  assert.equal(f.resets[0].threadId, "tf4", JSON.stringify(f.resets));
  await until(async () => (await faults()).states.at(-1) === "connected", "the page to be connected again");
  await postEvents(internalB, run("run_f5", "tf4", "u_f4", 2));
  const g = await until(async () => { const x = await faults(); return x.seqs.length >= 5 && x; }, "the new epoch's events");
  const epochA = before[0].split(":")[0];
  const epochB = g.seqs[3].split(":")[0];
  assert.notEqual(epochA, epochB, "a new epoch");
  assert.deepEqual(g.seqs, [...expectedSeqs(epochA, 3), ...expectedSeqs(epochB, 2)]);
  assert.deepEqual(unexpected(problems), []);
});

test("a 4008 slow-consumer close: the page resumes with no gap and no duplicate", { skip }, async (t) => {
  const web = await pageServer(t);
  const [port, internal] = [await freePort(), await freePort()];
  const gw = gateway(port, internal, {
    AGENTWIRE_AUTH__ALLOWED_ORIGINS: JSON.stringify([web.origin]),
    AGENTWIRE_SESSION__QUEUE_EVENTS: "4",
    AGENTWIRE_SESSION__WRITE_TIMEOUT: "1s",
    AGENTWIRE_SESSION__HEARTBEAT: "30s", // the stalled path must not be taken for a dead one
    AGENTWIRE_HISTORY__MAX_BYTES_PER_CHANNEL: String(256 * 1024 * 1024),
  });
  t.after(() => gw.child.kill("SIGKILL"));
  await ready(gw);
  const lb = await proxy(t, port);
  const { problems, faults } = await faultPage(t, web, { url: `ws://127.0.0.1:${lb.port}/ws`, thread: "tf6", userId: "u_f6" });
  await until(async () => (await faults()).subscribed.includes("thread:tf6"), "the page to join thread:tf6");
  await postEvents(internal, run("run_f6", "tf6", "u_f6", 2));
  await until(async () => (await faults()).seqs.length === 2, "the first two events");

  // The page stops reading (the proxy holds the gateway's bytes): bursts of large events fill the socket
  // buffers, then the connection's queue (4 frames) or a write outlasts write_timeout: 4008.
  lb.stall();
  const big = "x".repeat(60000);
  let posted = 2;
  const slow = async () => /agentwire_connections_closed_total\{reason="slow_consumer"\} [1-9]/.test(await (await fetch(`http://127.0.0.1:${internal}/metrics`)).text());
  await until(async () => {
    if (await slow()) return true;
    const n = 15;
    await postEvents(internal, Array.from({ length: n }, (_, i) => ({ type: "agent_thinking", run_id: "run_f6", payload: { text: big, i: posted + i } })));
    posted += n;
    return false;
  }, "the gateway to close the page's connection as a slow consumer", 60000);
  lb.unstall();
  const f = await until(async () => { const x = await faults(); return x.seqs.length >= posted && x; }, `all ${posted} events after the resume`, 60000);
  await postEvents(internal, [{ type: "agent_completed", run_id: "run_f6", payload: {} }]);
  posted += 1;
  await until(async () => (await faults()).seqs.length >= posted, "the last event");
  await sleep(300);
  const g = await faults();
  const epoch = f.seqs[0].split(":")[0];
  assert.deepEqual(g.seqs, expectedSeqs(epoch, posted), "no gap, no duplicate");
  assert.deepEqual(g.resets, []);
  assert.ok(lb.opened() >= 2, "a new connection");
  assert.deepEqual(g.closes, [4008], "the page read the gateway's 4008 once the proxy forwarded again");
  assert.deepEqual(unexpected(problems), []);
  t.diagnostic(`events: ${posted}, closes seen by the page: ${JSON.stringify(g.closes)}`);
});
