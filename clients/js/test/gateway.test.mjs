// One integration test against a real gateway process (AGENTWIRE_BIN, e.g. target/debug/agentwire; skipped
// without it): events posted to the internal door arrive in order and are acked (the ledger shows the
// acks); the gateway is stopped with SIGTERM mid-way (1012), a new one starts on the same ports, and the
// client reconnects by itself, is told `reset` (the embedded broker's history went with the old process)
// and receives the new gateway's events. In Redis mode (when redis-server is installed) the same restart
// loses nothing: events posted while no gateway served the client are replayed on resume, no gap, no
// duplicate, no reset.
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { createServer } from "node:net";
import { resolve } from "node:path";
import WebSocket from "ws";
import { connect } from "../dist/index.js";
import { AgentwireAgent } from "../dist/agui.js";

const BIN = process.env.AGENTWIRE_BIN ? resolve(process.env.AGENTWIRE_BIN) : undefined;

// Ports handed out by this process: two picked before either is bound must not be the same one.
const given = new Set();
async function freePort() {
  for (;;) {
    const port = await new Promise((done, fail) => {
      const server = createServer().listen(0, "127.0.0.1", () => {
        const { port } = server.address();
        server.close(() => done(port));
      });
      server.on("error", fail);
    });
    if (!given.has(port)) {
      given.add(port);
      return port;
    }
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
async function until(check, what, ms = 10000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

function gateway(port, internal, extra = {}) {
  const child = spawn(BIN, [], {
    env: {
      ...extra,
      PATH: process.env.PATH,
      AGENTWIRE_LISTEN: `127.0.0.1:${port}`,
      AGENTWIRE_INTERNAL_LISTEN: `127.0.0.1:${internal}`,
      AGENTWIRE_LEDGER__SNAPSHOT_INTERVAL: "0s",
      AGENTWIRE_SHUTDOWN__DRAIN_DELAY: "100ms",
      AGENTWIRE_SHUTDOWN__CLOSE_WINDOW: "100ms",
      AGENTWIRE_SESSION__HEARTBEAT: "1s",
    },
    stdio: ["ignore", "ignore", "pipe"],
  });
  let stderr = "";
  child.stderr.on("data", (d) => (stderr = (stderr + d).slice(-4000)));
  const exited = new Promise((done) => child.on("exit", (code, signal) => done({ code, signal })));
  return { child, exited, stderr: () => stderr, internal };
}

/** Waits for the gateway's /readyz; fails at once if it exits first, with the end of its stderr. */
async function ready(g) {
  let exit;
  g.exited.then((e) => (exit = e));
  try {
    await until(async () => {
      if (exit) throw new Error(`the gateway exited before it was ready: ${JSON.stringify(exit)}`);
      return fetch(`http://127.0.0.1:${g.internal}/readyz`).then((r) => r.ok, () => false);
    }, "the gateway to be ready");
  } catch (error) {
    error.message += `; its stderr ends: ${g.stderr() || "(nothing)"}`;
    throw error;
  }
}

async function post(internal, thread, from, to) {
  const events = [];
  for (let i = from; i <= to; i++) events.push({ type: "custom", thread_id: thread, payload: { name: "n", i } });
  await postEvents(internal, events);
}

async function postEvents(internal, events) {
  const response = await fetch(`http://127.0.0.1:${internal}/v1/events`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(events),
  });
  assert.equal(response.status, 200, await response.text());
}

test("a real gateway: in order, acked in the ledger; SIGTERM (1012) → reconnect, reset, go on", { skip: !BIN && "AGENTWIRE_BIN is not set" }, async (t) => {
  const [port, internal] = [await freePort(), await freePort()];
  let gw = gateway(port, internal);
  t.after(() => gw.child.kill("SIGKILL"));
  await ready(gw);

  const client = connect(`ws://127.0.0.1:${port}/ws`, { WebSocket, userId: "it-user", backoff: { baseMs: 100, maxMs: 1000 } });
  t.after(() => client.close());
  const seen = [];
  const resets = [];
  const states = [];
  client.on("reset", (r) => resets.push(r));
  client.on("state", (s) => states.push(s));
  const subscribed = new Promise((done) => client.on("subscribed", (f) => f.thread_id === "it1" && done(f)));
  client.subscribe("it1", (event) => {
    seen.push(`${event.epoch}:${event.seq}:${event.payload.i}`);
    client.ack(event);
  });
  await subscribed;

  await post(internal, "it1", 1, 5);
  await until(() => seen.length === 5, "five events");
  const epoch = seen[0].split(":")[0];
  assert.deepEqual(seen, [1, 2, 3, 4, 5].map((i) => `${epoch}:${i}:${i}`));
  const ledger = await until(async () => {
    const l = await (await fetch(`http://127.0.0.1:${internal}/v1/channels/thread:it1`)).json();
    return l.acked === 5 && l;
  }, "the ledger to show five acks");
  assert.equal(ledger.delivered, 5);
  assert.equal(ledger.balanced, true);

  // SIGTERM: the gateway closes the socket with 1012 and exits; a new one takes the same ports.
  gw.child.kill("SIGTERM");
  const { code } = await gw.exited;
  assert.equal(code, 0, gw.stderr());
  await until(() => client.state !== "connected", "the client to notice the restart");
  gw = gateway(port, internal);
  await ready(gw);
  await until(() => client.state === "connected" && resets.length === 1, "a reconnect and a reset");
  assert.equal(resets[0].threadId, "it1");
  await sleep(100);
  await post(internal, "it1", 6, 8);
  await until(() => seen.length === 8, "the new gateway's events");
  const after = seen.slice(5).map((s) => s.split(":").slice(1).join(":"));
  assert.deepEqual(after, ["1:6", "2:7", "3:8"]);
  assert.notEqual(seen[5].split(":")[0], epoch, "a new epoch after the store was lost");
  assert.ok(states.includes("disconnected"));
});

const REDIS = spawnSync("redis-server", ["--version"]).status === 0;

test("Redis mode: SIGTERM (1012) mid-stream, a new replica, resumed with no gap, no duplicate, no reset", { skip: (!BIN && "AGENTWIRE_BIN is not set") || (!REDIS && "redis-server is not installed") }, async (t) => {
  const redisPort = await freePort();
  const redis = spawn("redis-server", ["--port", String(redisPort), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], { stdio: "ignore" });
  t.after(() => redis.kill("SIGKILL"));
  const broker = { AGENTWIRE_BROKER__REDIS_URL: `redis://127.0.0.1:${redisPort}` };
  // The client's replica (A, then B on the same public port) and a producer's replica (P) that stays up.
  const [port, internalA, internalB, portP, internalP] = await Promise.all([1, 2, 3, 4, 5].map(() => freePort()));
  let replica = gateway(port, internalA, broker);
  const producer = gateway(portP, internalP, broker);
  t.after(() => replica.child.kill("SIGKILL"));
  t.after(() => producer.child.kill("SIGKILL"));
  await ready(replica);
  await ready(producer);

  const client = connect(`ws://127.0.0.1:${port}/ws`, { WebSocket, userId: "it-user", backoff: { baseMs: 100, maxMs: 1000 } });
  t.after(() => client.close());
  const seen = [];
  const resets = [];
  client.on("reset", (r) => resets.push(r));
  const subscribed = new Promise((done) => client.on("subscribed", (f) => f.thread_id === "it2" && done(f)));
  client.subscribe("it2", (event) => {
    seen.push(`${event.epoch}:${event.seq}:${event.payload.i}`);
    client.ack(event);
  });
  await subscribed;
  await post(internalP, "it2", 1, 5);
  await until(() => seen.length === 5, "five events through Redis");

  replica.child.kill("SIGTERM");
  assert.equal((await replica.exited).code, 0, replica.stderr());
  await post(internalP, "it2", 6, 8); // while no replica serves the client
  replica = gateway(port, internalB, broker);
  await until(() => seen.length === 8, "the events posted during the restart, replayed on resume");
  await post(internalP, "it2", 9, 10);
  await until(() => seen.length === 10, "live events after the resume");
  const epoch = seen[0].split(":")[0];
  assert.deepEqual(seen, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10].map((i) => `${epoch}:${i}:${i}`));
  assert.deepEqual(resets, []);
  const ledger = await until(async () => {
    const l = await (await fetch(`http://127.0.0.1:${internalP}/v1/channels/thread:it2`)).json();
    return l.acked === 10 && l;
  }, "the cluster's ledger to show ten acks");
  assert.equal(ledger.emitted, 10);
});

test("AgentwireAgent on a real gateway: runAgent() follows a run posted as AG-UI events, through verifyEvents", { skip: !BIN && "AGENTWIRE_BIN is not set" }, async (t) => {
  const [port, internal] = [await freePort(), await freePort()];
  const gw = gateway(port, internal);
  t.after(() => gw.child.kill("SIGKILL"));
  await ready(gw);
  const agent = new AgentwireAgent({ url: `ws://127.0.0.1:${port}/ws`, threadId: "ag1", userId: "it-user", WebSocket });
  t.after(() => agent.disconnect());
  const subscribed = new Promise((done) => agent.client.on("subscribed", (f) => f.thread_id === "ag1" && done(f)));
  const running = agent.runAgent({ runId: "run_ag1" });
  await subscribed;
  const run = { run_id: "run_ag1" };
  await postEvents(internal, [
    { type: "RUN_STARTED", threadId: "ag1", runId: "run_ag1" },
    { type: "TEXT_MESSAGE_START", messageId: "m1", role: "assistant", ...run },
    { type: "TEXT_MESSAGE_CONTENT", messageId: "m1", delta: "Hello ", ...run },
    { type: "TEXT_MESSAGE_CONTENT", messageId: "m1", delta: "world", ...run },
    { type: "TEXT_MESSAGE_END", messageId: "m1", ...run },
    { type: "RUN_FINISHED", threadId: "ag1", runId: "run_ag1" },
  ]);
  await running;
  assert.deepEqual(agent.messages.map((m) => [m.id, m.role, m.content]), [["m1", "assistant", "Hello world"]]);
  const ledger = await until(async () => {
    const l = await (await fetch(`http://127.0.0.1:${internal}/v1/channels/thread:ag1`)).json();
    return l.acked === 6 && l;
  }, "the ledger to show the run acked");
  assert.equal(ledger.delivered, 6);
});
