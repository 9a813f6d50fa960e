"""The core step alone: events per second of `Detector.process`, no Kafka and no JSON.

Why separately from the end-to-end run: the daemon's rate is bounded by whichever of Kafka,
decoding and the model is slowest, and only this measurement says how much headroom the model
itself has. The three stream counts are the three shapes a poll can take:

* 1 stream: a batch of one stream's events is one wavefront per event, the worst case (every
  event pays the whole per-call overhead of the GRU step on a single row);
* 1,000 streams: a typical poll of 5,000 records is 5 wavefronts of 1,000 rows;
* 100,000 streams: each stream has one event per batch, so a 100,000-event batch is a single
  wavefront, the best case for batching (and the state bank is as large as it gets here).

Events carry what the daemon passes with them (`--core-events daemon`, the default): an event
time (one reading a second per stream) and a delivery stamp (the Kafka record's timestamp, a
little later), so the time-of-day profile, the gap check and the duplicate check run as they do
in `streamer run`. `untimed` passes neither, the shape this benchmark had until 2026-12-07 (for
comparing with figures measured then), and `no-stamps` passes times but no stamps (no event is
checked for a re-delivery): a run of each gives what those parts cost.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bench.machine import peak_rss_bytes
from models.detector import Detector
from models.gru import DEFAULT_WEIGHTS, ModelConfig, StreamGRU, load_checkpoint

# What each event carries besides its readings (the module docstring).
CORE_EVENTS = ("daemon", "untimed", "no-stamps")
T0_MS = 1_700_000_000_000  # the first event time, 2023-11-14 (any date does)
STAMP_DELAY_MS = 20  # a record's timestamp after its reading's time
ACTIVE_FEATURES = 4  # the synthetic sensors' temp, rpm, vibration, pressure; the rest is masked
# Typical level and noise of each active feature, so normalisation sees realistic magnitudes.
LEVELS = np.array([55.0, 1800.0, 0.6, 4.0])
NOISE = np.array([0.5, 15.0, 0.05, 0.05])


@dataclass(frozen=True)
class CoreCase:
    """A stream count and the batch size a poll would hand the detector for it."""

    streams: int
    batch: int


def cases(quick: bool) -> list[CoreCase]:
    """The brief's three shapes; --quick keeps them (they are cheap) and only times less."""
    del quick  # same shapes; fewer repetitions are chosen in `bench`
    return [CoreCase(1, 5_000), CoreCase(1_000, 5_000), CoreCase(100_000, 100_000)]


@dataclass
class CoreResult:
    streams: int
    threads: int
    device: str
    batch: int
    wavefronts_per_batch: int
    batches: int
    events: int
    seconds: float
    events_per_s: float
    us_per_wavefront: float
    us_per_event: float
    bank_bytes_per_stream: float
    peak_rss_bytes: int
    cuda_peak_bytes: int | None
    note: str = ""
    events_carry: str = "daemon"


def load_model() -> tuple[StreamGRU, str]:
    """The bundled weights, or a randomly initialised model of the default shape if they are
    missing (speed does not depend on the weight values, but the output says which it was)."""
    if DEFAULT_WEIGHTS.exists():
        model, _meta = load_checkpoint(DEFAULT_WEIGHTS)
        return model, f"weights: {DEFAULT_WEIGHTS.name}"
    return StreamGRU(ModelConfig()).eval(), f"weights: {DEFAULT_WEIGHTS} missing, using StreamGRU(ModelConfig()) with random init"


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a block with torch's intra-op thread count set to n, then restore it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _sync(device: torch.device) -> None:
    """CUDA work is asynchronous: the clock may only be read once the device has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class BatchMaker:
    """Round-robin batches over S streams: event i of the run belongs to stream i mod S.

    Each stream has its own level per feature so the online normaliser sees distinct series;
    consecutive batches continue where the last one stopped, as successive polls would.
    """

    def __init__(self, streams: int, max_features: int, seed: int = 0, carry: str = "daemon") -> None:
        self.streams = streams
        self.carry = carry
        self.max_features = max_features
        self.rng = np.random.default_rng(seed)
        self.levels = LEVELS * (1.0 + 0.2 * self.rng.standard_normal((streams, ACTIVE_FEATURES)))
        self.next_event = 0

    def make(self, batch: int) -> tuple[np.ndarray, ...]:
        """(slots, x, mask[, ts_ms[, stamps]]): `Detector.process`'s arguments."""
        index = self.next_event + np.arange(batch, dtype=np.int64)
        slots = index % self.streams
        self.next_event += batch
        x = np.zeros((batch, self.max_features), dtype=np.float64)
        x[:, :ACTIVE_FEATURES] = self.levels[slots] + NOISE * self.rng.standard_normal((batch, ACTIVE_FEATURES))
        mask = np.zeros((batch, self.max_features), dtype=bool)
        mask[:, :ACTIVE_FEATURES] = True
        if self.carry == "untimed":
            return slots, x, mask
        ts = T0_MS + (index // self.streams) * 1000  # each stream's own clock, a reading a second
        return (slots, x, mask, ts) if self.carry == "no-stamps" else (slots, x, mask, ts, ts + STAMP_DELAY_MS)


def _run_once(detector: Detector, batch: tuple[np.ndarray, ...]) -> tuple[float, int]:
    """Seconds and wavefronts of one `process` call, device work included."""
    _sync(detector.device)
    t0 = time.perf_counter()
    res = detector.process(*batch)
    _sync(detector.device)
    return time.perf_counter() - t0, res.wavefronts


def bench_case(
    model: StreamGRU,
    case: CoreCase,
    device: torch.device,
    threads: int,
    min_seconds: float,
    max_batch_seconds: float,
    min_batches: int,
    carry: str = "daemon",
) -> CoreResult:
    """Warm up, then time whole batches until both min_seconds and min_batches are reached.

    If the warm-up shows one planned batch would take longer than max_batch_seconds (the
    one-stream case on a slow or busy machine), the batch is shrunk to fit and the result
    says so, rather than letting one shape eat the whole time budget.
    """
    note = ""
    with torch_threads(threads):
        detector = Detector(model, device=device, capacity=case.streams)
        maker = BatchMaker(case.streams, detector.max_features, carry=carry)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        # Warm-up: first calls pay allocator, oneDNN and kernel-selection costs. A small batch
        # (at least one event per stream) is enough to estimate the full batch's duration.
        warm = min(case.batch, max(case.streams, 50))
        per_event = 0.0
        for _ in range(2 if warm < case.batch else 1):
            secs, _ = _run_once(detector, maker.make(warm))
            per_event = secs / warm
        batch = case.batch
        if per_event * batch > max_batch_seconds:
            fit = max(case.streams, int(max_batch_seconds / per_event) // case.streams * case.streams)
            if fit < batch:
                note = f"batch shrunk from {batch} to {fit} to fit {max_batch_seconds:g}s"
                batch = fit
        # No second warm-up at the full size: the warm-up's wavefronts already had the timed
        # wavefronts' shapes (one row each for 1 stream, all streams otherwise).
        batches = [maker.make(batch) for _ in range(2)]

        total = 0.0
        waves = 0
        done = 0
        while done < min_batches or total < min_seconds:
            secs, w = _run_once(detector, batches[done % len(batches)])
            total += secs
            waves += w
            done += 1
        events = done * batch
        cuda_peak = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
        return CoreResult(
            streams=case.streams,
            threads=threads,
            device=str(device),
            batch=batch,
            wavefronts_per_batch=waves // done,
            batches=done,
            events=events,
            seconds=total,
            events_per_s=events / total,
            us_per_wavefront=total / waves * 1e6,
            us_per_event=total / events * 1e6,
            bank_bytes_per_stream=detector.bank.nbytes() / detector.bank.capacity,
            peak_rss_bytes=peak_rss_bytes(),
            cuda_peak_bytes=cuda_peak,
            note=note,
            events_carry=carry,
        )


def run_core(
    device: torch.device, thread_settings: list[int], quick: bool, log: Any = print, carry: str = "daemon"
) -> tuple[list[CoreResult], str]:
    """Every (thread count, stream count) pair; returns the results and which weights were used."""
    model, weights_note = load_model()
    min_seconds, max_batch_seconds, min_batches = (0.5, 1.5, 2) if quick else (4.0, 15.0, 3)
    results: list[CoreResult] = []
    for threads in thread_settings:
        for case in cases(quick):
            log(f"core step: {case.streams:,} streams, batch {case.batch:,}, {threads} thread(s) on {device}")
            results.append(bench_case(model, case, device, threads, min_seconds, max_batch_seconds, min_batches, carry))
    return results, weights_note
