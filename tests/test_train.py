"""`streamer train` from CSV files and from a replayed Kafka topic range."""

from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import orjson
from conftest import event, produce

from models.gru import load_checkpoint


def test_train_from_csv_writes_a_described_checkpoint(tmp_path):
    path = tmp_path / "plant.csv"
    rng = np.random.default_rng(0)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["timestamp", "temp", "rpm", "note"])
        for i in range(500):
            temp, rpm = 20 + np.sin(i / 20) + rng.normal(0, 0.1), 1500 + rng.normal(0, 5)
            # One gap in the temperature (an empty cell) is skipped: it dropped the whole column.
            w.writerow([f"2024-01-01 00:{i // 60 % 60:02d}:{i % 60:02d}", "" if i == 100 else temp, rpm, "ok"])
    out = tmp_path / "m.pt"
    cmd = [sys.executable, "-m", "streamer.cli", "train", str(path), "--out", str(out), "--steps", "3", "--batch", "4", "--length", "64"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout
    model, meta = load_checkpoint(out)
    assert meta["training"]["name"] == "custom" and model.config.hidden == 32
    assert meta["training"]["series"] == [f"{path}:temp", f"{path}:rpm"]  # the text column is not a series
    assert "plant.csv" in meta["training"]["data"] and "2 series, 999 values" in meta["training"]["data"]
    assert meta["config"]["hidden"] == 32


def test_train_refuses_files_with_no_series_and_files_with_a_topic(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("when,what\n2024-01-01,ok\n2024-01-02,broken\n")
    base = [sys.executable, "-m", "streamer.cli", "train", "--out", str(tmp_path / "m.pt"), "--steps", "1"]
    proc = subprocess.run([*base, str(path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "no series" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    proc = subprocess.run([*base, str(path), "--topic", "sensors"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "not both" in proc.stderr, proc.stderr
    assert not (tmp_path / "m.pt").exists()


def test_train_from_a_kafka_topic_range(broker, topics, tmp_path):
    records = [(f"s{i % 4}".encode(), event(f"s{i % 4}", i, {"a": float(i % 9), "b": float(i % 5)})) for i in range(400)]
    records.insert(10, (b"x", b"garbage"))  # skipped, as the daemon would dead-letter it
    produce(broker, topics["input"], records)
    out = tmp_path / "k.pt"
    cmd = [sys.executable, "-m", "streamer.cli", "train", "--topic", topics["input"], "--bootstrap-servers", broker.bootstrap]
    cmd += ["--to-offset", "50", "--out", str(out), "--steps", "2", "--batch", "4", "--length", "32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    _, meta = load_checkpoint(out)
    assert sorted(meta["training"]["series"]) == sorted(f"s{i}:{f}" for i in range(4) for f in "ab")
    assert f"Kafka topic {topics['input']}" in meta["training"]["data"] and "offsets 0..50" in meta["training"]["data"]


def test_padding_before_a_short_series_is_neither_stepped_nor_trained_on():
    import torch

    from models.gru import ModelConfig, StreamGRU
    from models.train import TrainConfig, _sequence_loss

    torch.manual_seed(0)
    model = StreamGRU(ModelConfig())
    cfg = TrainConfig(burn_in=0, tbptt=16)
    s = torch.as_tensor(10 + np.sin(np.arange(40) / 3.0) + np.random.default_rng(1).normal(0, 0.1, 40), dtype=torch.float64)
    padded = torch.cat([torch.full((24,), float("nan"), dtype=torch.float64), s])
    alone = _sequence_loss(model, s[None, :], cfg)
    assert torch.isfinite(alone)
    # The same values after 24 absent steps: the same surprises, averaged over the same events.
    assert torch.allclose(_sequence_loss(model, padded[None, :], cfg), alone)


def test_mixed_batches_take_each_source_in_its_share():
    from models.train import MixedSampler, SeriesSampler

    rng = np.random.default_rng(0)
    ones = SeriesSampler({"one": np.ones(100)})
    twos = SeriesSampler({"two": np.full(100, 2.0)})
    out = MixedSampler([(ones, 0.75), (twos, 0.25)])(rng, 8, 16)
    assert out.shape == (8, 16)
    assert sorted(out[:, 0].tolist()) == [1.0] * 6 + [2.0] * 2
    short = SeriesSampler({"short": np.arange(10.0)})(rng, 1, 16)[0]  # shorter than a window: whole, after NaN padding
    assert np.isnan(short[:6]).all() and short[6:].tolist() == list(range(10))


def test_train_with_the_public_series_records_them_in_the_checkpoint(tmp_path):
    out = tmp_path / "p.pt"
    cmd = [sys.executable, "-m", "streamer.cli", "train", "--public", "--out", str(out), "--steps", "2", "--batch", "8", "--length", "32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    _, meta = load_checkpoint(out)
    public = meta["training"]["public"]
    assert public["share"] == 0.25 and "statsmodels:co2:co2" in public["series"] and "statsmodels:nile:volume" in public["series"]
    assert "statsmodels.datasets" in public["data"] and "series" in public["data"]
    assert meta["training"]["name"] == "synthetic"  # the base data is still the synthetic families


def test_csv_files_are_read_as_people_export_them(tmp_path):
    """Two folders' metrics.csv overwrote each other; one `NA` cell dropped its whole column; a
    ragged row stopped the command with a traceback."""
    from streamer.traindata import load_files

    (tmp_path / "day1").mkdir()
    (tmp_path / "day2").mkdir()
    (tmp_path / "day1" / "metrics.csv").write_text("temp\n" + "".join(f"{i}\n" for i in range(5)))
    (tmp_path / "day2" / "metrics.csv").write_text("temp\n" + "".join(f"{i}\n" for i in range(7)))
    (tmp_path / "na.csv").write_text("temp,rpm,when\n1.5,10,a\nNA,11,b\n2.5,,c\nnan,12,d\n3.5,13,e,extra\n4.5\n")
    out = load_files([str(tmp_path / "day1" / "metrics.csv"), str(tmp_path / "day2" / "metrics.csv"), str(tmp_path / "na.csv")])
    assert sorted(len(v) for k, v in out.items() if "metrics.csv" in k) == [5, 7]
    assert out[f"{tmp_path / 'na.csv'}:temp"].tolist() == [1.5, 2.5, 3.5, 4.5]
    assert out[f"{tmp_path / 'na.csv'}:rpm"].tolist() == [10.0, 11.0, 12.0, 13.0]
    assert f"{tmp_path / 'na.csv'}:when" not in out


def test_train_refuses_bad_arguments_and_missing_files_without_a_traceback(tmp_path):
    base = [sys.executable, "-m", "streamer.cli", "train", "--out", str(tmp_path / "m.pt")]
    for extra, message in (
        ([str(tmp_path / "nowhere.csv")], "no such file"),
        (["--hidden", "0"], "--hidden must be at least 1"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--length", "16"], "length must be more than the burn-in"),
    ):
        proc = subprocess.run([*base, *extra], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "m.pt").exists()


def test_train_from_a_topic_decodes_as_the_configured_daemon_does(broker, topics, tmp_path):
    """Events that name their stream in another field (`input.stream_field: device`) were all
    skipped: the replay ignored the daemon's config."""
    records = [(None, orjson.dumps({"device": f"d{i % 2}", "ts": i, "values": {"a": float(i % 7)}})) for i in range(60)]
    produce(broker, topics["input"], records)
    config = tmp_path / "config.yaml"
    config.write_text(f"kafka:\n  bootstrap_servers: {broker.bootstrap}\ninput:\n  stream_field: device\n")
    out = tmp_path / "d.pt"
    cmd = [sys.executable, "-m", "streamer.cli", "train", "--topic", topics["input"], "--config", str(config)]
    cmd += ["--out", str(out), "--steps", "2", "--batch", "4", "--length", "24"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    _, meta = load_checkpoint(out)
    assert sorted(meta["training"]["series"]) == ["d0:a", "d1:a"]


def test_training_data_can_come_from_a_pipe(tmp_path):
    """`streamer train <(zcat data.csv.gz)` reads a pipe, which is not a regular file."""
    import os
    import threading

    from streamer.traindata import load_files

    fifo = tmp_path / "data.csv"
    os.mkfifo(fifo)

    def write() -> None:
        with fifo.open("w") as fh:
            fh.write("temp\n1\n2\n#N/A\n3\n")

    writer = threading.Thread(target=write)
    writer.start()
    out = load_files([str(fifo)])
    writer.join()
    assert list(out) == [f"{fifo}:temp"] and out[f"{fifo}:temp"].tolist() == [1.0, 2.0, 3.0]


def test_index_and_epoch_time_columns_are_not_trained_as_series(tmp_path):
    """A CSV written by pandas' `to_csv()` starts with an unnamed index column, and exports often
    carry epoch seconds: both were trained as series (pure ramps). Left out by default and named;
    `--columns` picks columns by name, and one that no file has is an error."""
    path = tmp_path / "export.csv"
    rows = "".join(f"{i},{1_700_000_000 + 60 * i},{20 + np.sin(i / 9):.3f},{i % 5}\n" for i in range(300))
    path.write_text(",timestamp,temp, errors\n" + rows)  # (" errors": a space after the comma, as spreadsheets write)
    base = [sys.executable, "-m", "streamer.cli", "train", str(path), "--steps", "2", "--batch", "4", "--length", "64"]
    proc = subprocess.run([*base, "--out", str(tmp_path / "a.pt")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"{path}:, {path}:timestamp" in proc.stderr  # (said, so a user knows what was left out)
    assert load_checkpoint(tmp_path / "a.pt")[1]["training"]["series"] == [f"{path}:temp", f"{path}: errors"]
    both = ["--columns", "errors,timestamp"]
    proc = subprocess.run([*base, "--out", str(tmp_path / "b.pt"), *both], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert load_checkpoint(tmp_path / "b.pt")[1]["training"]["series"] == [f"{path}:timestamp", f"{path}: errors"]
    proc = subprocess.run([*base, "--out", str(tmp_path / "c.pt"), "--columns", "temp,tmep"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "'tmep'" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "c.pt").exists()
