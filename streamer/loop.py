"""The one processing loop: poll, decode, step, emit, wait for acks, snapshot, commit.

Every batch is finished (its outputs acknowledged and its offsets committed) before the next
poll, so a crash at any point loses nothing: uncommitted records are redelivered and scored
again. Which partitions' state is held, restored and snapshotted is streamer.ownership's part;
the records written, streamer.records'.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from models.detector import HELD, VIEWS, BatchResult, Detector
from streamer.config import Config
from streamer.decode import Decoded, Decoder
from streamer.health import LoopHealth
from streamer.logstreams import LogStreams
from streamer.metrics import Metrics
from streamer.ownership import PartitionOwnership
from streamer.records import dead_letter, score_records
from streamer.sdnotify import Notifier
from streamer.state import TP
from streamer.transport import OutRecord, Polled, SendError, Transport

log = logging.getLogger(__name__)
# Streams named in a warning about events on another partition than their state's (`_strays`):
# a producer without keys would otherwise log one line per stream, thousands of them.
STRAY_WARNINGS = 20
# A failed send that took less than this was refused, not timed out: worth resending while
# stopping (see Runner._send).
QUICK_SEND_FAILURE_S = 5.0
# The `held` of a re-delivered event, which the score histogram leaves out.
_DUPLICATE = HELD.index("duplicate")


class Runner(PartitionOwnership):
    """Runs the loop on one consumer: `run()` until `stop()`, or `step()` at a time (tests)."""

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
        self.logs = LogStreams(config) if config.logs.topics else None
        self.stop_event = threading.Event()
        self.ready = threading.Event()
        self.health = LoopHealth(config.metrics.max_stall_s)
        self._init_ownership()
        self._batch_model: tuple[float, int] | None = None  # model seconds and wavefronts of the batch in hand
        self._last_evict = time.monotonic()
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
        self._warned_strays: set[str] = set()  # streams named in a stray-event warning (`_strays`)

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
            self._reachable(True)  # (a completed assignment came from the group coordinator)
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
            event_tps = [tps[i] for i in dec.index.tolist()]
            slots, _new, strays = self.slots.assign(dec.stream, event_tps)
            if strays:
                self._strays(dec.stream, event_tps, strays, emit[dec.index])
            self.slots.touch(slots, self.clock())
            t0 = time.perf_counter()
            # A copy of an event is told by its record's timestamp too (kept by a producer's retry);
            # an event without a time of its own has only that, so it is never taken for one.
            stamps = np.where(dec.own_ts, polled.timestamp_ms[dec.index], -1)
            res = self.detector.process(slots, dec.x, dec.mask, dec.ts_ms, stamps)
            self._model_work(time.perf_counter() - t0, res.wavefronts)
            emitted = emit[dec.index]
            m.replayed.inc(int((~emitted).sum()))
            outputs.extend(self._score_records(polled, dec, res, emitted))
            m.active_streams.set(self._stream_count())
            now_ms = self.clock() * 1000.0
            streams = [s for s, e in zip(dec.stream, emitted.tolist()) if e]
            m.event_lag.observe_many((now_ms - dec.ts_ms[emitted]) / 1000.0, streams)
            # (A duplicate's 0 is not a score: it was scored when it first came. Rare: the stream
            # ids are listed again only for a batch that has one.)
            scored = emitted & (res.held != _DUPLICATE)
            scored_streams = streams if scored.sum() == len(streams) else [s for s, e in zip(dec.stream, scored.tolist()) if e]
            m.scores.observe_many(res.score[scored], scored_streams)
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
            out.append(dead_letter(self.config, polled, pos, reason, detail))
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

    def _score_records(self, polled: Polled, dec: Decoded, res: BatchResult, emitted: np.ndarray) -> list[OutRecord]:
        out = score_records(self.config, polled, dec, res, emitted, self.decoder.schemas, self.model_version)
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

    def _strays(self, streams: list[str], tps: list[TP], strays: list[int], emitted: np.ndarray) -> None:
        """Events of a stream whose state belongs to another partition: a producer that does not
        key each stream by a stable key. They are scored against the one state, which moves with
        the partition it was first seen on (README, Input); counted, and each such stream named
        once in the log (up to STRAY_WARNINGS of them), so an operator sees it before a rebalance
        drops that state under the other partition's events. (Counted once: an event replayed to
        rebuild state after a restore was counted when it was scored.)"""
        self.metrics.stray_events.inc(int(emitted[strays].sum()))
        for i in strays:
            stream = streams[i]
            if stream in self._warned_strays or len(self._warned_strays) >= STRAY_WARNINGS:
                continue
            self._warned_strays.add(stream)
            owner, tp = self.slots.owner[stream], tps[i]
            log.warning(
                "stream %r arrives on %s[%d] but its state belongs to %s[%d]: produce each stream with a stable key%s",
                stream,
                tp[0],
                tp[1],
                owner[0],
                owner[1],
                " (no more such warnings: streamer_events_stray_total counts them)" if len(self._warned_strays) == STRAY_WARNINGS else "",
                extra={"stream": stream, "topic": tp[0], "partition": tp[1]},
            )

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
                self._progress()  # (and again before the next attempt: the probe and back-off took up to 7 s)
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
