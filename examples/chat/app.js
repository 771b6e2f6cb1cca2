// The example chat page: one thread's runs, live, through @agentwire/client (served from the repository's
// clients/js/dist by the same static server). Query parameters: gateway (ws://127.0.0.1:8000/ws), user
// (u_demo), thread (t_42), token (a browser JWT, when the gateway requires one).
import { connect } from "/clients/js/dist/index.js";

const params = new URLSearchParams(location.search);
const gateway = params.get("gateway") || "ws://127.0.0.1:8000/ws";
const userId = params.get("user") || "u_demo";
const threadId = params.get("thread") || "t_42";
const token = params.get("token") || undefined;

const $ = (id) => document.getElementById(id);
const el = (tag, cls, text) => {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
};
$("thread").textContent = threadId;

// A debug hook for tests and the curious: what the page received, in order.
const debug = (window.__agentwire = { seqs: [], events: [], states: [], subscribed: [], resets: [], errors: [], closes: [] });

const runs = new Map(); // run_id → { node, tools: Map(tool_call_id → node), thinking }

function run(event) {
  let r = runs.get(event.run_id);
  if (!r) {
    const node = el("article", "run");
    node.dataset.runId = event.run_id;
    node.dataset.state = "running";
    const title = el("h2");
    title.append("Run ", el("code", "", event.run_id), " ", el("span", "run-state", "running"));
    const thinking = el("p", "thinking");
    const tools = el("ul", "tools");
    tools.setAttribute("aria-label", "Tool calls");
    node.append(title, thinking, tools);
    $("runs").append(node);
    $("empty").hidden = true;
    r = { node, thinking, tools, open: new Map() };
    runs.set(event.run_id, r);
  }
  return r;
}

function endTool(li, state, note) {
  li.dataset.state = state;
  const mark = li.querySelector(".mark");
  mark.replaceChildren(state === "completed" ? "✓" : "✗");
  mark.setAttribute("aria-label", state === "completed" ? "completed" : "failed");
  if (note) li.querySelector(".tool-note").textContent = ` — ${note}`;
}

function endRun(r, state, label) {
  r.node.dataset.state = state;
  r.node.querySelector(".run-state").textContent = label;
  // The spinner always ends: a run that ended leaves no tool call spinning.
  const note = { completed: "not finished", stalled: "stalled", error: "the run failed" }[state];
  for (const li of r.open.values()) endTool(li, "error", note);
  r.open.clear();
}

function text(value) {
  if (value === undefined || value === null) return "";
  return typeof value === "string" ? value : JSON.stringify(value);
}

function render(event) {
  if (!event.run_id || event.type === "custom") return;
  const r = run(event);
  const p = event.payload || {};
  switch (event.type) {
    case "agent_started":
      break;
    case "agent_thinking":
      // A token stream's deltas join into one text; whole thoughts go on lines of their own.
      if (typeof p.delta === "string" && p.text === undefined) r.thinking.textContent += p.delta;
      else r.thinking.textContent += (r.thinking.textContent ? "\n" : "") + text(p.text ?? p);
      break;
    case "tool_executing": {
      const li = el("li", "tool");
      li.dataset.toolCallId = p.tool_call_id;
      li.dataset.state = "running";
      const mark = el("span", "mark");
      mark.append(el("span", "spinner"));
      mark.setAttribute("aria-label", "running");
      li.append(mark, " ", el("code", "", p.tool_name || p.tool_call_id), el("span", "tool-note"));
      r.tools.append(li);
      r.open.set(p.tool_call_id, li);
      break;
    }
    case "tool_completed": {
      const li = r.open.get(p.tool_call_id);
      if (!li) break;
      r.open.delete(p.tool_call_id);
      const failed = p.error !== undefined || p.status === "error";
      endTool(li, failed ? "error" : "completed", failed ? text(p.error ?? "error") : text(p.output));
      break;
    }
    case "agent_completed":
      endRun(r, "completed", "completed ✓");
      break;
    case "agent_error": {
      // The gateway's own (`source: "agentwire"`): the watchdog's stall notice, or a run whose
      // stream ended before the run did.
      const stalled = p.reason === "stalled";
      const byGateway = p.source === "agentwire";
      endRun(r, stalled ? "stalled" : "error", stalled ? "stalled ✗" : "error ✗");
      const message = p.message || p.reason || p.error || "the agent failed";
      r.node.append(el("p", "error", byGateway ? `The gateway ended this run: ${message}` : `Error: ${text(message)}`));
      break;
    }
  }
}

let lastClose;
function setState(state) {
  debug.states.push(state);
  const status = $("status");
  status.dataset.state = state;
  status.textContent = state === "disconnected" && lastClose ? `reconnecting (closed ${lastClose})` : state;
}

// The browser's WebSocket, noting each close code for the status line (1012: the gateway restarted).
class NotingWebSocket extends WebSocket {
  constructor(url) {
    super(url);
    this.addEventListener("close", (e) => {
      debug.closes.push((lastClose = e.code));
      debug.closedAt = Date.now();
    });
  }
}

const client = connect(gateway, { userId, token, WebSocket: NotingWebSocket });
debug.client = client;
client.on("state", setState);
client.on("subscribed", (f) => debug.subscribed.push(f.channel));
client.on("error", (e) => {
  debug.errors.push(e);
  if (e.fatal) $("errors").append(el("p", "error", `Stopped: ${e.code} ${e.message || ""}`));
});
client.on("reset", (r) => {
  debug.resets.push(r);
  // History no longer reaches back (a new epoch, or trimmed): start the thread's view over.
  if (r.threadId === threadId) {
    runs.clear();
    $("runs").replaceChildren();
    $("runs").append(el("p", "notice", "The gateway could not replay this thread's history; showing what follows."));
  }
});
client.subscribe(threadId, (event) => {
  debug.seqs.push(`${event.epoch}:${event.seq}`);
  debug.receivedAt = Date.now();
  debug.events.push(event);
  render(event);
  client.ack(event); // shown: the gateway's ledger counts it acked
});
