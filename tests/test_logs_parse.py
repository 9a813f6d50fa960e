"""Log parsing: presets, JSON, custom layouts, stream id selection, levels, rejections."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone

import numpy as np
import orjson
import pytest

from streamer.decode import Decoder
from streamer.logparse import LEVEL_NAMES, REASONS, LogParser, ParsedLogs, line_format, parse_level


def _parse(parser: LogParser, values: Sequence[bytes | None], keys: Sequence[bytes | None] | None = None, record_ts: int = 0) -> ParsedLogs:
    keys = keys if keys is not None else [None] * len(values)
    return parser.parse(values, keys, np.full(len(values), record_ts, dtype=np.int64))


def _ms(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, micro: int = 0) -> int:
    return int(datetime(year, month, day, hour, minute, second, micro, tzinfo=timezone.utc).timestamp() * 1000)


def test_bgl_preset():
    line = (
        b"1117838570 2005.06.03 R02-M1-N0-C:J12-U11 2005-06-03-15.42.50.675872 R02-M1-N0-C:J12-U11 "
        b"RAS KERNEL INFO instruction cache parity error corrected"
    )
    res = _parse(LogParser("bgl", "service"), [line])
    ev = res.event(0)
    assert ev.stream == "KERNEL"
    assert ev.message == "instruction cache parity error corrected"
    assert LEVEL_NAMES[ev.level] == "INFO"
    assert ev.ts_ms == _ms(2005, 6, 3, 15, 42, 50, 675872) // 1000 * 1000 + 675
    assert ev.fields["host"] == "R02-M1-N0-C:J12-U11"
    fatal = line.replace(b"KERNEL INFO", b"APP FATAL")
    assert LEVEL_NAMES[_parse(LogParser("bgl", "host"), [fatal]).event(0).level] == "FATAL"


def test_syslog_preset_with_and_without_tag():
    lines = [
        b"Jun 14 15:16:01 combo sshd(pam_unix)[19939]: authentication failure; logname= uid=0",
        b"Jun 19 04:09:11 combo syslogd 1.4.1: restart.",
        b"Jun 19 04:09:12 combo no tag on this line",
    ]
    res = _parse(LogParser("syslog", "service"), lines, [b"combo"] * 3, record_ts=_ms(2024, 7, 1))
    assert not res.dead
    assert res.stream == ["sshd(pam_unix)", "syslogd 1.4.1", "combo"]  # no tag: the key names the stream
    assert res.message[0] == "authentication failure; logname= uid=0"
    assert res.fields[0]["pid"] == "19939"
    assert res.ts_ms[0] == _ms(2024, 6, 14, 15, 16, 1)  # the year comes from the record timestamp
    assert res.message[2] == "no tag on this line"
    assert res.level.tolist() == [0, 0, 0]  # syslog lines carry no level


def test_syslog_december_line_read_in_january_is_last_year():
    res = _parse(LogParser("syslog", "host"), [b"Dec 31 23:59:59 h app: x"], record_ts=_ms(2025, 1, 1, 0, 0, 5))
    assert res.ts_ms[0] == _ms(2024, 12, 31, 23, 59, 59)


def test_hdfs_and_thunderbird_presets():
    hdfs = b"081109 203615 148 INFO dfs.DataNode$PacketResponder: PacketResponder 1 for block blk_38865049064139660 terminating"
    ev = _parse(LogParser("hdfs", "service"), [hdfs]).event(0)
    assert ev.stream == "dfs.DataNode$PacketResponder"
    assert ev.ts_ms == _ms(2008, 11, 9, 20, 36, 15)
    assert ev.message.startswith("PacketResponder 1 for block")
    tb = b"1131566461 2005.11.09 dn228 Nov 9 12:01:01 dn228/dn228 crond(pam_unix)[2915]: session closed for user root"
    ev = _parse(LogParser("thunderbird", "host"), [tb]).event(0)
    assert (ev.stream, ev.ts_ms, ev.message) == ("dn228", 1131566461000, "session closed for user root")
    assert ev.fields["service"] == "crond(pam_unix)"


def test_logfmt_plain_and_custom_regex():
    lf = b'ts=2024-05-01T10:00:00Z level=warn service=billing msg="card declined for order 42" attempt=3'
    ev = _parse(LogParser("logfmt", "service"), [lf]).event(0)
    assert (ev.stream, ev.message, LEVEL_NAMES[ev.level]) == ("billing", "card declined for order 42", "WARN")
    assert ev.ts_ms == _ms(2024, 5, 1, 10) and ev.fields["attempt"] == "3"
    plain = _parse(LogParser("plain", "service"), [b"2024-05-01 10:00:00 ERROR disk full"], [b"node-1"], record_ts=7).event(0)
    assert (plain.stream, plain.ts_ms, LEVEL_NAMES[plain.level], plain.message) == (
        "node-1",
        7,
        "ERROR",
        "2024-05-01 10:00:00 ERROR disk full",
    )
    custom = LogParser(r"^(?P<ts>\d+) \[(?P<level>\w+)\] (?P<component>[\w.]+) - (?P<message>.*)$", "component")
    ev = _parse(custom, [b"1714557600 [E] db.pool - connection reset"]).event(0)
    assert (ev.stream, ev.ts_ms, LEVEL_NAMES[ev.level], ev.message) == ("db.pool", 1714557600000, "ERROR", "connection reset")


def test_micro_and_nanosecond_epochs_are_recognised_by_size():
    """OpenTelemetry and Loki write epoch nanoseconds: read as milliseconds they were dates 53
    million years ahead (through a float that lost the last digits), which scored 1.0 on timing
    alone. From 1e14 (the year 5138 in ms) a number is microseconds, from 1e17 nanoseconds, for
    log lines and sensor events alike."""
    ms = 1_700_000_000_123
    for ts in (b"1700000000123", b"1700000000123456", b"1700000000123456789", b'"1700000000123456789"'):
        ev = _parse(LogParser("plain", "service"), [b'{"msg": "x", "service": "s", "ts": ' + ts + b"}"]).event(0)
        assert ev.ts_ms == ms, ts
    decoder = Decoder(8, 65536, 256)
    for ts in (ms, ms * 1000 + 456, ms * 1_000_000 + 456_789):
        dec = decoder.decode([orjson.dumps({"stream": "s", "ts": ts, "values": {"x": 1.0}})], [None], np.zeros(1, dtype=np.int64))
        assert dec.ts_ms.tolist() == [ms], ts


def test_json_records():
    raw = (
        b'{"ts": "2024-05-01T10:00:00.250Z", "level": "critical", "service": "api", "host": "h1", "message": "out of memory", "code": 137}'
    )
    ev = _parse(LogParser("bgl", "service"), [raw]).event(0)  # JSON is recognised whatever the line layout
    assert (ev.stream, LEVEL_NAMES[ev.level], ev.message) == ("api", "FATAL", "out of memory")
    assert ev.ts_ms == _ms(2024, 5, 1, 10) + 250 and ev.fields["code"] == "137" and ev.fields["host"] == "h1"
    assert _parse(LogParser("plain", "host"), [raw]).stream == ["h1"]
    assert _parse(LogParser("plain", "service"), [b'{"msg": "x", "service": "s", "ts": 1714557600123, "level": 3}']).level.tolist() == [5]
    # A number is seconds below 1e11, as in a string: zap writes 1700000000.123 (it was read as
    # milliseconds, a date in January 1970).
    seconds = [b'{"msg": "x", "service": "s", "ts": 1700000000.123}', b'{"msg": "x", "service": "s", "ts": 1700000000}']
    assert _parse(LogParser("plain", "service"), seconds).ts_ms.tolist() == [1_700_000_000_123, 1_700_000_000_000]


def test_a_multi_line_record_is_one_event():
    """A Java stack trace arrives as one record with newlines: the presets matched only up to
    the first and dead-lettered it as unmatched_format."""
    raw = b"Jun 14 15:16:01 web-1 app[42]: java.lang.NullPointerException: boom\n\tat com.example.Main.run(Main.java:10)"
    ev = _parse(LogParser("syslog", "service"), [raw], record_ts=_ms(2024, 6, 15)).event(0)
    assert ev.stream == "app" and ev.message.startswith("java.lang.NullPointerException") and ev.message.endswith("(Main.java:10)")


def test_stream_id_from_key_and_fallback():
    raw = b'{"service": "api", "message": "hello"}'
    assert _parse(LogParser("plain", "key"), [raw], [b"partition-key"]).stream == ["partition-key"]
    assert _parse(LogParser("plain", "host"), [raw], [b"k"]).stream == ["k"]  # no host field: the key
    res = _parse(LogParser("plain", "host"), [raw], [None])
    assert res.dead[0][1] == "missing_stream"


def test_rejections_carry_reasons_and_spare_the_rest():
    parser = LogParser("syslog", "service", max_bytes=200, max_stream_len=10)
    values: list[bytes | None] = [
        None,
        b"   ",
        b"{not json",
        b'{"level": "info"}',
        b"this is not syslog",
        b"x" * 300,
        b'{"message": "m", "service": "a-very-long-service-name"}',
        b'{"message": "m", "service": "s", "ts": "yesterday"}',
        # Beyond int64 milliseconds: these raised OverflowError for the whole batch.
        b'{"message": "m", "service": "s", "ts": "99999999999999999999"}',
        b'{"message": "m", "service": "s", "ts": 1e300}',
        # These raised out of the parser and stopped the daemon: a superscript digit passes
        # str.isdigit but not int(), and int() refuses over 4,300 digits.
        '{"message": "m", "service": "s", "ts": "\u00b2"}'.encode(),
        # A header with nothing after it was scored with an empty template, one for all such lines.
        b"Jun 14 15:16:04 web-1 sshd[1]:   ",
        b"Jun 14 15:16:01 combo sshd[1]: fine",
    ]
    res = _parse(parser, values)
    reasons = [r for _, r, _ in res.dead]
    assert reasons == [
        "empty_message",
        "empty_message",
        "invalid_json",
        "missing_message",
        "unmatched_format",
        "oversized",
        "invalid_stream",
        "invalid_timestamp",
        "invalid_timestamp",
        "invalid_timestamp",
        "invalid_timestamp",
        "empty_message",
    ]
    assert set(reasons) <= set(REASONS)
    assert res.index.tolist() == [12] and res.stream == ["sshd"]
    sub = res.take(np.array([0]))
    assert sub.index.tolist() == [12]
    digits = _parse(LogParser("plain", "service"), [b'{"message": "m", "service": "s", "ts": "' + b"1" * 5000 + b'"}'])
    assert [r for _, r, _ in digits.dead] == ["invalid_timestamp"]
    # A syslog date takes its year from the record timestamp; one past year 9999 (a producer
    # writing microseconds) raised out of the parser.
    far = _parse(LogParser("syslog", "service"), [b"Jun 14 15:16:01 combo sshd[1]: fine"], record_ts=1_781_449_400_000_000)
    assert [r for _, r, _ in far.dead] == ["invalid_timestamp"]


def test_an_unforeseen_error_dead_letters_the_record_not_the_daemon(monkeypatch):
    """The net under the checks: an exception none of them foresaw (here injected into the
    JSON branch) dead-letters its record as parse_error, naming the exception."""
    parser = LogParser("plain", "service")

    def broken(raw: bytes, fallback_ms: int) -> None:
        raise KeyError("injected")

    monkeypatch.setattr(parser, "_json", broken)
    res = _parse(parser, [b'{"message": "m", "service": "s"}', b"plain line"], keys=[None, b"k"])
    assert res.dead == [(0, "parse_error", "KeyError: 'injected'")] and res.index.tolist() == [1]


def test_levels_and_bad_formats():
    assert [LEVEL_NAMES[parse_level(x)] for x in ("trace", "DEBUG", "notice", "Warning", "err", "SEVERE", "panic", "wat", None)] == [
        "TRACE",
        "DEBUG",
        "INFO",
        "WARN",
        "ERROR",
        "ERROR",
        "FATAL",
        "UNKNOWN",
        "UNKNOWN",
    ]
    with pytest.raises(ValueError):
        line_format("(unclosed")
    with pytest.raises(ValueError):
        line_format(r"\d+ no groups")


def test_json_records_are_judged_as_the_sensor_decoder_judges_them():
    """A JSON record with a byte-order mark was read as a plain line (its `service` ignored); an
    empty `message` was scored; a `service` that is a list fell back to the key, or was reported
    missing, where the sensor path says invalid_stream."""
    bom = b'\xef\xbb\xbf{"service": "api", "message": "GET /items 200"}'
    ev = _parse(LogParser("plain", "service"), [bom]).event(0)
    assert (ev.stream, ev.message) == ("api", "GET /items 200")
    res = _parse(
        LogParser("plain", "service"),
        [b'{"service": "api", "message": ""}', b'{"service": "api", "message": "  "}', b'{"service": ["a", "b"], "message": "x"}'],
        [b"key", b"key", b"key"],
    )
    assert len(res) == 0
    assert [(pos, reason) for pos, reason, _ in res.dead] == [(0, "empty_message"), (1, "empty_message"), (2, "invalid_stream")]
    blank = _parse(LogParser("plain", "service"), [b"\xef\xbb\xbf", b"\xef\xbb\xbf  \r\n"], [b"key", b"key"])
    assert len(blank) == 0 and [reason for _, reason, _ in blank.dead] == ["empty_message", "empty_message"]
