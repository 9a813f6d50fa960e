"""First calibration: raw surprise to a score in [0, 1] that means the same on every stream.

A stream's raw surprise depends on how predictable it is and how many features it has, so a
global threshold on it would flag noisy streams forever and quiet ones never. Each stream
therefore keeps a running mean and variance of its own surprise, and the score is the normal
CDF of how far the current surprise sits above that history. The statistics are winsorised:
a flagged event moves them only as far as a 4-sigma event would, so one anomaly does not
teach the calibrator that anomalies are normal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CalibrationConfig:
    """Per-stream decision settings; not part of the weights, set from config.yaml."""

    warmup: int = 100  # events per stream before anything may be flagged
    threshold: float = 0.9999  # score at or above which is_anomaly is set
    alpha: float = 0.005  # exponential window of the surprise statistics (~200 events)
    winsor_sigma: float = 4.0  # cap on how far one event moves the statistics

    def __post_init__(self) -> None:
        if self.warmup < 0:
            raise ValueError("warmup must be >= 0")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError("threshold must be in (0, 1]")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError("alpha must be in (0, 1)")


def calibrate(
    cfg: CalibrationConfig,
    surprise: torch.Tensor,
    valid: torch.Tensor,
    n: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    steps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Score one event per row and update that row's surprise statistics.

    surprise, mean, var, n: float64 [B]; valid: bool [B] (the stream had a prediction to be
    surprised against); steps: int64 [B] events seen before this one. Returns score, is_anomaly
    and the new (n, mean, var).
    """
    std = torch.sqrt(var + 1e-6)
    z = (surprise - mean) / std
    ready = valid & (n >= 2)
    score = torch.where(ready, torch.special.ndtr(z), torch.zeros_like(z))
    is_anomaly = ready & (steps >= cfg.warmup) & (score >= cfg.threshold)

    clipped = torch.where(n >= 2, torch.minimum(surprise, mean + cfg.winsor_sigma * std), surprise)
    n_new = torch.where(valid, n + 1, n)
    alpha = torch.clamp(1.0 / n_new.clamp(min=1.0), min=cfg.alpha)
    delta = clipped - mean
    mean_new = torch.where(valid, mean + alpha * delta, mean)
    var_new = torch.where(valid, (1.0 - alpha) * (var + alpha * delta * delta), var)
    return score, is_anomaly, (n_new, mean_new, var_new)
