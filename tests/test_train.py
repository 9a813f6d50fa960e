"""`streamer train` from CSV files and from a replayed Kafka topic range."""

from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
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
            w.writerow([f"2024-01-01 00:{i // 60 % 60:02d}:{i % 60:02d}", temp, rpm, "ok"])
    out = tmp_path / "m.pt"
    cmd = [sys.executable, "-m", "streamer.cli", "train", str(path), "--out", str(out), "--steps", "3", "--batch", "4", "--length", "64"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout
    model, meta = load_checkpoint(out)
    assert meta["training"]["name"] == "custom" and model.config.hidden == 32
    assert meta["training"]["series"] == ["plant.csv:temp", "plant.csv:rpm"]  # the text column is not a series
    assert "plant.csv" in meta["training"]["data"] and "2 series, 1,000 values" in meta["training"]["data"]
    assert meta["config"]["hidden"] == 32


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
