"""The state bank: every stream's state as one row of a few device tensors.

Keeping all streams in the same tensors is what lets one GRU call advance thousands of streams
at once; a row index (the "slot") is the only handle the rest of the system holds. The bank
knows nothing of stream ids or partitions: the slot table in `streamer/` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from models.adapt import PROFILE_BINS
from models.calibration import HIST_BINS
from models.gru import ModelConfig


@dataclass(frozen=True)
class Field:
    """One per-stream tensor: its per-row shape (in terms of F features and H hidden) and dtype."""

    name: str
    per_feature: bool
    hidden: bool
    dtype: torch.dtype
    width: int = 0  # a vector of this length per row (or per feature, when per_feature)
    pairs: bool = False  # one value per pair of features: [F, F] per row


# Normaliser statistics and the calibrator are kept in float64: a sensor reading 1e4 with noise
# of 0.01 loses its variance in float32.
FIELDS: tuple[Field, ...] = (
    Field("h", True, True, torch.float32),  # GRU hidden state per feature channel
    Field("norm_n", True, False, torch.float64),  # events seen per feature
    Field("norm_mean", True, False, torch.float64),
    Field("norm_var", True, False, torch.float64),
    Field("pred_mu", True, False, torch.float32),  # prediction for the next event, normalised
    Field("pred_log_sigma", True, False, torch.float32),
    # Online adaptation (models/adapt.py): the time-of-day profile and the predictor mixture.
    Field("prof_mean", True, False, torch.float64, PROFILE_BINS),
    Field("prof_var", True, False, torch.float32, PROFILE_BINS),
    # Bit h set once hour h has been learned; bit PROFILE_BINS + h once it has been learned a day
    # or more after the feature's first reading (a revisit), whose epoch hour is prof_start.
    Field("prof_seen", True, False, torch.int64),
    Field("prof_start", True, False, torch.int32),
    Field("mix_mse", True, False, torch.float64, 2),  # running squared error of GRU and profile
    Field("mix_var", True, False, torch.float64),  # running variance of the mixed error
    Field("lvl_mean", True, False, torch.float64),  # the recent level: mean of the last ~30 events
    Field("lvl_var", True, False, torch.float64),
    Field("shift_mean", True, False, torch.float64),  # the recent mean: the last ~10 events
    # The features' error correlations (models/correlation.py): second moments of standardised
    # errors (values near 1, so float32 is plenty) and each feature's events in them (exact to
    # 2^24; past that the count stops growing, which changes nothing: it is compared with 30).
    Field("corr_cov", True, False, torch.float32, pairs=True),
    Field("corr_n", True, False, torch.float32),
    # Calibration: decayed histograms of log-surprise, of the mixture, the profile, the level,
    # the recent mean's shift and the correlation view.
    Field("cal_hist", False, False, torch.float32, HIST_BINS),
    Field("cal_hist_prof", False, False, torch.float32, HIST_BINS),
    Field("cal_hist_lvl", False, False, torch.float32, HIST_BINS),
    Field("cal_hist_shift", False, False, torch.float32, HIST_BINS),
    Field("cal_hist_corr", False, False, torch.float32, HIST_BINS),
    # ...and the same five over a longer memory (CalibrationConfig.long_window).
    Field("cal_long", False, False, torch.float32, HIST_BINS),
    Field("cal_long_prof", False, False, torch.float32, HIST_BINS),
    Field("cal_long_lvl", False, False, torch.float32, HIST_BINS),
    Field("cal_long_shift", False, False, torch.float32, HIST_BINS),
    Field("cal_long_corr", False, False, torch.float32, HIST_BINS),
    # ...and each feature's own history of its prediction error (the per-feature view).
    Field("cal_feat", True, False, torch.float32, HIST_BINS),
    # Runs of flagged events begun in the last ~window events (decayed), and whether the last
    # event was flagged: a stream flagged afresh again and again has each run's first event
    # learned at more than flagged_weight (`tail_weight`).
    Field("cal_onsets", False, False, torch.float64),
    Field("flag_prev", False, False, torch.bool),
    # Events left of the tail of the last flagged episode, which the long histories of the views of
    # the recent past do not learn (EPISODE_TAIL in models/calibration.py).
    Field("cal_settle", False, False, torch.int8),
    # Whether a stream constant so far has just moved or has restarted its warm-up already
    # (`wakes` in models/detector.py).
    Field("cal_wake", False, False, torch.int8),
    # ...and the bin of the last run's first event in each view's short history and each
    # feature's, at its own size (0: none yet): a run as large as it is the stream's own range
    # (`reach_capped`).
    Field("cal_onset_bin", False, False, torch.int8, 5),
    Field("cal_feat_onset_bin", True, False, torch.int8),
    # The repeat view (models/repeats.py): each feature's last reading, its run of identical
    # readings, -log10 of its probability, decayed counts of repeats after a change and after a
    # repeat, and two values it sat at with the recent runs that ended at each.
    Field("rep_last", True, False, torch.float64),
    Field("rep_run", True, False, torch.int32),
    Field("rep_lp", True, False, torch.float64),
    Field("rep_counts", True, False, torch.float32, 4),
    Field("rep_home", True, False, torch.float64, 2),
    Field("rep_home_runs", True, False, torch.float32, 2),
    Field("steps", False, False, torch.int64),  # events seen by the stream
    # The alert hold-off (`holdoff` in models/calibration.py): events it has left and the score
    # of the alert that started it (float64: compared with the next events' float64 scores).
    Field("hold_left", False, False, torch.int32),
    Field("hold_score", False, False, torch.float64),
    # Recurring events (models/recurrence.py), per UTC hour: the last day with a flag in it, the
    # run of consecutive days ending there, and the largest (uncapped) score flagged there that day.
    Field("recur_day", False, False, torch.int32, PROFILE_BINS),
    Field("recur_run", False, False, torch.int32, PROFILE_BINS),
    Field("recur_peak", False, False, torch.float32, PROFILE_BINS),
    # Gaps (models/adapt.py `gap_update`): the previous event's time, the log of the stream's
    # usual interval between events (ms) and how many intervals set it (up to GAP_AFTER).
    Field("gap_last_ts", False, False, torch.int64),
    Field("gap_log", False, False, torch.float64),
    Field("gap_n", False, False, torch.int32),
    # Which features the previous event carried and its delivery stamp (the Kafka record's
    # timestamp; -1: none): with its time (gap_last_ts) and each feature's last reading
    # (rep_last), what tells a re-delivered event (`duplicate` in models/detector.py).
    Field("last_mask", True, False, torch.bool),
    Field("last_stamp", False, False, torch.int64),
)


def _empty_field(field: Field, rows: int, features: int, hidden: int, device: torch.device | str = "cpu") -> torch.Tensor:
    shape: tuple[int, ...] = (rows,)
    if field.per_feature:
        shape += (features, features) if field.pairs else (features,)
    if field.hidden:
        shape += (hidden,)
    if field.width:
        shape += (field.width,)
    return torch.zeros(shape, dtype=field.dtype, device=device)


def empty_state(config: ModelConfig, rows: int, features: int | None = None, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Zeroed state for `rows` never-seen streams; training uses it with features=1."""
    f = config.max_features if features is None else features
    return {field.name: _empty_field(field, rows, f, config.hidden, device) for field in FIELDS}


def with_empty_fields(state: dict[str, torch.Tensor], names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Exported rows `state` plus the fields `names`, zeroed as for never-seen streams: how a
    snapshot of an older layout gains the statistics added since (shapes from its own rows)."""
    rows, f = state["norm_n"].shape[:2]
    hidden = state["h"].shape[-1]
    return {**state, **{fl.name: _empty_field(fl, rows, f, hidden) for fl in FIELDS if fl.name in names}}


class RowBank:
    """Rows of per-stream state on one device, grown by doubling.

    Subclasses say what a never-seen row looks like (`_empty`); everything else (growth,
    gather/scatter for a wavefront, snapshot export/import, reset on eviction) is shared by the
    sensor and the log state banks.
    """

    def __init__(self, device: torch.device | str = "cpu", capacity: int = 1024) -> None:
        self.device = torch.device(device)
        self.capacity = 0
        self.tensors: dict[str, torch.Tensor] = {}
        self._grow_to(max(1, capacity))

    def _empty(self, rows: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _grow_to(self, capacity: int) -> None:
        for name, new in self._empty(capacity).items():
            old = self.tensors.get(name)
            if old is not None:
                new[: old.shape[0]] = old
            self.tensors[name] = new
        self.capacity = capacity

    def ensure_capacity(self, rows: int) -> None:
        """Make room for row indices below `rows`."""
        if rows > self.capacity:
            cap = self.capacity
            while cap < rows:
                cap *= 2
            self._grow_to(cap)

    def reset(self, rows: torch.Tensor) -> None:
        """Return rows to the state of a never-seen stream."""
        for t in self.tensors.values():
            t[rows] = 0

    def gather(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: t[rows] for name, t in self.tensors.items()}

    def scatter(self, rows: torch.Tensor, values: dict[str, torch.Tensor]) -> None:
        for name, v in values.items():
            self.tensors[name][rows] = v

    def export_rows(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Copy rows to CPU for a snapshot (plain tensors, loadable with weights_only=True)."""
        return {name: t[rows].cpu() for name, t in self.tensors.items()}

    def mismatch(self, rows: int, data: dict[str, Any]) -> str | None:
        """Why snapshot rows `data` cannot be imported as `rows` rows of this bank, None when they
        can. Checked before anything is assigned: a snapshot this code did not write (another
        build, a hand-edited file) must mean a cold start, not an exception mid-rebalance."""
        for name, t in self.tensors.items():
            src = data.get(name)
            if not isinstance(src, torch.Tensor):
                return f"state field {name} is missing"
            expected = (rows, *t.shape[1:])
            if tuple(src.shape) != expected:
                return f"state field {name}: shape {tuple(src.shape)} does not match {expected}"
        return None

    def import_rows(self, rows: torch.Tensor, data: dict[str, torch.Tensor]) -> None:
        """Write snapshot rows back; rows that do not fit this bank (`mismatch`) are refused."""
        problem = self.mismatch(int(rows.numel()), data)
        if problem is not None:
            raise ValueError(problem)
        for name, t in self.tensors.items():
            t[rows] = data[name].to(self.device, t.dtype)

    def nbytes(self) -> int:
        return sum(t.element_size() * t.numel() for t in self.tensors.values())


class StateBank(RowBank):
    """The sensor streams' bank: the FIELDS above for every row."""

    def __init__(self, config: ModelConfig, device: torch.device | str = "cpu", capacity: int = 1024) -> None:
        self.config = config
        super().__init__(device, capacity)

    def _empty(self, rows: int) -> dict[str, torch.Tensor]:
        return empty_state(self.config, rows, device=self.device)
