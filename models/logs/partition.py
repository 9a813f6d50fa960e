"""One partition's complete log model: miner, online-learned weights, streams, and its snapshot.

Everything a log score depends on evolves only with the partition's own records, in offset
order: the Drain3 miner (template ids and their rows), the weights and optimizer (online
learning at fixed event counts), and each stream's row of state. So a partition is the unit
that is snapshotted, restored and moved between hosts, exactly as the sensor streams of
`streamer/state.py` are; after restore + replay from the snapshot's offset the scores are
those of an uninterrupted run.

The snapshot is a dict of tensors, numbers, strings and bytes (the miner as JSON bytes), so it
loads with torch.load(weights_only=True).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from models.calibration import CalibrationConfig
from models.logs.calibration import calibration_from_dict
from models.logs.detector import TERMS
from models.logs.model import LogGRU, LogModelConfig
from models.logs.online import LogDetector, OnlineConfig
from models.logs.templates import NO_TEMPLATE, MinerConfig, TemplateBook

SNAPSHOT_FORMAT = "streamer-log-partition"
SNAPSHOT_VERSION = 1


@dataclass
class LogScores:
    """Per scored line, in input order: the detector's outputs and the templates involved."""

    stream: list[str]
    ts_ms: np.ndarray  # int64 [N]
    surprise: np.ndarray  # float64 [N] nats, sum of the terms
    terms: np.ndarray  # float32 [N, 3]: template, level, timing
    score: np.ndarray  # float64 [N] in [0, 1]
    evidence: np.ndarray  # float64 [N] what the score calibrates (ranks lines where scores tie at 1)
    is_anomaly: np.ndarray  # bool [N]
    template_id: np.ndarray  # int64 [N]
    template: list[str]
    is_new_template: np.ndarray  # bool [N]
    expected_template_id: np.ndarray  # int64 [N], -1 = "a new template" was most likely
    expected_template: list[str | None]
    wavefronts: int
    updates: int

    def __len__(self) -> int:
        return len(self.stream)

    def record(self, j: int) -> dict[str, Any]:
        """One output record (JSON-ready), without the Kafka coordinates the loop adds."""
        return {
            "stream": self.stream[j],
            "ts": int(self.ts_ms[j]),
            "surprise": float(self.surprise[j]),
            "score": float(self.score[j]),
            "is_anomaly": bool(self.is_anomaly[j]),
            "template_id": int(self.template_id[j]),
            "template": self.template[j],
            "new_template": bool(self.is_new_template[j]),
            "expected_template_id": int(self.expected_template_id[j]),
            "expected_template": self.expected_template[j],
            "contributions": {name: float(x) for name, x in zip(TERMS, self.terms[j].tolist())},
        }


def owners_at(rows: np.ndarray, owner_now: np.ndarray, recycled: list[tuple[int, int, int, str]]) -> np.ndarray:
    """The template that owned `rows[i]` when line i was scored: the owner after the batch
    (`owner_now`), unless the row was recycled after line i, and then the template evicted by the
    first such recycling. (Walking the recyclings in order and overwriting every earlier line
    gave a row recycled twice in one batch its second owner before the first recycling too.)"""
    owners = owner_now[rows]
    if not recycled:
        return owners
    pos, row, old = (np.array([r[k] for r in recycled], dtype=np.int64) for k in range(3))
    order = np.lexsort((pos, row))  # by row, then position
    pos, row, old = pos[order], row[order], old[order]
    n = len(rows)
    first_after = np.searchsorted(row * (n + 1) + pos, rows * (n + 1) + np.arange(n), side="right")
    j = np.minimum(first_after, len(row) - 1)
    later = (first_after < len(row)) & (row[j] == rows)
    owners[later] = old[j[later]]
    return owners


class LogPartition:
    """Miner + detector + the stream -> row table of one input partition."""

    def __init__(
        self,
        model: LogGRU,
        calibration: CalibrationConfig | None = None,
        online: OnlineConfig | None = None,
        miner: MinerConfig | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        miner = miner or MinerConfig(max_templates=model.config.vocab)
        if miner.max_templates != model.config.vocab or miner.max_params != model.config.max_params:
            raise ValueError("miner max_templates/max_params must equal the model's vocab/max_params")
        # Each partition learns its own copy of the weights (see online.py).
        self.detector = LogDetector(copy.deepcopy(model), calibration, online, device)
        self.book = TemplateBook(miner)
        self.slot_of: dict[str, int] = {}
        self._free: list[int] = []
        self._next = 0

    @property
    def model_config(self) -> LogModelConfig:
        return self.detector.config

    def __len__(self) -> int:
        return len(self.slot_of)

    def warming_up(self) -> int:
        """Streams that have not yet seen their warm-up's worth of lines (nothing flagged yet)."""
        if not self.slot_of:
            return 0
        det = self.detector
        rows = torch.as_tensor(list(self.slot_of.values()), device=det.device)
        return int((det.bank.tensors["steps"][rows] < det.calibration.warmup).sum())

    def _slots(self, streams: list[str]) -> np.ndarray:
        out = np.empty(len(streams), dtype=np.int64)
        for i, s in enumerate(streams):
            slot = self.slot_of.get(s)
            if slot is None:
                if self._free:
                    slot = self._free.pop()
                else:
                    slot, self._next = self._next, self._next + 1
                self.slot_of[s] = slot
            out[i] = slot
        return out

    def process(self, stream: list[str], ts_ms: np.ndarray, level: np.ndarray, message: list[str]) -> LogScores:
        """Mine, step and score one partition's lines, in offset order."""
        active_start = self.book.active_rows.copy()
        mined = self.book.add(message)
        slots = self._slots(stream)
        res = self.detector.process(slots, mined, np.asarray(level), np.asarray(ts_ms), active_start)
        # Expected template: the row's owner when the event was scored (a recycled row belonged
        # to the evicted template before its recycling point).
        exp_tid = owners_at(res.expected_row, np.r_[self.book.tid_of_row, NO_TEMPLATE], mined.recycled)
        old_text = {old_tid: text for _pos, _row, old_tid, text in mined.recycled}
        texts = {t: self.book.template(t) or old_text.get(t) for t in set(exp_tid.tolist()) if t != NO_TEMPLATE}
        return LogScores(
            list(stream),
            np.asarray(ts_ms, dtype=np.int64),
            res.surprise,
            res.terms,
            res.score,
            res.evidence,
            res.is_anomaly,
            mined.template_id,
            mined.text,
            mined.is_new,
            exp_tid,
            [texts.get(t) for t in exp_tid.tolist()],
            res.wavefronts,
            res.updates,
        )

    def forget(self, streams: list[str]) -> None:
        """Drop idle streams; their rows return to a never-seen state for reuse."""
        freed = [self.slot_of.pop(s) for s in streams if s in self.slot_of]
        if freed:
            self.detector.bank.reset(torch.as_tensor(freed))
            self._free.extend(freed)

    # -- snapshot -----------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """Everything needed to continue exactly: streams' rows, miner, weights, optimizer."""
        streams = list(self.slot_of)
        rows = torch.as_tensor([self.slot_of[s] for s in streams], dtype=torch.int64)
        return {
            "format": SNAPSHOT_FORMAT,
            "version": SNAPSHOT_VERSION,
            "model_config": asdict(self.model_config),
            "calibration": asdict(self.detector.calibration),
            "streams": streams,
            "state": self.detector.bank.export_rows(rows),
            "templates": self.book.to_bytes(),
            "learner": self.detector.learner_state(),
        }

    @classmethod
    def restore(
        cls, data: dict[str, Any], device: str | torch.device = "cpu", calibration: CalibrationConfig | None = None
    ) -> LogPartition:
        """Rebuild from `snapshot()`; raises ValueError when the snapshot is not one."""
        if data.get("format") != SNAPSHOT_FORMAT or data.get("version") != SNAPSHOT_VERSION:
            raise ValueError("not a log partition snapshot of this version")
        model = LogGRU(LogModelConfig.from_dict(data["model_config"]))
        book = TemplateBook.from_bytes(data["templates"])
        online = OnlineConfig.from_dict(data["learner"]["online"])
        cal = calibration or calibration_from_dict(data["calibration"])
        part = cls(model, cal, online, book.config, device)
        part.book = book
        part.detector.load_learner_state(data["learner"])
        streams = list(data["streams"])
        part.slot_of = {s: i for i, s in enumerate(streams)}
        part._next = len(streams)
        if streams:
            rows = torch.arange(len(streams))
            part.detector.bank.ensure_capacity(len(streams))
            part.detector.bank.import_rows(rows, data["state"])
        return part
