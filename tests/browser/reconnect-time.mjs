// Reconnect-to-first-event time after a 1012, median of N (default 20): run by the test in
// reconnect-time.test.mjs (which prints it), or by hand:
//   AGENTWIRE_BIN=target/debug/agentwire node tests/browser/reconnect-time.mjs [N]
// Redis mode, the way a rolling restart looks from a browser: the example page connects through a TCP
// proxy (the load balancer) to replica R; a new replica R' is started and made the proxy's target, then R
// gets SIGTERM and closes the page's socket with 1012; an event is posted at once (through a producer
// replica that stays up). Measured in the page: from the close to the first event on the new connection
// (the client's jittered delay, full jitter in [0, 500 ms] with the default backoff, the new handshake,
// hello, subscribe with resume and the replay). Needs clients/js/dist and redis-server.
import assert from "node:assert/strict";
import { createServer, connect } from "node:net";
import { resolve } from "node:path";
import { fileURLToPath } from "node:url";
import {
  BIN, browserPage, freePort, gateway, pageServer, postEvents, ready, redisServer, until,
} from "./lib.mjs";

/** N restarts; resolves to { median, min, max, times } in milliseconds. */
export async function measureReconnect(N = 20) {
  assert.ok(BIN, "set AGENTWIRE_BIN");
  const cleanups = [];
  const t = { after: (f) => cleanups.push(f) };

  // The "load balancer": new connections go to the current target; open ones stay where they are.
  let target;
  const proxy = createServer((inbound) => {
    const outbound = connect(target, "127.0.0.1");
    // An end is passed on as an end (pipe), after what came before it. Destroying the other side when
    // one closed could drop the replica's close frame while it still sat in Node's write buffer: the
    // page then saw a connection lost (1006), not the 1012 the replica sent. Only an error resets both.
    inbound.pipe(outbound).pipe(inbound);
    const reset = () => { inbound.destroy(); outbound.destroy(); };
    inbound.on("error", reset); outbound.on("error", reset);
  });
  const proxyPort = await freePort();
  await new Promise((done) => proxy.listen(proxyPort, "127.0.0.1", done));
  cleanups.push(() => proxy.close());

  try {
    const web = await pageServer(t);
    const env = {
      AGENTWIRE_BROKER__REDIS_URL: await redisServer(t),
      AGENTWIRE_AUTH__ALLOWED_ORIGINS: JSON.stringify([web.origin]),
      // How each connection ended, in the stderr an unexpected close code is reported with.
      AGENTWIRE_LOG_LEVEL: "info,agentwire::session=debug",
    };
    const start = async () => {
      const [port, internal] = [await freePort(), await freePort()];
      const g = gateway(port, internal, env);
      cleanups.push(() => g.child.kill("SIGKILL"));
      await ready(g);
      return { ...g, port };
    };
    const producer = await start();
    let replica = await start();
    target = replica.port;
    const { page } = await browserPage(t);
    const q = new URLSearchParams({ gateway: `ws://127.0.0.1:${proxyPort}/ws`, user: "u_rt", thread: "t_rt" });
    await page.goto(`${web.origin}/examples/chat/?${q}`);
    await until(() => page.evaluate(`window.__agentwire?.subscribed.includes("thread:t_rt")`), "the page to join");
    await postEvents(producer.internal, [{ type: "agent_started", run_id: "run_rt", thread_id: "t_rt", user_id: "u_rt" }]);
    await until(() => page.evaluate(`window.__agentwire.seqs.length === 1`), "the first event");

    const times = [];
    for (let i = 0; i < N; i++) {
      const next = await start();
      target = next.port;
      const before = await page.evaluate(`window.__agentwire.seqs.length`);
      replica.child.kill("SIGTERM");
      await until(() => page.evaluate(`window.__agentwire.closes.length === ${i + 1}`), "the close");
      await postEvents(producer.internal, [{ type: "agent_thinking", run_id: "run_rt", payload: { text: `step ${i}` } }]);
      await until(() => page.evaluate(`window.__agentwire.seqs.length === ${before + 1}`), "the event after the reconnect");
      const { code, ms } = await page.evaluate(`({ code: window.__agentwire.closes.at(-1), ms: window.__agentwire.receivedAt - window.__agentwire.closedAt })`);
      assert.equal(code, 1012, `restart ${i}: the page's closes ${JSON.stringify(await page.evaluate("window.__agentwire.closes"))}; the replica's stderr ends: ${replica.stderr()}`);
      times.push(ms);
      assert.equal((await replica.exited).code, 0, replica.stderr());
      replica = next;
    }
    const seqs = await page.evaluate(`window.__agentwire.seqs`);
    assert.deepEqual(seqs.map((s) => Number(s.split(":")[1])), Array.from({ length: N + 1 }, (_, i) => i + 1), "no gap, no duplicate");
    const sorted = [...times].sort((a, b) => a - b);
    const median = N % 2 ? sorted[(N - 1) / 2] : (sorted[N / 2 - 1] + sorted[N / 2]) / 2;
    return { median, min: sorted[0], max: sorted.at(-1), times };
  } finally {
    for (const f of cleanups.reverse()) await f();
}
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const N = Number(process.argv[2] || 20);
  const { median, min, max, times } = await measureReconnect(N);
  console.log(`reconnect-to-first-event after 1012, ${N} restarts: median ${median} ms, min ${min} ms, max ${max} ms`);
  console.log(`all (ms): ${times.join(" ")}`);
}
