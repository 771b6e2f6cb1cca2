"""Drives runs through a live gateway over HTTP and WebSocket, the way producers and a browser would, and
says what the gateway must have counted. Producers use the internal door (/v1/*), the browser the public
door (/ws); one upgrade from a page of a foreign origin is refused 403.

A subscribed WebSocket client sees every event of its thread: a complete run with one lifecycle violation,
a run registered through POST /v1/runs that ends in agent_error, and a run that stops and is stalled by the
watchdog. One thread nobody watches gets three events (the gateway keeps 2 of history: one leaves unseen,
two stay pending); one event names a run id never registered (dead-lettered after resolve.grace).
"""

import asyncio
import datetime
import http.client
import json
import time
import urllib.parse
import urllib.error
import urllib.request

import websockets


def run(public, internal):
    """public: the public door's base URL (/ws); internal: the internal door's (/v1/*)."""
    return asyncio.run(asyncio.wait_for(_main(public, internal), 60))


def upgrade_status(base, origin=None):
    """A WebSocket upgrade of /ws (with this Origin, if any), sent by hand: (status, body)."""
    u = urllib.parse.urlsplit(base)
    headers = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    if origin:
        headers["Origin"] = origin
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=5)
    try:
        conn.request("GET", "/ws", headers=headers)
        r = conn.getresponse()
        return r.status, r.read().decode()
    finally:
        conn.close()


def _ts():
    return datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")


async def _main(public, internal):
    ingested = 0  # valid events posted (the gateway's ingested counter)

    # a page of another site may not open /ws (cross-site WebSocket hijacking): 403, counted
    status, body = upgrade_status(public, "https://evil.example")
    assert status == 403 and json.loads(body)["error"] == "origin_not_allowed", (status, body)

    def post(path, body, ok=(200,)):
        nonlocal ingested
        req = urllib.request.Request(internal + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                status, text = r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read().decode()
        assert status in ok, (path, body, status, text)
        res = json.loads(text)
        if path == "/v1/events" and status == 200:
            ingested += res["accepted"] + res["pending_resolution"] + res["duplicate"]
        return res

    seen = {}  # (channel, seq) -> frame
    ws_url = public.replace("http://", "ws://") + "/ws"
    async with websockets.connect(ws_url, max_size=2**20, open_timeout=5) as ws:
        async def expect(pred, what, timeout=10.0):
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("timed out waiting for " + what)
                frame = json.loads(await asyncio.wait_for(ws.recv(), left))
                if "seq" in frame and "type" in frame and "channel" in frame and frame.get("type") != "subscribed":
                    seen[(frame["channel"], frame["seq"])] = frame
                if pred(frame):
                    return frame

        await ws.send(json.dumps({"type": "hello", "user_id": "u_live"}))
        await expect(lambda f: f.get("type") == "welcome", "welcome")
        await ws.send(json.dumps({"type": "subscribe", "thread_id": "t_live"}))
        await expect(lambda f: f.get("type") == "subscribed" and f.get("channel") == "thread:t_live", "subscribed")

        async def send_event(ev):
            # one at a time, each awaited: history is 2 events long, so nothing may queue up
            res = post("/v1/events", ev)
            assert res["accepted"] == 1, res
            seq = res["results"][0]["seq"]
            await expect(lambda f: f.get("channel") == "thread:t_live" and f.get("seq") == seq, "seq %d" % seq)

        def event(rid, typ, **kw):
            return dict(type=typ, run_id=rid, ts=_ts(), **kw)

        # run 1: a complete run, with one tool_completed that never executed (a lifecycle violation)
        await send_event(event("r_live_1", "agent_started", thread_id="t_live", user_id="u_live"))
        await send_event(event("r_live_1", "agent_thinking", payload={"text": "hm"}))
        await send_event(event("r_live_1", "tool_executing", payload={"tool_call_id": "c1", "tool_name": "search"}))
        await send_event(event("r_live_1", "tool_completed", payload={"tool_call_id": "c1", "output": "ok"}))
        await send_event(event("r_live_1", "tool_completed", payload={"tool_call_id": "c_never", "output": "?"}))
        await send_event(event("r_live_1", "agent_completed", payload={}))
        # run 2: registered through POST /v1/runs, ends in agent_error
        post("/v1/runs", {"run_id": "r_live_2", "thread_id": "t_live", "user_id": "u_live"})
        await send_event(event("r_live_2", "agent_started", thread_id="t_live"))
        await send_event(event("r_live_2", "agent_error", payload={"message": "boom"}))
        # run 3: stops after tool_executing: the watchdog stalls it and sends agent_error reason stalled
        await send_event(event("r_live_3", "agent_started", thread_id="t_live"))
        await send_event(event("r_live_3", "tool_executing", payload={"tool_call_id": "c9", "tool_name": "slow"}))
        await expect(lambda f: f.get("run_id") == "r_live_3" and f.get("type") == "agent_error"
                     and (f.get("payload") or {}).get("reason") == "stalled", "the stalled agent_error", timeout=15)
        # a thread nobody watches: 3 events, history keeps 2
        res = post("/v1/events", [event("r_live_4", "agent_started", thread_id="t_nobody"),
                                  event("r_live_4", "agent_thinking", payload={}),
                                  event("r_live_4", "agent_completed", payload={})])
        assert res["accepted"] == 3, res
        # a run id nobody registers: pending resolution, dead-lettered after resolve.grace (1s)
        res = post("/v1/events", {"type": "agent_thinking", "run_id": "r_ghost", "payload": {}})
        assert res["pending_resolution"] == 1, res
        # a refused event and a refused client frame, so that those labelled series exist
        post("/v1/events", {"type": "agent_thinking"}, ok=(400,))
        await ws.send(json.dumps({"type": "no_such_frame"}))
        await expect(lambda f: f.get("type") == "error", "an error frame")
        await ws.send(json.dumps({"type": "ping"}))
        await expect(lambda f: f.get("type") == "pong", "pong")
    delivered = len(seen)
    # emitted: what the client saw (the stalled run's gateway-made agent_error included) + 3 unwatched
    return {"delivered": delivered, "emitted": delivered + 3, "ingested": ingested, "generated": 1,
            "expired_unseen": 1, "unresolved": 1, "pending": 2, "refused_origin": 1}
