"""Log evidence to a score in [0, 1]: per-stream gamma tail, floored at the calibrated-model null.

Same approach as models/calibration.py (running, winsorised mean and variance per stream, a
gamma distribution fitted to them by moments, warm-up before anything is flagged), with one
change the log statistic needs. The statistic here is a sum of -log p-values; under a
calibrated model each is at most Exp(1), so the null has mean ~1 and variance ~1. Log streams
are mostly routine lines whose p-values are close to 1 (statistic ~0), so a stream's own
moments are tiny, and a gamma fitted to them alone would call every occasional WARN
impossible. The fitted moments are therefore floored at the null's: a stream whose surprises
run high gets a heavier tail, but none gets a thinner tail than a calibrated model implies.

The evidence combines the stream-calibrated tail, in nats (-log P(statistic >= x)), with the
line's severity prior as log-odds; the score puts it on the sensor streams' scale,
-log10(p) / decades capped at 1, so the same score means the same for a log line and a sensor
reading. A FATAL line needs less surprise than an INFO line to reach the threshold, a routine
one still does not.
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any

import torch

from models.calibration import CalibrationConfig

# The log detector's own decision defaults, pinned here so that changes to the sensor
# defaults in models/calibration.py do not move log scores (the threshold also decides what
# the online learner skips).
# threshold 4/6 on the -log10(p)/6 scale: p <= 1e-4.
LOG_CALIBRATION_DEFAULTS = {"warmup": 50, "threshold": 4.0 / 6.0, "alpha": 0.005, "winsor": 25.0}
NULL_MEAN = 1.0
NULL_VAR = 1.0
MAX_TAIL_NATS = 700.0


def log_calibration(**overrides: Any) -> CalibrationConfig:
    """A CalibrationConfig with the log defaults (warm-up 50 lines, threshold p <= 1e-4)."""
    return CalibrationConfig(**{**LOG_CALIBRATION_DEFAULTS, **overrides})


def calibration_from_dict(data: dict[str, Any]) -> CalibrationConfig:
    """Rebuild from a snapshot, ignoring fields this version of CalibrationConfig lacks."""
    known = {f.name for f in fields(CalibrationConfig)}
    return CalibrationConfig(**{k: v for k, v in data.items() if k in known})


def calibrate_log(
    cfg: CalibrationConfig,
    x: torch.Tensor,
    prior: torch.Tensor,
    n: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    steps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Score one line per row and update the row's statistics.

    x: float64 [B] the line's surprise statistic; prior: float64 [B] severity log-odds;
    n, mean, var: the stream's running statistics of x; steps: lines seen before this one.
    Returns (score, evidence = tail nats + prior, is_anomaly, (n, mean, var)).
    """
    m = mean.clamp(min=NULL_MEAN)
    v = var.clamp(min=NULL_VAR)
    shape = (m * m / v).clamp(0.05, 1e4)
    scale = v / m
    tail = torch.special.gammaincc(shape, x.clamp(min=0.0) / scale)
    nats = (-torch.log(tail)).clamp(min=0.0, max=MAX_TAIL_NATS)
    evidence = nats + prior
    score = (evidence / (math.log(10.0) * cfg.decades)).clamp(0.0, 1.0)
    is_anomaly = (steps >= cfg.warmup) & (score >= cfg.threshold)

    clipped = torch.minimum(x, cfg.winsor * m)
    n_new = n + 1
    alpha = torch.clamp(1.0 / n_new, min=cfg.alpha)
    delta = clipped - mean
    first = n_new <= 1
    mean_new = torch.where(first, clipped, mean + alpha * delta)
    var_new = torch.where(first, torch.zeros_like(var), (1.0 - alpha) * (var + alpha * delta * delta))
    return score, evidence, is_anomaly, (n_new, mean_new, var_new)
