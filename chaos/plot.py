#!/usr/bin/env python3
"""Plots one chaos run: acknowledged publishes per second and publish→delivery latency
over time, with every fault's window shaded.

    python3 chaos/plot.py RESULT_JSON OUT_PNG
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"kill": "#d62728", "pause": "#ff7f0e", "isolate": "#9467bd",
          "partition": "#8c564b", "restart": "#2ca02c"}


def plot(result, out):
    c = result["check"]
    tl = c["timeline"]
    t = [b["t"] for b in tl]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 5.5), sharex=True)
    top.plot(t, [b["acked"] for b in tl], label="acknowledged/s", color="#1f77b4")
    top.plot(t, [b["delivered"] for b in tl], label="deliveries/s", color="#17becf", alpha=0.7)
    top.plot(t, [b["errors"] for b in tl], label="failed or unknown attempts/s", color="#7f7f7f")
    top.set_ylabel("per second")
    bottom.plot(t, [max(b["p50_ms"], 0.1) for b in tl], label="p50", color="#1f77b4")
    bottom.plot(t, [max(b["p99_ms"], 0.1) for b in tl], label="p99", color="#d62728")
    bottom.set_yscale("log")
    bottom.set_ylabel("publish→delivery (ms)")
    bottom.set_xlabel("seconds into the run")
    seen = set()
    for f in c["faults"]:
        start, end = f["t"] / 1e3, max(f["end"], f["t"] + 300) / 1e3
        color = COLORS.get(f["action"], "#bcbd22")
        label = f["action"] if f["action"] not in seen else None
        seen.add(f["action"])
        for ax in (top, bottom):
            ax.axvspan(start, end, color=color, alpha=0.25, label=label if ax is top else None)
    verdict = "valid" if c["valid"] else "INVALID"
    top.set_title(f"{result['scenario']} (seed {result['seed']}, {result['nodes']} nodes): {verdict}")
    top.legend(loc="upper right", fontsize=8)
    bottom.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=90)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: plot.py RESULT_JSON OUT_PNG")
    with open(sys.argv[1]) as f:
        plot(json.load(f), sys.argv[2])
