"""The network: one small GRU cell shared by every feature channel of every stream.

Each feature of a stream is its own channel with its own hidden state, and all channels share
the weights. That keeps the model independent of how many features a stream has and of their
order, so weights pretrained on univariate synthetic series apply unchanged to a four-sensor
pump. The cell reads the online-normalised value of one event and predicts a Gaussian over the
next normalised value; the negative log-likelihood of what then arrives is the raw surprise.
"""

from __future__ import annotations

import errno
import glob
import io
import math
import os
import pickle
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

CHECKPOINT_FORMAT = "streamer-gru"
CHECKPOINT_VERSION = 1
DEFAULT_WEIGHTS = Path(__file__).with_name("weights") / "default.pt"
LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and the fixed numerics around it; saved inside every checkpoint."""

    hidden: int = 32
    max_features: int = 8
    # Normaliser: exact running mean/variance for the first 1/norm_alpha events, then an
    # exponential window of that length, so level changes are absorbed over ~1,000 events.
    norm_alpha: float = 1e-3
    # Relative and absolute floors on the normaliser's standard deviation so a flat series
    # does not divide by zero.
    rel_std_floor: float = 1e-4
    abs_std_floor: float = 1e-6
    # Bounds on the predicted log standard deviation, in normalised units.
    min_log_sigma: float = -4.0
    max_log_sigma: float = 3.0
    # A single feature's surprise is capped so one absurd value cannot dominate calibration.
    max_feature_nll: float = 200.0

    def __post_init__(self) -> None:
        # Checked here, not where a bad value would fail (allocating the state bank, mid-stream):
        # a checkpoint swapped under a running daemon must be refused whole.
        for name in ("hidden", "max_features"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model config: {name} must be a positive integer, not {value!r}")
        for name in ("norm_alpha", "rel_std_floor", "abs_std_floor", "min_log_sigma", "max_log_sigma", "max_feature_nll"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"model config: {name} must be a finite number, not {value!r}")
        if not 0.0 < self.norm_alpha <= 1.0:
            raise ValueError(f"model config: norm_alpha must be in (0, 1], not {self.norm_alpha!r}")
        if self.rel_std_floor < 0 or self.abs_std_floor <= 0 or self.max_feature_nll <= 0:
            raise ValueError("model config: rel_std_floor must be >= 0, abs_std_floor and max_feature_nll > 0")
        if self.min_log_sigma >= self.max_log_sigma:
            raise ValueError("model config: min_log_sigma must be below max_log_sigma")

    @property
    def input_size(self) -> int:
        return 2

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return config_from_dict(cls, data)


class StreamGRU(nn.Module):
    """GRU cell plus a Gaussian head; stateless, the hidden states live in the state bank."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.cell = nn.GRUCell(config.input_size, config.hidden)
        self.head = nn.Linear(config.hidden, 2)

    @staticmethod
    def encode(z: torch.Tensor) -> torch.Tensor:
        """Both a clipped linear view (precision near the mean) and asinh (range far from it)."""
        return torch.stack((z.clamp(-8.0, 8.0) / 4.0, torch.asinh(z) / 3.0), dim=-1)

    def step(self, z: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Advance channels by one event.

        z: [N] normalised values, h: [N, hidden]. Returns (new h, predicted mean of the next
        normalised value, its log standard deviation).
        """
        h_new = self.cell(self.encode(z), h)
        out = self.head(h_new)
        cfg = self.config
        log_sigma = out[:, 1].clamp(cfg.min_log_sigma, cfg.max_log_sigma)
        return h_new, out[:, 0], log_sigma


def gaussian_nll(z: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of z under N(mu, exp(log_sigma)^2), elementwise."""
    r = (z - mu) * torch.exp(-log_sigma)
    return 0.5 * r * r + log_sigma + LOG_SQRT_2PI


def config_from_dict(cls: type[Any], data: dict[str, Any]) -> Any:
    """A config dataclass from a checkpoint's dict; unknown keys are an error, not ignored."""
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
    return cls(**data)


def _new_file_mode(path: Path) -> int:
    """The mode a plain open() would give a new file (0666 less the umask), or the replaced
    file's: the file keeps the permissions its owner chose."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


def _sync_folder(folder: Path) -> None:
    """fsync a folder, so that a rename in it survives a power cut: the file's own fsync covers
    its bytes, not the entry that now names it (without this the old snapshot could come back).
    Where the platform or filesystem cannot (no O_DIRECTORY, EINVAL), the rename stands as is."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_atomically(payload: Any, path: Path) -> None:
    """torch.save to `path` through a temp file of this writer's own, fsynced, then renamed.

    Readers see the old file or the new one, never half of one, and a power cut cannot leave an
    empty file under the real name. The temp file is unique per write: two writers of one path
    (two trainings of one --out, two members sharing a state dir) must not rename each other's
    half-written file; the last complete one wins."""
    path.parent.mkdir(parents=True, exist_ok=True)  # (a state dir removed under a running daemon)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            try:
                torch.save(payload, fh)
            except RuntimeError as err:
                # torch's zip writer reports a failed write (a disk that fills up mid-file) as a
                # RuntimeError with the OSError only in its context: callers handle OSError.
                cause = err.__cause__ or err.__context__
                raise OSError(getattr(cause, "errno", None) or errno.EIO, f"writing {path}: {cause or err}") from err
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _new_file_mode(path))  # (mkstemp makes it 0600: a daemon may run as another user)
        tmp.replace(path)
        _sync_folder(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    _remove_stale_temps(path)


# A write takes seconds; a temp file of this age was left by a writer killed mid-write.
STALE_TEMP_S = 3600.0


def _remove_stale_temps(path: Path) -> None:
    """Delete temp files of `path` that a writer killed mid-write (SIGKILL, OOM, power cut) left.

    Each write has a temp file of its own, so nothing else ever replaces or removes them: a
    daemon in a crash loop would fill its state volume with copies of its snapshots. Only old
    ones go: a younger one may belong to another writer that is still writing."""
    cutoff = time.time() - STALE_TEMP_S
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        try:
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink()
        except OSError:
            pass  # (gone already, or not ours to remove: the write itself succeeded)


def write_checkpoint(
    path: str | Path, fmt: str, model: nn.Module, config: Any, training: dict[str, Any], schema: dict[str, Any] | None = None
) -> None:
    """Weights, config, the input schema the model serves and a description of the training
    data, written atomically.

    Only tensors and plain Python values go in, so the file loads with weights_only=True.
    """
    payload = {
        "format": fmt,
        "version": CHECKPOINT_VERSION,
        "config": asdict(config),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "training": training,
        **({"schema": schema} if schema is not None else {}),
    }
    save_atomically(payload, Path(path))


def read_checkpoint(path: str | Path, fmt: str, data: bytes | None = None) -> dict[str, Any]:
    """A checkpoint's payload, loaded safely (weights_only=True) and checked for format and
    version. `data`: the file's bytes, already read (path then only names it in errors)."""
    if data is None:
        data = Path(path).read_bytes()  # (an OSError here is the file's: torch's reader raised EINVAL for a cut file)
    if not data:
        raise ValueError(f"{path}: empty file, not a {fmt} checkpoint")
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # (torch's own message suggests weights_only=False, which would run the file's code)
        detail = "not a file torch.save wrote, or one holding more than tensors and values"
        raise ValueError(f"{path}: not a {fmt} checkpoint: {detail}") from None
    except (ValueError, RuntimeError, EOFError) as err:
        raise ValueError(f"{path}: not a complete checkpoint (cut short, or not a file torch.save wrote): {err}") from None
    except Exception as err:  # noqa: BLE001 (a text file, a URL saved as a file: torch's legacy reader fails in many ways, KeyError among them)
        raise ValueError(f"{path}: not a {fmt} checkpoint (not a file torch.save wrote: {type(err).__name__}: {err})") from None
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise ValueError(f"{path}: not a {fmt} checkpoint")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: checkpoint version {payload.get('version')} is not {CHECKPOINT_VERSION}")
    return payload


def feature_schema(config: ModelConfig, training: dict[str, Any]) -> dict[str, Any]:
    """What a sensor model takes: the feature schema a checkpoint carries. One set of weights
    serves every feature channel, so no feature names are bound to the weights: any stream of
    up to `max_features` numeric features is served (the daemon gives each feature a channel in
    the order the stream first sends it). The features the training series came from are listed
    for the record (the part of each series name after its last ':', at most 1,000), the public
    series mixed in included (`--public`: they were left out, as if all were synthetic)."""
    public = training.get("public") or {}
    names = [str(s).rsplit(":", 1)[-1] for s in [*(training.get("series") or []), *(public.get("series") or [])]]
    if names and not training.get("series"):
        names.append("synthetic series (models/synthetic.py)")
    return {
        "max_features": config.max_features,
        "features": "any names, numeric values: one set of weights for every feature channel",
        "trained_on": sorted(set(names))[:1000] if names else "synthetic series (models/synthetic.py)",
    }


def save_checkpoint(path: str | Path, model: StreamGRU, training: dict[str, Any]) -> None:
    write_checkpoint(path, CHECKPOINT_FORMAT, model, model.config, training, feature_schema(model.config, training))


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", data: bytes | None = None) -> tuple[StreamGRU, dict[str, Any]]:
    """Load a checkpoint safely; returns the model in eval mode and its metadata."""
    payload = read_checkpoint(path, CHECKPOINT_FORMAT, data)
    model = StreamGRU(ModelConfig.from_dict(payload["config"]))
    model.load_state_dict(payload["state_dict"])
    bad = [name for name, value in model.state_dict().items() if not bool(torch.isfinite(value).all())]
    if bad:
        # One NaN weight makes every score NaN and the calibration's bin index garbage.
        raise ValueError(f"{path}: weights are not all finite ({', '.join(bad)})")
    model.to(device).eval()
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    meta.setdefault("schema", feature_schema(model.config, meta.get("training") or {}))  # (files written before it)
    return model, meta
