"""`streamer demo`, the README's first command, scores its own synthetic feed."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from conftest import default_sigint

from streamer.broker import free_port


def test_the_demo_scores_its_own_feed_whatever_the_environment_says():
    """The demo talks to its embedded broker only: a STREAMER_BOOTSTRAP_SERVERS exported for
    `streamer run` pointed it at that cluster, where it scored the user's topic instead."""
    env = {**os.environ, "STREAMER_BOOTSTRAP_SERVERS": "127.0.0.1:9"}  # nothing listens there
    cmd = [sys.executable, "-m", "streamer.cli", "demo", "--duration", "8", "--streams", "10", "--metrics-port", str(free_port())]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    scored = re.search(r"stopped: ([\d,]+) events scored", proc.stdout)
    assert scored and int(scored.group(1).replace(",", "")) > 0, proc.stdout[-2000:]


def test_ctrl_c_stops_the_demo_cleanly():
    """The README's first command runs until Ctrl-C: it must stop there, say what it scored and
    exit 0."""
    import signal
    import time
    import urllib.request

    port = free_port()
    cmd = [sys.executable, "-m", "streamer.cli", "demo", "--streams", "10", "--metrics-port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    try:
        deadline = time.monotonic() + 120
        scored = 0.0
        while scored == 0.0:
            assert proc.poll() is None and time.monotonic() < deadline, "the demo did not start scoring"
            time.sleep(0.5)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
                    text = resp.read().decode()
                scored = float(re.search(r"^streamer_events_scored_total (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]
            except OSError:
                pass
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-2000:]
    assert re.search(r"stopped: [\d,]+ events scored", out), out[-2000:]


def test_the_feeds_broken_records_are_each_dead_lettered_for_their_own_reason(broker, topics, state_dir):
    """The demo's feed mixes one of each kind of bad input into its stream. The record without a
    stream field was sent with a real stream's key, which names the stream when the field is
    missing: it was scored as that stream's reading at ts 1 and shown as an alert from 1970."""
    import orjson
    from conftest import DaemonThread, make_config, read_all

    from models.synthetic import SensorFleet
    from streamer.feed import GARBAGE, SensorFeed

    feed = SensorFeed(broker.bootstrap, topics["input"], SensorFleet(n_streams=4, seed=7), backfill_steps=25, garbage_every=20)
    feed.stop()  # (the backfill only)
    feed.run()
    assert feed.sent == 100
    with DaemonThread(make_config(broker, topics, state_dir)) as daemon:
        daemon.wait_scored(100)
    dead = read_all(broker, topics["dead"], expect=len(GARBAGE))
    reasons = sorted(dict(r.headers)["streamer.reason"].decode() for r in dead)
    assert reasons == ["invalid_json", "missing_stream", "non_finite", "non_numeric", "not_an_object"], reasons
    scores = [orjson.loads(r.value) for r in read_all(broker, topics["scores"], expect=100)]
    assert len(scores) == 100 and min(r["ts"] for r in scores) > 1_000_000
