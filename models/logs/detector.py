"""The pure core for logs: one step (`advance`), the per-stream state bank, batched `process`.

Same shape as models/detector.py. `advance` is the single definition of one event's step:
surprise of the event under the prediction made after the stream's previous event, its
calibrated score, and the GRU step that reads the event. Training calls it with gradients on
whole sequences; `LogDetector.process` calls it in wavefronts (the k-th event of every stream in
the batch share one GRU call), between the fixed update points of the online learner.

Surprise (nats, reported) = template term (-log p of the template's row given the line's
level, or of the NEW class for a template never seen before) + level term (-log P(level >=
this one): severity is ordinal and only a rise is surprising) + timing term (Gaussian NLL of
the stream-normalised log gap given the template; absent until a stream has two gaps).

Score: each term's p-value under the model's own prediction (for a categorical, the
probability of an outcome at most as likely as the one that came; two-sided for the gap) is
turned into evidence. The level term counts in full; the template and timing terms only past
a noise floor (-log p > evidence_floor, 3 nats, i.e. p < 5%): under a calibrated model each
-log p is ~Exp(1), so routine lines would otherwise add a nat of noise per term, enough to
bury the lines that matter. That statistic is calibrated per stream (logs/calibration.py)
and a severity prior (severity_prior, 2 nats per level above INFO) is added as log-odds. A stream
with one line so far, common for logs, still gets a meaningful score, since the calibrator
starts from "the model is calibrated".

The "expected template" is the most likely template given the line's own level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from models.calibration import CalibrationConfig
from models.logs.calibration import calibrate_log
from models.logs.model import LOG_SQRT_2PI, LogGRU, LogModelConfig
from models.state import RowBank

LOG2 = math.log(2.0)
TERMS = ("template", "level", "timing")
INFO = 3  # streamer.logformats.LEVEL_NAMES.index("INFO")


def bank_fields(cfg: LogModelConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Per-row shape and dtype of every per-stream tensor."""
    h, f = cfg.hidden, cfg.feats
    return {
        "h": ((h,), torch.float32),  # hidden state after the stream's last event
        "h_prev": ((h,), torch.float32),  # ... and before it: the training example's start
        "prev_row": ((), torch.int64),  # the last event's inputs, to replay it with gradients
        "prev_level": ((), torch.int64),
        "prev_feats": ((f,), torch.float32),
        "last_ts": ((), torch.float64),  # ms
        "u_n": ((), torch.float64),  # normaliser of the log inter-arrival u
        "u_mean": ((), torch.float64),
        "u_var": ((), torch.float64),
        "cal_n": ((), torch.float64),
        "cal_mean": ((), torch.float64),
        "cal_var": ((), torch.float64),
        "steps": ((), torch.int64),  # events seen by the stream
    }


def empty_log_state(cfg: LogModelConfig, rows: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    return {name: torch.zeros((rows, *shape), dtype=dtype, device=device) for name, (shape, dtype) in bank_fields(cfg).items()}


class LogStateBank(RowBank):
    """The log streams' bank: the fields of `bank_fields` for every row."""

    def __init__(self, config: LogModelConfig, device: torch.device | str = "cpu", capacity: int = 256) -> None:
        self.config = config
        super().__init__(device, capacity)

    def _empty(self, rows: int) -> dict[str, torch.Tensor]:
        return empty_log_state(self.config, rows, self.device)


@dataclass
class LogEvents:
    """One event per row for B distinct streams (or a training batch)."""

    row: torch.Tensor  # int64 [B] template row
    is_new: torch.Tensor  # bool [B] template never seen before this event
    level: torch.Tensor  # int64 [B]
    ts_ms: torch.Tensor  # float64 [B]
    params: torch.Tensor  # float64 [B, P]
    params_mask: torch.Tensor  # bool [B, P]


@dataclass
class LogStep:
    surprise: torch.Tensor  # float64 [B] nats
    terms: torch.Tensor  # float32 [B, 3] template, level, timing
    score: torch.Tensor  # float64 [B]
    is_anomaly: torch.Tensor  # bool [B]
    log_p: torch.Tensor  # float32 [B, 3] log p-value of each term under the prediction
    evidence: torch.Tensor  # float64 [B] what the score calibrates
    expected_row: torch.Tensor  # int64 [B] argmax of the template prediction (V = NEW)
    loss: torch.Tensor  # float32 [B] the NLL terms summed, with gradients (training)


@dataclass
class Example:
    """What the online learner needs to replay one prediction with gradients."""

    h_prev: torch.Tensor  # [B, H] state before the previous event
    prev_row: torch.Tensor
    prev_level: torch.Tensor
    prev_feats: torch.Tensor
    has_prev: torch.Tensor  # bool [B]; False: the prediction came from the zero state
    target: torch.Tensor  # int64 [B] row or NEW
    row: torch.Tensor  # int64 [B] the template's row (the timing is predicted given it)
    level: torch.Tensor  # int64 [B]
    u: torch.Tensor  # float32 [B]
    timed: torch.Tensor  # bool [B] there was a timing prediction (u is the normalised gap)


def gaussian_nll(x: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    r = (x - mu) * torch.exp(-log_sigma)
    return 0.5 * r * r + log_sigma + LOG_SQRT_2PI


def log_tail(logp: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """log of P(an outcome at most as likely as the target) under a categorical: a p-value."""
    lt = logp.gather(1, target[:, None])
    masked = torch.where(logp <= lt + 1e-6, logp, torch.full_like(logp, float("-inf")))
    return torch.logsumexp(masked, dim=1).clamp(max=0.0)


def encode_inputs(cfg: LogModelConfig, ev: LogEvents, first: torch.Tensor, u: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Dense per-event inputs (everything but the embedding and the level one-hot)."""
    f32 = torch.float32
    timed = ~first
    params = torch.where(ev.params_mask, torch.asinh(ev.params) / 8.0, torch.zeros_like(ev.params)).to(f32)
    return torch.cat(
        (
            ev.is_new.to(f32)[:, None],
            first.to(f32)[:, None],
            torch.where(timed, u / 8.0, torch.zeros_like(u)).to(f32)[:, None],
            (torch.asinh(z) / 2.0).to(f32)[:, None],
            params,
            ev.params_mask.to(f32),
        ),
        dim=1,
    )


def level_log_tail(logp_l: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """log P(level >= the observed one) [B]: severity is ordinal and only a rise is surprising
    (an INFO line where errors were expected is not an alarm); 0 for an unknown level."""
    tail = torch.logcumsumexp(logp_l.flip(1), dim=1).flip(1)
    return torch.where(level > 0, tail.gather(1, level[:, None])[:, 0], torch.zeros_like(tail[:, 0])).clamp(max=0.0)


def predict_nll(
    model: LogGRU,
    h: torch.Tensor,
    active: torch.Tensor,
    target: torch.Tensor,
    row: torch.Tensor,
    level: torch.Tensor,
    u: torch.Tensor,
    timed: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Under the heads at h: the training NLL terms [B, 3] of (template target, level, u), the
    surprise terms [B, 3] (the same, but the level term is the ordinal tail), the template
    log-probs, and the log p-values of level and timing."""
    cap = model.config.max_term_nll
    logp_t, logp_l, mu, log_sigma = model.heads(h, active, level, row)
    nll_t = -logp_t.gather(1, target[:, None])[:, 0]
    nll_l = -logp_l.gather(1, level[:, None])[:, 0]
    nll_u = torch.where(timed, gaussian_nll(u, mu, log_sigma), torch.zeros_like(u))
    train = torch.stack((nll_t, nll_l, nll_u), dim=1).clamp(max=cap)
    lt_l = level_log_tail(logp_l, level)
    surprise = torch.stack((nll_t, -lt_l, nll_u), dim=1).clamp(max=cap)
    resid = torch.where(timed, (u - mu) * torch.exp(-log_sigma), torch.zeros_like(u))
    lt_u = torch.where(timed, LOG2 + torch.special.log_ndtr(-resid.abs()), torch.zeros_like(u))
    return train, surprise, logp_t, lt_l, lt_u


def severity_prior(cfg: LogModelConfig, level: torch.Tensor) -> torch.Tensor:
    """Prior log-odds that a line is an incident, from its level alone: nats per level above INFO."""
    return cfg.severity_prior * (level - INFO).clamp(min=0).double()


def surprise_evidence(cfg: LogModelConfig, lt_t: torch.Tensor, lt_l: torch.Tensor, lt_u: torch.Tensor) -> torch.Tensor:
    """How unexpected the line was, float64 [B]: -log P(level >= this) plus the part of the
    template and timing surprise beyond a noise floor (-log p - floor, when positive)."""
    floor = cfg.evidence_floor
    excess = (-lt_t.double() - floor).clamp(min=0.0) + (-lt_u.double() - floor).clamp(min=0.0)
    return excess - lt_l.double()


def advance(
    model: LogGRU,
    cal: CalibrationConfig,
    state: dict[str, torch.Tensor],
    ev: LogEvents,
    active: torch.Tensor,
) -> tuple[dict[str, torch.Tensor], LogStep, Example]:
    """One event for each of B distinct streams. active: bool [B, V+1], the rows live when each
    event arrived (its own template's row is not live yet when the event is its first)."""
    cfg = model.config
    steps = state["steps"]
    first = steps == 0
    target = torch.where(ev.is_new, torch.full_like(ev.row, cfg.new_class), ev.row)
    dt_s = ((ev.ts_ms - state["last_ts"]) / 1000.0).clamp(min=0.0)
    u64 = torch.log(dt_s + cfg.dt_eps_s)
    # The timing target is u normalised by the stream's own history (read before this event
    # updates it), so a heartbeat every 10 s and a request log at 100/s are judged alike;
    # it exists once the stream has two earlier gaps to normalise by.
    n, mean, var = state["u_n"], state["u_mean"], state["u_var"]
    timed = (~first) & (n >= 2)
    z64 = (u64 - mean) / torch.sqrt(var.clamp(min=0.0) + cfg.u_std_floor**2)
    u = torch.where(timed, z64, torch.zeros_like(z64)).float()

    # Surprise against the prediction from the state after the stream's previous event.
    train, terms, logp_t, lt_l, lt_u = predict_nll(model, state["h"], active, target, ev.row, ev.level, u, timed)
    surprise = terms.detach().double().sum(dim=1)
    cap = cfg.max_term_nll
    lt_t = log_tail(logp_t.detach(), target).clamp(min=-cap)
    lt_l, lt_u = lt_l.detach().clamp(min=-cap), lt_u.detach().clamp(min=-cap)
    unexpected = surprise_evidence(cfg, lt_t, lt_l, lt_u)
    score, evidence, is_anomaly, (cal_n, cal_mean, cal_var) = calibrate_log(
        cal, unexpected, severity_prior(cfg, ev.level), state["cal_n"], state["cal_mean"], state["cal_var"], steps
    )

    feats = encode_inputs(cfg, ev, first, u64, torch.where(timed, z64, torch.zeros_like(z64)))
    h_new = model.step(ev.row, ev.level, feats, state["h"])
    # Per-stream normaliser of u: exact at first, then an exponential window.
    gap = ~first
    n_new = torch.where(gap, n + 1, n)
    alpha = torch.clamp(1.0 / n_new.clamp(min=1.0), min=cfg.norm_alpha)
    delta = u64 - mean
    mean_new = torch.where(gap, mean + alpha * delta, mean)
    var_new = torch.where(gap, (1.0 - alpha) * (var + alpha * delta * delta), var)

    new_state = {
        "h": h_new,
        "h_prev": state["h"],
        "prev_row": ev.row,
        "prev_level": ev.level,
        "prev_feats": feats,
        "last_ts": ev.ts_ms,
        "u_n": n_new,
        "u_mean": mean_new,
        "u_var": var_new,
        "cal_n": cal_n,
        "cal_mean": cal_mean,
        "cal_var": cal_var,
        "steps": steps + 1,
    }
    log_p = torch.stack((lt_t, lt_l, lt_u), dim=1)
    out = LogStep(surprise, terms.detach(), score, is_anomaly, log_p, evidence, logp_t.detach().argmax(dim=1), train.sum(dim=1))
    example = Example(
        state["h_prev"], state["prev_row"], state["prev_level"], state["prev_feats"], ~first, target, ev.row, ev.level, u, timed
    )
    return new_state, out, example


def example_loss(model: LogGRU, ex: Example, active: torch.Tensor) -> torch.Tensor:
    """Per-example NLL with gradients: replay the previous event's step from h_prev, then
    score the target under the heads (the zero state for a stream's first event)."""
    h = model.step(ex.prev_row, ex.prev_level, ex.prev_feats, ex.h_prev)
    h = torch.where(ex.has_prev[:, None], h, torch.zeros_like(h))
    train, _, _, _, _ = predict_nll(model, h, active, ex.target, ex.row, ex.level, ex.u, ex.timed)
    return train.sum(dim=1)


def batch_events(
    row: np.ndarray,
    is_new: np.ndarray,
    level: np.ndarray,
    ts_ms: np.ndarray,
    params: np.ndarray,
    params_mask: np.ndarray,
    device: torch.device,
) -> LogEvents:
    return LogEvents(
        torch.as_tensor(row, dtype=torch.int64, device=device),
        torch.as_tensor(is_new, dtype=torch.bool, device=device),
        torch.as_tensor(level, dtype=torch.int64, device=device),
        torch.as_tensor(ts_ms, dtype=torch.float64, device=device),
        torch.as_tensor(params, dtype=torch.float64, device=device),
        torch.as_tensor(params_mask, dtype=torch.bool, device=device),
    )


def select(ev: LogEvents, idx: torch.Tensor) -> LogEvents:
    return LogEvents(ev.row[idx], ev.is_new[idx], ev.level[idx], ev.ts_ms[idx], ev.params[idx], ev.params_mask[idx])
