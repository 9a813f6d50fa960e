"""The transport seam: everything the loop needs from Kafka, behind one small interface.

The loop only polls columns, sends a batch and waits for its acks, commits offsets, and reads
high-water marks; partition assignment arrives through two callbacks. kafka-python is the
default client. Its producer tops out around 28-36k msg/s on two cores (README, Benchmarks),
so a faster client (for example confluent-kafka) can be added as another class with the same
methods without touching the loop.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import CommitFailedError, CorruptRecordError, KafkaError
from kafka.structs import MemberState, OffsetAndMetadata

from streamer.config import Config

log = logging.getLogger(__name__)

# poll() pacing while kafka-python busy-waits (KafkaPythonTransport.poll).
_SPIN_CPU_SHARE = 0.5
_SPIN_MIN_WALL_S = 0.005
_SPIN_POLL_MS = 10
_SETTLED_POLLS = 3
# How long the committed offsets of newly assigned partitions are waited for, all together.
COMMITTED_TIMEOUT_MS = 10_000

# Header values may be null in Kafka (other clients write them; kafka-python reads them back).
Headers = list[tuple[str, bytes | None]]
TP = tuple[str, int]


@dataclass
class Polled:
    """One poll's records as columns, in offset order within each partition."""

    topic: list[str]
    partition: np.ndarray  # int32
    offset: np.ndarray  # int64
    timestamp_ms: np.ndarray  # int64, the record timestamp; -1 where the record has none
    key: list[bytes | None]
    value: list[bytes | None]
    headers: list[Headers]
    # Records the client could not parse (a header name that is not UTF-8, a batch failing its
    # CRC): position -> the client's error. Only their coordinates are known; the loop
    # dead-letters them so that the offset is passed and committed.
    unreadable: dict[int, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.value)

    def select(self, keep: np.ndarray) -> Polled:
        idx = np.flatnonzero(keep).tolist()
        new_pos = {old: new for new, old in enumerate(idx)}
        return Polled(
            [self.topic[i] for i in idx],
            self.partition[keep],
            self.offset[keep],
            self.timestamp_ms[keep],
            [self.key[i] for i in idx],
            [self.value[i] for i in idx],
            [self.headers[i] for i in idx],
            {new_pos[i]: err for i, err in self.unreadable.items() if i in new_pos},
        )


def _columns(batches: dict[Any, list[Any]]) -> Polled:
    """kafka-python's {partition: [ConsumerRecord]} as columns."""
    topic: list[str] = []
    part: list[int] = []
    off: list[int] = []
    ts: list[int] = []
    key: list[bytes | None] = []
    value: list[bytes | None] = []
    headers: list[Headers] = []
    for tp, recs in batches.items():
        n = len(recs)
        topic.extend([tp.topic] * n)
        part.extend([tp.partition] * n)
        off.extend(r.offset for r in recs)
        # (Records of the pre-0.10 message format carry no timestamp: None here, -1 on the wire.)
        ts.extend(-1 if r.timestamp is None else r.timestamp for r in recs)
        key.extend(r.key for r in recs)
        value.extend(r.value for r in recs)
        headers.extend(list(r.headers or ()) for r in recs)
    return Polled(
        topic,
        np.asarray(part, dtype=np.int32),
        np.asarray(off, dtype=np.int64),
        np.asarray(ts, dtype=np.int64),
        key,
        value,
        headers,
    )


@dataclass(frozen=True)
class OutRecord:
    topic: str
    key: bytes | None
    value: bytes | None  # None only for a dead-lettered tombstone, which keeps its null value
    headers: Headers | None = None


class SendError(Exception):
    """Some output records were not acknowledged; nothing in the batch may be committed."""


class Transport(Protocol):
    def subscribe(self, topics: Sequence[str], on_assign: Callable[[list[TP]], None], on_revoke: Callable[[list[TP]], None]) -> None: ...
    def poll(self, timeout_ms: int, max_records: int) -> Polled: ...
    def send_batch(self, records: Sequence[OutRecord]) -> None: ...
    def commit(self, offsets: dict[TP, int], timeout_ms: int | None = None) -> bool: ...
    def committed(self, tps: list[TP], timeout_ms: int = COMMITTED_TIMEOUT_MS) -> dict[TP, int | None]: ...
    def seek(self, tp: TP, offset: int) -> None: ...
    def highwater(self, tp: TP) -> int | None: ...
    def topic_id(self, topic: str) -> str | None: ...
    def position(self, tp: TP) -> int | None: ...
    def brokers_answer(self, tps: list[TP], timeout_ms: int) -> bool: ...
    def log_starts(self, tps: list[TP], timeout_ms: int) -> dict[TP, int] | None: ...
    def assignment(self) -> list[TP]: ...
    def close(self) -> None: ...


class _Listener(ConsumerRebalanceListener):
    def __init__(self, on_assign: Callable[[list[TP]], None], on_revoke: Callable[[list[TP]], None]) -> None:
        self._on_assign = on_assign
        self._on_revoke = on_revoke

    def on_partitions_revoked(self, revoked: Any) -> None:
        self._on_revoke(sorted((tp.topic, tp.partition) for tp in revoked))

    def on_partitions_assigned(self, assigned: Any) -> None:
        self._on_assign(sorted((tp.topic, tp.partition) for tp in assigned))


class KafkaPythonTransport:
    """kafka-python consumer (auto-commit off) plus an acks=all producer."""

    def __init__(self, config: Config) -> None:
        self._config = config
        conn = config.kafka.client_options()
        c = config.consumer
        self._consumer = KafkaConsumer(
            **conn,
            group_id=c.group_id,
            group_instance_id=c.group_instance_id,
            enable_auto_commit=False,
            auto_offset_reset=c.auto_offset_reset,
            session_timeout_ms=c.session_timeout_ms,
            heartbeat_interval_ms=c.heartbeat_interval_ms,
            max_poll_interval_ms=c.max_poll_interval_ms,
            max_poll_records=c.max_poll_records,
            fetch_max_bytes=c.fetch_max_bytes,
            max_partition_fetch_bytes=c.max_partition_fetch_bytes,
        )
        self._producer: KafkaProducer | None = self._new_producer()
        self._spinning = False
        self._calm = 0
        self._suspect = 0  # busy empty polls in a row with a heartbeat overdue
        self._paced_logged = (False, -math.inf)  # the pacing state last logged, and when

    def _new_producer(self) -> KafkaProducer:
        p = self._config.producer
        return KafkaProducer(
            **self._config.kafka.client_options(),
            acks=p.acks,
            linger_ms=p.linger_ms,
            batch_size=p.batch_size,
            compression_type=p.compression_type,
            max_request_size=p.max_request_size,
            # send() blocks for metadata up to max_block_ms (60 s by default): bounded like the
            # rest of an attempt, so that one attempt stays within send_timeout_s.
            max_block_ms=int(p.send_timeout_s * 1000),
            # Building one waits for a broker to bootstrap from, 30 s by default whatever else is
            # set: a rebuild with no broker reachable took 30 s with send_timeout_s at 5, and one
            # whose broker came back near the end had a whole attempt left after it.
            bootstrap_timeout_ms=int(p.send_timeout_s * 1000),
        )

    def subscribe(self, topics: Sequence[str], on_assign: Callable[[list[TP]], None], on_revoke: Callable[[list[TP]], None]) -> None:
        def assigned(tps: list[TP]) -> None:
            self._forget_offset_fetches()
            on_assign(tps)

        self._consumer.subscribe(list(topics), listener=_Listener(assigned, on_revoke))

    def poll(self, timeout_ms: int, max_records: int) -> Polled:
        """One poll, paced while the client spins.

        kafka-python 3 busy-waits inside poll() while a heartbeat is overdue, that is as long as
        the group coordinator does not answer (a hung or cut-off broker, not a refused
        connection): the wait for fetches shrinks to the time left before the next heartbeat,
        which stays 0. A caught-up daemon then burned half to two thirds of a core doing
        nothing for as long as the outage lasted. An empty poll that used more CPU than half
        its wall time (the whole process's CPU, the client's network thread included) while a
        heartbeat is overdue, three times in a row, is taken for that. From then on each poll waits at most
        `_SPIN_POLL_MS` and the rest of `timeout_ms` is slept (not after a poll that returned
        records), until `_SETTLED_POLLS` polls in a row were calm: waited their short time
        without burning CPU, or found the heartbeats answered. Records alone do not end it: a
        hung coordinator can sit beside partition leaders that still serve fetches. Nothing
        that could arrive is held back for long: fetches run on the client's network thread
        meanwhile, and a record waits at most one sleep."""
        wait_ms = min(timeout_ms, _SPIN_POLL_MS) if self._spinning else timeout_ms
        t0, c0 = time.monotonic(), time.process_time()
        try:
            got = self._consumer.poll(timeout_ms=wait_ms, max_records=max_records)
        except CorruptRecordError as err:
            return self._around_unreadable(err)
        wall, cpu = time.monotonic() - t0, time.process_time() - c0
        busy = wall >= _SPIN_MIN_WALL_S and cpu > _SPIN_CPU_SHARE * wall
        if not self._spinning:
            # Three such polls in a row: under load (a backlog, a busy process) one empty poll
            # can burn CPU while a heartbeat is briefly late, and pacing then would slow the
            # catch-up.
            self._suspect = self._suspect + 1 if busy and not got and self._heartbeat_overdue() else 0
            if self._suspect >= _SETTLED_POLLS:
                self._pace(True)
        else:
            # (Calm: a short poll that burnt no CPU, or heartbeats answered again; the process's
            # other threads can keep it busy when nothing spins.)
            calm = (not busy and wall < 5 * _SPIN_POLL_MS / 1000) or not self._heartbeat_overdue()
            self._calm = self._calm + 1 if calm else 0
            if self._calm >= _SETTLED_POLLS:
                self._pace(False)
            elif not got:
                time.sleep(max(timeout_ms / 1000 - wall, 0.0))
        self._say_pacing()
        return _columns(got)

    def _heartbeat_overdue(self) -> bool:
        """Whether the group coordinator owes the client a heartbeat answer: the condition under
        which kafka-python spins (private state of kafka-python 3, covered by the hung-broker
        test). The CPU share alone also took an empty poll beside busy threads of the same
        process (the demo's feed and live view) for a spin, and slowed the demo by a third."""
        coordinator = getattr(self._consumer, "_coordinator", None)
        try:
            return bool(coordinator is not None and coordinator.state is MemberState.STABLE and coordinator.time_to_next_heartbeat() <= 0)
        except Exception:  # noqa: BLE001 - another client version: no pacing rather than a crash
            return False

    def _pace(self, spinning: bool) -> None:
        if spinning != self._spinning:
            log.debug("pacing polls" if spinning else "polling normally")
        self._spinning = spinning
        self._calm = 0
        self._suspect = 0

    def _say_pacing(self) -> None:
        """Log the pacing state when it differs from the last one logged, once a minute at most:
        an outage where the client spins and settles by turns would otherwise log a pair of
        lines every second, and the last line logged always tells the state now, give or take
        a minute."""
        now = time.monotonic()
        if self._spinning == self._paced_logged[0] or now - self._paced_logged[1] < 60.0:
            return
        if self._spinning:
            log.warning("the Kafka client is busy-waiting with nothing to read (a coordinator not answering): pacing polls")
        else:
            log.info("the Kafka client settled: polling normally")
        self._paced_logged = (self._spinning, now)

    def _around_unreadable(self, err: CorruptRecordError) -> Polled:
        """The next record of the partition the client could not parse, as `unreadable`, with
        the consumer moved past it.

        kafka-python raises without naming the partition or the offset, and raises again at every
        later poll: one such record (a header name that is not UTF-8, which Java clients read with
        replacement characters) stopped the daemon on every restart. The fetcher's records in
        hand name the partition (private state of kafka-python 3; tests/test_dead_letters.py
        checks it through a real broker), and its position is the first record not returned.
        The client parses a record batch from its start, so the records after the bad one in the
        same batch cannot be read either: each is dead-lettered in turn (they stay in the source
        topic at the offsets the dead letters name). Where the partition cannot be found, the
        error is raised as before."""
        part = getattr(getattr(self._consumer, "_fetcher", None), "_next_partition_records", None)
        tp = getattr(part, "topic_partition", None)
        if not isinstance(tp, TopicPartition) or tp not in self._consumer.assignment():
            raise err
        offset = self._consumer.position(tp)
        where = getattr(part, "next_fetch_offset", offset)
        detail = str(err) if where == offset else f"in the same record batch as an unreadable record before it: {err}"
        log.warning("unreadable record at %s[%d] offset %d, dead-lettered: %s", tp.topic, tp.partition, offset, detail)
        self._consumer.seek(tp, offset + 1)  # (also discards the fetcher's broken records)
        return Polled(
            [tp.topic],
            np.array([tp.partition], dtype=np.int32),
            np.array([offset], dtype=np.int64),
            np.array([-1], dtype=np.int64),
            [None],
            [None],
            [[]],
            {0: detail},
        )

    def send_batch(self, records: Sequence[OutRecord]) -> None:
        """Send and wait for every ack. On any Kafka error (including one raised by send() itself,
        such as a record over max_request_size, or no broker to bootstrap a new producer from)
        the producer is dropped and the next call builds a new one (kafka-python's idempotent
        producer never recovers from a broker that lost its memory), and SendError is raised so
        the caller resends the whole batch."""
        limit = self._config.producer.send_timeout_s
        # One attempt takes at most 2 x send_timeout_s, the bound the watchdog and the stop budget
        # are computed from: a rebuild, the sends' wait for metadata and the wait for acks take
        # at most send_timeout_s each, and the acks get what is left of the two.
        end = time.monotonic() + 2 * limit
        try:
            if self._producer is None:  # the last rebuild found no broker
                self._producer = self._new_producer()
            producer = self._producer
            futures = [producer.send(r.topic, value=r.value, key=r.key, headers=r.headers) for r in records]
            acked_by = min(time.monotonic() + limit, end)
            producer.flush(timeout=max(0.0, acked_by - time.monotonic()))
            for f in futures:
                f.get(timeout=max(0.0, acked_by - time.monotonic()))
        except (KafkaError, AssertionError) as err:
            log.warning("output batch not acknowledged (%s); the next attempt uses a new producer", err)
            self._drop_producer()
            raise SendError(str(err)) from err

    def _drop_producer(self) -> None:
        """Close the failed producer; the next send builds a new one. (Not here: with no broker
        reachable, building one blocks up to send_timeout_s, and an attempt plus a rebuild
        outside it would outlast the loop's max_stall_s without a word of progress.)"""
        producer, self._producer = self._producer, None
        if producer is not None:
            _close_producer(producer, 1.0)

    def commit(self, offsets: dict[TP, int], timeout_ms: int | None = None) -> bool:
        """Synchronous commit; False (not an exception) when the group rebalanced under us, or
        when it did not complete within timeout_ms (None: the client's request timeout)."""
        if not offsets:
            return True
        meta = {TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()}
        try:
            self._consumer.commit(meta, timeout_ms=timeout_ms)
            return True
        except CommitFailedError as err:
            log.warning("offset commit failed, records will be redelivered: %s", err)
            return False
        except KafkaError as err:
            log.warning("offset commit failed: %s", err)
            return False

    def committed(self, tps: list[TP], timeout_ms: int = COMMITTED_TIMEOUT_MS) -> dict[TP, int | None]:
        """The group's committed offsets of the partitions the coordinator answered for within
        timeout_ms together (None: it has none); a partition left out went unanswered.
        Without a limit a coordinator that hung right after an assignment held the loop, and so
        the liveness probe and the watchdog, for as long as it hung; a limit per partition
        still held it for ten seconds times the partitions. Partition by partition, so that a
        slow coordinator's answers so far are kept: asked together, one late answer lost all."""
        deadline = time.monotonic() + timeout_ms / 1000
        out: dict[TP, int | None] = {}
        for tp in tps:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                break
            try:
                out[tp] = self._consumer.committed(TopicPartition(*tp), timeout_ms=left_ms)
            except KafkaError:
                break
        return out

    def _forget_offset_fetches(self) -> None:
        """At each assignment, drop the committed-offset requests kafka-python keeps from earlier
        ones, answered or not.

        It caches each request under the partitions it asked for and removes it only when a
        later call for the same partitions finds it finished, so a request that timed out and
        was answered late stayed there, unbounded in age: asked for that partition at a later
        assignment (another member having moved its offset on since), it returned the old
        offset as if it were current, and a snapshot behind the group was restored and its
        events emitted again (or the consumer's own position refresh, which shares the cache,
        sought there). Cleared from the rebalance listener, which runs on kafka-python's I/O
        thread before that refresh and before the runner asks: a request of this assignment
        answered late is still used by the second ask (`Runner._learn_committed`)."""
        futures = getattr(getattr(self._consumer, "_coordinator", None), "_offset_fetch_futures", None)
        if isinstance(futures, dict):
            futures.clear()

    def seek(self, tp: TP, offset: int) -> None:
        self._consumer.seek(TopicPartition(*tp), offset)

    def highwater(self, tp: TP) -> int | None:
        return self._consumer.highwater(TopicPartition(*tp))

    def topic_id(self, topic: str) -> str | None:
        """The topic's UUID from cluster metadata: it changes when a topic is recreated (or a
        memory-only broker restarts), which invalidates offsets stored anywhere else."""
        cluster = getattr(getattr(self._consumer, "_client", None), "cluster", None)
        try:
            tid = cluster.topic_id(topic) if cluster is not None else None
        except Exception:  # noqa: BLE001 - private API of kafka-python; absence only disables the check
            return None
        return str(tid) if tid is not None else None

    def position(self, tp: TP) -> int | None:
        try:
            return self._consumer.position(TopicPartition(*tp), timeout_ms=0)
        except (KafkaError, TypeError):
            return None

    def brokers_answer(self, tps: list[TP], timeout_ms: int) -> bool:
        """Whether the brokers answer a request about these partitions (their log ends: a round
        trip, unlike an empty poll) within timeout_ms."""
        try:
            self._consumer.end_offsets([TopicPartition(*tp) for tp in tps], timeout_ms=timeout_ms)
        except KafkaError:
            return False
        return True

    def log_starts(self, tps: list[TP], timeout_ms: int) -> dict[TP, int] | None:
        """The first offset each partition still holds (retention deletes from the front), or
        None when the brokers do not say within timeout_ms."""
        try:
            starts = self._consumer.beginning_offsets([TopicPartition(*tp) for tp in tps], timeout_ms=timeout_ms)
        except KafkaError:
            return None
        return {(tp.topic, tp.partition): int(o) for tp, o in starts.items() if o is not None}

    def assignment(self) -> list[TP]:
        return sorted((tp.topic, tp.partition) for tp in self._consumer.assignment())

    def close(self) -> None:
        try:
            if self._producer is not None:
                _close_producer(self._producer, 5.0)
        finally:
            self._consumer.close()


def _close_producer(producer: KafkaProducer, timeout_s: float) -> None:
    """Close a producer even with records pending that no broker takes. kafka-python's close()
    flushes first and raises there, before it stops its network thread: each failed attempt of
    an outage left one running, and its __del__ printed the same error as an "Exception ignored"
    traceback outside the log. Its sender is then stopped without sending (the records fail; the
    batch is resent whole by the caller), and the close completes."""
    try:
        producer.close(timeout=timeout_s)
        return
    except Exception:  # (KafkaError, or the AssertionError kafka-python raises at times)
        log.debug("closing the producer raised; stopping its sender without sending", exc_info=True)
    # (kafka-python has no public abort.) The sender aborts what is pending when its loop ends; a
    # sender already dead never will, and the second close would wait and raise again.
    sender = getattr(producer, "_sender", None)
    if sender is not None:
        sender.force_close()
        sender.join(1.0)
        accumulator = getattr(producer, "_accumulator", None)
        if not sender.is_alive() and accumulator is not None:
            accumulator.abort_incomplete_batches()
    try:
        producer.close(timeout=1.0)
    except Exception:
        log.debug("closing the producer raised again", exc_info=True)
