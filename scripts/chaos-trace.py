#!/usr/bin/env python3
"""Follows publishes through the node logs of one chaos run, to explain a send order
violation. The nodes must have logged at debug for `warbler_actors::mailbox` and
`warbler::gateway::conn` (the `overload` scenario does).

    python3 scripts/chaos-trace.py RUN_DIR            # the run's send order violations
    python3 scripts/chaos-trace.py RUN_DIR ID [ID...]  # these publishes

For each publish it prints, in time order across the nodes, every mailbox that took it
(user, seq, the publish it followed and whether that one was pending in the same mailbox,
the mailbox's term), every refusal and every answer a gateway sent, and the mailbox starts
and stops of its user. Then it checks the rule the leaders keep: a publish stored at a seq,
taken after one that was pending in the same mailbox, has that one stored at the seq the
mailbox gave it. It names the stored publishes for which no mailbox that took them keeps
the rule (what the devices received tells what was stored where).
"""
import glob
import json
import os
import re
import sys

TAKEN = re.compile(
    r'publish taken user=(\S+) id=(\S+) seq=(\d+)(?: after="([^"]+)")? after_pending=(\w+)'
)
START = re.compile(r"mailbox starts user=(\S+)")
STOP = re.compile(r"mailbox stops user=(\S+)")
VIOLATION = re.compile(r"(\S+): (p\d+-\d+) got seq \d+, yet (p\d+-\d+), sent before it")


def node_logs(run):
    logs = sorted(glob.glob(os.path.join(run, "cluster", "*", "node.log")))
    if not logs:
        sys.exit(f"error: no node logs under {run}/cluster; give the directory of one run")
    return logs


def stored(run):
    """(user, seq) -> id, from what the devices received."""
    out = {}
    with open(os.path.join(run, "history.jsonl")) as f:
        for line in f:
            e = json.loads(line)
            if e.get("e") == "deliver":
                out[(e["user"], e["seq"])] = e["id"]
    return out


def follow(run, ids):
    users = set()
    lines = []
    for path in node_logs(run):
        node = os.path.basename(os.path.dirname(path))
        with open(path, errors="replace") as f:
            for line in f:
                if any(f"id={i} " in line or f'"{i}"' in line for i in ids):
                    lines.append((line[:27], node, line[28:].rstrip()))
                    m = re.search(r"(?:user|to)=(\S+)", line)
                    if m:
                        users.add(m.group(1))
    for path in node_logs(run):
        node = os.path.basename(os.path.dirname(path))
        with open(path, errors="replace") as f:
            for line in f:
                m = START.search(line) or STOP.search(line)
                if m and m.group(1) in users:
                    lines.append((line[:27], node, line[28:].rstrip()))
    for t, node, text in sorted(lines):
        print(f"{t} {node} {text}")


def check(run):
    at = stored(run)
    kept = {}
    for path in node_logs(run):
        node = os.path.basename(os.path.dirname(path))
        mailbox = {}
        with open(path, errors="replace") as f:
            for line in f:
                m = START.search(line)
                if m:
                    mailbox[m.group(1)] = {}
                    continue
                m = TAKEN.search(line)
                if not m:
                    continue
                user, pid, seq, after, pending = m.groups()
                seq = int(seq)
                taken = mailbox.setdefault(user, {})
                taken[pid] = seq
                if at.get((user, seq)) != pid:
                    continue
                ok = not (after and pending == "true") or at.get((user, taken[after])) == after
                kept.setdefault((user, pid, seq), []).append((node, ok))
    broken = [k for k, v in kept.items() if not any(ok for _, ok in v)]
    print(f"{len(kept)} stored publishes checked, {len(broken)} taken only against the rule")
    for user, pid, seq in broken[:20]:
        print(f"  {user}: {pid} stored at {seq}, taken after one that was not stored where it was pending")
    return broken


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    run = sys.argv[1]
    ids = sys.argv[2:]
    if not ids:
        with open(os.path.join(run, "result.json")) as f:
            examples = json.load(f)["check"]["examples"]
        for e in examples:
            m = VIOLATION.search(e)
            if m:
                ids.extend([m.group(2), m.group(3)])
        if not ids:
            print("no send order violation in this run")
    if ids:
        follow(run, ids)
    check(run)


if __name__ == "__main__":
    main()
