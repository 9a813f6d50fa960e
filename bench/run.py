"""`python3 -m bench.run [--quick] [--device cpu|cuda] [--out FILE.json]`: the benchmark report.

Runs the core step alone (no Kafka) and then the daemon end to end through the embedded
broker, each for 1, 1,000 and 100,000 streams, then the log path alone (parsing, templates,
the log model and its online learning) for 9, 90 and 900 streams, and prints them with the
machine they ran on.
The end-to-end rates come with bare kafka-python consume/produce rates measured on the same
broker in the same run, because only the ratio between the two carries over to other machines.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from bench.core import CORE_EVENTS, CoreResult, run_core
from bench.e2e import E2EResult, run_e2e
from bench.logs import LogResult, run_logs
from bench.machine import describe, load_average, peak_rss_bytes

# Events pre-produced for the end-to-end cases. 100,000 streams need at least two events per
# stream (the first event of a stream only seeds its normaliser), hence 200,000.
E2E_EVENTS = {1: 60_000, 1_000: 60_000, 100_000: 200_000}
E2E_EVENTS_QUICK = {1: 10_000, 1_000: 10_000, 100_000: 200_000}
# The one-stream case steps one wavefront per event, so it may not get through its N events in
# reasonable time (on a busy 2-core VM it ranged from 30 to 1,700 events/s); the daemon is
# given this long and its rate is taken over what it scored by then.
ONE_STREAM_BUDGET_S = {False: 60.0, True: 15.0}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m bench.run", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="fewer events and shorter timings (about 2 minutes)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--out", help="also write the results as JSON to this file")
    p.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads for everything; default: the core step runs with torch's default and with 1, "
        "the daemon with torch's default (as `streamer run` does)",
    )
    p.add_argument("--only", choices=("core", "e2e", "logs"), help="run one part only")
    p.add_argument(
        "--core-events",
        choices=CORE_EVENTS,
        default="daemon",
        help="what the core step's events carry: times and delivery stamps as the daemon passes them (default), "
        "neither (untimed: this benchmark before 2026-12-07), or times without stamps (no duplicate check)",
    )
    p.add_argument(
        "--max-poll-records", type=int, default=5_000, help="daemon consumer.max_poll_records (default: the daemon default, 5000)"
    )
    p.add_argument(
        "--alerts-only",
        action="store_true",
        help="end to end: also run each case with topics.scores null (only alerts produced), against the same baselines",
    )
    p.add_argument("--e2e-timeout", type=float, default=300.0, help="seconds before an end-to-end case gives up (reported, not an error)")
    return p.parse_args(argv)


def fmt_rate(v: float) -> str:
    return f"{v:,.0f}"


def fmt_us(v: float) -> str:
    return f"{v:,.1f}" if v < 100 else f"{v:,.0f}"


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} GiB"


def machine_lines(info: dict[str, Any], weights: str | None) -> list[str]:
    load = info.get("load_average_at_start")
    end = info.get("load_average_at_end")

    def loadavg(x: Any) -> str:
        return ", ".join(f"{v:.2f}" for v in x) if x else "n/a"

    quota = info["cgroup_cpu_max"] or "n/a"
    lines = [
        f"CPU: {info['cpu_model']}, {info['cpu_cores']} cores ({info['cpu_affinity']} usable), cgroup cpu.max: {quota}",
        f"RAM: {fmt_bytes(info['ram_bytes'] or 0)}; load average (1, 5, 15 min) at start: {loadavg(load)}, at end: {loadavg(end)}",
        f"Python {info['python']}, torch {info['torch']} ({info['torch_threads']} intra-op threads by default), "
        f"kafka-python {info['kafka_python']}",
        f"Device: {info['device']}" + (f" ({info['gpu']})" if info.get("gpu") else ""),
    ]
    if weights:
        lines.append(f"Model {weights}")
    return lines


def core_table(rows: list[CoreResult]) -> Table:
    carry = {
        "daemon": "event times and stamps as the daemon passes them",
        "untimed": "no event times",
        "no-stamps": "event times, no stamps",
    }
    t = Table(title=f"Core step alone: Detector.process, 4 of 8 features per stream, {carry[rows[0].events_carry]}, no Kafka")
    for col in ("streams", "threads", "batch", "wavefronts/batch", "batches timed", "events/s", "µs/wavefront", "µs/event", "note"):
        t.add_column(col, justify="left" if col == "note" else "right")
    for r in rows:
        t.add_row(
            f"{r.streams:,}",
            str(r.threads),
            f"{r.batch:,}",
            f"{r.wavefronts_per_batch:,}",
            str(r.batches),
            fmt_rate(r.events_per_s),
            fmt_us(r.us_per_wavefront),
            fmt_us(r.us_per_event),
            r.note,
        )
    return t


def e2e_table(rows: list[E2EResult]) -> Table:
    t = Table(title="End to end through the embedded broker (Tansu), same run: daemon vs bare kafka-python")
    cols = (
        "streams",
        "outputs",
        "events scored",
        "daemon ev/s",
        "bare consume/s",
        "bare produce/s",
        "bare produce, ack per batch/s",
        "consume+produce ceiling/s",
        "daemon ÷ produce",
        "daemon ÷ ceiling",
        "wavefronts/batch",
    )
    for col in cols:
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(
            f"{r.streams:,}",
            r.outputs,
            f"{r.scored:,}" if r.scored == r.events else f"{r.scored:,} of {r.events:,}",
            fmt_rate(r.daemon_events_per_s),
            fmt_rate(r.bare_consume_per_s),
            fmt_rate(r.bare_produce_per_s),
            fmt_rate(r.bare_produce_batched_per_s),
            fmt_rate(r.serial_ceiling_per_s),
            f"{r.ratio_vs_produce:.2f}",
            f"{r.ratio_vs_ceiling:.2f}",
            f"{r.wavefronts_per_batch:,.0f}",
        )
    return t


def breakdown_table(rows: list[E2EResult]) -> Table:
    t = Table(title="Where the daemon's measured wall time went (share of the timed window)")
    kinds = ("poll", "step", "send", "commit", "other")
    for col in ("streams", "outputs", "wall s", "join s (excluded)", "batches", "events/batch", *kinds, "score rec. bytes", "note"):
        t.add_column(col, justify="left" if col == "note" else "right")
    for r in rows:
        shares = [f"{100 * r.breakdown_s.get(k, 0.0) / r.daemon_seconds:.0f}%" if r.daemon_seconds else "-" for k in kinds]
        t.add_row(
            f"{r.streams:,}",
            r.outputs,
            f"{r.daemon_seconds:.2f}",
            f"{r.join_seconds:.2f}",
            str(r.batches),
            f"{r.events_per_batch:,.0f}",
            *shares,
            f"{r.score_record_bytes:.0f}" if r.score_record_bytes else "-",
            r.note,
        )
    return t


def logs_table(rows: list[LogResult]) -> Table:
    t = Table(title="Log path alone: parse, mine templates, step and learn (one partition, 5,000-line polls, no Kafka)")
    for name in ("streams", "threads", "lines timed", "lines/s", "wavefronts/poll", "weight updates/poll", "templates"):
        t.add_column(name, justify="right")
    for r in rows:
        t.add_row(
            f"{r.streams:,}",
            str(r.threads),
            f"{r.lines:,}",
            fmt_rate(r.lines_per_s),
            f"{r.wavefronts_per_batch:,.0f}",
            f"{r.updates_per_batch:,.0f}",
            str(r.templates),
        )
    return t


def memory_table(core: list[CoreResult], e2e: list[E2EResult], start_rss: int) -> Table:
    t = Table(title="Memory")
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_row("peak RSS after imports", fmt_bytes(start_rss))
    big = [r for r in core if r.streams == 100_000]
    if big:
        t.add_row("state bank bytes per stream", f"{big[0].bank_bytes_per_stream:,.0f}")
        t.add_row("state bank for 100,000 streams", fmt_bytes(big[0].bank_bytes_per_stream * 100_000))
        for r in big:
            t.add_row(f"peak RSS after core step, 100,000 streams, {r.threads} thread(s)", fmt_bytes(r.peak_rss_bytes))
            if r.cuda_peak_bytes is not None:
                t.add_row(f"peak CUDA memory, 100,000 streams, {r.threads} thread(s)", fmt_bytes(r.cuda_peak_bytes))
    for e in e2e:
        if e.streams == 100_000 and e.outputs == "scores":  # (an alerts-only run holds the same state)
            t.add_row("daemon: streams in the bank / bank capacity", f"{e.active_streams:,} / {e.bank_capacity:,}")
            t.add_row("daemon: state bank bytes (capacity grows by doubling)", fmt_bytes(e.bank_bytes))
            t.add_row("peak RSS after end to end, 100,000 streams", fmt_bytes(e.peak_rss_bytes))
    return t


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Console()
    if not out.is_terminal:
        out.width = 170  # a file or pipe gets the full tables, not rich's 80-column default
    progress = Console(stderr=True)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        progress.print(f"[red]--device {args.device}: CUDA is not available in this torch build / on this machine[/red]")
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    start_rss = peak_rss_bytes()
    info = describe(str(device))

    def log(msg: str) -> None:
        progress.log(msg)

    core: list[CoreResult] = []
    weights: str | None = None
    default_threads = torch.get_num_threads()
    # torch's default next to 1 thread: on small VMs the default can be much the slower.
    single = args.threads is not None or device.type == "cuda"
    settings = [default_threads] if single else sorted({default_threads, 1}, reverse=True)
    if args.only in (None, "core"):
        core, weights = run_core(device, settings, args.quick, log, args.core_events)

    e2e: list[E2EResult] = []
    if args.only in (None, "e2e"):
        counts = E2E_EVENTS_QUICK if args.quick else E2E_EVENTS
        cases = [(s, n, ONE_STREAM_BUDGET_S[args.quick] if s == 1 else None) for s, n in counts.items()]
        baseline = 50_000 if args.quick else None
        e2e = run_e2e(cases, str(device), args.max_poll_records, args.e2e_timeout, args.threads, baseline, log, args.alerts_only)

    logs: list[LogResult] = []
    if args.only in (None, "logs"):
        logs = run_logs(settings, args.quick, log)  # (on the CPU: the daemon keeps log partitions there)

    elapsed = time.perf_counter() - started
    info["load_average_at_end"] = load_average()
    out.print("\n".join(machine_lines(info, weights)))
    out.print(f"Command: python3 -m bench.run {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip() + f"  (took {elapsed:.0f}s)")
    if core:
        out.print(core_table(core))
    if e2e:
        out.print(e2e_table(e2e))
        out.print(breakdown_table(e2e))
    if logs:
        out.print(logs_table(logs))
    if core or e2e:
        out.print(memory_table(core, e2e, start_rss))
    if args.out:
        report = {
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "args": vars(args),
            "machine": info,
            "weights": weights,
            "wall_seconds": elapsed,
            "peak_rss_after_imports_bytes": start_rss,
            "core": [asdict(r) for r in core],
            "e2e": [asdict(r) for r in e2e],
            "logs": [asdict(r) for r in logs],
        }
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        progress.log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
