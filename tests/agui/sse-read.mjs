// Reads a text/event-stream response the way a browser's fetch-based client does, and checks
// the AG-UI events in it with the official client's own stages (enforceEvents, transformChunks,
// verifyEvents from @ag-ui/client, in that order, as HttpAgent.runAgent applies them).
//
//   node sse-read.mjs --url U [--header 'Name: value']... [--last-event-id ID]
//                     [--post-json '{...}'] [--stop-after N] [--until-end] [--timeout-ms N]
//
// GET with Accept: text/event-stream, or POST of --post-json (Content-Type: application/json).
// The SSE parser follows the HTML standard's event-stream rules (LF, CRLF or CR line ends;
// data/id/event/retry fields; ':' comments; a blank line dispatches). Events with no `event:`
// name or `event: message` are AG-UI events: their data is parsed as JSON and verified.
// --stop-after N aborts the fetch after N such events (a browser that drops); --until-end stops
// after RUN_FINISHED or RUN_ERROR. Prints one JSON object:
//   {"ok": bool,            the response was 2xx and was read without a transport error or timeout
//    "verified": bool,      every AG-UI event read passed enforce + chunks + verify
//    "status": int|null, "content_type": string|null,
//    "events": [...],       the AG-UI events as received (parsed data)
//    "ids": [...],          the `id:` of each of those events' blocks, or null
//    "last_id": string|null the last event ID a browser would send as Last-Event-ID
//    "other": [...],        events with another `event:` name: {"event","data","id"}
//    "comments": int, "retry": int|null,
//    "end": "eof"|"terminal"|"stopped"|"error"|"timeout",
//    "warnings": [...], "error": string|null, "verify_error": string|null}
import { Subject } from "rxjs";
import { enforceEvents, transformChunks, verifyEvents } from "@ag-ui/client";
import { captureConsole, errorText, finish, headerObject, parseArgs } from "./lib.mjs";

const said = captureConsole();
const out = {
  ok: false,
  verified: false,
  status: null,
  content_type: null,
  events: [],
  ids: [],
  last_id: null,
  other: [],
  comments: 0,
  retry: null,
  end: "error",
  warnings: said,
  error: null,
  verify_error: null,
};

let args;
try {
  args = parseArgs(process.argv.slice(2), { repeatable: ["header"], flags: ["until-end"] });
  if (!args.url) throw new Error("--url is required");
} catch (error) {
  out.error = `usage: ${errorText(error)}`;
  finish(out);
}

/** The client's inbound stages on a Subject we push parsed events into. */
function verifier() {
  const input = new Subject();
  const state = { failed: null };
  input
    .pipe(enforceEvents(), transformChunks(), verifyEvents())
    .subscribe({ error: (error) => (state.failed = errorText(error)) });
  return { push: (event) => state.failed === null && input.next(event), state, end: () => input.complete() };
}

/** An incremental event-stream parser (HTML standard, 9.2.6). */
function sseParser(onEvent) {
  let buffer = "";
  let data = [];
  let eventName = "";
  let blockId = null;
  let lastId = "";
  let sawCr = false;
  const field = (line) => {
    if (line === "") {
      if (data.length > 0) {
        onEvent({ event: eventName || "message", data: data.join("\n"), id: blockId, lastId });
      }
      data = [];
      eventName = "";
      blockId = null;
      return;
    }
    if (line.startsWith(":")) {
      out.comments += 1;
      return;
    }
    const colon = line.indexOf(":");
    const name = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (name === "data") data.push(value);
    else if (name === "event") eventName = value;
    else if (name === "id" && !value.includes("\0")) {
      lastId = value;
      blockId = value;
    } else if (name === "retry" && /^\d+$/.test(value)) out.retry = Number(value);
  };
  return (text) => {
    buffer += text;
    let start = 0;
    for (let i = 0; i < buffer.length; i++) {
      const c = buffer[i];
      if (c === "\n" && sawCr) {
        sawCr = false;
        start = i + 1;
        continue;
      }
      sawCr = false;
      if (c === "\r" || c === "\n") {
        field(buffer.slice(start, i));
        sawCr = c === "\r";
        start = i + 1;
      }
    }
    buffer = buffer.slice(start);
    return () => lastId;
  };
}

if (args) {
  const controller = new AbortController();
  const stopAfter = args["stop-after"] === undefined ? Infinity : Number(args["stop-after"]);
  const timeoutMs = Number(args["timeout-ms"] ?? 30000);
  let stopping = null; // why we abort: "stopped" | "terminal" | "timeout"
  const timer = setTimeout(() => {
    stopping = "timeout";
    controller.abort();
  }, timeoutMs);
  const check = verifier();
  let lastId = "";

  const feed = sseParser((sse) => {
    lastId = sse.lastId;
    if (stopping !== null) return;
    if (sse.event !== "message") {
      out.other.push({ event: sse.event, data: sse.data, id: sse.id });
      return;
    }
    let event;
    try {
      event = JSON.parse(sse.data);
    } catch (error) {
      check.state.failed ??= `data is not JSON: ${errorText(error)}`;
      event = sse.data;
    }
    out.events.push(event);
    out.ids.push(sse.id);
    check.push(event);
    if (out.events.length >= stopAfter) stopping = "stopped";
    else if (args["until-end"] && (event?.type === "RUN_FINISHED" || event?.type === "RUN_ERROR")) {
      stopping = "terminal";
    }
  });

  const headers = { Accept: "text/event-stream", ...headerObject(args.header) };
  if (args["last-event-id"] !== undefined) headers["Last-Event-ID"] = args["last-event-id"];
  const init = { method: "GET", headers, signal: controller.signal };
  if (args["post-json"] !== undefined) {
    init.method = "POST";
    headers["Content-Type"] = "application/json";
    init.body = args["post-json"];
  }

  try {
    const response = await fetch(args.url, init);
    out.status = response.status;
    out.content_type = response.headers.get("content-type");
    if (!response.ok) {
      throw new Error(`HTTP ${response.status}: ${await response.text()}`);
    }
    const decoder = new TextDecoder("utf-8");
    const reader = response.body.getReader();
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      feed(decoder.decode(value, { stream: true }));
      if (stopping !== null) break;
    }
    if (stopping === null) feed(decoder.decode());
    else {
      // Drop the connection as a closing tab would; the server sees the socket go.
      reader.cancel().catch(() => {});
      controller.abort();
    }
    if (stopping === "timeout") throw new Error("timeout");
    out.end = stopping ?? "eof";
    out.ok = true;
  } catch (error) {
    if (stopping === "stopped" || stopping === "terminal") {
      out.end = stopping;
      out.ok = true;
    } else if (stopping === "timeout") {
      out.end = "timeout";
      out.error = `timeout after ${timeoutMs} ms`;
    } else {
      out.error = errorText(error);
    }
  } finally {
    clearTimeout(timer);
  }
  check.end();
  // rxjs delivers synchronously: every pushed event has been judged by now.
  out.verify_error = check.state.failed;
  out.verified = check.state.failed === null && out.events.length > 0;
  out.last_id = lastId === "" ? null : lastId;
  finish(out);
}
