"""`streamer demo`, the README's first command, scores its own synthetic feed."""

from __future__ import annotations

import os
import re
import subprocess
import sys

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
