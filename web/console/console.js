// The operator console: members, partitions and per-node figures from the node that serves
// this page. It polls GET /v1/cluster and GET /console/stats every 2 s with an ops token
// kept in sessionStorage (this tab only), and offers decommission with a confirmation.

const $ = (id) => document.getElementById(id);
const PERIOD_MS = 2000;
const KEEP_SAMPLES = 150; // 5 minutes at 2 s
const PALETTE = ["#2b6cb0", "#2f855a", "#805ad5", "#dd6b20", "#319795", "#d53f8c", "#718096", "#975a16", "#3182ce"];

/** Samples per node: [{t, connections, publishes_total}]. */
const history = new Map();

function headers() {
  return { authorization: `Bearer ${sessionStorage.opsToken}` };
}

async function getJson(path) {
  const r = await fetch(path, { headers: headers() });
  if (r.status === 401 || r.status === 403) {
    delete sessionStorage.opsToken;
    throw new Error(`the token was refused (${r.status}); sign in with an ops token`);
  }
  if (!r.ok) throw new Error(`${path}: ${r.status} ${await r.text()}`);
  return r.json();
}

function colour(nodes, name) {
  const i = nodes.indexOf(name);
  return i < 0 ? "#a0aec0" : PALETTE[i % PALETTE.length];
}

/** Why a partition needs attention: "leaderless", "under" (too few replicas or moving), or "". */
export function partitionFlag(p, replicationFactor) {
  if (!p.leader) return "leaderless";
  const rf = replicationFactor ?? p.replicas.length;
  const placed = [...(p.placement ?? [])].sort().join(",");
  const moving = placed !== "" && placed !== [...p.replicas].sort().join(",");
  if (p.replicas.length < rf || moving) return "under";
  return "";
}

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text ?? "";
  if (cls) td.className = cls;
  return td;
}

function rate(node) {
  const h = history.get(node) ?? [];
  if (h.length < 2) return null;
  const [a, b] = [h.at(-2), h.at(-1)];
  if (a.publishes_total == null || b.publishes_total == null) return null;
  return Math.max(0, (b.publishes_total - a.publishes_total) / ((b.t - a.t) / 1000));
}

function renderMembers(status, stats) {
  const nodes = status.members.map((m) => m.node);
  const tbody = $("members").querySelector("tbody");
  tbody.replaceChildren();
  for (const m of status.members) {
    const state = m.alive ? m.state : "down";
    const s = stats[m.node] ?? {};
    const r = rate(m.node);
    const tr = document.createElement("tr");
    tr.dataset.node = m.node;
    tr.dataset.state = state;
    const name = cell(m.node);
    name.style.borderLeft = `6px solid ${colour(nodes, m.node)}`;
    tr.append(
      name,
      cell(state, `state-${String(state).split(" ")[0]}`),
      cell(m.zone ?? ""),
      cell(s.leads ?? ""),
      cell(s.connections ?? ""),
      cell(r == null ? "" : r.toFixed(0)),
      cell(m.client_addr),
      cell(m.http_addr),
    );
    const action = document.createElement("td");
    if (m.member) {
      const b = document.createElement("button");
      b.textContent = "decommission";
      b.onclick = () => decommission(m.node);
      action.append(b);
    }
    tr.append(action);
    tbody.append(tr);
  }
}

function renderPartitions(status) {
  const nodes = status.members.map((m) => m.node);
  $("pcount").textContent = `(${status.partitions.length}, replication factor ${status.replication_factor ?? 1})`;
  $("legend").replaceChildren(
    ...nodes.map((n) => {
      const s = document.createElement("span");
      s.style.background = colour(nodes, n);
      s.textContent = n;
      return s;
    }),
  );
  const grid = $("grid");
  grid.replaceChildren();
  for (const p of status.partitions) {
    const d = document.createElement("div");
    const flag = partitionFlag(p, status.replication_factor);
    d.className = `cell ${flag}`;
    d.dataset.partition = String(p.partition);
    d.style.background = colour(nodes, p.leader);
    d.textContent = String(p.partition);
    d.title = `partition ${p.partition}\nleader: ${p.leader ?? "none"}\nreplicas: ${p.replicas.join(", ")}` +
      (p.placement ? `\nplaced on: ${p.placement.join(", ")}` : "");
    grid.append(d);
  }
}

function chart(svg, nodes, value) {
  const w = Number(svg.getAttribute("width"));
  const h = Number(svg.getAttribute("height"));
  const series = nodes.map((n) => {
    const hs = history.get(n) ?? [];
    return hs.map((s, i) => ({ t: s.t, v: value(hs, i) })).filter((p) => p.v != null);
  });
  const all = series.flat();
  svg.replaceChildren();
  if (all.length === 0) return;
  const t0 = Math.min(...all.map((p) => p.t));
  const t1 = Math.max(...all.map((p) => p.t), t0 + 1);
  const vmax = Math.max(1, ...all.map((p) => p.v));
  const ns = "http://www.w3.org/2000/svg";
  series.forEach((pts, k) => {
    if (pts.length === 0) return;
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("fill", "none");
    line.setAttribute("stroke", colour(nodes, nodes[k]));
    line.setAttribute("stroke-width", "2");
    line.setAttribute(
      "points",
      pts.map((p) => `${((p.t - t0) / (t1 - t0)) * (w - 10) + 5},${h - 5 - (p.v / vmax) * (h - 20)}`).join(" "),
    );
    svg.append(line);
  });
  const label = document.createElementNS(ns, "text");
  label.setAttribute("x", "6");
  label.setAttribute("y", "12");
  label.setAttribute("font-size", "11");
  label.textContent = `max ${vmax.toFixed(0)}`;
  svg.append(label);
}

async function decommission(node) {
  if (!confirm(`Decommission ${node}? Its partitions move to the other members; then stop it.`)) return;
  const r = await fetch("/v1/cluster/decommission", {
    method: "POST",
    headers: { ...headers(), "content-type": "application/json" },
    body: JSON.stringify({ node }),
  });
  const text = await r.text();
  alert(r.ok ? `${node} is being decommissioned: ${text}` : `refused (${r.status}): ${text}`);
}

async function poll() {
  try {
    const [status, stats] = await Promise.all([getJson("/v1/cluster"), getJson("stats")]);
    const now = Date.now();
    for (const [node, s] of Object.entries(stats)) {
      const h = history.get(node) ?? [];
      h.push({ t: now, connections: s.connections, publishes_total: s.publishes_total });
      if (h.length > KEEP_SAMPLES) h.shift();
      history.set(node, h);
    }
    renderMembers(status, stats);
    renderPartitions(status);
    const nodes = status.members.map((m) => m.node);
    chart($("chart-conns"), nodes, (hs, i) => hs[i].connections ?? null);
    chart($("chart-rate"), nodes, (hs, i) =>
      i === 0 || hs[i].publishes_total == null || hs[i - 1].publishes_total == null
        ? null
        : Math.max(0, (hs[i].publishes_total - hs[i - 1].publishes_total) / ((hs[i].t - hs[i - 1].t) / 1000)),
    );
    $("status").textContent = `from ${status.node} at ${new Date(now).toLocaleTimeString()}`;
  } catch (e) {
    $("status").textContent = String(e.message ?? e);
    if (!sessionStorage.opsToken) return signIn();
  }
  setTimeout(poll, PERIOD_MS);
}

function signIn() {
  $("views").hidden = true;
  $("login").hidden = false;
}

if (typeof document !== "undefined") {
  $("login").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.opsToken = e.target.token.value.trim();
    $("login").hidden = true;
    $("views").hidden = false;
    poll();
  });
  const fromUrl = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromUrl) sessionStorage.opsToken = fromUrl;
  if (sessionStorage.opsToken) {
    $("views").hidden = false;
    poll();
  } else {
    signIn();
  }
}
