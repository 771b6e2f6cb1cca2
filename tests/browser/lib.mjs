// Shared helpers of the browser tests: real gateway processes on free 127.0.0.1 ports (the pattern of
// clients/js/test/gateway.test.mjs), a redis-server, the example page's static server, and the
// distribution's Chromium driven by playwright-core (no browser download).
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { mkdirSync } from "node:fs";
import { connect, createServer } from "node:net";
import { resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";
import { serve } from "../../examples/chat/serve.mjs";

export const ROOT = resolve(fileURLToPath(new URL("../..", import.meta.url)));
export const BIN = process.env.AGENTWIRE_BIN ? resolve(process.env.AGENTWIRE_BIN) : undefined;
export const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
export const REDIS = spawnSync("redis-server", ["--version"]).status === 0;
export const ARTIFACTS = resolve(ROOT, "target/browser-artifacts");

// Ports handed out by this process: the kernel may give a just-closed port again, and two handed out
// before either is bound would make a gateway fail to bind its second door.
const given = new Set();

export async function freePort() {
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

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Polls `check` until it returns a truthy value (returned), or fails after `ms` naming `what`. */
export async function until(check, what, ms = 20000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

/** A gateway process: public door `port`, internal door `internal`, `extra` environment. */
export function gateway(port, internal, extra = {}) {
  const child = spawn(BIN, [], {
    env: {
      PATH: process.env.PATH,
      AGENTWIRE_LISTEN: `127.0.0.1:${port}`,
      AGENTWIRE_INTERNAL_LISTEN: `127.0.0.1:${internal}`,
      AGENTWIRE_LEDGER__SNAPSHOT_INTERVAL: "0s",
      AGENTWIRE_SHUTDOWN__DRAIN_DELAY: "100ms",
      AGENTWIRE_SHUTDOWN__CLOSE_WINDOW: "100ms",
      AGENTWIRE_SESSION__HEARTBEAT: "1s",
      ...extra,
    },
    stdio: ["ignore", "ignore", "pipe"],
  });
  let stderr = "";
  child.stderr.on("data", (d) => (stderr = (stderr + d).slice(-4000)));
  const exited = new Promise((done) => child.on("exit", (code, signal) => done({ code, signal })));
  return { child, exited, stderr: () => stderr, internal };
}

/** Waits until the gateway `g` (from `gateway()`) answers /readyz; fails at once if it exits first (a
 * port taken, a bad setting), and either failure carries the end of its stderr. */
export async function ready(g) {
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

export async function postEvents(internal, events) {
  const response = await fetch(`http://127.0.0.1:${internal}/v1/events`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(events),
  });
  const text = await response.text();
  assert.equal(response.status, 200, text);
  const body = JSON.parse(text);
  assert.ok(body.results.every((r) => r.status === "accepted"), JSON.stringify(body));
  return body;
}

export async function channel(internal, name) {
  return (await fetch(`http://127.0.0.1:${internal}/v1/channels/${name}`)).json();
}

/** A redis-server on a free port, no persistence. */
export async function redisServer(t) {
  const port = await freePort();
  const child = spawn("redis-server", ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], { stdio: "ignore" });
  t.after(() => child.kill("SIGKILL"));
  const accepts = () => new Promise((done) => {
    const socket = connect(port, "127.0.0.1", () => socket.end(() => done(true)));
    socket.on("error", () => done(false));
  });
  await until(accepts, "redis-server to accept connections");
  return `redis://127.0.0.1:${port}`;
}

/** The example page's static server (the repository root) on a free port; its origin for allowed_origins. */
export async function pageServer(t) {
  const port = await freePort();
  const server = await serve(port);
  t.after(() => server.close());
  return { origin: `http://127.0.0.1:${port}`, port };
}

/** Headless Chromium (the distribution's) with one page; the page's console errors are collected. */
export async function browserPage(t) {
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox"] });
  t.after(() => browser.close());
  const page = await browser.newPage({ viewport: { width: 900, height: 700 } });
  const problems = [];
  page.on("pageerror", (e) => problems.push(`pageerror: ${e.message}`));
  page.on("console", (m) => m.type() === "error" && problems.push(`console: ${m.text()}`));
  return { browser, page, problems };
}

export function screenshotPath(name) {
  mkdirSync(ARTIFACTS, { recursive: true });
  return resolve(ARTIFACTS, name);
}
