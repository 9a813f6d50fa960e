"""The sensor calibrator's history (models/calibration.py): what enters it and with what weight."""

from __future__ import annotations

import math

import numpy as np
import torch
from conftest import autoregressive, interleaved

from models.calibration import (
    HIST_BINS,
    HIST_HI,
    HIST_LO,
    TAIL_THRESHOLD,
    CalibrationConfig,
    learn_tail,
    onset_bins,
    reach_capped,
    tail_log10_p,
    tail_weight,
)
from models.detector import HELD, Detector
from models.gru import DEFAULT_WEIGHTS, load_checkpoint


def _feed(det: Detector, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    xs = np.zeros((len(x), det.max_features))
    xs[:, 0] = x
    mask = np.zeros_like(xs, dtype=bool)
    mask[:, 0] = True
    res = det.process(np.zeros(len(x), dtype=np.int64), xs, mask)
    return res.score, res.is_anomaly


def _stream(x: np.ndarray, cal: CalibrationConfig) -> tuple[np.ndarray, np.ndarray]:
    model, _ = load_checkpoint(DEFAULT_WEIGHTS)
    return _feed(Detector(model, cal), x)


def test_event_weights_skip_warmup_and_discount_flags():
    cal = CalibrationConfig(warmup=10, flagged_weight=0.1)
    steps = torch.tensor([0, 4, 5, 5, 50])
    valid = torch.tensor([True, True, True, False, True])
    flagged = torch.tensor([False, False, False, False, True])
    none = torch.zeros(5, dtype=torch.float64)
    torch.testing.assert_close(
        tail_weight(cal, steps, valid, flagged, flagged, none), torch.tensor([0.0, 0.0, 1.0, 0.0, 0.1], dtype=torch.float64)
    )
    # A stream flagged afresh again and again learns the first event of each run of flags faster
    # (0.1 ** (1/3) after two recent runs), not the rest of a run; unflagged events count fully.
    two = torch.full((5,), 2.0, dtype=torch.float64)
    faster = torch.tensor([0.0, 0.0, 1.0, 0.0, 0.1 ** (1 / 3)], dtype=torch.float64)
    torch.testing.assert_close(tail_weight(cal, steps, valid, flagged, flagged, two), faster)
    later_in_a_run = torch.zeros(5, dtype=torch.bool)
    torch.testing.assert_close(
        tail_weight(cal, steps, valid, flagged, later_in_a_run, two), torch.tensor([0.0, 0.0, 1.0, 0.0, 0.1], dtype=torch.float64)
    )

    hist = torch.zeros((3, HIST_BINS))
    hist[:, 5] = 10.0
    b = torch.tensor([7, 7, 7])
    _, _, top = tail_log10_p(cal, torch.ones(3, dtype=torch.float64), hist)
    new = learn_tail(cal, hist, b, torch.tensor([0.0, 1.0, 0.1], dtype=torch.float64), torch.zeros(3, dtype=torch.bool), top)
    decay = 1.0 - 1.0 / cal.window
    torch.testing.assert_close(new[0], hist[0])  # weight 0: untouched, not even decayed
    assert math.isclose(float(new[1, 7]), 1.0) and math.isclose(float(new[1, 5]), 10.0 * decay, rel_tol=1e-6)
    assert math.isclose(float(new[2, 7]), 0.1, rel_tol=1e-6) and math.isclose(float(new[2, 5]), 10.0 * decay**0.1, rel_tol=1e-6)


def test_flagged_events_are_remembered_as_beyond_the_range_not_how_far():
    cal = CalibrationConfig(flagged_reach=8)
    hist = torch.zeros((4, HIST_BINS))
    hist[:, 5] = 10.0
    hist[3, 30] = 0.005  # a decayed trace of an old spike: below HIST_OCCUPIED, not the top
    b = torch.tensor([40, 40, 9, 40])
    flagged = torch.tensor([False, True, True, True])
    _, _, top = tail_log10_p(cal, torch.ones(4, dtype=torch.float64), hist)  # the top as the step finds it
    new = learn_tail(cal, hist, b, torch.ones(4, dtype=torch.float64), flagged, top)
    assert float(new[0, 40]) == 1.0  # a normal event lands in its own bin
    assert float(new[1, 13]) == 1.0 and float(new[1, 40]) == 0.0  # a flagged one 8 bins above the top
    assert float(new[2, 9]) == 1.0  # ... or in its own bin when that is lower
    assert float(new[3, 13]) == 1.0
    none = torch.zeros((1, HIST_BINS))
    _, _, top = tail_log10_p(cal, torch.ones(1, dtype=torch.float64), none)
    empty = learn_tail(cal, none, torch.tensor([40]), torch.ones(1, dtype=torch.float64), torch.tensor([True]), top)
    assert float(empty[0, 40]) == 1.0  # nothing to be beyond: its own bin
    # A trace below HIST_OCCUPIED counts as what it is (0.005 of an event above) but does not
    # move the tail's start to bin 30, which would put the prior's whole pseudo-event above.
    width = (HIST_HI - HIST_LO) / HIST_BINS
    lp, _, _ = tail_log10_p(cal, torch.tensor([math.exp(HIST_LO + 10.5 * width)], dtype=torch.float64), hist[3:])
    tail = math.exp(-cal.tail_slope * 4.5 * width)  # from the upper edge of bin 5
    assert math.isclose(float(lp), -math.log10((0.005 + tail) / (10.005 + 2.0)), rel_tol=1e-6)


def test_only_a_run_as_far_out_as_the_last_on_a_stream_flagged_again_and_again_is_recorded_at_its_size():
    # Capped: any flag on a stream with fewer than about two recent runs of flags (decayed count
    # under 1), the rest of every run, and a run's first flag more than `flagged_reach` bins
    # beyond the last run's first (a glitch); uncapped: a run's first flag after about two
    # others, no further out than the last one's by more than that. Two histories per event.
    cal = CalibrationConfig()
    flagged = torch.tensor([True, True, True, True, False])
    onset = torch.tensor([True, True, False, True, False])
    onsets = torch.tensor([0.0, 1.5, 1.5, 0.99, 3.0], dtype=torch.float64)
    b = torch.tensor([[63, 63], [63, 60], [63, 63], [63, 63], [63, 63]])
    last = torch.tensor([[63, 48], [63, 52], [63, 63], [63, 63], [63, 63]], dtype=torch.int8)
    capped = reach_capped(cal, flagged, onset, onsets, b, last)
    assert capped.tolist() == [[True, True], [False, False], [True, True], [True, True], [False, False]]
    # What the next run is compared with: a run's first flag's bin, where it lay beyond the top.
    top = torch.tensor([[40, 40], [40, 62], [40, 40], [40, 40], [40, 40]])
    # (0, none, where it lay within the top; kept there for the per-feature histories.)
    learns = torch.ones(5, 2, dtype=torch.bool)
    assert onset_bins(onset, learns, b, top, last, keep_within=False).tolist() == [[63, 63], [63, 0], [63, 63], [63, 63], [63, 63]]
    assert onset_bins(onset, learns, b, top, last, keep_within=True).tolist() == [[63, 63], [63, 52], [63, 63], [63, 63], [63, 63]]


def test_surprises_beyond_the_histogram_range_still_rank_by_size():
    # The last bin is open-ended. With one (flagged) event already in it, a bigger surprise must
    # still rank above a smaller one: a flat series' spikes are all far beyond e^HIST_HI.
    cal = CalibrationConfig()
    hist = torch.zeros(HIST_BINS)
    hist[20] = 500.0
    hist[-1] = 0.1
    lp, _, _ = tail_log10_p(cal, torch.tensor([HIST_HI + 1.0, HIST_HI + 5.0], dtype=torch.float64).exp(), hist.expand(2, -1))
    # Half the last bin's count, plus the prior's power-law tail from the bin's upper edge.
    expected = [-math.log10((0.05 + math.exp(-cal.tail_slope * d)) / (500.1 + 2.0)) for d in (1.0, 5.0)]
    torch.testing.assert_close(lp, torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-9)
    assert float(lp[1]) > float(lp[0])


def test_the_cold_start_does_not_hide_the_first_anomaly(one_torch_thread):
    # A glitch in the first events, while the stream's statistics rest on a handful of readings,
    # is an enormous surprise. The same glitch after warm-up must still be flagged: had the
    # first one entered the history, the second would look like something seen before.
    rng = np.random.default_rng(3)
    x = 500.0 + rng.normal(0, 1.0, 700)
    x[25] += 15.0
    x[600] += 15.0
    warmup = 100
    model, _ = load_checkpoint(DEFAULT_WEIGHTS)
    det = Detector(model, CalibrationConfig(warmup=warmup, threshold=TAIL_THRESHOLD))
    _feed(det, x[: warmup // 2])
    for key in ("cal_hist", "cal_hist_prof"):
        assert float(det.bank.tensors[key][0].sum()) == 0.0, key  # the coldest events left no trace
    score, flagged = _feed(det, x[warmup // 2 :])
    score, flagged = score[warmup // 2 :], flagged[warmup // 2 :]  # from the end of warm-up
    assert flagged[600 - warmup], f"spike scored {score[600 - warmup]:.3f}"
    assert flagged.sum() == 1, np.flatnonzero(flagged) + warmup


def test_a_first_step_in_warm_up_does_not_hide_later_spikes_of_any_size(one_torch_thread):
    """Found by a review of unseen streams: a whole-degree thermostat steady through the first
    half of warm-up has its spread at the floor (0.01% of 21 degrees), so its first ordinary step
    of one degree is ~500 deviations. It went into every history at full weight, in the
    open-ended last bin, and for ~2,000 events a reading of a million degrees tied with it: 1 of
    8 such spikes flagged, scoring 0.487-0.501. A reading the normaliser winsorises in warm-up is
    now recorded as a flagged event is (a tenth of the weight, capped, not in the long history)."""
    n, k = 3000, 8
    model, _ = load_checkpoint(DEFAULT_WEIGHTS)
    det = Detector(model, CalibrationConfig(threshold=TAIL_THRESHOLD))
    rng = np.random.default_rng(0)
    t = np.arange(n)
    x = np.zeros((n, k))
    for s in range(k):
        walk = np.cumsum(rng.normal(0, 0.05, n))
        x[:, s] = np.round(21 + 2 * np.sin(2 * np.pi * (t + 200 * s) / 1440) + walk - walk[60])
        x[: 60 + 5 * s, s] = x[60 + 5 * s, s] - 1  # steady, then a first step in warm-up's second half
    at = 1500 + 37 * np.arange(k)
    x[at, np.arange(k)] += 1e6
    xs = np.zeros((n * k, det.max_features))
    xs[:, 0] = x.reshape(-1)
    mask = np.zeros_like(xs, dtype=bool)
    mask[:, 0] = True
    res = det.process(np.tile(np.arange(k), n), xs, mask, np.repeat(1_600_000_000_000 + 60_000 * t, k))
    flagged = res.is_anomaly.reshape(n, k)[at, np.arange(k)]
    others = res.is_anomaly.reshape(n, k).sum(axis=0) - flagged
    print(f"\n{flagged.sum()} of {k} spikes flagged; other flags per stream: {others.tolist()}")
    assert flagged.sum() >= 7, res.score.reshape(n, k)[at, np.arange(k)]


def test_a_stream_constant_until_it_moves_starts_over(one_torch_thread):
    """A two-feature stream reading one value on both until it moves (a machine switched on),
    then noisy: its first readings measured hundreds of deviations against spreads at the floor,
    and the histories kept them for thousands of events, so that a 10-sigma spike 400 or 1,500
    events after the move was flagged on 0 of 8 streams, whether the stream had been constant for
    100 events or 1,000 (a review; `wakes` in models/detector.py). The stream now starts over
    at the move, which is itself flagged: the spikes are flagged (one of the sixteen scores 0.499)
    and named, and nothing else is."""
    model, _ = load_checkpoint(DEFAULT_WEIGHTS)
    rng = np.random.default_rng(0)
    for const in (100, 1000):
        n, k = const + 1600, 8
        x = np.zeros((n, k, 8))
        for s in range(k):
            e = autoregressive(rng.normal(0.0, 1.0, (n, 2)) * [1.0, 0.5], np.array([0.9, 0.7]))
            x[:, s, :2] = e + np.array([50.0, 10.0])
        x[:const, :, :2] = [50.0, 10.0]
        at = const + np.where(np.arange(k) < 4, 400, 1500)
        x[at, np.arange(k), 0] += 10.0
        mask = np.zeros((n * k, 8), dtype=bool)
        mask[:, :2] = True
        det = Detector(model, CalibrationConfig(threshold=TAIL_THRESHOLD))
        res = det.process(np.tile(np.arange(k), n), x.reshape(n * k, 8), mask, np.repeat(1_600_000_000_000 + 60_000 * np.arange(n), k))
        anom = res.is_anomaly.reshape(n, k)
        flagged = anom[at, np.arange(k)]
        named = res.top_feature(mask).reshape(n, k)[at, np.arange(k)] == 0
        others = anom.sum(axis=0) - flagged - anom[const]
        print(f"\nconstant for {const}: spikes flagged {flagged.sum()} of {k}, named {named.sum()}; ", end="")
        missed = res.score.reshape(n, k)[at, np.arange(k)][~flagged]
        print(f"the move flagged on {anom[const].sum()}; other flags per stream {others.tolist()}; ", end="")
        print(f"missed spikes' scores {missed.round(3).tolist()}")
        assert flagged.sum() >= 7 and named.all(), res.score.reshape(n, k)[at, np.arange(k)]
        assert anom[const].all()
        # (Nothing else: the profile, kept through the restart, flagged the first return to an
        # hour seen while the stream was constant, a review found.)
        assert others.sum() == 0


def test_a_glitch_or_fine_noise_does_not_start_a_stream_over(one_torch_thread):
    """From a review of the restart: a pressure in Pa (noise ~2 Pa at 101,325, below the floor of
    0.01% of the level) with one glitch of 400 Pa, and a stream truly constant at (50, 10) with
    one glitch of +100. Restarted at the glitch, the first stream missed a spike 50 events later
    (score 0, inside the new warm-up) and the second a lasting step 30 events later (its
    normaliser restarted from the glitch's value). Neither is a stream waking up: the first
    varies, the second's next reading takes the glitch back. Both are flagged, and so is the step
    after a glitch two readings long (it too restarted the stream from its value)."""
    model, _ = load_checkpoint(DEFAULT_WEIGHTS)
    rng = np.random.default_rng(0)
    n, k = 1200, 8
    x = np.zeros((n, k, 8))
    for s in range(4):
        x[:, s, 0] = 101_325.0 + autoregressive(rng.normal(0.0, 1.0, n), 0.9)
        x[1000, s, 0] += 400.0
        x[1050, s, 0] += 60.0
    x[:, 4:, :2] = [50.0, 10.0]
    x[1000, 4:, 0] += 100.0
    x[1001, 6:, 0] += 100.0
    x[1030:, 4:, 0] += 2.0
    at = np.r_[[1050] * 4, [1030] * 4]
    mask = np.zeros((n * k, 8), dtype=bool)
    mask[:, 0] = True
    mask.reshape(n, k, 8)[:, 4:, 1] = True
    det = Detector(model, CalibrationConfig(threshold=TAIL_THRESHOLD))
    res = det.process(np.tile(np.arange(k), n), x.reshape(n * k, 8), mask, np.repeat(1_600_000_000_000 + 60_000 * np.arange(n), k))
    anom = res.is_anomaly.reshape(n, k)
    # (A step's first reading may be held as the glitch's aftershock: the next one is news.)
    caught = [bool(anom[a : a + 2, s].any()) for s, a in enumerate(at)]
    print(f"\nspikes after a glitch on a fine-noise stream and steps after a glitch on a constant one flagged: {caught}")
    assert all(caught), res.score.reshape(n, k)[at, np.arange(k)]
    assert not det.bank.tensors["cal_wake"][:k].any()


def test_a_stream_of_one_feature_events_wakes_up_too(one_torch_thread):
    """The stream above, its two sensors sent as separate events, and the second constant
    throughout (a setpoint). Its events of the constant sensor said the first had not moved, so
    it never woke: spikes 800 and 3,000 events after the move were flagged on 0 or 1 of 8 streams
    constant for 200 or 2,000 events. Events carrying only a still-constant feature now leave the
    count as it is, and the restart starts both features over (the constant one, not in the
    event, kept its count and made the other late through the new warm-up, whose end was
    flagged at 1.0). (A stream whose moving sensor reads near its old constant on its second or
    third moving reading stays asleep: hence 6, not 8.)"""
    model, _ = load_checkpoint(DEFAULT_WEIGHTS)
    rng = np.random.default_rng(0)
    for const in (200, 2000):
        n, k = const + 3200, 8
        x = np.zeros((n, k, 8))
        for s in range(k):
            x[:, s, 0] = 50.0 + autoregressive(rng.normal(0.0, 1.0, n), 0.9, lag=2)
        x[:const, :, 0] = 50.0
        x[:, :, 1] = 10.0
        at = const + np.where(np.arange(k) < 4, 800, 3000)  # (even events carry the first sensor)
        x[at, np.arange(k), 0] += 10.0
        mask = np.zeros((n, k, 8), dtype=bool)
        mask[0::2, :, 0] = True
        mask[1::2, :, 1] = True
        det = Detector(model, CalibrationConfig(threshold=TAIL_THRESHOLD))
        ts = np.repeat(1_600_000_000_000 + 30_000 * np.arange(n), k)
        res = det.process(np.tile(np.arange(k), n), x.reshape(n * k, 8), mask.reshape(n * k, 8), ts)
        anom = res.is_anomaly.reshape(n, k)
        flagged = anom[at, np.arange(k)]
        others = anom.sum(axis=0) - flagged - anom[const]
        woke = int((det.bank.tensors["cal_wake"][:k] > 0).sum())
        print(f"\nconstant for {const}: spikes flagged {flagged.sum()} of {k}; woke {woke}; ", end="")
        print(f"other flags per stream {others.tolist()}", end="")
        assert flagged.sum() >= 6 and woke >= 6, res.score.reshape(n, k)[at, np.arange(k)]
        assert anom[const].all()
        assert others.max() <= 1


def test_moves_of_two_sensors_add_up_only_when_both_switch_on(one_torch_thread):
    """From three reviews of the wake-up for separate events. Streams 0-3, constant (50, 10) on
    both sensors in every event: the first reads garbage once and drops out, and 500 events
    later the second glitches for two readings, then steps by 2 for good. The garbage reading
    began the count and, with only still-constant readings between, the second's two glitch
    readings finished it: the stream restarted from the glitch and its step was never flagged.
    A flat sensor's move now neither counts nor resets; the next reading of a sensor that has
    moved does. Streams 4-7, the two sensors in separate events, both switch on (to 80 and 60,
    noise ~1.4): they wake, and the sensor not in the restart event starts afresh from its next
    reading (from its normaliser's mean, near the old constant, a phantom reading 50 away stayed
    in its spread for ~1,000 readings: 7 where its noise is ~1.4, 100 events later). Streams
    8-11, both in every event: glitches of one or two readings on each sensor over four events
    (first, second, second, first; and alternating), then a step of 2 on the first: no restart
    (counting afresh from a taken-back move where a flat sensor moved restarted these from the
    glitch, and their step was missed). Streams 12-15, separate events: the first reads garbage once and
    goes offline, the second switches on 300 events later, and the first comes back at its old
    level (noise 1) 300 events after that; started from its last reading, the garbage, its
    spread was 14 a hundred events after it was back."""
    model, _ = load_checkpoint(DEFAULT_WEIGHTS)
    n, k, on = 1800, 16, 1000
    x = np.zeros((n, k, 8))
    x[:, :, :2] = [50.0, 10.0]
    mask = np.zeros((n, k, 8), dtype=bool)
    mask[:, :4, 1] = True
    mask[: on + 1, :4, 0] = True
    x[on, :4, 0] += 100.0
    x[[1500, 1501], :4, 1] += 100.0
    x[1530:, :4, 1] += 2.0
    rng = np.random.default_rng(0)
    e = rng.normal(size=(n, 12, 2))
    autoregressive(e[:, :4], 0.7, lag=2)
    x[on:, 4:8, :2] = e[on:, :4] + np.array([80.0, 60.0])
    mask[0::2, 4:8, 0] = mask[1::2, 4:8, 1] = True
    x[[on, on + 3], 8:10, 0] += 100.0
    x[[on + 1, on + 2], 8:10, 1] += 100.0
    x[[on, on + 2], 10:12, 0] += 100.0
    x[[on + 1, on + 3], 10:12, 1] += 100.0
    x[on + 30 :, 8:12, 0] += 2.0
    mask[:, 8:12, :2] = True
    x[on, 12:, 0] += 100.0
    x[on + 301 :, 12:, 1] = 60.0 + e[on + 301 :, 8:, 1]
    x[on + 600 :, 12:, 0] = 50.0 + e[on + 600 :, 8:, 0]
    mask[0::2, 12:, 0] = mask[1::2, 12:, 1] = True
    mask[on + 1 : on + 600, 12:, 0] = False
    det = Detector(model, CalibrationConfig(threshold=TAIL_THRESHOLD))
    ts = np.repeat(1_600_000_000_000 + 30_000 * np.arange(n), k)
    slots = np.tile(np.arange(k), n)
    anom, spread = [], []
    for t0, t1 in ((0, on + 100), (on + 100, on + 700), (on + 700, n)):
        part = det.process(slots[t0 * k : t1 * k], x[t0:t1].reshape(-1, 8), mask[t0:t1].reshape(-1, 8), ts[t0 * k : t1 * k])
        anom.append(part.is_anomaly.reshape(t1 - t0, k))
        spread.append(det.bank.tensors["norm_var"][:k, :2].sqrt().numpy().copy())
    flagged = np.concatenate(anom)
    wake = det.bank.tensors["cal_wake"][:k].tolist()
    second, first_back = spread[0][4:8, 1], spread[1][12:, 0]
    stepped = np.r_[flagged[1530:1540, :4].any(axis=0), flagged[on + 30 : on + 40, 8:12].any(axis=0)]
    print(f"\nwake-up state {wake}; steps after the glitches flagged {stepped.tolist()}; ", end="")
    print(
        f"second sensor's spread 100 events after both switched on {second.round(2).tolist()} (noise {e[on:, :4, 1].std():.2f}); ", end=""
    )
    print(f"first sensor's 100 events after it is back {first_back.round(2).tolist()} (noise {e[on:, 8:, 0].std():.2f})")
    assert wake[:4] == wake[8:12] == [0, 0, 0, 0] and stepped.all()
    assert wake[4:8] == wake[12:] == [3, 3, 3, 3]
    assert (second < 2 * e[on:, :4, 1].std()).all() and (first_back < 2 * e[on:, 8:, 0].std()).all()


def test_a_lasting_change_stops_being_flagged(one_torch_thread):
    rng = np.random.default_rng(4)
    x = rng.normal(0, 1.0, 1600)
    x[800:] += 12.0  # a new level, for good
    score, flagged = _stream(x, CalibrationConfig(warmup=100, threshold=TAIL_THRESHOLD))
    assert flagged[800], f"the change itself scored {score[800]:.3f}"
    # Flagged events still count in the history (at flagged_weight), and the predictors learn
    # the new level once its events are no longer flagged: the new normal is accepted quickly.
    assert flagged[800:850].sum() <= 5, np.flatnonzero(flagged[800:850])
    assert not flagged[900:].any(), np.flatnonzero(flagged[900:]) + 900


def test_a_spike_the_stream_makes_often_is_not_news_after_a_quiet_spell(one_torch_thread):
    """16 busy streams (8 of white noise, 8 wandering, AR(1) 0.9; read every minute) spike by 10
    steps (up or down) every 150-400 events, except in a quiet spell of 6,000 events, longer than
    the short history (~1,000 events) keeps a spike's record (~4,600). The spikes in the first
    600 events after it are records within the short history but everyday events within the long
    one (~5,000 events), so few are flagged; with a long history as short as the short one, over
    half are (the long memory is what stops them). A spike ten times larger, 2,000 events after
    the quiet, is news against both and is flagged. (This replaced a single stream with its
    spikes 20 events apart, window 200 and long_window 1,000, which passed 0.03 under the
    threshold on its seed, 5, and failed on 17 of the seeds 0-19: a review.)"""
    n, quiet, streams = 11_500, (3_000, 9_000), 16
    rng = np.random.default_rng(8)
    x = 10.0 + rng.normal(size=(n, streams))
    x[:, 8:] = 50.0 + autoregressive(rng.normal(size=(n, 8)), 0.9)
    after = []  # (event, stream) of each spike in the 600 events after the quiet spell
    spiked = np.zeros((n, streams), dtype=bool)
    for j in range(streams):
        t = int(rng.integers(150, 400))
        while t < n - 10:
            if not quiet[0] <= t < quiet[1]:
                x[t, j] += 10.0 if rng.random() < 0.7 else -10.0
                spiked[t, j] = True
                if quiet[1] <= t < quiet[1] + 600:
                    after.append((t, j))
            t += int(rng.integers(150, 400))
    # (Each stream's first event from 2,000 after the quiet on with no habitual spike within 30.)
    big = np.array([next(t for t in range(quiet[1] + 2_000, n) if not spiked[t - 30 : t + 30, j].any()) for j in range(streams)])
    x[big, np.arange(streams)] += 100.0
    ts = np.arange(n, dtype=np.int64) * 60_000
    rates = {}
    for name, cal in (("long", CalibrationConfig()), ("short only", CalibrationConfig(long_window=1000))):
        res, _ = interleaved(x[:, :, None], ts, cal)
        flagged = res.is_anomaly.reshape(n, streams)
        rates[name] = sum(bool(flagged[t, j]) for t, j in after)
        if name == "long":
            assert flagged[big, np.arange(streams)].all(), res.score.reshape(n, streams)[big, np.arange(streams)]
    print(
        f"\nspikes in the 600 events after the quiet spell: {len(after)}, flagged {rates['long']}, "
        f"{rates['short only']} with a short long history"
    )
    assert rates["long"] <= 0.25 * len(after) and rates["short only"] >= 2 * rates["long"] + 3, rates


def test_an_episode_raises_one_alert_and_a_bigger_surprise_another(one_torch_thread):
    """An escalating burst (10, then 30 and 30 deviations) alerts twice without the hold-off and
    once with it: the second 30 scores lower than the alert, so it is an aftershock and scores
    holdoff_factor times as much. On a second stream, a spike that scores higher than the alert
    before it, within the hold-off, is news and alerts. The hold-off changes what is reported,
    not what the streams learn: every event's surprise is the same with and without it."""
    model, _ = load_checkpoint(DEFAULT_WEIGHTS)
    rng = np.random.default_rng(6)
    n = 1000
    x = np.zeros((2 * n, 8))
    x[:, 0] = np.tile(rng.normal(0.0, 1.0, n), 2)
    x[600:603, 0] += [10.0, 30.0, 30.0]  # stream 0: the burst
    x[n + 600, 0] += 6.0  # stream 1: a modest alert...
    x[n + 610, 0] += 100.0  # ...and a much bigger spike inside its hold-off
    slots = np.repeat([0, 1], n)
    mask = np.zeros_like(x, dtype=bool)
    mask[:, 0] = True

    def run(holdoff: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        res = Detector(model, CalibrationConfig(warmup=100, holdoff=holdoff)).process(slots, x, mask)
        return res.score, res.is_anomaly, res.surprise, res.held

    raw, raw_flags, raw_surprise, raw_why = run(0)
    score, flags, surprise, why = run(30)
    assert list(np.flatnonzero(raw_flags)) == [600, 601, n + 600, n + 610], np.flatnonzero(raw_flags)
    assert list(np.flatnonzero(flags)) == [600, n + 600, n + 610], np.flatnonzero(flags)
    np.testing.assert_array_equal(surprise, raw_surprise)
    held = np.flatnonzero(score != raw)
    assert 601 in held and n + 610 not in held
    # Only inside a hold-off: 30 events after each alert (stream 1's restarts at its second).
    assert all(0 < i - 600 <= 30 if i < n else 0 < i - n - 600 <= 40 for i in held), held
    np.testing.assert_allclose(score[held], 0.4 * raw[held])
    # The record says why: the aftershock that would have been an alert is held as one (the
    # events after it that were below the threshold anyway are not held from anything).
    assert not raw_why.any()
    assert list(np.flatnonzero(why)) == [601] and HELD[why[601]] == "aftershock"


def _normal_streams(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Anomaly-free streams of very different shapes: scale, tails, discreteness, memory, rhythm."""
    ar = np.zeros(n)
    e = rng.normal(0.0, 1.0, n)
    for i in range(1, n):
        ar[i] = 0.95 * ar[i - 1] + e[i]
    t = np.arange(n)
    return {
        "gaussian": rng.normal(10.0, 1.0, n),
        "student_t3": rng.standard_t(3, n),
        "poisson2": rng.poisson(2.0, n).astype(float),
        "lognormal": rng.lognormal(0.0, 1.0, n),
        "uniform": rng.uniform(0.0, 1.0, n),
        "ar1_0.95": ar,
        "daily_sine": 5.0 * np.sin(2 * np.pi * t / 288) + rng.normal(0.0, 0.5, n),
        "random_walk": np.cumsum(rng.normal(0.0, 1.0, n)),
        "bursty_counts": rng.poisson(np.where(rng.random(n) < 0.02, 30.0, 3.0)).astype(float),
    }


def test_scores_mean_the_same_on_every_kind_of_stream(one_torch_thread):
    # The score is -log10(p)/6 with p the smallest of four views' tail probabilities times four,
    # so on normal data P(score >= s) <= 10^(-6 s) whatever the stream looks like, and a global
    # threshold flags about as often on a heavy-tailed count stream as on Gaussian noise. A
    # fixed-distribution score (for example a chi-square tail of the squared error) fails both
    # checks by orders of magnitude on these streams.
    n, copies, settled = 4000, 2, 1000
    rng = np.random.default_rng(0)
    made = [_normal_streams(rng, n) for _ in range(copies)]
    names = list(made[0])
    x = np.stack([m[name] for name in names for m in made])  # [streams, n]
    s = len(x)
    model, _ = load_checkpoint(DEFAULT_WEIGHTS)
    det = Detector(model, CalibrationConfig(warmup=100))
    xs = np.zeros((n * s, det.max_features))
    xs[:, 0] = x.T.reshape(-1)  # time-major, as a live feed arrives
    mask = np.zeros_like(xs, dtype=bool)
    mask[:, 0] = True
    ts = np.repeat(1_600_000_000_000 + 300_000 * np.arange(n), s)  # 5-minute readings
    score = det.process(np.tile(np.arange(s), n), xs, mask, ts).score.reshape(n, s).T[:, settled:]
    # (Measured: 0.033-0.050 of events at 0.2 and 0.007-0.009 at 0.3, max/min 1.5 and 1.4.)
    for level in (0.2, 0.3):
        rate = np.array([(score[i * copies : (i + 1) * copies] >= level).mean() for i in range(len(names))])
        print(f"score >= {level}: bound {10 ** (-6 * level):.4f}, " + ", ".join(f"{k} {r:.4f}" for k, r in zip(names, rate)))
        assert (rate <= 10 ** (-6 * level)).all(), dict(zip(names, rate))
        assert rate.max() <= 2.0 * rate.min(), dict(zip(names, rate))


def test_sparse_event_streams_are_flagged_above_the_threshold_rate(one_torch_thread):
    """A known limit, measured (README, Calibration): a 0/1 stream whose ones are rare (an error
    flag, a door sensor) has many of its ones flagged, though each is a one-in-a-few-hundred
    event. Every view compares a one with a spread that shrinks while the stream is quiet (the
    time-of-day view with its hour's, which holds only zeros until a one falls in that hour), so
    a one often lies far beyond the history's top, and each flagged one raises that top by at
    most `flagged_reach` bins. A flagged one used to enter the history at a tenth of its weight
    however often the stream alerted, so the history learned the ones ten times too slowly: 2.75
    flags per 1,000 events at the default threshold, three quarters of the ones. Now a stream
    flagged afresh again and again learns the first event of each run of flags faster
    (`tail_weight`), and records it at its own size, not at most `flagged_reach` bins above the
    history's top, when it lies no further out than the last run's first (`reach_capped`:
    capped, each view took about five flagged ones to raise its top to where the ones lie; 1.72
    per 1,000 and 1.32 for three flags before, which these bounds fail). Streams of three such
    flags meet the same limit through the per-feature view, which ranks each flag against its
    own history (0.17 per 1,000 before that view: the summed views diluted each one). This
    bounds the rates, above one in a thousand still for the sparsest, so that a change making
    them worse is seen; the counts printed are what the README quotes."""
    n, copies, settled = 6000, 8, 1000
    rng = np.random.default_rng(1)
    kinds = {
        "flag_1%": lambda: (rng.random((n, 1)) < 0.01).astype(float),
        "flag_0.3%": lambda: (rng.random((n, 1)) < 0.003).astype(float),
        "poisson_0.05": lambda: rng.poisson(0.05, (n, 1)).astype(float),
        "3_flags_0.3%": lambda: (rng.random((n, 3)) < 0.003).astype(float),
    }
    x = np.zeros((n, len(kinds) * copies, 3))  # [n, streams, features]
    width = np.zeros(len(kinds) * copies, dtype=int)
    for j, make in enumerate(make for make in kinds.values() for _ in range(copies)):
        v = make()
        x[:, j, : v.shape[1]], width[j] = v, v.shape[1]
    s = x.shape[1]
    model, _ = load_checkpoint(DEFAULT_WEIGHTS)
    events = x[settled:]
    bound = {"flag_1%": 1.0, "flag_0.3%": 1.5, "poisson_0.05": 0.6, "3_flags_0.3%": 0.7}  # at the default threshold
    for threshold in (0.5, 2 / 3):  # (the default, p <= 1e-3; and p <= 1e-4, the remedy the README offers)
        det = Detector(model, CalibrationConfig(warmup=100, threshold=threshold))
        xs = np.zeros((n * s, det.max_features))
        xs[:, :3] = x.reshape(n * s, 3)
        mask = np.zeros_like(xs, dtype=bool)
        mask[:, :3] = np.tile(np.arange(3)[None, :] < width[:, None], (n, 1))
        ts = np.repeat(1_600_000_000_000 + 60_000 * np.arange(n), s)  # minute readings
        flags = det.process(np.tile(np.arange(s), n), xs, mask, ts).is_anomaly.reshape(n, s)[settled:]
        for i, name in enumerate(kinds):
            rows = slice(i * copies, (i + 1) * copies)
            rate = flags[:, rows].mean() * 1000
            share = flags[:, rows][events[:, rows].sum(axis=2) > 0].mean()
            print(f"threshold {threshold:.2f}, {name}: {rate:.2f} flags per 1,000 events, {share:.0%} of the events with a one")
            assert rate <= (bound[name] if threshold == 0.5 else 1.0), (threshold, name, rate)
    # (Measured at 0.5: flag_1% 0.75 per 1,000 (6% of its ones), flag_0.3% 1.30 (33%; 1.35, 35% since the long
    # histories skip an episode's tail), poisson_0.05 0.33 (1%),
    # 3_flags_0.3% 0.45 (4%); at 2/3: 0.33 (3%), 0.75 (18%), 0.10 (0%), 0.25 (2%). With every flagged event capped at
    # `flagged_reach`: 0.80 (6%), 1.72 (44%), 0.33 (1%), 1.32 (15%); at 2/3: 0.35 (3%), 1.22 (30%), 0.10 (0%), 1.20 (14%).
    # With every flagged event at a tenth, 1.20 (10%), 2.75 (76%), 0.33 (1%); at 2/3: 0.40 (4%), 1.30 (32%), 0.10 (0%).)


def _multivariate_streams(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Anomaly-free 3-feature streams [n, 3] whose features are unrelated, strongly related,
    identical, partly constant, heavy-tailed or coupled through a shared random walk."""

    def correlated(rho: float, df: float | None = None) -> np.ndarray:
        chol = np.linalg.cholesky(np.full((3, 3), rho) + np.eye(3) * (1.0 - rho))
        e = rng.standard_normal((n, 3)) if df is None else rng.standard_t(df, (n, 3))
        return e @ chol.T

    one = rng.standard_normal(n)
    walk = np.cumsum(rng.standard_normal(n))
    return {
        "independent": rng.standard_normal((n, 3)),
        "rho_0.99": correlated(0.99),
        "identical": np.stack([one, one, 3.0 * one + 1.0], axis=1),
        "one_constant": np.stack([np.full(n, 5.0), rng.standard_normal(n), rng.standard_normal(n)], axis=1),
        "t3_rho_0.9": correlated(0.9, df=3.0),
        "shared_walk": walk[:, None] * np.array([1.0, 2.0, -1.0]) + rng.normal(0.0, 0.5, (n, 3)),
    }


def test_scores_mean_the_same_on_multivariate_streams(one_torch_thread):
    # With two or more features a fifth view (each feature's error given the others') joins the
    # Bonferroni minimum; the bound P(score >= s) <= 10^(-6 s) must still hold whatever the
    # features' relations, including exact duplicates (whose correlation of 1 is shrunk to 0.95).
    # (Measured: 0.025-0.041 of events at 0.2 and 0.0055-0.0083 at 0.3.)
    n, settled = 5000, 1000
    made = _multivariate_streams(np.random.default_rng(1), n)
    names = list(made)
    s = len(names)
    model, _ = load_checkpoint(DEFAULT_WEIGHTS)
    det = Detector(model, CalibrationConfig(warmup=100))
    xs = np.zeros((n * s, det.max_features))
    xs[:, :3] = np.stack([made[k] for k in names], axis=1).reshape(-1, 3)  # time-major
    mask = np.zeros_like(xs, dtype=bool)
    mask[:, :3] = True
    ts = np.repeat(1_600_000_000_000 + 60_000 * np.arange(n), s)
    score = det.process(np.tile(np.arange(s), n), xs, mask, ts).score.reshape(n, s).T[:, settled:]
    for level in (0.2, 0.3):
        rate = (score >= level).mean(axis=1)
        print(f"score >= {level}: bound {10 ** (-6 * level):.4f}, " + ", ".join(f"{k} {r:.4f}" for k, r in zip(names, rate)))
        assert (rate <= 10 ** (-6 * level)).all(), dict(zip(names, rate))


def test_a_warm_up_event_at_the_threshold_is_held_and_says_so(one_torch_thread):
    """In warm-up a score is not calibrated yet (its histories hold a few dozen events): an event
    reaching the threshold then is reported below it, held as `warmup`, so that the score and
    `is_anomaly` agree everywhere; a spike after warm-up is an anomaly at its own score."""
    rng = np.random.default_rng(5)
    x = rng.normal(0, 1.0, 800)
    x[70] += 12.0  # in the second half of warm-up: scored, not flaggable
    x[700] += 40.0
    model, _ = load_checkpoint(DEFAULT_WEIGHTS)
    cal = CalibrationConfig(warmup=100, threshold=TAIL_THRESHOLD)
    det = Detector(model, cal)
    xs = np.zeros((len(x), det.max_features))
    xs[:, 0] = x
    mask = np.zeros_like(xs, dtype=bool)
    mask[:, 0] = True
    res = det.process(np.zeros(len(x), dtype=np.int64), xs, mask)
    assert HELD[res.held[70]] == "warmup"
    assert not res.is_anomaly[70] and cal.threshold * cal.holdoff_factor <= res.score[70] < cal.threshold
    assert res.is_anomaly[700] and HELD[res.held[700]] == "" and res.score[700] >= cal.threshold
    assert np.array_equal(res.is_anomaly, res.score >= cal.threshold)  # warm-up included
    assert {HELD[h] for h in res.held[:100]} == {"", "warmup"}
