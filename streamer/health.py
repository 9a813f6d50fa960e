"""The HTTP side: /metrics, /healthz and /readyz on one port.

Kubernetes probes and Prometheus scrape the same listener, so there is one address to expose
and one to firewall. Liveness means the processing loop has completed a poll recently (a
wedged loop gets restarted); readiness means the member has joined its group, restored the
state of the partitions it was given and replayed them up to their committed offsets (a
rolling update waits for it).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app


class HealthSource(Protocol):
    def liveness(self) -> tuple[bool, str]: ...
    def readiness(self) -> tuple[bool, str]: ...


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def make_app(registry: CollectorRegistry, health: HealthSource | None) -> Callable[..., Iterable[bytes]]:
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path in ("/healthz", "/readyz"):
            if health is None:
                ok, detail = True, "no loop attached"
            else:
                ok, detail = health.liveness() if path == "/healthz" else health.readiness()
            body = f"{'ok' if ok else 'not ok'}: {detail}\n".encode()
            status = "200 OK" if ok else "503 Service Unavailable"
            start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))])
            return [body]
        if path in ("/metrics", "/"):
            return metrics_app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try /metrics, /healthz or /readyz\n"]

    return app


def serve(registry: CollectorRegistry, host: str, port: int, health: HealthSource | None = None) -> int:
    """Serve in a daemon thread; returns the bound port."""
    server = make_server(host, port, make_app(registry, health), server_class=_Server, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return int(server.server_address[1])


class LoopHealth:
    """Health derived from the loop's own timestamps and flags."""

    def __init__(self, max_stall_s: float) -> None:
        self.max_stall_s = max_stall_s
        self.last_progress = time.monotonic()
        self.joined = False
        self.restoring = False
        self.replaying = 0  # partitions still re-reading events up to their committed offset
        self.stopping = False
        self.unreachable_since: float | None = None  # monotonic time the idle broker probe first failed

    def progress(self) -> None:
        self.last_progress = time.monotonic()

    def liveness(self) -> tuple[bool, str]:
        stalled = time.monotonic() - self.last_progress
        if stalled > self.max_stall_s:
            return False, f"no poll completed for {stalled:.0f}s (limit {self.max_stall_s:.0f}s)"
        return True, f"last poll {stalled:.1f}s ago"

    def readiness(self) -> tuple[bool, str]:
        if self.stopping:
            return False, "shutting down"
        if not self.joined:
            return False, "waiting for partition assignment"
        if self.restoring:
            return False, "restoring partition state"
        if self.replaying:
            return False, f"replaying {self.replaying} partitions up to their committed offsets"
        if self.unreachable_since is not None:
            return False, f"no broker has answered for {time.monotonic() - self.unreachable_since:.0f}s"
        return True, "partitions assigned and state restored"
