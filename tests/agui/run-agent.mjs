// Runs one AG-UI run with the stock HttpAgent of @ag-ui/client, exactly as a frontend does:
// POST RunAgentInput, parse the SSE answer, enforce the schema, expand chunks, verify the event
// order (always on in runAgent), apply the events to messages and state.
//
//   node run-agent.mjs --url U --thread T --run R [--header 'Name: value']...
//                      [--messages-json '[...]'] [--state-json '{...}'] [--timeout-ms N]
//
// Prints one JSON object:
//   {"ok": bool,           runAgent resolved (verification passed, no transport error)
//    "finished": bool,     a RUN_FINISHED reached the reducer
//    "messages": [...],    agent.messages at the end (assembled by the client)
//    "state": {...},       agent.state at the end
//    "types": [...],       event types in the order the reducer saw them (after chunk expansion)
//    "result": any,        RUN_FINISHED.result
//    "warnings": [...],    what the library printed (enforcement strips unknown fields there)
//    "error": string|null}
import { HttpAgent } from "@ag-ui/client";
import { captureConsole, errorText, finish, headerObject, parseArgs } from "./lib.mjs";

const said = captureConsole();
const out = {
  ok: false,
  finished: false,
  messages: [],
  state: {},
  types: [],
  result: null,
  warnings: said,
  error: null,
};

let args;
try {
  args = parseArgs(process.argv.slice(2), { repeatable: ["header"] });
  for (const required of ["url", "thread", "run"]) {
    if (!args[required]) throw new Error(`--${required} is required`);
  }
} catch (error) {
  out.error = `usage: ${errorText(error)}`;
  finish(out);
}

if (args) {
  const agent = new HttpAgent({
    url: args.url,
    headers: headerObject(args.header),
    threadId: args.thread,
    initialMessages: args["messages-json"] ? JSON.parse(args["messages-json"]) : [],
    initialState: args["state-json"] ? JSON.parse(args["state-json"]) : {},
  });
  const timeoutMs = Number(args["timeout-ms"] ?? 30000);
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    agent.abortRun();
  }, timeoutMs);
  try {
    const { result } = await agent.runAgent(
      { runId: args.run },
      {
        onEvent({ event }) {
          out.types.push(event.type);
          if (event.type === "RUN_FINISHED") out.finished = true;
        },
      },
    );
    out.result = result ?? null;
    out.ok = !timedOut;
    if (timedOut) out.error = `timeout after ${timeoutMs} ms`;
  } catch (error) {
    out.error = timedOut ? `timeout after ${timeoutMs} ms` : errorText(error);
  } finally {
    clearTimeout(timer);
  }
  out.messages = agent.messages;
  out.state = agent.state;
  finish(out);
}
