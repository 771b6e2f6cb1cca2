// Reconnect-to-first-event time after a 1012, median of 20 restarts (reconnect-time.mjs): the page, behind a
// TCP proxy standing in for a load balancer, resumes each time on the next replica with no gap and no
// duplicate; the figure is printed as a diagnostic (docs/client.md keeps one with machine and date).
import { test } from "node:test";
import { BIN, REDIS } from "./lib.mjs";
import { measureReconnect } from "./reconnect-time.mjs";

test("Redis mode: 20 rolling restarts (1012), each resumed; reconnect-to-first-event time", { skip: (!BIN && "AGENTWIRE_BIN is not set") || (!REDIS && "redis-server is not installed") }, async (t) => {
  const { median, min, max } = await measureReconnect(20);
  const line = `reconnect-to-first-event after 1012: median ${median} ms of 20 (min ${min} ms, max ${max} ms)`;
  t.diagnostic(line);
  console.log(line);
});
