"""Stream state owned by partitions: the slot table and the per-partition snapshots.

The detector's state bank only has rows. This module decides which stream owns which row,
which partition owns which stream (the partition it was first seen on, as with keyed
producers), and writes each partition's streams to a snapshot file tagged with the offset it
covers. A snapshot plus replay from its offset rebuilds exact state after a restart or a
rebalance, the way Kafka Streams restores a store from its changelog.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.adapt import GAP_FIELDS, PROFILE_BINS
from models.detector import CAL_HISTS, CAL_HISTS_LONG
from models.gru import save_atomically
from models.recurrence import RECUR_FIELDS
from models.repeats import REPEAT_FIELDS
from models.state import with_empty_fields

TP = tuple[str, int]
# Layout versions: 2 online adaptation (profile, mixture, second histogram); 3 the recent level and
# a third histogram; 4 the recent mean and a fourth histogram; 5 the correlation view (error
# correlations and a fifth histogram); 6 a long-memory histogram per view; 7 the alert hold-off;
# 8 the memory of recurring events; 9 and 10 each feature's first hour, for the profile's revisits;
# 11 the previous event's time and the usual interval, for gaps; 12 the count of recent alerts,
# for the calibration's learning; 13 each feature's own error history, for the per-feature view;
# 14 the count of recent runs of flags and whether the last event was flagged, in place of 12's
# alerts; 15 each feature's last reading, run of repeats and counts of repeats, for the repeat
# view; 16 the bin of the last run of flags' first event in each short history, for the cap on
# what a flag teaches it; 17 the previous event's features and stamp, for duplicates; 18 whether a
# constant stream has woken up; 19 the events left of the last flagged episode's tail, which the
# long histories do not learn. Layouts 4 to 18 are upgraded on load (see `_upgrade`).
SNAPSHOT_VERSION = 19
UPGRADABLE = (4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18)
log = logging.getLogger(__name__)


class SlotTable:
    """Stream id to bank row, with a free list so evicted rows are reused."""

    def __init__(self) -> None:
        self.slot_of: dict[str, int] = {}
        self.owner: dict[str, TP] = {}
        self._free: list[int] = []
        self._next = 0
        self.last_seen = np.zeros(1024, dtype=np.float64)

    def __len__(self) -> int:
        return len(self.slot_of)

    def _new_slot(self) -> int:
        if self._free:
            return self._free.pop()
        slot = self._next
        self._next += 1
        if slot >= len(self.last_seen):
            self.last_seen = np.concatenate([self.last_seen, np.zeros_like(self.last_seen)])
        return slot

    def assign(self, streams: list[str], tps: list[TP]) -> tuple[np.ndarray, list[int], list[int]]:
        """Slots for the streams (allocating new ones); also returns the newly allocated slots and
        the strays: indices of events whose stream's state belongs to another partition than
        theirs (the stream is stepped all the same: its state is one, whichever partition an event
        came through)."""
        slots = np.empty(len(streams), dtype=np.int64)
        new: list[int] = []
        strays: list[int] = []
        slot_of, owner = self.slot_of, self.owner
        for i, stream in enumerate(streams):
            slot = slot_of.get(stream)
            if slot is None:
                slot = self._new_slot()
                slot_of[stream] = slot
                owner[stream] = tps[i]
                new.append(slot)
            elif owner[stream] != tps[i]:
                strays.append(i)
            slots[i] = slot
        return slots, new, strays

    def touch(self, slots: np.ndarray, now: float | np.ndarray) -> None:
        self.last_seen[slots] = now

    def streams_of(self, tps: set[TP]) -> list[str]:
        return [s for s, tp in self.owner.items() if tp in tps]

    def idle(self, now: float, max_idle_s: float) -> list[str]:
        return [s for s, slot in self.slot_of.items() if now - self.last_seen[slot] > max_idle_s]

    def release(self, streams: list[str]) -> list[int]:
        freed = []
        for s in streams:
            slot = self.slot_of.pop(s, None)
            self.owner.pop(s, None)
            if slot is not None:
                freed.append(slot)
        self._free.extend(freed)
        return freed


@dataclass
class Snapshot:
    offset: int  # the next offset to process: the snapshot covers everything before it
    streams: list[str]
    schemas: list[list[str]]
    state: dict[str, torch.Tensor]
    arch: dict[str, Any]
    topic_id: str | None = None  # the log the offset refers to
    # Seconds each stream had been silent when the snapshot was written (None: an older file).
    # Restored as that much idle time, so eviction counts silence across restarts and
    # rebalances (not the time the daemon was down: a stream is not idle while nobody reads it).
    idle_s: list[float] | None = None
    # The group's committed offset as this member last knew it when writing (None: an older
    # file). A snapshot ahead of the committed offset at the next start is this member's own
    # work (the commits after it failed, or a crash came first) only if the committed offset is
    # still this one; otherwise it was moved (an offset reset) and the snapshot must not hide it.
    committed: int | None = None


class SnapshotStore:
    """One file per input partition under state_dir/group_id, replaced atomically."""

    def __init__(self, state_dir: str | Path, group_id: str) -> None:
        self.root = Path(state_dir) / group_id
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, tp: TP) -> Path:
        return self.root / f"{tp[0]}-{tp[1]}.pt"

    def save_payload(self, tp: TP, payload: dict[str, Any]) -> int:
        """Write any snapshot dict (tensors and plain values only) atomically and durably."""
        path = self.path(tp)
        # (Two members sharing a state dir, a zombie's revoke snapshot landing on the new owner's
        # periodic one, each write through a temp file of their own.)
        save_atomically(payload, path)
        return path.stat().st_size

    def load_payload(self, tp: TP) -> dict[str, Any] | None:
        """The partition's snapshot dict, or None when absent or unreadable (loaded weights_only)."""
        path = self.path(tp)
        if not path.exists():
            return None
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - a corrupt snapshot means a cold start, not a crash
            log.warning("ignoring unreadable snapshot %s: %s: %s", path, type(err).__name__, err)
            return None
        return payload if isinstance(payload, dict) else None

    def save(self, tp: TP, snap: Snapshot) -> int:
        payload = {
            "version": SNAPSHOT_VERSION,
            "offset": snap.offset,
            "streams": snap.streams,
            "schemas": snap.schemas,
            "state": snap.state,
            "arch": snap.arch,
            "topic_id": snap.topic_id,
            "idle_s": snap.idle_s,
            "committed": snap.committed,
        }
        return self.save_payload(tp, payload)

    def load(self, tp: TP, arch: dict[str, Any]) -> Snapshot | None:
        """The partition's snapshot, or None when absent, unreadable or for another architecture."""
        payload = self.load_payload(tp)
        if payload is None:
            return None
        state = payload["state"] if isinstance(payload.get("state"), dict) else {}
        version = payload.get("version")
        if payload.get("arch") != arch or (version != SNAPSHOT_VERSION and version not in UPGRADABLE):
            log.warning("ignoring snapshot %s: written for another model architecture or state layout; streams restart cold", self.path(tp))
            return None
        if version != SNAPSHOT_VERSION:
            try:
                state = _upgrade(state, int(version))
            except KeyError as err:  # a field its layout had is missing: not a snapshot this code wrote
                log.warning("ignoring snapshot %s: layout %s without field %s; streams restart cold", self.path(tp), version, err)
                return None
            except (AttributeError, TypeError, ValueError, IndexError, RuntimeError) as err:
                # A field that is not the tensor its layout had (a list, a number): nor this, and
                # raising here would stop the assignment, at every restart, for as long as it lies there.
                log.warning(
                    "ignoring snapshot %s: layout %s with a field that does not read (%s); streams restart cold",
                    self.path(tp),
                    version,
                    err,
                )
                return None
            log.info("upgraded snapshot %s from state layout %s", self.path(tp), version)
        offset, streams, schemas = payload.get("offset"), payload.get("streams"), payload.get("schemas")
        if not (
            isinstance(offset, int)
            and not isinstance(offset, bool)
            and offset >= 0
            and isinstance(streams, list)
            and all(isinstance(s, str) for s in streams)
            and len(set(streams)) == len(streams)  # (one row each: a stream twice would import over itself)
            and isinstance(schemas, list)
            and len(schemas) == len(streams)
            and all(isinstance(names, list) and all(isinstance(n, str) for n in names) for names in schemas)
        ):
            log.warning("ignoring snapshot %s: no offset, streams or schemas in this code's format; streams restart cold", self.path(tp))
            return None
        return Snapshot(
            offset,
            streams,
            schemas,
            state,
            payload["arch"],
            payload.get("topic_id"),
            idle_ages(payload, len(streams)),
            recorded_committed(payload),
        )


def recorded_committed(payload: dict[str, Any]) -> int | None:
    """The committed offset a snapshot (sensor or log) was written against, or None where it has
    none that reads as one (an older file)."""
    committed = payload.get("committed")
    return committed if isinstance(committed, int) and not isinstance(committed, bool) else None


def idle_age(x: Any) -> float | None:
    """One stream's idle seconds as a snapshot stored them, or None where it is not a number."""
    return max(0.0, float(x)) if isinstance(x, (int, float)) and x == x else None


def idle_ages(payload: dict[str, Any], n: int) -> list[float] | None:
    """A snapshot's per-stream idle seconds, or None where it has none that fit (an older file)."""
    idle = payload.get("idle_s")
    if not isinstance(idle, list) or len(idle) != n:
        return None
    ages = [idle_age(x) for x in idle]
    return [a for a in ages if a is not None] if None not in ages else None


def _upgrade(state: dict[str, torch.Tensor], version: int) -> dict[str, torch.Tensor]:
    """A snapshot of an older layout in the current one, every stream's state kept.

    An upgrade should not cold-start every stream (a day of profile and calibration history):
    everything the old layout held keeps its meaning. Layout 5's correlation view starts empty,
    as on a new stream (it applies only once its correlations rest on CORR_MIN events). Layout
    6's long-memory histograms start as copies of the short ones: the best record of the
    stream's history there is, and an empty one would rank every event as ordinary until it
    filled, silencing the stream. Layout 7's hold-off starts off, as if no alert were recent,
    and layout 8's memory of recurring events empty, as if nothing had been flagged on earlier
    days. Layout 10 keeps each feature's first hour, at 0 (long ago) from older layouts: the
    profile then counts the next events as revisits, so a stream that ran for days has its
    profile view back within two hours. Layout 9 as first written (one commit's life) marked
    revisits by the last event's hour (`prof_last`), which out-of-order timestamps fooled: its
    marks are cleared. Written by the next two commits, layout 9 already held `prof_start` and
    is kept as it is. Layout 11's gap fields start empty, as on a new stream: no event is taken
    for one after a gap until the stream's usual interval is known again. Layout 14's count of
    recent runs of flags starts from layouts 12 and 13's count of recent alerts (each alert
    began a run; the few runs the hold-off hid are missed) and at 0 before them, as if none were
    recent, and the last event is taken as not flagged. Layout 13's per-feature histories start
    empty, as on a new stream: the view applies once they hold half a warm-up of events. Layout
    15's repeat fields start empty, as on a new stream: each feature's next reading starts its
    run, and the view judges it once its counts hold half a warm-up of readings. Layout 16's
    bins of the last run's first event start at 0, as if none: the next such run is capped, as
    every flag was before. Layout 17's features and stamp of the previous event start empty: the
    next event of each stream is not taken for a duplicate. Layout 18's wake-up mark starts at
    0: no stream has restarted its warm-up yet (one constant so far may still). Layout 19's
    count of an episode's tail starts at 0, as after none: a stream restored inside one learns
    the rest of its tail, as every stream did before."""
    if version <= 4:
        state = with_empty_fields(state, ("corr_cov", "corr_n", "cal_hist_corr"))
    if version <= 5:
        state = {**state, **{long: state[short].clone() for short, long in zip(CAL_HISTS, CAL_HISTS_LONG)}}
    if version <= 6:
        state = with_empty_fields(state, ("hold_left", "hold_score"))
    if version <= 7:
        state = with_empty_fields(state, RECUR_FIELDS)
    if version == 9 and "prof_last" in state:
        state = {k: v for k, v in state.items() if k != "prof_last"}
        state["prof_seen"] = state["prof_seen"] & ((1 << PROFILE_BINS) - 1)
    if version <= 10:
        state = with_empty_fields(state, GAP_FIELDS)
    if version <= 11:
        state = with_empty_fields(state, ("cal_onsets",))
    elif version <= 13:
        state = {k: v for k, v in state.items() if k != "cal_alerts"} | {"cal_onsets": state["cal_alerts"]}
    if version <= 12:
        state = with_empty_fields(state, ("cal_feat",))
    if version <= 13:
        state = with_empty_fields(state, ("flag_prev",))
    if version <= 14:
        state = with_empty_fields(state, REPEAT_FIELDS)
    if version <= 15:
        state = with_empty_fields(state, ("cal_onset_bin", "cal_feat_onset_bin"))
    if version <= 16:
        state = with_empty_fields(state, ("last_mask", "last_stamp"))
    if version <= 17:
        state = with_empty_fields(state, ("cal_wake",))
    if version <= 18:
        state = with_empty_fields(state, ("cal_settle",))
    return state if "prof_start" in state else with_empty_fields(state, ("prof_start",))
