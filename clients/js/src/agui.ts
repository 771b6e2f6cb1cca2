// AgentwireAgent: an AG-UI agent (`@ag-ui/client`'s AbstractAgent) whose events come over agentwire's
// /ws, with resume. A frontend that used `new HttpAgent({ url })` changes that one line.
// docs/client.md#ag-ui has the design: run() starts the run through the gateway's proxy
// (POST /agui/{agent}) and reads its events on the WebSocket; connect() joins a run started elsewhere.
import { AbstractAgent, type AgentConfig, type BaseEvent, type RunAgentInput } from "@ag-ui/client";
import { Observable } from "rxjs";
import { connect, type AguiFrame, type Client, type Options } from "./index.js";

export interface AgentwireAgentConfig extends AgentConfig, Omit<Options, "protocol"> {
  /** The gateway's WebSocket URL, `wss://gateway.example.com/ws`. */
  url: string;
  /**
   * The agent's name in the gateway's configuration (`[agui.agents.<name>]`): `run()` POSTs the
   * RunAgentInput to `POST /agui/<name>` on the same host. Without it (and without `runUrl`), `run()`
   * starts nothing and follows the run `input.runId` that something else starts on the thread.
   */
  agent?: string;
  /** Where `run()` POSTs the RunAgentInput instead of `/agui/<agent>` (any endpoint that starts the run). */
  runUrl?: string;
  /** Extra headers for that POST (the connection token goes as `Authorization: Bearer` on its own). */
  headers?: Record<string, string>;
  /** A client to share (made with `protocol: "ag-ui"`); otherwise the agent opens its own. */
  client?: Client;
  fetch?: typeof fetch;
}

const END = new Set(["RUN_FINISHED", "RUN_ERROR"]);

export class AgentwireAgent extends AbstractAgent {
  config: AgentwireAgentConfig;
  private _client?: Client;

  constructor(config: AgentwireAgentConfig) {
    super(config);
    this.config = config;
    this._client = config.client;
  }

  /** The agentwire client under this agent (opened on first use, kept across runs). */
  get client(): Client {
    return (this._client ??= connect(this.config.url, { ...this.config, protocol: "ag-ui" }));
  }

  /** The POST that starts a run, or undefined when runs are started elsewhere. */
  get runUrl(): string | undefined {
    const { runUrl, agent, url } = this.config;
    if (runUrl || !agent) return runUrl;
    const u = new URL(url);
    u.protocol = u.protocol === "wss:" ? "https:" : "http:";
    u.pathname = u.pathname.replace(/\/ws\/?$/, "") + "/agui/" + encodeURIComponent(agent);
    u.search = "";
    return u.toString();
  }

  /** Starts the run (POST, when configured) and streams its AG-UI events from the thread, with resume. */
  run(input: RunAgentInput): Observable<BaseEvent> {
    return this._follow(input, true);
  }

  /** Follows the thread's open run (or the next one to start) to its end, starting nothing. */
  protected connect(input: RunAgentInput): Observable<BaseEvent> {
    return this._follow(input, false);
  }

  /** Closes the agent's own client (a shared one is left open). */
  disconnect(): void {
    if (this._client && this._client !== this.config.client) this._client.close();
    this._client = undefined;
  }

  clone(): AgentwireAgent {
    const copy = super.clone() as AgentwireAgent;
    copy.config = this.config;
    copy._client = this._client;
    copy._posted = new WeakSet();
    return copy;
  }

  private _follow(input: RunAgentInput, start: boolean): Observable<BaseEvent> {
    return new Observable<BaseEvent>((out) => {
      const client = this.client;
      const threadId = input.threadId;
      const runId = start ? input.runId : undefined;
      const abort = new AbortController();
      let inRun = false;
      let done = false;
      const finish = (error?: Error) => {
        if (done) return;
        done = true;
        if (error) out.error(error);
        else out.complete();
      };
      const sub = client.subscribe(threadId, (e) => {
        const frame = e as AguiFrame;
        if (done || frame.type !== "agui") return;
        for (const event of frame.events) {
          if (!inRun) {
            // Events before this run's RUN_STARTED belong to another run (or its tail): not ours.
            if (event.type !== "RUN_STARTED" || (runId && event.runId !== runId)) continue;
            inRun = true;
          } else if (frame.prelude) {
            // A resume's prelude restates what this stream already holds (RUN_STARTED, open starts).
            continue;
          }
          out.next(event as unknown as BaseEvent);
          if (END.has(event.type) && (event.type === "RUN_ERROR" || !runId || event.runId === runId)) {
            client.ack(frame);
            return finish();
          }
        }
        if (!frame.prelude) client.ack(frame);
      });
      const post = () => {
        if (this._posted.has(sub)) return;
        this._posted.add(sub);
        this._post(input, abort.signal).catch((error) => {
          if (!abort.signal.aborted) finish(error instanceof Error ? error : new Error(String(error)));
        });
      };
      const off = [
        client.on("reset", (reset) => {
          // History no longer reaches back: what follows would restart the run, which one AG-UI stream
          // cannot express. The run fails; the app reloads the thread and may connect again.
          if (inRun && reset.threadId === threadId)
            finish(new Error(`agentwire: thread ${threadId} could not be resumed (recovered: false); reload it`));
        }),
        client.on("error", (error) => {
          if (error.fatal) finish(new Error(`agentwire: ${error.code}: ${error.message}`));
          else if (error.code === "buffer_full" && error.threadId === threadId)
            finish(new Error(`agentwire: ${error.message}`));
        }),
        // The run is started once the thread is subscribed, so that none of its events can be missed.
        client.on("subscribed", (frame) => {
          if (frame.thread_id === threadId) post();
        }),
      ];
      if (!start || !this.runUrl) this._posted.add(sub);
      // A thread this client already reads (shared client): subscribed already, start now.
      else if (client.position("thread:" + threadId) && client.state === "connected") post();
      return () => {
        done = true;
        abort.abort();
        for (const f of off) f();
        sub.unsubscribe();
      };
    });
  }

  /** Subscriptions whose run was already started (a resume must not start it again). */
  private _posted = new WeakSet<object>();

  /** POSTs the RunAgentInput; the answer's body (the same run as SSE) is not needed: the WebSocket has it. */
  private async _post(input: RunAgentInput, signal: AbortSignal): Promise<void> {
    const url = this.runUrl;
    if (!url) return;
    const token = this.config.token ?? (await this.config.getToken?.());
    const response = await (this.config.fetch ?? fetch)(url, {
      method: "POST",
      headers: {
        ...this.config.headers,
        ...(token ? { Authorization: `Bearer ${token}` } : {}),
        "Content-Type": "application/json",
        Accept: "text/event-stream",
      },
      body: JSON.stringify(input),
      signal,
    });
    if (!response.ok) {
      const text = await response.text().catch(() => "");
      throw new Error(`agentwire: POST ${url}: HTTP ${response.status}: ${text.slice(0, 200)}`);
    }
    await response.body?.cancel().catch(() => {});
  }
}
