// The demo chat: every tab is a device of its user (its id kept in sessionStorage, so a
// reload resumes as the same device). A message goes to its recipient and to the sender, so
// that every tab of both shows it. Tokens come from the dev node's /demo/token.
import { WarblerClient } from "./warbler.js";

const $ = (id) => document.getElementById(id);
const wsUrl = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/ws`;

async function token(user) {
  const r = await fetch("token", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ user }),
  });
  if (!r.ok) throw new Error(`token refused: ${r.status} ${await r.text()}`);
  return (await r.json()).token;
}

function show(m) {
  const li = document.createElement("li");
  li.dataset.seq = String(m.seq);
  const seq = document.createElement("span");
  seq.className = "seq";
  seq.textContent = `#${m.seq}`;
  const from = document.createElement("span");
  from.className = "from";
  let chat;
  try {
    chat = JSON.parse(m.text ?? "");
  } catch {
    chat = { from: m.from ?? "?", to: "?", text: m.text ?? "(bytes)" };
  }
  from.textContent = `${chat.from} → ${chat.to}:`;
  const text = document.createElement("span");
  text.className = "text";
  text.textContent = chat.text;
  li.append(seq, from, text);
  $("log").append(li);
}

/** The user's stored messages (the first 1,000), shown before the live ones. */
async function history(user, tok) {
  const r = await fetch(`/v1/users/${encodeURIComponent(user)}/messages?after=0&limit=1000`, {
    headers: { authorization: `Bearer ${tok}` },
  });
  if (!r.ok) return [];
  return (await r.json()).messages.map((m) => ({ ...m, text: m.body }));
}

async function start(user) {
  sessionStorage.user = user;
  sessionStorage.device ??= `tab-${crypto.randomUUID().slice(0, 8)}`;
  $("who").textContent = `${user} (${sessionStorage.device})`;
  $("join").hidden = true;
  $("chat").hidden = false;
  // A reload shows what came before from the stored history; the live connection then
  // resumes after the device's cursor, and drops what the history already showed.
  let lastSeq = 0;
  try {
    for (const m of await history(user, await token(user))) {
      show(m);
      lastSeq = m.seq;
    }
  } catch (e) {
    $("state").title = `no history: ${e.message}`;
  }
  const client = new WarblerClient({
    url: wsUrl,
    token: () => token(user),
    device: sessionStorage.device,
    lastSeq,
    onMessage: show,
    onState: (s, why) => {
      $("state").textContent = s;
      $("state").className = s;
      $("state").title = why ?? "";
    },
  });
  client.connect();
  window.warbler = client; // for the browser tests and the curious
  $("send").addEventListener("submit", async (e) => {
    e.preventDefault();
    const form = e.target;
    const to = form.to.value.trim();
    const body = JSON.stringify({ from: user, to, text: form.text.value });
    const id = `${sessionStorage.device}-${Date.now().toString(36)}`;
    form.text.value = "";
    try {
      await client.publish(to, body, `${id}-to`);
      if (to !== user) await client.publish(user, body, `${id}-me`);
    } catch (err) {
      $("error").textContent = `not sent (${err.message}); send it again`;
      return;
    }
    $("error").textContent = "";
  });
}

$("join").addEventListener("submit", (e) => {
  e.preventDefault();
  start(e.target.user.value.trim());
});
const remembered = sessionStorage.user || new URLSearchParams(location.search).get("user");
if (remembered) start(remembered);
