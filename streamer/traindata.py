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
_NOT_SERIES = re.compile(r"(|index|unnamed: \d+|__index_level_\d+__|ts|time|timestamp|epoch|date|datetime)(\.\d+)?", re.IGNORECASE)


class DataUnavailable(RuntimeError):
    """What the data needs and this host lacks (a library, a topic on the brokers): the command
    exits 1, as for a broker it cannot reach, not 2 as for bad arguments."""


def load_files(
    paths: list[str], columns: list[str] | None = None, skipped: list[str] | None = None, notes: list[str] | None = None
) -> dict[str, np.ndarray]:
    """Numeric columns of CSV files (header row) and Parquet files (needs pyarrow), one series
    each, named by the file's path as given and the column (two folders' metrics.csv stay two).

    `columns`: only these (by header name; one that no file has is an error, so a typo does not
    train on nothing). Without it, index and time columns are left out and named in `skipped`.
    `notes` gets the text columns left out and the stray cells read as gaps."""
    out: dict[str, np.ndarray] = {}
    picked: set[str] = set()
    for p in map(Path, paths):
        if not p.exists():  # (a pipe counts: `streamer train <(zcat data.csv.gz)`)
            raise ValueError(f"{p}: no such file")
        kind = _file_kind(p)
        if kind == "csv" and p.is_dir():  # (it said "[Errno 21] Is a directory")
            raise ValueError(f"{p}: a folder; name its files ({p}/*.csv), or a folder of Parquet parts named *.parquet")
        if kind == "gzip":
            raise ValueError(f"{p}: gzip-compressed; decompress it first (or pass <(zcat {p}))")
        if kind == "parquet":
            found = _parquet_columns(p, notes, skipped if columns is None else None)
        else:
            try:
                found = _csv_columns(p, notes, skipped if columns is None else None)
            except UnicodeDecodeError as err:
                # (No position: the decoder's counts from the start of its chunk, not of the file.)
                raise ValueError(f"{p}: not a UTF-8 CSV file (it holds the byte {err.object[err.start : err.start + 1]!r})") from None
            except csv.Error as err:
                raise ValueError(f"{p}: {err}") from None
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


def _parquet_columns(p: Path, notes: list[str] | None = None, skipped: list[str] | None = None) -> dict[str, np.ndarray]:
    """Numeric columns of a Parquet file, as `_csv_columns` reads a CSV's: nulls, NaN and
    infinities are gaps, a column of gaps only is none, what is left out is said. Decimals (a
    database's NUMERIC) are numbers: read as Python objects they were left out as "not numeric".
    Booleans are not, as the daemon refuses them (`non_numeric`). An index or time column that is
    not numeric (a timestamp-typed one) goes to `skipped`, as a numeric one does in `load_files`."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataUnavailable(f"{p}: reading Parquet needs pyarrow (pip install pyarrow, or the `parquet` extra)") from None
    try:
        # (ParquetFile: read_table refused a column name given twice; read_table for a folder of
        # parts, as Spark and pandas' partition_cols write "x.parquet")
        table = pq.read_table(p) if p.is_dir() else pq.ParquetFile(p).read()
    except (OSError, ValueError) as err:  # (pyarrow's errors name no file)
        raise ValueError(f"{p}: not a readable Parquet file: {err}") from None
    found = {}
    # (By position: a name given twice made table.column(name) raise.)
    for k, name in enumerate(_unique(list(table.column_names), p, notes)):
        column = table.column(k)
        if pa.types.is_dictionary(column.type) and pa.types.is_decimal(column.type.value_type):
            column = pa.chunked_array([chunk.dictionary_decode() for chunk in column.chunks], column.type.value_type)
        if pa.types.is_decimal(column.type):
            column = column.cast(pa.float64())
        elif pa.types.is_duration(column.type):  # (as timedelta64 a null became -9.2e18, not a gap)
            column = column.cast(pa.int64())
        col = column.to_numpy(zero_copy_only=False)
        if np.issubdtype(col.dtype, np.number) and not np.issubdtype(col.dtype, np.bool_):
            values = col.astype(np.float64)
            values = values[np.isfinite(values)]  # NaN (a null), inf: gaps, skipped as in a CSV
            if values.size:  # (a column of gaps only is no series, as in a CSV)
                found[name] = values
        elif _NOT_SERIES.fullmatch(name.strip()):
            if skipped is not None:
                skipped.append(f"{p}:{name}")
        elif notes is not None:
            notes.append(f"{p}:{name}: not numeric ({column.type}), left out")
    return found


def _file_kind(p: Path) -> str:
    """The kind of a file: "parquet" by its name or its magic bytes (a `.pq` file was read as
    CSV, its binary bytes as a few stray cells), "gzip" by its magic bytes (read as CSV, it failed
    with a bare codec error naming no file), else "csv". A pipe is not peeked at: what is read
    from it is gone."""
    if p.suffix.lower() == ".parquet":
        return "parquet"
    if not p.is_file():
        return "csv"
    with p.open("rb") as fh:
        head = fh.read(4)
        if head == b"PAR1" and p.stat().st_size >= 12:  # (a Parquet file also ends with it: a CSV may begin "PAR1,")
            fh.seek(-4, 2)
            if fh.read(4) == b"PAR1":
                return "parquet"
    return "gzip" if head[:2] == b"\x1f\x8b" else "csv"


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _unique(header: list[str], p: Path, notes: list[str] | None) -> list[str]:
    """Column names made unique as pandas does (`temp`, `temp.1`): keyed by name, a repeated
    header dropped all but one of its columns without a word. A repeated empty header (the
    levels of a MultiIndex pandas wrote) is `Unnamed: N`, as pandas reads it: an index column,
    left out (renamed `.1` it was trained as a series)."""
    seen: dict[str, int] = {}
    out = []
    for k, name in enumerate(header):
        if name in seen and not name.strip():
            out.append(f"Unnamed: {k}")
        elif name in seen:
            seen[name] += 1
            new = f"{name}.{seen[name]}"
            while new in header or new in seen:
                seen[name] += 1
                new = f"{name}.{seen[name]}"
            if notes is not None:
                notes.append(f"{p}: column {name!r} appears more than once; read as {new!r}")
            seen[new] = 0
            out.append(new)
        else:
            seen[name] = 0
            out.append(name)
    return out


# A column with at most this share of its cells neither a number nor a gap is numeric with stray
# cells (read as gaps, and said); above it, it is text (a label, a date) and left out (also said).
# One "abc" among 49 readings dropped the whole column without a word.
TEXT_CELL_SHARE = 0.05


def _csv_columns(p: Path, notes: list[str] | None = None, skipped: list[str] | None = None) -> dict[str, np.ndarray]:
    """Streamed row by row into one float array per column (8 bytes a value: a file of millions
    of rows is not held as Python objects). Cells that are neither numbers nor gaps make a column
    text past TEXT_CELL_SHARE of its cells; what was left out or read as a gap goes to `notes`.
    A short row's missing cells are gaps, a long row's extra cells belong to no column. A text
    column named as an index or time column (ISO dates) goes to `skipped`, as a numeric one does
    in `load_files`: left out without a word, it was not named as the README says."""
    # (utf-8-sig: spreadsheets' "CSV UTF-8" starts with a byte-order mark, which made the first
    # header "\ufefftimestamp": its time column was trained as a series and --columns missed it.)
    with p.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        first = next(reader, [])
        if first and notes is not None and all(_is_number(h) for h in first):
            notes.append(f"{p}: its first row ({','.join(first)[:60]}) is read as column names; if it is data, add a header row")
        if len(first) == 1 and first[0].count(";") >= 1 and notes is not None:
            notes.append(f"{p}: one column named {first[0][:60]!r}: read as comma-separated, the file looks separated by ';'")
        header = _unique(first, p, notes)
        columns = [array("d") for _ in header]
        bad = [0] * len(header)
        example: list[str | None] = [None] * len(header)
        for row in reader:
            for k, cell in enumerate(row[: len(header)]):
                cell = cell.strip()
                if cell.lower() in _GAPS:
                    continue
                try:
                    v = float(cell)
                except ValueError:
                    bad[k] += 1
                    example[k] = example[k] or cell[:40]
                    continue
                if math.isfinite(v):
                    columns[k].append(v)
    out = {}
    for name, col, n_bad, ex in zip(header, columns, bad, example):
        if n_bad > TEXT_CELL_SHARE * (n_bad + len(col)):
            if _NOT_SERIES.fullmatch(name.strip()):
                if skipped is not None:
                    skipped.append(f"{p}:{name}")
            elif notes is not None:
                notes.append(f"{p}:{name}: text ({n_bad:,} cells such as {ex!r}), left out")
            continue
        if n_bad and notes is not None:
            plural = "s" * (n_bad != 1)
            notes.append(f"{p}:{name}: {n_bad:,} non-numeric cell{plural} (such as {ex!r}) read as gap{plural}")
        if col:
            out[name] = np.frombuffer(col, dtype=np.float64).copy()
    return out


def load_topic(
    client_options: dict[str, Any],
    input_cfg: InputConfig,
    topic: str,
    start: int,
    end: int | None,
    max_features: int,
    timeout_s: float = 10.0,
    read: dict[int, tuple[int, int] | None] | None = None,
    skipped: dict[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """Every partition of `topic` from offset `start` to `end` (exclusive; None or beyond the end:
    the end), decoded as the daemon with `input_cfg` decodes, as one series per stream feature.
    Each partition's end is taken once, from the first fetch (the broker's high watermark then;
    not ListOffsets, which Tansu under-reports): records produced while it replays a live topic
    are not read, so the data is the range it reports. Connects with the daemon's `kafka` options
    (TLS, SASL). Says on stderr when it stopped early because no record came for `timeout_s`.

    `read`, when given, gets each partition's first and last offset read (None: none read);
    `skipped`, the number of records the daemon would dead-letter, by reason."""
    import time

    from kafka import KafkaConsumer, TopicPartition

    from streamer.decode import Decoder

    # (earliest: a log start that retention moves on while replaying is where it goes on from)
    consumer = KafkaConsumer(**client_options, group_id=None, enable_auto_commit=False, auto_offset_reset="earliest")
    try:
        parts = sorted(consumer.partitions_for_topic(topic) or ())
        if not parts:
            raise DataUnavailable(f"topic {topic!r} not found at {client_options.get('bootstrap_servers')}")
        tps = [TopicPartition(topic, p) for p in parts]
        # (a --from-offset that retention has deleted starts at the log's start)
        log_start = consumer.beginning_offsets(tps)
        first = {tp: max(start, log_start[tp]) for tp in tps}
        left = [tp for tp in tps if end is None or first[tp] < end]
        stop: dict[Any, int] = {}  # each partition's end, fixed at its first fetch
        decoder = Decoder(max_features, input_cfg.max_message_bytes, input_cfg.max_stream_id_length, input_cfg.stream_field)
        series: dict[str, array[float]] = {}  # (8 bytes a value, as the CSV reader's; a list held ~32)
        span: dict[int, tuple[int, int] | None] = dict.fromkeys(parts)
        dead: dict[str, int] = {}
        if left:
            consumer.assign(left)
            for tp in left:
                consumer.seek(tp, first[tp])
        idle_since = time.monotonic()
        while left and time.monotonic() - idle_since < timeout_s:
            batch = consumer.poll(timeout_ms=500)
            if batch:
                idle_since = time.monotonic()
            for tp in left:
                hw = consumer.highwater(tp) if tp not in stop else None  # (set by the fetches this poll parsed)
                if hw is not None:
                    stop[tp] = hw if end is None else min(end, hw)
            past = set()
            for tp, recs in batch.items():
                if recs and recs[0].offset < first[tp]:
                    # Reset to the log's start: --from-offset was past the partition's end.
                    past.add(tp)
                    continue
                recs = [r for r in recs if r.offset < stop.get(tp, math.inf)]
                if not recs:
                    continue
                was = span[tp.partition]
                span[tp.partition] = (recs[0].offset if was is None else was[0], recs[-1].offset)
                dec = decoder.decode([r.value for r in recs], [r.key for r in recs], np.array([r.timestamp for r in recs], dtype=np.int64))
                for _, reason, _ in dec.dead:
                    dead[reason] = dead.get(reason, 0) + 1
                for j, stream in enumerate(dec.stream):
                    for k, name in enumerate(decoder.schemas[stream]):
                        if dec.mask[j, k]:  # (a missed reading is a gap, as an empty CSV cell)
                            series.setdefault(f"{stream}:{name}", array("d")).append(float(dec.x[j, k]))
            done = [tp for tp in left if tp in past or (tp in stop and consumer.position(tp) >= stop[tp])]
            if done:
                consumer.pause(*done)  # (no fetches past the end taken at the start)
                left = [tp for tp in left if tp not in done]
        if left:
            at = {tp.partition: consumer.position(tp) for tp in left}
            print(f"streamer train: no record for {timeout_s:.0f}s, stopped early at positions {at}", file=sys.stderr)
    finally:
        consumer.close()
    if read is not None:
        read.update(span)
    if skipped is not None:
        for reason, n in dead.items():
            skipped[reason] = skipped.get(reason, 0) + n
    return {k: np.frombuffer(v, dtype=np.float64).copy() for k, v in series.items()}


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
        raise DataUnavailable("--public needs statsmodels (pip install 'streamer[train]' or pip install statsmodels)") from None
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
