"""Logging setup: one JSON object per line, with Kafka context passed as `extra`.

Log shippers (Fluent Bit, Vector, Loki's promtail) parse JSON lines without a regex, and
fields such as topic, partition and offset become searchable. Nothing is logged per event at
INFO: the loop logs rebalances, restores, failures and shutdown, never a line per record.
"""

from __future__ import annotations

import logging
import sys
import time
from datetime import datetime, timezone
from typing import Any

import orjson

# Attributes every LogRecord has; anything else on a record came from `extra=` and is context.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


class Repeats(logging.Filter):
    """Passes each message of the Kafka client (logger and format string) at most once per
    `every_s` seconds and says, on the next one it passes, how many it held back.

    During a broker outage kafka-python logs the same line (marking the coordinator dead) many
    times a second (a review counted ~1,800): megabytes of log a minute for one fact. The daemon's own lines are
    never held back (one format string there covers many partitions or records)."""

    def __init__(self, every_s: float = 10.0) -> None:
        super().__init__()
        self.every_s = every_s
        self._last: dict[tuple[str, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not (record.name == "kafka" or record.name.startswith("kafka.")):
            return True
        key = (record.name, record.getMessage())  # (the same text: "connection lost" to broker 2 is news after broker 1)
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last[0] < self.every_s:
            self._last[key] = (last[0], last[1] + 1)
            return False
        if last is not None and last[1]:
            record.repeated = last[1]  # (held back since the last one passed)
            if not isinstance(record.msg, str) or not record.args:
                record.msg = f"{record.getMessage()} (repeated {last[1]} times)"
            else:
                record.msg = f"{record.msg} (repeated {last[1]} times)"
        if len(self._last) > 10_000:  # (distinct lines are few; this only bounds a pathological case)
            self._last.clear()
        self._last[key] = (now, 0)
        return True


def setup_logging(level: str, fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if logging.getLevelName(level) > logging.DEBUG:  # (at DEBUG every line of the client is wanted)
        handler.addFilter(Repeats())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # kafka-python logs every reconnect attempt at ERROR; its warnings are enough at our INFO.
    logging.getLogger("kafka").setLevel(max(logging.WARNING, logging.getLevelName(level)))
