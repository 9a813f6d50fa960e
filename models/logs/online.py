"""Batched stepping with deterministic online learning: `LogDetector.process`.

Logs need online learning: a partition's templates are only known once mined, so their
embedding and output rows can only be learned as they arrive. To keep "same events in the
same order give the same scores" (what restart-and-replay relies on), the weights change only
at fixed points of the partition's event sequence: after every `update_every` events, never
at poll boundaries. A batch is cut into segments at those points (and where a template row is
recycled); within a segment every event is stepped with the same weights, in wavefronts, so the
result does not depend on how the events were split into polls, up to rounding: on CPU a GRU
call rounds the last bits of a row differently with the call's row count, which does depend on
the split, and the updates carry such differences forward (README, Log streams).

An update is one Adam step on the NLL of the last `buffer` events' predictions, each replayed
with gradients from the stored state before its stream's previous event (one step of
backpropagation through time; the hidden states themselves are never rewritten).

Flagged events are not learned from: an event the detector flags (is_anomaly) gets weight 0,
so a one-off anomaly or a burst never teaches the model that it is normal, and stays
surprising if it comes back. The one exception is a pattern that keeps recurring: once a
template has been flagged `release_after` times (5), its later flagged lines are learned
like any other. Without it a rare but routine line (a WARN in 0.3% of requests) is flagged
on every occurrence forever, since nothing it does is ever learned; with it, the first five
occurrences are still flagged and excluded, and the flags then fade as the model learns it.
The optimizer state, the example buffer, the per-row flag counts and the event counter are
partition state and go into the snapshot with the weights.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch

from models.calibration import CalibrationConfig
from models.detector import wavefronts
from models.logs.calibration import log_calibration
from models.logs.detector import Example, LogStateBank, advance, batch_events, example_loss, select
from models.logs.model import LogGRU
from models.logs.templates import Mined

_EXAMPLE_FIELDS = [f.name for f in fields(Example)]


@dataclass(frozen=True)
class OnlineConfig:
    update_every: int = 16  # events between weight updates (0: no online learning)
    buffer: int = 64  # most recent examples each update learns from
    release_after: int = 5  # a template flagged this many times is learned from then on
    lr: float = 3e-2  # embeddings and heads: a partition's templates must be learned fast
    cell_lr: float = 1e-2  # the recurrent cell: shared sequence machinery, changes more slowly

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OnlineConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class LogBatchResult:
    """Host-side results in input order."""

    surprise: np.ndarray  # float64 [N]
    terms: np.ndarray  # float32 [N, 3]
    score: np.ndarray  # float64 [N]
    is_anomaly: np.ndarray  # bool [N]
    log_p: np.ndarray  # float32 [N, 3] log p-value of each term
    evidence: np.ndarray  # float64 [N]
    expected_row: np.ndarray  # int64 [N], vocab = NEW
    wavefronts: int
    updates: int


class LogDetector:
    """A partition's log model: weights (updated online), optimizer, example buffer, state bank."""

    def __init__(
        self,
        model: LogGRU,
        calibration: CalibrationConfig | None = None,
        online: OnlineConfig | None = None,
        device: str | torch.device = "cpu",
        capacity: int = 256,
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.model.train(False)
        self.config = model.config
        self.calibration = calibration or log_calibration()
        self.online = online or OnlineConfig()
        self.bank = LogStateBank(model.config, self.device, capacity)
        cell = list(self.model.cell.parameters())
        rest = [p for p in self.model.parameters() if all(p is not c for c in cell)]
        self.optimizer = torch.optim.Adam([{"params": rest, "lr": self.online.lr}, {"params": cell, "lr": self.online.cell_lr}])
        self.seen = 0  # events stepped by this partition, the clock of the update points
        self.flags = torch.zeros(model.config.vocab, dtype=torch.int64, device=self.device)  # per template row
        self.buffer: dict[str, torch.Tensor] | None = None
        self.buffer_weight: torch.Tensor | None = None

    # -- learning -----------------------------------------------------------------------
    def _remember(self, ex: Example, weight: torch.Tensor) -> None:
        new = {name: getattr(ex, name).detach() for name in _EXAMPLE_FIELDS}
        cap = self.online.buffer
        if self.buffer is None or self.buffer_weight is None:
            self.buffer, self.buffer_weight = new, weight
        else:
            self.buffer = {k: torch.cat((self.buffer[k], v)) for k, v in new.items()}
            self.buffer_weight = torch.cat((self.buffer_weight, weight))
        self.buffer = {k: v[-cap:] for k, v in self.buffer.items()}
        self.buffer_weight = self.buffer_weight[-cap:]

    def _weights(self, rows: torch.Tensor, flagged: torch.Tensor) -> torch.Tensor:
        """Learning weight per example, in event order: 0 for a flagged event, unless its
        template had already been flagged `release_after` times before it."""
        weight = (~flagged).float()
        for i in torch.nonzero(flagged).flatten().tolist():
            r = int(rows[i])
            if int(self.flags[r]) >= self.online.release_after:
                weight[i] = 1.0
            self.flags[r] += 1
        return weight

    def _update(self, active: torch.Tensor) -> None:
        if self.buffer is None or self.buffer_weight is None or not bool(self.buffer_weight.any()):
            return
        ex = Example(**self.buffer)
        with torch.enable_grad():
            loss = example_loss(self.model, ex, active.expand(len(ex.target), -1))
            w = self.buffer_weight.to(loss.dtype)
            total = (loss * w).sum() / w.sum()
            if not bool(torch.isfinite(total)):
                # One non-finite input would make every weight NaN, for good and in every
                # snapshot after: skip the step (the inputs are guarded; this is the last line).
                return
            self.optimizer.zero_grad(set_to_none=False)
            total.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 5.0)
            self.optimizer.step()

    def reset_rows(self, rows: list[int]) -> None:
        """A template row passes to a new template: fresh weights, no optimizer momentum, and no
        buffered example that mentions the row."""
        if not rows:
            return
        idx = torch.as_tensor(rows, dtype=torch.int64, device=self.device)
        self.model.reset_rows(idx)
        self.flags[idx] = 0
        m = self.model
        for p, dim in ((m.embedding.weight, 0), (m.template_head.weight, 0), (m.template_head.bias, 0), (m.level_template.weight, 1)):
            st = self.optimizer.state.get(p)
            if st:
                st["exp_avg"].index_fill_(dim, idx, 0.0)
                st["exp_avg_sq"].index_fill_(dim, idx, 0.0)
        if self.buffer is not None and self.buffer_weight is not None:
            hit = torch.isin(self.buffer["target"], idx) | torch.isin(self.buffer["prev_row"], idx)
            self.buffer_weight = torch.where(hit, torch.zeros_like(self.buffer_weight), self.buffer_weight)

    # -- stepping -----------------------------------------------------------------------
    @torch.no_grad()
    def process(self, slots: np.ndarray, mined: Mined, level: np.ndarray, ts_ms: np.ndarray, active_start: np.ndarray) -> LogBatchResult:
        """Step every event once, in order per slot, learning at the fixed update points.

        slots: int [N]; mined: the batch's templates (from TemplateBook.add, same order);
        level: int [N]; ts_ms: int [N]; active_start: bool [V], the book's live rows before
        this batch was mined.
        """
        n = len(slots)
        v = self.config.vocab
        dev = self.device
        out_s = torch.zeros(n, dtype=torch.float64, device=dev)
        out_terms = torch.zeros((n, 3), dtype=torch.float32, device=dev)
        out_score = torch.zeros(n, dtype=torch.float64, device=dev)
        out_anom = torch.zeros(n, dtype=torch.bool, device=dev)
        out_exp = torch.zeros(n, dtype=torch.int64, device=dev)
        out_logp = torch.zeros((n, 3), dtype=torch.float32, device=dev)
        out_ev = torch.zeros(n, dtype=torch.float64, device=dev)
        if n == 0:
            z3 = np.zeros((0, 3), np.float32)
            return LogBatchResult(np.zeros(0), z3, np.zeros(0), np.zeros(0, bool), z3, np.zeros(0), np.zeros(0, np.int64), 0, 0)
        self.bank.ensure_capacity(int(slots.max()) + 1)
        ev_all = batch_events(mined.row, mined.is_new, level, ts_ms, mined.params, mined.params_mask, dev)
        slots_dev = torch.as_tensor(slots, dtype=torch.int64, device=dev)
        recycle_at = {pos: row for pos, row, *_ in mined.recycled}
        base_dev = torch.as_tensor(np.r_[active_start, True], device=dev)  # + the NEW class, always live

        k = self.online.update_every
        cuts = set(recycle_at)
        if k > 0:
            first_cut = (k - self.seen % k) % k
            cuts.update(range(first_cut, n, k))
        bounds = sorted({0, n} | {c for c in cuts if 0 < c < n})
        waves_total = 0
        updates = 0
        for a, b in itertools.pairwise(bounds):
            if a in recycle_at:
                # The evicted template's row passes to the template created at this event.
                row = recycle_at[a]
                self.reset_rows([row])
                base_dev[row] = False
            act_pos = torch.full((v + 1,), n + 1, dtype=torch.int64, device=dev)
            new_pos = np.flatnonzero(mined.is_new[a:b]) + a
            act_pos[torch.as_tensor(mined.row[new_pos], device=dev)] = torch.as_tensor(new_pos, device=dev)
            seg_slots = slots[a:b]
            examples: list[tuple[torch.Tensor, Example, torch.Tensor]] = []
            waves = wavefronts(seg_slots)
            for wave in waves:
                idx = torch.as_tensor(wave + a, device=dev)
                rows = slots_dev[idx]
                active = base_dev[None, :] | (act_pos[None, :] < idx[:, None])
                new_state, out, ex = advance(self.model, self.calibration, self.bank.gather(rows), select(ev_all, idx), active)
                self.bank.scatter(rows, new_state)
                out_s[idx] = out.surprise
                out_terms[idx] = out.terms
                out_score[idx] = out.score
                out_anom[idx] = out.is_anomaly
                out_exp[idx] = out.expected_row
                out_logp[idx] = out.log_p
                out_ev[idx] = out.evidence
                examples.append((idx, ex, out.is_anomaly))
            waves_total += len(waves)
            base_dev[torch.as_tensor(mined.row[new_pos], device=dev)] = True
            self.seen += b - a
            if k > 0:
                # Examples in event order, so the buffer does not depend on the wavefront layout.
                order = torch.argsort(torch.cat([i for i, _, _ in examples]))
                merged = Example(**{name: torch.cat([getattr(e, name) for _, e, _ in examples])[order] for name in _EXAMPLE_FIELDS})
                self._remember(merged, self._weights(merged.row, torch.cat([f for _, _, f in examples])[order]))
                if self.seen % k == 0:
                    self._update(base_dev[None, :])
                    updates += 1
        return LogBatchResult(
            out_s.cpu().numpy(),
            out_terms.cpu().numpy(),
            out_score.cpu().numpy(),
            out_anom.cpu().numpy(),
            out_logp.cpu().numpy(),
            out_ev.cpu().numpy(),
            out_exp.cpu().numpy(),
            waves_total,
            updates,
        )

    # -- state --------------------------------------------------------------------------
    def learner_state(self) -> dict[str, Any]:
        """Weights, optimizer and buffer as plain tensors and numbers (weights_only-safe)."""
        return {
            "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "seen": self.seen,
            "flags": self.flags.cpu(),
            "buffer": None if self.buffer is None else {k: v.cpu() for k, v in self.buffer.items()},
            "buffer_weight": None if self.buffer_weight is None else self.buffer_weight.cpu(),
            "online": asdict(self.online),
        }

    def load_learner_state(self, data: dict[str, Any]) -> None:
        self.model.load_state_dict(data["model"])
        self.optimizer.load_state_dict(data["optimizer"])
        self.seen = int(data["seen"])
        self.flags = data["flags"].to(self.device)
        buf = data["buffer"]
        self.buffer = None if buf is None else {k: t.to(self.device) for k, t in buf.items()}
        bw = data["buffer_weight"]
        self.buffer_weight = None if bw is None else bw.to(self.device)
