#!/usr/bin/env bash
# Offline checks of Sluice's deployment material (deploy/): Kustomize renders and validates against the
# Kubernetes 1.32 schemas, YAML lint, Prometheus rules (syntax, unit tests, PrometheusRule kept in sync),
# dashboard PromQL, deployment invariants; optionally a live /metrics and the configuration files.
#
#   deploy/check.sh                                                     # from anywhere in the repository
#   SLUICE_METRICS_URL=http://127.0.0.1:9090/metrics deploy/check.sh   # also lint a live /metrics
#   SLUICE_BIN=target/debug/sluice deploy/check.sh                      # also load every sluice.toml
#
# Needs kubectl (v1.32, with Kustomize built in; it renders offline), python3 with venv, and for the first run
# PyPI and Debian's package archive: kubernetes-validate and yamllint go into a venv at target/deploy-venv,
# promtool (when not on PATH) is unpacked from Debian's `prometheus` package into target/promtool without
# installing the server. Later runs reuse both and need no network.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=target/deploy-venv
PROMTOOL_DIR=target/promtool
K8S_VERSION=1.32.0
PY_TOOLS=(kubernetes-validate==1.37.0 yamllint==1.38.0)

passed=0
step() {
  local name=$1
  shift
  echo "==> ${name}"
  if ! "$@"; then
    echo "deploy/check.sh: FAILED: ${name}" >&2
    echo "deploy: ${passed} passed, 1 failed"
    exit 1
  fi
  passed=$((passed + 1))
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# --- tools ------------------------------------------------------------------------------------------------

command -v kubectl >/dev/null || { echo "deploy/check.sh: kubectl is required (v1.32, Kustomize built in)" >&2; exit 1; }

if ! "$VENV/bin/python" -c 'import kubernetes_validate, yamllint' 2>/dev/null; then
  echo "==> installing ${PY_TOOLS[*]} into ${VENV}"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PY_TOOLS[@]}"
fi
PY="$VENV/bin/python"

if command -v promtool >/dev/null; then
  PROMTOOL=$(command -v promtool)
else
  PROMTOOL="$PROMTOOL_DIR/usr/bin/promtool"
  if ! [ -x "$PROMTOOL" ]; then
    echo "==> unpacking promtool from Debian's prometheus package into ${PROMTOOL_DIR}"
    # apt-get download writes to the current directory; as root it warns that _apt cannot write there.
    if ! (cd "$tmp" && apt-get download -q prometheus >/dev/null 2>&1); then
      apt-get update -q >/dev/null
      (cd "$tmp" && apt-get download -q prometheus >/dev/null 2>&1)
    fi
    dpkg -x "$tmp"/prometheus_*.deb "$tmp/prometheus"
    mkdir -p "$PROMTOOL_DIR/usr/bin"
    mv "$tmp/prometheus/usr/bin/promtool" "$PROMTOOL"
  fi
fi

# --- checks -----------------------------------------------------------------------------------------------

step "yamllint deploy/" "$VENV/bin/yamllint" --strict -c deploy/.yamllint.yaml deploy

step "PrometheusRule matches deploy/prometheus/rules.yaml" "$PY" deploy/scripts/deploy_check.py sync-rules
step "promtool check rules" "$PROMTOOL" check rules deploy/prometheus/rules.yaml
step "promtool test rules" "$PROMTOOL" test rules deploy/prometheus/rules.test.yaml

dashboard_exprs() {
  "$PY" deploy/scripts/deploy_check.py dashboard-rules "$tmp/dashboard-rules.yaml" &&
    "$PROMTOOL" check rules "$tmp/dashboard-rules.yaml"
}
step "dashboard PromQL parses" dashboard_exprs
step "rules and dashboard name declared series" "$PY" deploy/scripts/deploy_check.py metric-names

# CRDs (ScaledObject, TriggerAuthentication, ServiceMonitor, PrometheusRule) have no bundled schema:
# kubernetes-validate only warns about them, and deploy_check.py checks the fields that matter.
# Commands are chained with &&: `set -e` does not apply inside a function that `step` runs under `if`.
validate_kustomization() {
  local dir=$1 out
  out="$tmp/$(echo "$dir" | tr / _).yaml"
  kubectl kustomize "$dir" >"$out" &&
    "$VENV/bin/kubernetes-validate" --strict --quiet --no-warn -k "$K8S_VERSION" "$out" &&
    "$PY" deploy/scripts/deploy_check.py manifests "$out" "$dir"
}
for dir in deploy/kubernetes/base deploy/kubernetes/overlays/*/; do
  dir=${dir%/}
  step "kustomize + kubernetes-validate ${K8S_VERSION} + invariants: ${dir}" validate_kustomization "$dir"
done

# Opt-in (needs a built binary): SLUICE_BIN=target/debug/sluice deploy/check.sh
if [ -n "${SLUICE_BIN:-}" ]; then
  step "every deploy/**/sluice.toml loads in ${SLUICE_BIN}" "$PY" deploy/scripts/deploy_check.py config-loads "$SLUICE_BIN"
fi

if [ -n "${SLUICE_METRICS_URL:-}" ]; then
  check_metrics() {
    curl -fsS --max-time 10 "$SLUICE_METRICS_URL" >"$tmp/metrics.txt" &&
      "$PROMTOOL" check metrics <"$tmp/metrics.txt"
  }
  step "promtool check metrics ${SLUICE_METRICS_URL}" check_metrics
fi

echo "deploy: ${passed} passed, 0 failed"
