"""The real `streamer run` process: SIGTERM mid-stream, restart, nothing lost, state carried over."""

from __future__ import annotations

import logging
import math
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import orjson
import pytest
import torch
import yaml
from conftest import DaemonThread, config_data, event, make_config, produce, read_all, scores_of
from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata

from models.calibration import TAIL_THRESHOLD, CalibrationConfig
from models.detector import CAL_HISTS, CAL_HISTS_LONG, Detector
from models.gru import DEFAULT_WEIGHTS, load_checkpoint
from models.recurrence import RECUR_FIELDS
from models.repeats import REPEAT_FIELDS
from streamer.config import Config
from streamer.state import SNAPSHOT_VERSION, Snapshot, SnapshotStore
from streamer.transport import SendError

N_STREAMS = 200
STEPS = 60  # events per stream, half before the first stop, half after


def _events(start: int, stop: int) -> list[tuple[bytes, bytes]]:
    out = []
    for t in range(start, stop):
        for s in range(N_STREAMS):
            value = 10.0 * math.sin(t / 7.0 + s) + (s % 13) + 0.1 * ((t * 31 + s * 17) % 11)
            out.append((f"dev-{s}".encode(), event(f"dev-{s}", 1_700_000_000_000 + t * 1000, {"a": value, "b": -value / 3})))
    return out


def _start(config_path: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "streamer.cli", "run", "--config", str(config_path)],
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
    )


def _wait_for_scores(broker, topic: str, n: int, proc: subprocess.Popen[bytes], timeout_s: float = 120.0) -> None:
    """Count score records by reading them (ListOffsets under-reports the log end on Tansu)."""
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=None, enable_auto_commit=False, auto_offset_reset="earliest")
    c.assign([TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or ())])
    seen = 0
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            assert proc.poll() is None, "daemon exited early"
            seen += sum(len(v) for v in c.poll(timeout_ms=200).values())
            if seen >= n:
                return
    finally:
        c.close()
    raise AssertionError(f"{seen} of {n} scores after {timeout_s}s")


def _stop(proc: subprocess.Popen[bytes]) -> float:
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=30)
    assert rc == 0, f"exit code {rc} after SIGTERM"
    return time.monotonic() - t0


def test_sigterm_midstream_then_restart_loses_nothing(broker, topics, tmp_path):
    config = {
        "kafka": {"bootstrap_servers": broker.bootstrap},
        "consumer": {"group_id": f"g-{topics['input']}", "session_timeout_ms": 3000, "heartbeat_interval_ms": 500, "max_poll_records": 300},
        "topics": {"inputs": [topics["input"]], "scores": topics["scores"], "alerts": topics["alerts"], "dead_letter": topics["dead"]},
        "state": {"dir": str(tmp_path / "state")},
        "metrics": {"enabled": False},
        "detector": {"warmup": 10},
        "log_level": "INFO",
    }
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    log = tmp_path / "daemon.log"
    first, second = _events(0, STEPS // 2), _events(STEPS // 2, STEPS)
    produce(broker, topics["input"], first)

    proc = _start(cfg_path, log)
    _wait_for_scores(broker, topics["scores"], len(first) // 3, proc)
    took = _stop(proc)  # mid-stream: a third or so of the backlog is scored
    assert took < 15, f"SIGTERM took {took:.1f}s to drain and exit"
    produce(broker, topics["input"], second)

    proc = _start(cfg_path, log)
    total = len(first) + len(second)
    _wait_for_scores(broker, topics["scores"], total, proc)
    time.sleep(1.0)  # let any straggling duplicates land before counting
    _stop(proc)

    records = scores_of(read_all(broker, topics["scores"], expect=total))
    seen = Counter((r["partition"], r["offset"]) for r in records)
    inputs = read_all(broker, topics["input"], expect=total)
    assert len(inputs) == total
    expected = {(r.partition, r.offset) for r in inputs}
    assert set(seen) == expected, f"{len(expected - set(seen))} input offsets have no score; see {log}"
    duplicates = sum(n - 1 for n in seen.values())
    print(f"{total} events, {duplicates} duplicate scores after restart")

    # The restart restored each stream's state (snapshot + replay), so every score equals the
    # one an uninterrupted offline replay gives.
    model, _ = load_checkpoint(DEFAULT_WEIGHTS)
    offline = Detector(model, CalibrationConfig(warmup=10, threshold=TAIL_THRESHOLD))
    latest = {(r["partition"], r["offset"]): r for r in records}
    by_stream: dict[str, list] = {}
    for key in sorted(latest):
        by_stream.setdefault(latest[key]["stream"], []).append(latest[key])
    events = first + second
    values = {}
    for key, payload in events:
        values.setdefault(key.decode(), []).append(payload)
    assert all(len(recs) == STEPS for recs in by_stream.values())
    # Replaying one event at a time is slow in Python; a fixed sample of 40 streams, all steps.
    for slot, (stream, recs) in enumerate(sorted(by_stream.items())[::5]):
        for step, payload in enumerate(values[stream]):
            v = orjson.loads(payload)["values"]
            x = np.zeros((1, offline.max_features))
            mask = np.zeros((1, offline.max_features), dtype=bool)
            x[0, :2] = [v["a"], v["b"]]
            mask[0, :2] = True
            res = offline.process(np.array([slot]), x, mask, np.array([recs[step]["ts"]]))
            assert abs(recs[step]["surprise"] - res.surprise[0]) < 1e-4, (stream, step)


def test_a_snapshot_of_another_state_layout_is_ignored_not_fatal(tmp_path):
    """After an upgrade that changes the per-stream state, old snapshots mean a cold start."""
    store = SnapshotStore(tmp_path, "g")
    arch = {"hidden": 32}
    snap = Snapshot(7, ["pump-1"], [["a", "b"]], {"steps": torch.zeros(1, dtype=torch.int64)}, arch, None)
    store.save(("sensors", 0), snap)
    loaded = store.load(("sensors", 0), arch)
    assert loaded is not None and loaded.offset == 7
    payload = store.load_payload(("sensors", 0))
    assert payload is not None
    payload["version"] = 3  # (layouts 4 and 5 are upgraded: see the next test)
    del payload["state"]["steps"]
    store.save_payload(("sensors", 0), payload)
    assert store.load(("sensors", 0), arch) is None


@pytest.mark.parametrize("layout", [4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18])
def test_a_snapshot_of_an_older_layout_is_upgraded_keeping_every_stream(tmp_path, layout):
    """Layout 5 added the correlation view, layout 6 a long-memory histogram per view, layout 7
    the alert hold-off, layout 8 the memory of recurring events, layout 9 the hour of the last
    event (for the profile's revisits), which layout 10 replaced by each feature's first hour,
    layout 11 the latest event time and usual interval (for gaps), layout 12 the count of recent
    alerts (for the calibration's learning), layout 13 each feature's own error history, layout 14
    the count of recent runs of flags (in place of the alerts) and the last event's flag, layout
    15 each feature's last reading, run and counts of repeats, layout 16 the bin of the last
    run's first flag in each short history, layout 17 the features and stamp of the previous event
    (for duplicates), layout 18 whether a constant stream has woken up, layout 19 the events left
    of the last flagged episode's tail. An older snapshot restores every
    stream's state as it was; the correlation view starts empty, as on a new stream (it applies
    after CORR_MIN events), each long-memory histogram starts as a copy of its view's short one
    (empty, it would rank every event as ordinary), the hold-off starts off and the recurrence
    memory empty, the first hours long ago, the gap fields empty, the per-feature histories
    empty, the recent runs of flags counted by layouts 12 and 13's alerts (none before), the
    last event not flagged, the repeat fields empty, the bins of the last run's first flag 0
    (none), the previous event's features and stamp none, no restart and no episode's tail."""
    assert SNAPSHOT_VERSION == 19
    model, _ = load_checkpoint(DEFAULT_WEIGHTS)
    rng = np.random.default_rng(0)
    det = Detector(model, CalibrationConfig(warmup=10))
    n = 300
    x = np.zeros((n, det.max_features))
    mask = np.zeros_like(x, dtype=bool)
    x[:, :2], mask[:, :2] = rng.normal(size=(n, 2)), True
    det.process(np.zeros(n, dtype=np.int64), x, mask)
    state = det.bank.export_rows(torch.tensor([0]))
    added = (
        {"cal_settle"}
        | ({"cal_wake"} if layout <= 17 else set())
        | ({"last_mask", "last_stamp"} if layout <= 16 else set())
        | ({"cal_onset_bin", "cal_feat_onset_bin"} if layout <= 15 else set())
        | (set(REPEAT_FIELDS) if layout <= 14 else set())
        | ({"cal_onsets", "flag_prev"} if layout <= 13 else set())
        | ({"cal_feat"} if layout <= 12 else set())
        | ({"gap_last_ts", "gap_log", "gap_n"} if layout <= 10 else set())
    )
    added |= ({"prof_start"} if layout <= 9 else set()) | (set(RECUR_FIELDS) if layout <= 7 else set())
    added |= {"hold_left", "hold_score"} if layout <= 6 else set()
    added |= set(CAL_HISTS_LONG) if layout <= 5 else set()
    added |= {"corr_cov", "corr_n", "cal_hist_corr"} if layout == 4 else set()
    old = {k: v for k, v in state.items() if k not in added}
    if layout == 9:
        old["prof_last"] = torch.ones(1, dtype=torch.int8)  # (dropped on the way in)
    if 12 <= layout <= 13:
        old["cal_alerts"] = torch.tensor([2.5], dtype=torch.float64)  # (read as the runs' count)
    store = SnapshotStore(tmp_path, "g")
    arch = {"hidden": 32}
    store.save(("sensors", 0), Snapshot(7, ["pump-1"], [["a", "b"]], old, arch, None))
    payload = store.load_payload(("sensors", 0))
    assert payload is not None
    payload["version"] = layout
    store.save_payload(("sensors", 0), payload)
    loaded = store.load(("sensors", 0), arch)
    assert loaded is not None and loaded.offset == 7
    restored = Detector(model, CalibrationConfig(warmup=10))
    restored.bank.import_rows(torch.tensor([0]), loaded.state)
    got = restored.bank.export_rows(torch.tensor([0]))
    assert "prof_last" not in got and "cal_alerts" not in got
    for name, t in got.items():
        if name == "cal_onsets" and 12 <= layout <= 13:
            assert float(t[0]) == 2.5
        elif name in old:
            assert torch.equal(t, old[name]), name
        elif name in CAL_HISTS_LONG:
            short = CAL_HISTS[CAL_HISTS_LONG.index(name)]
            assert torch.equal(t, got[short]), name
            assert name == "cal_long_corr" or float(t.sum()) > 100, name  # a real history, not an empty one
        else:
            assert float(t.double().abs().max()) == 0.0, name
    assert float(restored.bank.tensors["norm_n"][0, 0]) == n


def test_an_older_snapshot_missing_a_field_of_its_layout_is_ignored_not_fatal(tmp_path):
    """A layout-5 snapshot without the fifth histogram was not written by this code: the upgrade
    cannot copy it into the long history, so its streams start cold instead of the load raising."""
    model, _ = load_checkpoint(DEFAULT_WEIGHTS)
    det = Detector(model, CalibrationConfig(warmup=10))
    state = det.bank.export_rows(torch.tensor([0]))
    old = {k: v for k, v in state.items() if k not in CAL_HISTS_LONG and k != "cal_hist_corr"}
    store = SnapshotStore(tmp_path, "g")
    arch = {"hidden": 32}
    store.save(("sensors", 0), Snapshot(7, ["pump-1"], [["a", "b"]], old, arch, None))
    payload = store.load_payload(("sensors", 0))
    assert payload is not None
    payload["version"] = 5
    store.save_payload(("sensors", 0), payload)
    assert store.load(("sensors", 0), arch) is None
    payload["version"] = 4  # the same fields are a complete layout 4
    store.save_payload(("sensors", 0), payload)
    assert store.load(("sensors", 0), arch) is not None


def test_a_snapshot_with_fields_that_do_not_read_is_ignored_not_fatal(tmp_path):
    """Older layouts are upgraded field by field, and a field that was not a tensor (a list, a
    number) raised out of the load, stopping the assignment at every restart; nor do a stream
    listed twice, a boolean offset or a schema that is a string pass as this code's."""
    model, _ = load_checkpoint(DEFAULT_WEIGHTS)
    state = Detector(model, CalibrationConfig(warmup=10)).bank.export_rows(torch.tensor([0]))
    store, arch, tp = SnapshotStore(tmp_path, "g"), {"hidden": 32}, ("sensors", 0)
    store.save(tp, Snapshot(7, ["pump-1"], [["a"]], state, arch, None))
    good = store.load_payload(tp)
    assert good is not None
    # (With the fields each layout had besides: a layout 9 had prof_last, 12 and 13 cal_alerts.)
    had = {9: {"prof_last": state["steps"]}, 12: {"cal_alerts": state["cal_onsets"]}}
    for version, name, value in [(12, "norm_n", [1.0]), (5, "cal_hist", 3), (9, "prof_seen", "x"), (15, "h", [0.0])]:
        payload = dict(good, version=version, state=dict(good["state"], **had.get(version, {}), **{name: value}))
        store.save_payload(tp, payload)
        assert store.load(tp, arch) is None, (version, name)
    for change in [{"offset": True}, {"streams": ["a", "a"], "schemas": [["x"], ["x"]]}, {"schemas": ["ab"]}]:
        store.save_payload(tp, dict(good, **change))
        assert store.load(tp, arch) is None, change
    store.save_payload(tp, good)
    assert store.load(tp, arch) is not None


def test_snapshots_this_code_did_not_write_mean_a_cold_start_not_a_crash(broker, topics, tmp_path, caplog):
    """Current-layout snapshots that do not fit the bank (a field missing, rows that do not match
    their stream list, no schemas) are discarded at assignment with a warning naming the
    partition; the daemon keeps running and scores every event from a cold start."""
    import logging

    from conftest import DaemonThread, make_config

    config = make_config(broker, topics, tmp_path / "state")
    model, meta = load_checkpoint(DEFAULT_WEIGHTS)
    arch = dict(meta["config"])
    good = Detector(model).bank.export_rows(torch.tensor([0, 1]))
    store = SnapshotStore(tmp_path / "state", config.consumer.group_id)
    streams = ["dev-0", "dev-1"]
    missing = {k: v for k, v in good.items() if k != "cal_long_corr"}
    one_row = {k: v[:1] for k, v in good.items()}
    store.save((topics["input"], 0), Snapshot(0, streams, [["a", "b"]] * 2, missing, arch, None))
    store.save((topics["input"], 1), Snapshot(0, streams, [["a", "b"]] * 2, one_row, arch, None))
    store.save((topics["input"], 2), Snapshot(0, streams, [["a", "b"]] * 2, good, arch, None))
    payload = store.load_payload((topics["input"], 2))
    assert payload is not None
    del payload["schemas"]
    store.save_payload((topics["input"], 2), payload)
    records = _events(0, 5)
    produce(broker, topics["input"], records)
    with caplog.at_level(logging.WARNING), DaemonThread(config) as daemon:
        daemon.wait_scored(len(records))
    warned = caplog.text
    assert "state field cal_long_corr is missing" in warned
    assert "does not match (2," in warned
    assert "no offset, streams or schemas" in warned
    assert len(scores_of(read_all(broker, topics["scores"], expect=len(records)))) == len(records)


def test_a_stop_with_outputs_unacknowledged_leaves_their_events_to_the_restart(broker, topics, state_dir):
    """Stopping while the broker does not acknowledge a batch's outputs (an outage): the state has
    stepped past those events, so no snapshot may record their offsets. The shutdown snapshot
    did, and the restart sought past events that were never scored. The outage is injected at
    the transport's send (a stopped memory-only broker would lose the log the restart reads)."""
    records = [(b"s-1", event("s-1", 1_000 * i, {"temp": 20.0 + i % 5})) for i in range(60)]
    produce(broker, topics["input"], records)
    config = make_config(broker, topics, state_dir)
    down = DaemonThread(config)

    def refuse(outputs: object) -> None:
        raise SendError("not acknowledged (injected)")

    down.runner.transport.send_batch = refuse  # type: ignore[method-assign]
    with down:
        deadline = time.monotonic() + 30
        while down.metrics.send_failures._value.get() < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert down.metrics.send_failures._value.get() >= 1
    with DaemonThread(config) as daemon:
        daemon.wait_scored(60)
    assert sorted(r["offset"] for r in scores_of(read_all(broker, topics["scores"], expect=60))) == list(range(60))


def test_an_assignment_taken_back_within_the_same_poll_is_not_restored(broker, topics, state_dir):
    """kafka-python can run several rebalances inside one poll(): assigned [0, 1], revoked
    [0, 1], assigned [0]. Restoring partition 1 after it was taken back made the seek raise
    (`Unassigned partition`) and stopped the daemon."""
    runner = DaemonThread(make_config(broker, topics, state_dir)).runner
    try:
        t = topics["input"]
        runner._on_assign([(t, 0), (t, 1)])
        runner._on_revoke([(t, 0), (t, 1)])
        runner._on_assign([(t, 0)])
        assert runner._pending_assign == [(t, 0)]
    finally:
        runner.transport.close()


_RACE = """
import sys, torch
from streamer.state import Snapshot, SnapshotStore
store = SnapshotStore(sys.argv[1], "g")
state = {"x": torch.zeros(40, 500)}
for i in range(150):
    store.save(("in", 0), Snapshot(i, [f"s{k}" for k in range(40)], [["a"]] * 40, state, {"h": 1}, None))
"""


def test_two_writers_of_one_partitions_snapshot_do_not_trip_over_each_other(tmp_path):
    """Two members sharing a state dir (a zombie's revoke snapshot landing on the new owner's
    periodic one) wrote through the same temp file, and about a third of the saves raised
    FileNotFoundError at the rename, which would have stopped the loop."""
    procs = [subprocess.Popen([sys.executable, "-c", _RACE, str(tmp_path)], stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    assert SnapshotStore(tmp_path, "g").load_payload(("in", 0)) is not None
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_snapshot_that_cannot_be_written_is_counted_not_fatal(broker, topics, state_dir):
    """A full disk or a permissions problem under state.dir: the loop logs it, counts it and
    keeps scoring (the previous snapshot stands). Here the snapshot's path is a directory."""
    config = make_config(broker, topics, state_dir, state={"snapshot_interval_s": 0.2})
    blocked = state_dir / config.consumer.group_id / f"{topics['input']}-0.pt"
    (blocked / "occupied").mkdir(parents=True)
    produce(broker, topics["input"], [(b"s-1", event("s-1", i, {"temp": float(i % 5)})) for i in range(50)], partition_of=lambda _key: 0)
    with DaemonThread(config) as daemon:
        daemon.wait_scored(50)
        deadline = time.monotonic() + 30
        while daemon.metrics.snapshot_failures._value.get() < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        produce(broker, topics["input"], [(b"s-1", event("s-1", 50 + i, {"temp": 1.0})) for i in range(10)], partition_of=lambda _key: 0)
        daemon.wait_scored(60)
    assert daemon.metrics.snapshot_failures._value.get() >= 1


def _commit(broker, config, topic: str, offset: int) -> None:
    """Commit partition 0 of `topic` at `offset` for the config's group, as another member would."""
    c = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=config.consumer.group_id, enable_auto_commit=False)
    c.commit({TopicPartition(topic, 0): OffsetAndMetadata(offset, "", -1)})
    c.close()


def _produce_s1(broker, topic: str, start: int, stop: int) -> None:
    """Events start..stop-1 of one stream, s-1, a second apart, to partition 0."""
    produce(broker, topic, [(b"s-1", event("s-1", 1_000 * i, {"temp": 20.0 + i % 5})) for i in range(start, stop)], lambda k: 0)


def _unanswered_at_assignment(daemon: DaemonThread, left_out: Callable[[tuple[str, int]], bool]) -> None:
    """The group coordinator leaves the partitions `left_out` picks out of its first answer (the
    assignment's); later asks are answered in full."""
    real, calls = daemon.runner.transport.committed, []

    def first_partly(tps: list, timeout_ms: int = 10_000) -> dict:
        calls.append(list(tps))
        got = real(tps, timeout_ms)
        return {tp: v for tp, v in got.items() if not left_out(tp)} if len(calls) == 1 else got

    daemon.runner.transport.committed = first_partly  # type: ignore[method-assign]


def _snapshot_ahead_of_failed_commits(broker, topics, state_dir, silent: bool = False) -> Config:
    """s-1 scored to 100 and committed, then to 300 by a member whose commits all fail (sends
    succeed): its snapshot is at 300, the group's committed offset at 100. `silent`: that member
    got no committed offset at its assignment either."""
    t = topics["input"]
    _produce_s1(broker, t, 0, 100)
    config = make_config(broker, topics, state_dir, consumer={"max_poll_records": 50})
    with DaemonThread(config) as first:
        first.wait_scored(100)
    _produce_s1(broker, t, 100, 300)
    cut_off = DaemonThread(config)
    cut_off.runner.transport.commit = lambda offsets, timeout_ms=None: False  # type: ignore[method-assign]
    if silent:  # (no answer at the assignment; answers again by the time records arrive)
        _unanswered_at_assignment(cut_off, lambda tp: True)
    with cut_off:
        cut_off.wait_scored(200)
    return config


def test_not_ready_until_the_replay_up_to_the_committed_offset_is_done(broker, topics, state_dir):
    """After a crash the snapshot can be older than the committed offset: the events between are
    scored again, without outputs, to rebuild state. /readyz said ready before that replay had
    finished, so a rolling update could move on while the new member still lagged."""
    t = topics["input"]
    _produce_s1(broker, t, 0, 40)
    config = make_config(broker, topics, state_dir, consumer={"max_poll_records": 20})
    with DaemonThread(config) as first:
        first.wait_scored(40)
    # More events, scored and committed by a member whose state never reached the disk (a crash
    # before its next snapshot): the snapshot stays at offset 40, the commit moves to 400.
    _produce_s1(broker, t, 40, 400)
    _commit(broker, config, t, 400)

    runner = DaemonThread(config).runner
    runner.start()
    seen: list[tuple[int, bool]] = []
    try:
        deadline = time.monotonic() + 60
        while runner.next_offset.get((t, 0), 0) < 400 or not seen or not seen[-1][1]:
            assert time.monotonic() < deadline, seen[-5:]
            runner.step()
            if runner.health.joined:
                seen.append((runner.next_offset.get((t, 0), 0), runner.health.readiness()[0]))
                # The replay's own batches must not move the committed offset back: a crash
                # mid-replay would then emit their events a second time.
                assert runner.transport.committed([(t, 0)]) == {(t, 0): 400}
    finally:
        runner.shutdown()
    assert any(not ready for _, ready in seen), seen  # the replay took several polls, not ready during them
    assert all(ready == (offset >= 400) for offset, ready in seen), seen


@pytest.mark.parametrize("limit", [300, 400])
def test_a_snapshot_too_far_behind_the_committed_offset_is_not_replayed(broker, topics, state_dir, caplog, limit):
    """A partition coming back to a member that owned it long ago found that member's old
    snapshot and replayed everything since, unready all along (weeks of a busy partition, after
    a scale-down and up). Beyond state.max_replay_records its streams start cold instead."""
    t = topics["input"]
    _produce_s1(broker, t, 0, 40)
    config = make_config(broker, topics, state_dir, state={"max_replay_records": limit})
    with DaemonThread(config) as first:
        first.wait_scored(40)
    # Scored and committed elsewhere since: the snapshot here stays at offset 40, 360 behind.
    _produce_s1(broker, t, 40, 400)
    _commit(broker, config, t, 400)
    _produce_s1(broker, t, 400, 420)
    with DaemonThread(config) as daemon:
        daemon.wait_scored(20)
        replayed = daemon.metrics.replayed._value.get()
        row = daemon.runner.slots.slot_of["s-1"]
        seen = int(daemon.runner.detector.bank.tensors["steps"][row])  # events the stream has seen
    discarded = [r.getMessage() for r in caplog.records if "max_replay_records" in r.getMessage()]
    if limit < 360:
        assert replayed == 0 and seen == 20, (replayed, seen)  # cold: only the 20 new events
        assert discarded and "360 records behind the committed offset 400" in discarded[0], discarded
    else:
        assert replayed == 360 and seen == 420, (replayed, seen)
        assert not discarded


@pytest.mark.parametrize("reset_to", [0, 250])
def test_an_offset_reset_is_honoured_not_skipped_by_the_snapshot(broker, topics, state_dir, caplog, reset_to):
    """`kafka-consumer-groups --reset-offsets --to-earliest`, to score a range again: the member
    restored its snapshot and sought to the snapshot's offset, far past the reset one, so nothing
    was scored again. Then a reset of up to two batches (10,000 records by default) still was
    skipped, silently (review: 300 back with batches of 500). A snapshot now records the
    committed offset it was written against; ahead of a committed offset that is not that one,
    it is not restored, and consumption starts where the operator put it."""
    t = topics["input"]
    _produce_s1(broker, t, 0, 300)
    config = make_config(broker, topics, state_dir, consumer={"max_poll_records": 50})
    with DaemonThread(config) as first:
        first.wait_scored(300)
    _commit(broker, config, t, reset_to)  # the reset (the group is empty, as the tool requires)
    again = 300 - reset_to
    with DaemonThread(config) as daemon:
        daemon.wait_scored(again)
        assert daemon.metrics.replayed._value.get() == 0
    assert len(scores_of(read_all(broker, topics["scores"], expect=300 + again))) == 300 + again
    assert f"{again} past the committed offset {reset_to}, which was moved back (an offset reset: it was 300" in caplog.text


@pytest.mark.parametrize(("moved_on_to", "silent"), [(None, False), (250, False), (None, True)])
def test_a_snapshot_ahead_of_commits_that_failed_is_restored_not_taken_for_a_reset(broker, topics, state_dir, caplog, moved_on_to, silent):
    """Commits failing while sends succeed (the group coordinator out of reach, the partition
    leaders not): the snapshots moved on, the committed offset did not, and at the restart a
    snapshot more than two batches ahead was taken for an offset reset: its streams started
    cold and every event since the last commit was emitted again (review: 1,080, scores up to
    0.43 apart). The committed offset is the one the snapshot was written against, or one
    another member moved forward since (250): the snapshot is this member's own, restored, its
    offset committed at once (a quiet partition showed lag that was not there, and a member
    without the snapshot would emit it all again), and nothing emitted twice here. `silent`: the
    coordinator did not give the committed offset at the assignment either, and the snapshots
    recorded none, which read as an older build's (review: 200 emitted twice); it is asked again
    when the first records arrive."""
    t = topics["input"]
    config = _snapshot_ahead_of_failed_commits(broker, topics, state_dir, silent)
    c = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=config.consumer.group_id, enable_auto_commit=False)
    assert c.committed(TopicPartition(t, 0)) == 100
    if moved_on_to is not None:
        _commit(broker, config, t, moved_on_to)
    with DaemonThread(config) as quiet:  # (no new events: the restore alone must commit)
        deadline = time.monotonic() + 30
        while c.committed(TopicPartition(t, 0)) != 300:
            assert time.monotonic() < deadline, c.committed(TopicPartition(t, 0))
            time.sleep(0.2)
        row = quiet.runner.slots.slot_of["s-1"]
        # The state carried over (silent: the cut-off member could not restore the first one's
        # snapshot without the committed offset, and started cold at 100)
        carried = 200 if silent else 300
        assert int(quiet.runner.detector.bank.tensors["steps"][row]) == carried
    c.close()
    _produce_s1(broker, t, 300, 310)
    with DaemonThread(config) as daemon:
        daemon.wait_scored(10)
        row = daemon.runner.slots.slot_of["s-1"]
        assert int(daemon.runner.detector.bank.tensors["steps"][row]) == carried + 10
    offsets = [r["offset"] for r in scores_of(read_all(broker, topics["scores"], expect=310))]
    assert sorted(offsets) == list(range(310)), Counter(offsets).most_common(3)
    assert "moved back" not in caplog.text


def test_the_partitions_a_slow_coordinator_answered_for_at_an_assignment_are_restored(broker, topics, state_dir, caplog):
    """At an assignment the committed offsets are asked partition by partition against one
    deadline: a coordinator that answered for some and not the rest in time lost all of its
    answers, and every partition started cold. Those it answered for are restored now; the
    others start cold and are asked again when their records arrive."""
    t = topics["input"]
    for p in (0, 1):
        produce(broker, t, [(f"s-{p}".encode(), event(f"s-{p}", 1_000 * i, {"temp": 20.0 + i % 5})) for i in range(60)], lambda k, p=p: p)
    config = make_config(broker, topics, state_dir)
    with DaemonThread(config) as first:
        first.wait_scored(120)
    daemon = DaemonThread(config)
    _unanswered_at_assignment(daemon, lambda tp: tp[1] == 1)
    with caplog.at_level(logging.INFO, logger="streamer"), daemon:
        deadline = time.monotonic() + 30
        while not daemon.runner.ready.is_set():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        steps = daemon.runner.detector.bank.tensors["steps"]
        assert int(steps[daemon.runner.slots.slot_of["s-0"]]) == 60
        assert "s-1" not in daemon.runner.slots.slot_of  # (its snapshot not restored: cold)
    assert "did not answer for the committed offsets of 1 of" in caplog.text
    assert f"restored 1 streams of {t}[0]" in caplog.text and f"restored 1 streams of {t}[1]" not in caplog.text


def test_where_the_logs_begin_is_asked_within_the_committed_offsets_deadline(broker, topics, state_dir, monkeypatch):
    """One deadline covers an assignment: a coordinator that answered for one partition and then
    hung used up the committed offsets' limit, and the question where the answered partitions'
    logs begin then waited 5 s more of its own (15 s in a CI run, against the 10 s promised).
    It is now asked within what is left (at most 5 s), and not at all when nothing is."""
    monkeypatch.setattr("streamer.ownership.COMMITTED_TIMEOUT_MS", 1_000)
    t = topics["input"]
    produce(broker, t, [(b"s-0", event("s-0", 1_000 * i, {"temp": 20.0 + i % 5})) for i in range(60)], lambda k: 0)
    config = make_config(broker, topics, state_dir)
    with DaemonThread(config) as first:
        first.wait_scored(60)
    daemon = DaemonThread(config)
    transport = daemon.runner.transport
    real_committed, real_starts, asked = transport.committed, transport.log_starts, []

    def hung_after_one(tps: list, timeout_ms: int = 10_000) -> dict:
        got = real_committed(tps, timeout_ms)
        time.sleep(1.0)  # (the rest of the deadline, waiting for the partitions it never answers)
        return {tp: v for tp, v in got.items() if tp[1] == 0}

    def starts(tps: list, timeout_ms: int) -> dict | None:
        asked.append(timeout_ms)
        return real_starts(tps, timeout_ms)

    transport.committed = hung_after_one  # type: ignore[method-assign]
    transport.log_starts = starts  # type: ignore[method-assign]
    with daemon:
        deadline = time.monotonic() + 30
        while not daemon.runner.ready.is_set():
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert all(ms <= 1_000 for ms in asked), asked  # (nothing left here: not asked; was [5000])


def test_a_quiet_restored_partition_is_committed_though_another_went_unanswered(broker, topics, state_dir):
    """A snapshot ahead of its committed offset (commits failed) is committed at the assignment
    that restores it. A version that skipped that commit whenever another partition of the
    assignment went unanswered ("the batch commit does it") left a quiet partition's offset
    behind for good: the batch commit covers partitions with records only (a review)."""
    t = topics["input"]
    config = _snapshot_ahead_of_failed_commits(broker, topics, state_dir)
    quiet = DaemonThread(config)
    _unanswered_at_assignment(quiet, lambda tp: tp[1] == 3)  # (partition 3 never has records)
    c = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=config.consumer.group_id, enable_auto_commit=False)
    with quiet:
        deadline = time.monotonic() + 30
        while c.committed(TopicPartition(t, 0)) != 300:
            assert time.monotonic() < deadline, c.committed(TopicPartition(t, 0))
            time.sleep(0.2)
        assert quiet.runner.next_offset[(t, 0)] == 300  # (restored, not replayed)
    c.close()


def test_ready_when_the_log_ends_before_the_committed_offset(broker, topics, state_dir):
    """A committed offset past the log's end (a truncated or compacted tail): no record ever
    reaches it, and /readyz stayed 503 until new events went past it."""
    t = topics["input"]
    _produce_s1(broker, t, 0, 40)
    config = make_config(broker, topics, state_dir)
    with DaemonThread(config) as first:
        first.wait_scored(40)
    c = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=config.consumer.group_id, enable_auto_commit=False)
    c.commit({TopicPartition(t, 0): OffsetAndMetadata(45, "", -1)})
    c.close()
    runner = DaemonThread(config).runner
    runner.start()
    try:
        deadline = time.monotonic() + 30
        while not runner.health.readiness()[0]:
            assert time.monotonic() < deadline, runner.health.readiness()
            runner.step()
    finally:
        runner.shutdown()


def test_bad_records_re_read_in_a_replay_are_counted(broker, topics, state_dir):
    """consumed = scored + replayed + dead letters: bad records re-read in a replay (dead-lettered
    the first time, not again) were counted as consumed and nowhere else."""
    t = topics["input"]

    def mixed(start: int, stop: int) -> list[tuple[bytes, bytes]]:
        return [(b"s-1", b"{broken" if i % 10 == 9 else event("s-1", 1_000 * i, {"temp": 20.0 + i % 5})) for i in range(start, stop)]

    produce(broker, t, mixed(0, 40), lambda k: 0)
    config = make_config(broker, topics, state_dir)
    with DaemonThread(config) as first:
        first.wait_scored(36)
    produce(broker, t, mixed(40, 200), lambda k: 0)  # scored and committed by a member that crashed before its snapshot
    c = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=config.consumer.group_id, enable_auto_commit=False)
    c.commit({TopicPartition(t, 0): OffsetAndMetadata(200, "", -1)})
    c.close()
    produce(broker, t, mixed(200, 240), lambda k: 0)
    with DaemonThread(config) as daemon:
        daemon.wait_scored(36)
        m = daemon.metrics
        deadline = time.monotonic() + 30
        while m.consumed.labels(t)._value.get() < 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        dead = sum(m.dead_letters.labels(r)._value.get() for r in ("invalid_json",))
        assert (m.scored._value.get(), m.replayed._value.get(), dead) == (36, 160, 4)
        assert m.consumed.labels(t)._value.get() == m.scored._value.get() + m.replayed._value.get() + dead


def test_every_assigned_partition_has_a_lag_series(broker, topics, state_dir):
    """A partition with nothing polled yet had no streamer_consumer_lag_records series at all."""
    t = topics["input"]
    produce(broker, t, [(b"s-1", event("s-1", 1_000 * i, {"temp": 20.0})) for i in range(10)], lambda k: 0)
    with DaemonThread(make_config(broker, topics, state_dir)) as daemon:
        daemon.wait_scored(10)
        deadline = time.monotonic() + 10
        while True:
            lag = {s.labels["partition"]: s.value for s in daemon.metrics.consumer_lag.collect()[0].samples}
            if len(lag) == 4 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert lag == {"0": 0.0, "1": 0.0, "2": 0.0, "3": 0.0}


def test_idle_time_survives_a_restart_so_silent_streams_are_still_evicted(broker, topics, state_dir):
    """A restore marked every restored stream as just seen, and log streams were restored with
    no idle time at all: under restarts or rebalances more often than `state.idle_evict_s` (a
    rolling update, a member joining), a stream that had gone silent was never evicted, and every
    snapshot carried it on. Snapshots now keep each stream's idle time; the time the daemon was
    down does not count (nobody was reading the stream)."""
    logs_topic = topics["input"] + "-logs"
    broker.create_topics({logs_topic: 1})
    sys_line = "Jun 14 15:00:{:02d} web-1 sshd[1]: session opened for user u{}"
    produce(broker, topics["input"], [(b"pump", event("pump", i, {"t": float(i % 5)})) for i in range(30)], partition_of=lambda _k: 0)
    produce(broker, logs_topic, [(b"web-1", sys_line.format(i, i % 3).encode()) for i in range(30)])
    logs = {"topics": [logs_topic], "line_format": "syslog", "stream_field": "host"}
    config = make_config(broker, topics, state_dir, logs=logs, state={"idle_evict_s": 7200})
    clock = [1_000_000.0]

    def run(expect_scored: int, then: float) -> DaemonThread:
        daemon = DaemonThread(config)
        runner = daemon.runner
        runner.clock = lambda: clock[0]
        runner.start()
        deadline = time.monotonic() + 60
        while daemon.metrics.scored._value.get() < expect_scored or not runner.ready.is_set() or runner.health.replaying:
            assert time.monotonic() < deadline, daemon.metrics.scored._value.get()
            runner.step()
        clock[0] = then
        return daemon

    first = run(60, 1_005_000.0)  # both streams seen at 1,000,000; stopped 5,000 s later
    first.runner.shutdown()
    clock[0] = 2_000_000.0  # down for ~11 days: not idleness
    second = run(0, 2_000_000.0)
    runner = second.runner
    try:
        assert second.metrics.active_streams._value.get() == 2

        def evict_at(t: float) -> float:
            clock[0] = t
            runner._last_evict = -math.inf
            runner.step()
            return second.metrics.active_streams._value.get()

        assert evict_at(2_001_000.0) == 2  # idle 6,000 s of the daemon's time: kept
        assert evict_at(2_002_300.0) == 0  # idle 7,300 s: both evicted
    finally:
        runner.shutdown()


def test_a_stop_writes_each_partitions_snapshot_once(broker, topics, state_dir):
    """shutdown() snapshotted every partition, then closing the consumer revoked them all and the
    revoke snapshotted them again: twice the writes at every stop (hundreds of MB at 100,000
    streams) and twice the error lines when the disk is full."""
    produce(broker, topics["input"], [(f"s{i % 8}".encode(), event(f"s{i % 8}", i, {"t": float(i % 5)})) for i in range(80)])
    daemon = DaemonThread(make_config(broker, topics, state_dir))
    runner, m = daemon.runner, daemon.metrics
    runner.start()
    deadline = time.monotonic() + 60
    while m.scored._value.get() < 80:
        assert time.monotonic() < deadline
        runner.step()
    owned = len(runner.next_offset)
    before = m.snapshots._value.get()
    runner.shutdown()
    assert owned >= 2 and m.snapshots._value.get() - before == owned


def test_sighup_drains_like_sigterm_and_a_second_signal_exits_at_once(broker, topics, tmp_path):
    """SIGHUP (a closed terminal) killed the daemon without a drain or a snapshot; a second
    SIGTERM was ignored, so a stop waiting out a broker outage could not be hurried."""
    config = {
        "kafka": {"bootstrap_servers": broker.bootstrap},
        "consumer": {"group_id": f"g-{topics['input']}", "session_timeout_ms": 3000, "heartbeat_interval_ms": 500},
        "topics": {"inputs": [topics["input"]], "scores": topics["scores"], "alerts": topics["alerts"], "dead_letter": topics["dead"]},
        "state": {"dir": str(tmp_path / "state")},
        "metrics": {"enabled": False},
        "log_level": "INFO",
    }
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    log = tmp_path / "daemon.log"
    produce(broker, topics["input"], _events(0, 5))
    proc = _start(cfg_path, log)
    _wait_for_scores(broker, topics["scores"], 5, proc)
    proc.send_signal(signal.SIGHUP)
    assert proc.wait(timeout=30) == 0, log.read_text()[-2000:]
    assert "received SIGHUP, draining" in log.read_text()
    assert list((tmp_path / "state").rglob("*.pt")), "no snapshot written at the stop"

    # A second signal while the first drains (here a drain that would take 60 s): exit at once.
    script = (
        "import os, signal, time\n"
        "from streamer.app import install_signal_handlers\n"
        "install_signal_handlers(lambda: None)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(0.2)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"  # (within a second: a duplicate delivery, ignored)
        "time.sleep(1.2)\n"
        "print('still running', flush=True)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM and "still running" in proc.stdout, proc.stderr


def test_a_revoked_partitions_lag_series_does_not_come_back(broker, topics, state_dir):
    """kafka-python keeps revoked partitions in its assignment until the next assignment
    arrives; in that window the lag refresh recreated the series the revoke had removed, and it
    stayed on /metrics, frozen, for as long as the daemon ran (a review saw 3,900 records of lag
    summed over the group where there was none)."""
    t = topics["input"]
    produce(broker, t, [(b"s-1", event("s-1", 1_000 * i, {"temp": 20.0})) for i in range(10)], lambda k: 0)
    daemon = DaemonThread(make_config(broker, topics, state_dir))
    runner, m = daemon.runner, daemon.metrics
    runner.start()
    try:
        deadline = time.monotonic() + 60
        while m.scored._value.get() < 10:
            assert time.monotonic() < deadline
            runner.step()
        runner._housekeeping()
        assert {s.labels["partition"] for s in m.consumer_lag.collect()[0].samples} == {"0", "1", "2", "3"}
        runner._on_revoke([(t, 2), (t, 3)])  # (the client still lists them, as in a rebalance)
        assert (t, 3) in runner.transport.assignment()
        runner._housekeeping()
        assert {s.labels["partition"] for s in m.consumer_lag.collect()[0].samples} == {"0", "1"}
    finally:
        runner.shutdown()


def test_a_layout_9_snapshot_that_already_holds_first_hours_keeps_them(tmp_path):
    """Layout 9 had two field sets (the first with `prof_last`, the next two commits with
    `prof_start`); the second kind was upgraded by overwriting its first hours with "long ago",
    which gave streams under a day old their profile view early."""
    model, _ = load_checkpoint(DEFAULT_WEIGHTS)
    det = Detector(model, CalibrationConfig(warmup=10))
    n = 50
    x = np.zeros((n, det.max_features))
    mask = np.zeros_like(x, dtype=bool)
    x[:, 0], mask[:, 0] = np.random.default_rng(0).normal(size=n), True
    det.process(np.zeros(n, dtype=np.int64), x, mask, 1_767_225_600_000 + np.arange(n, dtype=np.int64) * 300_000)
    state = det.bank.export_rows(torch.tensor([0]))
    assert int(state["prof_start"][0, 0]) > 0
    store = SnapshotStore(tmp_path, "g")
    arch = {"hidden": 32}
    store.save(("sensors", 0), Snapshot(7, ["pump-1"], [["a"]], state, arch, None))
    payload = store.load_payload(("sensors", 0))
    assert payload is not None
    payload["version"] = 9
    store.save_payload(("sensors", 0), payload)
    loaded = store.load(("sensors", 0), arch)
    assert loaded is not None
    assert torch.equal(loaded.state["prof_start"], state["prof_start"])
    assert torch.equal(loaded.state["prof_seen"], state["prof_seen"])


def test_a_stop_that_cannot_write_the_state_exits_1(broker, topics, tmp_path):
    """A full disk at the stop: the state of the partition is not written, which the restart
    survives (it replays from the previous snapshot) but an operator must hear of. The stop
    exited 0, as if all was well, and only a log line said otherwise."""
    state_dir = tmp_path / "state"
    config = config_data(broker, topics, state_dir)
    blocked = state_dir / config["consumer"]["group_id"] / f"{topics['input']}-0.pt"
    (blocked / "occupied").mkdir(parents=True)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    produce(broker, topics["input"], [(b"s-1", event("s-1", i, {"temp": float(i % 5)})) for i in range(20)], partition_of=lambda _key: 0)
    log = tmp_path / "daemon.log"
    proc = _start(config_path, log)
    try:
        _wait_for_scores(broker, topics["scores"], 20, proc)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert rc == 1, text[-3000:]
    assert "stopped without writing the state of 1 partitions" in text, text[-3000:]


def test_a_snapshot_older_than_the_logs_first_offset_is_not_restored(broker, topics, state_dir, caplog):
    """Retention deleted the records between a snapshot and the committed offset (a partition
    back on a member that owned it long ago): the seek to the snapshot landed out of range and
    the consumer jumped to auto_offset_reset, with `latest` past the committed offset, so events
    were never scored. Such a snapshot is discarded and consumption starts at the committed
    offset. (Tansu has no DeleteRecords: the log's first offset is given by the transport.)"""
    t = topics["input"]
    _produce_s1(broker, t, 0, 40)
    config = make_config(broker, topics, state_dir, consumer={"auto_offset_reset": "latest"})
    _commit(broker, config, t, 0)  # (with `latest`, the first member starts at the group's offset)
    with DaemonThread(config) as first:
        first.wait_scored(40)
    _produce_s1(broker, t, 40, 120)
    _commit(broker, config, t, 100)  # scored elsewhere up to 100; retention has since deleted up to 60
    daemon = DaemonThread(config)
    daemon.runner.transport.log_starts = lambda tps, timeout_ms: {tp: 60 for tp in tps}  # type: ignore[method-assign]
    with daemon:
        daemon.wait_scored(20)
        row = daemon.runner.slots.slot_of["s-1"]
        assert int(daemon.runner.detector.bank.tensors["steps"][row]) == 20  # cold: only the events after 100
        assert daemon.metrics.replayed._value.get() == 0
    assert "at offset 40, before the log's first offset 60" in caplog.text
    assert sorted(r["offset"] for r in scores_of(read_all(broker, topics["scores"], expect=60)))[40:] == list(range(100, 120))
