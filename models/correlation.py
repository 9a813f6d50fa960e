"""The correlation view: is a feature out of line with the stream's other features?

Every other view looks at one feature at a time, against its own past. A sensor that sticks,
drifts or decouples while staying inside its own normal range is invisible to them, but not
to its neighbours: on a machine, temperature and vibration follow rpm, and pressure follows
load. So each stream keeps the correlations of its features' standardised prediction errors
(what each feature did that its own past did not predict), and this view scores each feature's
error given the other features' errors of the same event (the Gaussian conditional): the part
of a feature's surprise that its correlated neighbours do not explain. A stuck temperature
while rpm keeps moving leaves temperature's own error near zero once its predictor follows
the flat line, but far from the error that rpm's implies.

The view applies to events with at least two features whose errors have enough history; a
single-feature stream never uses it (and is scored against four views, not five). Like the
learners in models/adapt.py it skips events the stream has just flagged. Pure torch.
"""

from __future__ import annotations

import torch

from models.adapt import averaging_rate

CORR_ALPHA = 0.005  # the correlations follow the last ~200 events
CORR_MIN = 30  # joint events before a pair's correlation is used
# Shrinkage toward independence: keeps near-duplicate features (two probes of one quantity)
# invertible, and caps how much one feature can be explained by the others at 95%.
CORR_SHRINK = 0.05
CORR_CLIP = 5.0  # an error enters the correlations as at most this many deviations (winsorised)


def standardised_errors(r: torch.Tensor, var: torch.Tensor, ready: torch.Tensor) -> torch.Tensor:
    """The mixed prediction's errors in units of their running deviation [B, F], 0 where not ready."""
    return torch.where(ready, r / torch.sqrt(var.clamp(min=1e-300)), torch.zeros_like(r))


def active_width(ready: torch.Tensor, least: int = 2) -> int:
    """How many leading features the view must look at for this batch: 0 when no event has
    `least` features with an error (two: nothing to correlate), else up to the last feature of
    such an event.

    On CPU the view works on that leading block only: most streams use a few of max_features
    slots, and an 8x8 batched inverse costs six times a 4x4 one. On a GPU the check would force
    a sync per wavefront, and the full block is cheap there, so it is always max_features."""
    if ready.device.type != "cpu":
        return ready.shape[1]
    multi = ready.sum(dim=1) >= least
    if not bool(multi.any()):
        return 0
    return int(ready[multi].any(dim=0).nonzero().max()) + 1


def correlation_q(state: dict[str, torch.Tensor], z: torch.Tensor, ready: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each feature's squared error given the others' (its conditional surprise) [B, F], and
    whether the view applies to the event [B] (two or more usable features); 0 where not.
    k: `active_width(ready)`.

    With P the inverse of the (shrunk) covariance of the usable features' errors, feature i's
    conditional error is (P z)_i / P_ii with variance 1 / P_ii, so its squared standardised
    value is (P z)_i^2 / P_ii. Unusable features get an identity row and a zero error: they
    neither explain nor are explained. (It is computed in correlation units, errors divided by
    their deviations, so the result does not depend on the features' scales.)"""
    q = torch.zeros_like(z)
    if k < 2:
        return q, torch.zeros_like(z[:, 0], dtype=torch.bool)
    c = state["corr_cov"][:, :k, :k].contiguous()
    use = ready[:, :k] & (state["corr_n"][:, :k] >= CORR_MIN) & (torch.diagonal(c, dim1=1, dim2=2) > 0)
    applies = use.sum(dim=1) >= 2
    use_f = (use & applies[:, None]).to(c.dtype)
    pair = use_f[:, :, None] * use_f[:, None, :]
    eye = torch.eye(k, dtype=c.dtype, device=c.device)
    # In correlation units (the result does not depend on the features' scales), shrunk toward
    # independence: a valid correlation matrix then has no eigenvalue below CORR_SHRINK.
    sd = torch.sqrt(torch.where(pair.bool() & (eye > 0), c, 1.0).diagonal(dim1=1, dim2=2).clamp(min=1e-300))
    corr = (c / (sd[:, :, None] * sd[:, None, :])).clamp(-1.0, 1.0)
    # More while the estimate is young: from n joint events, k features' sample correlations are
    # noisy enough (~1/sqrt(n) each) to make a valid-looking matrix nearly singular.
    n_min = torch.where(use_f > 0, state["corr_n"][:, :k].to(c.dtype), torch.inf).amin(dim=1).clamp(min=1.0)
    shrink = (use_f.sum(dim=1) / n_min).clamp(min=CORR_SHRINK, max=1.0)[:, None, None]
    cov = pair * corr * (1.0 - shrink * (1.0 - eye)) + (1.0 - pair) * eye
    # Each moment is learned from the events where both its features had an error, so with a
    # feature that is often absent they come from different events and need not form a valid
    # correlation matrix: nearly singular ones passed as valid and scored ordinary events at
    # hundreds of times their error (and the calibration history kept those for ~20,000
    # events). A matrix with an eigenvalue below half the shrinkage's floor is not one a valid
    # estimate gives: such a stream is scored as if its features were unrelated this event (its
    # errors' plain squares) rather than through an inverse that is meaningless there.
    _, info = torch.linalg.cholesky_ex(cov - 0.5 * shrink * eye)
    cov = torch.where((info == 0)[:, None, None], cov, eye.expand_as(cov))
    # (In float64 from here: an error at the readings' range limit squares to ~1e48.)
    prec = torch.linalg.inv_ex(cov)[0].double()
    pz = (prec @ (z[:, :k] / sd.double() * use_f).unsqueeze(2)).squeeze(2)
    q[:, :k] = pz * pz / torch.diagonal(prec, dim1=1, dim2=2) * use_f
    return q, applies


def correlation_update(
    state: dict[str, torch.Tensor], z: torch.Tensor, ready: torch.Tensor, learn: torch.Tensor, k: int
) -> dict[str, torch.Tensor]:
    """The errors' second moments after this event, learned from events with two or more
    features that had an error and were not flagged (so what a stream learns does not depend on
    which other streams share its batch): exact averages while the pair's younger feature has
    few such events, then an exponential window of 1/CORR_ALPHA events. k: `active_width(ready)`;
    features beyond it are unchanged."""
    c, n = state["corr_cov"], state["corr_n"]
    if k < 2:
        return {"corr_cov": c, "corr_n": n}
    both = ready[:, :k] & learn[:, :k]
    both = (both & (both.sum(dim=1, keepdim=True) >= 2)).to(c.dtype)
    rate = both * averaging_rate(n[:, :k], CORR_ALPHA)
    rate = torch.maximum(rate[:, :, None], rate[:, None, :]) * (both[:, :, None] * both[:, None, :])
    zc = z[:, :k].clamp(-CORR_CLIP, CORR_CLIP).to(c.dtype)
    ck = c[:, :k, :k]
    c, n = c.clone(), n.clone()
    c[:, :k, :k] = ck + rate * (zc[:, :, None] * zc[:, None, :] - ck)
    n[:, :k] += both
    return {"corr_cov": c, "corr_n": n}
