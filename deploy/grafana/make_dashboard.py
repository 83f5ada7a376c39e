#!/usr/bin/env python3
"""Writes deploy/grafana/warbler.json, the Grafana dashboard (rerun after editing this file).

Every expression names metrics a node exports at /metrics (docs/operations.md); the test
suite checks each one exists on a live cluster node.
"""
import json
import os

DS = {"type": "prometheus", "uid": "${datasource}"}
panels = []
y = 0


def row(title):
    global y
    panels.append({"type": "row", "title": title, "collapsed": False,
                   "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "id": len(panels) + 1, "panels": []})
    y += 1


def panel(kind, title, exprs, x, w, h=7, unit=None, desc=""):
    p = {
        "type": kind, "title": title, "description": desc, "datasource": DS, "id": len(panels) + 1,
        "gridPos": {"h": h, "w": w, "x": x, "y": y},
        "targets": [{"refId": chr(65 + i), "expr": e, "legendFormat": l, "datasource": DS}
                    for i, (e, l) in enumerate(exprs)],
        "fieldConfig": {"defaults": {"unit": unit or "short"}, "overrides": []},
        "options": {},
    }
    if kind == "stat":
        p["fieldConfig"]["defaults"]["thresholds"] = {
            "mode": "absolute", "steps": [{"color": "green", "value": None}, {"color": "red", "value": 1}]}
        p["options"] = {"colorMode": "background", "graphMode": "none", "reduceOptions": {"calcs": ["lastNotNull"]}}
    panels.append(p)


def next_row(h=7):
    global y
    y += h


row("Cluster health")
panel("stat", "Members up", [('max(warbler_cluster_members{state="up"})', "up")], 0, 4,
      desc="Members of the member list alive in gossip, as the nodes see it")
panels[-1]["fieldConfig"]["defaults"]["thresholds"]["steps"] = [{"color": "green", "value": None}]
panel("stat", "Members down", [('max(warbler_cluster_members{state="down"})', "down")], 4, 4)
panel("stat", "Leaderless partitions", [("max(warbler_partitions_leaderless)", "leaderless")], 8, 4,
      desc="Partitions with no leader: their users can neither publish nor receive")
panel("stat", "Under-replicated partitions", [("sum(warbler_partitions_under_replicated)", "under-replicated")], 12, 4)
panel("timeseries", "Leadership changes", [("sum by (instance) (increase(warbler_leaderships_gained_total[5m]))", "{{instance}}")], 16, 8,
      desc="Partitions whose leadership moved to each node, per 5 minutes")
next_row()
panel("timeseries", "Partitions led per node", [("warbler_partitions_led", "{{instance}}")], 0, 12)
panel("timeseries", "Replicas held per node", [("warbler_replicas_held", "{{instance}}"),
                                               ("warbler_decommissioning", "decommissioning {{instance}}")], 12, 12)
next_row()
row("Connections")
panel("timeseries", "Open device connections", [("sum by (instance) (warbler_connections)", "{{instance}}")], 0, 12)
panel("timeseries", "Connections accepted and refused", [
    ("sum by (instance) (rate(warbler_connections_total[5m]))", "accepted {{instance}}"),
    ("sum by (instance, reason) (rate(warbler_connections_refused_total[5m]))", "refused {{instance}} {{reason}}"),
    ("sum by (instance) (rate(warbler_slow_consumers_closed_total[5m]))", "slow consumers closed {{instance}}"),
], 12, 12, unit="ops")
next_row()
row("Throughput")
panel("timeseries", "Messages", [
    ("sum(rate(warbler_publishes_total[1m]))", "published (durable)"),
    ("sum(rate(warbler_deliveries_total[1m]))", "delivered"),
    ("sum(rate(warbler_acks_total[1m]))", "acked"),
], 0, 12, unit="ops")
panel("timeseries", "Publishes refused", [
    ("sum(rate(warbler_publish_errors_total[1m]))", "errors"),
    ("sum(rate(warbler_publishes_rate_limited_total[1m]))", "rate limited"),
    ("sum(rate(warbler_publish_storage_full_total[1m]))", "storage full"),
    ("sum(rate(warbler_publish_mailbox_full_total[1m]))", "mailbox full"),
], 12, 12, unit="ops")
next_row()
row("Latency")
panel("timeseries", "Publish latency (accepted → durable)", [
    ('max(warbler_publish_seconds{quantile="0.5"})', "p50"),
    ('max(warbler_publish_seconds{quantile="0.99"})', "p99"),
], 0, 12, unit="s")
panel("timeseries", "Delivery latency (published → handed to the device)", [
    ('max(warbler_delivery_seconds{quantile="0.5"})', "p50"),
    ('max(warbler_delivery_seconds{quantile="0.99"})', "p99"),
], 12, 12, unit="s")
next_row()
row("Replication")
panel("timeseries", "Replication lag (entries, worst follower of the groups each node leads)",
      [("warbler_replication_lag_entries", "{{instance}}")], 0, 8)
panel("timeseries", "Raft log sync", [('max by (instance) (warbler_raft_sync_seconds{quantile="0.99"})', "p99 {{instance}}"),
                                      ("sum by (instance) (rate(warbler_raft_syncs_total[1m]))", "syncs/s {{instance}}")], 8, 8)
panel("timeseries", "Quiet partitions", [("sum by (role) (warbler_partitions_quiet)", "{{role}}")], 16, 8)
next_row()
row("Storage")
panel("timeseries", "Free disk", [("warbler_storage_free_bytes", "{{instance}}")], 0, 8, unit="bytes")
panel("timeseries", "fsync (single node)", [('max by (instance) (warbler_fsync_seconds{quantile="0.99"})', "p99 {{instance}}")], 8, 8, unit="s")
panel("stat", "Nodes below the watermark", [("sum(warbler_storage_full)", "full")], 16, 8)
next_row()
row("Process")
panel("timeseries", "CPU", [("rate(process_cpu_seconds_total[1m])", "{{instance}}")], 0, 8, unit="percentunit")
panel("timeseries", "Resident memory", [("process_resident_memory_bytes", "{{instance}}")], 8, 8, unit="bytes")
panel("timeseries", "Open files / limit", [("process_open_fds / process_max_fds", "{{instance}}")], 16, 8, unit="percentunit")
next_row()

dashboard = {
    "title": "Warbler",
    "uid": "warbler-cluster",
    "tags": ["warbler"],
    "timezone": "browser",
    "schemaVersion": 39,
    "version": 1,
    "refresh": "30s",
    "time": {"from": "now-1h", "to": "now"},
    "templating": {"list": [{
        "name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source",
        "current": {"text": "Prometheus", "value": "prometheus"},
    }]},
    "panels": panels,
}
out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "warbler.json")
with open(out, "w") as f:
    json.dump(dashboard, f, indent=2)
    f.write("\n")
print(f"wrote {out}: {len(panels)} panels")
