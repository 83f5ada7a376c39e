#!/usr/bin/env bash
# Renders the Helm chart's defaults into deploy/kubernetes/base/warbler.yaml, the plain
# manifests for `kubectl apply -k`. With --check, fails if the committed file differs from a
# fresh render (the chart changed and this was not rerun).
set -euo pipefail
cd "$(dirname "$0")"
out=kubernetes/base/warbler.yaml
render() {
    echo "# Rendered from deploy/helm/warbler with its default values by deploy/render.sh;"
    echo "# do not edit: change the chart and rerun the script (CI checks they match)."
    helm template warbler helm/warbler --namespace warbler
}
if [ "${1:-}" = --check ]; then
    if ! diff -u "$out" <(render) >&2; then
        echo "deploy/kubernetes/base/warbler.yaml is out of date with the chart: run bash deploy/render.sh and commit it" >&2
        exit 1
    fi
    echo "kustomize base matches the chart"
else
    render > "$out"
    echo "wrote deploy/$out"
fi
