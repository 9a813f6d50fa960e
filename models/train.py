"""Pretraining on synthetic series, through the same `advance` step the daemon runs.

Training and serving share one definition of a step (normaliser, GRU, surprise), so what the
network learns to predict is exactly what it is asked to predict online. Sequences are run
with truncated backpropagation through time; the loss is the mean surprise (Gaussian NLL of
each next normalised value) after a short burn-in while the normaliser settles.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.calibration import CalibrationConfig
from models.detector import advance
from models.gru import ModelConfig, StreamGRU, save_checkpoint
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


def _sequence_loss(model: StreamGRU, series: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    b, t = series.shape
    cal = CalibrationConfig()
    state = empty_state(model.config, b, features=1)
    mask = torch.ones((b, 1), dtype=torch.bool)
    total = torch.zeros(())
    count = 0
    for start in range(0, t, cfg.tbptt):
        state = {k: v.detach() for k, v in state.items()}
        chunk_loss = torch.zeros(())
        for i in range(start, min(t, start + cfg.tbptt)):
            state, out = advance(model, cal, state, series[:, i : i + 1], mask)
            if i >= cfg.burn_in:
                chunk_loss = chunk_loss + out.nll.mean()
                count += 1
        total = total + chunk_loss
    return total / max(count, 1)


class SeriesSampler:
    """Random windows of user-supplied series (one feature of one stream each).

    The model is channel-independent, so every numeric column of a CSV or Parquet file and every
    feature of every stream of a replayed topic is one training series. Series shorter than a
    window are used whole by left-padding with their first value (the normaliser starts exact).
    """

    def __init__(self, series: dict[str, np.ndarray]) -> None:
        self.names = [n for n, s in series.items() if len(s) >= 2]
        if not self.names:
            raise ValueError("no series with at least 2 values to train on")
        self.series = [np.asarray(series[n], dtype=np.float64) for n in self.names]
        self.rows = sum(len(s) for s in self.series)

    def __call__(self, rng: np.random.Generator, batch: int, length: int) -> np.ndarray:
        out = np.empty((batch, length))
        for i in range(batch):
            s = self.series[int(rng.integers(len(self.series)))]
            if len(s) <= length:
                out[i] = np.r_[np.full(length - len(s), s[0]), s]
            else:
                start = int(rng.integers(len(s) - length + 1))
                out[i] = s[start : start + length]
        return out


def train(
    cfg: TrainConfig, progress: bool = True, data: SeriesSampler | None = None, data_description: str | None = None
) -> tuple[StreamGRU, dict[str, Any]]:
    """Train a fresh model (on `data` when given, else on synthetic series); returns it with a
    summary that goes into the checkpoint."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = StreamGRU(ModelConfig(hidden=cfg.hidden, max_features=cfg.max_features))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps)
    losses: list[float] = []
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
            sample = data if data is not None else univariate_batch
            series = torch.as_tensor(sample(rng, cfg.batch, cfg.length), dtype=torch.float64)
            loss = _sequence_loss(model, series, cfg)
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
    model.eval()
    summary = {
        "name": "synthetic" if data is None else "custom",
        "data": (
            f"models.synthetic.univariate_batch: {cfg.steps} batches of {cfg.batch} series x {cfg.length} steps, seed {cfg.seed}"
            if data is None
            else f"{data_description}: {len(data.names)} series, {data.rows:,} values; "
            f"{cfg.steps} batches of {cfg.batch} windows x {cfg.length}"
        ),
        "series": None if data is None else data.names[:1000],
        "train_config": asdict(cfg),
        "final_loss": float(np.mean(losses[-20:])),
        "first_loss": float(np.mean(losses[:20])),
        "seconds": round(time.time() - started, 1),
        "torch": str(torch.__version__),
    }
    return model, summary


def train_to(
    path: str | Path, cfg: TrainConfig, progress: bool = True, data: SeriesSampler | None = None, data_description: str | None = None
) -> dict[str, Any]:
    model, summary = train(cfg, progress, data, data_description)
    save_checkpoint(path, model, summary)
    return summary
