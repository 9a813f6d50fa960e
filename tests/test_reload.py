"""A checkpoint swapped under a running daemon is served without a restart."""

from __future__ import annotations

import logging
import os
import shutil
import time

import torch
from conftest import DaemonThread, event, make_config, produce, read_all, scores_of

from models.gru import DEFAULT_WEIGHTS, ModelConfig, StreamGRU, load_checkpoint, save_checkpoint


def _replace(path, model, name):
    tmp = path.with_name("next.pt")
    save_checkpoint(tmp, model, {"name": name, "data": "test"})
    os.replace(tmp, path)  # atomic, as the README asks


def _wait_version(daemon, prefix, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while not daemon.runner.model_version.startswith(prefix):
        assert time.monotonic() < deadline, f"model {prefix} not picked up"
        time.sleep(0.1)


def test_a_narrower_model_refuses_streams_wider_than_it_instead_of_stopping(broker, topics, state_dir, tmp_path):
    """A checkpoint with a smaller max_features: the decoder kept each stream's feature list,
    and the next event of a 2-feature stream overflowed its 1-wide row and stopped the loop.
    The streams start over: the wide one is refused (too_many_features), a narrow one scored."""
    ckpt = tmp_path / "model.pt"
    shutil.copy(DEFAULT_WEIGHTS, ckpt)
    config = make_config(broker, topics, state_dir, detector={"checkpoint": str(ckpt), "reload_check_s": 0.2})
    wide = [(b"pump-1", event("pump-1", i, {"t": float(i % 5), "p": float(i % 3)})) for i in range(20)]
    with DaemonThread(config) as daemon:
        produce(broker, topics["input"], wide)
        daemon.wait_scored(20)
        _replace(ckpt, StreamGRU(ModelConfig(max_features=1)), "narrow")
        _wait_version(daemon, "narrow")
        produce(broker, topics["input"], [(b"pump-1", event("pump-1", 20, {"t": 1.0, "p": 2.0}))])
        produce(broker, topics["input"], [(b"fan-1", event("fan-1", i, {"rpm": float(i)})) for i in range(10)])
        daemon.wait_scored(30)
        assert daemon.metrics.dead_letters.labels("too_many_features")._value.get() == 1


def test_checkpoint_swap_keeps_or_resets_state(broker, topics, state_dir, tmp_path, caplog):
    ckpt = tmp_path / "model.pt"
    shutil.copy(DEFAULT_WEIGHTS, ckpt)
    config = make_config(broker, topics, state_dir, detector={"checkpoint": str(ckpt), "reload_check_s": 0.2})

    def batch(start):
        return [(b"pump-1", event("pump-1", start + i, {"t": float(i % 5), "p": float(i % 3)})) for i in range(50)]

    caplog.set_level(logging.INFO, logger="streamer.loop")
    with DaemonThread(config) as daemon:
        produce(broker, topics["input"], batch(0))
        daemon.wait_scored(50)

        # Same architecture, different weights: served, and the stream keeps its state.
        model, _ = load_checkpoint(ckpt)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.5)
        _replace(ckpt, model, "halved")
        _wait_version(daemon, "halved")
        produce(broker, topics["input"], batch(50))
        daemon.wait_scored(100)
        slot = daemon.runner.slots.slot_of["pump-1"]
        assert int(daemon.runner.detector.bank.tensors["steps"][slot]) == 100

        # A different architecture: served, every state reset (and said so).
        _replace(ckpt, StreamGRU(ModelConfig(hidden=16)), "small")
        _wait_version(daemon, "small")
        produce(broker, topics["input"], batch(100))
        daemon.wait_scored(150)
        slot = daemon.runner.slots.slot_of["pump-1"]
        assert int(daemon.runner.detector.bank.tensors["steps"][slot]) == 50
        assert daemon.runner.detector.bank.tensors["h"].shape[-1] == 16

        # A broken file is refused; the current model stays.
        ckpt.write_bytes(b"not a checkpoint")
        time.sleep(1.0)
        assert daemon.runner.model_version.startswith("small")

    versions = [
        r["model_version"].split("-")[0] for r in sorted(scores_of(read_all(broker, topics["scores"], expect=150)), key=lambda r: r["ts"])
    ]
    assert versions[:50] == ["synthetic"] * 50  # the bundled weights' training name
    assert versions[50:100] == ["halved"] * 50
    assert versions[100:] == ["small"] * 50
    text = caplog.text
    assert "kept the state of 1 streams" in text
    assert "different architecture; reset the state of 1 streams" in text
    assert "could not be loaded, keeping the current model" in text
