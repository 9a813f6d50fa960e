"""A memory-only broker restarts under a running daemon: it rejoins and scores the new log."""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from types import SimpleNamespace
from typing import Any

from conftest import DaemonThread, event, make_config, produce, read_all, scores_of
from kafka import TopicPartition
from kafka.structs import MemberState

from streamer.broker import EmbeddedBroker
from streamer.transport import COMMITTED_TIMEOUT_MS, KafkaPythonTransport, _columns

TOPICS = {"input": "in", "scores": "scores", "alerts": "alerts", "dead": "dead"}


def _create(broker: EmbeddedBroker) -> None:
    broker.create_topics({"in": 4, "scores": 2, "alerts": 1, "dead": 1})


def _assigned_transport(broker: EmbeddedBroker, state_dir) -> KafkaPythonTransport:
    """The daemon's transport, subscribed to the fresh topics and holding its partitions."""
    _create(broker)
    transport = KafkaPythonTransport(make_config(broker, TOPICS, state_dir))
    transport.subscribe(["in"], lambda tps: None, lambda tps: None)
    deadline = time.monotonic() + 30
    while not transport.assignment():
        assert time.monotonic() < deadline, "never assigned"
        transport.poll(100, 100)
    return transport


def test_daemon_survives_broker_restart_and_discards_stale_snapshots(state_dir):
    broker = EmbeddedBroker().start()
    try:
        _create(broker)
        records = [(f"s{i % 10}".encode(), event(f"s{i % 10}", i, {"x": float(i % 7)})) for i in range(500)]
        produce(broker, "in", records)
        with DaemonThread(make_config(broker, TOPICS, state_dir)) as daemon:
            daemon.wait_scored(500)
            # Restart on the same port: every topic, offset and group is gone.
            broker.stop()
            time.sleep(0.5)
            broker.start()
            _create(broker)
            produce(broker, "in", records[:300])
            daemon.wait_scored(800, timeout_s=90)
        scores = scores_of(read_all(broker, "scores", expect=300))
        assert len(scores) == 300
        assert sorted((r["partition"], r["offset"]) for r in scores) == sorted(
            (r.partition, r.offset) for r in read_all(broker, "in", expect=300)
        )
    finally:
        broker.stop()


def test_an_idle_member_cut_off_from_its_broker_says_so(state_dir):
    """A caught-up member whose broker went away stayed ready, with lag 0 from its last fetch and
    no send failing (it had nothing to send): nothing alerted. While idle it now asks for the log
    ends every probe_idle_s; no answer sets streamer_broker_reachable to 0 and /readyz to 503."""
    broker = EmbeddedBroker().start()
    try:
        _create(broker)
        produce(broker, "in", [(f"s{i % 4}".encode(), event(f"s{i % 4}", i, {"x": float(i % 7)})) for i in range(40)])
        daemon = DaemonThread(make_config(broker, TOPICS, state_dir))
        runner, m = daemon.runner, daemon.metrics
        runner.probe_idle_s = 0.5
        runner.start()

        def step_until(what: str, ok, timeout_s: float = 60.0) -> None:
            deadline = time.monotonic() + timeout_s
            while not ok():
                assert time.monotonic() < deadline, what
                runner.step()

        try:
            step_until("scored", lambda: m.scored._value.get() >= 40)
            time.sleep(0.6)
            runner.step()
            assert m.broker_reachable._value.get() == 1 and runner.health.readiness()[0]
            broker.stop()
            step_until("unreachable", lambda: m.broker_reachable._value.get() == 0)
            ready, detail = runner.health.readiness()
            assert not ready and detail.startswith("no broker has answered"), detail
            assert runner.health.liveness()[0]  # (a restart would not help: still alive)
            broker.start()
            _create(broker)
            step_until("reachable again", lambda: m.broker_reachable._value.get() == 1, timeout_s=90)
            # A member marked cut off that then holds no partition has nothing to probe: the
            # assignment that left it empty came from the group coordinator, so it is reachable
            # (it stayed 503 and 0 for good).
            runner._reachable(False)
            runner._on_revoke(sorted(runner.emit_from))
            runner._on_assign([])
            runner.step()
            assert m.broker_reachable._value.get() == 1 and runner.health.readiness()[0], runner.health.readiness()
        finally:
            runner.shutdown()
    finally:
        broker.stop()


def test_a_member_with_a_batch_in_hand_says_the_broker_is_unreachable(state_dir):
    """A member cut off while it had outputs to send stayed ready, with
    streamer_broker_reachable 1, for the whole outage: it retried the send forever and never
    reached the idle probe. A slow failed send now asks whether the brokers answer at all."""
    broker = EmbeddedBroker().start()
    try:
        _create(broker)
        # (All on partition 0: one fetch buffers more than a poll hands out, so the next poll has
        # records in hand without the broker.)
        produce(broker, "in", [(b"s", event("s", i, {"x": float(i % 7)})) for i in range(400)], lambda k: 0)
        config = make_config(broker, TOPICS, state_dir, consumer={"max_poll_records": 20}, producer={"send_timeout_s": 6.0})
        daemon = DaemonThread(config)
        runner, m = daemon.runner, daemon.metrics
        runner.start()
        deadline = time.monotonic() + 60
        while m.scored._value.get() < 20:
            assert time.monotonic() < deadline, "nothing scored"
            runner.step()
        assert runner.health.readiness()[0] and m.broker_reachable._value.get() == 1
        broker.stop()
        stepping = threading.Thread(target=runner.step, daemon=True)  # (its send retries until the stop)
        stepping.start()
        try:
            deadline = time.monotonic() + 40
            while m.broker_reachable._value.get() == 1:
                assert time.monotonic() < deadline, f"still reachable after {m.send_failures._value.get()} failed sends"
                time.sleep(0.2)
            assert m.send_failures._value.get() >= 1
            ready, detail = runner.health.readiness()
            assert not ready and detail.startswith("no broker has answered"), detail
            assert runner.health.liveness()[0]
        finally:
            runner.stop()
            stepping.join(timeout=60)
            runner.shutdown()
    finally:
        broker.stop()


def test_a_send_attempt_that_rebuilds_its_producer_keeps_to_send_timeout_s(state_dir):
    """From a review: a send after a failed one builds a new producer, and building one waited
    kafka-python's own 30 s for a broker to bootstrap from, whatever producer.send_timeout_s said:
    an attempt could outlast the 2 x send_timeout_s that the watchdog and the stop budget are
    computed from. With send_timeout_s at 2 and no broker, the rebuild gives up within it."""
    from streamer.transport import SendError

    broker = EmbeddedBroker().start()
    transport = None
    try:
        _create(broker)
        transport = KafkaPythonTransport(make_config(broker, TOPICS, state_dir, producer={"send_timeout_s": 2.0}))
        broker.stop()
        transport._drop_producer()  # (as after a failed attempt)
        start = time.monotonic()
        try:
            transport.send_batch([])
        except SendError:
            pass
        else:
            raise AssertionError("a producer was built with no broker to bootstrap from")
        took = time.monotonic() - start
        print(f"send attempt with a rebuild and no broker: {took:.1f} s")
        assert took < 2 * 2.0 + 3, took  # (30 s before: kafka-python's bootstrap_timeout_ms)
    finally:
        if transport is not None:
            transport.close()
        broker.stop()


def test_a_failed_attempt_leaves_no_producer_thread_running(state_dir):
    """kafka-python's close() flushes first and, with records no broker takes, raises there before
    it stops the producer's network thread: each failed send of an outage left one running (and
    an "Exception ignored" traceback on stderr when it was collected). Three failed attempts with
    the broker gone now leave none."""
    from streamer.transport import OutRecord, SendError

    def producer_threads() -> list[str]:
        return [t.name for t in threading.enumerate() if t.name.endswith("-network-thread") and t.is_alive()]  # (the sender)

    broker = EmbeddedBroker().start()
    transport = None
    try:
        _create(broker)
        transport = KafkaPythonTransport(make_config(broker, TOPICS, state_dir, producer={"send_timeout_s": 1.0}))
        transport.send_batch([OutRecord("scores", b"k", b"v")])  # (the producer now knows the topic)
        assert len(producer_threads()) == 1, [t.name for t in threading.enumerate()]
        broker.stop()
        for _ in range(3):
            try:
                transport.send_batch([OutRecord("scores", b"k", b"v")])
            except SendError:
                pass
            else:
                raise AssertionError("acknowledged with the broker stopped")
        time.sleep(0.5)
        assert producer_threads() == [], producer_threads()
    finally:
        if transport is not None:
            transport.close()
        broker.stop()


def test_a_hung_broker_does_not_make_the_client_spin(state_dir):
    """kafka-python busy-waits inside poll() while its group coordinator does not answer (a hung
    broker, not a refused connection): an idle daemon used half to two thirds of a core for as
    long as that lasted. Its transport now paces polls that spin; it still reads what the
    broker has once it answers again."""
    broker = EmbeddedBroker().start()
    transport = None
    try:
        transport = _assigned_transport(broker, state_dir)
        assert broker.proc is not None
        os.kill(broker.proc.pid, signal.SIGSTOP)
        try:
            for _ in range(20):  # let the heartbeat fall overdue
                transport.poll(100, 100)
            t0, c0 = time.monotonic(), time.process_time()
            while time.monotonic() - t0 < 8:
                assert not transport.poll(100, 100)
            share = (time.process_time() - c0) / (time.monotonic() - t0)
        finally:
            os.kill(broker.proc.pid, signal.SIGCONT)
        print(f"CPU share while the broker hung: {share:.3f}")
        assert share < 0.2
        produce(broker, "in", [(b"s", event("s", 1, {"x": 1.0}))])
        deadline = time.monotonic() + 60
        got = 0
        while not got:
            assert time.monotonic() < deadline, "nothing read after the broker answered again"
            got = len(transport.poll(100, 100))
    finally:
        if transport is not None:
            transport.close()
        broker.stop()


def test_a_coordinator_hung_at_an_assignment_holds_the_loop_once_and_duplicates_nothing(tmp_path, caplog):
    """The committed offsets of a new assignment were asked for without a limit, then with 10 s
    per partition: a coordinator hung right after an assignment held the loop (liveness, the
    watchdog) for partitions x 10 s. A timed-out answer was also taken for "nothing committed",
    so a snapshot behind the real committed offset was restored and its events emitted again.
    Now one deadline covers the assignment, and without an answer no snapshot is restored. (The
    consumer may have had one partition's answer before the broker stopped: then the others are
    the unanswered ones, and the question where that one's log begins is asked within what is
    left of the deadline; asked with 5 s of its own, the loop was held 15 s, in a CI run.)"""
    broker = EmbeddedBroker().start()
    try:
        _create(broker)  # ("in" has 4 partitions, all assigned to the one member)
        here, elsewhere = tmp_path / "a", tmp_path / "b"
        here.mkdir()
        elsewhere.mkdir()

        def events(lo: int, hi: int) -> list[tuple[bytes | None, bytes]]:
            return [(b"s", event("s", 1_700_000_000_000 + 1000 * i, {"x": float(i % 7)})) for i in range(lo, hi)]

        produce(broker, "in", events(0, 300), lambda k: 0)
        with DaemonThread(make_config(broker, TOPICS, here)) as daemon:  # its snapshot: offset 300
            daemon.wait_scored(300)
        produce(broker, "in", events(300, 600), lambda k: 0)
        with DaemonThread(make_config(broker, TOPICS, elsewhere)) as daemon:  # another host: committed 600
            daemon.wait_scored(300)
        daemon = DaemonThread(make_config(broker, TOPICS, here))  # the partitions come back here
        runner = daemon.runner
        assert broker.proc is not None
        pid, on_assign = broker.proc.pid, runner._on_assign

        def hang_at_assignment(tps: list[tuple[str, int]]) -> None:
            # Hung from inside the callback, before the consumer's own poll goes on to ask for
            # the committed offsets: stopped after it, a loaded machine's consumer already had
            # all four answers and there was nothing left unanswered to test.
            on_assign(tps)
            os.kill(pid, signal.SIGSTOP)

        runner._on_assign = hang_at_assignment  # type: ignore[method-assign]
        runner.start()
        deadline = time.monotonic() + 60
        while not runner._assign_pending:
            assert time.monotonic() < deadline, "never assigned"
            runner.transport.poll(100, 100)
        assert len(runner._pending_assign) == 4
        started = time.monotonic()
        try:
            runner._complete_assign(_columns({}))
            held = time.monotonic() - started
        finally:
            os.kill(broker.proc.pid, signal.SIGCONT)
        try:
            assert held < COMMITTED_TIMEOUT_MS / 1000 + 3, held  # (was 4 x 10 s)
            unanswered = sorted(runner._start_unknown)
            assert unanswered and all(tp not in runner.next_offset for tp in unanswered)  # their snapshots (300) not restored
            assert f"did not answer for the committed offsets of {len(unanswered)} of 4 partitions" in caplog.text
            produce(broker, "in", events(600, 610), lambda k: 0)
            deadline = time.monotonic() + 60
            while daemon.metrics.scored._value.get() < 10:
                assert time.monotonic() < deadline, daemon.metrics.scored._value.get()
                runner.step()
        finally:
            runner.shutdown()
        assert len(read_all(broker, "scores", expect=610)) == 610  # (was 910: 300..600 again)
    finally:
        broker.stop()


class _Spinning:
    """A stand-in client busy-waiting inside poll() with a heartbeat due, as kafka-python does
    while its coordinator does not answer; every fifth poll returns a record. (The outage itself
    is in the hung-broker test above.)"""

    def __init__(self, state: MemberState) -> None:
        self.polls = 0
        self._coordinator = SimpleNamespace(state=state, time_to_next_heartbeat=lambda: 0)

    def poll(self, timeout_ms: int, max_records: int) -> dict[Any, list[Any]]:
        self.polls += 1
        if self.polls % 5 == 0:
            return {TopicPartition("in", 0): [SimpleNamespace(offset=self.polls, timestamp=1, key=None, value=b"{}", headers=[])]}
        end = time.monotonic() + timeout_ms / 1000  # the client's busy wait
        while time.monotonic() < end:
            pass
        return {}


def _paced_transport(state: MemberState) -> KafkaPythonTransport:
    transport = KafkaPythonTransport.__new__(KafkaPythonTransport)
    transport._consumer = _Spinning(state)  # type: ignore[assignment]
    transport._spinning, transport._calm, transport._suspect, transport._paced_logged = False, 0, 0, (False, -math.inf)
    return transport


def test_pacing_ends_on_calm_polls_not_on_records_and_says_so_once(caplog):
    """A hung coordinator can sit beside partition leaders that still serve fetches: polls spin
    when empty and return records now and then. Pacing ended at every record and began again at
    the next empty poll, logging a warning and an info line each time. It now ends only after
    calm polls, and the transitions are logged once a minute at most."""
    transport = _paced_transport(MemberState.STABLE)
    caplog.set_level(logging.DEBUG, logger="streamer.transport")
    got = sum(len(transport.poll(20, 10)) for _ in range(40))
    assert got == 8
    assert transport._spinning  # (records did not end it)
    said = [r for r in caplog.records if r.name == "streamer.transport" and r.levelno >= logging.INFO]
    assert [r.levelname for r in said] == ["WARNING"]


def test_a_heartbeat_due_during_a_rebalance_is_not_taken_for_a_hung_coordinator(caplog):
    """While the member joins, a heartbeat is due by design; with the process busy beside it
    (the demo's feeds backfilling) empty polls read as a spin, and every demo warned 'busy-waiting
    ... a coordinator not answering' about 2 s in. Only a stable member is suspected now."""
    transport = _paced_transport(MemberState.REBALANCING)
    caplog.set_level(logging.DEBUG, logger="streamer.transport")
    sum(len(transport.poll(20, 10)) for _ in range(40))
    assert not transport._spinning
    assert not [r for r in caplog.records if r.name == "streamer.transport" and r.levelno >= logging.WARNING]


def test_the_pacing_state_logged_last_is_the_state_now_within_a_minute(caplog, monkeypatch):
    """Transitions logged at most once a minute must not leave a lasting outage unsaid: the
    time limit ran from the last settle even when that was not logged, so an outage that began
    within a minute of one was never logged at all, and the last line read "settled"."""
    clock = [1000.0]
    monkeypatch.setattr("streamer.transport.time.monotonic", lambda: clock[0])
    transport = KafkaPythonTransport.__new__(KafkaPythonTransport)
    transport._spinning, transport._calm, transport._suspect, transport._paced_logged = False, 0, 0, (False, -math.inf)
    caplog.set_level(logging.INFO, logger="streamer.transport")
    said = []
    # Flapping for a minute, settled at 70 s, and an outage from 80 s that lasts.
    steps = [(0, True), (20, False), (40, True), (50, False), (55, True), (70, False), (80, True), (100, True), (131, True), (200, True)]
    for t, spinning in steps:
        clock[0] = 1000.0 + t
        transport._pace(spinning)
        transport._say_pacing()
        said += [(t, r.levelname) for r in caplog.records[len(said) :]]
    assert said == [(0, "WARNING"), (70, "INFO"), (131, "WARNING")]


def test_committed_keeps_the_answers_before_a_timeout_and_an_assignment_drops_cached_ones():
    """KafkaPythonTransport.committed: the partitions answered before the deadline or an error are
    returned (the rest left out, as unanswered). And each assignment drops the committed-offset
    requests kafka-python cached from earlier ones: a request answered late was returned at a
    later assignment as the current offset (a review: a partition coming back got its offset
    from before another member moved it on)."""
    from kafka.errors import KafkaTimeoutError

    stale = frozenset({TopicPartition("in", 1)})

    class Consumer:
        def __init__(self) -> None:
            self._coordinator = SimpleNamespace(_offset_fetch_futures={stale: "answered late: 500"})
            self.asked: list[int] = []
            self.listener: Any = None

        def subscribe(self, topics: list, listener: Any) -> None:
            self.listener = listener

        def committed(self, tp: TopicPartition, timeout_ms: int) -> int | None:
            self.asked.append(tp.partition)
            if tp.partition == 2:
                raise KafkaTimeoutError("no answer in time")
            return None if tp.partition == 0 else 900 + tp.partition

    transport = KafkaPythonTransport.__new__(KafkaPythonTransport)
    consumer = transport._consumer = Consumer()  # type: ignore[assignment]
    assert transport.committed([("in", p) for p in range(4)], timeout_ms=1_000) == {("in", 0): None, ("in", 1): 901}
    assert consumer.asked == [0, 1, 2]
    assigned: list = []
    transport.subscribe(["in"], assigned.append, lambda tps: None)
    assert stale in consumer._coordinator._offset_fetch_futures  # (kept until an assignment)
    consumer.listener.on_partitions_assigned({TopicPartition("in", 1)})
    assert not consumer._coordinator._offset_fetch_futures and assigned == [[("in", 1)]]


def test_a_slow_coordinators_committed_offsets_are_kept_as_they_come():
    """Partitions whose committed offset was unknown at the assignment are asked again, within
    2 s together, when their records arrive. Asked in one call, a coordinator answering each in
    300 ms gave nothing for 8 partitions (the call timed out as a whole, and the 6 answers it had
    were dropped); their snapshots then recorded no committed offset. (A stand-in transport: the
    slowness is what cannot be staged with the embedded broker.)"""
    from streamer.loop import Runner

    class Slow:
        """As KafkaPythonTransport.committed: one partition after another against one deadline,
        those answered by then; each answer takes 300 ms."""

        def committed(self, tps: list, timeout_ms: int = 10_000) -> dict:
            deadline = time.monotonic() + timeout_ms / 1000
            out = {}
            for tp in tps:
                if time.monotonic() + 0.3 > deadline:
                    time.sleep(max(0.0, deadline - time.monotonic()))
                    break
                time.sleep(0.3)
                out[tp] = 100 + tp[1]
            return out

    runner = Runner.__new__(Runner)
    tps = [("in", p) for p in range(8)]
    runner.transport, runner._start_unknown, runner._committed = Slow(), set(tps), {}  # type: ignore[assignment]
    runner._learn_committed(tps)
    assert runner._committed, "no answer kept"
    assert all(runner._committed[tp] == 100 + tp[1] for tp in runner._committed)
    assert not runner._start_unknown  # (asked once per assignment: no 2 s wait at every poll)
