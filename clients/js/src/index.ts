// @agentwire/client: agentwire's /ws for browsers and Node. Reconnects with full-jitter backoff,
// resumes every channel from its last (epoch, seq), drops duplicates, batches acks, refreshes
// tokens, and notices a dead connection by its silence. docs/client.md is the guide.

/** A channel position: the epoch of its last event and that event's seq. */
export interface Position {
  epoch: string;
  seq: number;
}

/** A native event frame (`protocol: "agentwire"`): the producer's event with its channel position. */
export interface NativeEvent {
  type: string;
  seq: number;
  epoch: string;
  channel: string;
  thread_id?: string;
  run_id?: string;
  user_id?: string;
  event_id?: string;
  ts?: string;
  traceparent?: string;
  payload?: Record<string, unknown>;
}

/** An AG-UI frame (`protocol: "ag-ui"`): what one event is in AG-UI, with its position. */
export interface AguiFrame {
  type: "agui";
  seq: number;
  epoch: string;
  channel: string;
  /** AG-UI events (`{type: "RUN_STARTED", …}`), in order. */
  events: Array<{ type: string; [k: string]: unknown }>;
  /** A resume's prelude inside a run: not an event of the channel (never deduplicated nor acked). */
  prelude?: boolean;
}

export type Event = NativeEvent | AguiFrame;

export interface Welcome {
  type: "welcome";
  connection_id: string;
  user_id: string;
  heartbeat_ms: number;
}

export interface Subscribed {
  type: "subscribed";
  channel: string;
  thread_id?: string;
  epoch: string;
  seq: number;
  recovered: boolean;
  replayed: number;
  missed?: number;
}

/** Any frame the gateway sends. */
export type ServerFrame = Event | ControlFrame;
/** The gateway's frames that are not events. */
export type ControlFrame =
  | Welcome
  | Subscribed
  | { type: "error"; code: string; message: string }
  | { type: "token_expiring" | "refreshed"; expires_in_ms: number }
  | { type: "unsubscribed"; thread_id: string }
  | { type: "heartbeat" | "pong" }
  | { type: "websocket_ack"; message_id: string; id?: string; status: string };

/** What `reset` says: this channel's history no longer reached back to the client's position. */
export interface Reset {
  channel: string;
  /** Set for thread channels. */
  threadId?: string;
  /** The position the app's reload must cover; events that follow with a seq up to it are history replayed. */
  epoch: string;
  seq: number;
}

/** What `error` says. `fatal`: the client stopped (state `closed`). */
export interface ClientError {
  code: string;
  message: string;
  fatal?: boolean;
  threadId?: string;
}

export type State = "connecting" | "connected" | "disconnected" | "closed";

/** The part of the WebSocket API the client uses: the browser's, or `ws`'s on Node. */
export interface SocketLike {
  readyState: number;
  onopen: ((e: unknown) => void) | null;
  onmessage: ((e: { data: unknown }) => void) | null;
  onclose: ((e: { code: number; reason?: string }) => void) | null;
  onerror: ((e: unknown) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}
export type WebSocketCtor = new (url: string) => SocketLike;

export interface Options {
  /** A connection token, sent in `hello`. */
  token?: string;
  /** Gives a fresh token: called when there is none yet, on `token_expiring`, on 4004. */
  getToken?: () => string | Promise<string>;
  /** `hello.user_id` (without browser authentication). */
  userId?: string;
  /** `"agentwire"` (native event frames, the default) or `"ag-ui"` (`agui` frames). */
  protocol?: "agentwire" | "ag-ui";
  /** The WebSocket constructor: the browser's by default; on Node pass `ws`'s. */
  WebSocket?: WebSocketCtor;
  /** Reconnect delays: full jitter, uniform in [0, min(maxMs, baseMs · 2^attempt)]. Default 500 ms, 30 s. */
  backoff?: { baseMs?: number; maxMs?: number };
  /** How often batched acks are sent, in ms (default 250). */
  ackMs?: number;
  /** Events a subscription's async iterator holds before the app reads them (default 1000). */
  bufferSize?: number;
  /** The user channel's position to resume at hello (e.g. kept across a page load). */
  userSince?: Position;
}

type Listeners = {
  event: (event: Event) => void;
  state: (state: State) => void;
  reset: (reset: Reset) => void;
  error: (error: ClientError) => void;
  subscribed: (frame: Subscribed) => void;
};

interface Channel {
  /** Last event delivered; undefined until the first `subscribed` or event. */
  pos?: Position;
  /** Where a first subscribe starts (`subscribe(…, {since})`). */
  since?: Position;
  /** Subscribed on the current connection. */
  live?: boolean;
  subs: Set<Subscription>;
  /** Highest seq to ack, its epoch, and the last seq acked. */
  ack?: Position;
  acked?: Position;
}

const THREAD = "thread:";

/** One view of a thread: a handler, an async iterator of its events, or both. */
export class Subscription implements AsyncIterable<Event> {
  #client: Client;
  #handler?: (event: Event) => void;
  #buffer?: Event[];
  #wake?: () => void;
  #end?: { error?: Error };

  constructor(client: Client, readonly threadId: string, handler?: (event: Event) => void) {
    this.#client = client;
    this.#handler = handler;
  }

  /** The thread's last delivered position (the channel's, shared by every subscription of it). */
  get position(): Position | undefined {
    return this.#client.position(THREAD + this.threadId);
  }

  /** Leaves the thread (the gateway is told when its last subscription leaves). Ends the iterator. */
  unsubscribe(): void {
    this.#client._leave(this);
    this._end();
  }

  /** @internal */
  _push(event: Event): void {
    if (this.#end) return;
    this.#handler?.(event);
    const buffer = this.#buffer;
    if (!buffer) return;
    if (buffer.length >= this.#client._bufferSize) {
      // Never drop silently: the subscription ends with an error the iterator throws after what it holds.
      const message = `the app read none of the last ${buffer.length} events`;
      this.#client._error({ code: "buffer_full", message, threadId: this.threadId });
      this.#client._leave(this);
      this._end(new Error(`buffer_full: ${message}`));
      return;
    }
    buffer.push(event);
    this.#wake?.();
  }

  /** @internal */
  _end(error?: Error): void {
    this.#end ??= { error };
    this.#wake?.();
  }

  async *[Symbol.asyncIterator](): AsyncIterator<Event> {
    const buffer = (this.#buffer ??= []);
    try {
      for (;;) {
        if (buffer.length) yield buffer.shift()!;
        else if (this.#end) {
          if (this.#end.error) throw this.#end.error;
          return;
        } else await new Promise<void>((wake) => (this.#wake = wake));
      }
    } finally {
      this.#wake = undefined;
    }
  }
}

/** A connection to agentwire's /ws that outlives its sockets. Made by `connect()`. */
export class Client {
  state: State = "connecting";
  /** `welcome.user_id` of the current connection. */
  userId?: string;
  #url: string;
  #o: Options;
  #Ws: WebSocketCtor;
  #ws?: SocketLike;
  #token?: string;
  #channels = new Map<string, Channel>();
  #user: Channel;
  #listeners: { [K in keyof Listeners]?: Set<Listeners[K]> } = {};
  #attempt = 0;
  #timer?: ReturnType<typeof setTimeout>;
  #idle?: ReturnType<typeof setTimeout>;
  #ackTimer?: ReturnType<typeof setTimeout>;
  #silenceMs = 30000;
  #lastError?: string;
  #retried = false;
  /** @internal */
  _bufferSize: number;

  constructor(url: string, options: Options = {}) {
    if (!/^wss?:$/.test(new URL(url).protocol)) throw new Error(`not a ws:// or wss:// URL: ${url}`);
    this.#url = url;
    this.#o = options;
    this.#token = options.token;
    this._bufferSize = options.bufferSize ?? 1000;
    const Ws = options.WebSocket ?? (globalThis as { WebSocket?: WebSocketCtor }).WebSocket;
    if (!Ws) throw new Error("no WebSocket: pass options.WebSocket (on Node, `ws`'s WebSocket)");
    this.#Ws = Ws;
    this.#user = { pos: options.userSince, subs: new Set() };
    this.#open();
  }

  /** Registers a listener; returns a function that removes it. */
  on<K extends keyof Listeners>(name: K, listener: Listeners[K]): () => void {
    const set = ((this.#listeners[name] as Set<Listeners[K]>) ??= new Set());
    set.add(listener);
    return () => set.delete(listener);
  }

  /** Joins a thread; every subscription of one thread shares its channel and position. */
  subscribe(threadId: string, handler?: (event: Event) => void, options: { since?: Position } = {}): Subscription {
    if (this.state === "closed") throw new Error("client closed");
    const sub = new Subscription(this, threadId, handler);
    const name = THREAD + threadId;
    let channel = this.#channels.get(name);
    if (!channel) {
      this.#channels.set(name, (channel = { since: options.since, subs: new Set() }));
      if (this.state === "connected") this.#subscribe(threadId, channel);
    }
    channel.subs.add(sub);
    return sub;
  }

  /** The last position delivered on a channel (`thread:<id>` or `user:<id>`). */
  position(channel: string): Position | undefined {
    return this.#channels.get(channel)?.pos;
  }

  /** Marks an event shown: acks are cumulative per channel and sent at most every `ackMs`. */
  ack(event: Event): void {
    const channel = this.#channels.get(event.channel);
    if (!channel || ("prelude" in event && event.prelude)) return;
    if (!channel.ack || channel.ack.epoch !== event.epoch || channel.ack.seq < event.seq)
      channel.ack = { epoch: event.epoch, seq: event.seq };
    this.#ackTimer ??= setTimeout(() => this.#flush(), this.#o.ackMs ?? 250);
  }

  /** Closes for good: pending acks are sent, iterators end. */
  close(): void {
    if (this.state === "closed") return;
    this.#flush();
    this.#stop();
  }

  #emit<K extends keyof Listeners>(name: K, value: Parameters<Listeners[K]>[0]): void {
    for (const listener of this.#listeners[name] ?? []) (listener as (v: unknown) => void)(value);
  }

  #setState(state: State): void {
    if (this.state !== state) this.#emit("state", (this.state = state));
  }

  /** @internal */
  _error(error: ClientError): void {
    this.#emit("error", error);
  }

  /** @internal */
  _leave(sub: Subscription): void {
    const name = THREAD + sub.threadId;
    const channel = this.#channels.get(name);
    if (!channel?.subs.delete(sub) || channel.subs.size) return;
    this.#ackOne(name, channel); // what was shown is acked before leaving
    this.#channels.delete(name);
    if (this.state === "connected") this.#send({ type: "unsubscribe", thread_id: sub.threadId });
  }

  #send(frame: object): void {
    if (this.#ws?.readyState === 1) this.#ws.send(JSON.stringify(frame));
  }

  async #open(): Promise<void> {
    this.#setState("connecting");
    if (!this.#token && this.#o.getToken && !(await this.#refreshToken())) return;
    if (this.state !== "connecting") return;
    let ws: SocketLike;
    try {
      ws = this.#ws = new this.#Ws(this.#url);
    } catch (error) {
      return this.#fatal("invalid_url", String(error)); // a malformed URL never gets better
    }
    this.#alive();
    ws.onopen = () => {
      this.#send({
        type: "hello",
        token: this.#token,
        user_id: this.#o.userId,
        protocol: this.#o.protocol,
        since: this.#user.pos,
      });
    };
    ws.onmessage = (e) => {
      this.#alive();
      let frame: ServerFrame;
      try {
        frame = JSON.parse(String(e.data));
      } catch {
        return;
      }
      this.#frame(frame);
    };
    ws.onerror = () => {};
    ws.onclose = (e) => this.#closed(e.code);
  }

  /** Gets a token from `getToken`; false (and a fatal error) when it fails without a way to retry. */
  async #refreshToken(): Promise<boolean> {
    try {
      this.#token = await this.#o.getToken!();
      return true;
    } catch (error) {
      this._error({ code: "token_unavailable", message: String(error) });
      this.#retry();
      return false;
    }
  }

  /** Re-arms the silence detector: no frame for 2 × heartbeat_ms means the connection is gone. */
  #alive(): void {
    clearTimeout(this.#idle);
    this.#idle = setTimeout(() => {
      this._error({ code: "heartbeat_timeout", message: `no frame for ${this.#silenceMs} ms` });
      this.#drop();
      this.#retry();
    }, this.#silenceMs);
  }

  #frame(f: ServerFrame): void {
    const frame = f as ControlFrame;
    switch (frame.type) {
      case "welcome":
        // The user channel, joined at hello, is known by name from here.
        if (this.userId !== frame.user_id) {
          this.#channels.delete("user:" + this.userId);
          this.#channels.set("user:" + (this.userId = frame.user_id), this.#user);
        }
        this.#silenceMs = 2 * (frame.heartbeat_ms || 15000);
        this.#alive();
        this.#attempt = 0;
        this.#retried = false;
        this.#setState("connected");
        for (const [name, channel] of this.#channels) {
          channel.live = false;
          if (name.startsWith(THREAD)) this.#subscribe(name.slice(THREAD.length), channel);
        }
        return;
      case "subscribed": {
        const channel = this.#channels.get(frame.channel);
        if (!channel) return;
        channel.live = true;
        const asked = channel.pos ?? channel.since;
        if (!frame.recovered && asked) {
          channel.pos = undefined;
          this.#emit("reset", {
            channel: frame.channel,
            threadId: frame.thread_id,
            epoch: frame.epoch,
            seq: frame.seq,
          });
        }
        // Live from here, or after the events this answer replays.
        if (!channel.pos || !frame.recovered)
          channel.pos = { epoch: frame.epoch, seq: Math.max(0, frame.seq - (frame.replayed || 0)) };
        this.#emit("subscribed", frame);
        this.#flushSoon(channel);
        return;
      }
      case "token_expiring":
        if (this.#o.getToken)
          Promise.resolve(this.#o.getToken()).then(
            (token) => {
              this.#token = token;
              this.#send({ type: "refresh", token });
            },
            (error) => this._error({ code: "token_unavailable", message: String(error) }),
          );
        return;
      case "error":
        this.#lastError = frame.message;
        this._error({ code: frame.code, message: frame.message });
        return;
    }
    const event = f as Event;
    if (typeof event.seq !== "number" || typeof event.channel !== "string") return;
    const channel = this.#channels.get(event.channel);
    if (!channel) return;
    if (!("prelude" in event && event.prelude)) {
      const pos = channel.pos;
      if (pos && pos.epoch === event.epoch && event.seq <= pos.seq) return; // a duplicate after a resume
      channel.pos = { epoch: event.epoch, seq: event.seq };
    }
    this.#emit("event", event);
    for (const sub of channel.subs) sub._push(event);
  }

  #subscribe(threadId: string, channel: Channel): void {
    this.#send({ type: "subscribe", thread_id: threadId, since: channel.pos ?? channel.since });
  }

  #flushSoon(channel: Channel): void {
    if (channel.ack) this.#ackTimer ??= setTimeout(() => this.#flush(), this.#o.ackMs ?? 250);
  }

  /** Sends each channel's highest seq to ack, on channels subscribed on this connection. */
  #flush(): void {
    this.#ackTimer = undefined;
    for (const [name, channel] of this.#channels) this.#ackOne(name, channel);
  }

  #ackOne(name: string, channel: Channel): void {
    const { ack, acked, pos } = channel;
    if (!ack || !channel.live || this.state !== "connected") return;
    channel.ack = undefined;
    // An ack of another epoch than the channel's current one is of no use (and would be refused).
    if (pos && ack.epoch !== pos.epoch) return;
    if (!acked || acked.epoch !== ack.epoch || acked.seq < ack.seq)
      this.#send(
        name.startsWith(THREAD)
          ? { type: "ack", thread_id: name.slice(THREAD.length), seq: ack.seq }
          : { type: "ack", channel: name, seq: ack.seq },
      );
    channel.acked = ack;
  }

  /** Detaches the current socket and closes it: cleanly (1000), or at once without waiting for anything. */
  #drop(clean?: boolean): void {
    const ws = this.#ws;
    this.#ws = undefined;
    clearTimeout(this.#idle);
    for (const channel of this.#channels.values()) channel.live = false;
    if (!ws) return;
    ws.onopen = ws.onmessage = ws.onclose = null;
    try {
      const terminate = (ws as { terminate?: () => void }).terminate;
      if (clean || !terminate) ws.close(clean ? 1000 : 4000);
      else terminate.call(ws);
    } catch {}
  }

  #closed(code: number): void {
    this.#drop();
    if (code === 4003 && !(this.#o.getToken && /expired/.test(this.#lastError ?? "") && !this.#retried))
      return this.#fatal("unauthorized", `the gateway refused the token (4003): ${this.#lastError ?? ""}`);
    if (code === 4004 || code === 4003) {
      if (!this.#o.getToken) return this.#fatal("token_expired", "the token expired (4004) and there is no getToken");
      this.#retried = true;
      this.#token = undefined; // #open gets a fresh one
    }
    if (code === 4029) this.#attempt = Math.max(this.#attempt, 3);
    this.#retry();
  }

  #fatal(code: string, message: string): void {
    this._error({ code, message, fatal: true });
    this.#stop();
  }

  /** Schedules the next connection: full jitter over an exponentially growing window. */
  #retry(): void {
    if (this.state === "closed") return;
    this.#setState("disconnected");
    const { baseMs = 500, maxMs = 30000 } = this.#o.backoff ?? {};
    const delay = Math.random() * Math.min(maxMs, baseMs * 2 ** this.#attempt++);
    clearTimeout(this.#timer);
    this.#timer = setTimeout(() => this.#open(), delay);
  }

  #stop(): void {
    this.#setState("closed");
    clearTimeout(this.#timer);
    clearTimeout(this.#ackTimer);
    this.#drop(true);
    for (const channel of this.#channels.values()) for (const sub of channel.subs) sub._end();
  }
}

/** Opens a client on agentwire's /ws (`wss://gateway.example.com/ws`); it reconnects until `close()`. */
export function connect(url: string, options?: Options): Client {
  return new Client(url, options);
}
