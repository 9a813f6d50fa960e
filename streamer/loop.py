"""The one processing loop: poll, decode, step, emit, wait for acks, snapshot, commit.

Every batch is finished (its outputs acknowledged and its offsets committed) before the next
poll, so a crash at any point loses nothing: uncommitted records are redelivered and scored
again. Partition state follows assignment: on assign, a partition's snapshot is loaded and
the consumer seeks to the snapshot's offset; records between it and the committed offset are
stepped to rebuild state but not emitted again (their scores were acknowledged before that
commit). On revoke, the partition's streams are snapshotted and dropped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
import torch

from models.detector import HELD, VIEWS, Detector
from streamer.config import Config
from streamer.decode import Decoder
from streamer.health import LoopHealth
from streamer.logstreams import LogStreams
from streamer.metrics import Metrics
from streamer.sdnotify import Notifier
from streamer.state import TP, SlotTable, Snapshot, SnapshotStore, recorded_committed
from streamer.transport import COMMITTED_TIMEOUT_MS, Headers, OutRecord, Polled, SendError, Transport

log = logging.getLogger(__name__)
# How long the commit of restored snapshots' offsets may wait at an assignment.
COMMIT_RESTORED_TIMEOUT_MS = 5_000
# How long a partition's committed offset is asked for again, when its first records arrive
# after the coordinator did not give it at the assignment (unknown still: the two-batch rule).
LEARN_COMMITTED_TIMEOUT_MS = 2_000
# Score records name the deciding view; the extra None is for events with nothing to compare.
_VIEW_NAMES = np.array([*VIEWS, None], dtype=object)
_HELD_NAMES = np.array([None, *HELD[1:]], dtype=object)
# A failed send that took less than this was refused, not timed out: worth resending while
# stopping (see Runner._send).
QUICK_SEND_FAILURE_S = 5.0
# Bytes of a dead letter's record taken by the headers the daemon adds and Kafka's framing.
DEAD_LETTER_OVERHEAD = 4096


# Kafka frames each header with two varints (the lengths of its name and value), up to 5 bytes each.
HEADER_FRAMING = 10


def _fit_dead_letter(
    key: bytes | None, value: bytes | None, headers: Headers, room: int, max_value: int
) -> tuple[bytes | None, bytes | None, Headers, Headers]:
    """The original key, value and headers of a dead letter, made sendable: returns them plus
    the headers to add.

    Kafka allows null header values, which kafka-python's producer refuses: they become empty.
    A header of the input named like the daemon's own (`streamer.reason`, ...) is kept as
    `original.<name>`, so a reader taking the first or the last header of a name gets the
    daemon's. A value is kept up to `max_value` bytes (input.max_message_bytes: only an
    `oversized` record is longer, and a dead-letter topic with the broker's default 1 MB limit
    would refuse it for good, however large the input topic's limit is). The record must also
    fit the producer's max_request_size (`room` bytes here): where the key and headers take over
    half of it they are dropped (`streamer.dropped` says so) and the value is cut to the rest. A
    send refused for size is refused on every retry, which would stall the partition for good.
    Whatever is cut stays in the source topic, at the offset the dead letter names. A tombstone
    keeps its null value unless it has no key (Kafka needs one of them).
    """
    original: Headers = [(f"original.{k}" if k.startswith("streamer.") else k, b"" if v is None else v) for k, v in headers]
    extra: Headers = []

    def framing() -> int:
        return len(key or b"") + sum(len(k.encode()) + len(v or b"") + HEADER_FRAMING for k, v in original)

    size = len(value) if value is not None else 0
    if size > max_value or framing() + size > room:
        if framing() > room // 2:
            extra.append(("streamer.dropped", f"key of {len(key or b'')} bytes, {len(original)} headers".encode()))
            key, original = None, []
        if value is not None and (size > max_value or framing() + size > room):
            extra.append(("streamer.truncated", str(size).encode()))
            value = value[: max(0, min(max_value, room - framing()))]
    if value is None and key is None:
        value = b""
    return key, value, original, extra


class Runner:
    def __init__(
        self,
        config: Config,
        transport: Transport,
        detector: Detector,
        metrics: Metrics,
        model_meta: dict[str, Any],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.transport = transport
        self.detector = detector
        self.metrics = metrics
        self.clock = clock
        self.model_version = str(model_meta.get("model_version", "unknown"))
        self.arch = dict(model_meta.get("config", {}))
        inp = config.input
        self.decoder = Decoder(detector.max_features, inp.max_message_bytes, inp.max_stream_id_length, inp.stream_field)
        self.slots = SlotTable()
        self.logs = LogStreams(config) if config.logs.topics else None
        self.store = SnapshotStore(config.state.dir, config.consumer.group_id)
        self.next_offset: dict[TP, int] = {}
        self.emit_from: dict[TP, int] = {}
        self.log_ids: dict[TP, str | None] = {}
        self._pending_assign: list[TP] = []
        # Partitions whose state has stepped past outputs not yet acknowledged: a snapshot of them
        # would record an offset beyond what a restart may skip, so none is written until the
        # send succeeds (a failed one leaves the previous snapshot, and the batch is scored again).
        self._unacked: set[TP] = set()
        # Partitions restored from a snapshot older than their committed offset: the events in
        # between are being scored again (no outputs) to rebuild state. Not ready until done: a
        # rolling update that moved on would leave the group with cold-ish state and lag.
        self._replaying: set[TP] = set()
        self._assign_pending = False
        self._batch_model: tuple[float, int] | None = None  # model seconds and wavefronts of the batch in hand
        self.stop_event = threading.Event()
        self.ready = threading.Event()
        self.health = LoopHealth(config.metrics.max_stall_s)
        self._last_snapshot = time.monotonic()
        self._last_evict = time.monotonic()
        self._snapshotted_for_stop = False
        # The offset this member last committed (or found committed at assignment) per partition:
        # snapshots record it, which tells a snapshot ahead of its commit from an offset reset.
        self._committed: dict[TP, int | None] = {}
        # Partitions whose committed offset the coordinator did not give at assignment: asked
        # again when their first records arrive (the client has then had it from the
        # coordinator), so that their snapshots record it and commits failing since do not leave
        # snapshots that read as an older build's. (The first offset polled is no stand-in: a
        # transaction marker or a compacted record at the committed offset puts it past it.)
        self._start_unknown: set[TP] = set()
        # Partitions whose state the stop could not write (a full disk): `streamer run` then
        # exits 1, so a supervisor or an operator sees it; nothing is lost (the restart replays
        # from their previous snapshots), but the disk needs attention before the next stop.
        self.unsaved_at_stop = 0
        # An idle loop hears nothing from the brokers: its polls come back empty whether or not
        # one is there. After this long without an answer it asks for the log ends (a round trip).
        self.probe_idle_s = 15.0
        self._last_contact = time.monotonic()
        self._last_reload_check = time.monotonic()
        self._last_gauges = 0.0
        self.watcher: Any = None  # set by streamer.app: notices a replaced checkpoint file
        self.notifier = Notifier()  # streamer.app gives `run` systemd's, when it has one

    # -- partition ownership ------------------------------------------------------------
    # kafka-python runs rebalance callbacks on its network thread while poll() waits, and that
    # thread cannot serve a blocking call such as committed(). Revocation needs no Kafka I/O
    # (snapshot to disk, drop rows), so it runs in the callback; assignment is only recorded
    # there and completed by the loop right after poll() returns.
    def _on_assign(self, tps: list[TP]) -> None:
        # An empty assignment (more members than partitions) still completes a join.
        self._pending_assign.extend(tp for tp in tps if tp not in self._pending_assign)
        self._assign_pending = True
        self.health.restoring = True

    def _complete_assign(self, polled: Polled) -> Polled:
        """Restore snapshots of newly assigned partitions; drop polled records the seek replaces."""
        tps, self._pending_assign = self._pending_assign, []
        self._assign_pending = False
        reseeked: set[TP] = set()
        deadline = time.monotonic() + COMMITTED_TIMEOUT_MS / 1000  # (the committed offsets' own, and what log_starts may use)
        known = self.transport.committed(tps, timeout_ms=COMMITTED_TIMEOUT_MS) if tps else {}
        unanswered = [tp for tp in tps if tp not in known]
        if unanswered:
            # Where the group stands is unknown there, so no snapshot can be placed against it:
            # one behind the committed offset would emit again what was emitted (alerts
            # included). The consumer starts at the committed offset once the coordinator answers.
            log.warning(
                "the group coordinator did not answer for the committed offsets of %d of %d partitions; their snapshots are "
                "not restored and their streams start cold",
                len(unanswered),
                len(tps),
            )
        # Where each log now begins: a snapshot older than that cannot be replayed from (see
        # _unusable_offset). Unknown (brokers slow to say): the snapshot is used as before.
        # Asked within what the committed offsets left of their deadline (at most 5 s): with a
        # coordinator that answered for one partition (before it hung, or from the consumer's
        # cache) and not the rest, the two limits one after the other held the loop 15 s.
        answered = [tp for tp in tps if tp in known]
        left_ms = min(5_000, int((deadline - time.monotonic()) * 1000))
        starts = (self.transport.log_starts(answered, left_ms) if answered and left_ms > 0 else None) or {}
        for tp in tps:
            committed = known.get(tp)
            self.emit_from[tp] = committed or 0
            self._committed[tp] = committed
            # The log our offsets refer to, fixed at assignment: a snapshot taken after the topic
            # was recreated under us must still name the log its offsets came from.
            self.log_ids[tp] = self.transport.topic_id(tp[0])
            if tp not in known:
                self._start_unknown.add(tp)
                continue
            self._start_unknown.discard(tp)
            if self.logs is not None and tp[0] in self.logs.topics:
                if self._restore_logs(tp, committed, starts.get(tp)):
                    reseeked.add(tp)
                continue
            snap = self.store.load(tp, self.arch)
            if snap is None or self._unusable_offset(tp, "", snap.offset, committed, snap.committed, starts.get(tp)):
                continue
            current_id = self.log_ids[tp]
            if snap.topic_id and current_id and snap.topic_id != current_id:
                log.warning(
                    "discarding snapshot of %s[%d]: the topic was recreated (id %s, snapshot of %s); streams restart cold",
                    tp[0],
                    tp[1],
                    current_id,
                    snap.topic_id,
                    extra={"topic": tp[0], "partition": tp[1], "offset": snap.offset},
                )
                continue
            problem = self.detector.bank.mismatch(len(snap.streams), snap.state)
            if problem is not None:
                log.warning(
                    "discarding snapshot of %s[%d]: %s; streams restart cold",
                    tp[0],
                    tp[1],
                    problem,
                    extra={"topic": tp[0], "partition": tp[1], "offset": snap.offset},
                )
                continue
            slots, _ = self.slots.assign(snap.streams, [tp] * len(snap.streams))
            if len(slots):
                self.detector.bank.ensure_capacity(int(slots.max()) + 1)
                self.detector.bank.import_rows(torch.as_tensor(slots), snap.state)
                now = self.clock()
                self.slots.touch(slots, now if snap.idle_s is None else now - np.asarray(snap.idle_s))
            for stream, names in zip(snap.streams, snap.schemas):
                if names:  # (none: the stream had no event since a reload reset it; its next one sets it)
                    self.decoder.schemas[stream] = tuple(names)
            self.transport.seek(tp, snap.offset)
            self.next_offset[tp] = snap.offset
            reseeked.add(tp)
            log.info(
                "restored %d streams of %s[%d] at offset %d (committed %s)",
                len(snap.streams),
                tp[0],
                tp[1],
                snap.offset,
                committed,
                extra={"topic": tp[0], "partition": tp[1], "offset": snap.offset, "committed": committed},
            )
        ahead = {tp: self.next_offset[tp] for tp in reseeked if (c := known.get(tp)) is not None and self.next_offset[tp] > c}
        self._commit_restored(ahead)
        self.metrics.assigned_partitions.set(len(self.transport.assignment()))
        self.metrics.active_streams.set(self._stream_count())
        self._replaying.update(tp for tp in reseeked if self.next_offset.get(tp, 0) < self.emit_from[tp])
        self._check_replay()
        self.health.joined = True
        self.health.restoring = False
        self.ready.set()
        self._reachable(True)  # (a completed assignment came from the group coordinator)
        if reseeked and len(polled):
            keep = np.array([tp not in reseeked for tp in zip(polled.topic, polled.partition.tolist())], dtype=bool)
            polled = polled.select(keep)
        return polled

    def _learn_committed(self, tps: list[TP]) -> None:
        """Ask once more, within LEARN_COMMITTED_TIMEOUT_MS for all of them; the answers that
        came are kept, and those not answered stay unknown for this assignment."""
        self._start_unknown.difference_update(tps)
        got = self.transport.committed(tps, timeout_ms=LEARN_COMMITTED_TIMEOUT_MS)
        self._committed.update((tp, offset) for tp, offset in got.items() if offset is not None)

    def _commit_restored(self, ahead: dict[TP, int]) -> None:
        """Commit restored snapshots' offsets where they are ahead of the committed ones (commits
        that failed before them): their events were emitted and acknowledged, and left behind,
        the group's offset would show lag that is not there on a quiet partition, and a member
        without the snapshot (another host) would emit them all again. One commit, bounded:
        these follow a coordinator's trouble, and a commit per partition, each waiting out the
        request timeout, held the loop for minutes."""
        if ahead and self.transport.commit(ahead, timeout_ms=COMMIT_RESTORED_TIMEOUT_MS):
            self._committed.update(ahead)
            self.emit_from.update(ahead)

    def _unusable_offset(self, tp: TP, kind: str, offset: int | None, committed: int | None, wrote: int | None, start: int | None) -> bool:
        """A snapshot whose offset is far from the committed one is not restored; its streams
        start cold, as on a host that never had the partition. Far behind: the replay up to the
        committed offset would keep this member unready for long (it owned the partition long
        ago, and another member has since). Ahead, where the committed offset is below the one
        the snapshot was written against (`wrote`): it was moved back (`kafka-consumer-groups
        --reset-offsets`, to score a range again; members only move it forward), and seeking
        to the snapshot would skip what the operator asked for. Ahead otherwise, the commits
        after the snapshot failed (a coordinator out of reach) or a crash came first, and
        another member may have moved the offset on since: the snapshot's events were all
        emitted and acknowledged, so it is restored however far ahead (and its offset
        committed). Ahead of no committed offset at all (expired, or deleted with
        `kafka-consumer-groups --delete-offsets`), it is restored too. (A snapshot of an older
        build, without `wrote`: ahead by more than two batches is taken for a reset, as before.)"""
        if not isinstance(offset, int):
            return False
        limit = self.config.state.max_replay_records
        ahead = 2 * self.config.consumer.max_poll_records
        where = {"topic": tp[0], "partition": tp[1], "offset": offset, "committed": committed}
        if start is not None and offset < start:
            # Retention deleted records the replay would need: the seek would land out of range
            # and the consumer jump to auto_offset_reset, past the committed offset with `latest`
            # (events never scored); and the state could not be rebuilt faithfully anyway.
            log.warning(
                "discarding %ssnapshot of %s[%d]: it is at offset %d, before the log's first offset %d (deleted by retention); "
                "consuming from the committed offset %s, streams restart cold",
                kind,
                tp[0],
                tp[1],
                offset,
                start,
                committed,
                extra=where,
            )
            return True
        if committed is None:
            return False
        if limit is not None and committed - offset > limit:
            log.warning(
                "discarding %ssnapshot of %s[%d]: it is at offset %d, %d records behind the committed offset %d, more than "
                "state.max_replay_records (%d) to replay; streams restart cold",
                kind,
                tp[0],
                tp[1],
                offset,
                committed - offset,
                committed,
                limit,
                extra=where,
            )
            return True
        if offset > committed and (offset - committed > ahead if wrote is None else committed < wrote):
            log.warning(
                "discarding %ssnapshot of %s[%d]: it is at offset %d, %d past the committed offset %d, which was moved back "
                "(an offset reset%s); consuming from the committed offset, streams restart cold",
                kind,
                tp[0],
                tp[1],
                offset,
                offset - committed,
                committed,
                "" if wrote is None else f": it was {wrote} when the snapshot was written",
                extra=where,
            )
            return True
        return False

    def _restore_logs(self, tp: TP, committed: int | None, start: int | None) -> bool:
        assert self.logs is not None
        payload = self.store.load_payload(tp)
        if (
            payload is None
            or payload.get("kind") != "logs"
            or self._unusable_offset(tp, "log ", payload.get("offset"), committed, recorded_committed(payload), start)
        ):
            return False
        if payload.get("topic_id") and self.log_ids[tp] and payload["topic_id"] != self.log_ids[tp]:
            log.warning(
                "discarding log snapshot of %s[%d]: the topic was recreated", tp[0], tp[1], extra={"topic": tp[0], "partition": tp[1]}
            )
            return False
        try:
            n = self.logs.restore(tp, payload["partition"], payload.get("idle_s"), self.clock())
        except (KeyError, ValueError) as err:
            log.warning("discarding log snapshot of %s[%d]: %s", tp[0], tp[1], err, extra={"topic": tp[0], "partition": tp[1]})
            return False
        self.transport.seek(tp, payload["offset"])
        self.next_offset[tp] = payload["offset"]
        log.info(
            "restored %d log streams of %s[%d] at offset %d (committed %s)",
            n,
            tp[0],
            tp[1],
            payload["offset"],
            committed,
            extra={"topic": tp[0], "partition": tp[1], "offset": payload["offset"]},
        )
        return True

    def _stream_count(self) -> int:
        return len(self.slots) + (len(self.logs) if self.logs is not None else 0)

    def _on_revoke(self, tps: list[TP]) -> None:
        self.health.restoring = True  # not ready until the assignment that follows is restored
        # Two rebalances inside one poll(): an assignment not completed yet may be taken back.
        self._pending_assign = [tp for tp in self._pending_assign if tp not in tps]
        if not self._snapshotted_for_stop:
            self._snapshot(set(tps))
        streams = self.slots.streams_of(set(tps))
        self._drop(streams)
        if self.logs is not None:
            for tp in tps:
                self.logs.drop(tp)
        log.info(
            "revoked %d partitions, dropped %d streams",
            len(tps),
            len(streams),
            extra={"partitions": {f"{t}[{p}]": self.next_offset.get((t, p)) for t, p in tps}},
        )
        self._replaying.difference_update(tps)
        self.health.replaying = len(self._replaying)
        for tp in tps:
            self.next_offset.pop(tp, None)
            self.emit_from.pop(tp, None)
            self._committed.pop(tp, None)
            self._start_unknown.discard(tp)
            self.log_ids.pop(tp, None)
            with contextlib.suppress(KeyError):
                self.metrics.consumer_lag.remove(tp[0], str(tp[1]))
        self.metrics.assigned_partitions.set(len(set(self.transport.assignment()) - set(tps)))
        self.metrics.active_streams.set(self._stream_count())

    def _drop(self, streams: list[str]) -> None:
        freed = self.slots.release(streams)
        if freed:
            self.detector.bank.reset(torch.as_tensor(freed))
        self.decoder.forget(streams)
        self.metrics.active_streams.set(self._stream_count())

    def _snapshot(self, tps: set[TP]) -> int:
        """Write the state of the given partitions at the offsets processed so far; returns how
        many could not be written."""
        failed = 0
        for tp in sorted(tps):
            if tp not in self.next_offset:
                continue
            if tp in self._unacked:
                log.warning(
                    "not snapshotting %s[%d]: outputs of its last batch were not acknowledged; the previous snapshot stands",
                    tp[0],
                    tp[1],
                    extra={"topic": tp[0], "partition": tp[1]},
                )
                continue
            try:
                self._write_snapshot(tp)
            except OSError as err:
                # A full disk or a permissions problem must not stop scoring: the previous
                # snapshot stands (older state, more replay after a restart), and this is retried
                # at the next interval.
                self.metrics.snapshot_failures.inc()
                failed += 1
                log.error("could not write the snapshot of %s[%d]: %s", tp[0], tp[1], err, extra={"topic": tp[0], "partition": tp[1]})
        self._last_snapshot = time.monotonic()
        return failed

    def _write_snapshot(self, tp: TP) -> None:
        if self.logs is not None and tp[0] in self.logs.topics:
            part = self.logs.snapshot(tp)
            if part is not None:
                payload = {
                    "kind": "logs",
                    "offset": self.next_offset[tp],
                    "topic_id": self.log_ids.get(tp),
                    "partition": part,
                    "idle_s": self.logs.idle_ages(tp, self.clock()),
                    "committed": self._committed.get(tp),
                }
                self.store.save_payload(tp, payload)
                self.metrics.snapshots.inc()
            return
        streams = self.slots.streams_of({tp})
        rows = torch.as_tensor([self.slots.slot_of[s] for s in streams], dtype=torch.int64)
        schemas = [list(self.decoder.schemas.get(s, ())) for s in streams]
        state = self.detector.bank.export_rows(rows)
        idle = (self.clock() - self.slots.last_seen[rows.numpy()]).tolist()
        snap = Snapshot(self.next_offset[tp], streams, schemas, state, self.arch, self.log_ids.get(tp), idle, self._committed.get(tp))
        self.store.save(tp, snap)
        self.metrics.snapshots.inc()

    # -- the loop -----------------------------------------------------------------------
    def start(self) -> None:
        self.transport.subscribe([*self.config.topics.inputs, *self.config.logs.topics], self._on_assign, self._on_revoke)

    def run(self) -> None:
        self.start()
        try:
            while not self.stop_event.is_set():
                self.step()
        finally:
            self.shutdown()

    def stop(self) -> None:
        self.stop_event.set()

    def shutdown(self) -> None:
        """Snapshot every owned partition, then close (leaving the group)."""
        self.health.stopping = True
        self.notifier.stopping()
        try:
            self.unsaved_at_stop = self._snapshot(set(self.next_offset))
            # Closing the consumer revokes every partition; nothing has changed since the
            # snapshots just written, so the revoke does not write them a second time.
            self._snapshotted_for_stop = True
        finally:
            self.transport.close()
            self.notifier.close()
        log.info("stopped")

    def step(self) -> int:
        """One poll and everything it leads to; returns the number of records polled."""
        c = self.config.consumer
        polled = self.transport.poll(c.poll_timeout_ms, c.max_poll_records)
        if self._assign_pending:
            polled = self._complete_assign(polled)
        m = self.metrics
        self._progress()
        if len(polled) == 0:
            self._housekeeping()
            return 0
        self._reachable(True)
        started = time.perf_counter()
        outputs, offsets, emitted_ts = self._process(polled)
        if self._batch_model is not None:  # (one observation per batch, sensor and log work together)
            m.step_seconds.observe(self._batch_model[0])
            m.wavefronts.observe(self._batch_model[1])
        if not self._send(outputs):
            return len(polled)  # stopping with the broker unreachable: nothing committed, nothing lost
        self._unacked.clear()
        # (Not the records of a replay after a restore, which produced no output, and only those
        # with a record timestamp; with alerts only, records without an output of their own count.)
        m.e2e_latency.observe_many(self.clock() - emitted_ts[emitted_ts >= 0] / 1000.0)
        if time.monotonic() - self._last_snapshot >= self.config.state.snapshot_interval_s:
            self._snapshot(set(self.next_offset))
        # Never behind the offset committed before this member took the partition: a replay's
        # batches would move it back, and a crash mid-replay would then emit their events twice.
        offsets = {tp: max(offset, self.emit_from.get(tp, 0)) for tp, offset in offsets.items()}
        if self.transport.commit(offsets):
            self._committed.update(offsets)
        else:
            m.commit_failures.inc()
        m.batch_seconds.observe(time.perf_counter() - started)
        m.batch_events.observe(len(polled))
        self._housekeeping()
        return len(polled)

    def _process(self, polled: Polled) -> tuple[list[OutRecord], dict[TP, int], np.ndarray]:
        """Outputs of a batch, the offsets to commit once they are acknowledged, and the record
        timestamps of the records that are not replays (their outputs are emitted; with alerts
        only, most have none, and count up to the batch's acknowledgement all the same)."""
        m = self.metrics
        n = len(polled)
        self._batch_model = None
        tps = list(zip(polled.topic, polled.partition.tolist()))
        emit_from = np.fromiter((self.emit_from.get(tp, 0) for tp in tps), dtype=np.int64, count=n)
        emit = polled.offset >= emit_from
        emitted_ts = polled.timestamp_ms[emit]
        # An event without a time of its own takes its record's timestamp; a record without one
        # (-1: written in the pre-0.10 format), the time it was polled (the 1970 of a -1 would
        # fill the wrong hour of the time-of-day profile, and zero every log line's gap).
        missing = polled.timestamp_ms < 0
        if missing.any():
            polled_ms = np.int64(self.clock() * 1000.0)
            polled = dataclasses.replace(polled, timestamp_ms=np.where(missing, polled_ms, polled.timestamp_ms))
        if self._start_unknown:
            self._learn_committed([tp for tp in dict.fromkeys(tps) if tp in self._start_unknown])
        offsets: dict[TP, int] = {}
        for tp, off in zip(tps, polled.offset.tolist()):
            offsets[tp] = off + 1  # records of a partition arrive in offset order
        self._unacked.update(offsets)  # (cleared by step() once the outputs are acknowledged)
        self.next_offset.update(offsets)
        for topic in set(polled.topic):
            m.consumed.labels(topic).inc(polled.topic.count(topic))
        outputs: list[OutRecord] = []
        if polled.unreadable:  # (no value to decode: only their coordinates reach the dead letter)
            outputs.extend(self._dead_letters(polled, [(pos, "unreadable", err) for pos, err in polled.unreadable.items()], emit))
            keep = np.ones(n, dtype=bool)
            keep[list(polled.unreadable)] = False
            polled, emit = polled.select(keep), emit[keep]
            tps = list(zip(polled.topic, polled.partition.tolist()))
        if self.logs is not None:
            is_log = np.fromiter((t in self.logs.topics for t in polled.topic), dtype=bool, count=len(polled))
            if is_log.any():
                outputs.extend(self._process_logs(polled.select(is_log), emit[is_log]))
                polled, emit = polled.select(~is_log), emit[~is_log]
                tps = list(zip(polled.topic, polled.partition.tolist()))
        if len(polled) == 0:
            return outputs, offsets, emitted_ts

        dec = self.decoder.decode(polled.value, polled.key, polled.timestamp_ms)
        outputs.extend(self._dead_letters(polled, dec.dead, emit))

        if len(dec.index):
            slots, _new = self.slots.assign(dec.stream, [tps[i] for i in dec.index.tolist()])
            self.slots.touch(slots, self.clock())
            t0 = time.perf_counter()
            res = self.detector.process(slots, dec.x, dec.mask, dec.ts_ms)
            self._model_work(time.perf_counter() - t0, res.wavefronts)
            emitted = emit[dec.index]
            m.replayed.inc(int((~emitted).sum()))
            outputs.extend(self._score_records(polled, dec, res, emitted))
            m.active_streams.set(self._stream_count())
            now_ms = self.clock() * 1000.0
            streams = [s for s, e in zip(dec.stream, emitted.tolist()) if e]
            m.event_lag.observe_many((now_ms - dec.ts_ms[emitted]) / 1000.0, streams)
            m.scores.observe_many(res.score[emitted], streams)
            # (Last: a scrape, or a test, that sees the events counted sees their observations too.)
            m.scored.inc(int(emitted.sum()))
        return outputs, offsets, emitted_ts

    def _model_work(self, seconds: float, wavefronts: int) -> None:
        done = self._batch_model or (0.0, 0)
        self._batch_model = (done[0] + seconds, done[1] + wavefronts)

    def _dead_letters(self, polled: Polled, dead: list[tuple[int, str, str]], emit: np.ndarray) -> list[OutRecord]:
        out = []
        for pos, reason, detail in dead:
            if not emit[pos]:
                # Re-read in a replay: dead-lettered when first read, not again; counted as
                # replayed, so consumed = scored + replayed + dead letters still holds.
                self.metrics.replayed.inc()
                continue
            key, value, original, extra = _fit_dead_letter(
                polled.key[pos],
                polled.value[pos],
                polled.headers[pos],
                self.config.producer.max_request_size - DEAD_LETTER_OVERHEAD,
                self.config.input.max_message_bytes,
            )
            headers: Headers = [
                *original,
                *extra,
                ("streamer.reason", reason.encode()),
                ("streamer.error", detail.encode()[:1000]),
                ("streamer.source.topic", polled.topic[pos].encode()),
                ("streamer.source.partition", str(int(polled.partition[pos])).encode()),
                ("streamer.source.offset", str(int(polled.offset[pos])).encode()),
            ]
            out.append(OutRecord(self.config.topics.dead_letter, key, value, headers))
            self.metrics.dead_letters.labels(reason).inc()
        return out

    def _process_logs(self, polled: Polled, emit: np.ndarray) -> list[OutRecord]:
        assert self.logs is not None
        m = self.metrics
        t0 = time.perf_counter()
        outputs, dead, stats = self.logs.process(polled, emit, self.clock())
        self._model_work(time.perf_counter() - t0, stats["wavefronts"])
        m.replayed.inc(stats["replayed"])
        m.anomalies.labels("log").inc(stats["anomalies"])
        m.event_lag.observe_many((self.clock() * 1000.0 - stats["ts_ms"]) / 1000.0, stats["streams"])
        m.scores.observe_many(stats["scores"], stats["streams"])
        m.active_streams.set(self._stream_count())
        m.scored.inc(stats["scored"])  # (last, as on the sensor path)
        return self._dead_letters(polled, dead, emit) + outputs

    def _score_records(self, polled: Polled, dec: Any, res: Any, emitted: np.ndarray) -> list[OutRecord]:
        topics = self.config.topics
        top = res.top_feature(dec.mask).tolist()
        surprise = res.surprise.tolist()
        score = res.score.tolist()
        anomaly = res.is_anomaly.tolist()
        contrib = res.contributions.tolist()
        present = dec.mask.tolist()
        view = _VIEW_NAMES[np.where(res.valid, res.view, len(VIEWS))].tolist()
        held = _HELD_NAMES[res.held].tolist()
        ts = dec.ts_ms.tolist()
        out: list[OutRecord] = []
        schemas = self.decoder.schemas
        version = self.model_version
        # (Alerts only: the other events' records are not even built.)
        wanted = emitted if topics.scores is not None else emitted & res.is_anomaly
        for j, pos in enumerate(dec.index.tolist()):
            if not wanted[j]:
                continue
            stream = dec.stream[j]
            names = schemas[stream]
            here = present[j]
            record = {
                "kind": "sensor",
                "stream": stream,
                "ts": ts[j],
                "topic": polled.topic[pos],
                "partition": int(polled.partition[pos]),
                "offset": int(polled.offset[pos]),
                "surprise": surprise[j],
                "score": score[j],
                "is_anomaly": anomaly[j],
                "top_feature": names[top[j]] if top[j] >= 0 else None,
                "view": view[j],
                "held": held[j],
                "contributions": {name: c for name, c, p in zip(names, contrib[j], here) if p},
                "model_version": version,
            }
            value = orjson.dumps(record)
            key = stream.encode()
            if topics.scores is not None:
                out.append(OutRecord(topics.scores, key, value))
            if anomaly[j]:
                out.append(OutRecord(topics.alerts, key, value))
        flagged = np.bincount(res.view[res.is_anomaly & emitted], minlength=len(VIEWS))
        for name, count in zip(VIEWS, flagged.tolist()):
            if count:
                self.metrics.anomalies.labels(name).inc(count)
        held_counts = np.bincount(res.held[emitted], minlength=len(HELD))
        for name, count in zip(HELD[1:], held_counts[1:].tolist()):
            if count:
                self.metrics.held.labels(name).inc(count)
        return out

    def _progress(self) -> None:
        """The loop is alive: /healthz and the gauge the StreamerNoProgress alert reads."""
        self.metrics.last_progress.set(self.clock())
        self.health.progress()
        self.notifier.alive(self._status_line)

    def _status_line(self) -> str:
        ready, detail = self.health.readiness()
        owned = len(self.transport.assignment())
        return f"{'ready' if ready else 'not ready'}: {detail}; {owned} partitions, {self._stream_count()} streams"

    def _send(self, outputs: list[OutRecord]) -> bool:
        """Send until acknowledged. Gives up only when asked to stop, returning False."""
        attempt = 0
        while True:
            started = time.monotonic()
            try:
                self.transport.send_batch(outputs)
            except SendError:
                attempt += 1
                self.metrics.send_failures.inc()
                # Waiting out a broker outage is progress for liveness: a restart would not help
                # (send failures have their own alert).
                self._progress()
                # Once asked to stop, a slow failure (an outage: the attempt waited out
                # producer.send_timeout_s) is the last, so that a stop fits its grace period; the
                # batch's events are scored again after the restart (no snapshot covers them). A
                # quick one (a broker that forgot the producer after a restart) is resent at once
                # with a new producer, up to 3 attempts.
                quick = time.monotonic() - started < QUICK_SEND_FAILURE_S
                # Refused, or no answer at all? Only the latter is an unreachable broker (/readyz
                # 503, streamer_broker_reachable 0): a member with a batch in hand never got to
                # the idle probe, and stayed ready through an outage. A quick failure is an answer.
                if not quick and not self.stop_event.is_set():
                    self._probe_brokers(idle=False)
                if self.stop_event.is_set() and (attempt >= 3 or not quick):
                    log.error(
                        "stopping with %d output records unacknowledged; their offsets stay uncommitted",
                        len(outputs),
                        extra={"uncommitted": {f"{t}[{p}]": o for (t, p), o in self.next_offset.items()}},
                    )
                    return False
                time.sleep(min(5.0, 0.2 * 2**attempt))
                continue
            self._reachable(True)
            for topic in {r.topic for r in outputs}:
                self.metrics.output_records.labels(topic).inc(sum(1 for r in outputs if r.topic == topic))
            return True

    def _reachable(self, answered: bool) -> None:
        """Record whether the brokers answered the last look: `streamer_broker_reachable` and
        /readyz (503 while they do not: a caught-up member cut off from its brokers looked healthy,
        with lag 0 from the last high-water marks it had)."""
        if answered:
            self._last_contact = time.monotonic()
            if self.health.unreachable_since is not None:
                log.info("brokers answering again")
            self.health.unreachable_since = None
        elif self.health.unreachable_since is None:
            self.health.unreachable_since = time.monotonic()
            log.warning("no broker answered; scoring resumes when one does")
        self.metrics.broker_reachable.set(1 if answered else 0)

    def _probe_brokers(self, idle: bool = True) -> None:
        """Ask the brokers for the log ends of the held partitions: do they answer? While idle
        every probe_idle_s; after a send that timed out (idle=False) at once. (A failed send is
        not itself counted as no answer: a missing topic or a refused record is an answer, and
        StreamerOutputsNotAcknowledged covers sends.)"""
        now = time.monotonic()
        if not self.emit_from or (idle and now - self._last_contact < self.probe_idle_s):
            return
        answered = self.transport.brokers_answer(list(self.emit_from), timeout_ms=2000)
        self._last_contact = now  # (the next probe waits probe_idle_s either way)
        self._reachable(answered)

    def _maybe_reload(self) -> None:
        """Serve a replaced checkpoint without a restart; keep states only if they still fit."""
        now = time.monotonic()
        if self.watcher is None or now - self._last_reload_check < self.config.detector.reload_check_s:
            return
        self._last_reload_check = now
        failures = self.watcher.failures
        found = self.watcher.poll()
        self.metrics.checkpoint_refused.set(1 if self.watcher.refused else 0)
        if found is None:
            if self.watcher.failures > failures:
                self.metrics.model_reloads.labels("failed").inc()
            return
        model, meta = found
        if str(meta["model_version"]) == self.model_version:
            # The same bytes again (a symlink flipped back and forth, a copy of the file served):
            # nothing to swap, and no reload to count.
            log.debug("checkpoint %s replaced by the model already served (%s)", meta["checkpoint"], self.model_version)
            return
        from streamer.app import publish_model

        try:
            kept = self.detector.swap_model(model)
        except Exception as err:  # noqa: BLE001 - e.g. no memory for the new state bank
            self.metrics.model_reloads.labels("failed").inc()
            self.watcher.refused = True  # (until another file is served: the next checks see no change)
            self.metrics.checkpoint_refused.set(1)
            log.error(
                "new checkpoint %s could not be served, keeping the current model: %s: %s", meta["checkpoint"], type(err).__name__, err
            )
            return
        self.metrics.model_reloads.labels("kept_state" if kept else "reset_state").inc()
        self.model_version = str(meta["model_version"])
        before, self.arch = self.arch, dict(meta["config"])
        self.decoder.max_features = self.detector.max_features
        if not kept:
            # The streams start over, schemas included: a stream wider than the new model's
            # max_features is then refused (too_many_features) instead of overflowing its row.
            wider = sum(len(names) > self.detector.max_features for names in self.decoder.schemas.values())
            if wider:
                log.warning(
                    "the new checkpoint's max_features is %d and %d streams have more features: their events go to the "
                    "dead-letter topic (too_many_features) until a wider model is served",
                    self.detector.max_features,
                    wider,
                )
            self.decoder.schemas.clear()
        publish_model(self.metrics, self.detector, meta)
        if kept:
            log.info(
                "serving new checkpoint %s (%s); kept the state of %d streams", meta["checkpoint"], self.model_version, len(self.slots)
            )
        else:
            # (Which settings differ, so the reset can be told from a mistake: a hidden size typed
            # wrong at training.)
            keys = sorted({*before, *self.arch})
            changed = ", ".join(f"{k} {before.get(k)} -> {self.arch.get(k)}" for k in keys if before.get(k) != self.arch.get(k))
            log.warning(
                "new checkpoint %s (%s) has a different architecture (%s); reset the state of %d streams, which warm up again",
                meta["checkpoint"],
                self.model_version,
                changed or "model settings",
                len(self.slots),
            )

    def _refresh_state_gauges(self) -> None:
        m = self.metrics
        # (Both kinds of stream: streamer_active_streams counts both, and dashboards divide the two.)
        m.state_bytes.set(self.detector.bank.nbytes() + (self.logs.nbytes() if self.logs is not None else 0))
        m.device_memory.set(torch.cuda.memory_allocated(self.detector.device) if self.detector.device.type == "cuda" else 0)
        warm = 0
        if self.slots.slot_of:
            rows = torch.as_tensor(list(self.slots.slot_of.values()), device=self.detector.device)
            warm = int((self.detector.bank.tensors["steps"][rows] < self.detector.calibration.warmup).sum())
        if self.logs is not None:
            warm += self.logs.warming_up()
        m.warming_up.set(warm)

    def _check_replay(self) -> None:
        """Forget partitions whose replay has reached the committed offset, or the end of the
        log: on a compacted or truncated topic the records up to the committed offset may be
        gone (the consumer's position then jumps past a gap, or stays at the end), and no
        record would ever reach it."""
        if self._replaying:
            done = set()
            for tp in self._replaying:
                target = self.emit_from.get(tp, 0)
                position = self.transport.position(tp)
                end = self.transport.highwater(tp)
                reached = self.next_offset.get(tp, 0) >= target or (position is not None and position >= target)
                if reached or (position is not None and end is not None and position >= end):
                    done.add(tp)
            self._replaying -= done
        self.health.replaying = len(self._replaying)

    def _housekeeping(self) -> None:
        self._check_replay()
        self._maybe_reload()
        m = self.metrics
        # The partitions this runner has taken over (emit_from is set when an assignment is
        # completed and cleared on revoke), not the client's assignment: kafka-python keeps the
        # revoked ones in it until the next assignment arrives, and their series came back,
        # frozen, for as long as the daemon ran: summed over the group, lag that was not there.
        for tp in list(self.emit_from):
            hw = self.transport.highwater(tp)
            pos = self.next_offset.get(tp)
            if pos is None:  # nothing polled from it yet: the consumer's position, so it has a series
                pos = self.transport.position(tp)
            if hw is not None and pos is not None:
                m.consumer_lag.labels(tp[0], str(tp[1])).set(max(0, hw - pos))
        self._probe_brokers()
        now = time.monotonic()
        if now - self._last_gauges >= 1.0:
            # O(streams) work: refreshed once a second, not after every batch.
            self._last_gauges = now
            self._refresh_state_gauges()
        if now - self._last_evict >= 60.0:
            self._last_evict = now
            idle = self.slots.idle(self.clock(), self.config.state.idle_evict_s)
            if idle:
                self._drop(idle)
                m.evicted.inc(len(idle))
            if self.logs is not None:
                m.evicted.inc(self.logs.evict_idle(self.clock(), self.config.state.idle_evict_s))
                m.active_streams.set(self._stream_count())
        if self.next_offset and now - self._last_snapshot >= self.config.state.snapshot_interval_s:
            self._snapshot(set(self.next_offset))
