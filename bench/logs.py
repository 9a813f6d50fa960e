"""The log path alone: lines per second through parsing, template mining, the log GRU and its
online learning (`LogParser.parse` + `LogPartition.process`), no Kafka.

Why it is measured apart from the sensor core: a log partition updates its weights every
`OnlineConfig.update_every` lines in offset order (so its templates and scores do not depend on
how polls cut the topic), and the wavefronts between two updates are at most that many lines
wide. Batching across streams therefore helps far less than on the sensor path, and only this
measurement says how many lines per second one partition can take. The lines are the demo's
synthetic services (`models/logs/synth.py`: request handling, workers, heartbeats, with
injected anomalies) as the JSON records the demo's feed sends, in the daemon's 5,000-record polls.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bench.core import torch_threads
from models.logs.calibration import log_calibration
from models.logs.model import LogGRU, LogModelConfig
from models.logs.partition import LogPartition
from models.logs.synth import generate
from streamer.config import InputConfig, LogsConfig
from streamer.logparse import LogParser

POLL = 5_000  # the daemon's default max_poll_records


@dataclass(frozen=True)
class LogCase:
    """Streams (service instances) in one partition and the simulated span of their lines."""

    streams: int
    span_s: float


def cases(quick: bool) -> list[LogCase]:
    """9 streams is the demo's log feed; 90 and 900 show how far wider wavefronts help."""
    if quick:
        return [LogCase(9, 1_200.0), LogCase(90, 200.0), LogCase(900, 20.0)]
    return [LogCase(9, 3_600.0), LogCase(90, 600.0), LogCase(900, 120.0)]


@dataclass
class LogResult:
    streams: int
    threads: int
    lines: int
    batches: int
    seconds: float
    lines_per_s: float
    wavefronts_per_batch: float
    updates_per_batch: float
    templates: int


def bench_case(case: LogCase, threads: int, seed: int = 0) -> LogResult:
    """Every line of the case once, in polls of POLL lines; the first poll is the warm-up (it
    pays Drain3's and the optimiser's set-up) and is not timed."""
    logs, inp = LogsConfig(), InputConfig()
    lines = generate(seed=7, instances=case.streams, duration_s=case.span_s, warmup_s=case.span_s / 2)
    values = [line.json() for line in lines]
    with torch_threads(threads):
        torch.manual_seed(seed)  # the daemon's log model starts from random weights too
        parser = LogParser(logs.line_format, logs.stream_field, inp.max_message_bytes, inp.max_stream_id_length)
        part = LogPartition(LogGRU(LogModelConfig()), log_calibration(warmup=logs.warmup, threshold=logs.threshold))
        total = 0.0
        timed = waves = updates = batches = 0
        for start in range(0, len(values), POLL):
            chunk = values[start : start + POLL]
            t0 = time.perf_counter()
            parsed = parser.parse(chunk, [None] * len(chunk), np.zeros(len(chunk), dtype=np.int64))
            res = part.process(parsed.stream, parsed.ts_ms, parsed.level, parsed.message)
            secs = time.perf_counter() - t0
            if start == 0:
                continue
            total += secs
            timed += len(chunk)
            waves += res.wavefronts
            updates += res.updates
            batches += 1
    return LogResult(
        streams=case.streams,
        threads=threads,
        lines=timed,
        batches=batches,
        seconds=total,
        lines_per_s=timed / total if total else float("nan"),
        wavefronts_per_batch=waves / max(batches, 1),
        updates_per_batch=updates / max(batches, 1),
        templates=len(part.book),
    )


def run_logs(thread_settings: list[int], quick: bool, log: Any = print) -> list[LogResult]:
    out = []
    for threads in thread_settings:
        for case in cases(quick):
            log(f"log path: {case.streams:,} streams, {case.span_s:,.0f} simulated seconds of lines, {threads} thread(s)")
            out.append(bench_case(case, threads))
    return out
