"""Deterministic synthetic log streams with labelled anomalies: tests, pretraining, the demo.

Why: log anomaly detection needs data whose ground truth is known and that exercises each
signal the detector has (template, sequence, level, timing), without shipping real logs.
Three kinds of service, several instances each (one stream per instance):
  api      request handling, one request after another: received -> auth -> query -> response,
           with an occasional slow-query WARN and a rare upstream-timeout ERROR;
  worker   a periodic job: started -> N batches processed -> finished, every ~60 s;
  beacon   a heartbeat every ~10 s, and a metrics line every sixth beat.
Anomalies (label = kind, on the lines that carry it):
  unseen     a message with a template the service never logged (ERROR);
  sequence   a request with its auth step skipped, or its response logged before its query;
  burst      one of the instance's own templates repeated 30-60 times within a few seconds
             (slow-query WARN for api, INFO batch lines for worker, INFO heartbeats for beacon);
  silence    an instance stops logging for 20-40 of its usual intervals; only the first line
             after the gap is labelled, since nothing can be scored while nothing arrives.
Everything is drawn from numpy's Generator seeded per (seed, instance), so a seed gives the
same lines every time, independent of how many instances are generated.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
import orjson

KINDS: tuple[str, ...] = ("unseen", "sequence", "burst", "silence")
_USERS = ("alice", "bob", "carol", "dave", "erin", "frank")
_PATHS = ("/api/orders", "/api/users", "/api/items", "/health", "/api/cart")
_UNSEEN = (
    "segmentation fault in worker thread {n} at address 0x{h:08x}",
    "certificate for upstream {ip} expired, refusing connection",
    "disk quota exceeded on volume data{n}: {m} bytes requested",
    "deadlock detected between transactions {n} and {m}",
)


@dataclass(frozen=True)
class SynthLine:
    ts_ms: int
    stream: str
    service: str
    level: str
    message: str
    label: str  # "" for normal lines, else one of KINDS

    def json(self) -> bytes:
        """The line as the JSON record a producer would send."""
        return orjson.dumps({"ts": self.ts_ms, "service": self.stream, "level": self.level, "message": self.message})


def _ip(rng: np.random.Generator) -> str:
    return "10.{}.{}.{}".format(*rng.integers(0, 255, 3).tolist())


class _Instance:
    """One service instance: emits its lines in time order, with its anomalies injected."""

    def __init__(self, seed: int, index: int, kind: str, start_ms: int, duration_ms: int, anomalies: bool, warmup_ms: int) -> None:
        self.rng = np.random.default_rng([seed, index])
        self.kind = kind
        self.name = f"{kind}-{index:02d}"
        self.t = float(start_ms + self.rng.uniform(0, 5000))
        self.end = start_ms + duration_ms
        self.pending: list[tuple[float, str, str, str]] = []
        # Anomaly schedule: each kind at most once per instance, after the warm-up period.
        self.plan: dict[str, float] = {}
        if anomalies:
            for k in KINDS:
                if self.rng.random() < 0.5:
                    self.plan[k] = start_ms + warmup_ms + self.rng.uniform(0, max(1.0, duration_ms - warmup_ms - 600_000))
        self.seq = 0

    def _due(self, kind: str) -> bool:
        at = self.plan.get(kind)
        if at is not None and self.t >= at:
            del self.plan[kind]
            return True
        return False

    def _emit(self, dt_s: float, level: str, msg: str, label: str = "") -> None:
        self.t += dt_s * 1000.0
        self.pending.append((self.t, level, msg, label))

    def _api(self) -> None:
        r = self.rng
        rid = int(r.integers(10_000, 99_999))
        broken = self._due("sequence")
        mode = int(r.integers(0, 2)) if broken else -1
        lab = "sequence" if broken else ""
        self._emit(r.exponential(2.0), "INFO", f"request {rid} received: GET {_PATHS[int(r.integers(0, 5))]} from {_ip(r)}", lab)
        if mode != 0:
            self._emit(r.exponential(0.02), "DEBUG", f"request {rid} authenticated user {_USERS[int(r.integers(0, 6))]}", lab)
        took = float(r.lognormal(3.0, 0.5))
        query = (f"request {rid} query returned {int(r.integers(0, 500))} rows in {took:.1f} ms", "")
        response = (f"request {rid} completed status 200 in {took + r.exponential(5.0):.1f} ms", "")
        steps = [query, response] if mode != 1 else [response, query]
        for msg, _ in steps:
            self._emit(r.exponential(0.05), "INFO", msg, lab)
        if took > 60.0:
            self._emit(0.001, "WARN", f"slow query for request {rid}: {took:.1f} ms")
        if r.random() < 0.003:
            self._emit(0.01, "ERROR", f"upstream {_ip(r)} timed out after 3000 ms for request {rid}")

    def _worker(self) -> None:
        r = self.rng
        self.seq += 1
        self._emit(r.normal(60.0, 2.0), "INFO", f"job {self.seq} started")
        for b in range(int(r.integers(2, 5))):
            self._emit(r.exponential(1.5), "INFO", f"job {self.seq} processed batch {b} with {int(r.integers(50, 500))} items")
        self._emit(r.exponential(0.5), "INFO", f"job {self.seq} finished in {r.uniform(2, 9):.2f} s")

    def _beacon(self) -> None:
        r = self.rng
        self.seq += 1
        self._emit(r.normal(10.0, 0.3), "INFO", f"heartbeat {self.seq} ok")
        if self.seq % 6 == 0:
            self._emit(0.01, "DEBUG", f"metrics: cpu {r.uniform(5, 80):.1f}% mem {int(r.integers(200, 900))} MB")

    def _anomalies(self) -> None:
        r = self.rng
        if self._due("unseen"):
            tmpl = _UNSEEN[int(r.integers(0, len(_UNSEEN)))]
            self._emit(
                r.exponential(1.0),
                "ERROR",
                tmpl.format(n=int(r.integers(1, 64)), m=int(r.integers(1, 1 << 20)), h=int(r.integers(0, 1 << 31)), ip=_ip(r)),
                "unseen",
            )
        if self._due("burst"):
            for i in range(int(r.integers(30, 61))):
                if self.kind == "api":
                    level, msg = "WARN", f"slow query for request {int(r.integers(10_000, 99_999))}: {r.uniform(60, 900):.1f} ms"
                elif self.kind == "worker":
                    level, msg = "INFO", f"job {self.seq} processed batch {i} with {int(r.integers(50, 500))} items"
                else:
                    level, msg = "INFO", f"heartbeat {self.seq + i} ok"
                self._emit(r.exponential(0.05), level, msg, "burst")
        if self._due("silence"):
            gap = {"api": 2.5, "worker": 63.0, "beacon": 10.0}[self.kind] * r.uniform(20, 40)
            self.t += gap * 1000.0
            self.pending.append((-1.0, "", "", "silence"))  # marks the next line

    def lines(self) -> list[tuple[float, str, str, str]]:
        step = {"api": self._api, "worker": self._worker, "beacon": self._beacon}[self.kind]
        out: list[tuple[float, str, str, str]] = []
        mark_next = False
        while self.t < self.end:
            self._anomalies()
            step()
            for t, level, msg, label in self.pending:
                if t < 0:
                    mark_next = True
                    continue
                if mark_next:
                    label, mark_next = label or "silence", False
                out.append((t, level, msg, label))
            self.pending = []
        return [x for x in out if x[0] < self.end]


def generate(
    seed: int = 0,
    instances: int = 6,
    duration_s: float = 3600.0,
    start_ms: int = 1_767_225_600_000,
    anomalies: bool = True,
    warmup_s: float = 1200.0,
) -> list[SynthLine]:
    """All instances' lines merged in timestamp order (ties: instance order)."""
    kinds = ("api", "worker", "beacon")
    per: list[list[SynthLine]] = []
    for i in range(instances):
        inst = _Instance(seed, i, kinds[i % 3], start_ms, int(duration_s * 1000), anomalies, int(warmup_s * 1000))
        per.append([SynthLine(int(t), inst.name, inst.kind, lv, msg, lab) for t, lv, msg, lab in inst.lines()])
    return list(heapq.merge(*per, key=lambda ln: ln.ts_ms))
