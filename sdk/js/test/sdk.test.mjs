// Tests of sdk/js/warbler.js, run by tests/js_sdk.rs with Node:
//
//   node --experimental-websocket sdk/js/test/sdk.test.mjs            # fake server only
//   WARBLER_WS=ws://127.0.0.1:7480/v1/ws WARBLER_TOKEN=... node --experimental-websocket sdk/js/test/sdk.test.mjs
//
// The first part drives the client against a fake WebSocket (duplicates after a reconnect,
// `bye` and its retry_ms, backoff, a refused token); the second, when WARBLER_WS is set,
// against a real node: in-order delivery, publish, resume from the cursor after a reconnect.
import assert from "node:assert/strict";
import { WarblerClient } from "../warbler.js";

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function until(what, check, ms = 5000) {
  const end = Date.now() + ms;
  while (!check()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(5);
  }
}

/** A WebSocket double: records what the client sends; the test plays the server. */
class FakeSocket {
  static all = [];
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    FakeSocket.all.push(this);
    setTimeout(() => {
      this.readyState = 1;
      this.onopen && this.onopen();
    }, 0);
  }
  send(text) {
    this.sent.push(JSON.parse(text));
  }
  close(code = 1000) {
    if (this.readyState === 3) return;
    this.readyState = 3;
    setTimeout(() => this.onclose && this.onclose({ code }), 0);
  }
  serve(frame) {
    this.onmessage({ data: JSON.stringify(frame) });
  }
  drop() {
    this.close(1006);
  }
}

async function fakeServer() {
  const got = [];
  const states = [];
  const client = new WarblerClient({
    url: "ws://fake/v1/ws",
    token: "tok",
    device: "tab",
    WebSocket: FakeSocket,
    backoffMs: 10,
    onMessage: (m) => got.push(`${m.seq}:${m.text ?? Array.from(m.body).join(",")}`),
    onState: (s) => states.push(s),
  });
  client.connect();
  await until("the first socket", () => FakeSocket.all.length === 1 && FakeSocket.all[0].sent.length === 1);
  let ws = FakeSocket.all[0];
  assert.deepEqual(ws.sent[0], { t: "hello", token: "tok", device: "tab", v: 1 });
  ws.serve({ t: "welcome", user: "amy", device: "tab", node: "n0", acked: 0 });
  assert.equal(client.state, "open");
  ws.serve({ t: "msg", seq: 1, id: "a", ts: 1, body: "one", from: null });
  ws.serve({ t: "msg", seq: 2, id: "b", ts: 2, body_b64: "AAH/", from: "bob" });
  await until("two messages", () => got.length === 2);
  assert.deepEqual(got, ["1:one", "2:0,1,255"]);
  await until("acks", () => ws.sent.filter((f) => f.t === "ack").length === 2);
  ws.serve({ t: "ping", n: 7 });
  assert.deepEqual(ws.sent.at(-1), { t: "pong", n: 7 });

  // The connection drops before the server stored the ack of 2: it resends 2; the client
  // drops it (already handed over) but acks it again, then takes 3.
  ws.drop();
  await until("a second socket", () => FakeSocket.all.length === 2 && FakeSocket.all[1].sent.length === 1);
  ws = FakeSocket.all[1];
  ws.serve({ t: "welcome", user: "amy", device: "tab", node: "n1", acked: 1 });
  ws.serve({ t: "msg", seq: 2, id: "b", ts: 2, body_b64: "AAH/", from: "bob" });
  ws.serve({ t: "msg", seq: 3, id: "c", ts: 3, body: "three", from: null });
  await until("three messages", () => got.length === 3);
  assert.deepEqual(got, ["1:one", "2:0,1,255", "3:three"]);
  await until("acks of 2 and 3", () => ws.sent.filter((f) => f.t === "ack").length === 2);
  assert.deepEqual(ws.sent.filter((f) => f.t === "ack").map((f) => f.seq), [2, 3]);

  // Publish: resolved by `published`, rejected by an `error` naming its id.
  const ok = client.publish("bob", "hi", "p1");
  assert.deepEqual(ws.sent.at(-1), { t: "publish", id: "p1", to: "bob", body: "hi" });
  ws.serve({ t: "published", id: "p1", to: "bob", seq: 9 });
  assert.equal(await ok, 9);
  const refused = client.publish("bob", new Uint8Array([0, 255]), "p2");
  assert.deepEqual(ws.sent.at(-1), { t: "publish", id: "p2", to: "bob", body_b64: "AP8=" });
  ws.serve({ t: "error", code: "overloaded", message: "later", id: "p2" });
  await assert.rejects(refused, (e) => e.code === "overloaded");

  // `bye`: it waits at least retry_ms (and at most twice that) before it connects again.
  const byeAt = Date.now();
  ws.serve({ t: "bye", reason: "draining", retry_ms: 200 });
  assert.equal(client.state, "reconnecting");
  await until("a third socket", () => FakeSocket.all.length === 3, 2000);
  const waited = Date.now() - byeAt;
  assert.ok(waited >= 190 && waited < 600, `reconnected ${waited} ms after bye`);
  ws = FakeSocket.all[2];
  await until("hello", () => ws.sent.length === 1);

  // A refused token with no way to get another: failed, no more attempts.
  ws.serve({ t: "error", code: "unauthorized", message: "bad token", id: null });
  assert.equal(client.state, "failed");
  await sleep(100);
  assert.equal(FakeSocket.all.length, 3);
  assert.deepEqual(states.slice(0, 3), ["connecting", "open", "reconnecting"]);
  console.log("fake server: order, duplicates, acks, publish, bye, failure ok");
}

async function realNode(url, token) {
  const got = [];
  const open = (lastSeq) =>
    new WarblerClient({
      url,
      token: async () => token,
      device: "js-tab",
      lastSeq,
      onMessage: (m) => got.push(`seq=${m.seq} id=${m.id} text=${m.text}`),
    });
  let client = open(0);
  client.connect();
  await until("open", () => client.state === "open");
  console.log(`welcome user=${client.user} last=${client.lastSeq}`);
  const seqs = [];
  for (let i = 1; i <= 3; i++) seqs.push(await client.publish(client.user, `hello ${i}`, `js-${i}`));
  // The same id again: the same seq (publishes are idempotent).
  assert.equal(await client.publish(client.user, "hello 1", "js-1"), seqs[0]);
  await until("three messages", () => got.length === 3);
  client.close();
  await sleep(300);
  // A reload: a new client with no memory; the server resumes after the acked cursor.
  client = open(0);
  client.connect();
  await until("open again", () => client.state === "open");
  console.log(`welcome user=${client.user} last=${client.lastSeq}`);
  await client.publish(client.user, "after reload", "js-4");
  await until("the fourth message", () => got.length === 4);
  client.close();
  for (const line of got) console.log(line);
}

await fakeServer();
if (process.env.WARBLER_WS) await realNode(process.env.WARBLER_WS, process.env.WARBLER_TOKEN);
process.exit(0);
