"""systemd's service notifications (sd_notify), for `Type=notify` units with a watchdog.

A liveness probe covers Kubernetes; on a plain host the unit's watchdog does the same job: the
processing loop pings it after each completed poll, so a loop wedged inside a call (a driver, a
lock, a filesystem that stopped answering) stops the pings and systemd restarts the daemon,
with SIGABRT first, which `faulthandler` turns into every thread's traceback in the journal.
The pings come from the loop itself, never from a timer thread: a timer would keep a wedged
loop looking alive. The protocol is one datagram of `KEY=value` lines to the unix socket named
by `$NOTIFY_SOCKET` (`@` for the abstract namespace); libsystemd is not needed for that.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, MutableMapping

log = logging.getLogger(__name__)

STATUS_EVERY_S = 5.0
_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    """Sends READY/STATUS/WATCHDOG/STOPPING to the service manager; does nothing without one."""

    def __init__(self, socket_path: str | None = None, watchdog_s: float | None = None) -> None:
        self.address: str | bytes | None = None
        if socket_path:
            # An abstract socket is written '@name' and addressed with a leading NUL byte.
            self.address = b"\0" + socket_path[1:].encode() if socket_path.startswith("@") else socket_path
        self.watchdog_s = watchdog_s if self.address is not None else None
        # A ping at most every second (sd_watchdog_enabled(3) asks for at least two a period):
        # pings come only after completed polls, so the slowest tolerated poll is the period less
        # this; at a quarter of the 90 s period a 68 s send retry would have tripped it.
        self._ping_every = min(watchdog_s / 4, 1.0) if watchdog_s else float("inf")
        self._last_ping = float("-inf")
        self._status = ""
        self._last_status = float("-inf")
        self._ready = False
        self._failed = False
        self._sock: socket.socket | None = None

    @classmethod
    def from_env(cls, env: MutableMapping[str, str] | None = None, pid: int | None = None) -> Notifier:
        """Reads and removes the manager's variables, so no child process answers for this one."""
        env = os.environ if env is None else env
        values = {name: env.pop(name, None) for name in _VARIABLES}
        path = values["NOTIFY_SOCKET"]
        if path and not path.startswith(("/", "@")):
            log.warning("NOTIFY_SOCKET=%s is not a unix socket path; not notifying the service manager", path)
            path = None
        watchdog_s = None
        usec, wd_pid = values["WATCHDOG_USEC"], values["WATCHDOG_PID"]
        if usec and (wd_pid is None or wd_pid == str(os.getpid() if pid is None else pid)):
            try:
                watchdog_s = int(usec) / 1e6 if int(usec) > 0 else None
            except ValueError:
                log.warning("WATCHDOG_USEC=%s is not a number of microseconds; not pinging the watchdog", usec)
        return cls(path, watchdog_s)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def _send(self, message: str) -> bool:
        """Never blocks the loop (a manager with a full queue refuses at once) and never raises."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.setblocking(False)
            self._sock.sendto(message.encode(), self.address)
        except OSError as err:
            if not self._failed:  # once per run of failures: the manager may be restarting
                log.warning("could not notify the service manager at %r: %s", self.address, err)
            self._failed = True
            return False
        self._failed = False
        return True

    def alive(self, status: Callable[[], str] | None = None) -> None:
        """The loop completed a poll: READY=1 the first time, the watchdog at most once a second
        (four times a period, if that is shorter), and the status line (`systemctl status`) when
        it changed, looked at at most every few seconds."""
        if self.address is None:
            return
        # What was said is recorded only once the datagram went: a READY=1 lost to a full queue
        # left the unit starting until TimeoutStartSec killed it. The next poll says it again.
        lines = []
        if not self._ready:
            lines.append("READY=1")
        now = time.monotonic()
        ping = self.watchdog_s is not None and now - self._last_ping >= self._ping_every
        if ping:
            lines.append("WATCHDOG=1")
        text = None
        if status is not None and now - self._last_status >= min(self._ping_every, STATUS_EVERY_S):
            text = status()
            if text != self._status:
                lines.append(f"STATUS={text}")
        if lines and not self._send("\n".join(lines)):
            return
        self._ready = True  # (said now, or before: READY=1 is in every message until it goes)
        if ping:
            self._last_ping = now
        if text is not None:
            self._status, self._last_status = text, now

    def stopping(self, status: str = "draining: finishing the batch in hand, writing snapshots") -> None:
        self._send(f"STOPPING=1\nSTATUS={status}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
