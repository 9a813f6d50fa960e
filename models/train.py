"""Pretraining on synthetic series, through the same `advance` step the daemon runs.

Training and serving share one definition of a step (normaliser, GRU, surprise), so what the
network learns to predict is exactly what it is asked to predict online. Sequences are run
with truncated backpropagation through time; the loss is the mean surprise (Gaussian NLL of
each next normalised value) after a short burn-in while the normaliser settles.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from models.calibration import CalibrationConfig
from models.detector import MAX_ABS_VALUE, advance
from models.gru import ModelConfig, StreamGRU
from models.state import empty_state
from models.synthetic import univariate_batch


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    batch: int = 64
    length: int = 384
    tbptt: int = 64
    burn_in: int = 16
    lr: float = 3e-3
    seed: int = 0
    hidden: int = 32
    max_features: int = 8
    public_share: float = 0.25  # of each batch, when public series are given

    def __post_init__(self) -> None:
        if self.length <= self.burn_in:
            # Every event of a shorter window is burn-in: nothing to learn from, a loss of 0.
            raise ValueError(f"length must be more than the burn-in of {self.burn_in} events, not {self.length}")


def _sequence_loss(model: StreamGRU, series: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """Mean surprise per predicted value. NaN marks padding before a short series starts: it is
    fed as an absent feature (no step, no surprise), as the daemon treats a missing reading."""
    b, t = series.shape
    cal = CalibrationConfig()
    state = empty_state(model.config, b, features=1)
    present = torch.isfinite(series) & (series.abs() <= MAX_ABS_VALUE)  # anything else: absent
    series = torch.where(present, series, torch.zeros_like(series))
    total = torch.zeros((), dtype=torch.float64)
    count = 0.0
    for start in range(0, t, cfg.tbptt):
        state = {k: v.detach() for k, v in state.items()}
        for i in range(start, min(t, start + cfg.tbptt)):
            has_pred = present[:, i] & (state["norm_n"][:, 0] >= 2)
            state, out = advance(model, cal, state, series[:, i : i + 1], present[:, i : i + 1])
            if i >= cfg.burn_in:
                total = total + out.nll.sum().double()
                count += float(has_pred.sum())
    if count == 0:
        # No value had a prediction after the burn-in: nothing to learn from (the surprises are
        # all zero; an optimiser step on them would change nothing). No graph: the step is skipped.
        return torch.zeros((), dtype=torch.float64)
    return total / count


# A value is predicted (and so trained on) only once its stream has seen 2 values before it
# (`has_pred` in `advance`): a series needs at least this many to be trained on at all.
MIN_SERIES_VALUES = 3


def listed(names: list[str], limit: int = 10) -> str:
    """The first `limit` names and how many more: "a, b and 3 more"."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


class SeriesSampler:
    """Random windows of user-supplied series (one feature of one stream each).

    The model is channel-independent, so every numeric column of a CSV or Parquet file and every
    feature of every stream of a replayed topic is one training series. A series is drawn with
    probability proportional to its length (every value equally likely to be trained on). Series
    shorter than a window are used whole, left-padded with NaN: the padding is an absent feature,
    neither stepped nor scored, so the stream starts cold as it would in the daemon.

    Only values the daemon would step count (finite, magnitude <= MAX_ABS_VALUE; anything else
    is an absent reading): a series with fewer than MIN_SERIES_VALUES of them has no value to
    predict and is left out (named in `too_short`).
    """

    def __init__(self, series: dict[str, np.ndarray]) -> None:
        arrays = {n: np.asarray(s, dtype=np.float64) for n, s in series.items()}
        present = {n: int((np.abs(s) <= MAX_ABS_VALUE).sum()) for n, s in arrays.items()}  # (NaN compares False)
        self.names = [n for n in arrays if present[n] >= MIN_SERIES_VALUES]
        self.too_short = [n for n in arrays if present[n] < MIN_SERIES_VALUES]
        if not self.names:
            raise ValueError(
                f"no series with at least {MIN_SERIES_VALUES} values to train on ({len(arrays)} series read"
                + (f": {listed(self.too_short)}" if self.too_short else "")
                + f"; a value is predicted, and trained on, only after {MIN_SERIES_VALUES - 1} values of its series)"
            )
        self.series = [arrays[n] for n in self.names]
        self.rows = sum(present[n] for n in self.names)
        lengths = np.array([len(s) for s in self.series], dtype=np.float64)
        self.weights = lengths / lengths.sum()

    def __call__(self, rng: np.random.Generator, batch: int, length: int) -> np.ndarray:
        out = np.empty((batch, length))
        for i in range(batch):
            s = self.series[int(rng.choice(len(self.series), p=self.weights))]
            if len(s) <= length:
                out[i] = np.r_[np.full(length - len(s), np.nan), s]
            else:
                start = int(rng.integers(len(s) - length + 1))
                out[i] = s[start : start + length]
        return out


Sampler = Callable[[np.random.Generator, int, int], np.ndarray]


def batch_split(batch: int, shares: list[float]) -> list[int]:
    """Rows of a batch that sources in these shares (summing to 1) give: rounded, the remainder
    to the first."""
    counts = [round(batch * share) for share in shares]
    counts[0] += batch - sum(counts)
    return counts


def public_share_problem(batch: int, share: float, from_data: bool) -> str | None:
    """Why a public share cannot be used in batches of `batch` (`from_data`: the rest of each batch
    is the user's data, not the synthetic series), or None: a share that rounds one source to no row of any batch would train on the other
    alone while the checkpoint described both (a review: 0.8 of a batch of 2 used no row of the
    files; another file gave the same weights)."""
    n_base, n_public = batch_split(batch, [1.0 - share, share])
    if min(n_base, n_public) >= 1:
        return None
    who = "the public series" if n_public < 1 else ("the training data" if from_data else "the synthetic series")
    advice = "take a larger batch or a share nearer one half"
    return f"a public share of {share:g} in batches of {batch} leaves {who} no row of any batch: {advice}"


class MixedSampler:
    """Each batch drawn from several samplers in fixed shares (the synthetic families plus real
    public series, say), shuffled so no sampler owns particular rows."""

    def __init__(self, parts: list[tuple[Sampler, float]]) -> None:
        total = sum(share for _, share in parts)
        if not parts or total <= 0:
            raise ValueError("MixedSampler needs at least one part with a positive share")
        self.parts = [(sample, share / total) for sample, share in parts]

    def counts(self, batch: int) -> list[int]:
        """Rows of a batch each part gives (the rounding's remainder goes to the first)."""
        return batch_split(batch, [share for _, share in self.parts])

    def __call__(self, rng: np.random.Generator, batch: int, length: int) -> np.ndarray:
        counts = self.counts(batch)
        rows = [np.asarray(sample(rng, k, length), dtype=np.float64) for (sample, _), k in zip(self.parts, counts) if k > 0]
        out = np.concatenate(rows)
        return out[rng.permutation(batch)]


def _streamer_version() -> str:
    """The installed package's version, which wrote the checkpoint (a review: a file said which
    torch trained it but not which streamer)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("streamer")
    except PackageNotFoundError:  # (run from a checkout that was never installed)
        return "unknown"


def _loss_window(steps: int) -> int:
    return max(1, min(20, steps // 4))


def train(
    cfg: TrainConfig,
    progress: bool = True,
    data: SeriesSampler | None = None,
    data_description: str | None = None,
    public: SeriesSampler | None = None,
    public_description: str | None = None,
    stop: Callable[[], bool] | None = None,
) -> tuple[StreamGRU, dict[str, Any]]:
    """Train a fresh model (on `data` when given, else on synthetic series, with `public` series
    mixed in at `cfg.public_share` of every batch); returns it with a summary for the checkpoint.

    `stop` is asked before every step; when it says so, KeyboardInterrupt is raised there. (A
    Ctrl-C raised wherever the signal lands could interrupt the progress bar's machinery, and
    the process then died by the signal after saying it was interrupted: 4 of 40 tries.)"""
    base: Sampler = data if data is not None else univariate_batch
    mixer = None if public is None else MixedSampler([(base, 1.0 - cfg.public_share), (public, cfg.public_share)])
    sample = base if mixer is None else mixer
    n_base, n_public = (cfg.batch, 0) if mixer is None else mixer.counts(cfg.batch)
    problem = None if mixer is None else public_share_problem(cfg.batch, cfg.public_share, data is not None)
    if problem:
        raise ValueError(problem)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = StreamGRU(ModelConfig(hidden=cfg.hidden, max_features=cfg.max_features))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps)
    losses: list[float] = []
    empty = 0  # batches with no value to predict after burn-in: drawn, not trained on
    started = time.time()
    bar = None
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = (TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.3f}"))
        bar = Progress(*columns, TimeRemainingColumn())
        bar.start()
        task = bar.add_task("train", total=cfg.steps, loss=float("nan"))
    try:
        for _ in range(cfg.steps):
            if stop is not None and stop():
                raise KeyboardInterrupt
            series = torch.as_tensor(sample(rng, cfg.batch, cfg.length), dtype=torch.float64)
            loss = _sequence_loss(model, series, cfg)
            if not loss.requires_grad:  # no value in the batch had a prediction after burn-in
                empty += 1
                if bar is not None:  # (the bar counts batches drawn, as the summary does)
                    bar.update(task, advance=1)
                continue
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            if bar is not None:
                bar.update(task, advance=1, loss=float(np.mean(losses[-20:])))
    finally:
        if bar is not None:
            bar.stop()
    if not losses:
        # The weights are still the random initialisation: not a model to serve.
        raise ValueError(f"no training step had a value to predict in {cfg.steps} batches: nothing was learned")
    model.eval()
    window = _loss_window(len(losses))
    # (With public series mixed in, the name and the batch description say so: a quarter of each
    # batch was real data, and the checkpoint called itself "synthetic" and "64 series" of it.)
    mixed = f" ({n_base} synthetic, {n_public} public)" if n_public else ""
    mixed_in = f" ({n_base} from it, {n_public} public)" if n_public else ""
    summary = {
        "name": ("synthetic" if data is None else "custom") + ("+public" if public is not None else ""),
        "data": (
            f"models.synthetic.univariate_batch: {cfg.steps} batches of {cfg.batch} series{mixed} x {cfg.length} steps, seed {cfg.seed}"
            if data is None
            else f"{data_description}: {len(data.names)} series, {data.rows:,} values; "
            f"{cfg.steps} batches of {cfg.batch} windows{mixed_in} x {cfg.length}"
            + (f" ({empty} with no value to predict, not trained on)" if empty else "")
        ),
        "series": None if data is None else data.names[:1000],
        "public": None
        if public is None
        else {
            "data": f"{public_description}: {len(public.names)} series, {public.rows:,} values",
            "share": cfg.public_share,  # (as asked; rows_per_batch is what it came to)
            "rows_per_batch": n_public,
            "series": public.names[:1000],
        },
        "train_config": asdict(cfg),
        # Means of the first and last 20 steps, or quarters of a shorter run: overlapping windows
        # (20 steps or fewer) printed "loss 1.449 -> 1.449" whatever training did.
        "final_loss": float(np.mean(losses[-window:])),
        "first_loss": float(np.mean(losses[:window])),
        "seconds": round(time.time() - started, 1),
        "torch": str(torch.__version__),
        "streamer": _streamer_version(),
    }
    return model, summary
