// Reads a thread over agentwire's /ws as an AG-UI client (hello with "protocol":"ag-ui") and checks
// the AG-UI events with the official client's own stages (enforceEvents, transformChunks,
// verifyEvents from @ag-ui/client), prelude frames included, as one stream.
//
//   node ws-read.mjs --url ws://H:P/ws --thread T [--user U] [--since-epoch E --since-seq N]
//                    [--until-end] [--stop-after N] [--timeout-ms N]
//
// --until-end stops after RUN_FINISHED or RUN_ERROR; --stop-after N after N agui frames.
// Prints one JSON object:
//   {"ok": bool, "verified": bool, "subscribed": {...}|null,
//    "frames": [{"seq","epoch","prelude","types"}...], "events": [...AG-UI events in order],
//    "end": "terminal"|"stopped"|"closed"|"timeout"|"error", "error": string|null,
//    "verify_error": string|null, "warnings": [...]}
import { Subject } from "rxjs";
import WebSocket from "ws";
import { enforceEvents, transformChunks, verifyEvents } from "@ag-ui/client";
import { captureConsole, errorText, finish, parseArgs } from "./lib.mjs";

const said = captureConsole();
const out = {
  ok: false,
  verified: false,
  subscribed: null,
  frames: [],
  events: [],
  end: "error",
  error: null,
  verify_error: null,
  warnings: said,
};

let args;
try {
  args = parseArgs(process.argv.slice(2), { flags: ["until-end"] });
  if (!args.url || !args.thread) throw new Error("--url and --thread are required");
} catch (error) {
  out.error = `usage: ${errorText(error)}`;
  finish(out);
}

const input = new Subject();
input
  .pipe(enforceEvents(), transformChunks(), verifyEvents())
  .subscribe({ error: (error) => (out.verify_error = errorText(error)) });

const stopAfter = args["stop-after"] === undefined ? Infinity : Number(args["stop-after"]);
const ws = new WebSocket(args.url);
const done = (end) => {
  out.end = end;
  input.complete();
  out.verified = out.verify_error === null && out.events.length > 0;
  out.ok = out.error === null && end !== "timeout" && end !== "error";
  try {
    ws.terminate();
  } catch {}
  finish(out);
};
setTimeout(() => done("timeout"), Number(args["timeout-ms"] ?? 20000));

ws.on("open", () => {
  ws.send(JSON.stringify({ type: "hello", user_id: args.user ?? "ws-reader", protocol: "ag-ui" }));
});
ws.on("error", (error) => {
  out.error = errorText(error);
  done("error");
});
ws.on("close", () => done("closed"));
ws.on("message", (data) => {
  const frame = JSON.parse(data.toString());
  if (frame.type === "welcome") return;
  if (frame.type === "subscribed" && frame.channel?.startsWith("user:")) {
    const subscribe = { type: "subscribe", thread_id: args.thread };
    if (args["since-seq"] !== undefined) {
      subscribe.since = { epoch: args["since-epoch"], seq: Number(args["since-seq"]) };
    }
    ws.send(JSON.stringify(subscribe));
    return;
  }
  if (frame.type === "subscribed") {
    out.subscribed = frame;
    return;
  }
  if (frame.type !== "agui") {
    if (frame.type === "error") out.error = `${frame.code}: ${frame.message}`;
    return;
  }
  out.frames.push({
    seq: frame.seq,
    epoch: frame.epoch,
    prelude: frame.prelude === true,
    types: frame.events.map((e) => e.type),
  });
  let terminal = false;
  for (const event of frame.events) {
    out.events.push(event);
    if (out.verify_error === null) input.next(event);
    terminal ||= event.type === "RUN_FINISHED" || event.type === "RUN_ERROR";
  }
  const real = out.frames.filter((f) => !f.prelude).length;
  if (args["until-end"] && terminal) done("terminal");
  else if (real >= stopAfter) done("stopped");
});
