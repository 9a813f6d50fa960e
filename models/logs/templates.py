"""Template mining with Drain3, one miner per partition, and the template id -> embedding row table.

Scope: one miner per input partition, not one per topic. The daemon's state belongs to
partitions (snapshot + replay from its offset rebuilds it exactly), so everything a stream's
scores depend on must be part of its partition's state and must evolve only with that
partition's records. A miner shared by a topic would be advanced by other partitions'
records in whatever order polls interleave them, so template ids (and the GRU's embedding
rows behind them) would differ between an uninterrupted run and a restart, and between the
host that owns a partition now and the next one. The cost is that the same template has
different ids on different partitions; ids are only meaningful together with the partition's
model, which is snapshotted with them.

Bound: at most `max_templates` live templates, which is also the number of embedding rows.
Drain3's own LRU (`max_clusters`) evicts the template least recently matched when a new one
needs room; its row is then recycled for the new template (and the model re-initialises that
row's weights, see `LogDetector.reset_rows`). Template ids are Drain3's cluster ids: they
only increase, so an evicted template that comes back gets a new id and is "new" again.

State format: plain JSON (`to_bytes`/`from_bytes`), not Drain3's jsonpickle snapshot.
jsonpickle can instantiate arbitrary classes while decoding, so a tampered snapshot file would
be code execution; this format holds only strings, ints and lists, and is rebuilt into Drain3's
own objects (clusters in LRU order, the prefix tree as it was, the id counter), so mining
after a restore is identical to mining without one.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import orjson
from drain3 import TemplateMiner
from drain3.drain import LogCluster, LogClusterCache, Node
from drain3.masking import MaskingInstruction
from drain3.template_miner_config import TemplateMinerConfig

STATE_FORMAT = "streamer-log-templates"
STATE_VERSION = 1
NO_TEMPLATE = -1

_B = r"((?<=[^A-Za-z0-9])|^)"
_E = r"((?=[^A-Za-z0-9])|$)"
# Order matters: the broad NUM mask last, so addresses and ids keep their own names.
MASKS: tuple[tuple[str, str], ...] = (
    (_B + r"([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})" + _E, "UUID"),
    (_B + r"(\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}(:\d{1,5})?)" + _E, "IP"),
    (_B + r"(([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2})" + _E, "MAC"),
    (_B + r"(0x[0-9a-fA-F]+)" + _E, "HEX"),
    (_B + r"(blk_-?\d+)" + _E, "BLOCK"),
    (_B + r"((?=[0-9a-fA-F]*\d)(?=[0-9a-fA-F]*[a-fA-F])[0-9a-fA-F]{8,})" + _E, "ID"),
    (_B + r"([\-+]?\d+(\.\d+)?)" + _E, "NUM"),
)
# Numeric parameters the model reads: plain numbers in the message (ids and addresses are not
# quantities, so only what the NUM mask would take).
_NUMBER = re.compile(_B + r"([\-+]?\d+(?:\.\d+)?)" + _E)


@dataclass(frozen=True)
class MinerConfig:
    """Drain3 settings; part of the partition state, since ids depend on them."""

    max_templates: int = 1024  # live templates, also the embedding rows of the model
    sim_th: float = 0.4
    depth: int = 4
    max_children: int = 100
    max_params: int = 4  # numeric parameters kept per line

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MinerConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class Mined:
    """Per line: template id, embedding row, whether the template was new, text, numbers."""

    template_id: np.ndarray  # int64 [N]
    row: np.ndarray  # int64 [N]
    is_new: np.ndarray  # bool [N]: no earlier line had this template (target is the NEW class)
    text: list[str]  # the template as it stood right after this line
    params: np.ndarray  # float64 [N, P], 0 where absent
    params_mask: np.ndarray  # bool [N, P]
    # (position in the batch, row, evicted template id, its last text): rows handed to a new template
    recycled: list[tuple[int, int, int, str]]


def _miner_config(cfg: MinerConfig) -> TemplateMinerConfig:
    mc = TemplateMinerConfig()
    mc.drain_sim_th = cfg.sim_th
    mc.drain_depth = cfg.depth
    mc.drain_max_children = cfg.max_children
    mc.drain_max_clusters = cfg.max_templates
    mc.masking_instructions = [MaskingInstruction(p, name) for p, name in MASKS]
    mc.parametrize_numeric_tokens = True
    mc.snapshot_compress_state = False
    return mc


def numeric_params(message: str, k: int) -> list[float]:
    """The first k plain numbers in the message (quantities such as sizes and durations)."""
    out: list[float] = []
    for m in _NUMBER.finditer(message):
        try:
            v = float(m.group(2))
        except ValueError:
            continue
        if not np.isfinite(v):  # 309 digits or more: inf, which would turn the weights into NaN
            continue
        out.append(v)
        if len(out) == k:
            break
    return out


class TemplateBook:
    """A Drain3 miner plus the bounded template id <-> row table; all of it is partition state."""

    def __init__(self, config: MinerConfig | None = None) -> None:
        self.config = config or MinerConfig()
        self.miner = TemplateMiner(config=_miner_config(self.config))
        # Mirror of Drain3's LRU order (least recent first): Drain3 touches a cluster only in
        # add_log_message, so this is exact, and it is what the snapshot restores the LRU from.
        self.lru: OrderedDict[int, None] = OrderedDict()
        self.row_of: dict[int, int] = {}
        self.tid_of_row = np.full(self.config.max_templates, NO_TEMPLATE, dtype=np.int64)
        self._free = list(range(self.config.max_templates - 1, -1, -1))

    def __len__(self) -> int:
        return len(self.row_of)

    @property
    def active_rows(self) -> np.ndarray:
        """bool [V]: rows that hold a live template (the others are masked out of the softmax)."""
        return self.tid_of_row != NO_TEMPLATE

    def template(self, tid: int) -> str | None:
        cluster = self.miner.drain.id_to_cluster.get(tid)
        return None if cluster is None else cluster.get_template()

    def _assign_row(self, tid: int) -> tuple[int, bool]:
        recycled = False
        if not self._free:
            # Drain3 has just evicted its least recently used cluster to make room; take its row.
            gone = [t for t in self.row_of if t not in self.miner.drain.id_to_cluster]
            for t in gone:
                self._free.append(self.row_of.pop(t))
                self.tid_of_row[self._free[-1]] = NO_TEMPLATE
            recycled = True
        row = self._free.pop()
        self.row_of[tid] = row
        self.tid_of_row[row] = tid
        return row, recycled

    def add(self, messages: list[str]) -> Mined:
        """Mine lines in order. A line's template id and row are final when it is mined."""
        n = len(messages)
        k = self.config.max_params
        tids = np.empty(n, dtype=np.int64)
        rows = np.empty(n, dtype=np.int64)
        new = np.zeros(n, dtype=bool)
        params = np.zeros((n, k), dtype=np.float64)
        pmask = np.zeros((n, k), dtype=bool)
        texts: list[str] = []
        recycled: list[tuple[int, int, int, str]] = []
        limit = self.config.max_templates
        for i, msg in enumerate(messages):
            # When full, the LRU template is the one Drain3 evicts if this line makes a new one.
            lru_tid = next(iter(self.lru)) if len(self.lru) >= limit else NO_TEMPLATE
            lru_text = self.template(lru_tid) if lru_tid != NO_TEMPLATE else None
            res = self.miner.add_log_message(msg)
            tid = int(res["cluster_id"])
            if res["change_type"] == "cluster_created":
                row, was_recycled = self._assign_row(tid)
                new[i] = True
                if was_recycled:
                    recycled.append((i, row, lru_tid, lru_text or ""))
                # Drain3 evicts the LRU cluster when the cache is full; keep the mirror in step.
                while len(self.lru) >= limit:
                    self.lru.popitem(last=False)
            else:
                row = self.row_of[tid]
            self.lru[tid] = None
            self.lru.move_to_end(tid)
            tids[i] = tid
            rows[i] = row
            texts.append(res["template_mined"])
            nums = numeric_params(msg, k)
            params[i, : len(nums)] = nums
            pmask[i, : len(nums)] = True
        return Mined(tids, rows, new, texts, params, pmask, recycled)

    # -- state -----------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """JSON: config, id counter, clusters (id, size, tokens) least recently used first,
        the prefix tree, and the row table."""
        drain = self.miner.drain
        clusters = []
        for tid in self.lru:
            c = drain.id_to_cluster.get(tid)
            if c is not None:
                clusters.append([c.cluster_id, c.size, list(c.log_template_tokens)])

        def node(n: Node) -> dict[str, Any]:
            return {"c": list(n.cluster_ids), "k": {tok: node(child) for tok, child in n.key_to_child_node.items()}}

        payload = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "config": asdict(self.config),
            "counter": drain.clusters_counter,
            "clusters": clusters,
            "tree": node(drain.root_node),
            "rows": [[tid, row] for tid, row in self.row_of.items()],
            "free": self._free,
        }
        return orjson.dumps(payload)

    @classmethod
    def from_bytes(cls, data: bytes) -> TemplateBook:
        """Rebuild a book from `to_bytes`; raises ValueError on anything unexpected."""
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError as err:
            raise ValueError(f"template state is not JSON: {err}") from None
        if not isinstance(payload, dict) or payload.get("format") != STATE_FORMAT or payload.get("version") != STATE_VERSION:
            raise ValueError("not a template state of this version")
        book = cls(MinerConfig.from_dict(payload["config"]))
        drain = book.miner.drain
        cache = LogClusterCache(maxsize=book.config.max_templates)
        for tid, size, tokens in payload["clusters"]:
            cluster = LogCluster([str(t) for t in tokens], int(tid))
            cluster.size = int(size)
            cache[int(tid)] = cluster  # insertion in LRU order rebuilds the eviction order
            book.lru[int(tid)] = None
        drain.id_to_cluster = cache
        drain.clusters_counter = int(payload["counter"])

        def build(d: dict[str, Any]) -> Node:
            n = Node()
            n.cluster_ids = [int(c) for c in d["c"]]
            n.key_to_child_node = {str(tok): build(child) for tok, child in d["k"].items()}
            return n

        drain.root_node = build(payload["tree"])
        book.row_of = {int(tid): int(row) for tid, row in payload["rows"]}
        book.tid_of_row[:] = NO_TEMPLATE
        for tid, row in book.row_of.items():
            book.tid_of_row[row] = tid
        book._free = [int(r) for r in payload["free"]]
        return book
