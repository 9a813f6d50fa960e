"""Tests for the synthetic sensor fleet: the demo, detector tests and pretraining rely on it
being reproducible chunk by chunk and on its anomalies being where the labels say."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from models.synthetic import FEATURES, KINDS, Anomaly, SensorFleet, univariate_batch


@pytest.fixture(scope="module")
def fleet() -> SensorFleet:
    """Small anomaly slots so a short range holds every kind; warm-up kept non-trivial."""
    return SensorFleet(n_streams=24, seed=7, anomaly_every=1200, warmup_steps=300)


@pytest.fixture(scope="module")
def chunk(fleet: SensorFleet) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[Anomaly]]:
    """One long chunk with and without injection, shared by the anomaly tests."""
    dirty, clean = fleet.generate(0, 12_000), fleet.generate(0, 12_000, clean=True)
    return dirty.values, clean.values, dirty.labels, dirty.anomalies


def test_shapes_and_dtypes(fleet: SensorFleet) -> None:
    c = fleet.generate(100, 50)
    assert c.start_step == 100
    assert c.values.shape == (24, 50, len(FEATURES)) and c.values.dtype == np.float64
    assert c.labels.shape == (24, 50) and c.labels.dtype == np.bool_
    assert c.ts_ms.dtype == np.int64
    np.testing.assert_array_equal(c.ts_ms, fleet.start_ms + np.arange(100, 150) * 60_000)
    assert fleet.generate(5, 0).values.shape == (24, 0, len(FEATURES))
    assert len(set(fleet.stream_ids)) == 24
    kinds = {sid.split("-")[0] for sid in fleet.stream_ids}
    assert kinds == {"pump", "fan", "compressor", "chiller"}
    assert SensorFleet(n_streams=3).stream_ids == ["pump-000", "fan-001", "compressor-002"]


@pytest.mark.parametrize("splits", [(40, 60), (1, 99), (33, 33, 34), (17, 58, 1, 24)])
def test_chunk_independence(fleet: SensorFleet, splits: tuple[int, ...]) -> None:
    start = 2390  # a range with anomalies crossing chunk boundaries is checked below too
    whole = fleet.generate(start, sum(splits))
    parts, pos = [], start
    for n in splits:
        parts.append(fleet.generate(pos, n))
        pos += n
    np.testing.assert_array_equal(whole.values, np.concatenate([p.values for p in parts], axis=1))
    np.testing.assert_array_equal(whole.labels, np.concatenate([p.labels for p in parts], axis=1))
    np.testing.assert_array_equal(whole.ts_ms, np.concatenate([p.ts_ms for p in parts]))


def test_chunk_independence_across_anomalies(fleet: SensorFleet) -> None:
    whole = fleet.generate(0, 6000)
    parts = [fleet.generate(a, 250) for a in range(0, 6000, 250)]
    np.testing.assert_array_equal(whole.values, np.concatenate([p.values for p in parts], axis=1))
    assert {a for p in parts for a in p.anomalies} == set(whole.anomalies)
    assert any(a.start // 250 != (a.end - 1) // 250 for a in whole.anomalies)
    # A chunk starting exactly where a stuck segment starts must still freeze the prior value.
    long_ones = [a for a in whole.anomalies if a.kind in ("stuck", "drift")]
    assert long_ones
    for a in long_ones:
        part = fleet.generate(a.start, 50)
        np.testing.assert_array_equal(part.values, whole.values[:, a.start : a.start + 50])


def test_determinism_and_seed_difference() -> None:
    a = SensorFleet(n_streams=5, seed=1).generate(600, 300)
    b = SensorFleet(n_streams=5, seed=1).generate(600, 300)
    c = SensorFleet(n_streams=5, seed=2).generate(600, 300)
    np.testing.assert_array_equal(a.values, b.values)
    assert a.anomalies == b.anomalies
    assert not np.allclose(a.values, c.values)
    # A stream's data does not depend on how many other streams the fleet has.
    big = SensorFleet(n_streams=9, seed=1).generate(600, 300)
    np.testing.assert_array_equal(a.values, big.values[:5])


def test_values_finite_and_plausible(chunk: tuple) -> None:
    dirty, clean, _, _ = chunk
    assert np.isfinite(dirty).all()
    lo, hi = clean.min(axis=(0, 1)), clean.max(axis=(0, 1))
    assert np.all(lo > [20, 600, 0, 0.5])  # temp, rpm, vibration, pressure
    assert np.all(hi < [100, 3200, 3, 12])


def test_daily_cycle_and_feature_correlation(fleet: SensorFleet, chunk: tuple) -> None:
    _, clean, _, _ = chunk
    day = fleet.period_day
    assert day == 1440
    rpm = clean[:, : 8 * day, 1]
    folded = rpm.reshape(len(rpm), 8, day).mean(axis=1)  # mean daily profile per stream
    assert np.all(folded.std(axis=1) > 0.5 * rpm.std(axis=1))
    corr = [np.corrcoef(clean[s, :, 1], clean[s, :, 0])[0, 1] for s in range(len(clean))]
    assert np.median(corr) > 0.3  # rpm drives temperature


def test_no_anomalies_before_warmup(fleet: SensorFleet, chunk: tuple) -> None:
    dirty, clean, labels, anomalies = chunk
    assert min(a.start for a in anomalies) >= fleet.warmup_steps
    assert not labels[:, : fleet.warmup_steps].any()
    np.testing.assert_array_equal(dirty[:, : fleet.warmup_steps], clean[:, : fleet.warmup_steps])
    assert fleet.anomalies_between(0, fleet.warmup_steps) == []


def test_every_kind_and_feature_appears(fleet: SensorFleet, chunk: tuple) -> None:
    anomalies = chunk[3]
    kinds, feats = Counter(a.kind for a in anomalies), Counter(a.feature for a in anomalies)
    assert set(kinds) == set(KINDS) and set(feats) == set(range(len(FEATURES)))
    expected = 24 * (12_000 - fleet.warmup_steps) / fleet.anomaly_every
    assert 0.6 * expected < len(anomalies) < 1.4 * expected


def test_anomaly_durations_and_no_overlap(chunk: tuple) -> None:
    limits = {"spike": (1, 3), "level_shift": (100, 400), "stuck": (60, 300), "drift": (200, 500)}
    anomalies = chunk[3]
    for a in anomalies:
        lo, hi = limits[a.kind]
        assert lo <= a.end - a.start <= hi
    for s in range(24):
        mine = sorted((a for a in anomalies if a.stream == s), key=lambda a: a.start)
        assert all(p.end < q.start for p, q in itertools.pairwise(mine))


def test_labels_match_anomalies(chunk: tuple) -> None:
    _, _, labels, anomalies = chunk
    expected = np.zeros_like(labels)
    for a in anomalies:
        expected[a.stream, a.start : a.end] = True
    np.testing.assert_array_equal(labels, expected)


def test_anomalies_change_the_signal(fleet: SensorFleet, chunk: tuple) -> None:
    dirty, clean, labels, anomalies = chunk
    for a in anomalies:
        win = slice(a.start, a.end)
        got, ref = dirty[a.stream, win, a.feature], clean[a.stream, win, a.feature]
        sigma = fleet.sigma[a.stream, a.feature]
        if a.kind == "stuck":
            assert np.all(got == clean[a.stream, a.start - 1, a.feature])  # exactly frozen
            assert np.ptp(ref) > 0
        elif a.kind == "drift":
            assert abs(got[-1] - ref[-1]) >= 5.9 * sigma  # ramps to >= 6 sigma, then resets
            assert dirty[a.stream, a.end, a.feature] == clean[a.stream, a.end, a.feature]
        else:
            floor = 5.9 if a.kind == "spike" else 4.9
            assert np.all(np.abs(got - ref) >= floor * sigma)
        others = [f for f in range(len(FEATURES)) if f != a.feature]
        np.testing.assert_array_equal(dirty[a.stream, win][:, others], clean[a.stream, win][:, others])
    np.testing.assert_array_equal(dirty[~labels], clean[~labels])  # untouched outside windows


def test_spikes_stand_out(chunk: tuple) -> None:
    dirty, clean, _, anomalies = chunk
    for a in (a for a in anomalies if a.kind == "spike"):
        series = clean[a.stream, :, a.feature]
        local = series[max(0, a.start - 200) : a.start]
        assert abs(dirty[a.stream, a.start, a.feature] - np.median(local)) > 4 * local.std()


def test_sigma_matches_clean_variation(fleet: SensorFleet, chunk: tuple) -> None:
    clean = chunk[1]
    ratio = clean[:, : 7 * 1440].std(axis=1) / fleet.sigma
    assert np.all((ratio > 0.6) & (ratio < 1.6))


def test_univariate_batch() -> None:
    rng = np.random.default_rng(0)
    x = univariate_batch(rng, 256, 512)
    assert x.shape == (256, 512) and x.dtype == np.float32
    assert np.isfinite(x).all()
    std = x.std(axis=1).astype(np.float64)
    assert np.all(std > 0)
    assert np.log10(std).max() - np.log10(std).min() > 3  # scales span orders of magnitude
    assert np.abs(x).max() > 1e3 and np.abs(x).min() < 1
    z = (x - x.mean(axis=1, keepdims=True)) / std[:, None]
    lag1 = (z[:, 1:] * z[:, :-1]).mean(axis=1)
    assert lag1.min() < 0.2 and lag1.max() > 0.95  # rough noise through smooth persistence
    assert len(np.unique(np.round(lag1, 2))) > 50
    assert (np.abs(np.round(x) - x) < 1e-6).all(axis=1).sum() > 5  # count series exist
    y = univariate_batch(np.random.default_rng(0), 256, 512)
    np.testing.assert_array_equal(x, y)
