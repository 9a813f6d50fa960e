"""Grafana dashboards for the streamer daemon, as code.

    python3 deploy/grafana/generate.py          # (re)write deploy/grafana/dashboards/*.json
    python3 deploy/grafana/generate.py --check  # exit 1 when the committed JSON is stale

Why code and not hand-edited JSON: the job filter, the datasource variable, units and
descriptions are applied in one place, so no panel can forget them; a change to a query is a
one-line diff instead of a reshuffled 2,000-line export; and tests/test_deploy.py can run every
query against a real Prometheus and check every metric name against a real scrape. The JSON is
committed (Grafana's file provisioning reads it as is) and `--check` keeps it in step with this
file. Plain standard-library Python: nothing to install to regenerate.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUT_DIR = HERE / "dashboards"

# Every panel and variable query goes through this datasource variable, so the dashboards work
# against whichever Prometheus datasource the importer picks.
DS: dict[str, str] = {"type": "prometheus", "uid": "${datasource}"}
# The label filter every series selector carries (see `m`).
JOB = 'job=~"$job"'
SCHEMA_VERSION = 39
TAG = "streamer"
# The score (models/calibration.py, combine_scores) is -log10(p) / SCORE_DECADES, capped at 1,
# where p is the stream's own tail probability of an event at least this surprising. On normal
# traffic p is uniform (and the Bonferroni combination of two views only makes it conservative),
# so a calibrated detector puts at most a share 10**(-SCORE_DECADES * t) of its scores above t.
# The thresholds are `le` bounds of the streamer_anomaly_score buckets
# (streamer/metrics.py); tests/test_deploy.py checks both against the code.
SCORE_DECADES = 6.0
SCORE_THRESHOLDS = ("0.1", "0.25", "0.5", "0.75")
DEFAULT_THRESHOLD = 0.5  # detector.threshold's default: p <= 0.001


def expected_share_above(threshold: str) -> float:
    """Share of scores above `threshold` on normal traffic when the calibration fits."""
    return float(10 ** (-SCORE_DECADES * float(threshold)))


def percent(share: float) -> str:
    """0.001 -> '0.1%' (two significant digits), for panel descriptions."""
    return f"{share * 100:.2g}%"


Json = dict[str, Any]


def m(metric: str, matchers: str = "") -> str:
    """A series selector for `metric` restricted to the selected jobs, plus optional matchers.

    Why a helper: tests assert every selector filters on $job; building them all here makes
    that true by construction, and the test catches a selector typed by hand.
    """
    extra = f", {matchers}" if matchers else ""
    return f"{metric}{{{JOB}{extra}}}"


def rate(metric: str, window: str = "$__rate_interval", matchers: str = "") -> str:
    """rate() of a counter over Grafana's rate interval (at least four scrape intervals)."""
    return f"rate({m(metric, matchers)}[{window}])"


def quantile(q: float, histogram: str, by: str = "") -> str:
    """histogram_quantile over all selected instances (optionally kept apart by `by` labels)."""
    labels = ", ".join(["le", *([by] if by else [])])
    return f"histogram_quantile({q}, sum by ({labels}) ({rate(histogram + '_bucket')}))"


def target(expr: str, legend: str = "", ref: str = "A", *, instant: bool = False, fmt: str = "time_series") -> Json:
    """One Prometheus query of a panel."""
    return {
        "datasource": DS,
        "refId": ref,
        "expr": expr,
        "legendFormat": legend or "__auto",
        "range": not instant,
        "instant": instant,
        "format": fmt,
        "editorMode": "code",
    }


def targets(*pairs: tuple[str, str], instant: bool = False, fmt: str = "time_series") -> list[Json]:
    """Several (expr, legend) queries with refIds A, B, C..."""
    return [target(e, legend, chr(ord("A") + i), instant=instant, fmt=fmt) for i, (e, legend) in enumerate(pairs)]


def _thresholds(steps: Sequence[tuple[float | None, str]]) -> Json:
    return {"mode": "absolute", "steps": [{"color": color, "value": value} for value, color in steps]}


GREEN_ONLY = ((None, "green"),)


class Board:
    """Lays panels out left to right on Grafana's 24-column grid and numbers them stably.

    Panel ids follow insertion order, so regenerating gives identical JSON (stable links to
    panels, clean diffs) and a moved panel changes only its own entry.
    """

    def __init__(self, uid: str, title: str, description: str) -> None:
        self.uid, self.title, self.description = uid, title, description
        self.panels: list[Json] = []
        self.x = 0
        self.y = 0
        self.row_h = 0

    def _place(self, w: int, h: int) -> Json:
        if self.x + w > 24:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        pos = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.x += w
        self.row_h = max(self.row_h, h)
        return pos

    def row(self, title: str) -> None:
        """A (non-collapsing) section header on a line of its own."""
        if self.x:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        self.panels.append(
            {"id": len(self.panels) + 1, "type": "row", "title": title, "collapsed": False, "gridPos": self._place(24, 1), "panels": []}
        )
        self.x, self.y, self.row_h = 0, self.y + 1, 0

    def add(self, panel: Json, w: int, h: int = 8) -> None:
        panel["id"] = len(self.panels) + 1
        panel["gridPos"] = self._place(w, h)
        self.panels.append(panel)

    def timeseries(
        self,
        title: str,
        description: str,
        unit: str,
        tgts: list[Json],
        *,
        w: int = 12,
        h: int = 8,
        stack: bool = False,
        bars: bool = False,
        log: bool = False,
        min_: float | None = None,
        max_: float | None = None,
        thresholds: Sequence[tuple[float | None, str]] = GREEN_ONLY,
    ) -> None:
        custom: Json = {
            "drawStyle": "bars" if bars else "line",
            "lineWidth": 1,
            "fillOpacity": 60 if bars else (25 if stack else 10),
            "showPoints": "never",
            "spanNulls": False,
            "stacking": {"mode": "normal" if stack else "none", "group": "A"},
            "axisSoftMin": 0 if min_ is None and not log else None,
            "scaleDistribution": {"type": "log", "log": 10} if log else {"type": "linear"},
        }
        custom = {k: v for k, v in custom.items() if v is not None}
        defaults: Json = {"unit": unit, "custom": custom, "thresholds": _thresholds(thresholds), "color": {"mode": "palette-classic"}}
        if min_ is not None:
            defaults["min"] = min_
        if max_ is not None:
            defaults["max"] = max_
        self.add(
            {
                "type": "timeseries",
                "title": title,
                "description": description,
                "datasource": DS,
                "targets": tgts,
                "fieldConfig": {"defaults": defaults, "overrides": []},
                "options": {
                    "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"},
                },
            },
            w,
            h,
        )

    def stat(
        self,
        title: str,
        description: str,
        unit: str,
        tgts: list[Json],
        *,
        w: int = 4,
        h: int = 4,
        thresholds: Sequence[tuple[float | None, str]] = GREEN_ONLY,
        mappings: list[Json] | None = None,
        reducer: str = "lastNotNull",
    ) -> None:
        self.add(
            {
                "type": "stat",
                "title": title,
                "description": description,
                "datasource": DS,
                "targets": tgts,
                "fieldConfig": {
                    "defaults": {
                        "unit": unit,
                        "thresholds": _thresholds(thresholds),
                        "mappings": mappings or [],
                        "color": {"mode": "thresholds"},
                    },
                    "overrides": [],
                },
                "options": {
                    "reduceOptions": {"calcs": [reducer], "fields": "", "values": False},
                    "colorMode": "value",
                    "graphMode": "area",
                    "justifyMode": "auto",
                    "orientation": "auto",
                    "textMode": "auto",
                },
            },
            w,
            h,
        )

    def heatmap(self, title: str, description: str, unit: str, tgts: list[Json], *, w: int = 12, h: int = 9) -> None:
        """Prometheus buckets drawn as they are (calculate: false): one row per `le`."""
        self.add(
            {
                "type": "heatmap",
                "title": title,
                "description": description,
                "datasource": DS,
                "targets": tgts,
                "fieldConfig": {"defaults": {"unit": unit, "custom": {"scaleDistribution": {"type": "linear"}}}, "overrides": []},
                "options": {
                    "calculate": False,
                    "cellGap": 1,
                    "color": {"mode": "scheme", "scheme": "Oranges", "scale": "exponential", "exponent": 0.5, "fill": "dark-orange"},
                    "yAxis": {"axisPlacement": "left", "unit": unit, "reverse": False},
                    "rowsFrame": {"layout": "auto"},
                    "cellValues": {"unit": "short"},
                    "tooltip": {"mode": "single", "yHistogram": True},
                    "legend": {"show": True},
                    "exemplars": {"color": "rgba(255,0,255,0.7)"},
                },
            },
            w,
            h,
        )

    def bargauge(self, title: str, description: str, unit: str, tgts: list[Json], *, w: int = 12, h: int = 9) -> None:
        self.add(
            {
                "type": "bargauge",
                "title": title,
                "description": description,
                "datasource": DS,
                "targets": tgts,
                "fieldConfig": {
                    "defaults": {"unit": unit, "min": 0, "thresholds": _thresholds(GREEN_ONLY), "color": {"mode": "thresholds"}},
                    "overrides": [],
                },
                "options": {
                    "orientation": "horizontal",
                    "displayMode": "gradient",
                    "showUnfilled": True,
                    "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                },
            },
            w,
            h,
        )

    def table(self, title: str, description: str, unit: str, tgts: list[Json], columns: Sequence[str], *, w: int = 12, h: int = 8) -> None:
        """An instant query shown as a table of label values (the `Value` column hidden)."""
        exclude = {"Time": True, "Value": True, "__name__": True}
        index = {name: i for i, name in enumerate(columns)}
        self.add(
            {
                "type": "table",
                "title": title,
                "description": description,
                "datasource": DS,
                "targets": tgts,
                "fieldConfig": {"defaults": {"unit": unit, "custom": {"align": "auto"}}, "overrides": []},
                "options": {"showHeader": True, "cellHeight": "sm", "footer": {"show": False, "reducer": ["sum"], "fields": ""}},
                # format=table already gives one column per label; hide the sample's time and value.
                "transformations": [{"id": "organize", "options": {"excludeByName": exclude, "indexByName": index, "renameByName": {}}}],
            },
            w,
            h,
        )

    def render(self, annotations: list[Json] | None = None) -> Json:
        return {
            "id": None,
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": [TAG],
            "timezone": "browser",
            "editable": False,
            "graphTooltip": 1,
            "liveNow": False,
            "refresh": "30s",
            "schemaVersion": SCHEMA_VERSION,
            "version": 1,
            "time": {"from": "now-3h", "to": "now"},
            "timepicker": {},
            "fiscalYearStartMonth": 0,
            "weekStart": "",
            "links": [
                {
                    "type": "dashboards",
                    "tags": [TAG],
                    "asDropdown": True,
                    "title": "Streamer dashboards",
                    "includeVars": True,
                    "keepTime": True,
                    "icon": "external link",
                    "targetBlank": False,
                    "tooltip": "",
                    "url": "",
                }
            ],
            "templating": {"list": variables()},
            "annotations": {"list": [BUILTIN_ANNOTATION, *(annotations or [])]},
            "panels": self.panels,
        }


def variables() -> list[Json]:
    """The datasource picker and the job filter (multi-select; "All" matches every job)."""
    job_query = "label_values(streamer_model_info, job)"
    return [
        {
            "name": "datasource",
            "label": "Data source",
            "type": "datasource",
            "query": "prometheus",
            "regex": "",
            "current": {},
            "hide": 0,
            "includeAll": False,
            "multi": False,
            "options": [],
            "refresh": 1,
            "skipUrlSync": False,
        },
        {
            "name": "job",
            "label": "Job",
            "type": "query",
            "datasource": DS,
            "definition": job_query,
            "query": {"query": job_query, "refId": "PrometheusVariableQueryEditor-VariableQuery", "qryType": 1},
            "regex": "",
            "current": {},
            "hide": 0,
            "includeAll": True,
            # (No allValue: Grafana's "All" is then the listed streamer jobs. ".+" matched every job
            # in Prometheus, so `up` and the process_* panels summed other exporters in with these.)
            "multi": True,
            "options": [],
            "refresh": 2,
            "sort": 1,
            "skipUrlSync": False,
        },
    ]


BUILTIN_ANNOTATION: Json = {
    "builtIn": 1,
    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
    "enable": True,
    "hide": True,
    "iconColor": "rgba(0, 211, 255, 1)",
    "name": "Annotations & Alerts",
    "type": "dashboard",
}

# A marker wherever a daemon (re)started or loaded a model (at start, or a replaced checkpoint),
# on every dashboard: most step changes in these graphs (cold state, new weights, a rebalance)
# start there.
RESTART_ANNOTATION: Json = {
    "name": "Daemon start / model load",
    "datasource": DS,
    "enable": True,
    "hide": False,
    "iconColor": "rgba(255, 152, 48, 1)",
    "expr": f"changes({m('streamer_model_loaded_timestamp_seconds')}[$__interval]) > 0",
    "step": "1m",
    "titleFormat": "model loaded",
    "textFormat": "{{instance}}",
    "useValueForTime": False,
}

UP_MAPPINGS = [
    {"type": "value", "options": {"0": {"text": "DOWN", "color": "red", "index": 0}, "1": {"text": "UP", "color": "green", "index": 1}}}
]


def overview() -> Json:
    b = Board(
        "streamer-overview",
        "Streamer / Overview",
        "Is the detector healthy, keeping up, and what is it finding? Throughput, consumer lag, anomaly rate, latency, dead letters.",
    )
    b.row("Health")
    b.stat(
        "Targets up",
        "Scrape targets of the selected jobs that answered the last scrape (Prometheus' `up`). Fewer than the members you run: "
        "see the StreamerDown alert.",
        "none",
        targets((f"sum({m('up')})", "up")),
    )
    b.stat(
        "Since last progress",
        "Seconds since the slowest member's processing loop last completed a poll. It polls several times a second even when "
        "idle; /healthz fails past metrics.max_stall_s (60 s) and StreamerNoProgress fires past 120 s.",
        "s",
        targets((f"max(time() - {m('streamer_last_progress_timestamp_seconds')})", "stall")),
        thresholds=((None, "green"), (60, "orange"), (120, "red")),
    )
    b.stat(
        "Events scored /s",
        "Events stepped through the model and scored, per second, all selected members together.",
        "cps",
        targets((f"sum({rate('streamer_events_scored_total')})", "scored")),
    )
    b.stat(
        "Consumer lag",
        "Records behind the fetch high-water mark, summed over every assigned partition.",
        "short",
        targets((f"sum({m('streamer_consumer_lag_records')})", "lag")),
        thresholds=((None, "green"), (10000, "orange"), (100000, "red")),
    )
    b.stat(
        "Assigned partitions",
        "Input partitions owned by the selected members. Should equal the input topics' partition count once the group is stable.",
        "none",
        targets((f"sum({m('streamer_assigned_partitions')})", "partitions")),
    )
    b.stat(
        "Active streams",
        "Streams with state in the members' state banks (evicted after state.idle_evict_s of silence).",
        "short",
        targets((f"sum({m('streamer_active_streams')})", "streams")),
    )
    b.stat(
        "Members cut off from brokers",
        "Members whose last look at the brokers got no answer (streamer_broker_reachable 0): a send not acknowledged, or, "
        "while idle, no answer to the log-end request sent every 15 s. They score nothing; StreamerBrokerUnreachable fires after 2 min.",
        "none",
        targets((f"count({m('streamer_broker_reachable')} == 0) or vector(0)", "members")),
        thresholds=((None, "green"), (1, "red")),
    )
    b.timeseries(
        "Up by instance",
        "1 when Prometheus scraped the instance, 0 when the scrape failed. A gap means the target disappeared from discovery.",
        "none",
        targets((m("up"), "{{instance}}")),
        min_=0,
        max_=1,
    )
    b.timeseries(
        "Time since last progress",
        "Per member: seconds since its loop last completed a poll. Stays near the poll timeout when healthy; a line climbing "
        "steadily is a wedged loop.",
        "s",
        targets((f"time() - {m('streamer_last_progress_timestamp_seconds')}", "{{instance}}")),
        thresholds=((None, "green"), (60, "orange"), (120, "red")),
    )

    b.row("Throughput")
    b.timeseries(
        "Events per second",
        "Input records read (per topic), events scored, and events only replayed to rebuild state after a restore "
        "(their scores had already been emitted). Consumed minus scored and replayed is the dead-lettered share.",
        "cps",
        targets(
            (f"sum by (topic) ({rate('streamer_events_consumed_total')})", "consumed {{topic}}"),
            (f"sum({rate('streamer_events_scored_total')})", "scored"),
            (f"sum({rate('streamer_events_replayed_total')})", "replayed"),
        ),
    )
    b.timeseries(
        "Output records per second",
        "Records acknowledged by the broker, per output topic (scores, alerts, dead letters).",
        "cps",
        targets((f"sum by (topic) ({rate('streamer_output_records_total')})", "{{topic}}")),
    )
    b.timeseries(
        "Send and commit failures",
        "Output batches not acknowledged in producer.send_timeout_s (resent with a new producer) and offset commits rejected "
        "by a rebalance (the records are redelivered). Both should be zero outside broker incidents and rebalances.",
        "cps",
        targets(
            (f"sum({rate('streamer_send_failures_total')})", "send failures"),
            (f"sum({rate('streamer_commit_failures_total')})", "commit failures"),
        ),
        bars=True,
        w=24,
        h=6,
    )

    b.row("Consumer lag")
    b.timeseries(
        "Consumer lag by topic",
        "Records behind the fetch high-water mark, summed per input topic. Flat is fine; steadily growing means the group "
        "consumes slower than producers write (StreamerConsumerLagGrowing).",
        "short",
        targets((f"sum by (topic) ({m('streamer_consumer_lag_records')})", "{{topic}}")),
    )
    b.timeseries(
        "Lag trend",
        "Change of the lag per second (deriv over 5 minutes), per topic. Positive for long stretches: falling behind.",
        "cps",
        targets((f"sum by (topic) (deriv({m('streamer_consumer_lag_records')}[5m]))", "{{topic}}")),
    )
    b.timeseries(
        "Most lagging partitions",
        "The ten partitions furthest behind, with the member that owns each. One hot partition among idle ones points at "
        "a skewed key distribution rather than too few members.",
        "short",
        targets(
            (
                f"topk(10, max by (topic, partition, instance) ({m('streamer_consumer_lag_records')}))",
                "{{topic}}[{{partition}}] {{instance}}",
            )
        ),
        w=24,
    )

    b.row("Anomalies")
    b.timeseries(
        "Anomalies per second",
        "Events flagged (score at or above detector.threshold, past warm-up), per second, by what flagged them: for "
        "sensor events the view with the smallest tail probability (prediction: the next value given the recent past; "
        "time_of_day: unusual for this hour; recent_level: outside the last ~30 events; recent_mean: the average has "
        "moved lately; correlation: a feature is out of line with the others; feature: one feature unusual for itself; "
        "repeat: a continuous reading stuck on one value), "
        "log for log lines.",
        "cps",
        targets((f"sum by (view) ({rate('streamer_anomalies_total')})", "{{view}}")),
        w=8,
    )
    b.timeseries(
        "Anomaly share of scored events",
        f"Flagged events as a share of scored events. At the default detector.threshold of {DEFAULT_THRESHOLD} (p <= "
        f"{expected_share_above(str(DEFAULT_THRESHOLD)):g}) a well-calibrated detector flags about "
        f"{percent(expected_share_above(str(DEFAULT_THRESHOLD)))} of normal traffic, plus the real anomalies. "
        "StreamerAnomalyRateSpike fires at three times the previous day's share.",
        "percentunit",
        targets((f"sum({rate('streamer_anomalies_total')}) / sum({rate('streamer_events_scored_total')})", "flagged share")),
        w=8,
    )
    b.timeseries(
        "Held events per second",
        "Sensor events whose score reached the threshold but that were reported below it, not as anomalies: aftershock "
        "(within detector.holdoff events of an alert they did not exceed: one alert per episode) or recurrence "
        "(flagged at an hour of the day that had flags on each of the last detector.recur_days days: a nightly job) or "
        "warmup (inside the stream's detector.warmup, where scores are not yet calibrated); and every duplicate "
        "(an event repeating its stream's previous one exactly: a re-delivery, scored when it first came). "
        "A stream whose anomaly stopped alerting but keeps showing as aftershock or recurrence is one the detector now "
        "takes as routine; warmup rises with every batch of new streams; duplicate is a producer retrying.",
        "cps",
        targets((f"sum by (reason) ({rate('streamer_held_events_total')})", "{{reason}}")),
        w=8,
    )

    b.row("Latency")
    b.timeseries(
        "End-to-end latency",
        "From the input record's Kafka timestamp to its batch's outputs being acknowledged: what a consumer of the "
        "scores (or, with topics.scores null, the alerts) topic waits. Includes time spent in the lag.",
        "s",
        targets(
            *((quantile(q, "streamer_end_to_end_latency_seconds"), f"p{round(q * 100)}") for q in (0.5, 0.9, 0.99)),
        ),
        w=8,
    )
    b.timeseries(
        "Event-time lag",
        "From the event's own `ts` field to its score being produced. Larger than end-to-end latency when producers "
        "buffer or sensors send late; backfills show up here as hours.",
        "s",
        targets(*((quantile(q, "streamer_event_time_lag_seconds"), f"p{round(q * 100)}") for q in (0.5, 0.9, 0.99))),
        w=8,
    )
    b.timeseries(
        "Batch duration",
        "Poll-to-commit time of one batch: decode, model step, produce and wait for acks, commit.",
        "s",
        targets(*((quantile(q, "streamer_batch_duration_seconds"), f"p{round(q * 100)}") for q in (0.5, 0.9, 0.99))),
        w=8,
    )

    b.row("Dead letters")
    b.timeseries(
        "Dead letters by reason",
        "Input records sent to the dead-letter topic, per second, by reason (the streamer.reason header). "
        "StreamerDeadLetters fires when one reason is over 0.1% of the input for 10 minutes.",
        "cps",
        targets((f"sum by (reason) ({rate('streamer_dead_letters_total')}) > 0", "{{reason}}")),
        bars=True,
        stack=True,
    )
    b.bargauge(
        "Dead letters in range",
        "Records dead-lettered over the dashboard's time range, by reason.",
        "short",
        targets((f"sort_desc(sum by (reason) (increase({m('streamer_dead_letters_total')}[$__range])))", "{{reason}}"), instant=True),
        h=8,
    )
    b.timeseries(
        "Stray events",
        "Sensor events scored against a stream whose state belongs to another input partition or topic, per second: a producer "
        "without a stable key per stream. They are scored, not dead-lettered, but a rebalance drops that state under them; "
        "the daemon's log names the first such streams. 0 is healthy.",
        "cps",
        targets((f"sum({rate('streamer_events_stray_total')})", "stray events")),
        min_=0,
    )
    return b.render([RESTART_ANNOTATION])


def model() -> Json:
    b = Board(
        "streamer-model",
        "Streamer / Model",
        "Which model is loaded, how its scores are distributed, whether they are calibrated, and how many streams are still warming up.",
    )
    b.row("Loaded model")
    b.table(
        "Loaded model by instance",
        "streamer_model_info of every member: model version (training name and checkpoint digest), checkpoint path, device, "
        "hidden units and max features. Two versions at once is expected only during a rollout or while members pick up "
        "a replaced checkpoint (each checks every detector.reload_check_s).",
        "string",
        targets((m("streamer_model_info"), ""), instant=True, fmt="table"),
        ("instance", "version", "checkpoint", "device", "hidden", "max_features", "job"),
        w=8,
    )
    b.stat(
        "Model versions running",
        "Distinct model versions among the selected members.",
        "none",
        targets((f"count(count by (version) ({m('streamer_model_info')}))", "versions")),
        w=4,
        h=8,
        thresholds=((None, "green"), (2, "orange")),
    )
    b.stat(
        "Model loaded at",
        "When a member last loaded its model: at start, and again whenever its checkpoint file is replaced (the daemon "
        "checks every detector.reload_check_s and swaps the new weights in without a restart).",
        "dateTimeAsIso",
        targets((f"max({m('streamer_model_loaded_timestamp_seconds')}) * 1000", "loaded")),
        w=4,
        h=8,
    )
    b.stat(
        "Model age",
        "Time since the member with the oldest model loaded it (at start or on a checkpoint reload).",
        "dtdurations",
        targets((f"max(time() - {m('streamer_model_loaded_timestamp_seconds')})", "age")),
        w=4,
        h=8,
    )
    b.stat(
        "Checkpoints refused",
        "Members whose checkpoint file is not the model they serve (streamer_checkpoint_refused 1): it was replaced by one "
        "they could not load, or removed. They keep serving, but a restart would fail on that file; "
        "StreamerCheckpointRefused fires after 5 min.",
        "none",
        targets((f"count({m('streamer_checkpoint_refused')} == 1) or vector(0)", "members")),
        w=4,
        h=8,
        thresholds=((None, "green"), (1, "orange")),
    )
    b.timeseries(
        "Checkpoint reloads",
        "Replaced checkpoint files the members noticed: served keeping every stream's state (same architecture), served "
        "resetting them (a different architecture: the streams warm up again), or refused (unreadable, not a checkpoint, "
        "non-finite weights; the member keeps serving its current model and says why in its log).",
        "short",
        targets((f"sum by (result) (increase({m('streamer_model_reloads_total')}[$__rate_interval]))", "{{result}}")),
        w=24,
        h=6,
        bars=True,
    )

    b.row("Score distribution")
    b.heatmap(
        "Score distribution over time",
        f"Scores per bucket of streamer_anomaly_score over time. The score is -log10(p)/{SCORE_DECADES:g} of the event's "
        "tail probability under its stream's own history, so most normal events sit in the lowest rows and each row "
        f"{1 / SCORE_DECADES:.3g} higher is ten times rarer; the rows at and above the threshold should stay thin.",
        "none",
        targets((f"sum by (le) (increase({m('streamer_anomaly_score_bucket')}[$__rate_interval]))", "{{le}}"), fmt="heatmap"),
    )
    b.bargauge(
        "Scores in range by bucket",
        "Scores per bucket over the dashboard's time range (bucket upper bounds; each bar counts the scores between the "
        "previous bound and this one).",
        "short",
        targets((f"sum by (le) (increase({m('streamer_anomaly_score_bucket')}[$__range]))", "{{le}}"), instant=True, fmt="heatmap"),
    )

    b.row("Calibration")
    total = f"sum({rate('streamer_anomaly_score_count')})"
    observed = {
        t: f"(1 - sum({rate('streamer_anomaly_score_bucket', matchers=f'le={json.dumps(t)}')}) / {total})" for t in SCORE_THRESHOLDS
    }
    b.timeseries(
        "Share of scores above thresholds",
        f"The share of scores above {', '.join(SCORE_THRESHOLDS)}. When the per-stream calibration fits, p is uniform on "
        f"normal data and these sit near {', '.join(percent(expected_share_above(t)) for t in SCORE_THRESHOLDS)} (plus "
        "the real anomalies). Log scale.",
        "percentunit",
        targets(*((observed[t], f"> {t} (p < {expected_share_above(t):.2g})") for t in SCORE_THRESHOLDS)),
        log=True,
    )
    b.timeseries(
        "Calibration ratio",
        f"Observed share above each threshold divided by the share a calibrated detector gives (10^(-{SCORE_DECADES:g} x "
        "threshold)). 1 is perfect; well above 1 at every threshold means scores run hot (too many flags), below 1 that "
        "they run cold. The highest threshold is noisy over short ranges.",
        "none",
        targets(*((f"{observed[t]} / {expected_share_above(t):.4g}", f"> {t}") for t in SCORE_THRESHOLDS)),
        log=True,
    )
    b.timeseries(
        "Mean score",
        f"Mean score. About {1 / (SCORE_DECADES * math.log(10)):.2f} (1 / ({SCORE_DECADES:g} ln 10)) when p is uniform on "
        "normal data; drifting away means the per-stream calibration no longer fits the traffic.",
        "none",
        targets((f"sum({rate('streamer_anomaly_score_sum')}) / sum({rate('streamer_anomaly_score_count')})", "mean score")),
        min_=0,
        w=24,
        h=6,
    )

    b.row("Streams")
    b.timeseries(
        "Active streams",
        "Streams with state in each member's state bank.",
        "short",
        targets((m("streamer_active_streams"), "{{instance}}")),
        w=8,
    )
    b.timeseries(
        "Streams warming up",
        "Streams still inside detector.warmup events: scored, never flagged. A jump after a restart or rebalance means "
        "partitions arrived without a snapshot (cold state).",
        "short",
        targets((m("streamer_streams_warming_up"), "{{instance}}")),
        w=8,
    )
    b.timeseries(
        "Warming-up share",
        "Streams warming up as a share of active streams, all members together.",
        "percentunit",
        targets((f"sum({m('streamer_streams_warming_up')}) / sum({m('streamer_active_streams')})", "warming up")),
        w=8,
        min_=0,
        max_=1,
    )
    b.timeseries(
        "Events replayed per second",
        "Events stepped only to rebuild state between a restored snapshot and the committed offset (after restarts and "
        "rebalances). Their scores were emitted before; nothing is sent twice.",
        "cps",
        targets((f"sum by (instance) ({rate('streamer_events_replayed_total')})", "{{instance}}")),
        w=24,
        h=6,
    )
    return b.render([RESTART_ANNOTATION])


def capacity() -> Json:
    b = Board(
        "streamer-capacity",
        "Streamer / Capacity",
        "Where the time and memory go: state bank size, device and process memory, CPU, batch sizes, wavefronts, step duration.",
    )
    b.row("Loop")
    b.timeseries(
        "Loop utilisation",
        "Share of wall time each member spends processing batches (poll to commit). Near 100% the member is saturated and "
        "lag grows: add members or GPU.",
        "percentunit",
        targets((f"sum by (instance) ({rate('streamer_batch_duration_seconds_sum')})", "{{instance}}")),
        min_=0,
        thresholds=((None, "green"), (0.8, "orange")),
    )
    b.timeseries(
        "Model share of batch time",
        "Model step time as a share of batch time, per member. The rest is decoding, producing and waiting for acks, and "
        "committing: high here means the model is the bottleneck, low means Kafka is.",
        "percentunit",
        targets(
            (
                f"sum by (instance) ({rate('streamer_step_duration_seconds_sum')})"
                f" / sum by (instance) ({rate('streamer_batch_duration_seconds_sum')})",
                "{{instance}}",
            )
        ),
        min_=0,
        max_=1,
    )

    b.row("Batches")
    b.timeseries(
        "Records per batch",
        "Records per polled batch (consumer.max_poll_records caps it): median, p99 and mean. Small batches under load mean "
        "the poll returns before the fetch fills; large ones amortise the model step.",
        "short",
        targets(
            (quantile(0.5, "streamer_batch_events"), "p50"),
            (quantile(0.99, "streamer_batch_events"), "p99"),
            (f"sum({rate('streamer_batch_events_sum')}) / sum({rate('streamer_batch_events_count')})", "mean"),
        ),
        w=8,
    )
    b.timeseries(
        "Wavefronts per batch",
        "GRU steps per batch: the longest run of one stream inside a batch, not the number of events. Each wavefront "
        "advances every stream that has an event at that position in one call.",
        "short",
        targets(
            (quantile(0.5, "streamer_batch_wavefronts"), "p50"),
            (quantile(0.99, "streamer_batch_wavefronts"), "p99"),
            (f"sum({rate('streamer_batch_wavefronts_sum')}) / sum({rate('streamer_batch_wavefronts_count')})", "mean"),
        ),
        w=8,
    )
    b.timeseries(
        "Events per wavefront",
        "Mean records per batch divided by mean wavefronts per batch: how many streams one GRU call advances. Higher is "
        "cheaper per event; it falls when a few streams dominate a batch.",
        "short",
        targets((f"sum({rate('streamer_batch_events_sum')}) / sum({rate('streamer_batch_wavefronts_sum')})", "events / wavefront")),
        w=8,
    )
    b.timeseries(
        "Model step duration",
        "Time to step the model over one batch (all its wavefronts).",
        "s",
        targets(*((quantile(q, "streamer_step_duration_seconds"), f"p{round(q * 100)}") for q in (0.5, 0.9, 0.99))),
    )
    b.timeseries(
        "Model time per event",
        "Model step time divided by the events it stepped (scored and replayed).",
        "s",
        targets(
            (
                f"sum({rate('streamer_step_duration_seconds_sum')}) / "
                f"(sum({rate('streamer_events_scored_total')}) + sum({rate('streamer_events_replayed_total')}))",
                "per event",
            )
        ),
    )

    b.row("State and memory")
    b.timeseries(
        "State bank",
        "Bytes held by each member's state banks on their device (the sensor streams' and each log partition's). A bank "
        "grows by doubling, so this is allocated capacity, not just live rows.",
        "bytes",
        targets((m("streamer_state_bytes"), "{{instance}}")),
        w=8,
    )
    b.timeseries(
        "State bytes per stream",
        "State bank bytes divided by active streams, per member: the memory cost of one more stream (including the bank's doubling slack).",
        "bytes",
        targets((f"{m('streamer_state_bytes')} / {m('streamer_active_streams')}", "{{instance}}")),
        w=8,
    )
    b.timeseries(
        "Device memory",
        "Memory allocated by torch on the detector's device. 0 on CPU, where the state lives in process memory (see RSS).",
        "bytes",
        targets((m("streamer_device_memory_bytes"), "{{instance}}")),
        w=8,
    )
    b.timeseries(
        "Process resident memory",
        "Resident set size of each daemon process: the number a container memory limit is compared against.",
        "bytes",
        targets((m("process_resident_memory_bytes"), "{{instance}}")),
        w=8,
    )
    b.timeseries(
        "Process CPU",
        "CPU time per second of wall time, per member (100% = one core). On CPU torch uses detector.cpu_threads threads; "
        "the Kafka client needs the rest.",
        "percentunit",
        targets((rate("process_cpu_seconds_total"), "{{instance}}")),
        w=8,
    )
    b.timeseries(
        "Open file descriptors",
        "Open file descriptors as a share of the process limit.",
        "percentunit",
        targets((f"{m('process_open_fds')} / {m('process_max_fds')}", "{{instance}}")),
        w=8,
        min_=0,
    )
    b.timeseries(
        "Snapshots and evictions",
        "Partition state snapshots written (every state.snapshot_interval_s, on revoke and on shutdown), snapshots that "
        "failed to write, and idle streams evicted, per second.",
        "cps",
        targets(
            (f"sum({rate('streamer_snapshots_total')})", "snapshots"),
            (f"sum({rate('streamer_snapshot_failures_total')})", "snapshot failures"),
            (f"sum({rate('streamer_streams_evicted_total')})", "evicted streams"),
        ),
    )
    b.timeseries(
        "Python GC collections",
        "Garbage collections per second by generation. Frequent generation-2 collections under load show up as batch duration spikes.",
        "cps",
        targets((f"sum by (generation) ({rate('python_gc_collections_total')})", "gen {{generation}}")),
    )
    return b.render([RESTART_ANNOTATION])


DASHBOARDS: dict[str, Callable[[], Json]] = {
    "streamer-overview.json": overview,
    "streamer-model.json": model,
    "streamer-capacity.json": capacity,
}


def render_all() -> dict[str, str]:
    """File name -> JSON text exactly as committed (2-space indent, trailing newline)."""
    return {name: json.dumps(build(), indent=2, ensure_ascii=False) + "\n" for name, build in DASHBOARDS.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="exit 1 if the JSON files differ from what this script generates")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help=f"output directory (default {OUT_DIR})")
    args = parser.parse_args(argv)
    rendered = render_all()
    if args.check:
        stale = [name for name, text in rendered.items() if not (args.out / name).exists() or (args.out / name).read_text() != text]
        extra = sorted(p.name for p in args.out.glob("*.json") if p.name not in rendered)
        for name in stale:
            print(f"stale: {args.out / name} (run python3 deploy/grafana/generate.py)", file=sys.stderr)
        for name in extra:
            print(f"not generated by this script: {args.out / name}", file=sys.stderr)
        return 1 if stale or extra else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in rendered.items():
        (args.out / name).write_text(text)
        print(f"wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
