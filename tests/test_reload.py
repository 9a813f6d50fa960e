"""A checkpoint swapped under a running daemon is served without a restart."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from conftest import DaemonThread, event, make_config, produce, read_all, scores_of

from models.gru import DEFAULT_WEIGHTS, ModelConfig, StreamGRU, load_checkpoint, save_checkpoint
from streamer.app import CheckpointWatcher
from streamer.config import build_config
from streamer.decode import REASONS


def _replace(path, model, name):
    tmp = path.with_name("next.pt")
    save_checkpoint(tmp, model, {"name": name, "data": "test"})
    os.replace(tmp, path)  # atomic, as the README asks


def _wait_version(daemon, prefix, timeout_s=30.0):
    deadline = time.monotonic() + timeout_s
    while not daemon.runner.model_version.startswith(prefix):
        assert time.monotonic() < deadline, f"model {prefix} not picked up"
        time.sleep(0.1)


def test_a_narrower_model_refuses_streams_wider_than_it_instead_of_stopping(broker, topics, state_dir, tmp_path, caplog):
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
    # (said at the swap: the reset's warning alone did not say that valid events would be refused)
    assert "the new checkpoint's max_features is 1 and 1 streams have more features" in caplog.text


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
        # The same bytes again (a new inode): nothing to swap, no reload counted.
        same = ckpt.with_name("same.pt")
        same.write_bytes(ckpt.read_bytes())
        os.replace(same, ckpt)
        time.sleep(1.0)
        assert daemon.metrics.model_reloads.labels("kept_state")._value.get() == 1
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

        # A broken file is refused; the current model stays, and the gauge says a restart would fail.
        assert daemon.metrics.checkpoint_refused._value.get() == 0
        ckpt.write_bytes(b"not a checkpoint")
        time.sleep(1.0)
        assert daemon.runner.model_version.startswith("small")
        assert daemon.metrics.checkpoint_refused._value.get() == 1
        reloads = daemon.metrics.model_reloads
        assert [reloads.labels(r)._value.get() for r in ("kept_state", "reset_state", "failed")] == [1, 1, 1]

    versions = [
        r["model_version"].split("-")[0] for r in sorted(scores_of(read_all(broker, topics["scores"], expect=150)), key=lambda r: r["ts"])
    ]
    assert versions[:50] == ["synthetic+public"] * 50  # the bundled weights' training name
    assert versions[50:100] == ["halved"] * 50
    assert versions[100:] == ["small"] * 50
    text = caplog.text
    assert "kept the state of 1 streams" in text
    assert "different architecture (hidden 32 -> 16); reset the state of 1 streams" in text  # (which setting: a review)
    assert "could not be loaded, keeping the current model" in text


def _saved(path, seed, name):
    torch.manual_seed(seed)
    save_checkpoint(path, StreamGRU(ModelConfig()), {"name": name, "data": "test"})


def test_a_replacement_with_the_same_size_and_mtime_is_noticed(tmp_path):
    """Two trainings of one architecture write files of the same size, and cp -p / rsync -a keep
    the mtime: the watcher compared only those two and served the old model for good."""
    ckpt = tmp_path / "model.pt"
    _saved(ckpt, 1, "first")
    watcher = CheckpointWatcher(build_config({"detector": {"checkpoint": str(ckpt)}}, env={}))
    before = ckpt.stat()
    _saved(tmp_path / "next.pt", 2, "second")
    assert (tmp_path / "next.pt").stat().st_size == before.st_size
    os.utime(tmp_path / "next.pt", ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(tmp_path / "next.pt", ckpt)
    found = watcher.poll()
    assert found is not None and found[1]["training"]["name"] == "second"
    assert watcher.poll() is None  # ...once


def test_a_refused_checkpoint_gets_another_chance_when_fixed_and_a_deleted_one_is_reported(tmp_path, caplog):
    ckpt = tmp_path / "model.pt"
    _saved(ckpt, 1, "first")
    watcher = CheckpointWatcher(build_config({"detector": {"checkpoint": str(ckpt)}}, env={}))
    good = tmp_path / "good.pt"
    _saved(good, 2, "second")
    ckpt.write_bytes(good.read_bytes()[:100])  # half written
    assert not watcher.refused
    assert watcher.poll() is None and watcher.failures == 1
    assert watcher.poll() is None and watcher.failures == 1  # tried once per change, not every check
    assert watcher.refused  # (streamer_checkpoint_refused: a restart would fail on this file)
    ckpt.write_bytes(good.read_bytes())  # (the same size and mtime would do: see above)
    found = watcher.poll()
    assert found is not None and found[1]["training"]["name"] == "second"
    assert not watcher.refused
    caplog.set_level(logging.WARNING, logger="streamer.app")
    ckpt.unlink()
    assert watcher.poll() is None
    assert "is gone" in caplog.text and watcher.refused


def test_checkpoints_that_would_break_the_daemon_are_refused_at_load(tmp_path):
    """A NaN weight loaded fine and the next batch stopped the daemon (a garbage histogram bin),
    again after every restart; a config that cannot build a state bank stopped it at the swap."""
    path = tmp_path / "nan.pt"
    model = StreamGRU(ModelConfig())
    with torch.no_grad():
        model.head.bias[0] = float("nan")
    save_checkpoint(path, model, {"name": "nan"})
    with pytest.raises(ValueError, match=r"not all finite.*head\.bias"):
        load_checkpoint(path)
    payload = torch.load(DEFAULT_WEIGHTS, weights_only=True)
    for key, value in (("max_features", -1), ("hidden", 2.5), ("norm_alpha", float("inf"))):
        torch.save({**payload, "config": {**payload["config"], key: value}}, path)
        with pytest.raises(ValueError, match=key):
            load_checkpoint(path)


def test_a_file_that_is_not_a_whole_checkpoint_is_refused_saying_so(tmp_path):
    """torch's message for a file its safe loader refuses suggests loading it with
    weights_only=False (which would run the file's code), and a file cut short said only
    "negative seek value": both were the last line a refused start-up printed."""
    whole = DEFAULT_WEIGHTS.read_bytes()
    for name, data, says in (
        ("text.pt", b"not a checkpoint", "not a streamer-gru checkpoint"),
        ("half.pt", whole[: len(whole) // 2], "not a complete checkpoint"),
    ):
        path = tmp_path / name
        path.write_bytes(data)
        for loaded in (None, data):  # (the daemon passes the bytes it read; a path alone is read here)
            with pytest.raises(ValueError, match=says) as err:
                load_checkpoint(path, data=loaded)
            assert "weights_only" not in str(err.value)


def test_a_swap_that_fails_keeps_the_current_model_and_states(broker, topics, state_dir, monkeypatch):
    runner = DaemonThread(make_config(broker, topics, state_dir)).runner
    try:
        detector = runner.detector
        old_model, old_bank = detector.model, detector.bank

        class Watcher:
            failures = 0
            refused = False

            def poll(self):
                return StreamGRU(ModelConfig(hidden=8)), {"model_version": "new", "config": {}, "checkpoint": "x"}

        def no_memory(*args, **kwargs):
            raise RuntimeError("out of memory (injected)")

        runner.watcher = Watcher()
        monkeypatch.setattr("models.detector.StateBank", no_memory)
        runner._last_reload_check = float("-inf")
        runner._maybe_reload()
        assert detector.model is old_model and detector.bank is old_bank
        assert runner.metrics.model_reloads.labels("failed")._value.get() == 1
        # The file is not the model served until another one is: the next checks, which see no
        # change, keep saying so (the gauge went back to 0 one check later).
        Watcher.poll = lambda self: None  # type: ignore[assignment,method-assign]
        for _ in range(2):
            runner._last_reload_check = float("-inf")
            runner._maybe_reload()
        assert runner.metrics.checkpoint_refused._value.get() == 1
    finally:
        runner.transport.close()


def test_a_stream_quiet_since_a_reset_is_scored_after_a_restart(broker, topics, state_dir, tmp_path):
    """A reset clears every stream's feature list; a stream with no event since was snapshotted
    with an empty list, restored with it, and every later event dead-lettered (then as
    schema_mismatch)."""
    ckpt = tmp_path / "model.pt"
    shutil.copy(DEFAULT_WEIGHTS, ckpt)
    config = make_config(broker, topics, state_dir, detector={"checkpoint": str(ckpt), "reload_check_s": 0.2})

    def events(stream, start, n):
        return [(stream.encode(), event(stream, start + i, {"t": float(i % 5), "p": float(i % 3)})) for i in range(n)]

    with DaemonThread(config) as daemon:
        produce(broker, topics["input"], events("active", 0, 10) + events("quiet", 0, 10))
        daemon.wait_scored(20)
        _replace(ckpt, StreamGRU(ModelConfig(hidden=16)), "small")
        _wait_version(daemon, "small")
        produce(broker, topics["input"], events("active", 10, 10))
        daemon.wait_scored(30)
    with DaemonThread(config) as daemon:
        produce(broker, topics["input"], events("quiet", 10, 10))
        daemon.wait_scored(10)
        assert sum(daemon.metrics.dead_letters.labels(r)._value.get() for r in REASONS) == 0


_SAVE_RACE = """
import sys, torch
from models.gru import ModelConfig, StreamGRU, save_checkpoint
torch.manual_seed(int(sys.argv[2]))
model = StreamGRU(ModelConfig())
for i in range(40):
    save_checkpoint(sys.argv[1], model, {"name": sys.argv[2]})
"""


def test_two_trainings_writing_one_checkpoint_do_not_trip_over_each_other(tmp_path):
    """Both wrote `<out>.tmp` and renamed it: one failed (FileNotFoundError) or renamed the
    other's file."""
    out = tmp_path / "model.pt"
    procs = [subprocess.Popen([sys.executable, "-c", _SAVE_RACE, str(out), str(seed)], stderr=subprocess.PIPE) for seed in (1, 2)]
    errors = [p.communicate(timeout=120)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    _, meta = load_checkpoint(out)
    assert meta["training"]["name"] in ("1", "2")
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_a_written_checkpoint_keeps_the_permissions_its_owner_chose(tmp_path):
    """The unique temp file (mkstemp: 0600) was chmod-ed to 0644 whatever the umask, so a
    private checkpoint became world-readable; a replaced file keeps its own mode."""
    old = os.umask(0o077)
    try:
        _saved(tmp_path / "private.pt", 1, "private")
    finally:
        os.umask(old)
    assert (tmp_path / "private.pt").stat().st_mode & 0o777 == 0o600
    shared = tmp_path / "shared.pt"
    _saved(shared, 1, "shared")
    shared.chmod(0o640)
    _saved(shared, 2, "shared")
    assert shared.stat().st_mode & 0o777 == 0o640


def test_temp_files_left_by_a_killed_writer_are_cleaned_up_by_the_next_write(tmp_path):
    """A writer killed mid-write (SIGKILL, OOM) leaves its unique temp file behind, and nothing
    removed it: a daemon in a crash loop filled its state volume with snapshot copies. An old one
    goes at the next write; a young one may be another writer's, still writing, and stays."""
    out = tmp_path / "model.pt"
    stale, young, other = (tmp_path / ".model.pt.abc123.tmp", tmp_path / ".model.pt.def456.tmp", tmp_path / ".other.pt.abc123.tmp")
    for f in (stale, young, other):
        f.write_bytes(b"half a checkpoint")
    hours_ago = time.time() - 2 * 3600
    os.utime(stale, (hours_ago, hours_ago))
    os.utime(other, (hours_ago, hours_ago))
    _saved(out, 1, "after the crash")
    assert not stale.exists()
    assert young.exists()
    assert other.exists()  # (another file's temp: its own writer cleans it)


def test_a_disk_that_fills_up_mid_write_is_an_oserror_and_leaves_the_old_file(tmp_path, monkeypatch):
    """torch.save reported a write that failed part way (ENOSPC once the free space was smaller
    than one snapshot) as a RuntimeError; the daemon handled OSError only, so it died at its
    first periodic snapshot and again after every restart."""
    import errno
    import io

    import models.gru as gru

    out = tmp_path / "state.pt"
    gru.save_atomically({"x": torch.zeros(10)}, out)
    before = out.read_bytes()
    real_fdopen = os.fdopen

    class Full(io.FileIO):
        def write(self, b):  # (room for 100 bytes, as on a disk with that much left)
            if self.tell() + len(b) > 100:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(b)

    monkeypatch.setattr(gru.os, "fdopen", lambda fd, mode="r", *a, **k: Full(fd, "wb") if "w" in mode else real_fdopen(fd, mode, *a, **k))
    with pytest.raises(OSError) as info:
        gru.save_atomically({"x": torch.zeros(100_000)}, out)
    assert info.value.errno == errno.ENOSPC
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]
