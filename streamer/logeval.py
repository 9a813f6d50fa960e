"""Evaluate the log detector on a labelled log file, streaming, against two streaming baselines.

`python3 -m streamer.logeval FILE [--format bgl]` (the daemon CLI can expose the same `main`).
The file is read in order and fed in poll-sized batches through the code path the daemon
uses (LogParser.parse, then LogPartition.process on one partition), with no look-ahead: every
line's score is final when its batch is processed. Loghub files whose first field is a label
(BGL, Thunderbird: "-" for a normal line, an alert category otherwise) have it cut off before
the parser sees the line. Metrics are per line: average precision (AUC-PR), ROC-AUC and the
best F1 over thresholds. The baselines are measured the same way, streaming: (a) the line's
level severity alone, (b) template rarity, -log of the frequency of the line's Drain3
template among the lines so far. Lines the parser rejects count as scored 0 for every method.
Nothing here is tuned per file: the layout is detected from the first lines unless given.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import torch

from models.logs.model import DEFAULT_LOG_WEIGHTS, LogGRU, LogModelConfig, load_log_checkpoint
from models.logs.partition import LogPartition
from models.logs.templates import MinerConfig, TemplateBook
from streamer.logformats import PRESETS
from streamer.logparse import LogParser

LABELLED_PRESETS = ("bgl", "thunderbird")
_DETECT_ORDER = ("bgl", "thunderbird", "hdfs", "syslog")


# -- metrics ---------------------------------------------------------------------------------
def _curve(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative true and false positives at each distinct threshold, highest first."""
    order = np.argsort(-s, kind="stable")
    ys, ss = y[order], s[order]
    tp = np.cumsum(ys)
    fp = np.cumsum(1 - ys)
    last = np.r_[ss[1:] != ss[:-1], True]  # tied scores form one threshold
    return tp[last], fp[last]


def average_precision(y: np.ndarray, s: np.ndarray) -> float:
    """Step-wise area under the precision-recall curve (as scikit-learn's average_precision_score)."""
    y = y.astype(np.float64)
    if y.sum() == 0:
        return float("nan")
    tp, fp = _curve(y, s)
    precision = tp / (tp + fp)
    recall = np.r_[0.0, tp / y.sum()]
    return float(np.sum(np.diff(recall) * precision))


def roc_auc(y: np.ndarray, s: np.ndarray) -> float:
    """Mann-Whitney U with average ranks for ties."""
    y = y.astype(bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(s, kind="stable")
    ranks = np.empty(len(s), dtype=np.float64)
    ss = s[order]
    starts = np.r_[0, np.flatnonzero(ss[1:] != ss[:-1]) + 1]
    ends = np.r_[starts[1:], len(s)]
    for a, b in zip(starts, ends):
        ranks[order[a:b]] = (a + b + 1) / 2.0
    return float((ranks[y].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def best_f1(y: np.ndarray, s: np.ndarray) -> tuple[float, float, float]:
    """Best F1 over thresholds, with its precision and recall."""
    y = y.astype(np.float64)
    if y.sum() == 0:
        return float("nan"), float("nan"), float("nan")
    tp, fp = _curve(y, s)
    precision = tp / (tp + fp)
    recall = tp / y.sum()
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    i = int(np.argmax(f1))
    return float(f1[i]), float(precision[i]), float(recall[i])


def rank_key(primary: np.ndarray, secondary: np.ndarray) -> np.ndarray:
    """One array ordering lines by primary, ties broken by secondary (scores saturate at 1)."""
    order = np.lexsort((secondary, primary))
    pairs = np.stack((primary[order], secondary[order]), axis=1)
    distinct = np.r_[True, np.any(pairs[1:] != pairs[:-1], axis=1)]
    key = np.empty(len(primary), dtype=np.float64)
    key[order] = np.cumsum(distinct)
    return key


# -- input -----------------------------------------------------------------------------------
def detect_format(lines: Sequence[bytes]) -> tuple[str, bool]:
    """The preset matching most of the first lines, and whether a label column precedes it."""
    sample = [ln.decode("utf-8", errors="replace") for ln in lines[:200] if ln.strip()]
    best, best_rate, labelled = "plain", 0.0, False
    for name in _DETECT_ORDER:
        regex = PRESETS[name].regex
        assert regex is not None
        for strip in (False, True):
            texts = [t.split(" ", 1)[1] if strip and " " in t else t for t in sample]
            rate = sum(1 for t in texts if regex.match(t)) / max(1, len(texts))
            if rate > best_rate + 1e-9:
                best, best_rate, labelled = name, rate, strip
    return (best, labelled) if best_rate >= 0.9 else ("plain", False)


def load_model(weights: str | None, seed: int = 0) -> LogGRU:
    """The checkpoint given, else the bundled one, else an untrained model initialised from
    `seed` (the daemon's is seed 0)."""
    path = Path(weights) if weights else DEFAULT_LOG_WEIGHTS
    if weights or path.exists():
        return load_log_checkpoint(path)[0]
    return LogGRU(LogModelConfig(seed=seed))


# -- evaluation ------------------------------------------------------------------------------
@dataclass
class EvalResult:
    """Per line: the label and each method's ranking score; plus what the run saw."""

    labels: np.ndarray  # bool [N]
    detector: np.ndarray  # float64 [N] the detector's score, ties broken by its evidence
    severity: np.ndarray  # float64 [N] baseline (a)
    rarity: np.ndarray  # float64 [N] baseline (b)
    flagged: np.ndarray  # bool [N] is_anomaly
    rejected: Counter[str]
    streams: int
    templates: int
    seconds: float

    def methods(self) -> list[tuple[str, np.ndarray]]:
        return [
            ("detector (score)", self.detector),
            ("baseline: level severity", self.severity),
            ("baseline: template rarity", self.rarity),
        ]


def evaluate(
    lines: Sequence[bytes],
    fmt: str,
    labelled: bool,
    stream_field: str,
    model: LogGRU,
    batch: int = 256,
    key: bytes = b"log",
) -> EvalResult:
    """Stream the lines through parser and partition; returns labels, scores and the baselines."""
    n = len(lines)
    labels = np.zeros(n, dtype=bool)
    texts: list[bytes | None] = []
    for i, line in enumerate(lines):
        if labelled:
            label, _, rest = line.partition(b" ")
            labels[i] = label not in (b"-", b"")  # (a blank line carries no label: it is no alert)
            texts.append(rest)
        else:
            texts.append(line)
    parser = LogParser(fmt, stream_field)
    part = LogPartition(model)
    rarity_book = TemplateBook(MinerConfig(max_templates=model.config.vocab))
    rarity_counts: Counter[int] = Counter()
    score = np.zeros(n)
    evidence = np.zeros(n)
    flagged = np.zeros(n, dtype=bool)
    severity = np.zeros(n)
    rarity = np.zeros(n)
    rejected: Counter[str] = Counter()
    streams: set[str] = set()
    seen = 0
    started = time.perf_counter()
    for a in range(0, n, batch):
        chunk = texts[a : a + batch]
        parsed = parser.parse(list(chunk), [key] * len(chunk), np.zeros(len(chunk), dtype=np.int64))
        rejected.update(reason for _, reason, _ in parsed.dead)
        if not len(parsed):
            continue
        pos = parsed.index + a
        res = part.process(parsed.stream, parsed.ts_ms, parsed.level, parsed.message)
        score[pos] = res.score
        evidence[pos] = res.evidence
        flagged[pos] = res.is_anomaly
        severity[pos] = parsed.level
        streams.update(parsed.stream)
        for j, tid in enumerate(rarity_book.add(parsed.message).template_id.tolist()):
            rarity[pos[j]] = -math.log((rarity_counts[tid] + 1) / (seen + 2))
            rarity_counts[tid] += 1
            seen += 1
    elapsed = time.perf_counter() - started
    return EvalResult(labels, rank_key(score, evidence), severity, rarity, flagged, rejected, len(streams), len(part.book), elapsed)


def _fmt(x: float) -> str:
    return "   n/a" if math.isnan(x) else f"{x:6.3f}"


def report(name: str, result: EvalResult, fmt: str, out: TextIO | None = None) -> None:
    """Print the metrics table for one evaluated file."""
    out = out or sys.stdout
    y = result.labels
    n, pos = len(y), int(y.sum())
    print(f"{name}: {n} lines, {pos} labelled alerts, format {fmt}, {result.streams} streams, {result.templates} templates", file=out)
    if result.rejected:
        print(f"rejected by the parser (scored 0): {dict(result.rejected)}", file=out)
    print(f"{'method':<28} {'AUC-PR':>7} {'ROC-AUC':>8} {'best F1':>8} {'(P':>7} {'R)':>6}", file=out)
    for label, s in result.methods():
        f1, p, r = best_f1(y, s)
        print(f"{label:<28} {_fmt(average_precision(y, s)):>7} {_fmt(roc_auc(y, s)):>8} {_fmt(f1):>8} {_fmt(p):>7} {_fmt(r):>6}", file=out)
    hits = int((result.flagged & y).sum())
    print(f"flagged (is_anomaly): {int(result.flagged.sum())} lines, {hits} of them labelled alerts; {result.seconds:.1f} s", file=out)
    if pos == 0:
        print("no labelled alerts: the ranking metrics are undefined, and every flag is a false alarm by the labels", file=out)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="streamer logeval", description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("file", help="log file, one line per record")
    ap.add_argument("--format", default="auto", help=f"preset ({', '.join(PRESETS)}), a regex with named groups, or auto")
    ap.add_argument("--labels", choices=("auto", "first-field", "none"), default="auto", help="is the first field a label ('-' = normal)")
    ap.add_argument("--stream-field", default="service", help="field naming the stream ('key': one stream for the file)")
    ap.add_argument("--batch", type=int, default=256, help="lines per simulated poll")
    ap.add_argument("--weights", default=None, help="log model checkpoint (default: the bundled one, else untrained)")
    ap.add_argument("--seed", type=int, default=0, help="initial weights of an untrained model (default 0, as the daemon's)")
    args = ap.parse_args(argv)
    # As the daemon on a 2-core machine: the log model's ops are tiny, more threads only contend.
    torch.set_num_threads(1)
    lines = Path(args.file).read_bytes().splitlines()
    detected, labelled = detect_format(lines)
    fmt = detected if args.format == "auto" else args.format
    if args.labels == "first-field":
        labelled = True
    elif args.labels == "none":
        labelled = False
    elif args.format != "auto":
        labelled = fmt in LABELLED_PRESETS
    result = evaluate(lines, fmt, labelled, args.stream_field, load_model(args.weights, args.seed), args.batch)
    report(Path(args.file).name, result, fmt)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
