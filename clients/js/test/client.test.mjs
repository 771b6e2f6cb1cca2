// The client's state machine against a fake WebSocket (test/fake-socket.mjs) with mocked timers:
// no network, no real time.
import { test } from "node:test";
import assert from "node:assert/strict";
import { connect } from "../dist/index.js";
import { FakeSocket } from "./fake-socket.mjs";

/** Mocked setTimeout, Math.random fixed (or a function), a fresh socket list. */
function setup(t, random = 0.5) {
  FakeSocket.reset();
  t.mock.timers.enable({ apis: ["setTimeout"] });
  t.mock.method(Math, "random", typeof random === "function" ? random : () => random);
}

function start(options = {}) {
  const client = connect("ws://gw/ws", { WebSocket: FakeSocket, userId: "u1", ...options });
  const seen = { events: [], errors: [], resets: [], states: [] };
  client.on("event", (e) => seen.events.push(e));
  client.on("error", (e) => seen.errors.push(e));
  client.on("reset", (r) => seen.resets.push(r));
  client.on("state", (s) => seen.states.push(s));
  return { client, seen };
}

const settle = () => new Promise((resolve) => setImmediate(resolve));

test("hello carries the token, user and protocol; welcome makes it connected; subscribe joins the thread", (t) => {
  setup(t);
  const { client, seen } = start({ token: "tok", protocol: "ag-ui" });
  assert.equal(FakeSocket.all.length, 1);
  assert.equal(FakeSocket.last.url, "ws://gw/ws");
  const handled = [];
  const sub = client.subscribe("t1", (e) => handled.push(e.seq));
  FakeSocket.last.open();
  assert.deepEqual(FakeSocket.last.sent, [{ type: "hello", token: "tok", user_id: "u1", protocol: "ag-ui" }]);
  FakeSocket.last.handshake();
  assert.equal(client.state, "connected");
  assert.equal(client.userId, "u1");
  assert.deepEqual(FakeSocket.last.frames("subscribe"), [{ type: "subscribe", thread_id: "t1" }]);
  FakeSocket.last.subscribed("t1", { seq: 4 });
  FakeSocket.last.event("t1", 5);
  FakeSocket.last.event("t1", 6);
  assert.deepEqual(handled, [5, 6]);
  assert.deepEqual(seen.events.map((e) => e.seq), [5, 6]);
  assert.deepEqual(sub.position, { epoch: "e1", seq: 6 });
  assert.deepEqual(seen.states, ["connected"]);
  client.close();
  assert.equal(FakeSocket.last.closedWith, 1000);
  assert.equal(client.state, "closed");
});

test("backoff: full jitter within [0, min(max, base·2^attempt)], reset by a welcome", (t) => {
  setup(t, 0.999999);
  start({ backoff: { baseMs: 100, maxMs: 1000 } });
  const windows = [100, 200, 400, 800, 1000, 1000];
  for (const window of windows) {
    const before = FakeSocket.all.length;
    FakeSocket.last.serverClose(1006);
    t.mock.timers.tick(window - 2);
    assert.equal(FakeSocket.all.length, before, `no reconnect before ${window} ms`);
    t.mock.timers.tick(2);
    assert.equal(FakeSocket.all.length, before + 1, `reconnected within ${window} ms`);
  }
  // A welcome resets the attempt count: the next window is base again.
  FakeSocket.last.handshake();
  FakeSocket.last.serverClose(1012);
  t.mock.timers.tick(100);
  assert.equal(FakeSocket.all.length, windows.length + 2);
});

test("backoff: the delay is uniform over the window (random 0 reconnects at once, 0.5 at half)", (t) => {
  let r = 0;
  setup(t, () => r);
  start({ backoff: { baseMs: 1000, maxMs: 30000 } });
  FakeSocket.last.serverClose(1006);
  t.mock.timers.tick(0);
  assert.equal(FakeSocket.all.length, 2);
  r = 0.5;
  FakeSocket.last.serverClose(1006); // attempt 1: window 2000 ms, delay 1000 ms
  t.mock.timers.tick(999);
  assert.equal(FakeSocket.all.length, 2);
  t.mock.timers.tick(1);
  assert.equal(FakeSocket.all.length, 3);
});

test("resume: every channel from its own last (epoch, seq), the user channel at hello", (t) => {
  setup(t, 0);
  const { client, seen } = start();
  client.subscribe("a");
  client.subscribe("b");
  const ws = FakeSocket.last;
  ws.handshake({ epoch: "eu" });
  ws.subscribed("a", { epoch: "ea", seq: 10 });
  ws.subscribed("b", { epoch: "eb", seq: 0 });
  ws.event("a", 11, { epoch: "ea" });
  ws.event("a", 12, { epoch: "ea" });
  ws.event("b", 1, { epoch: "eb" });
  ws.receive({ seq: 3, epoch: "eu", type: "custom", channel: "user:u1", payload: { name: "n" } });
  ws.serverClose(1012);
  assert.equal(client.state, "disconnected");
  t.mock.timers.tick(0);
  const again = FakeSocket.last;
  assert.notEqual(again, ws);
  again.open();
  assert.deepEqual(again.sent[0], { type: "hello", user_id: "u1", since: { epoch: "eu", seq: 3 } });
  again.receive({ type: "welcome", connection_id: "c2", user_id: "u1", heartbeat_ms: 15000 });
  assert.deepEqual(again.frames("subscribe"), [
    { type: "subscribe", thread_id: "a", since: { epoch: "ea", seq: 12 } },
    { type: "subscribe", thread_id: "b", since: { epoch: "eb", seq: 1 } },
  ]);
  assert.equal(seen.resets.length, 0);
});

test("duplicates after a resume are dropped; a new epoch starts over", (t) => {
  setup(t, 0);
  const { client } = start();
  const got = [];
  client.subscribe("a", (e) => got.push(`${e.epoch}:${e.seq}`));
  let ws = FakeSocket.last;
  ws.handshake();
  ws.subscribed("a", { seq: 0 });
  for (const seq of [1, 2, 3]) ws.event("a", seq);
  ws.serverClose(1006);
  t.mock.timers.tick(0);
  ws = FakeSocket.last;
  ws.handshake();
  ws.subscribed("a", { seq: 5, replayed: 2 });
  for (const seq of [2, 3, 4, 5]) ws.event("a", seq); // 2 and 3 were written before the break
  ws.event("a", 5);
  ws.event("a", 1, { epoch: "e2" });
  assert.deepEqual(got, ["e1:1", "e1:2", "e1:3", "e1:4", "e1:5", "e2:1"]);
});

test("recovered:false emits reset, then goes on from the new position", (t) => {
  setup(t, 0);
  const { client, seen } = start();
  const got = [];
  const sub = client.subscribe("a", (e) => got.push(e.seq));
  let ws = FakeSocket.last;
  ws.handshake();
  ws.subscribed("a", { seq: 0 });
  ws.event("a", 1);
  ws.serverClose(1012);
  t.mock.timers.tick(0);
  ws = FakeSocket.last;
  ws.handshake();
  assert.deepEqual(ws.frames("subscribe")[0].since, { epoch: "e1", seq: 1 });
  // The store was lost: a new epoch, history holds seqs 1..3 of it and replays them.
  ws.subscribed("a", { epoch: "e9", seq: 3, recovered: false, replayed: 3 });
  assert.deepEqual(seen.resets, [{ channel: "thread:a", threadId: "a", epoch: "e9", seq: 3 }]);
  for (const seq of [1, 2, 3, 4]) ws.event("a", seq, { epoch: "e9" });
  assert.deepEqual(got, [1, 1, 2, 3, 4]);
  assert.deepEqual(sub.position, { epoch: "e9", seq: 4 });
  // A subscribe with nothing to resume (live from now) never resets.
  client.subscribe("b");
  ws.subscribed("b", { epoch: "eb", seq: 7, recovered: false });
  assert.equal(seen.resets.length, 1);
});

test("the user channel's recovered:false is a reset too", (t) => {
  setup(t, 0);
  const { seen } = start({ userSince: { epoch: "old", seq: 40 } });
  const ws = FakeSocket.last;
  ws.open();
  assert.deepEqual(ws.sent[0].since, { epoch: "old", seq: 40 });
  ws.receive({ type: "welcome", connection_id: "c", user_id: "u1", heartbeat_ms: 15000 });
  ws.receive({ type: "subscribed", channel: "user:u1", epoch: "new", seq: 2, recovered: false, replayed: 2 });
  assert.deepEqual(seen.resets, [{ channel: "user:u1", threadId: undefined, epoch: "new", seq: 2 }]);
});

test("heartbeat: no frame for twice heartbeat_ms drops the socket and reconnects", (t) => {
  setup(t, 0.5);
  const { client, seen } = start({ backoff: { baseMs: 1000 } });
  const ws = FakeSocket.last;
  ws.handshake({ heartbeatMs: 1000 });
  t.mock.timers.tick(1999);
  ws.receive({ type: "heartbeat" }); // any frame re-arms it
  t.mock.timers.tick(1999);
  assert.equal(client.state, "connected");
  assert.equal(FakeSocket.all.length, 1);
  t.mock.timers.tick(1);
  assert.equal(ws.terminated, true, "the half-open socket is dropped without waiting for a close");
  assert.equal(seen.errors[0].code, "heartbeat_timeout");
  assert.equal(client.state, "disconnected");
  t.mock.timers.tick(500);
  assert.equal(FakeSocket.all.length, 2);
  // A socket that never opens is given up too (2 × the last heartbeat).
  t.mock.timers.tick(2000);
  assert.equal(FakeSocket.all[1].terminated, true);
});

for (const code of [1001, 1006, 1012, 4008]) {
  test(`close ${code}: reconnect after jitter and resume`, (t) => {
    setup(t, 0.5);
    const { client, seen } = start({ backoff: { baseMs: 1000 } });
    client.subscribe("a");
    let ws = FakeSocket.last;
    ws.handshake();
    ws.subscribed("a");
    ws.event("a", 1);
    ws.serverClose(code);
    assert.equal(client.state, "disconnected");
    t.mock.timers.tick(499);
    assert.equal(FakeSocket.all.length, 1);
    t.mock.timers.tick(1);
    ws = FakeSocket.last;
    ws.handshake();
    assert.deepEqual(ws.frames("subscribe")[0].since, { epoch: "e1", seq: 1 });
    assert.equal(seen.errors.length, 0);
  });
}

test("close 4003: no retry, a fatal unauthorized error", (t) => {
  setup(t, 0);
  const { client, seen } = start({ getToken: () => "fresh" });
  return settle().then(() => {
    const ws = FakeSocket.last;
    ws.open();
    ws.receive({ type: "error", code: "unauthorized", message: "the token is invalid" });
    ws.serverClose(4003);
    t.mock.timers.tick(60000);
    assert.equal(FakeSocket.all.length, 1);
    assert.equal(client.state, "closed");
    assert.deepEqual(
      seen.errors.map((e) => [e.code, !!e.fatal]),
      [
        ["unauthorized", false],
        ["unauthorized", true],
      ],
    );
  });
});

test("close 4003 for an expired token with getToken: one fresh token, one retry", async (t) => {
  setup(t, 0);
  let calls = 0;
  const { client } = start({ token: "old", getToken: () => `new${++calls}` });
  let ws = FakeSocket.last;
  ws.open();
  ws.receive({ type: "error", code: "unauthorized", message: "the token has expired" });
  ws.serverClose(4003);
  t.mock.timers.tick(0);
  await settle();
  ws = FakeSocket.last;
  assert.equal(FakeSocket.all.length, 2);
  ws.open();
  assert.equal(ws.sent[0].token, "new1");
  // Refused again before any welcome: now it stops.
  ws.receive({ type: "error", code: "unauthorized", message: "the token has expired" });
  ws.serverClose(4003);
  t.mock.timers.tick(60000);
  assert.equal(FakeSocket.all.length, 2);
  assert.equal(client.state, "closed");
});

test("close 4004: a new token from getToken, then reconnect and resume", async (t) => {
  setup(t, 0);
  let calls = 0;
  const { client } = start({ token: "t0", getToken: async () => `t${++calls}` });
  client.subscribe("a");
  let ws = FakeSocket.last;
  ws.handshake();
  ws.subscribed("a");
  ws.event("a", 3);
  ws.serverClose(4004);
  t.mock.timers.tick(0);
  await settle();
  ws = FakeSocket.last;
  assert.equal(FakeSocket.all.length, 2);
  ws.handshake();
  assert.equal(ws.sent[0].token, "t1");
  assert.deepEqual(ws.frames("subscribe")[0].since, { epoch: "e1", seq: 3 });
  assert.equal(client.state, "connected");
});

test("close 4004 without getToken: stops with a fatal token_expired", (t) => {
  setup(t, 0);
  const { client, seen } = start({ token: "t0" });
  FakeSocket.last.handshake();
  FakeSocket.last.serverClose(4004);
  t.mock.timers.tick(60000);
  assert.equal(FakeSocket.all.length, 1);
  assert.equal(client.state, "closed");
  assert.deepEqual(seen.errors, [{ code: "token_expired", message: seen.errors[0].message, fatal: true }]);
});

test("close 4029: backs off at least base·2^3", (t) => {
  setup(t, 0.999999);
  start({ backoff: { baseMs: 100, maxMs: 100000 } });
  FakeSocket.last.handshake();
  FakeSocket.last.serverClose(4029);
  t.mock.timers.tick(799);
  assert.equal(FakeSocket.all.length, 1);
  t.mock.timers.tick(1);
  assert.equal(FakeSocket.all.length, 2);
});

test("token_expiring: getToken, then refresh on the same connection", async (t) => {
  setup(t, 0);
  const { client } = start({ token: "t0", getToken: async () => "t1" });
  const ws = FakeSocket.last;
  ws.handshake();
  ws.receive({ type: "token_expiring", expires_in_ms: 59000 });
  await settle();
  assert.deepEqual(ws.frames("refresh"), [{ type: "refresh", token: "t1" }]);
  ws.receive({ type: "refreshed", expires_in_ms: 3600000 });
  assert.equal(FakeSocket.all.length, 1);
  assert.equal(client.state, "connected");
});

test("a first connection with only getToken asks for a token before it opens", async (t) => {
  setup(t, 0);
  start({ getToken: async () => "first" });
  assert.equal(FakeSocket.all.length, 0);
  await settle();
  FakeSocket.last.open();
  assert.equal(FakeSocket.last.sent[0].token, "first");
});

test("acks: batched every 250 ms, cumulative per channel, only the highest seq", (t) => {
  setup(t, 0);
  const { client } = start();
  const events = [];
  client.subscribe("a", (e) => events.push(e));
  client.subscribe("b", (e) => events.push(e));
  let ws = FakeSocket.last;
  ws.handshake();
  ws.subscribed("a");
  ws.subscribed("b");
  for (const seq of [1, 2, 3]) ws.event("a", seq);
  ws.event("b", 7);
  for (const e of events) client.ack(e);
  client.ack(events[0]); // a lower seq changes nothing
  t.mock.timers.tick(249);
  assert.deepEqual(ws.frames("ack"), []);
  t.mock.timers.tick(1);
  assert.deepEqual(ws.frames("ack"), [
    { type: "ack", thread_id: "a", seq: 3 },
    { type: "ack", thread_id: "b", seq: 7 },
  ]);
  // Already acked: not sent again.
  client.ack(events[2]);
  t.mock.timers.tick(250);
  assert.equal(ws.frames("ack").length, 2);
  // The user channel is acked by name.
  ws.receive({ seq: 5, epoch: "eu", type: "custom", channel: "user:u1", payload: { name: "x" } });
  client.ack({ seq: 5, epoch: "eu", type: "custom", channel: "user:u1" });
  t.mock.timers.tick(250);
  assert.deepEqual(ws.frames("ack")[2], { type: "ack", channel: "user:u1", seq: 5 });
  // Acks made while disconnected go out once the channel is subscribed again.
  ws.event("a", 4);
  ws.serverClose(1006);
  client.ack(events[events.length - 1]);
  t.mock.timers.tick(0);
  t.mock.timers.tick(250);
  ws = FakeSocket.last;
  ws.handshake();
  assert.deepEqual(ws.frames("ack"), []);
  ws.subscribed("a", { seq: 4 });
  t.mock.timers.tick(250);
  assert.deepEqual(ws.frames("ack"), [{ type: "ack", thread_id: "a", seq: 4 }]);
});

test("close() sends the pending acks first", (t) => {
  setup(t, 0);
  const { client } = start();
  client.subscribe("a", (e) => client.ack(e));
  const ws = FakeSocket.last;
  ws.handshake();
  ws.subscribed("a");
  ws.event("a", 1);
  client.close();
  assert.deepEqual(ws.frames("ack"), [{ type: "ack", thread_id: "a", seq: 1 }]);
});

test("subscriptions: an async iterator of events; unsubscribe leaves when the last one goes", async (t) => {
  setup(t, 0);
  const { client } = start();
  const one = client.subscribe("a");
  const two = client.subscribe("a");
  const ws = FakeSocket.last;
  ws.handshake();
  assert.equal(ws.frames("subscribe").length, 1);
  ws.subscribed("a");
  const iterator = one[Symbol.asyncIterator]();
  const first = iterator.next();
  ws.event("a", 1);
  ws.event("a", 2);
  assert.equal((await first).value.seq, 1);
  assert.equal((await iterator.next()).value.seq, 2);
  one.unsubscribe();
  assert.deepEqual(await iterator.next(), { done: true, value: undefined });
  assert.deepEqual(ws.frames("unsubscribe"), []);
  two.unsubscribe();
  assert.deepEqual(ws.frames("unsubscribe"), [{ type: "unsubscribe", thread_id: "a" }]);
  ws.event("a", 3); // after leaving: nobody gets it
});

test("an iterator the app does not drain ends with buffer_full after what it holds, never dropping silently", async (t) => {
  setup(t, 0);
  const { client, seen } = start({ bufferSize: 3 });
  const sub = client.subscribe("a");
  const ws = FakeSocket.last;
  ws.handshake();
  ws.subscribed("a");
  const iterator = sub[Symbol.asyncIterator]();
  const first = iterator.next(); // starts the buffer
  for (const seq of [1, 2, 3, 4, 5]) ws.event("a", seq);
  assert.equal(seen.errors[0].code, "buffer_full");
  assert.equal(seen.errors[0].threadId, "a");
  assert.deepEqual(ws.frames("unsubscribe"), [{ type: "unsubscribe", thread_id: "a" }]);
  const got = [(await first).value.seq];
  await assert.rejects(async () => {
    for (;;) {
      const next = await iterator.next();
      if (next.done) break;
      got.push(next.value.seq);
    }
  }, /buffer_full/);
  assert.deepEqual(got, [1, 2, 3]);
});

test("AG-UI prelude frames reach the app but are neither deduplicated nor moving the position", (t) => {
  setup(t, 0);
  const { client } = start({ protocol: "ag-ui" });
  const got = [];
  const sub = client.subscribe("a", (e) => got.push([e.seq, !!e.prelude, e.events.map((x) => x.type).join()]));
  let ws = FakeSocket.last;
  ws.handshake();
  ws.subscribed("a");
  const agui = (seq, events, prelude) => ({ type: "agui", channel: "thread:a", epoch: "e1", seq, events, ...(prelude ? { prelude } : {}) });
  ws.receive(agui(1, [{ type: "RUN_STARTED", threadId: "a", runId: "r" }]));
  ws.receive(agui(2, [{ type: "TEXT_MESSAGE_START", messageId: "m" }]));
  ws.serverClose(1012);
  t.mock.timers.tick(0);
  ws = FakeSocket.last;
  ws.handshake();
  ws.subscribed("a", { seq: 3, replayed: 1 });
  ws.receive(agui(2, [{ type: "RUN_STARTED", threadId: "a", runId: "r" }, { type: "TEXT_MESSAGE_START", messageId: "m" }], true));
  ws.receive(agui(3, [{ type: "TEXT_MESSAGE_CONTENT", messageId: "m", delta: "x" }]));
  assert.deepEqual(got, [
    [1, false, "RUN_STARTED"],
    [2, false, "TEXT_MESSAGE_START"],
    [2, true, "RUN_STARTED,TEXT_MESSAGE_START"],
    [3, false, "TEXT_MESSAGE_CONTENT"],
  ]);
  assert.deepEqual(sub.position, { epoch: "e1", seq: 3 });
  // A prelude is not acked.
  client.ack({ type: "agui", channel: "thread:a", epoch: "e1", seq: 9, events: [], prelude: true });
  t.mock.timers.tick(250);
  assert.deepEqual(ws.frames("ack"), []);
});

test("close() ends iterators and stops reconnecting", async (t) => {
  setup(t, 0);
  const { client } = start();
  const sub = client.subscribe("a");
  FakeSocket.last.handshake();
  const iterator = sub[Symbol.asyncIterator]();
  const next = iterator.next();
  client.close();
  assert.deepEqual(await next, { done: true, value: undefined });
  t.mock.timers.tick(60000);
  assert.equal(FakeSocket.all.length, 1);
  assert.throws(() => client.subscribe("b"), /closed/);
});

test("a malformed URL throws at once; a WebSocket constructor that throws later is fatal", (t) => {
  setup(t, 0);
  assert.throws(() => connect("nope", { WebSocket: FakeSocket }), /Invalid URL/);
  assert.throws(() => connect("http://gw/ws", { WebSocket: FakeSocket }), /not a ws/);
  let refuse = false;
  class Refusing extends FakeSocket {
    constructor(url) {
      if (refuse) throw new SyntaxError("refused");
      super(url);
    }
  }
  const errors = [];
  const client = connect("ws://gw/ws", { WebSocket: Refusing, userId: "u1" });
  client.on("error", (e) => errors.push(e));
  FakeSocket.last.handshake();
  refuse = true;
  FakeSocket.last.serverClose(1006);
  t.mock.timers.tick(1000);
  assert.equal(client.state, "closed");
  assert.deepEqual(errors.map((e) => [e.code, e.fatal]), [["invalid_url", true]]);
});
