"""First calibration: raw surprise to a score in [0, 1] that means the same on every stream.

A stream's raw surprise depends on how predictable it is and how many features it has, so a
global threshold on it would flag noisy streams forever and quiet ones never. The calibrator
works on the sum of squared standardised residuals of the event's features, q, which is
chi-square with k degrees of freedom when the model's predictive distribution is right. Real
streams are not that kind, so each stream keeps a running mean and variance of q/k and the
score is the CDF of a gamma distribution fitted to them by moments: a stream whose residuals
are over-dispersed gets a heavier tail, a well-predicted one the chi-square tail. The
statistics are winsorised, so one anomaly does not teach the calibrator that anomalies are
normal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CalibrationConfig:
    """Per-stream decision settings; not part of the weights, set from config.yaml."""

    warmup: int = 100  # events per stream before anything may be flagged
    threshold: float = 0.9999  # score at or above which is_anomaly is set
    alpha: float = 0.005  # exponential window of the statistics (~200 events)
    winsor: float = 25.0  # cap on one event's q/k, in multiples of the stream's mean

    def __post_init__(self) -> None:
        if self.warmup < 0:
            raise ValueError("warmup must be >= 0")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError("threshold must be in (0, 1]")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError("alpha must be in (0, 1)")


def calibrate(
    cfg: CalibrationConfig,
    sq: torch.Tensor,
    dof: torch.Tensor,
    valid: torch.Tensor,
    n: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    steps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Score one event per row and update that row's statistics.

    sq: float64 [B] sum of squared standardised residuals over dof features; n, mean, var:
    float64 [B] the stream's count, mean and variance of sq/dof; valid: bool [B] (there was a
    prediction); steps: int64 [B] events seen before this one. Returns score, is_anomaly and
    the new (n, mean, var).
    """
    u = sq / dof.clamp(min=1.0)
    # Before the statistics exist, assume the model is calibrated: mean 1, chi-square variance.
    m = torch.where(n >= 2, mean, torch.ones_like(mean)).clamp(min=1e-6)
    v = torch.where(n >= 2, var, 2.0 / dof.clamp(min=1.0)).clamp(min=1e-12)
    shape = (m * m / v).clamp(0.05, 1e4)
    score = torch.where(valid, torch.special.gammainc(shape, u * shape / m), torch.zeros_like(u))
    is_anomaly = valid & (steps >= cfg.warmup) & (score >= cfg.threshold)

    clipped = torch.minimum(u, cfg.winsor * m)
    n_new = torch.where(valid, n + 1, n)
    alpha = torch.clamp(1.0 / n_new.clamp(min=1.0), min=cfg.alpha)
    first = n_new <= 1
    delta = clipped - mean
    mean_new = torch.where(valid, torch.where(first, clipped, mean + alpha * delta), mean)
    var_new = torch.where(valid, torch.where(first, torch.zeros_like(var), (1.0 - alpha) * (var + alpha * delta * delta)), var)
    return score, is_anomaly, (n_new, mean_new, var_new)
