"""Training data for `streamer train`: CSV or Parquet files, or a replayed Kafka topic range.

Everything becomes named univariate series (the model is channel-independent): each numeric
column of a file, or each feature of each stream of a topic, decoded by the daemon's own
decoder so the training data is exactly what the daemon would have scored.
"""

from __future__ import annotations

import csv
import math
import re
import sys
from array import array
from pathlib import Path
from typing import Any

import numpy as np

from streamer.config import InputConfig

# Cells that mean "no reading" in the CSVs people export (pandas, R, spreadsheets): gaps, like
# an empty cell, not text that would make the whole column a non-series.
_GAPS = {"", "na", "n/a", "#n/a", "<na>", "nan", "null", "none", "-"}


# Numeric columns that are not measurements: the index pandas writes with `to_csv()` (an empty
# header or "Unnamed: 0") and epoch time columns. Trained as series they are pure ramps.
_NOT_SERIES = re.compile(r"(|index|unnamed: \d+|__index_level_\d+__|ts|time|timestamp|epoch|date|datetime)", re.IGNORECASE)


def load_files(paths: list[str], columns: list[str] | None = None, skipped: list[str] | None = None) -> dict[str, np.ndarray]:
    """Numeric columns of CSV files (header row) and Parquet files (needs pyarrow), one series
    each, named by the file's path as given and the column (two folders' metrics.csv stay two).

    `columns`: only these (by header name; one that no file has is an error, so a typo does not
    train on nothing). Without it, index and time columns are left out and named in `skipped`."""
    out: dict[str, np.ndarray] = {}
    picked: set[str] = set()
    for p in map(Path, paths):
        if not p.exists():  # (a pipe counts: `streamer train <(zcat data.csv.gz)`)
            raise ValueError(f"{p}: no such file")
        if p.suffix.lower() == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise SystemExit(f"{p}: reading Parquet needs pyarrow (pip install pyarrow)") from None
            table = pq.read_table(p)
            found = {}
            for name in table.column_names:
                col = table.column(name).to_numpy(zero_copy_only=False)
                if np.issubdtype(col.dtype, np.number) and not np.issubdtype(col.dtype, np.bool_):
                    found[name] = col.astype(np.float64)
        else:
            found = _csv_columns(p)
        for name, values in found.items():
            if columns is None and _NOT_SERIES.fullmatch(name.strip()):
                if skipped is not None:
                    skipped.append(f"{p}:{name}")
            elif columns is None or name.strip() in columns:
                out[f"{p}:{name}"] = values
                picked.add(name.strip())
    missing = [c for c in columns or [] if c not in picked]
    if missing:
        raise ValueError(f"--columns: no numeric column named {', '.join(map(repr, missing))} in the files")
    return out


def _csv_columns(p: Path) -> dict[str, np.ndarray]:
    """Streamed row by row into one float array per column (8 bytes a value: a file of millions
    of rows is not held as Python objects). A column with a cell that is neither a number nor a
    gap is text (a timestamp, a label) and dropped; a short row's missing cells are gaps, a long
    row's extra cells belong to no column and are ignored."""
    with p.open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None) or []
        columns: list[array[float] | None] = [array("d") for _ in header]
        for row in reader:
            for k, cell in enumerate(row[: len(header)]):
                col = columns[k]
                if col is None:
                    continue
                cell = cell.strip()
                if cell.lower() in _GAPS:
                    continue
                try:
                    v = float(cell)
                except ValueError:
                    columns[k] = None
                    continue
                if math.isfinite(v):
                    col.append(v)
    return {name: np.frombuffer(col, dtype=np.float64).copy() for name, col in zip(header, columns) if col}


def load_topic(
    client_options: dict[str, Any],
    input_cfg: InputConfig,
    topic: str,
    start: int,
    end: int | None,
    max_features: int,
    timeout_s: float = 10.0,
) -> dict[str, np.ndarray]:
    """Every partition of `topic` from offset `start` to `end` (exclusive; None or beyond the
    current end: the current end), decoded as the daemon with `input_cfg` decodes (bad records
    are skipped), as one series per stream feature. Connects with the daemon's `kafka` options
    (TLS, SASL). Says on stderr when it stopped early because no record came for `timeout_s`."""
    import time

    from kafka import KafkaConsumer, TopicPartition

    from streamer.decode import Decoder

    # (earliest: a --from-offset that retention has deleted starts at the log's start, not its end)
    consumer = KafkaConsumer(**client_options, group_id=None, enable_auto_commit=False, auto_offset_reset="earliest")
    parts = sorted(consumer.partitions_for_topic(topic) or ())
    if not parts:
        raise SystemExit(f"topic {topic!r} not found at {client_options.get('bootstrap_servers')}")
    tps = [TopicPartition(topic, p) for p in parts]
    consumer.assign(tps)
    for tp in tps:
        consumer.seek(tp, start)
    decoder = Decoder(max_features, input_cfg.max_message_bytes, input_cfg.max_stream_id_length, input_cfg.stream_field)
    series: dict[str, list[float]] = {}
    done: set[int] = set()
    idle_since = time.monotonic()
    while len(done) < len(tps) and time.monotonic() - idle_since < timeout_s:
        batch = consumer.poll(timeout_ms=500)
        if batch:
            idle_since = time.monotonic()
        for tp, recs in batch.items():
            recs = [r for r in recs if end is None or r.offset < end]
            if end is not None and len(recs) < len(batch[tp]):
                done.add(tp.partition)
            dec = decoder.decode([r.value for r in recs], [r.key for r in recs], np.array([r.timestamp for r in recs], dtype=np.int64))
            for j, stream in enumerate(dec.stream):
                for k, name in enumerate(decoder.schemas[stream]):
                    series.setdefault(f"{stream}:{name}", []).append(float(dec.x[j, k]))
        for tp in tps:
            hw = consumer.highwater(tp)
            position = consumer.position(tp)
            if (hw is not None and position >= hw) or (end is not None and position >= end):
                done.add(tp.partition)
    if len(done) < len(tps):
        left = {tp.partition: consumer.position(tp) for tp in tps if tp.partition not in done}
        print(f"streamer train: no record for {timeout_s:.0f}s, stopped early at positions {left}", file=sys.stderr)
    consumer.close()
    return {k: np.asarray(v) for k, v in series.items()}


# Time series that ship inside the statsmodels wheel (no download): weekly CO2 at Mauna Loa,
# yearly sunspots, the Nile's yearly flow, monthly El Nino sea temperatures, US quarterly
# macro series, monthly electrical equipment orders, quarterly inflation and interest rates.
# Real measurements with the seasonalities, trends, cycles and regime changes that the synthetic
# families imitate; none of them is from NAB.
STATSMODELS_SERIES: dict[str, list[str]] = {
    "co2": ["co2"],
    "sunspots": ["SUNACTIVITY"],
    "nile": ["volume"],
    "elnino": ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"],
    "macrodata": ["realgdp", "realcons", "realinv", "realgovt", "realdpi", "cpi", "m1", "tbilrate", "unemp", "pop", "infl", "realint"],
    "elec_equip": ["orders"],
    "interest_inflation": ["Dp", "R"],
}
# One row per year and one column per month: a single series, read row by row.
STATSMODELS_ROW_BY_ROW = {"elnino"}
STATSMODELS_RENAME = {"elec_equip": {"STS.M.I7.W.TOVT.NS0016.4.000": "orders"}}


def load_statsmodels() -> dict[str, np.ndarray]:
    """The public series bundled with statsmodels (`pip install statsmodels`, or the `train`
    extra), one training series per column; gaps (CO2 has missing weeks) are interpolated."""
    try:
        import importlib

        import statsmodels  # noqa: F401
    except ImportError:
        raise SystemExit("--public needs statsmodels (pip install 'streamer[train]' or pip install statsmodels)") from None
    out: dict[str, np.ndarray] = {}
    for name, cols in STATSMODELS_SERIES.items():
        frame = importlib.import_module(f"statsmodels.datasets.{name}").load_pandas().data
        frame = frame.rename(columns=STATSMODELS_RENAME.get(name, {}))
        if name in STATSMODELS_ROW_BY_ROW:
            out[f"statsmodels:{name}"] = frame[cols].to_numpy(dtype=np.float64).ravel()
            continue
        for col in cols:
            out[f"statsmodels:{name}:{col}"] = frame[col].to_numpy(dtype=np.float64)
    for key, values in out.items():
        ok = np.isfinite(values)
        out[key] = np.interp(np.arange(len(values)), np.flatnonzero(ok), values[ok])
    return out
