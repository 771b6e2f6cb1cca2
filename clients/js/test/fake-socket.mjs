// A WebSocket stand-in for the unit tests: no network, the test plays the gateway.
export class FakeSocket {
  static all = [];
  static get last() {
    return FakeSocket.all[FakeSocket.all.length - 1];
  }
  static reset() {
    FakeSocket.all = [];
  }

  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    this.onopen = this.onmessage = this.onclose = this.onerror = null;
    FakeSocket.all.push(this);
  }
  send(data) {
    if (this.readyState !== 1) throw new Error("send on a socket that is not open");
    this.sent.push(JSON.parse(data));
  }
  close(code) {
    this.closedWith = code;
    this.readyState = 3;
  }
  terminate() {
    this.terminated = true;
    this.readyState = 3;
  }

  // The gateway's side.
  open() {
    this.readyState = 1;
    this.onopen?.({});
  }
  receive(frame) {
    this.onmessage?.({ data: JSON.stringify(frame) });
  }
  serverClose(code) {
    this.readyState = 3;
    this.onclose?.({ code, reason: "" });
  }
  /** Frames the client sent, of one type. */
  frames(type) {
    return this.sent.filter((f) => f.type === type);
  }
  /** open + welcome + the user channel's subscribed. */
  handshake({ user = "u1", heartbeatMs = 15000, epoch = "eu", seq = 0 } = {}) {
    this.open();
    this.receive({ type: "welcome", connection_id: "c" + FakeSocket.all.length, user_id: user, heartbeat_ms: heartbeatMs });
    this.receive({ type: "subscribed", channel: `user:${user}`, epoch, seq, recovered: true, replayed: 0, missed: 0 });
  }
  subscribed(threadId, { epoch = "e1", seq = 0, recovered = true, replayed = 0 } = {}) {
    this.receive({ type: "subscribed", channel: `thread:${threadId}`, thread_id: threadId, epoch, seq, recovered, replayed, missed: 0 });
  }
  event(threadId, seq, { epoch = "e1", type = "agent_thinking", ...rest } = {}) {
    this.receive({ seq, epoch, type, channel: `thread:${threadId}`, thread_id: threadId, run_id: "r1", payload: { text: `#${seq}` }, ...rest });
  }
}
