"""`streamer nab`: NAB-format results, and the through-Kafka mode equals the direct one."""

from __future__ import annotations

import csv
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from models.calibration import TAIL_THRESHOLD, CalibrationConfig
from models.detector import Detector
from models.gru import DEFAULT_WEIGHTS, load_checkpoint
from streamer.config import DetectorConfig
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


def test_what_the_harness_cannot_score_is_named_not_a_traceback_or_a_hang(tmp_path, capsys):
    """A review found tracebacks (a text file as the checkpoint: KeyError: 116; no timestamp
    column or a byte-order mark before it: KeyError: 'timestamp'; a timestamp that is not ISO
    8601: a bare ValueError) and `--through-kafka` waiting forever for rows the daemon had
    dead-lettered (a series path longer than a stream id may be)."""
    data = tmp_path / "data"
    out = str(tmp_path / "out")
    _write_series(data, "catA/ok.csv", [1.0, 2.0, 3.0])
    (data / "catA/bom.csv").write_bytes("\ufefftimestamp,value\n2024-01-01 00:00:00,1.5\n".encode())
    assert main([str(data), out]) == 0  # (the byte-order mark is read as none)
    for text, said in ((b"https://example.com/models/model.pt", "not a streamer-gru checkpoint"), (b"", "empty file")):
        (tmp_path / "bad.pt").write_bytes(text)
        assert main([str(data), out, "--checkpoint", str(tmp_path / "bad.pt")]) == 2
        assert said in capsys.readouterr().err
    (data / "catA/time.csv").write_text("time,value\n2024-01-01 00:00:00,1.0\n")
    assert main([str(data), out]) == 2
    assert "time.csv: no timestamp column" in capsys.readouterr().err
    (data / "catA/time.csv").write_text("timestamp,value\n2024-01-01 00:00:00,1.0\n01/02/2024 00:05,2.0\n")
    assert main([str(data), out]) == 2
    assert "time.csv: row 3: timestamp '01/02/2024 00:05' is not ISO 8601" in capsys.readouterr().err
    (data / "catA/time.csv").unlink()
    deep = "d" * 120 + "/" + "e" * 120 + "/" + "f" * 20 + ".csv"  # (266 characters)
    _write_series(data, deep, [1.0, 2.0, 3.0])
    assert main([str(data), out]) == 0  # (direct, the path is no stream id)
    assert main([str(data), out, "--through-kafka"]) == 2
    assert "the series' stream id through Kafka, is 266 characters, over the daemon's 256" in capsys.readouterr().err
    # Past read_series: rows the daemon dead-letters end the run with their reason, not a hang.
    series = [s for s in read_series(data) if s.rel.name == "ok.csv"]
    series[0].rel = Path("x" * 300 + ".csv")
    with pytest.raises(RuntimeError, match=r"dead-lettered 3 of 3 rows \(3 invalid_stream\)"):
        score_through_kafka(series, DetectorConfig(warmup=0), partitions=1)


def test_through_kafka_equals_direct(tmp_path):
    series = read_series(_dataset(tmp_path))
    model, _ = load_checkpoint(DEFAULT_WEIGHTS)
    settings = DetectorConfig(warmup=0, holdoff=5)  # (not the defaults: both paths must take them)
    direct = score_series(series, Detector(model, settings.calibration()))
    kafka = score_through_kafka(series, settings, partitions=2)
    for d, k in zip(direct, kafka):
        np.testing.assert_allclose(d, k, atol=1e-6)


def _scores(out):
    with (out / "catA/spiky.csv").open() as fh:
        return np.array([float(r["anomaly_score"]) for r in csv.DictReader(fh)])


def test_the_detector_settings_come_from_a_config_file(tmp_path, capsys):
    """`--config` scores with a config file's detector: section, as `streamer run` with it
    would (only --warmup could be set before, so a sensitivity of any other setting had no
    command); --baseline refuses the options it would ignore."""
    data = _dataset(tmp_path)
    config = tmp_path / "streamer.yaml"
    config.write_text("detector:\n  warmup: 0\n  holdoff: 0\n  threshold: 0.3\n")
    assert main([str(data), str(tmp_path / "cfg"), "--config", str(config)]) == 0
    model, _ = load_checkpoint(DEFAULT_WEIGHTS)
    expected = score_series(read_series(data), Detector(model, CalibrationConfig(warmup=0, holdoff=0, threshold=0.3)))
    np.testing.assert_allclose(_scores(tmp_path / "cfg"), expected[1], atol=1e-9)  # (threads: float rounding)
    assert main([str(data), str(tmp_path / "default")]) == 0
    assert not np.array_equal(_scores(tmp_path / "default"), expected[1])
    assert main([str(data), str(tmp_path / "w"), "--config", str(config), "--warmup", "50"]) == 0
    assert _scores(tmp_path / "w")[:50].max() <= TAIL_THRESHOLD  # (--warmup over the file's 0)
    config.write_text("detector:\n  holdof: 0\n")
    assert main([str(data), str(tmp_path / "bad"), "--config", str(config)]) == 2
    assert "detector.holdof" in capsys.readouterr().err
    assert main([str(data), str(tmp_path / "b"), "--baseline", "hst", "--through-kafka"]) == 2


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
