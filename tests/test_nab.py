"""`streamer nab`: NAB-format results, and the through-Kafka mode equals the direct one."""

from __future__ import annotations

import csv
from datetime import datetime, timedelta

import numpy as np

from models.calibration import TAIL_THRESHOLD, CalibrationConfig
from models.detector import Detector
from models.gru import DEFAULT_WEIGHTS, load_checkpoint
from streamer.nab import main, read_series, score_series, score_through_kafka


def _write_series(root, rel, values):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    start = datetime(2024, 1, 1)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["timestamp", "value"])
        for i, v in enumerate(values):
            w.writerow([(start + timedelta(minutes=5 * i)).strftime("%Y-%m-%d %H:%M:%S"), v])


def _dataset(tmp_path):
    rng = np.random.default_rng(4)
    data = tmp_path / "data"
    t = np.arange(400)
    spiky = 10 + np.sin(t / 12) + rng.normal(0, 0.1, 400)
    spiky[300] += 8
    _write_series(data, "catA/spiky.csv", spiky.round(4))
    _write_series(data, "catA/shift.csv", (np.r_[np.zeros(250), np.ones(100) * 5] + rng.normal(0, 0.3, 350)).round(4))
    _write_series(data, "catB/counts.csv", rng.poisson(20, 300))
    return data


def test_nab_results_layout_and_causal_scores(tmp_path):
    data = _dataset(tmp_path)
    out = tmp_path / "out"
    assert main([str(data), str(out)]) == 0
    for rel in ("catA/spiky.csv", "catA/shift.csv", "catB/counts.csv"):
        with (out / rel).open() as fh:
            rows = list(csv.DictReader(fh))
        assert list(rows[0]) == ["timestamp", "value", "anomaly_score"]
        scores = np.array([float(r["anomaly_score"]) for r in rows])
        assert np.all((scores >= 0) & (scores <= 1))
    spiky = np.array([float(r["anomaly_score"]) for r in csv.DictReader((out / "catA/spiky.csv").open())])
    assert spiky[300] == spiky[100:].max()

    # No look-ahead: scoring a truncated series gives the same scores for the rows it has.
    series = read_series(data)
    model, _ = load_checkpoint(DEFAULT_WEIGHTS)
    full = score_series(series, Detector(model, CalibrationConfig(warmup=0, threshold=TAIL_THRESHOLD)))
    for s in series:
        s.values = s.values[:200]
        s.timestamps = s.timestamps[:200]
    cut = score_series(series, Detector(model, CalibrationConfig(warmup=0, threshold=TAIL_THRESHOLD)))
    for a, b in zip(full, cut):
        np.testing.assert_allclose(a[:200], b, atol=1e-9)


def test_a_value_that_is_not_a_finite_number_is_named_not_a_traceback(tmp_path, capsys):
    """An empty or NaN cell raised a bare ValueError (direct mode) or left `--through-kafka`
    waiting forever for a row the daemon had dead-lettered."""
    data = tmp_path / "data"
    _write_series(data, "catA/ok.csv", [1.0, 2.0, 3.0])
    _write_series(data, "catA/gap.csv", [1.0, "", 3.0])
    assert main([str(data), str(tmp_path / "out")]) == 2
    assert "gap.csv: row 3: value ''" in capsys.readouterr().err
    _write_series(data, "catA/gap.csv", [1.0, 2.0, "nan"])
    assert main([str(data), str(tmp_path / "out"), "--through-kafka"]) == 2
    assert "gap.csv: row 4: value 'nan'" in capsys.readouterr().err


def test_through_kafka_equals_direct(tmp_path):
    series = read_series(_dataset(tmp_path))
    model, _ = load_checkpoint(DEFAULT_WEIGHTS)
    direct = score_series(series, Detector(model, CalibrationConfig(warmup=0, threshold=TAIL_THRESHOLD)))
    kafka = score_through_kafka(series, warmup=0, partitions=2)
    for d, k in zip(direct, kafka):
        np.testing.assert_allclose(d, k, atol=1e-6)


def test_baselines_run_through_the_same_harness(tmp_path):
    import pytest

    pytest.importorskip("river", reason="optional extra: pip install -e '.[baselines]'")
    pytest.importorskip("pysad", reason="optional extra: pip install -e '.[baselines]'")
    data = _dataset(tmp_path)
    for name in ("hst", "pysad-loda"):
        out = tmp_path / name
        assert main([str(data), str(out), "--baseline", name]) == 0
        with (out / "catA/spiky.csv").open() as fh:
            scores = np.array([float(r["anomaly_score"]) for r in csv.DictReader(fh)])
        assert np.all((scores >= 0) & (scores <= 1)) and scores.std() > 0, name
