#!/usr/bin/env python3
"""Turns the results of benches/compare.sh into the "Side by side" section of
docs/benchmarks.md (between its markers) and PNG plots.

    python3 benches/report.py RESULTS_DIR docs/benchmarks.md docs/img
"""
import json
import os
import re
import sys

BEGIN = "<!-- side-by-side: begin (written by benches/report.py; edit the script, not this) -->"
END = "<!-- side-by-side: end -->"
COMMAND = "make bench"

NAMES = {
    "warbler-1": "Warbler, 1 node",
    "nats-r1": "NATS JetStream R1",
    "mosquitto": "Mosquitto (QoS 1)",
    "warbler-3": "Warbler, 3 nodes RF 3",
    "warbler-3r": "Warbler, 3 nodes RF 3, clients routed by leader",
    "nats-r3": "NATS JetStream R3",
    "warbler-1m": "Warbler, one-member cluster (RF 1 through Raft)",
}
GROUPS = [
    ("one-node", "One node: Warbler single node, NATS JetStream R1, Mosquitto",
     ["warbler-1"], ["nats-r1", "mosquitto"]),
    ("three-replicas", "Three replicas: Warbler RF 3, NATS JetStream R3",
     ["warbler-3", "warbler-3r"], ["nats-r3"]),
]

DURABILITY = """\
| system | what its acknowledgement means here |
|---|---|
| Warbler, 1 node | the message is in RocksDB's log and **fsynced** (group commit) before `published` |
| Warbler, RF 3 | the Raft entry is **fsynced on a majority** (2 of 3) before `published` |
| NATS JetStream R1 (2.9.10) | the message is written to the stream's file (the OS page cache), **not fsynced**: JetStream 2.9 syncs files every 2 minutes, so a power loss can take acknowledged messages |
| NATS JetStream R3 | written on a majority's page cache, **not fsynced** (same 2-minute sync) |
| Mosquitto 2.0.11 (QoS 1, `persistence true`) | PUBACK comes from **memory**; the database is written at `autosave_interval` (30 min by default) and at shutdown: a crash loses everything since the last save |

So Warbler's figures pay for fsync before every acknowledgement and the peers' do not."""


def load_jsonl(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read(path, default=""):
    return open(path).read() if os.path.exists(path) else default


def fmt_rate(x):
    return f"{x:,.0f}"


def fmt_ms(x):
    return f"{x:,.1f}" if x >= 10 else f"{x:,.2f}"


def ratio(a, b):
    return a / b if b else float("nan")


def fmt_ratio(x):
    return f"{x:.2f}" if x >= 0.1 else f"{x:.4f}"


def server_cpu_us(cpu, r):
    """The servers' CPU per acknowledged publish over run `r`, in µs (every process of a
    cluster counted), or None where the run has no CPU record (results of an older script)."""
    secs = cpu.get((r["label"], r["system"], r["offered_rate"]))
    if secs is None or not r.get("published"):
        return None
    return secs / r["published"] * 1e6


def fmt_us(x):
    return "–" if x is None else f"{x:,.0f}"


def group_rows(runs, labels):
    """Per label: its closed-loop (max) run and its open-loop points sorted by offered rate."""
    out = {}
    for label in labels:
        mine = [r for r in runs if r["label"] == label]
        maxes = [r for r in mine if r["offered_rate"] == 0]
        points = sorted((r for r in mine if r["offered_rate"] > 0), key=lambda r: r["offered_rate"])
        out[label] = (maxes[-1] if maxes else None, points)
    return out


def plot(group_id, title, rows, img_dir):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, (mx, points) in rows.items():
        pts = points + ([mx] if mx else [])
        if not pts:
            continue
        xs = [p["deliver_rate"] for p in pts]
        ax1.plot(xs, [p["deliver_ms"]["p99"] for p in pts], marker="o", label=NAMES.get(label, label))
        ax2.plot(xs, [p["deliver_ms"]["p50"] for p in pts], marker="o", label=NAMES.get(label, label))
    for ax, q in ((ax1, "p99"), (ax2, "p50")):
        ax.set_xlabel("delivered messages/s (to devices)")
        ax.set_ylabel(f"publish→deliver {q} (ms, log)")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"{title}\n(open-loop points at 33/66/100% of each system's maximum, last point: closed loop)",
                 fontsize=10)
    fig.tight_layout()
    os.makedirs(img_dir, exist_ok=True)
    path = os.path.join(img_dir, f"bench-{group_id}.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def micro_table(text):
    rows = []
    name = None
    for line in text.splitlines():
        m = re.match(r"^(\S.*?)\s+time:\s+\[(\S+ \S+) (\S+ \S+) (\S+ \S+)\]", line)
        if m:
            rows.append((m.group(1).strip(), m.group(3)))
            name = None
            continue
        m = re.match(r"^\s+time:\s+\[(\S+ \S+) (\S+ \S+) (\S+ \S+)\]", line)
        if m and name:
            rows.append((name, m.group(2)))
            name = None
            continue
        if line and not line.startswith(" ") and "time:" not in line and not line.startswith(("Benchmarking", "Found", "Gnuplot", "Running", "thrpt", "change")):
            name = line.strip()
    return rows


def replication_section(runs, fanouts):
    """Warbler's replicated setups against its single node, from this run: closed-loop maxima
    and one fan-out request."""
    maxima = {label: group_rows(runs, [label])[label][0] for label in
              ("warbler-1", "warbler-1m", "warbler-3", "warbler-3r")}
    one = maxima["warbler-1"]
    if not one:
        return []
    md = ["### Replication against one node", "",
          "Warbler's replicated setups against its single node, from the closed-loop runs above and one "
          "more of the single node started as a cluster of itself (`--seeds` at its own cluster port: RF 1 "
          "through Raft, as a one-replica StatefulSet runs), same workload:", "",
          "| setup | max publish rate (acked/s) | **÷ single node** | errors | order violations | gaps |",
          "|---|---|---|---|---|---|"]
    for label, mx in maxima.items():
        if mx:
            md.append(f"| {NAMES[label]} | {fmt_rate(mx['publish_rate'])} | "
                      f"**{fmt_ratio(ratio(mx['publish_rate'], one['publish_rate']))}** | {mx['errors']} | "
                      f"{mx['order_violations']} | {mx.get('gaps', 0)} |")
        else:
            md.append(f"| {NAMES[label]} | (no run) | | | | |")
    by_label = {f["label"]: f for f in fanouts}
    if by_label:
        md += ["", "One `POST /v1/messages` to many users (a fan-out), on a fresh server each, timed from "
               "the request to its answer (every recipient's message stored; on RF 3 replicated to a "
               "majority):", "",
               "| setup | recipients | stored | seconds | **recipients/s** |", "|---|---|---|---|---|"]
        rates = {}
        for label in ("warbler-1", "warbler-3"):
            f = by_label.get(label)
            if not f:
                md.append(f"| {NAMES[label]} | (no run) | | | |")
                continue
            rates[label] = f["stored"] / f["secs"] if f["secs"] > 0 else float("nan")
            md.append(f"| {NAMES[label]} | {f['recipients']:,} | {f['stored']:,} | {f['secs']:.2f} | "
                      f"**{fmt_rate(rates[label])}** |")
        if len(rates) == 2:
            md += ["", f"Fan-out on RF 3 ÷ single node: **{fmt_ratio(ratio(rates['warbler-3'], rates['warbler-1']))}**."]
    return md + [""]


def main():
    results, doc, img_dir = sys.argv[1], sys.argv[2], sys.argv[3]
    runs = load_jsonl(os.path.join(results, "runs.jsonl"))
    cpu = {(c["label"], c["system"], c["offered_rate"]): c["server_ticks"] / c["hz"]
           for c in load_jsonl(os.path.join(results, "cpu.jsonl"))}
    cpu_us = lambda r: server_cpu_us(cpu, r)
    idle = load_jsonl(os.path.join(results, "idle.jsonl"))
    machine = dict(line.split("=", 1) for line in read(os.path.join(results, "machine.txt")).splitlines() if "=" in line)
    md = [BEGIN, "", f"## Side by side with NATS JetStream and Mosquitto ({machine.get('date', '?')})", ""]
    md += [
        f"Every figure in this section comes from one run of `{COMMAND}` (which runs "
        f"`bash benches/compare.sh`; it took {int(machine.get('elapsed_secs', 0)) // 60} min "
        f"{int(machine.get('elapsed_secs', 0)) % 60} s). Re-running it rewrites this section and the plots.",
        "",
        f"- Machine: {machine.get('cpu', '?')}, {machine.get('memory_gib', '?')} GiB, kernel {machine.get('kernel', '?')}. "
        "Servers and load generator share the same cores. A run's server CPU per message is the user and "
        "system CPU of the server's processes over the whole run (every node of a cluster; connecting and "
        "draining included) divided by its acknowledged publishes.",
        f"- Versions: Warbler {machine.get('warbler', '?')}, {machine.get('nats', '?')} (Debian), {machine.get('mosquitto', '?')} (Debian).",
        f"- Workload, the same for every system: {machine.get('workload', '?')}. Each user has one publisher "
        "that numbers its messages, and every device checks it gets 1, 2, 3, … (`order violations`). "
        "Latency counts from each message's intended send time (open loop, no coordinated omission), in "
        "HDR histograms merged over the load processes. `warbler-load run --system warbler|nats|mqtt` is the driver.",
        "- Each system gets the same closed-loop run (as fast as 1,024 unanswered publishes per publisher allow) "
        "for its maximum, then open-loop runs at 33/66/100% of it (the curves). Each pair (Warbler and a peer) "
        "then runs open loop at half the lower of their two maxima: the latency ratios compare those two runs. "
        "Every run starts after `sync`: the dirty pages of the build and of earlier runs are on disk, so a "
        "system's fsyncs do not wait behind their writeback (ext4 commits them in the same journal "
        "transaction; 2.3 GB of unrelated dirty data took one node's p99 at 9,000/s from 39–49 ms to 1,094 ms, "
        "`benches/single_rate.sh`).",
        "- NATS runs as a 3-node cluster on loopback. The R1 stream is placed (by server tag) on the server the "
        "clients connect to; R3 clients spread over the three servers. A NATS device is its own connection "
        "with a durable pull consumer on its user's subject, acking each message; publishers publish "
        "asynchronously with at most 1,024 pending acks. A Mosquitto device is a persistent session "
        "(clean session off) subscribed at QoS 1; publishes are QoS 1 (the MQTT client answers each with a "
        "PUBACK, as the protocol asks, and its event loop writes what is queued together). A Warbler device "
        "takes the messages that arrived together and acks the last one (acks are cumulative); a Warbler "
        "publisher connection writes the publishes queued meanwhile in one write (since session 59).",
        "- Warbler RF 3 runs twice: with clients spread over the three nodes as above (a node that does not "
        "lead a user's partition forwards its publishes and deliveries), and with clients routed by leader "
        "(`--route-by-leader --devices-to-leader`: the load reads `GET /v1/routes` once before the run, each "
        "publisher holds a connection to every node and sends each publish to its user's leader, and each "
        "device connects to its user's leader). The workload is the same; only where the clients connect differs. Every RF 3 run starts once each "
        "node leads 16 to 27 of the 64 partitions (the leaders spread in the seconds after formation).",
        "",
        "What an acknowledgement means — the comparison is only honest with this in view:",
        "",
        DURABILITY,
        "",
    ]
    behind = []
    for group_id, title, our_labels, peers in GROUPS:
        rows = group_rows(runs, our_labels + peers)
        md += [f"### {title}", ""]
        md += ["| system | max publish rate (acked/s) | max delivered/s (to devices) | errors | order violations | gaps |",
               "|---|---|---|---|---|---|"]
        for label, (mx, points) in rows.items():
            if not mx:
                md.append(f"| {NAMES[label]} | (no run) | | | | |")
                continue
            every = [mx] + points
            md.append(f"| {NAMES[label]} | {fmt_rate(mx['publish_rate'])} | {fmt_rate(mx['deliver_rate'])} | "
                      f"{sum(r['errors'] for r in every)} | {sum(r['order_violations'] for r in every)} | "
                      f"{sum(r.get('gaps', 0) for r in every)} |")
        md += ["", "Errors, order violations and gaps are summed over all of the system's runs in this section. "
               "An order violation is a device seeing a number at or below one it had; a gap is a number it "
               "never saw before a later one (every failed publish leaves one per device).", ""]
        md += ["Warbler ÷ peer (throughput above 1 and latency below 1 favour Warbler). Latency at equal "
               "offered load: both systems run open loop at half the lower of their two maxima:", ""]
        md += ["| | max throughput ratio | offered load | publish→deliver p50 / p99 / p99.9 ms (Warbler vs peer) | "
               "**p99 ratio** | publish→ack p99 ratio | server CPU µs per message (Warbler vs peer) |",
               "|---|---|---|---|---|---|---|"]
        for ours in our_labels:
            w_max = rows[ours][0]
            for peer in peers:
                p_max = rows[peer][0]
                pair = [r for r in runs if r["label"] == f"{ours}~{peer}"]
                w_eq = next((r for r in pair if r["system"] == "warbler"), None)
                p_eq = next((r for r in pair if r["system"] != "warbler"), None)
                if not (w_max and p_max and w_eq and p_eq):
                    md.append(f"| {NAMES[ours]} vs {NAMES[peer]} | (missing run) | | | | | |")
                    continue
                t = ratio(w_max["publish_rate"], p_max["publish_rate"])
                d = ratio(w_eq["deliver_ms"]["p99"], p_eq["deliver_ms"]["p99"])
                a = ratio(w_eq["ack_ms"]["p99"], p_eq["ack_ms"]["p99"])
                q = lambda r: " / ".join(fmt_ms(r["deliver_ms"][k]) for k in ("p50", "p99", "p999"))
                md.append(f"| {NAMES[ours]} vs {NAMES[peer]} | **{fmt_ratio(t)}** | {fmt_rate(w_eq['offered_rate'])}/s | "
                          f"{q(w_eq)} vs {q(p_eq)} | **{fmt_ratio(d)}** | {fmt_ratio(a)} | "
                          f"{fmt_us(cpu_us(w_eq))} vs {fmt_us(cpu_us(p_eq))} |")
                if t < 1 or d > 1:
                    behind.append((ours, peer, t, d))
        one = group_rows(runs, ["warbler-1"])["warbler-1"][0]
        if one and "warbler-1" not in our_labels:
            md += ["", "Against Warbler's single node in the same run (closed-loop maxima): " + "; ".join(
                f"{NAMES[ours]} **{fmt_ratio(ratio(rows[ours][0]['publish_rate'], one['publish_rate']))}**"
                for ours in our_labels if rows[ours][0]) + "."]
        md.append("")
        md += ["Every run (offered 0 = closed loop; the others are open loop at 33/66/100% of the system's own maximum):", "",
               "| system | offered/s | acked/s | delivered/s | ack p50 / p99 / p99.9 ms | deliver p50 / p99 / p99.9 / max ms | errors | gaps | server CPU µs per message |",
               "|---|---|---|---|---|---|---|---|---|"]
        for label, (mx, points) in rows.items():
            for r in ([mx] if mx else []) + points:
                md.append(f"| {NAMES[label]} | {fmt_rate(r['offered_rate'])} | {fmt_rate(r['publish_rate'])} | "
                          f"{fmt_rate(r['deliver_rate'])} | {fmt_ms(r['ack_ms']['p50'])} / {fmt_ms(r['ack_ms']['p99'])} / "
                          f"{fmt_ms(r['ack_ms']['p999'])} | {fmt_ms(r['deliver_ms']['p50'])} / {fmt_ms(r['deliver_ms']['p99'])} / "
                          f"{fmt_ms(r['deliver_ms']['p999'])} / {fmt_ms(r['deliver_ms']['max'])} | {r['errors']} | {r.get('gaps', 0)} | "
                          f"{fmt_us(cpu_us(r))} |")
        md.append("")
        path = plot(group_id, title, rows, img_dir)
        if path:
            rel = os.path.relpath(path, os.path.dirname(os.path.abspath(doc)))
            md += [f"![{title}: throughput vs latency]({rel})", ""]

    md += replication_section(runs, load_jsonl(os.path.join(results, "fanout.jsonl")))

    md += ["### Memory per idle connection", "",
           "Idle connections opened by 2 load processes (`warbler-load idle`) against one server, each "
           "device of a different user; memory is the server's RSS growth divided by the connections, read 8 s "
           "after the last one came up. A Warbler connection is an authenticated device session subscribed to its "
           "user's mailbox (asleep: every message acknowledged, docs/storage.md); a NATS connection is a client "
           "with one core subscription to its user's subject (no JetStream consumer, which would cost more). "
           "Where the bytes go, from a heap profile: the section \"Idle connections\" below.", "",
           "| system | TLS | connections | RSS before → after (MiB) | **bytes per connection** |", "|---|---|---|---|---|"]
    per_conn = {}
    for r in idle:
        grow = (r["rss_after_kib"] - r["rss_before_kib"]) * 1024
        b = grow / r["connections"] if r["connections"] else float("nan")
        per_conn[(r["system"], r["tls"])] = b
        md.append(f"| {'Warbler' if r['system'] == 'warbler' else 'NATS'} | {r['tls']} | {r['connections']:,} | "
                  f"{r['rss_before_kib'] / 1024:,.0f} → {r['rss_after_kib'] / 1024:,.0f} | **{b:,.0f}** |")
    for tls in ("off", "on"):
        w, n = per_conn.get(("warbler", tls)), per_conn.get(("nats", tls))
        if w and n:
            md.append("")
            md.append(f"Warbler ÷ NATS, TLS {tls}: **{w / n:.2f}**.")
    held = [r for r in idle if r["connections"] == r.get("requested")]
    if idle and len(held) == len(idle):
        md += ["", f"How many idle connections one node holds: every server above held all "
               f"{idle[0]['requested']:,} it was offered. A Warbler node accepts `limits.connections_max` = 18,000 by "
               "default (then refuses with `overloaded`), kept under the open-file limit of 20,000 per process "
               "on this machine: that limit bounds it, not memory. At the largest figure above, 20,000 connections take "
               f"{20000 * max(per_conn.values()) / 2**20:,.0f} MiB.", ""]
    else:
        short = [f"{r['system']} TLS {r['tls']}: {r['connections']:,} of {r.get('requested', '?')}" for r in idle
                 if r not in held]
        md += ["", "Not every connection came up: " + "; ".join(short) + ".", ""]

    conns = read(os.path.join(results, "connections.txt"))
    md += ["### Connection scale of a 3-node cluster, and a reconnect storm", "",
           "`benches/connections.sh`: a 3-node cluster (RF 3) holds idle devices opened by 4 load processes "
           "(the open-file limit is per process) over the three nodes, each device sending a `ping` every "
           "60 s (the server's ping interval); the CPU of the whole cluster is read over 60 s with them. Then "
           "a fresh cluster gets `STORM` devices (10,000 by default) on each node, one node is killed with `kill -9`, "
           "and its devices reconnect to the other two (retrying with 50–250 ms pauses), timed from the "
           "first disconnect until the last device has its `welcome`.", ""]
    figures = []
    m = re.search(r"^held: (\d+) of (\d+) devices", conns, re.M)
    if m:
        figures.append(("idle devices held by the cluster", f"**{int(m[1]):,}** of {int(m[2]):,}"))
    m = re.search(r"^idle CPU with (\d+) devices pinging every (\d+) s: ([\d.]+)%", conns, re.M)
    if m:
        figures.append((f"CPU of the cluster with them (pings every {m[2]} s)", f"**{m[3]}% of one core**"))
    m = re.search(r"^memory: cluster RSS (\d+) -> (\d+) MiB, (\d+) bytes per device", conns, re.M)
    if m:
        figures.append(("cluster memory per device (session, stand-in on the leader, routing)",
                        f"{int(m[3]):,} bytes ({m[1]} → {m[2]} MiB)"))
    m = re.search(r"^storm: reconnected=(\d+) of (\d+) all_back_secs=([\d.]+) per_device_ms p50=(\d+) p99=(\d+)", conns, re.M)
    if m:
        figures.append((f"reconnect storm: devices of the killed node back on the others",
                        f"**{int(m[1]):,} of {int(m[2]):,} in {m[3]} s** (per device p50 {m[4]} ms, p99 {m[5]} ms)"))
    if figures:
        md += ["| figure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in figures] + [""]
    md += ["```", conns.strip() or "(no result)", "```", ""]

    micro = micro_table(read(os.path.join(results, "micro.txt")))
    if micro:
        md += ["### Micro benchmarks (criterion)", "",
               "`cargo bench --workspace --bench frame --bench storage --bench placement --bench mailbox "
               "-- --warm-up-time 1 --measurement-time 2`, in the same run:", "",
               "| benchmark | time (median estimate) |", "|---|---|"]
        md += [f"| {n} | {t} |" for n, t in micro]
        md.append("")

    md += ["### Where Warbler is behind, and where its time goes", ""]
    if behind:
        for ours, peer, t, d in behind:
            md.append(f"- {NAMES[ours]} vs {NAMES[peer]}: throughput ratio {fmt_ratio(t)}, p99 ratio {fmt_ratio(d)}.")
        md.append("")
    else:
        md += ["Warbler is ahead of every peer in this run on both ratios.", ""]
    for label in ("warbler-1", "warbler-3"):
        prof = "\n".join(re.sub(r"(\s+-)+\s*$", "", line).rstrip()
                         for line in read(os.path.join(results, f"profile-{label}.txt")).splitlines())
        if prof:
            md += [f"`perf record -F 499 -g` of {'the node' if label == 'warbler-1' else 'node w0'} during "
                   f"an extra closed-loop run of {NAMES[label]}, after the measured ones "
                   "(`perf report --no-children --sort dso,symbol`, top entries):",
                   "", "```", prof, "```", ""]
    md.append(END)
    section = "\n".join(md) + "\n"

    text = read(doc)
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + section + "\n" + tail.lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(doc, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
