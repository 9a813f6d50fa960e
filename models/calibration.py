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

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CalibrationConfig:
    """Per-stream decision settings; not part of the weights, set from config.yaml."""

    warmup: int = 100  # events per stream before anything may be flagged
    # Score at or above which is_anomaly is set. Sensor streams (calibrate_tail) use 0.5, i.e.
    # p <= 1e-3 (TAIL_THRESHOLD); the gamma calibrator's scores are 1 - p, hence 0.9999.
    threshold: float = 0.9999
    decades: float = 6.0  # score = -log10(tail probability) / decades, capped at 1
    alpha: float = 0.005  # exponential window of the statistics (~200 events)
    winsor: float = 25.0  # cap on one event's q/k, in multiples of the stream's mean
    # Empirical tail calibrator (sensor streams): a decayed histogram of log-surprise.
    window: int = 2000  # events of history the histogram remembers (exponential decay)
    tail_slope: float = 3.0  # beyond the largest surprise seen: p falls as q^-tail_slope

    def __post_init__(self) -> None:
        if self.warmup < 0:
            raise ValueError("warmup must be >= 0")
        if self.decades <= 0:
            raise ValueError("decades must be > 0")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError("threshold must be in (0, 1]")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError("alpha must be in (0, 1)")
        if self.window < 2:
            raise ValueError("window must be >= 2")


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


TAIL_THRESHOLD = 0.5

# Histogram over ln(q): 64 bins of 0.375 from e^-12 to e^12 cover every surprise that matters;
# anything outside lands in the end bins.
HIST_BINS = 64
HIST_LO = -12.0
HIST_HI = 12.0
HIST_PRIOR = 1.0


def calibrate_tail(
    cfg: CalibrationConfig,
    sq: torch.Tensor,
    valid: torch.Tensor,
    hist: torch.Tensor,
    steps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Score from P(a surprise at least this large) under the stream's own decayed history.

    The score is -log10(p) / decades, capped at 1: with the default 6 decades, 0.5 means one
    event in a thousand of this stream's own history is as surprising, 1.0 one in a million or
    rarer. A log scale keeps extreme events apart (1 - p would round them all to 1.0).

    Model-based tails (chi-square, gamma) are wrong for real streams, whose surprise is a
    mixture: a perfectly regular series is calm for hours and then surprising at every daily
    transition. A histogram of the stream's own log-surprise learns such a mixture, so a
    transition seen a few times stops being flagged. Beyond the largest surprise in the
    history, the tail is extrapolated exponentially in log q, which is what puts a spike an
    order of magnitude above anything seen before far into the tail.

    sq: float64 [B] sum of squared standardised residuals; valid: bool [B]; hist: float32
    [B, HIST_BINS] decayed counts; steps: int64 [B]. Returns score, is_anomaly, new hist.
    """
    width = (HIST_HI - HIST_LO) / HIST_BINS
    lq = torch.log(sq.clamp(min=1e-30))
    b = ((lq - HIST_LO) / width).floor().clamp(0, HIST_BINS - 1).long()
    h = hist.double()
    total = h.sum(dim=1)
    at_or_above = torch.flip(torch.cumsum(torch.flip(h, [1]), dim=1), [1])  # [B, bins]: count in bins >= i
    here = h.gather(1, b[:, None]).squeeze(1)
    above = at_or_above.gather(1, b[:, None]).squeeze(1) - 0.5 * here
    log_norm = torch.log(total + 2 * HIST_PRIOR)
    log_p = torch.log(above.clamp(min=0.0) + HIST_PRIOR) - log_norm
    # Past the highest occupied bin: a power-law tail from that bin's upper edge.
    occupied = h > 1e-9
    top = torch.where(occupied, torch.arange(HIST_BINS, device=h.device), -1).max(dim=1).values
    top_edge = HIST_LO + (top + 1).double() * width
    beyond = (above <= 1e-9) & (top >= 0)
    log_p_ext = math.log(HIST_PRIOR) - log_norm - cfg.tail_slope * (lq - top_edge).clamp(min=0.0)
    log_p = torch.where(beyond, log_p_ext, log_p)
    score = torch.where(valid, (-log_p / (math.log(10.0) * cfg.decades)).clamp(0.0, 1.0), torch.zeros_like(log_p))
    is_anomaly = valid & (steps >= cfg.warmup) & (score >= cfg.threshold)

    # Every event joins the history, flagged ones too: after a lasting change (a new level, a
    # new noise regime) the stream must stop being flagged once the change is its new normal.
    learn = valid
    decay = 1.0 - 1.0 / cfg.window
    new = hist * torch.where(learn, decay, 1.0).to(hist.dtype)[:, None]
    bump = torch.zeros_like(new).scatter_(1, b[:, None], learn.to(new.dtype)[:, None])
    return score, is_anomaly, new + bump
