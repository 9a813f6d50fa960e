"""The `streamer` command: run, demo, train."""

from __future__ import annotations

import argparse
import csv
import logging
import signal
import sys
import threading
from typing import Any

from streamer.config import ConfigError, load_config
from streamer.jsonlog import setup_logging


def _exit_on_sigterm(*also: signal.Signals) -> None:
    """SIGTERM (a `timeout`, a container stop) ends Python without unwinding, which would leave
    an embedded broker running as an orphan: raise SystemExit instead, so it is stopped.

    `streamer run` sets it too, until the daemon's draining handlers replace it: as a
    container's PID 1 a process gets no signal it has no handler for, and a daemon still
    starting (loading the model, reaching the brokers) ignored `docker stop` and pod deletion
    until its bootstrap timed out, ~30 s."""

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, *also):
        signal.signal(sig, handler)


def _out_problem(out: str) -> str | None:
    """Why a checkpoint could not be written at `out` (None: it can), found before training, not
    after it. Probed with a temp file like the one the checkpoint is written through."""
    import os
    import tempfile
    from pathlib import Path

    path = Path(out)
    if path.is_dir():
        return f"--out {out} is a directory"
    parent = path.parent
    while not parent.exists() and parent != parent.parent:  # (missing folders are made: where they would go counts)
        parent = parent.parent
    if not parent.is_dir():
        return f"--out {out}: {parent} is not a directory"
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    except OSError as err:
        return f"--out {out}: cannot write in {parent} ({err.strerror})"
    os.close(fd)
    os.unlink(tmp)
    return None


def _train(args: argparse.Namespace) -> int:
    from kafka.errors import KafkaError

    from models.gru import save_checkpoint
    from models.train import MIN_SERIES_VALUES, SeriesSampler, TrainConfig, listed, public_share_problem
    from models.train import train as train_model
    from streamer.traindata import DataUnavailable

    if not 0.0 < args.public_share < 1.0:
        print("streamer: --public-share must be in (0, 1)", file=sys.stderr)
        return 2
    if args.topic and args.files:
        print("streamer: train from files or from --topic, not both", file=sys.stderr)
        return 2
    # (Before any data is read: a topic replay can take minutes.)
    from_data = bool(args.topic or args.files)
    share_problem = public_share_problem(args.batch, args.public_share, from_data) if args.public and args.batch >= 1 else None
    if share_problem:
        print(f"streamer: --public-share: {share_problem}", file=sys.stderr)
        return 2
    for name in ("steps", "batch", "length", "hidden"):
        if getattr(args, name) < 1:
            print(f"streamer: --{name} must be at least 1", file=sys.stderr)
            return 2
    if args.columns and not args.files:
        print("streamer: --columns only applies to files", file=sys.stderr)
        return 2
    if (args.config or args.bootstrap_servers) and not args.topic:
        print("streamer: --config and --bootstrap-servers only apply with --topic", file=sys.stderr)
        return 2
    if (args.from_offset != 0 or args.to_offset is not None) and not args.topic:
        print("streamer: --from-offset and --to-offset only apply with --topic", file=sys.stderr)
        return 2
    if args.from_offset < 0:
        print(f"streamer: --from-offset ({args.from_offset}) must be >= 0", file=sys.stderr)
        return 2
    if args.to_offset is not None and args.to_offset <= args.from_offset:
        print(f"streamer: --to-offset ({args.to_offset}) must be above --from-offset ({args.from_offset})", file=sys.stderr)
        return 2
    if args.bootstrap_servers:
        from streamer.config import check_bootstrap_servers

        try:  # (the check kafka.bootstrap_servers gets: unchecked, a typo waited 30 s for brokers)
            check_bootstrap_servers(args.bootstrap_servers)
        except ValueError as err:
            print(f"streamer: --bootstrap-servers: {err}", file=sys.stderr)
            return 2
    problem = _out_problem(args.out)
    if problem:
        print(f"streamer: {problem}", file=sys.stderr)
        return 2
    try:
        cfg = TrainConfig(
            steps=args.steps, batch=args.batch, length=args.length, hidden=args.hidden, seed=args.seed, public_share=args.public_share
        )
        data = description = public = None
        if args.topic:
            from streamer.traindata import load_topic

            try:
                # (None: the defaults; STREAMER_* variables apply as in `run`. Its detector.checkpoint
                # need not exist: it is often the file this run is to write.)
                config = load_config(args.config, checkpoint_must_exist=False)
            except ConfigError as err:
                print(f"streamer: config error: {err}", file=sys.stderr)
                return 2
            options = config.kafka.client_options()
            if args.bootstrap_servers:
                options["bootstrap_servers"] = args.bootstrap_servers
            read: dict[int, tuple[int, int] | None] = {}
            dead: dict[str, int] = {}
            topic_data = load_topic(
                options, config.input, args.topic, args.from_offset, args.to_offset, cfg.max_features, read=read, skipped=dead
            )
            if dead:
                n = sum(dead.values())
                reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(dead.items()))
                print(f"skipped {n} record{'s' * (n != 1)} the daemon would dead-letter: {reasons}", file=sys.stderr)
            spans = ", ".join(f"p{p} {r[0]}..{r[1]}" if r else f"p{p} none" for p, r in sorted(read.items()))
            description = f"Kafka topic {args.topic} at {options['bootstrap_servers']}, offsets read {spans}"
            data = SeriesSampler(topic_data)
        elif args.files:
            from streamer.traindata import load_files

            args.files = list(dict.fromkeys(args.files))  # (a file named twice was listed twice, trained once)
            description = "files " + ", ".join(args.files[:10]) + (" ..." if len(args.files) > 10 else "")
            skipped: list[str] = []
            columns = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else None
            notes: list[str] = []
            try:
                found = load_files(args.files, columns, skipped, notes)
            finally:  # (before SeriesSampler, which refuses data left with no series: they say why)
                if skipped:
                    print(f"left out as index or time columns (--columns picks what to train): {', '.join(skipped)}", file=sys.stderr)
                for note in notes:
                    print(note, file=sys.stderr)
            data = SeriesSampler(found)
        if data is not None and data.too_short:
            print(f"too short to train on (fewer than {MIN_SERIES_VALUES} values): {listed(data.too_short)}", file=sys.stderr)
        if args.public:
            from streamer.traindata import load_statsmodels

            public = SeriesSampler(load_statsmodels())
        # While training, Ctrl-C asks the loop to stop after its step (models.train.train's
        # `stop`); a second one stops at once.
        from streamer.app import takes_sigint

        asked = threading.Event()

        def on_sigint(_signum: int, _frame: Any) -> None:
            if asked.is_set():
                raise KeyboardInterrupt
            asked.set()

        previous = None
        if takes_sigint():
            previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            model, summary = train_model(
                cfg, data=data, data_description=description, public=public, public_description="statsmodels.datasets", stop=asked.is_set
            )
            if asked.is_set():  # (during the last step: the checkpoint must not be written either)
                raise KeyboardInterrupt
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
    except (KafkaError, DataUnavailable) as err:  # no broker reachable, no such topic, no pyarrow: not the arguments
        print(f"streamer: {err}", file=sys.stderr)
        return 1
    except (ValueError, OSError, csv.Error) as err:  # e.g. no usable series
        print(f"streamer: {err}", file=sys.stderr)
        return 2
    try:
        save_checkpoint(args.out, model, summary)
    except OSError as err:  # (checked before training, but a disk can fill up or a folder go since)
        print(f"streamer: --out {args.out}: {err.strerror or err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f} in {summary['seconds']}s")
    print(f"data: {summary['data']}")
    if summary["public"]:
        print(f"public: {summary['public']['data']}, {summary['public']['rows_per_batch']} of the {args.batch} series of every batch")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="streamer", description="Real-time anomaly detection for Kafka event streams.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the detector daemon")
    run.add_argument("--config", default="config.yaml", help="YAML config file (default: config.yaml)")

    demo = sub.add_parser("demo", help="embedded broker + synthetic sensor feed + detector + live view")
    demo.add_argument("--streams", type=int, default=120, help="synthetic sensor streams (default 120)")
    demo.add_argument("--rate", type=float, default=10.0, help="simulated minutes per second for every stream (default 10)")
    demo.add_argument("--metrics-port", type=int, default=9108, help="/metrics port (default 9108; a free one if taken)")
    demo.add_argument("--duration", type=float, default=None, help="stop after this many seconds (default: until Ctrl-C)")

    train = sub.add_parser("train", help="train the GRU on synthetic series, CSV/Parquet files or a Kafka topic range")
    train.add_argument("files", nargs="*", help="CSV (header row) or Parquet files: every numeric column is a training series")
    train.add_argument(
        "--columns",
        default=None,
        help="with files: train only these comma-separated columns (default: every numeric column but index and time ones)",
    )
    train.add_argument("--topic", default=None, help="replay this Kafka topic instead (the daemon's JSON event format)")
    train.add_argument(
        "--config", default=None, help="with --topic: read it as this daemon config does (kafka connection, input.stream_field, limits)"
    )
    train.add_argument("--bootstrap-servers", default=None, help="with --topic: the brokers (default: the config's, or 127.0.0.1:9092)")
    train.add_argument("--from-offset", type=int, default=0, help="first offset of every partition to replay")
    train.add_argument(
        "--to-offset", type=int, default=None, help="stop before this offset (default: each partition's end when the replay starts)"
    )
    train.add_argument("--out", default="checkpoint.pt", help="where to write the checkpoint (default ./checkpoint.pt)")
    train.add_argument("--steps", type=int, default=300, help="optimiser steps (default 300)")
    train.add_argument("--batch", type=int, default=64, help="windows per step (default 64)")
    train.add_argument("--length", type=int, default=384, help="events per window, more than the 16 of burn-in (default 384)")
    train.add_argument(
        "--hidden", type=int, default=32, help="GRU hidden units; another size resets a running daemon's states (default 32)"
    )
    train.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the sampling (default 0)")
    train.add_argument(
        "--public", action="store_true", help="mix in the real time series bundled with statsmodels (needs the `train` extra)"
    )
    train.add_argument("--public-share", type=float, default=0.25, help="share of every batch drawn from them (default 0.25)")

    sub.add_parser("nab", help="score a NAB-layout folder, one series per stream (see `streamer nab -h`)", add_help=False)
    sub.add_parser("logeval", help="stream a labelled log file through the log detector (see `streamer logeval -h`)", add_help=False)

    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["nab"]:
        from streamer.nab import main as nab_main

        _exit_on_sigterm()
        return nab_main(argv[1:])
    if argv[:1] == ["logeval"]:
        from streamer.logeval import main as logeval_main

        return logeval_main(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "run":
        _exit_on_sigterm(signal.SIGHUP)
        try:
            config = load_config(args.config)
        except ConfigError as err:
            print(f"streamer: config error: {err}", file=sys.stderr)
            return 2
        setup_logging(config.log_level, config.log_format)
        from streamer.app import StartupError, run_daemon

        try:
            return run_daemon(config)
        except ConfigError as err:  # (found at start: a checkpoint that is not one)
            print(f"streamer: config error: {err}", file=sys.stderr)
            return 2
        except StartupError as err:  # (a state dir, device, file or port not usable yet: retried by supervisors)
            print(f"streamer: cannot start: {err}", file=sys.stderr)
            return 1
    if args.command == "demo":
        setup_logging("WARNING", "text")
        logging.getLogger("kafka").setLevel(logging.CRITICAL)  # keep the live view clean
        from streamer.demo import run_demo

        _exit_on_sigterm()
        return run_demo(args.streams, args.rate, args.metrics_port, args.duration)
    if args.command == "train":
        try:
            return _train(args)
        except KeyboardInterrupt:  # (Ctrl-C: the checkpoint is written through a temp file, so none is left)
            print(f"streamer: train interrupted; {args.out} not written", file=sys.stderr)
            return 130
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
