"""The correlation view (models/correlation.py): a feature's error given the other features'."""

from __future__ import annotations

import numpy as np
import torch

from models.calibration import CalibrationConfig
from models.correlation import CORR_ALPHA, CORR_CLIP, CORR_MIN, CORR_SHRINK, active_width, correlation_q, correlation_update
from models.detector import VIEWS, Detector
from models.gru import DEFAULT_WEIGHTS, ModelConfig, load_checkpoint
from models.state import empty_state

F = ModelConfig().max_features


def _state(cov: list[list[float]], rows: int = 1, n: float = 100.0) -> dict[str, torch.Tensor]:
    state = empty_state(ModelConfig(), rows)
    k = len(cov)
    state["corr_cov"][:, :k, :k] = torch.tensor(cov, dtype=torch.float32)
    state["corr_n"][:, :k] = n
    return state


def _z(*values: float) -> tuple[torch.Tensor, torch.Tensor]:
    z = torch.zeros(1, F, dtype=torch.float64)
    z[0, : len(values)] = torch.tensor(values, dtype=torch.float64)
    ready = torch.zeros(1, F, dtype=torch.bool)
    ready[0, : len(values)] = True
    return z, ready


def test_the_conditional_surprise_is_the_two_feature_formula_whatever_the_scales():
    # Two features with error correlation 0.9 (shrunk to 0.855): the surprise of one given the
    # other is (z1 - rho z2)^2 / (1 - rho^2). Errors in step are unremarkable; the same sizes out of
    # step are not, though each alone is one deviation.
    rho = 0.9 * (1.0 - CORR_SHRINK)
    for sd in ((1.0, 1.0), (2.0, 30.0)):
        cov = [[sd[0] ** 2, 0.9 * sd[0] * sd[1]], [0.9 * sd[0] * sd[1], sd[1] ** 2]]
        state = _state(cov)
        for z1, z2 in ((1.0, 0.9), (1.0, -1.0)):
            z, ready = _z(z1 * sd[0], z2 * sd[1])
            k = active_width(ready)
            assert k == 2
            q, applies = correlation_q(state, z, ready, k)
            assert bool(applies[0])
            expect = [(z1 - rho * z2) ** 2 / (1 - rho**2), (z2 - rho * z1) ** 2 / (1 - rho**2)]
            assert np.allclose(q[0, :2].numpy(), expect, rtol=1e-4), (sd, z1, z2, q[0, :2], expect)
            assert float(q[0, 2:].abs().max()) == 0.0
    assert expect[0] > 12.0  # (the out-of-step pair; in step it was 0.2)


def test_the_view_needs_two_features_with_history_and_ignores_the_rest():
    state = _state([[1.0, 0.9, 0.0], [0.9, 1.0, 0.0], [0.0, 0.0, 1.0]])
    z, ready = _z(1.0)
    assert active_width(ready) == 0  # one feature: nothing to correlate, no work at all
    q, applies = correlation_q(state, z, ready, 0)
    assert not bool(applies[0]) and float(q.abs().max()) == 0.0
    young = _state([[1.0, 0.9], [0.9, 1.0]], n=CORR_MIN - 1)
    z, ready = _z(1.0, -1.0)
    q, applies = correlation_q(young, z, ready, 2)
    assert not bool(applies[0]) and float(q.abs().max()) == 0.0
    # A feature without an error this event (absent, or not yet predicted) neither explains nor
    # is explained: the other two score exactly as a two-feature stream would.
    z3, ready3 = _z(1.0, -1.0, 5.0)
    ready3[0, 2] = False
    q3, _ = correlation_q(state, z3, ready3, 3)
    q2, _ = correlation_q(_state([[1.0, 0.9], [0.9, 1.0]]), z, ready, 2)
    assert torch.allclose(q3[0, :2], q2[0, :2]) and float(q3[0, 2]) == 0.0


def test_the_correlations_are_learned_online_but_not_from_flagged_events():
    rng = np.random.default_rng(0)
    state = empty_state(ModelConfig(), 1)
    ready = torch.zeros(1, F, dtype=torch.bool)
    ready[0, :2] = True
    learn = ready.clone()
    for _ in range(3000):
        a, b = rng.normal(size=2)
        z = torch.zeros(1, F, dtype=torch.float64)
        z[0, 0], z[0, 1] = 2.0 * a, 2.0 * (0.8 * a + 0.6 * b)  # sd 2, correlation 0.8
        state.update(correlation_update(state, z, ready, learn, 2))
    c = state["corr_cov"][0, :2, :2].double()
    assert abs(float(c[0, 1] / (c[0, 0] * c[1, 1]).sqrt()) - 0.8) < 0.08, c
    assert abs(float(c[0, 0]) - 4.0) < 1.0
    assert float(state["corr_cov"][0, 2:].abs().max()) == 0.0  # features never seen stay empty
    # A flagged event teaches nothing; an enormous error that is learned moves the moments as if
    # it were CORR_CLIP deviations (winsorised), by at most one exponential-window step.
    z = torch.zeros(1, F, dtype=torch.float64)
    z[0, :2] = 1e6
    before = state["corr_cov"].clone()
    assert torch.equal(correlation_update(state, z, ready, torch.zeros_like(learn), 2)["corr_cov"], before)
    after = correlation_update(state, z, ready, learn, 2)["corr_cov"]
    assert float((after - before).abs().max()) <= CORR_ALPHA * CORR_CLIP**2 + 1e-6


def test_moments_that_are_no_valid_covariance_score_as_unrelated_features():
    # Pairwise correlations of 0.9, 0.9 and -0.9 cannot all hold at once (learned from different
    # events, with a feature often absent, they can be stored). The inverse would be meaningless
    # (negative surprises); the event is scored as if the features were unrelated.
    state = _state([[1.0, 0.9, 0.9], [0.9, 1.0, -0.9], [0.9, -0.9, 4.0]])
    state["corr_cov"][0, 1, 2] = state["corr_cov"][0, 2, 1] = -0.9 * 2.0
    z, ready = _z(1.0, -2.0, 3.0)
    q, applies = correlation_q(state, z, ready, 3)
    assert bool(applies[0])
    assert np.allclose(q[0, :3].numpy(), [1.0, 4.0, 9.0 / 4.0])


def test_the_view_is_scored_once_its_history_holds_half_a_warm_up_whatever_the_settings():
    """The correlation view waits for its history to hold half a warm-up of events, but a decayed
    history never holds more than its window: with `warmup` at twice `calibration_window` the view
    was never scored, and two features that stopped agreeing went unflagged. The wait is capped
    at half the window."""
    n = 2300
    rng = np.random.default_rng(0)
    model, _ = load_checkpoint(DEFAULT_WEIGHTS)
    det = Detector(model, CalibrationConfig(warmup=2000, window=1000))
    common = rng.normal(0, 1, n)
    xs = np.zeros((n, det.max_features))
    mask = np.zeros_like(xs, dtype=bool)
    xs[:, 0] = common + rng.normal(0, 0.05, n)
    xs[:, 1] = common + rng.normal(0, 0.05, n)
    xs[-1, 0], xs[-1, 1] = 1.5, -1.5  # the two disagree; each alone is ordinary
    mask[:, :2] = True
    res = det.process(np.zeros(n, dtype=np.int64), xs, mask, 1_767_225_600_000 + np.arange(n, dtype=np.int64) * 60_000)
    assert res.is_anomaly[-1] and VIEWS[res.view[-1]] == "correlation"


def test_with_two_features_the_view_cannot_tell_which_one_left_the_other(one_torch_thread):
    """A limit, from a review: rpm (white noise) and a temperature that follows it, one of the
    two stuck for 60 readings. Each feature's part of this view is its error given the others';
    with only one other, the two parts differ by the difference of the features' own squared
    errors, so the view names whichever error is larger, the healthy feature's as often as not,
    and the two parts are close (the record's contributions show it). With a third feature that
    follows the same driver, the stuck one is the one the other two disagree with, and it is
    named. Measured: pairs flagged 16 of 16, 13 first by this view, 2 of those naming the stuck
    feature (the repeat view decided 3, naming it); trios 16 of 16, 12 by this view, all naming it."""
    rng = np.random.default_rng(0)
    n, at, copies = 3000, 2500, 8
    streams, targets = [], []
    for width in (2, 3):
        for c in range(2 * copies):
            rpm = 1500 + 300 * rng.normal(size=n)
            temp = 60 + 0.02 * (rpm - 1500) + rng.normal(0, 1.0, n)
            vib = 2 + 0.001 * (rpm - 1500) + rng.normal(0, 0.05, n)
            v = np.stack([rpm, temp, vib][:width], 1)
            f = c % 2  # the driver or the follower sticks
            v[at : at + 60, f] = v[at - 1, f]
            streams.append(v)
            targets.append(f)
    s = len(streams)
    model, _ = load_checkpoint(DEFAULT_WEIGHTS)
    det = Detector(model, CalibrationConfig())
    x = np.zeros((n * s, det.max_features))
    mask = np.zeros_like(x, dtype=bool)
    for k, v in enumerate(streams):
        x[k::s, : v.shape[1]] = v
        mask[k::s, : v.shape[1]] = True
    res = det.process(np.tile(np.arange(s), n), x, mask, np.repeat(60_000 * np.arange(n), s))
    flagged = res.is_anomaly.reshape(n, s)
    top = res.top_feature(mask).reshape(n, s)
    view = res.view.reshape(n, s)
    corr = VIEWS.index("correlation")
    caught, by_corr, named = {2: 0, 3: 0}, {2: 0, 3: 0}, {2: 0, 3: 0}
    for k, v in enumerate(streams):
        first = np.flatnonzero(flagged[at : at + 60, k])
        if first.size:
            caught[v.shape[1]] += 1
            if view[at + first[0], k] == corr:  # (the repeat view decides some, and names the stuck one)
                by_corr[v.shape[1]] += 1
                named[v.shape[1]] += int(top[at + first[0], k] == targets[k])
    for width, what in ((2, "pairs"), (3, "trios")):
        first_by = f"{by_corr[width]} first by the correlation view, {named[width]} of those naming the stuck feature"
        print(f"\n{what}: {caught[width]} of {2 * copies} flagged, {first_by}")
    assert caught[2] >= 14 and caught[3] >= 14 and by_corr[3] >= 8
    assert named[3] >= by_corr[3] - 1
    # (No assertion on the pairs' naming: it is the limit this test measures, printed above.)
    assert not flagged[1000:at].any()
