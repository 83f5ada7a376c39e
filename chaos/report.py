#!/usr/bin/env python3
"""Writes the results section of docs/chaos.md (between its markers) and one plot per
scenario from the runs of scripts/chaos.sh.

    python3 chaos/report.py RUNS_DIR docs/chaos.md docs/img
"""
import glob
import json
import os
import platform
import statistics
import subprocess
import sys

BEGIN = "<!-- chaos-results: begin (written by chaos/report.py; edit the script, not this) -->"
END = "<!-- chaos-results: end -->"
ANOMALIES = ["lost", "unexpected", "duplicate_assignments", "seq_reuse", "order_violations",
             "gaps", "real_time_violations", "send_order_violations", "undrained_devices"]


def load(pattern):
    out = []
    for path in sorted(glob.glob(pattern)):
        with open(path) as f:
            out.append(json.load(f))
    return out


def ms(values):
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    return f"{statistics.median(values) / 1e3:.2f} s / {max(values) / 1e3:.2f} s"


def machine():
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = os.cpu_count()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cores} cores ({cpu}), {mem:.0f} GiB, Linux {platform.release()}"


def scenario_table(runs, errors):
    by = {}
    for r in runs:
        by.setdefault(r["scenario"], []).append(r)
    failed = {}
    for e in errors:
        failed.setdefault(e["scenario"], []).append(e)
    lines = [
        "| scenario | runs (seeds) | valid | acknowledged | delivered ids | unknown → recovered "
        "| anomalies | p50 / p99 latency | throughput back (median / max) | worst user stall (median / max) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in sorted(set(by) | set(failed)):
        rs, es = by.get(name, []), failed.get(name, [])
        if not rs:
            seeds = ", ".join(str(e["seed"]) for e in es)
            lines.append(f"| {name} | {len(es)} ({seeds}) | **0/{len(es)}**, {len(es)} did not "
                         "finish | – | – | – | – | – | – | – |")
            continue
        c = [r["check"] for r in rs]
        seeds = ", ".join(str(r["seed"]) for r in rs)
        valid = sum(1 for x in c if x["valid"])
        unfinished = ""
        if es:
            seeds += "; " + ", ".join(str(e["seed"]) for e in es)
            unfinished = f", {len(es)} did not finish"
        anomalies = sum(x.get(k, 0) for x in c for k in ANOMALIES)
        faults = [f for x in c for f in x["faults"]]
        lines.append(
            f"| {name} | {len(rs) + len(es)} ({seeds}) | **{valid}/{len(rs) + len(es)}**{unfinished} "
            f"| {sum(x['acknowledged'] for x in c):,} | {sum(x['delivered'] for x in c):,} "
            f"| {sum(x['unknown'] for x in c):,} → {sum(x['recovered'] for x in c):,} "
            f"| {anomalies} "
            f"| {statistics.median(x['latency']['p50'] for x in c):.1f} / "
            f"{statistics.median(x['latency']['p99'] for x in c):.0f} ms "
            f"| {ms([f['recover_ms'] for f in faults])} "
            f"| {ms([f['worst_user_stall_ms'] for f in faults])} |"
        )
    return lines, by


def bug_table(runs):
    lines = [
        "| deliberate bug | scenario (seed) | verdict | lost | duplicate assignments | seq reused "
        "| order violations | gaps | real-time violations | first anomaly |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        c = r["check"]
        restore = (r.get("restore") or {}).get("examples") or []
        first = (c["examples"] or restore or [""])[0]
        lines.append(
            f"| `{r['bug']}` | {r['scenario']} ({r['seed']}) | "
            f"{'valid (not caught)' if c['valid'] else '**caught**'} | {c['lost']} "
            f"| {c['duplicate_assignments']} | {c['seq_reuse']} | {c['order_violations']} "
            f"| {c['gaps']} | {c['real_time_violations']} | {first} |"
        )
    return lines


def main(runs_dir, doc, img_dir):
    runs = load(os.path.join(runs_dir, "matrix", "*", "result.json"))
    bugs = load(os.path.join(runs_dir, "bugs", "*", "result.json"))
    if not runs:
        sys.exit(f"no results under {runs_dir}/matrix; run scripts/chaos.sh first")
    errors = load(os.path.join(runs_dir, "matrix", "*", "error.json"))
    table, by = scenario_table(runs, errors)
    unfinished = [f"- {e['scenario']} seed {e['seed']} did not finish: {e['error']}" for e in errors]
    os.makedirs(img_dir, exist_ok=True)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import plot  # noqa: E402

    plots = []
    for name, rs in sorted(by.items()):
        png = os.path.join(img_dir, f"chaos-{name}.png")
        plot.plot(rs[0], png)
        rel = os.path.relpath(png, os.path.dirname(os.path.abspath(doc)))
        plots.append(f"![{name}, seed {rs[0]['seed']}]({rel})")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    info = json.load(open(os.path.join(runs_dir, "info.json"))) if os.path.exists(
        os.path.join(runs_dir, "info.json")) else {}
    # A matrix run from binaries built earlier names their commit in info.json.
    commit = info.get("commit", commit)
    nets = sorted({r["net"] for r in runs})
    section = [
        BEGIN,
        "",
        f"Measured with `{info.get('command', 'make chaos')}` on {machine()}, commit {commit}, "
        f"{info.get('date', '')}; it took {info.get('took', '?')}. Network: {', '.join(nets)}. "
        "Every run: 3 nodes (RF 3), 24 users × 2 devices, 6 publishers (2 per node) retrying "
        "with the same id, devices reconnecting at random (mean 8 s), then every fault healed "
        "and every device reading its stream to the end.",
        "",
        *table,
        "",
        *([*unfinished, ""] if unfinished else []),
        "*Anomalies* sums lost, unexpected, duplicate seq assignments, reused seqs, order "
        "violations, gaps, real-time order violations and devices whose final read did not "
        "reach the end, over all runs of the scenario. *Throughput back*: from the fault to "
        "the first second whose acknowledgements reach half the rate of the 5 s before it "
        "(0 when it never fell that low). *Worst user stall*: the longest any user that was "
        "being published to just before the fault waited for its next acknowledgement.",
        "",
        "### Broken builds",
        "",
        *(bug_table(bugs) if bugs else ["(no broken-build runs in this set)"]),
        "",
        "### Plots (first seed of each scenario)",
        "",
        *plots,
        "",
        END,
    ]
    text = open(doc).read() if os.path.exists(doc) else f"# Chaos\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        sys.exit(f"{doc} has no {BEGIN!r} … {END!r} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(doc, "w") as f:
        f.write(head + "\n".join(section) + tail)
    print(f"wrote {doc} and {len(plots)} plots in {img_dir}")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: report.py RUNS_DIR DOC IMG_DIR")
    main(*sys.argv[1:])
