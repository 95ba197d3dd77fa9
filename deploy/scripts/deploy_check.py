#!/usr/bin/env python3
"""Offline consistency checks of Sluice's deployment material, run by deploy/check.sh.

Subcommands (paths are relative to the repository root):

  sync-rules [--write]      deploy/prometheus/rules.yaml is the single source of the alerting rules;
                            base/monitoring/prometheusrule.yaml must carry the same groups as its .spec.
                            --write regenerates the PrometheusRule from rules.yaml.
  dashboard-rules OUT       writes every Grafana panel `expr` as a recording rule into OUT, so that
                            `promtool check rules OUT` parses the dashboard's PromQL.
  metric-names              every sluice_* series named by the rules or the dashboard is one that
                            shared/runtime/src/metrics.rs declares.
  config-loads BIN          the `sluice` binary BIN loads and validates every sluice.toml under
                            deploy/ (run with a Redis URL that fails to parse: it stops right after
                            loading the configuration, with no network).
  manifests FILE NAME       invariants of a rendered overlay (`kubectl kustomize … > FILE`) that no
                            schema checks: pod security, service links, grace periods against the
                            configuration, KEDA queue name, no committed Secret.

Needs PyYAML (installed with yamllint) and Python 3.11+ (tomllib).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy/prometheus/rules.yaml"
PROMETHEUS_RULE = ROOT / "deploy/kubernetes/base/monitoring/prometheusrule.yaml"
DASHBOARD = ROOT / "deploy/kubernetes/base/monitoring/dashboards/sluice-overview.json"
METRICS_RS = ROOT / "shared/runtime/src/metrics.rs"

PROMETHEUS_RULE_HEADER = """\
# GENERATED from deploy/prometheus/rules.yaml (the single source, unit-tested by rules.test.yaml).
# Do not edit: change rules.yaml, then run
#   target/deploy-venv/bin/python deploy/scripts/deploy_check.py sync-rules --write
# kube-prometheus-stack only loads it with its release label: the overlay adds that label.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: sluice
  labels:
    app.kubernetes.io/name: sluice
spec:
"""

# Grafana variables that stand where PromQL needs a duration; the others sit inside label matchers.
GRAFANA_DURATIONS = ("$__rate_interval", "$__interval", "$__range", "${__rate_interval}", "${__interval}")


def fail(message: str) -> None:
    print(f"deploy_check: {message}", file=sys.stderr)
    sys.exit(1)


def rules_body() -> str:
    """rules.yaml without its leading comment block."""
    lines = RULES.read_text().splitlines(keepends=True)
    while lines and (lines[0].startswith("#") or not lines[0].strip()):
        lines.pop(0)
    return "".join(lines)


def sync_rules(write: bool) -> None:
    source = yaml.safe_load(RULES.read_text())
    if write:
        body = "".join(f"  {line}" if line.strip() else line for line in rules_body().splitlines(keepends=True))
        PROMETHEUS_RULE.write_text(PROMETHEUS_RULE_HEADER + body)
        print(f"wrote {PROMETHEUS_RULE.relative_to(ROOT)}")
    crd = yaml.safe_load(PROMETHEUS_RULE.read_text())
    if crd.get("kind") != "PrometheusRule":
        fail(f"{PROMETHEUS_RULE} is not a PrometheusRule")
    if crd.get("spec") != source:
        fail(
            f"{PROMETHEUS_RULE.relative_to(ROOT)} differs from {RULES.relative_to(ROOT)}: "
            "run `target/deploy-venv/bin/python deploy/scripts/deploy_check.py sync-rules --write`"
        )
    print("PrometheusRule .spec matches deploy/prometheus/rules.yaml")


def panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard.get("panels", []):
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows hold their panels
    return out


def dashboard_exprs() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = []
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            if "expr" in target:
                exprs.append((f"{panel.get('title', '?')} [{target.get('refId', '?')}]", target["expr"]))
    if not exprs:
        fail(f"no panel expr found in {DASHBOARD}")
    return exprs


def dashboard_rules(out: Path) -> None:
    rules = []
    for i, (where, expr) in enumerate(dashboard_exprs()):
        for var in GRAFANA_DURATIONS:
            expr = expr.replace(var, "5m")
        if "$" in re.sub(r'"[^"]*"', '""', expr):
            fail(f"panel {where}: a Grafana variable outside a label matcher: {expr}")
        rules.append({"record": f"dashboard:expr_{i}", "expr": expr})
    out.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, sort_keys=False))
    print(f"{len(rules)} dashboard expressions written to {out}")


def declared_metrics() -> set[str]:
    """Series names declared in shared/runtime/src/metrics.rs (registry prefix `sluice`)."""
    src = METRICS_RS.read_text()
    names = set()
    for kind, name in re.findall(
        r'\b(Opts|HistogramOpts|IntGauge|IntCounter|Gauge|Counter)::new\(\s*"([a-z_:][a-z0-9_:]*)"', src
    ):
        full = f"sluice_{name}"
        if kind == "HistogramOpts":
            names.update({f"{full}_bucket", f"{full}_sum", f"{full}_count"})
        else:
            names.add(full)
    if "ProcessCollector" in src and 'new_custom(Some("sluice"' in src:
        # The registry prefix applies to the process collector's series too.
        names.update(
            f"sluice_process_{n}"
            for n in (
                "cpu_seconds_total",
                "open_fds",
                "max_fds",
                "resident_memory_bytes",
                "virtual_memory_bytes",
                "start_time_seconds",
                "threads",
            )
        )
    if len(names) < 10:
        fail(f"found only {sorted(names)} in {METRICS_RS}: has its layout changed?")
    return names


def metric_names() -> None:
    declared = declared_metrics()
    used: dict[str, str] = {}
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            for name in re.findall(r"\bsluice_[a-z0-9_]+", rule["expr"]):
                used.setdefault(name, f"rule {rule.get('alert') or rule.get('record')}")
    for where, expr in dashboard_exprs():
        for name in re.findall(r"\bsluice_[a-z0-9_]+", expr):
            used.setdefault(name, f"panel {where}")
    unknown = {name: where for name, where in used.items() if name not in declared}
    if unknown:
        fail("series not declared in shared/runtime/src/metrics.rs: " + ", ".join(f"{n} ({w})" for n, w in unknown.items()))
    print(f"{len(used)} sluice_* series used by rules and dashboard, all declared in shared/runtime/src/metrics.rs")


def config_loads(binary: str) -> None:
    files = sorted((ROOT / "deploy").rglob("sluice.toml"))
    problems = []
    for file in files:
        settings = tomllib.loads(file.read_text())
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            # Unparseable: `sluice api` exits at its first connection, right after loading the config.
            "SLUICE_REDIS_URL": "not-a-redis-url",
        }
        for provider in settings.get("providers", []):
            if provider.get("api_key_env"):
                env[provider["api_key_env"]] = "placeholder"
        result = subprocess.run(
            [binary, "api", "--config", str(file)], env=env, capture_output=True, text=True, timeout=30
        )
        out = result.stdout + result.stderr
        if "Failed to connect to Redis" not in out:
            problems.append(f"{file.relative_to(ROOT)}: {out.strip().splitlines()[0] if out.strip() else result.returncode}")
    if problems:
        fail("configuration refused by " + binary + ":\n  - " + "\n  - ".join(problems))
    print(f"{len(files)} configuration files load: " + ", ".join(str(f.relative_to(ROOT)) for f in files))


def manifests(path: Path, name: str) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    problems: list[str] = []
    by_kind: dict[str, list[dict]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)

    if by_kind.get("Secret"):
        problems.append("renders a Secret: secret values must not be committed (reference Secrets by name)")

    configs = [c for c in by_kind.get("ConfigMap", []) if "sluice.toml" in c.get("data", {})]
    if len(configs) != 1:
        problems.append(f"expected one ConfigMap holding sluice.toml, found {len(configs)}")
        settings: dict = {}
    else:
        settings = tomllib.loads(configs[0]["data"]["sluice.toml"])
    worker = settings.get("worker", {})
    request_timeout_s = worker.get("request_timeout_ms", 600_000) / 1000
    shutdown_grace_s = worker.get("shutdown_grace_ms", 30_000) / 1000
    if settings.get("storage", {}).get("kind", "local") != "s3":
        problems.append("sluice.toml storage is not s3: pods do not share a local path (or an emptyDir)")

    deployments = {d["metadata"]["name"]: d for d in by_kind.get("Deployment", [])}
    if set(deployments) != {"sluice-api", "sluice-worker", "sluice-aggregator"}:
        problems.append(f"unexpected Deployments {sorted(deployments)}")
    for dname, dep in deployments.items():
        pod = dep["spec"]["template"]["spec"]
        where = f"Deployment {dname}"
        if pod.get("enableServiceLinks") is not False:
            problems.append(f"{where}: enableServiceLinks must be false (SLUICE_*_SERVICE_* vars break config loading)")
        psc = pod.get("securityContext", {})
        if psc.get("runAsNonRoot") is not True:
            problems.append(f"{where}: pod securityContext.runAsNonRoot is not true")
        for c in pod["containers"]:
            csc = c.get("securityContext", {})
            if csc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}/{c['name']}: readOnlyRootFilesystem is not true")
            if csc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}/{c['name']}: allowPrivilegeEscalation is not false")
            if "ALL" not in csc.get("capabilities", {}).get("drop", []):
                problems.append(f"{where}/{c['name']}: capabilities do not drop ALL")
            res = c.get("resources", {})
            for part in ("requests", "limits"):
                if not {"cpu", "memory"} <= set(res.get(part, {})):
                    problems.append(f"{where}/{c['name']}: resources.{part} lacks cpu or memory")
            for probe in ("livenessProbe", "readinessProbe"):
                if probe not in c:
                    problems.append(f"{where}/{c['name']}: no {probe}")
            if c.get("livenessProbe", {}).get("httpGet", {}).get("path") != "/livez":
                problems.append(f"{where}/{c['name']}: livenessProbe is not /livez")
            if c.get("readinessProbe", {}).get("httpGet", {}).get("path") != "/readyz":
                problems.append(f"{where}/{c['name']}: readinessProbe is not /readyz")
            args = c.get("args", [])
            if "--config" not in args:
                problems.append(f"{where}/{c['name']}: no --config argument (SLUICE_CONFIG is refused as a config key)")
            for env in c.get("env", []):
                if env["name"] in ("SLUICE_AMQP_URL", "SLUICE_REDIS_URL") and "value" in env:
                    problems.append(f"{where}/{c['name']}: {env['name']} has a literal value, not a secretKeyRef")
                if env["name"] == "SLUICE_CONFIG":
                    problems.append(f"{where}/{c['name']}: SLUICE_CONFIG is read as an unknown config key")
        grace = pod.get("terminationGracePeriodSeconds", 30)
        if dname == "sluice-worker" and grace <= request_timeout_s + shutdown_grace_s:
            problems.append(
                f"{where}: terminationGracePeriodSeconds {grace} must exceed worker.request_timeout_ms "
                f"+ worker.shutdown_grace_ms ({request_timeout_s + shutdown_grace_s:.0f} s)"
            )
        if dname == "sluice-api" and grace < 60:
            problems.append(f"{where}: terminationGracePeriodSeconds {grace} < 60")

    if "HorizontalPodAutoscaler" in by_kind:
        targets = {h["spec"]["scaleTargetRef"]["name"] for h in by_kind["HorizontalPodAutoscaler"]}
        if targets != {"sluice-api"}:
            problems.append(f"HPAs target {sorted(targets)}; only sluice-api has one (KEDA owns the worker's)")
    scaled = by_kind.get("ScaledObject", [])
    if len(scaled) != 1:
        problems.append(f"expected one ScaledObject, found {len(scaled)}")
    else:
        queue = f"{settings.get('namespace', 'sluice')}.items"
        for trigger in scaled[0]["spec"]["triggers"]:
            meta = trigger.get("metadata", {})
            if trigger.get("type") == "rabbitmq":
                if meta.get("protocol") != "http":
                    problems.append("ScaledObject rabbitmq trigger: protocol must be http (counts unacked lines)")
                if meta.get("queueName") != queue:
                    problems.append(
                        f"ScaledObject rabbitmq trigger watches {meta.get('queueName')!r}, "
                        f"but sluice.toml namespace gives {queue!r}"
                    )
    for kind in ("PodDisruptionBudget", "Service", "ServiceMonitor", "PrometheusRule"):
        if kind not in by_kind:
            problems.append(f"no {kind}")
    dashboards = [
        c for c in by_kind.get("ConfigMap", []) if c["metadata"].get("labels", {}).get("grafana_dashboard") == "1"
    ]
    if len(dashboards) != 1:
        problems.append(f"expected one ConfigMap labelled grafana_dashboard: \"1\", found {len(dashboards)}")

    if problems:
        fail(f"{name}:\n  - " + "\n  - ".join(problems))
    print(f"{name}: {len(docs)} objects, deployment invariants hold")


def main(argv: list[str]) -> None:
    if len(argv) >= 1 and argv[0] == "sync-rules":
        sync_rules(write="--write" in argv[1:])
    elif len(argv) == 2 and argv[0] == "dashboard-rules":
        dashboard_rules(Path(argv[1]))
    elif len(argv) == 1 and argv[0] == "metric-names":
        metric_names()
    elif len(argv) == 2 and argv[0] == "config-loads":
        config_loads(argv[1])
    elif len(argv) == 3 and argv[0] == "manifests":
        manifests(Path(argv[1]), argv[2])
    else:
        fail(__doc__ or "usage")


if __name__ == "__main__":
    main(sys.argv[1:])
