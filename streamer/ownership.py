"""Partition ownership: the state of a partition's streams follows the partition.

On assign, a partition's snapshot is loaded and the consumer seeks to the snapshot's offset;
records between it and the committed offset are stepped to rebuild state but not emitted again
(their scores were acknowledged before that commit). On revoke, the partition's streams are
snapshotted and dropped. Snapshots are written only for partitions whose outputs are all
acknowledged, at the offsets processed so far, and record the committed offset they were
written against, which tells a snapshot ahead of its commit from an operator's offset reset.

A mixin of streamer.loop.Runner: it shares the runner's consumer, detector and metrics, and
owns the per-partition bookkeeping set up by `_init_ownership`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from models.detector import Detector
from streamer.config import Config
from streamer.decode import Decoder
from streamer.health import LoopHealth
from streamer.logstreams import LogStreams
from streamer.metrics import Metrics
from streamer.state import TP, SlotTable, Snapshot, SnapshotStore, recorded_committed
from streamer.transport import COMMITTED_TIMEOUT_MS, Polled, Transport

log = logging.getLogger(__name__)
# How long the commit of restored snapshots' offsets may wait at an assignment.
COMMIT_RESTORED_TIMEOUT_MS = 5_000
# How long a partition's committed offset is asked for again, when its first records arrive
# after the coordinator did not give it at the assignment (unknown still: the two-batch rule).
LEARN_COMMITTED_TIMEOUT_MS = 2_000


class PartitionOwnership:
    # Set by the runner.
    config: Config
    transport: Transport
    detector: Detector
    metrics: Metrics
    clock: Callable[[], float]
    arch: dict[str, Any]
    decoder: Decoder
    logs: LogStreams | None
    health: LoopHealth
    ready: threading.Event

    def _init_ownership(self) -> None:
        self.slots = SlotTable()
        self.store = SnapshotStore(self.config.state.dir, self.config.consumer.group_id)
        self.next_offset: dict[TP, int] = {}
        self.emit_from: dict[TP, int] = {}
        self.log_ids: dict[TP, str | None] = {}
        self._pending_assign: list[TP] = []
        self._assign_pending = False
        # Partitions whose state has stepped past outputs not yet acknowledged: a snapshot of them
        # would record an offset beyond what a restart may skip, so none is written until the
        # send succeeds (a failed one leaves the previous snapshot, and the batch is scored again).
        self._unacked: set[TP] = set()
        # Partitions restored from a snapshot older than their committed offset: the events in
        # between are being scored again (no outputs) to rebuild state. Not ready until done: a
        # rolling update that moved on would leave the group with cold-ish state and lag.
        self._replaying: set[TP] = set()
        # The offset this member last committed (or found committed at assignment) per partition:
        # snapshots record it, which tells a snapshot ahead of its commit from an offset reset.
        self._committed: dict[TP, int | None] = {}
        # Partitions whose committed offset the coordinator did not give at assignment: asked
        # again when their first records arrive (the client has then had it from the
        # coordinator), so that their snapshots record it and commits failing since do not leave
        # snapshots that read as an older build's. (The first offset polled is no stand-in: a
        # transaction marker or a compacted record at the committed offset puts it past it.)
        self._start_unknown: set[TP] = set()
        self._last_snapshot = time.monotonic()
        self._snapshotted_for_stop = False

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
            slots, _, _ = self.slots.assign(snap.streams, [tp] * len(snap.streams))
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
