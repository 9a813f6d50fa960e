"""The log network: a GRU cell per stream over (template, level, timing, numbers), three heads.

Each event is read as: its template's embedding row, a flag for "template never seen
before", the level one-hot, the log inter-arrival time since the stream's previous event (in
absolute units and normalised by the stream's own history), and up to a few numeric
parameters. From the hidden state after an event the heads predict the next event of the
stream: a softmax over the live template rows plus one NEW class ("a template not seen yet"),
a softmax over levels, and a Gaussian over the next log inter-arrival, normalised by the
stream's running mean and variance of it (as the sensor model normalises values), so one set
of weights serves a 10 s heartbeat and a 100/s request log, and a burst or a silence is
surprising from the start, before the weights have learned anything about the stream.

Why a row table and not hashing: a hash into fixed rows makes two templates share an
embedding and an output row for good; Drain3's LRU bound (see templates.py) gives every live
template its own row, and a row is re-initialised when it passes to a new template.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.gru import config_from_dict, read_checkpoint, write_checkpoint

CHECKPOINT_FORMAT = "streamer-log-gru"
# Where pretrained log weights would live; none are bundled (see models/logs/__init__.py), and
# `streamer.logeval` falls back to the deterministic initialisation when the file is absent.
DEFAULT_LOG_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "logs.pt"
LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
N_LEVELS = 7  # streamer.logformats.LEVEL_NAMES: unknown + TRACE..FATAL


@dataclass(frozen=True)
class LogModelConfig:
    """Architecture and fixed numerics; saved inside every checkpoint and snapshot."""

    vocab: int = 1024  # template rows; must equal the miner's max_templates
    embed: int = 16
    hidden: int = 32
    max_params: int = 4
    seed: int = 0  # deterministic initialisation of weights and of recycled rows
    dt_eps_s: float = 1e-3  # u = log(dt_s + eps): same-millisecond lines stay finite
    norm_alpha: float = 0.01  # per-stream normaliser of u: exact for 100 events, then EW
    u_std_floor: float = 0.05  # added (in quadrature) to the normaliser's standard deviation
    min_log_sigma: float = -2.5
    max_log_sigma: float = 3.0
    max_term_nll: float = 60.0  # cap on one term's surprise (nats)
    # Evidence behind the score (see detector.py): prior log-odds per level step above INFO, and
    # the noise floor below which a template or timing p-value adds nothing (-log p nats).
    severity_prior: float = 2.0
    evidence_floor: float = 3.0

    @property
    def new_class(self) -> int:
        return self.vocab

    @property
    def feats(self) -> int:
        """Dense per-event inputs besides the embedding: new flag, 3 timing, numbers + mask."""
        return 4 + 2 * self.max_params

    @property
    def input_size(self) -> int:
        return self.embed + N_LEVELS + self.feats

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LogModelConfig:
        return config_from_dict(cls, data)


class LogGRU(nn.Module):
    """Embedding + GRU cell + heads; stateless, the hidden states live in the state bank."""

    def __init__(self, config: LogModelConfig) -> None:
        super().__init__()
        self.config = config
        gen = torch.Generator().manual_seed(config.seed)
        self.embedding = nn.Embedding(config.vocab, config.embed)
        self.cell = nn.GRUCell(config.input_size, config.hidden)
        self.template_head = nn.Linear(config.hidden, config.vocab + 1)
        # p(template | level, h): a per-level bias on the template logits. Templates are
        # predicted within the line's own level, so a new FATAL message is judged against how
        # varied FATAL messages are, and how severe the line is stays a separate term.
        self.level_template = nn.Embedding(N_LEVELS, config.vocab + 1)
        self.level_head = nn.Linear(config.hidden, N_LEVELS)
        # p(gap | template, level, h): the gap before a line depends on what the line is (a
        # WARN right after the response it is about, a heartbeat 10 s after the last one).
        self.timing_head = nn.Linear(config.hidden + config.embed + N_LEVELS, 2)
        # Deterministic initialisation (torch's default draws from the global generator).
        with torch.no_grad():
            for p in self.parameters():
                bound = 1.0 / math.sqrt(max(1, p.shape[-1] if p.dim() > 1 else config.hidden))
                p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)
            self.template_head.weight.zero_()
            self.template_head.bias.zero_()
            self.level_template.weight.zero_()
            self.level_head.bias.zero_()
            self.reset_rows(torch.arange(config.vocab))

    @torch.no_grad()
    def reset_rows(self, rows: torch.Tensor) -> None:
        """Give template rows their initial weights: a fixed pseudo-random embedding per row
        (so a new template is distinguishable at once) and the NEW class's output weights (so
        its second occurrence starts as likely as a new template was)."""
        if rows.numel() == 0:
            return
        cfg = self.config
        for r in rows.tolist():
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + int(r) + 1)
            self.embedding.weight[r] = torch.randn(cfg.embed, generator=gen) / math.sqrt(cfg.embed)
        self.template_head.weight[rows] = self.template_head.weight[cfg.new_class].clone()
        self.template_head.bias[rows] = self.template_head.bias[cfg.new_class].clone()
        self.level_template.weight[:, rows] = self.level_template.weight[:, cfg.new_class : cfg.new_class + 1].clone()

    def step(self, row: torch.Tensor, level: torch.Tensor, feats: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Advance B streams by one event: row, level int64 [B]; feats float32 [B, feats]; h [B, H]."""
        x = torch.cat((self.embedding(row), nn.functional.one_hot(level, N_LEVELS).to(feats.dtype), feats), dim=-1)
        return self.cell(x, h)

    def heads(
        self, h: torch.Tensor, active: torch.Tensor, level: torch.Tensor, row: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Predictions for the next event, factorised p(level) p(template | level) p(gap |
        template, level): log-probs over rows + NEW [B, V+1] given the event's level (inactive
        rows at -inf), log-probs over levels [B, L], and mean and log sigma of the event's
        normalised gap given its template row and level [B]."""
        logits = (self.template_head(h) + self.level_template(level)).masked_fill(~active, float("-inf"))
        t = self.timing_head(torch.cat((h, self.embedding(row), nn.functional.one_hot(level, N_LEVELS).to(h.dtype)), dim=-1))
        cfg = self.config
        return (
            torch.log_softmax(logits, dim=-1),
            torch.log_softmax(self.level_head(h), dim=-1),
            t[:, 0],
            t[:, 1].clamp(cfg.min_log_sigma, cfg.max_log_sigma),
        )


def save_log_checkpoint(path: str | Path, model: LogGRU, training: dict[str, Any]) -> None:
    """Weights, config and a description of the (synthetic) training data; weights_only-safe."""
    write_checkpoint(path, CHECKPOINT_FORMAT, model, model.config, training)


def load_log_checkpoint(path: str | Path) -> tuple[LogGRU, dict[str, Any]]:
    """Load with weights_only=True; the model comes back on CPU in eval mode."""
    payload = read_checkpoint(path, CHECKPOINT_FORMAT)
    model = LogGRU(LogModelConfig.from_dict(payload["config"]))
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return model, {k: v for k, v in payload.items() if k != "state_dict"}
