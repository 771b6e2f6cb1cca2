"""A scripted AG-UI agent: the upstream the AG-UI tests put agentwire in front of.

Written with the event classes and the SSE encoder of the `ag-ui-protocol` package (pinned in
requirements.lock), on the standard library's HTTP server, so what it writes is what that
package writes. `POST` on any path takes a RunAgentInput and answers `text/event-stream`
(HTTP/1.1, chunked, like uvicorn or any ASGI server) with one scripted run whose ids are
derived from the runId:

    RUN_STARTED
    TEXT_MESSAGE_START {r}-m1, TEXT_MESSAGE_CONTENT x4, TEXT_MESSAGE_END
    for each of {r}-tc1 (Paris), {r}-tc2 (Berlin), parent message {r}-m1:
        TOOL_CALL_START, TOOL_CALL_ARGS x2, TOOL_CALL_END, TOOL_CALL_RESULT ({r}-tr1, {r}-tr2)
    STATE_DELTA (adds /weather and /lastRunId)
    TEXT_MESSAGE_START {r}-m2, TEXT_MESSAGE_CONTENT x2, TEXT_MESSAGE_END
    RUN_FINISHED

23 events. Options:
    --port N              listen on 127.0.0.1:N (0: a free port); prints `PORT <n>` on stdout
    --delay-ms N          wait N ms before each event after the first (default 0)
    --die-after N         after N events, close the connection abruptly (no terminating chunk)
    --end-after N         after N events, end the response cleanly, without RUN_FINISHED
    --stall-after N       after N events, keep the connection open and send nothing more
    --require-header N:V  answer 401 (JSON) to a POST without header N equal to V

GET /healthz answers 200; GET /requests answers the POSTs received so far (path, headers, body)
as JSON, so a test can check what a gateway forwarded. Requests are logged to stderr.
"""

import argparse
import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ag_ui.core import (
    RunAgentInput,
    RunFinishedEvent,
    RunStartedEvent,
    StateDeltaEvent,
    TextMessageContentEvent,
    TextMessageEndEvent,
    TextMessageStartEvent,
    ToolCallArgsEvent,
    ToolCallEndEvent,
    ToolCallResultEvent,
    ToolCallStartEvent,
)
from ag_ui.encoder import EventEncoder
from pydantic import ValidationError

FIRST_TEXT = ["Let me check ", "the weather ", "in Paris ", "and Berlin."]
CITIES = [("Paris", 18), ("Berlin", 12)]
LAST_TEXT = ["Paris is 18 °C", " and Berlin is 12 °C."]


def script(thread_id, run_id):
    """The run, as ag_ui.core events."""
    r = run_id
    m1, m2 = f"{r}-m1", f"{r}-m2"
    events = [RunStartedEvent(thread_id=thread_id, run_id=r)]
    events.append(TextMessageStartEvent(message_id=m1, role="assistant"))
    events += [TextMessageContentEvent(message_id=m1, delta=d) for d in FIRST_TEXT]
    events.append(TextMessageEndEvent(message_id=m1))
    for i, (city, temp) in enumerate(CITIES, start=1):
        call = f"{r}-tc{i}"
        events.append(
            ToolCallStartEvent(tool_call_id=call, tool_call_name="get_weather", parent_message_id=m1)
        )
        events.append(ToolCallArgsEvent(tool_call_id=call, delta='{"city": '))
        events.append(ToolCallArgsEvent(tool_call_id=call, delta=json.dumps(city) + "}"))
        events.append(ToolCallEndEvent(tool_call_id=call))
        events.append(
            ToolCallResultEvent(
                message_id=f"{r}-tr{i}",
                tool_call_id=call,
                content=json.dumps({"city": city, "temp_c": temp}),
                role="tool",
            )
        )
    events.append(
        StateDeltaEvent(
            delta=[
                {"op": "add", "path": "/weather", "value": dict(CITIES)},
                {"op": "add", "path": "/lastRunId", "value": r},
            ]
        )
    )
    events.append(TextMessageStartEvent(message_id=m2, role="assistant"))
    events += [TextMessageContentEvent(message_id=m2, delta=d) for d in LAST_TEXT]
    events.append(TextMessageEndEvent(message_id=m2))
    events.append(RunFinishedEvent(thread_id=thread_id, run_id=r, result={"cities": len(CITIES)}))
    return events


class Agent(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    options = None  # argparse.Namespace, set in main
    received = []  # the POSTs, for GET /requests
    lock = threading.Lock()

    def log_message(self, format, *args):
        sys.stderr.write("agent: %s %s\n" % (self.address_string(), format % args))
        sys.stderr.flush()

    def reply(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/healthz":
            self.reply(200, {"status": "ok"})
        elif self.path == "/requests":
            with self.lock:
                self.reply(200, list(self.received))
        else:
            self.reply(404, {"error": "not found"})

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        with self.lock:
            self.received.append(
                {
                    "path": self.path,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "body": raw.decode("utf-8", "replace"),
                }
            )
        required = self.options.require_header
        if required:
            name, _, value = required.partition(":")
            if (self.headers.get(name.strip()) or "").strip() != value.strip():
                self.reply(401, {"error": "unauthorized", "missing": name.strip()})
                return
        try:
            run_input = RunAgentInput.model_validate_json(raw)
        except ValidationError as err:
            self.reply(422, {"error": "not a RunAgentInput", "detail": err.errors(include_url=False)})
            return
        sys.stderr.write(
            "agent: run threadId=%s runId=%s messages=%d\n"
            % (run_input.thread_id, run_input.run_id, len(run_input.messages))
        )
        sys.stderr.flush()
        self.stream(script(run_input.thread_id, run_input.run_id))

    def chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def stream(self, events):
        options = self.options
        encoder = EventEncoder(accept=self.headers.get("Accept"))
        self.send_response(200)
        self.send_header("Content-Type", encoder.get_content_type())
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        try:
            for sent, event in enumerate(events):
                if sent == options.die_after:
                    self.log_message("dying after %d events", sent)
                    # No terminating chunk: the body is cut off mid-stream.
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if sent == options.end_after:
                    self.log_message("ending after %d events, without RUN_FINISHED", sent)
                    break
                if sent == options.stall_after:
                    self.log_message("stalling after %d events", sent)
                    while True:
                        time.sleep(3600)
                if sent and options.delay_ms:
                    time.sleep(options.delay_ms / 1000)
                self.chunk(encoder.encode(event).encode("utf-8"))
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError) as err:
            self.log_message("client went away: %s", err)
            self.close_connection = True


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--delay-ms", type=int, default=0)
    parser.add_argument("--die-after", type=int, default=None)
    parser.add_argument("--end-after", type=int, default=None)
    parser.add_argument("--stall-after", type=int, default=None)
    parser.add_argument("--require-header", default=None, metavar="NAME:VALUE")
    options = parser.parse_args()
    if options.require_header is not None and ":" not in options.require_header:
        parser.error("--require-header takes NAME:VALUE")
    Agent.options = options
    server = ThreadingHTTPServer(("127.0.0.1", options.port), Agent)
    server.daemon_threads = True
    print(f"PORT {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
