"""systemd notifications: READY once the loop runs, the watchdog pinged by the loop itself, STOPPING
on a drain. The service manager's end is a real unix datagram socket, as systemd listens on."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import DaemonThread, config_data, event, make_config, produce

from streamer.app import watchdog_warning
from streamer.broker import EmbeddedBroker
from streamer.config import Config
from streamer.sdnotify import Notifier

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """The service manager's socket: its path and the receiving end."""
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.05)
    yield path, sock
    sock.close()


def received(sock: socket.socket) -> list[str]:
    """Every datagram waiting, one string each (its lines joined by newlines, as sent)."""
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except TimeoutError:
            return out


def test_the_watchdog_is_pinged_by_the_loop_only_while_it_polls(
    broker: EmbeddedBroker, topics: dict[str, str], state_dir: Path, manager: tuple[str, socket.socket]
) -> None:
    """A wedged loop must stop the pings, or the watchdog restarts nothing: a runner that is not
    stepped (the test stops calling step(), as a loop stuck inside a call would) sends none."""
    path, sock = manager
    produce(broker, topics["input"], [(f"s{i % 4}".encode(), event(f"s{i % 4}", i, {"x": float(i % 5)})) for i in range(80)])
    daemon = DaemonThread(make_config(broker, topics, state_dir))
    runner = daemon.runner
    runner.notifier = Notifier(path, watchdog_s=0.4)  # pings at most every 0.1 s
    runner.start()
    try:
        deadline = time.monotonic() + 30
        first: list[str] = []
        while daemon.metrics.scored._value.get() < 80:
            assert time.monotonic() < deadline, "not scored"
            runner.step()
            first += received(sock)  # (as the manager does: its queue holds 10 datagrams)
        first += received(sock)
        assert first and first[0].splitlines()[0] == "READY=1", first
        assert sum("READY=1" in m for m in first) == 1
        assert sum("WATCHDOG=1" in m for m in first) >= 1
        statuses = [line for m in first for line in m.splitlines() if line.startswith("STATUS=")]
        assert statuses, first

        time.sleep(1.0)  # the loop is stuck: 2.5 watchdog periods without a completed poll
        assert received(sock) == []

        t0 = time.monotonic()
        again: list[str] = []
        while time.monotonic() - t0 < 1.0:
            runner.step()
            again += received(sock)
        again += received(sock)
        pings = sum("WATCHDOG=1" in m for m in again)
        assert 5 <= pings <= 11, again  # every ~0.1 s of polling, not once per poll
        assert not any("READY=1" in m for m in again)
        ready_status = [line for m in first + again for line in m.splitlines() if line.startswith("STATUS=ready:")]
        assert ready_status and "4 partitions, 4 streams" in ready_status[-1], ready_status
    finally:
        runner.shutdown()
    assert any(m.startswith("STOPPING=1") for m in received(sock))


def test_variables_are_read_once_and_only_for_this_process(tmp_path: Path) -> None:
    env = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid()), "OTHER": "x"}
    n = Notifier.from_env(env)
    assert n.enabled and n.watchdog_s == 30.0
    assert env == {"OTHER": "x"}  # a child process (the demo's broker) must not answer for this one
    # The watchdog is some other process's (a wrapper's): notify, but do not ping.
    n = Notifier.from_env({"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, pid=2)
    assert n.enabled and n.watchdog_s is None
    assert not Notifier.from_env({}).enabled
    assert Notifier.from_env({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "soon"}).watchdog_s is None
    assert not Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled


def test_an_abstract_socket_is_addressed_with_a_nul_byte() -> None:
    name = f"streamer-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(1.0)
    try:
        n = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        n.alive(lambda: "starting")
        assert sock.recv(4096).decode() == "READY=1\nSTATUS=starting"
    finally:
        sock.close()


def test_a_gone_manager_does_not_stop_the_loop(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    n = Notifier(str(tmp_path / "nobody-listens"), watchdog_s=0.001)
    for _ in range(3):
        n.alive()
        time.sleep(0.002)
    assert sum("could not notify" in r.message for r in caplog.records) == 1  # said once, not per ping


def test_what_a_full_queue_refused_is_said_again(manager: tuple[str, socket.socket]) -> None:
    """The manager's queue holds 10 datagrams (net.unix.max_dgram_qlen): a READY=1 refused while
    it was full was never sent again, and the unit stayed starting until TimeoutStartSec."""
    path, sock = manager
    filler = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    filler.setblocking(False)
    try:
        while True:
            filler.sendto(b"X=1", path)
    except BlockingIOError:
        pass
    n = Notifier(path, watchdog_s=90.0)
    n.alive(lambda: "starting")  # refused: the queue is full
    received(sock)  # the manager catches up
    n.alive(lambda: "starting")
    assert received(sock) == ["READY=1\nWATCHDOG=1\nSTATUS=starting"]
    filler.close()


def test_the_watchdog_is_pinged_every_second_whatever_its_period(manager: tuple[str, socket.socket]) -> None:
    """Pings follow completed polls, so the slowest poll the watchdog tolerates is its period less
    the ping interval: at a quarter of 90 s, a 68 s send retry (send_timeout_s above 34 s) tripped
    it while the loop waited out an outage, which is progress."""
    path, sock = manager
    n = Notifier(path, watchdog_s=90.0)
    n.alive()
    time.sleep(1.1)
    n.alive()
    assert [m for m in received(sock) if "WATCHDOG=1" in m] == ["READY=1\nWATCHDOG=1", "WATCHDOG=1"]


def test_streamer_run_under_a_notify_unit(
    broker: EmbeddedBroker, topics: dict[str, str], tmp_path: Path, manager: tuple[str, socket.socket]
) -> None:
    """`streamer run` as systemd starts a Type=notify unit with WatchdogSec=: READY=1, pings,
    a status that reaches "ready", then STOPPING=1 on SIGTERM and a clean exit."""
    path, sock = manager
    produce(broker, topics["input"], [(f"s{i % 3}".encode(), event(f"s{i % 3}", i, {"x": float(i % 5)})) for i in range(30)])
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(config_data(broker, topics, tmp_path / "state")))
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000", "PYTHONDONTWRITEBYTECODE": "1"}
    log = (tmp_path / "daemon.log").open("wb")
    cmd = [sys.executable, "-m", "streamer.cli", "run", "--config", str(config)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    messages: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while not any("STATUS=ready:" in m for m in messages):
            assert proc.poll() is None and time.monotonic() < deadline, (messages, (tmp_path / "daemon.log").read_text()[-2000:])
            messages += received(sock)
        t0 = time.monotonic()
        pings = 0
        while time.monotonic() - t0 < 2.0:
            pings += sum("WATCHDOG=1" in m for m in received(sock))
        assert pings >= 3, pings  # 2 s watchdog: a ping every 0.5 s
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    messages += received(sock)
    assert messages[0].startswith("READY=1"), messages
    assert any(m.startswith("STOPPING=1") for m in messages)
    text = (tmp_path / "daemon.log").read_text()
    assert "pinging the service manager's watchdog (2s)" in text
    assert "producer.send_timeout_s=30: a send waiting out a broker outage can go 67s between watchdog pings" in text


def test_a_send_timeout_the_watchdog_would_not_wait_out_is_warned_of() -> None:
    """The unit's 90 s watchdog takes the default send timeout's worst case (67 s between pings);
    a 45 s send timeout would get the daemon killed while it waits out a broker outage."""
    config = Config.model_validate({})
    assert watchdog_warning(config, 90.0) is None
    slow = Config.model_validate({"producer": {"send_timeout_s": 45}})
    assert (w := watchdog_warning(slow, 90.0)) is not None and "producer.send_timeout_s=45" in w and "97s" in w
