// AgentwireAgent driven by the official @ag-ui/client pipeline (runAgent: enforce, chunks, verifyEvents,
// apply) over a fake WebSocket: the run is started by a POST, read over /ws, resumed after a 1012.
import { test } from "node:test";
import assert from "node:assert/strict";
import { AgentwireAgent } from "../dist/agui.js";
import { FakeSocket } from "./fake-socket.mjs";

const tick = () => new Promise((resolve) => setTimeout(resolve, 5));
async function until(check, what) {
  for (let i = 0; i < 200; i++) {
    if (check()) return;
    await tick();
  }
  throw new Error(`timed out waiting for ${what}`);
}

function agui(seq, events, extra = {}) {
  return { type: "agui", channel: "thread:t1", epoch: "e1", seq, events, ...extra };
}
const RS = (runId) => ({ type: "RUN_STARTED", threadId: "t1", runId });
const TS = { type: "TEXT_MESSAGE_START", messageId: "m1", role: "assistant" };
const TC = (delta) => ({ type: "TEXT_MESSAGE_CONTENT", messageId: "m1", delta });
const TE = { type: "TEXT_MESSAGE_END", messageId: "m1" };
const RF = (runId) => ({ type: "RUN_FINISHED", threadId: "t1", runId });

function fakeFetch(posts, status = 200) {
  return async (url, init) => {
    posts.push({ url, init });
    return new Response(status === 200 ? "data: {}\n\n" : '{"error":"unknown_agent"}', { status });
  };
}

test("run(): POST /agui/{agent} once subscribed, the run's events over /ws, resumed after 1012 without a duplicate", async (t) => {
  FakeSocket.reset();
  t.mock.method(Math, "random", () => 0);
  const posts = [];
  const agent = new AgentwireAgent({
    url: "ws://gw.test:8000/ws",
    agent: "research",
    threadId: "t1",
    token: "tok",
    WebSocket: FakeSocket,
    fetch: fakeFetch(posts),
  });
  t.after(() => agent.disconnect());
  assert.equal(agent.runUrl, "http://gw.test:8000/agui/research");
  const running = agent.runAgent({ runId: "r1" });
  await until(() => FakeSocket.all.length === 1, "a socket");
  let ws = FakeSocket.last;
  ws.handshake();
  assert.equal(ws.sent[0].protocol, "ag-ui");
  assert.deepEqual(ws.frames("subscribe"), [{ type: "subscribe", thread_id: "t1" }]);
  assert.equal(posts.length, 0, "no POST before the thread is subscribed");
  ws.subscribed("t1", { seq: 4 });
  await until(() => posts.length === 1, "the POST");
  assert.equal(posts[0].url, "http://gw.test:8000/agui/research");
  assert.equal(posts[0].init.headers.Authorization, "Bearer tok");
  const body = JSON.parse(posts[0].init.body);
  assert.equal(body.threadId, "t1");
  assert.equal(body.runId, "r1");

  ws.receive(agui(5, [RF("r0")])); // the end of an earlier run: not this run's
  ws.receive(agui(6, [RS("r1")]));
  ws.receive(agui(7, [TS]));
  ws.receive(agui(8, [TC("Hello ")]));
  ws.serverClose(1012);
  await until(() => FakeSocket.all.length === 2, "a reconnect");
  ws = FakeSocket.last;
  ws.handshake();
  assert.deepEqual(ws.frames("subscribe")[0].since, { epoch: "e1", seq: 8 });
  ws.subscribed("t1", { seq: 10, replayed: 2 });
  ws.receive(agui(8, [RS("r1"), TS], { prelude: true })); // restates what the stream holds
  ws.receive(agui(8, [TC("Hello ")])); // at least once: already seen
  ws.receive(agui(9, [TC("world")]));
  ws.receive(agui(10, [TE]));
  ws.receive(agui(11, [RF("r1")]));
  const { newMessages } = await running;
  assert.equal(posts.length, 1, "a resume does not start the run again");
  assert.deepEqual(
    agent.messages.map((m) => [m.id, m.content]),
    [["m1", "Hello world"]],
  );
  assert.equal(newMessages.length, 1);
  await until(() => ws.frames("ack").length > 0, "acks");
  assert.deepEqual(ws.frames("ack").at(-1), { type: "ack", thread_id: "t1", seq: 11 });
  assert.deepEqual(ws.frames("unsubscribe"), [{ type: "unsubscribe", thread_id: "t1" }]);
  agent.disconnect();
});

test("run(): a POST the gateway refuses fails the run", async (t) => {
  FakeSocket.reset();
  const agent = new AgentwireAgent({ url: "wss://gw.test/ws", agent: "nope", threadId: "t1", userId: "u1", WebSocket: FakeSocket, fetch: fakeFetch([], 404) });
  t.after(() => agent.disconnect());
  assert.equal(agent.runUrl, "https://gw.test/agui/nope");
  const running = agent.runAgent({ runId: "r1" });
  await until(() => FakeSocket.all.length === 1, "a socket");
  FakeSocket.last.handshake();
  FakeSocket.last.subscribed("t1");
  await assert.rejects(running, /HTTP 404/);
  agent.disconnect();
});

test("run() without an agent follows a run started elsewhere; recovered:false mid-run fails it", async (t) => {
  FakeSocket.reset();
  t.mock.method(Math, "random", () => 0);
  const agent = new AgentwireAgent({ url: "ws://gw.test/ws", threadId: "t1", userId: "u1", WebSocket: FakeSocket, fetch: () => assert.fail("no POST") });
  t.after(() => agent.disconnect());
  assert.equal(agent.runUrl, undefined);
  const running = agent.runAgent({ runId: "r2" });
  await until(() => FakeSocket.all.length === 1, "a socket");
  let ws = FakeSocket.last;
  ws.handshake();
  ws.subscribed("t1");
  ws.receive(agui(1, [RS("r2")]));
  ws.receive(agui(2, [TS]));
  ws.serverClose(1006);
  await until(() => FakeSocket.all.length === 2, "a reconnect");
  ws = FakeSocket.last;
  ws.handshake();
  ws.subscribed("t1", { epoch: "e2", seq: 3, recovered: false, replayed: 3 });
  await assert.rejects(running, /recovered: false/);
  agent.disconnect();
});

test("connectAgent() joins the thread's open run from its start and ends with it", async (t) => {
  FakeSocket.reset();
  const agent = new AgentwireAgent({ url: "ws://gw.test/ws", threadId: "t1", userId: "u1", WebSocket: FakeSocket });
  t.after(() => agent.disconnect());
  const joined = agent.connectAgent();
  await until(() => FakeSocket.all.length === 1, "a socket");
  const ws = FakeSocket.last;
  ws.handshake();
  ws.subscribed("t1", { seq: 3, replayed: 3 });
  ws.receive(agui(1, [RS("r9")]));
  ws.receive(agui(2, [TS, TC("hi")]));
  ws.receive(agui(3, [TE, RF("r9")]));
  await joined;
  assert.deepEqual(agent.messages.map((m) => m.content), ["hi"]);
  agent.disconnect();
});
