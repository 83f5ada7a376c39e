#!/usr/bin/env python3
"""Policy checks over rendered Kubernetes manifests (the Helm chart, the kustomize overlays).

    python3 deploy/tests/policy.py FILE.yaml...    # check each file; exit 1 on a violation
    python3 deploy/tests/policy.py --self-test FILE.yaml
        # breaks FILE (the default render) in each way a check guards against and fails
        # unless every break is caught

What is checked is what a Raft-style StatefulSet needs (docs/deploy.md): parallel pod
management, a headless peer Service that lists unready pods, a separate client Service of
ready pods, probes on the right paths, a termination grace period that covers the node's
drain, non-root with a read-only root filesystem, a PDB of one, a NetworkPolicy that keeps
the cluster port to the set's own pods, and an autoscaler that never scales in.
"""
import copy
import sys

import yaml

# The node's drain after SIGTERM (src/node.rs, drain_budget): 3 election timeouts of
# handover, the lame-duck window, then 4 grace steps of 2 s.
DRAIN_GRACE_STEPS_S = 8
STARTUP_BUDGET_MIN_S = 300


def env_of(container):
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def labels_match(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


def check(docs):
    """Returns the list of violations in one rendered set of manifests."""
    bad = []
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    sets = by_kind.get("StatefulSet", [])
    if len(sets) != 1:
        return [f"expected one StatefulSet, found {len(sets)}"]
    sts = sets[0]
    spec = sts["spec"]
    pod = spec["template"]["spec"]
    pod_labels = spec["template"]["metadata"]["labels"]
    if spec.get("podManagementPolicy") != "Parallel":
        bad.append("StatefulSet: podManagementPolicy must be Parallel (bootstrap needs every pod up at once)")
    if not labels_match(spec["selector"]["matchLabels"], pod_labels):
        bad.append("StatefulSet: selector does not match the pod template's labels")
    if not spec.get("volumeClaimTemplates"):
        bad.append("StatefulSet: no volumeClaimTemplates (each pod needs its own disk)")
    if "persistentVolumeClaimRetentionPolicy" not in spec:
        bad.append("StatefulSet: persistentVolumeClaimRetentionPolicy is not set")
    services = {s["metadata"]["name"]: s for s in by_kind.get("Service", [])}
    peers = services.get(spec.get("serviceName"))
    if peers is None:
        bad.append(f"StatefulSet: serviceName {spec.get('serviceName')!r} names no Service")
    else:
        if peers["spec"].get("clusterIP") != "None":
            bad.append("peer Service must be headless (clusterIP: None)")
        if peers["spec"].get("publishNotReadyAddresses") is not True:
            bad.append("peer Service must set publishNotReadyAddresses: true (a forming cluster's pods are not ready)")
    clients = [s for n, s in services.items() if peers is None or n != peers["metadata"]["name"]]
    if not clients:
        bad.append("no client Service besides the peer Service")
    for s in clients:
        if s["spec"].get("clusterIP") == "None" or s["spec"].get("publishNotReadyAddresses"):
            bad.append(f"client Service {s['metadata']['name']}: must route to ready pods only")
    for s in services.values():
        if not labels_match(s["spec"].get("selector", {}), pod_labels):
            bad.append(f"Service {s['metadata']['name']}: selector does not match the pods")
    containers = [c for c in pod["containers"] if c["name"] == "warbler"]
    if not containers:
        return bad + ["StatefulSet: no container named warbler"]
    c = containers[0]
    env = env_of(c)
    if env.get("WARBLER_NODE_ID") != "$(POD_NAME)":
        bad.append("WARBLER_NODE_ID must be the pod name")
    if peers is not None:
        name = peers["metadata"]["name"]
        if not (env.get("WARBLER_ADVERTISE_HOST") or "").startswith(f"$(POD_NAME).{name}."):
            bad.append("WARBLER_ADVERTISE_HOST must be the pod's DNS name under the peer Service")
        if not (env.get("WARBLER_SEEDS") or "").startswith(f"{name}."):
            bad.append("WARBLER_SEEDS must be the peer Service's DNS name")
    probes = {k: c.get(k) for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    want = {"startupProbe": "/healthz", "readinessProbe": "/readyz", "livenessProbe": "/healthz"}
    for k, path in want.items():
        p = probes[k]
        if not p or p.get("httpGet", {}).get("path") != path:
            bad.append(f"{k} must GET {path}")
    s = probes["startupProbe"] or {}
    if s.get("periodSeconds", 10) * s.get("failureThreshold", 3) < STARTUP_BUDGET_MIN_S:
        bad.append(f"startupProbe budget under {STARTUP_BUDGET_MIN_S} s (a large log replays slowly)")
    grace = pod.get("terminationGracePeriodSeconds", 30)
    pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    election_ms = int(env.get("WARBLER_RAFT_ELECTION_TIMEOUT_MS") or 1000)
    lame_duck_ms = int(env.get("WARBLER_LAME_DUCK_MS") or 5000)
    drain_s = pre_stop + (3 * election_ms + lame_duck_ms) / 1000 + DRAIN_GRACE_STEPS_S
    if grace <= drain_s:
        bad.append(f"terminationGracePeriodSeconds {grace} does not exceed preStop + drain = {drain_s:.1f} s")
    psc = pod.get("securityContext", {})
    csc = c.get("securityContext", {})
    if not psc.get("runAsNonRoot") or psc.get("runAsUser", 0) == 0:
        bad.append("pod must run as a non-root user (runAsNonRoot, runAsUser != 0)")
    if not csc.get("readOnlyRootFilesystem"):
        bad.append("container must have a read-only root filesystem")
    if csc.get("allowPrivilegeEscalation") is not False:
        bad.append("container must set allowPrivilegeEscalation: false")
    if not c.get("resources", {}).get("requests"):
        bad.append("container has no resource requests")
    for pdb in by_kind.get("PodDisruptionBudget", []):
        if pdb["spec"].get("maxUnavailable") != 1:
            bad.append("PodDisruptionBudget must be maxUnavailable: 1")
        if not labels_match(pdb["spec"]["selector"]["matchLabels"], pod_labels):
            bad.append("PodDisruptionBudget selector does not match the pods")
    cluster_ports = {p["containerPort"] for p in c["ports"] if p["name"] in ("cluster", "gossip")}
    for np in by_kind.get("NetworkPolicy", []):
        if not labels_match(np["spec"]["podSelector"]["matchLabels"], pod_labels):
            bad.append("NetworkPolicy does not select the pods")
        for rule in np["spec"].get("ingress", []):
            ports = {p.get("port") for p in rule.get("ports", [])}
            if not ports & cluster_ports:
                continue
            sources = rule.get("from") or []
            own = sources and all(
                "podSelector" in f and "namespaceSelector" not in f
                and labels_match(f["podSelector"].get("matchLabels", {}), pod_labels)
                for f in sources
            )
            if not own:
                bad.append("NetworkPolicy lets others than the set's own pods reach the cluster port")
    for hpa in by_kind.get("HorizontalPodAutoscaler", []):
        ref = hpa["spec"]["scaleTargetRef"]
        if ref["kind"] != "StatefulSet" or ref["name"] != sts["metadata"]["name"]:
            bad.append("HorizontalPodAutoscaler does not target the StatefulSet")
        down = hpa["spec"].get("behavior", {}).get("scaleDown", {})
        if down.get("selectPolicy") != "Disabled":
            bad.append("HorizontalPodAutoscaler must not scale in (scaleDown.selectPolicy: Disabled)")
        if "replicas" in spec:
            bad.append("with an autoscaler the StatefulSet must not set replicas (an upgrade would reset it)")
    for cj in by_kind.get("CronJob", []):
        name = cj["metadata"]["name"]
        if cj["spec"].get("concurrencyPolicy") != "Forbid":
            bad.append(f"CronJob {name}: concurrencyPolicy must be Forbid (two backups at once)")
        job_pod = cj["spec"]["jobTemplate"]["spec"]["template"]
        job_labels = job_pod["metadata"].get("labels", {})
        for s in services.values():
            if labels_match(s["spec"].get("selector", {}), job_labels):
                bad.append(f"CronJob {name}: its pods match Service {s['metadata']['name']} (clients would reach a backup job)")
        jsc = job_pod["spec"].get("securityContext", {})
        if not jsc.get("runAsNonRoot") or jsc.get("runAsUser", 0) == 0:
            bad.append(f"CronJob {name}: pods must run as a non-root user")
        for jc in job_pod["spec"]["containers"]:
            if not jc.get("securityContext", {}).get("readOnlyRootFilesystem"):
                bad.append(f"CronJob {name}: container {jc['name']} must have a read-only root filesystem")
    return bad


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def breaks():
    """(what, how) pairs: each mutation of a good render one check must catch."""
    def sts(docs):
        return next(d for d in docs if d["kind"] == "StatefulSet")

    def container(docs):
        return sts(docs)["spec"]["template"]["spec"]["containers"][0]

    def peer_service(docs):
        name = sts(docs)["spec"]["serviceName"]
        return next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == name)

    def set_env(docs, name, value):
        for e in container(docs)["env"]:
            if e["name"] == name:
                e["value"] = value

    return [
        ("OrderedReady", lambda d: sts(d)["spec"].__setitem__("podManagementPolicy", "OrderedReady")),
        ("peers not listing unready pods", lambda d: peer_service(d)["spec"].pop("publishNotReadyAddresses")),
        ("peers not headless", lambda d: peer_service(d)["spec"].pop("clusterIP")),
        ("readiness on /healthz", lambda d: container(d)["readinessProbe"]["httpGet"].__setitem__("path", "/healthz")),
        ("liveness on /readyz", lambda d: container(d)["livenessProbe"]["httpGet"].__setitem__("path", "/readyz")),
        ("short grace", lambda d: sts(d)["spec"]["template"]["spec"].__setitem__("terminationGracePeriodSeconds", 10)),
        ("long lame duck", lambda d: set_env(d, "WARBLER_LAME_DUCK_MS", "60000")),
        ("root", lambda d: sts(d)["spec"]["template"]["spec"]["securityContext"].__setitem__("runAsUser", 0)),
        ("writable root", lambda d: container(d)["securityContext"].__setitem__("readOnlyRootFilesystem", False)),
        ("selector mismatch", lambda d: sts(d)["spec"]["selector"]["matchLabels"].__setitem__("app.kubernetes.io/name", "other")),
        ("PDB of two", lambda d: next(x for x in d if x["kind"] == "PodDisruptionBudget")["spec"].__setitem__("maxUnavailable", 2)),
        ("cluster port open", lambda d: next(x for x in d if x["kind"] == "NetworkPolicy")["spec"]["ingress"][0].pop("from")),
        ("node id not the pod name", lambda d: set_env(d, "WARBLER_NODE_ID", "warbler")),
    ]


def cronjob_breaks():
    """Breaks of a render with the backup CronJob."""
    def cj(docs):
        return next(d for d in docs if d["kind"] == "CronJob")

    def job_pod(docs):
        return cj(docs)["spec"]["jobTemplate"]["spec"]["template"]

    def sts_labels(docs):
        sts = next(d for d in docs if d["kind"] == "StatefulSet")
        return dict(sts["spec"]["selector"]["matchLabels"])

    return [
        ("backups at once", lambda d: cj(d)["spec"].__setitem__("concurrencyPolicy", "Allow")),
        ("backup pod behind the Services", lambda d: job_pod(d)["metadata"].__setitem__("labels", sts_labels(d))),
        ("backup as root", lambda d: job_pod(d)["spec"]["securityContext"].__setitem__("runAsUser", 0)),
        ("backup with a writable root", lambda d: job_pod(d)["spec"]["containers"][0]["securityContext"].__setitem__("readOnlyRootFilesystem", False)),
    ]


def main(argv):
    if argv and argv[0] == "--self-test":
        good = load(argv[1])
        assert not check(good), f"the good render fails: {check(good)}"
        cases = breaks()
        if any(d["kind"] == "CronJob" for d in good):
            cases += cronjob_breaks()
        missed = []
        for what, mutate in cases:
            docs = copy.deepcopy(good)
            mutate(docs)
            if not check(docs):
                missed.append(what)
        if missed:
            print(f"policy self-test: not caught: {', '.join(missed)}", file=sys.stderr)
            return 1
        print(f"policy self-test: all {len(cases)} broken manifests caught in {argv[1]}")
        return 0
    failed = False
    for path in argv:
        bad = check(load(path))
        for b in bad:
            print(f"{path}: {b}", file=sys.stderr)
        failed |= bool(bad)
        if not bad:
            print(f"policy: {path} ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
