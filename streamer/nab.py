"""`streamer nab DATA_DIR OUT_DIR`: the Numenta Anomaly Benchmark through the daemon's detector.

Every series of a NAB-layout folder is one stream. All series are stepped together through
`Detector.process` (one big interleaved batch: wavefront k holds row k of every series), which
is exactly how the daemon steps them, and each row is scored before the next row of its series
is seen. Results are written as NAB result CSVs (`timestamp,value,anomaly_score`) at the same
relative paths, so NAB's own scorer or `tools/nabscore.py` can score them. The detector
settings are the daemon's defaults, or those of a config file's `detector:` section
(`--config`), so the table describes what `streamer run` with that file does.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from models.detector import MAX_ABS_VALUE, Detector
from models.gru import DEFAULT_WEIGHTS, load_checkpoint
from streamer.config import ConfigError, DetectorConfig, InputConfig, load_config
from streamer.decode import REASONS, epoch_ms


@dataclass
class Series:
    rel: Path
    timestamps: list[str]
    values: np.ndarray


def read_series(data_dir: Path, max_name: int | None = None) -> list[Series]:
    """Every CSV with a value column under data_dir. ValueError names the file (and row) of what
    the harness cannot score as the daemon would: a value that is not a finite number within the
    detector's range (the daemon would dead-letter it, and a NAB result file needs a score for
    every row), a missing `timestamp` column or a timestamp that is not ISO 8601 (NAB's layout),
    or a path longer than `max_name` characters (the series' stream id through Kafka: the daemon
    would dead-letter its rows as `invalid_stream`). A UTF-8 byte-order mark is read as none."""
    out = []
    for path in sorted(data_dir.rglob("*.csv")):
        with path.open(encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
        if not rows or "value" not in rows[0]:
            continue
        if "timestamp" not in rows[0]:
            raise ValueError(f"{path}: no timestamp column (a NAB series has the columns timestamp,value)")
        rel = path.relative_to(data_dir)
        if max_name is not None and len(str(rel)) > max_name:
            what = "its path under the data folder, the series' stream id through Kafka,"
            raise ValueError(f"{path}: {what} is {len(str(rel))} characters, over the daemon's {max_name}")
        values = np.empty(len(rows))
        for i, r in enumerate(rows):
            try:
                values[i] = float(r["value"])
            except (TypeError, ValueError):
                values[i] = np.nan
            if not abs(values[i]) <= MAX_ABS_VALUE:
                raise ValueError(f"{path}: row {i + 2}: value {r['value']!r} is not a finite number of magnitude <= {MAX_ABS_VALUE:g}")
            try:
                _ts_ms(r["timestamp"])
            except (TypeError, ValueError):
                raise ValueError(f"{path}: row {i + 2}: timestamp {r['timestamp']!r} is not ISO 8601 (as 2014-04-01 00:00:00)") from None
        out.append(Series(rel, [r["timestamp"] for r in rows], values))
    return out


def score_series(series: list[Series], detector: Detector) -> list[np.ndarray]:
    """Scores of every row of every series, stepping all series together in wavefronts."""
    lengths = np.array([len(s.values) for s in series])
    longest = int(lengths.max())
    # Row-major interleave: row 0 of every series, then row 1, ... (as a live feed would arrive).
    slots = np.concatenate([np.flatnonzero(lengths > t) for t in range(longest)])
    steps = np.concatenate([np.full(int((lengths > t).sum()), t) for t in range(longest)])
    x = np.zeros((len(slots), detector.max_features))
    mask = np.zeros_like(x, dtype=bool)
    x[:, 0] = [series[s].values[t] for s, t in zip(slots.tolist(), steps.tolist())]
    mask[:, 0] = True
    ts = np.array([_ts_ms(series[s].timestamps[t]) for s, t in zip(slots.tolist(), steps.tolist())], dtype=np.int64)
    res = detector.process(slots, x, mask, ts)
    scores = [np.zeros(n) for n in lengths]
    for s, t, v in zip(slots.tolist(), steps.tolist(), res.score.tolist()):
        scores[s][t] = v
    return scores


BASELINES = ("hst", "pysad-loda")


def score_baseline(series: list[Series], name: str) -> list[np.ndarray]:
    """An alternative detector a user might pick instead, through the same harness.

    `hst`: River's HalfSpaceTrees on the min-max-scaled value, the detector River's docs
    suggest for streams (score_one before learn_one, so each row is scored before it is seen).
    Needs the optional extra: `pip install -e ".[baselines]"`.
    """
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose from {BASELINES}")
    if name.startswith("pysad-"):
        return _score_pysad(series, name)
    from river import anomaly, compose, preprocessing

    out = []
    for s in series:
        model = compose.Pipeline(preprocessing.MinMaxScaler(), anomaly.HalfSpaceTrees(seed=42))
        scores = np.zeros(len(s.values))
        for i, v in enumerate(s.values.tolist()):
            x = {"value": v}
            scores[i] = model.score_one(x)
            model.learn_one(x)
        out.append(scores)
    return out


def _score_pysad(series: list[Series], name: str) -> list[np.ndarray]:
    """PySAD's LODA, its raw score mapped to [0, 1] by PySAD's own streaming Gaussian tail
    calibrator, each row scored before it is learned."""
    from pysad.models import LODA
    from pysad.transform.probability_calibration import GaussianTailProbabilityCalibrator

    out = []
    for s in series:
        model = LODA(random_state=42)
        calibrator = GaussianTailProbabilityCalibrator(window_size=6400)
        scores = np.zeros(len(s.values))
        for i, v in enumerate(s.values.tolist()):
            x = np.array([v])
            raw = float(model.score_partial(x)) if i else 0.0
            model.fit_partial(x)
            scores[i] = float(np.clip(calibrator.fit_transform(np.array([raw if np.isfinite(raw) else 0.0]))[0], 0.0, 1.0))
        out.append(scores)
    return out


def _ts_ms(ts: str) -> int:
    return epoch_ms(datetime.fromisoformat(ts).replace(tzinfo=timezone.utc))


def score_through_kafka(series: list[Series], detector: DetectorConfig, partitions: int = 4) -> list[np.ndarray]:
    """The same scores, but through the embedded broker and the real daemon loop.

    All series are produced interleaved (row-major, keyed by series path) to one input topic;
    the Runner consumes them in a consumer group exactly as `streamer run` does; the score
    records are read back and put in row order by their input offsets.
    """
    import tempfile

    import orjson
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

    from streamer.app import build_runner
    from streamer.broker import EmbeddedBroker
    from streamer.config import build_config
    from streamer.metrics import Metrics

    names = [str(s.rel) for s in series]
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory(prefix="streamer-nab-") as state_dir:
        broker.create_topics({"nab": partitions, "nab.scores": partitions, "nab.alerts": 1, "nab.dead": 1})
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", linger_ms=20, batch_size=262_144)
        longest = max(len(s.values) for s in series)
        total = 0
        # Each record its own timestamp (the direct mode has none, so takes no row for a re-delivery:
        # a series' repeated rows sent in the same millisecond would be, `duplicate` in
        # models/detector.py).
        stamp = int(time.time() * 1000)
        for t in range(longest):
            for name, s in zip(names, series):
                if t < len(s.values):
                    event = {"stream": name, "ts": _ts_ms(s.timestamps[t]), "value": float(s.values[t])}
                    stamp = max(stamp + 1, int(time.time() * 1000))
                    producer.send("nab", key=name.encode(), value=orjson.dumps(event), timestamp_ms=stamp)
                    total += 1
        producer.flush()
        producer.close()
        cfg = build_config(
            {
                "kafka": {"bootstrap_servers": broker.bootstrap},
                "consumer": {"group_id": "nab", "session_timeout_ms": 3000, "heartbeat_interval_ms": 500},
                "topics": {"inputs": ["nab"], "scores": "nab.scores", "alerts": "nab.alerts", "dead_letter": "nab.dead"},
                "state": {"dir": state_dir},
                "metrics": {"enabled": False},
                "detector": detector.model_dump() | {"device": "cpu"},
            },
            env={},
        )
        metrics = Metrics(process=False)
        runner = build_runner(cfg, metrics)
        thread = threading.Thread(target=runner.run, daemon=True)
        thread.start()
        # (Every row is scored or dead-lettered: a row the daemon refuses would otherwise be waited
        # for forever. `read_series` refuses what it knows the daemon would.)
        while (scored := metrics.scored._value.get()) < total:
            if not thread.is_alive():
                raise RuntimeError("the daemon loop stopped before scoring every row")
            dead = {r: metrics.dead_letters.labels(r)._value.get() for r in REASONS}
            if scored + sum(dead.values()) >= total:
                runner.stop()
                thread.join()
                reasons = ", ".join(f"{n:.0f} {r}" for r, n in dead.items() if n)
                raise RuntimeError(
                    f"the daemon dead-lettered {total - scored:.0f} of {total} rows ({reasons}): through Kafka they have no score"
                )
            time.sleep(0.2)
        runner.stop()
        thread.join()
        consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=None, auto_offset_reset="earliest")
        consumer.assign([TopicPartition("nab.scores", p) for p in range(partitions)])
        records: list[dict] = []
        while len(records) < total:
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(orjson.loads(r.value) for r in batch)
        consumer.close()
    index = {name: i for i, name in enumerate(names)}
    scores = [np.zeros(len(s.values)) for s in series]
    for name, recs in _by_stream(records).items():
        scores[index[name]][:] = [r["score"] for r in sorted(recs, key=lambda r: r["offset"])]
    return scores


def _by_stream(records: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in records:
        out.setdefault(r["stream"], []).append(r)
    return out


def write_results(out_dir: Path, series: list[Series], scores: list[np.ndarray]) -> None:
    for s, sc in zip(series, scores):
        path = out_dir / s.rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["timestamp", "value", "anomaly_score"])
            for ts, v, a in zip(s.timestamps, s.values.tolist(), sc.tolist()):
                w.writerow([ts, repr(v), f"{a:.10f}"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="streamer nab", description=__doc__.splitlines()[0])
    p.add_argument("data_dir", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--checkpoint", type=Path, default=None, help="weights to score with (default: the config's, else the bundled ones)")
    p.add_argument("--scorer", type=Path, default=None, help="a NAB scorer script to run on OUT_DIR (e.g. tools/nabscore.py)")
    p.add_argument("--through-kafka", action="store_true", help="send every series through the embedded broker and the daemon")
    p.add_argument("--baseline", choices=BASELINES, default=None, help="score with an alternative detector instead (optional extra)")
    p.add_argument("--config", type=Path, default=None, help="take the detector settings from this config file's detector: section")
    p.add_argument("--warmup", type=int, default=None, help="events per series before anything is flagged (default: the config's, 100)")
    args = p.parse_args(argv)
    if args.baseline and (args.through_kafka or args.checkpoint or args.config or args.warmup is not None):
        # (They were ignored without a word: a baseline has its own settings and no weights.)
        print("streamer nab: --baseline takes none of --through-kafka, --checkpoint, --config, --warmup", file=sys.stderr)
        return 2
    try:
        detector = load_config(args.config, env={}).detector if args.config else DetectorConfig()
        changes = {"warmup": args.warmup} if args.warmup is not None else {}
        if args.checkpoint is not None:
            changes["checkpoint"] = str(args.checkpoint)
        detector = DetectorConfig.model_validate(detector.model_dump() | changes)
    except (ConfigError, ValueError) as err:
        print(f"streamer nab: {err}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)  # one small GRU call per wavefront: more threads only add overhead
    try:
        model, _meta = load_checkpoint(Path(detector.checkpoint) if detector.checkpoint else DEFAULT_WEIGHTS)
    except (OSError, ValueError) as err:
        print(f"streamer nab: {err}", file=sys.stderr)
        return 2
    try:
        series = read_series(args.data_dir, InputConfig().max_stream_id_length if args.through_kafka else None)
    except (OSError, ValueError) as err:
        print(f"streamer nab: {err}", file=sys.stderr)
        return 2
    if not series:
        print(f"no NAB series (CSV with a value column) under {args.data_dir}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    # The daemon's default detector settings, so the table describes what `streamer run` does.
    # (NAB itself does not score a series' first 15%, at most 750 rows.)
    if args.baseline:
        scores = score_baseline(series, args.baseline)
    elif args.through_kafka:
        try:
            scores = score_through_kafka(series, detector)
        except RuntimeError as err:
            print(f"streamer nab: {err}", file=sys.stderr)
            return 1
    else:
        scores = score_series(series, Detector(model, detector.calibration()))
    write_results(args.out_dir, series, scores)
    rows = sum(len(s.values) for s in series)
    print(f"scored {len(series)} series, {rows:,} rows in {time.perf_counter() - started:.1f}s -> {args.out_dir}")
    if args.scorer:
        return subprocess.call([sys.executable, str(args.scorer), str(args.out_dir)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
