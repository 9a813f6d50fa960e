"""`streamer train` from CSV files and from a replayed Kafka topic range."""

from __future__ import annotations

import csv
import importlib.metadata
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import orjson
import pytest
import torch
from conftest import default_sigint, event, produce, read_all
from kafka import KafkaConsumer

from models.gru import load_checkpoint
from streamer.config import ConfigError, load_config


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
    # (The file named twice: it was listed twice in the description, and trained once.)
    cmd = [sys.executable, "-m", "streamer.cli", "train", str(path), str(path), "--out", str(out)]
    cmd += ["--steps", "3", "--batch", "4", "--length", "64"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout
    model, meta = load_checkpoint(out)
    assert meta["training"]["name"] == "custom" and model.config.hidden == 32
    assert meta["training"]["data"].count("plant.csv") == 1, meta["training"]["data"]
    # Which streamer wrote it, beside which torch (a review: only torch was recorded).
    assert meta["training"]["streamer"] == importlib.metadata.version("streamer") != "unknown"
    assert meta["training"]["series"] == [f"{path}:temp", f"{path}:rpm"]  # the text column is not a series
    # The feature schema: what the model serves (any names, up to max_features), and the
    # features it was trained on.
    assert meta["schema"] == {"max_features": 8, "features": meta["schema"]["features"], "trained_on": ["rpm", "temp"]}
    assert torch.load(out, weights_only=True)["schema"] == meta["schema"]  # in the file, not derived at load
    assert "plant.csv" in meta["training"]["data"] and "2 series, 999 values" in meta["training"]["data"]
    assert meta["config"]["hidden"] == 32
    # The summary compares the first and last steps, not two overlapping windows of a short run
    # (which printed the same loss twice), and names the text column it left out.
    losses = (meta["training"]["first_loss"], meta["training"]["final_loss"])
    assert losses[0] != losses[1] and f"loss {losses[0]:.3f} -> {losses[1]:.3f}" in proc.stdout
    assert f"{path}:note: text (500 cells such as 'ok'), left out" in proc.stderr


def test_train_refuses_files_with_no_series_and_files_with_a_topic(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("when,what\n2024-01-01,ok\n2024-01-02,broken\n")
    base = [sys.executable, "-m", "streamer.cli", "train", "--out", str(tmp_path / "m.pt"), "--steps", "1"]
    proc = subprocess.run([*base, str(path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "no series" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    proc = subprocess.run([*base, str(path), "--topic", "sensors"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "not both" in proc.stderr, proc.stderr
    assert not (tmp_path / "m.pt").exists()


def test_a_topic_the_brokers_do_not_have_exits_1_not_2(broker, tmp_path):
    """Not the arguments' fault (the topic may be created yet): exit 1 as for an unreachable
    broker, with the command's prefix (it was exit 1 with a bare message via SystemExit)."""
    cmd = [sys.executable, "-m", "streamer.cli", "train", "--topic", "no-such-topic", "--bootstrap-servers", broker.bootstrap]
    proc = subprocess.run([*cmd, "--out", str(tmp_path / "m.pt")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.startswith("streamer: topic 'no-such-topic' not found"), proc.stderr
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
    # The skipped record is counted, with its reason (it was dropped without a word).
    assert "skipped 1 record" in proc.stderr and "invalid_json 1" in proc.stderr, proc.stderr
    _, meta = load_checkpoint(out)
    assert sorted(meta["training"]["series"]) == sorted(f"s{i}:{f}" for i in range(4) for f in "ab")
    # The offsets actually read, per partition (first..last, inclusive), not the range asked for.
    ends = Counter(r.partition for r in read_all(broker, topics["input"], expect=len(records)))  # (ListOffsets under-reports on Tansu)
    read = ", ".join(f"p{p} 0..{min(ends[p], 50) - 1}" if ends[p] else f"p{p} none" for p in range(4))
    assert f"Kafka topic {topics['input']}" in meta["training"]["data"], meta["training"]["data"]
    assert f"offsets read {read}" in meta["training"]["data"], meta["training"]["data"]


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
    # The base data is still the synthetic families, and the name, the batches and the schema say
    # that public series were mixed in (a quarter of each batch: "synthetic", "8 series" before).
    assert meta["training"]["name"] == "synthetic+public" and "8 series (6 synthetic, 2 public)" in meta["training"]["data"]
    trained_on = meta["schema"]["trained_on"]
    assert "co2" in trained_on and "volume" in trained_on and "synthetic series (models/synthetic.py)" in trained_on


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


def test_stray_text_cells_are_gaps_and_text_columns_are_named(tmp_path):
    """One "abc" among 49 readings dropped the whole column without a word; a text column went
    unmentioned too. Now a few stray cells are gaps, a text column is left out, both said."""
    from streamer.traindata import load_files

    rows = [f"{i},{'abc' if i == 7 else 1000 + i},{'ok' if i % 2 else 'warn'},2024-01-01T00:{i:02d}:00" for i in range(50)]
    path = tmp_path / "d.csv"
    path.write_text("temp,rpm,status,timestamp\n" + "\n".join(rows) + "\n")
    notes: list[str] = []
    out = load_files([str(path)], notes=notes)
    assert sorted(out) == [f"{path}:rpm", f"{path}:temp"]
    assert len(out[f"{path}:rpm"]) == 49 and 1007.0 not in out[f"{path}:rpm"]
    assert notes == [
        f"{path}:rpm: 1 non-numeric cell (such as 'abc') read as gap",
        f"{path}:status: text (50 cells such as 'warn'), left out",
    ]


def test_files_as_spreadsheets_and_tools_write_them_are_read_or_refused_naming_the_file(tmp_path):
    """From a review: a byte-order mark (Excel's "CSV UTF-8") made the first header
    "\ufefftimestamp", so the time column was trained as a ramp and `--columns timestamp` found
    nothing; a repeated header dropped a column without a word; a Latin-1 or gzip file stopped
    the command with a bare codec error naming no file; a Parquet file named `.pq` was read as
    CSV."""
    from streamer.traindata import load_files

    bom = tmp_path / "bom.csv"
    bom.write_text("timestamp,temp\n" + "".join(f"{1_700_000_000 + 60 * i},{i % 7}\n" for i in range(20)), encoding="utf-8-sig")
    skipped: list[str] = []
    assert list(load_files([str(bom)], skipped=skipped)) == [f"{bom}:temp"] and skipped == [f"{bom}:timestamp"]
    assert list(load_files([str(bom)], columns=["timestamp"])) == [f"{bom}:timestamp"]
    dup = tmp_path / "dup.csv"
    dup.write_text("temp,temp,temp.1\n" + "".join(f"{i},{-i},{2 * i}\n" for i in range(5)))
    notes: list[str] = []
    out = load_files([str(dup)], notes=notes)
    assert {k: v.tolist() for k, v in out.items()} == {
        f"{dup}:temp": [0.0, 1.0, 2.0, 3.0, 4.0],
        f"{dup}:temp.2": [0.0, -1.0, -2.0, -3.0, -4.0],  # (temp.1 is taken by the third column)
        f"{dup}:temp.1": [0.0, 2.0, 4.0, 6.0, 8.0],
    }
    assert notes == [f"{dup}: column 'temp' appears more than once; read as 'temp.2'"]
    twice = tmp_path / "twice.csv"  # (a time column given twice: the second, "ts.1", was trained)
    twice.write_text("ts,ts,temp\n" + "".join(f"{i},{i},{i % 3}\n" for i in range(5)))
    skipped.clear()
    assert list(load_files([str(twice)], skipped=skipped)) == [f"{twice}:temp"] and skipped == [f"{twice}:ts", f"{twice}:ts.1"]
    bare = tmp_path / "bare.csv"
    bare.write_text("".join(f"{i},{2 * i}\n" for i in range(5)))  # (no header row: its first row is not data)
    notes.clear()
    assert sorted(load_files([str(bare)], notes=notes)) == [f"{bare}:0", f"{bare}:0.1"]
    assert notes[0] == f"{bare}: its first row (0,0) is read as column names; if it is data, add a header row", notes
    latin = tmp_path / "latin.csv"
    latin.write_bytes("temp\u00b0\n1\n".encode("latin-1"))
    with pytest.raises(ValueError, match=f"{latin}: not a UTF-8 CSV file \\(it holds the byte"):
        load_files([str(latin)])
    gz = tmp_path / "d.csv.gz"
    gz.write_bytes(__import__("gzip").compress(b"temp\n1\n"))
    with pytest.raises(ValueError, match=f"{gz}: gzip-compressed"):
        load_files([str(gz)])
    from streamer import traindata

    assert traindata._file_kind(tmp_path / "x.parquet") == "parquet"
    pq = tmp_path / "e.pq"
    pq.write_bytes(b"PAR1" + bytes(8) + b"PAR1")
    assert traindata._file_kind(pq) == "parquet" and traindata._file_kind(bom) == "csv"
    par = tmp_path / "par.csv"  # (a review of the first version: taken for Parquet)
    par.write_text("PAR1,PAR2\n" + "".join(f"{i},{i}\n" for i in range(5)))
    assert traindata._file_kind(par) == "csv" and sorted(load_files([str(par)])) == [f"{par}:PAR1", f"{par}:PAR2"]
    multi = tmp_path / "multi.csv"  # (pandas' to_csv() of a two-level index: the second level was trained, as ".1")
    multi.write_text(",,temp\n" + "".join(f"{i // 2},{i},{i % 3}\n" for i in range(5)))
    skipped.clear()
    assert list(load_files([str(multi)], skipped=skipped)) == [f"{multi}:temp"] and skipped == [f"{multi}:", f"{multi}:Unnamed: 1"]
    iso = tmp_path / "iso.csv"  # (a review: a time column of ISO text was left out without a word)
    iso.write_text("Date,temp\n" + "".join(f"2024-01-01T00:{i:02d}:00,{i % 3}\n" for i in range(5)))
    skipped.clear()
    notes.clear()
    assert list(load_files([str(iso)], skipped=skipped, notes=notes)) == [f"{iso}:temp"] and skipped == [f"{iso}:Date"] and notes == []
    skipped.clear()  # (with --columns nothing is left out as a time column: the columns were named)
    assert list(load_files([str(iso)], columns=["temp"], skipped=skipped)) == [f"{iso}:temp"] and skipped == []
    semi = tmp_path / "semi.csv"  # (a review: "text (100 cells such as '0;0.000;0'), left out", no hint)
    semi.write_text("ts;temp\n" + "".join(f"{i};{i % 3}\n" for i in range(5)))
    notes.clear()
    assert load_files([str(semi)], notes=notes) == {}
    assert notes[0] == f"{semi}: one column named 'ts;temp': read as comma-separated, the file looks separated by ';'", notes
    with pytest.raises(ValueError, match=f"{tmp_path}: a folder; name its files"):  # (it was "[Errno 21] Is a directory")
        load_files([str(tmp_path)])


def test_train_says_why_no_series_was_left_and_checks_its_options_first(tmp_path):
    """From a review: with no series left, only the final error was printed (the text column and
    the time column left out went unsaid); `--bootstrap-servers` skipped the check the config's
    key gets (a typo waited 30 s for brokers); an empty offset range read nothing and blamed the
    data."""
    path = tmp_path / "y.csv"
    path.write_text("time,value\n" + "".join(f"{i},{i}C\n" for i in range(20)))
    base = [sys.executable, "-m", "streamer.cli", "train", "--out", str(tmp_path / "m.pt")]
    proc = subprocess.run([*base, str(path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{path}:value: text (20 cells such as '0C'), left out" in proc.stderr and f"{path}:time" in proc.stderr, proc.stderr
    for extra, message in (
        (["--topic", "t", "--bootstrap-servers", "localhost:99999"], "--bootstrap-servers: 'localhost:99999' is not host:port"),
        (["--topic", "t", "--from-offset", "100", "--to-offset", "50"], "--to-offset (50) must be above --from-offset (100)"),
        ([str(path), "--to-offset", "50"], "--from-offset and --to-offset only apply with --topic"),
    ):
        proc = subprocess.run([*base, *extra], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "m.pt").exists()


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
    out = tmp_path / "d.pt"
    # The daemon's config names the checkpoint this first training run is to write: training
    # needs the connection and input settings only, not that file (it refused: "no checkpoint").
    config.write_text(f"kafka:\n  bootstrap_servers: {broker.bootstrap}\ninput:\n  stream_field: device\ndetector:\n  checkpoint: {out}\n")
    with pytest.raises(ConfigError, match="no checkpoint file"):
        load_config(config)  # (the daemon still refuses to start without it)
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


def test_train_refuses_series_too_short_to_predict_a_value(tmp_path):
    """A value is predicted (and trained on) only after 2 values of its series: two rows passed
    the old ">= 2 values" check and wrote the untrained initial weights with exit 0."""
    path = tmp_path / "two.csv"
    path.write_text("temp,rpm\n1.5,3\n2.5,4\n")
    out = tmp_path / "m.pt"
    cmd = [sys.executable, "-m", "streamer.cli", "train", str(path), "--out", str(out), "--steps", "2", "--batch", "4", "--length", "32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "at least 3 values" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not out.exists()


def test_three_values_are_enough_and_a_run_that_learns_nothing_is_an_error():
    import torch

    from models.gru import ModelConfig, StreamGRU
    from models.train import SeriesSampler, TrainConfig, train

    with pytest.raises(ValueError, match="at least 3 values"):
        SeriesSampler({"a": np.array([1.0, 2.0]), "gaps": np.array([np.nan, 1.0, np.inf, 2.0, 1e300])})
    sampler = SeriesSampler({"a": np.array([1.0, 2.5, 2.0]), "short": np.array([4.0])})
    assert sampler.names == ["a"] and sampler.too_short == ["short"] and sampler.rows == 3
    cfg = TrainConfig(steps=2, batch=2, length=32)
    model, summary = train(cfg, progress=False, data=sampler, data_description="three")
    torch.manual_seed(cfg.seed)
    init = StreamGRU(ModelConfig(hidden=cfg.hidden, max_features=cfg.max_features))
    assert summary["first_loss"] > 0 and not all(torch.equal(a, b) for a, b in zip(init.state_dict().values(), model.state_dict().values()))

    class NoPredictions(SeriesSampler):
        def __call__(self, rng, batch, length):
            return np.full((batch, length), np.nan)

    with pytest.raises(ValueError, match="no training step"):
        train(cfg, progress=False, data=NoPredictions({"a": np.arange(5.0)}), data_description="gaps")

    class EveryOther(SeriesSampler):  # (a review: such batches were counted as trained in the summary)
        calls = 0

        def __call__(self, rng, batch, length):
            self.calls += 1
            return super().__call__(rng, batch, length) if self.calls % 2 else np.full((batch, length), np.nan)

    _, summary = train(
        TrainConfig(steps=4, batch=2, length=32), progress=False, data=EveryOther({"a": np.arange(50.0)}), data_description="x"
    )
    assert summary["data"].endswith("4 batches of 2 windows x 32 (2 with no value to predict, not trained on)"), summary["data"]


def test_parquet_files_are_read_as_the_same_data_in_a_csv(tmp_path, monkeypatch):
    """An all-NaN Parquet column was "1 series, 500 values" (and trained nothing) where the same
    data as CSV is refused. Decimals (a database's NUMERIC) were left out as "not numeric"
    (a review), and a column name given twice made the read raise. Real files, written and read
    by pyarrow (a dev dependency)."""
    import decimal

    import pyarrow as pa
    import pyarrow.parquet as pq

    from streamer.traindata import DataUnavailable, load_files

    temp = [np.nan, 1.0, np.inf, 2.0, -np.inf, 3.0]
    table = pa.Table.from_arrays(
        [
            pa.array(temp),
            pa.array([None] * 6, type=pa.float64()),
            pa.array(range(6), type=pa.int64()),
            pa.array([decimal.Decimal(f"{i}.25") if i != 2 else None for i in range(6)], type=pa.decimal128(6, 2)),
            pa.array([1.0, 2.0, 1.0, 2.0, 3.0, 1.0]).dictionary_encode(),
            pa.array([True, False] * 3),
            pa.array(list("abcdef")),
            pa.array([i * 10 for i in range(6)], type=pa.uint8()),
        ],
        names=["temp", "empty", "n", "price", "level", "flag", "name", "n"],
    )
    path = tmp_path / "d.parquet"
    pq.write_table(table, path)
    notes: list[str] = []
    out = {k.rsplit(":", 1)[1]: v.tolist() for k, v in load_files([str(path)], notes=notes).items()}
    assert out == {
        "temp": [1.0, 2.0, 3.0],  # (NaN and infinities are gaps; the column of nulls is no series)
        "n": [0.0, 1.0, 2.0, 3.0, 4.0, 5.0],
        "price": [0.25, 1.25, 3.25, 4.25, 5.25],
        "level": [1.0, 2.0, 1.0, 2.0, 3.0, 1.0],
        "n.1": [0.0, 10.0, 20.0, 30.0, 40.0, 50.0],
    }
    assert notes == [
        f"{path}: column 'n' appears more than once; read as 'n.1'",
        f"{path}:flag: not numeric (bool), left out",  # (as the daemon refuses a boolean reading)
        f"{path}:name: not numeric (string), left out",
    ]
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("temp,empty,n\n" + "".join(f"{t},,{n}\n" for t, n in zip(temp, range(6))))
    from_csv = {k.rsplit(":", 1)[1]: v.tolist() for k, v in load_files([str(csv_path)]).items()}
    assert from_csv == {k: out[k] for k in ("temp", "n")}
    stamped = tmp_path / "stamped.parquet"  # (a review: a timestamp-typed time column went unsaid)
    pq.write_table(pa.table({"timestamp": pa.array([0, 60_000], type=pa.timestamp("ms")), "x": [1.0, 2.0]}), stamped)
    skipped: list[str] = []
    notes.clear()
    assert list(load_files([str(stamped)], skipped=skipped, notes=notes)) == [f"{stamped}:x"]
    assert skipped == [f"{stamped}:timestamp"] and notes == []
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(ValueError, match=f"{broken}: not a readable Parquet file"):
        load_files([str(broken)])
    # (A review of the first version: a folder of parts, as Spark writes "x.parquet", stopped
    # loading; a null in a duration column was read as -9.2e18.)
    folder = tmp_path / "spark.parquet"
    folder.mkdir()
    pq.write_table(pa.table({"x": [1.0, 2.0], "took": pa.array([5, None], type=pa.duration("ms"))}), folder / "part-0.parquet")
    pq.write_table(pa.table({"x": [3.0, 4.0], "took": pa.array([7, 9], type=pa.duration("ms"))}), folder / "part-1.parquet")
    got = {k.rsplit(":", 1)[1]: sorted(v.tolist()) for k, v in load_files([str(folder)]).items()}
    assert got == {"x": [1.0, 2.0, 3.0, 4.0], "took": [5.0, 7.0, 9.0]}
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # (a host without it: exit 1, not a traceback)
    with pytest.raises(DataUnavailable, match="needs pyarrow"):
        load_files([str(path)])


def test_a_bad_out_is_refused_before_training(tmp_path):
    """--out a directory, or in a place that cannot be written, was found after the whole run,
    with a traceback. (--steps is far more than the timeout allows: it must not train.)"""
    (tmp_path / "afile").write_text("")
    base = [sys.executable, "-m", "streamer.cli", "train", "--steps", "1000000", "--batch", "4", "--length", "32"]
    for out in (tmp_path, "/proc/x.pt", tmp_path / "afile" / "m.pt"):
        proc = subprocess.run([*base, "--out", str(out)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "--out" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_a_stop_request_ends_training_between_steps_with_the_bar_stopped():
    """Ctrl-C during training is a request the loop takes between steps: a KeyboardInterrupt
    raised wherever the signal landed could interrupt the progress bar inside its lock, and the
    command then hung in the bar's stop() (a CI run timed out) or died by the signal after
    saying it was interrupted (4 of 40 tries)."""
    import threading

    from models.train import TrainConfig, train

    steps = []

    def stop() -> bool:
        steps.append(1)
        return len(steps) > 3

    before = threading.active_count()
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(steps=100, batch=2, length=32), progress=True, stop=stop)
    assert len(steps) == 4
    time.sleep(0.2)
    assert threading.active_count() == before  # the bar's refresh thread is gone


@pytest.mark.parametrize("delay_s", [0.0, 0.6])
def test_sigint_during_train_says_one_line_and_leaves_no_file(tmp_path, delay_s):
    import os
    import signal

    fifo = tmp_path / "data.csv"
    os.mkfifo(fifo)
    out = tmp_path / "m.pt"
    cmd = [
        sys.executable,
        "-m",
        "streamer.cli",
        "train",
        str(fifo),
        "--out",
        str(out),
        "--steps",
        "1000000",
        "--batch",
        "4",
        "--length",
        "32",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    with fifo.open("w") as fh:  # (opens once the command reads its data: past start-up)
        fh.write("temp\n" + "".join(f"{np.sin(i / 5):.3f}\n" for i in range(200)))
    time.sleep(delay_s)  # (0: while it reads or starts; 0.6: while it trains)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # (a hung command must not outlive the test, training for good)
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and "Traceback" not in err and "interrupted" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.csv"]  # no checkpoint, no temp file


def test_sigint_during_the_last_step_writes_no_checkpoint(tmp_path):
    """Ctrl-C taken between steps must not be lost when there is no next step: the command went
    on to write the checkpoint and exit 0 (an --out a daemon reloads replaced the served model)."""
    import os
    import signal

    fifo = tmp_path / "data.csv"
    os.mkfifo(fifo)
    out = tmp_path / "m.pt"
    cmd = [sys.executable, "-m", "streamer.cli", "train", str(fifo), "--out", str(out)]
    cmd += ["--steps", "1", "--batch", "512", "--length", "1500"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    with fifo.open("w") as fh:
        fh.write("temp\n" + "".join(f"{np.sin(i / 5):.3f}\n" for i in range(3000)))
    time.sleep(1.5)  # (inside the one step: it takes several seconds)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and "interrupted" in err, err
    assert not out.exists()


def test_train_runs_from_another_thread_and_leaves_the_callers_sigint_alone(tmp_path):
    """`cli.main(["train", ...])` from a thread failed with "signal only works in main thread"
    (exit 2, as if the data were bad); from the main thread it left its handler installed."""
    import signal
    import threading

    from streamer.cli import main

    data = tmp_path / "d.csv"
    data.write_text("temp\n" + "".join(f"{np.sin(i / 5):.3f}\n" for i in range(200)))
    rc: list[int] = []
    worker = threading.Thread(target=lambda: rc.append(main(["train", str(data), "--out", str(tmp_path / "a.pt"), "--steps", "2"])))
    worker.start()
    worker.join(timeout=120)
    assert rc == [0]
    before = signal.getsignal(signal.SIGINT)
    assert main(["train", str(data), "--out", str(tmp_path / "b.pt"), "--steps", "2"]) == 0
    assert signal.getsignal(signal.SIGINT) is before


def test_a_topic_replay_stops_at_the_end_it_found_at_start(broker, topics, monkeypatch):
    """Without --to-offset the replay stopped at a moving end: on a topic being written it read
    records produced after the command started."""
    from streamer.config import InputConfig
    from streamer.traindata import load_topic

    early = [(f"s{i % 4}".encode(), event(f"s{i % 4}", i, {"a": float(i % 9)})) for i in range(120)]
    produce(broker, topics["input"], early)
    late = [(f"s{i % 4}".encode(), event("late", i, {"a": 1.0})) for i in range(40)]
    poll = KafkaConsumer.poll

    def poll_then_produce(self, *args, **kwargs):  # records that arrive once the replay has started
        batch = poll(self, *args, **kwargs)
        if batch and late:
            produce(broker, topics["input"], late)
            late.clear()
        return batch

    monkeypatch.setattr(KafkaConsumer, "poll", poll_then_produce)
    series = load_topic({"bootstrap_servers": broker.bootstrap}, InputConfig(), topics["input"], 0, None, 8, timeout_s=5)
    assert not late  # (they were produced while it replayed)
    assert sorted(series) == [f"s{i}:a" for i in range(4)] and sum(len(v) for v in series.values()) == 120


def test_public_data_without_statsmodels_is_unavailable_not_a_bare_exit(monkeypatch):
    """Like a missing pyarrow: the command exits 1 with its prefix (it went out through SystemExit)."""
    from streamer.traindata import DataUnavailable, load_statsmodels

    monkeypatch.setitem(sys.modules, "statsmodels", None)
    with pytest.raises(DataUnavailable, match="statsmodels"):
        load_statsmodels()


def test_a_public_share_that_leaves_a_source_no_row_is_refused_and_the_split_is_described(tmp_path, capsys):
    """A review: at a batch of 2 and a share of 0.8 (or 64 and 0.995) no row of the files was
    used, and at a batch of 1 none of the public series, while the checkpoint described both as
    the training data (training on another file gave the same weights)."""
    from models.train import SeriesSampler, TrainConfig, train

    data = SeriesSampler({"a:x": np.sin(np.arange(400) / 7.0)})
    public = SeriesSampler({"p:y": np.cos(np.arange(400) / 5.0)})
    sources = {"data": data, "data_description": "files a.csv", "public": public, "public_description": "p"}
    for batch, share, who in ((2, 0.8, "the training data"), (64, 0.995, "the training data"), (1, 0.25, "the public series")):
        with pytest.raises(ValueError, match=f"in batches of {batch} leaves {who} no row"):
            train(TrainConfig(steps=1, batch=batch, length=32, public_share=share), progress=False, **sources)
    _, summary = train(TrainConfig(steps=2, batch=4, length=32), progress=False, **sources)
    # The command says so before reading any data (a topic replay can take minutes).
    from streamer.cli import main

    out = tmp_path / "m.pt"
    assert main(["train", "--public", "--public-share", "0.8", "--batch", "2", "--out", str(out), "--topic", "nowhere"]) == 2
    assert "--public-share: a public share of 0.8 in batches of 2 leaves the training data no row" in capsys.readouterr().err
    assert not out.exists()
    assert "2 batches of 4 windows (3 from it, 1 public) x 32" in summary["data"]
    assert summary["public"]["share"] == 0.25 and summary["public"]["rows_per_batch"] == 1
