"""Write deploy/k8s/prometheusrule.yaml from deploy/prometheus/alerts.yml.

    python3 deploy/k8s/generate_prometheusrule.py          # rewrite prometheusrule.yaml
    python3 deploy/k8s/generate_prometheusrule.py --check  # exit 1 when it is stale

Why generated: the compose stack loads alerts.yml directly and the Prometheus Operator needs
the same groups wrapped in a PrometheusRule object. Keeping one source means a threshold tuned in
alerts.yml (and covered by promtool's alerts_test.yml) cannot silently differ in Kubernetes;
tests/test_deploy.py also compares the two parsed documents.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
ALERTS = HERE.parent / "prometheus" / "alerts.yml"
OUT = HERE / "prometheusrule.yaml"

HEADER = """\
# GENERATED from deploy/prometheus/alerts.yml by deploy/k8s/generate_prometheusrule.py: edit
# alerts.yml and regenerate. The Prometheus Operator loads these rules when your Prometheus
# selects this object (its ruleSelector; kube-prometheus-stack usually wants a
# `release: <helm release>` label added below).
"""


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the PromQL expressions) as literal blocks, so they stay readable."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    if "\n" in value:
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_Dumper.add_representer(str, _str)


def build(alerts_path: Path = ALERTS) -> dict[str, Any]:
    """The PrometheusRule object whose spec is exactly alerts.yml."""
    rules = yaml.safe_load(alerts_path.read_text())
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "streamer",
            "labels": {
                "app.kubernetes.io/name": "streamer",
                "app.kubernetes.io/component": "detector",
                "app.kubernetes.io/part-of": "streamer",
            },
        },
        "spec": {"groups": rules["groups"]},
    }


def render(alerts_path: Path = ALERTS) -> str:
    return HEADER + yaml.dump(build(alerts_path), Dumper=_Dumper, sort_keys=False, width=120, allow_unicode=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate the PrometheusRule from alerts.yml.")
    parser.add_argument("--check", action="store_true", help="exit 1 if prometheusrule.yaml is not what this script writes")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"stale: {OUT} (run python3 deploy/k8s/generate_prometheusrule.py)", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
