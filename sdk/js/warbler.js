// Warbler browser (and Node) client: JSON frames over a WebSocket, as docs/protocol.md
// describes them. No dependencies: it needs only a global `WebSocket` (every browser; Node 22,
// or Node 20 with --experimental-websocket).
//
//   import { WarblerClient } from "./warbler.js";
//   const client = new WarblerClient({
//     url: "ws://127.0.0.1:7480/v1/ws",
//     token: () => fetch("/my-backend/warbler-token").then((r) => r.text()),
//     device: "browser-tab-1",
//     onMessage: (m) => console.log(m.seq, m.text),
//     onState: (s) => console.log("connection:", s),
//   });
//   client.connect();
//   await client.publish("bob", "hello bob");
//
// Delivery is in order and at least once: after a reconnect the server resends what this
// device had not acknowledged, and the client drops every seq it has already handed to
// `onMessage`. Messages are acknowledged once `onMessage` returned (or its promise resolved).

/**
 * One delivered message.
 * @typedef {object} WarblerMessage
 * @property {number} seq   Position in the user's stream: 1, 2, 3, … without gaps.
 * @property {string} id    The publisher's id of the message.
 * @property {number} ts    When it was accepted (ms since the epoch).
 * @property {string|null} from  The sender, when the publisher named one.
 * @property {Uint8Array} body   The bytes.
 * @property {string|null} text  The body as text, when it is UTF-8.
 */

/**
 * Connection states: "idle" (not started), "connecting", "open", "reconnecting" (waiting
 * to connect again), "closed" (closed by `close()`), "failed" (refused for good: bad token).
 * @typedef {"idle"|"connecting"|"open"|"reconnecting"|"closed"|"failed"} WarblerState
 */

/**
 * @typedef {object} WarblerOptions
 * @property {string} url  The node's WebSocket URL, `ws(s)://HOST:PORT/v1/ws`.
 * @property {string|(() => string|Promise<string>)} token  A token, or a function giving a
 *   fresh one (called before every connection attempt).
 * @property {string} device  This device's id (stable across reloads: the server keeps its
 *   cursor).
 * @property {(m: WarblerMessage) => (void|Promise<void>)} [onMessage]
 * @property {(s: WarblerState, detail?: string) => void} [onState]
 * @property {(e: {code: string, message: string, id: string|null}) => void} [onError]
 *   Errors the server reports that end no connection (e.g. `messages_expired`).
 * @property {number} [lastSeq]  The highest seq this device already processed (e.g. kept
 *   in localStorage): lower ones are dropped.
 * @property {number} [backoffMs=500]  First reconnect delay; doubles up to `maxBackoffMs`.
 * @property {number} [maxBackoffMs=30000]
 * @property {typeof WebSocket} [WebSocket]  A WebSocket implementation (default: the global).
 */

/** Error codes after which reconnecting cannot help. */
const FATAL = new Set(["forbidden", "hello_required"]);

export class WarblerClient {
  /** @param {WarblerOptions} options */
  constructor(options) {
    if (!options || !options.url || !options.token || !options.device) {
      throw new Error("WarblerClient needs url, token and device");
    }
    this.options = { backoffMs: 500, maxBackoffMs: 30000, ...options };
    /** @type {WarblerState} */
    this.state = "idle";
    /** The highest seq handed to onMessage. */
    this.lastSeq = options.lastSeq || 0;
    /** The user and node of the current connection (from `welcome`). */
    this.user = null;
    this.node = null;
    this._ws = null;
    this._attempt = 0;
    this._timer = null;
    this._acked = 0;
    this._queue = Promise.resolve();
    this._pending = new Map();
    this._nextId = 0;
  }

  /** Starts connecting (and reconnecting whenever the connection drops). */
  connect() {
    if (this.state === "idle" || this.state === "closed" || this.state === "failed") {
      this._attempt = 0;
      this._open();
    }
  }

  /** Closes the connection for good (acks sent before are processed by the server). */
  close() {
    clearTimeout(this._timer);
    this._setState("closed");
    if (this._ws) this._ws.close(1000);
    this._ws = null;
    this._failPending("the client was closed");
  }

  /**
   * Publishes `body` to `to` (needs a token with the publish scope). Resolves with the
   * message's seq once it is durable. Sending the same `id` again returns the same seq.
   * @param {string} to
   * @param {string|Uint8Array} body
   * @param {string} [id]
   * @returns {Promise<number>}
   */
  publish(to, body, id) {
    id = id || `${this.options.device}-${Date.now().toString(36)}-${(this._nextId++).toString(36)}`;
    const frame = { t: "publish", id, to };
    if (typeof body === "string") frame.body = body;
    else frame.body_b64 = toBase64(body);
    return new Promise((resolve, reject) => {
      if (this.state !== "open") {
        reject(new Error(`not connected (${this.state}); publish again once open`));
        return;
      }
      this._pending.set(id, { resolve, reject });
      this._send(frame);
    });
  }

  async _open() {
    clearTimeout(this._timer);
    this._setState("connecting");
    let token;
    try {
      const t = this.options.token;
      token = typeof t === "function" ? await t() : t;
    } catch (e) {
      return this._retry(`cannot get a token: ${e}`);
    }
    if (this.state !== "connecting") return;
    const WS = this.options.WebSocket || globalThis.WebSocket;
    let ws;
    try {
      ws = new WS(this.options.url);
    } catch (e) {
      return this._retry(`cannot open ${this.options.url}: ${e}`);
    }
    this._ws = ws;
    ws.onopen = () => {
      this._send({ t: "hello", token, device: this.options.device, v: 1 });
    };
    ws.onmessage = (event) => {
      if (typeof event.data !== "string") return; // a JSON client gets only text
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch {
        return;
      }
      this._onFrame(ws, frame);
    };
    ws.onclose = (event) => {
      if (this._ws !== ws) return;
      this._ws = null;
      this._failPending("the connection closed before the publish was acknowledged; publish again with the same id");
      if (this.state !== "closed" && this.state !== "failed") {
        this._retry(`connection closed (${event.code})`);
      }
    };
    ws.onerror = () => {};
  }

  _onFrame(ws, f) {
    switch (f.t) {
      case "welcome":
        this.user = f.user;
        this.node = f.node;
        this._attempt = 0;
        this._acked = f.acked; // the server's cursor: acks lost in flight are sent again
        this.lastSeq = Math.max(this.lastSeq, f.acked);
        this._setState("open");
        break;
      case "msg":
        if (f.seq <= this.lastSeq) {
          // A redelivery: already handed over; acked once its turn is done.
          this._queue = this._queue.then(() => this._ack(f.seq));
          break;
        }
        this.lastSeq = f.seq;
        this._deliver(f);
        break;
      case "published": {
        const p = this._pending.get(f.id);
        this._pending.delete(f.id);
        if (p) p.resolve(f.seq);
        break;
      }
      case "ping":
        this._send({ t: "pong", n: f.n });
        break;
      case "bye":
        // The node is draining: reconnect (elsewhere, behind a load balancer) after retry_ms.
        this._ws = null;
        ws.close(1000);
        this._failPending("the node is draining; publish again with the same id");
        this._retry(`node draining: ${f.reason}`, f.retry_ms);
        break;
      case "error": {
        const p = f.id && this._pending.get(f.id);
        if (p) {
          this._pending.delete(f.id);
          const e = new Error(`${f.code}: ${f.message}`);
          e.code = f.code;
          p.reject(e);
        } else if (f.code === "unauthorized" && typeof this.options.token !== "function") {
          this._fail(ws, `${f.code}: ${f.message}`);
        } else if (FATAL.has(f.code)) {
          this._fail(ws, `${f.code}: ${f.message}`);
        } else if (this.options.onError) {
          this.options.onError({ code: f.code, message: f.message, id: f.id || null });
        }
        break;
      }
      default:
        break; // unknown frames are ignored, as the protocol asks
    }
  }

  _deliver(f) {
    const body = "body_b64" in f && f.body_b64 != null ? fromBase64(f.body_b64) : new TextEncoder().encode(f.body);
    const text = "body_b64" in f && f.body_b64 != null ? null : f.body;
    /** @type {WarblerMessage} */
    const m = { seq: f.seq, id: f.id, ts: f.ts, from: f.from ?? null, body, text };
    // Handed over one at a time, in order; each is acked once its handler is done.
    this._queue = this._queue.then(async () => {
      try {
        if (this.options.onMessage) await this.options.onMessage(m);
      } finally {
        this._ack(m.seq);
      }
    });
  }

  _ack(seq) {
    if (seq > this._acked) {
      this._acked = seq;
      this._send({ t: "ack", seq });
    }
  }

  _send(frame) {
    if (this._ws && this._ws.readyState === 1) this._ws.send(JSON.stringify(frame));
  }

  _fail(ws, why) {
    this._ws = null;
    ws.close(1000);
    this._failPending(why);
    this._setState("failed", why);
  }

  _retry(why, afterMs) {
    if (this.state === "closed" || this.state === "failed") return;
    const base = Math.min(this.options.maxBackoffMs, this.options.backoffMs * 2 ** this._attempt);
    this._attempt += 1;
    // Full jitter, so that the devices of a node that went away do not return all at once.
    const delay = afterMs !== undefined ? afterMs + Math.random() * afterMs : Math.random() * base;
    this._setState("reconnecting", why);
    this._timer = setTimeout(() => this._open(), delay);
  }

  _failPending(why) {
    for (const p of this._pending.values()) p.reject(new Error(why));
    this._pending.clear();
  }

  _setState(state, detail) {
    if (this.state === state) return;
    this.state = state;
    if (this.options.onState) this.options.onState(state, detail);
  }
}

function toBase64(bytes) {
  let s = "";
  for (const b of bytes) s += String.fromCharCode(b);
  return btoa(s);
}

function fromBase64(b64) {
  const s = atob(b64);
  const out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out;
}
