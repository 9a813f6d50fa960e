"""Log parsing: presets, JSON, custom layouts, stream id selection, levels, rejections."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone

import numpy as np
import orjson
import pytest

from streamer.decode import Decoder
from streamer.logformats import LEVEL_NAMES, line_format, parse_level
from streamer.logparse import REASONS, LogParser, ParsedLogs


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


def test_a_syslog_year_is_the_one_nearest_behind_the_record_time():
    """The year only ever stepped back: a host east of UTC writing January 1st while UTC was
    still on December 31st got last January (a year early), and February 29th of a file
    replayed the next January was invalid_timestamp (built in a year without it first)."""
    tokyo = _parse(LogParser("syslog", "host"), [b"Jan  1 08:00:00 h app: x"], record_ts=_ms(2024, 12, 31, 23))
    assert tokyo.ts_ms.tolist() == [_ms(2025, 1, 1, 8)]
    leap = _parse(LogParser("syslog", "host"), [b"Feb 29 10:00:00 h app: x"] * 2, record_ts=_ms(2027, 1, 15))
    assert not leap.dead and leap.ts_ms.tolist() == [_ms(2024, 2, 29, 10)] * 2  # (the last one before, not 2028's)
    ahead = _parse(LogParser("syslog", "host"), [b"Jul  1 00:00:00 h app: x"], record_ts=_ms(2025, 1, 15))
    assert ahead.ts_ms.tolist() == [_ms(2024, 7, 1)]  # (half a year ahead: last year's backlog)


def test_syslog_as_sent_with_its_priority_and_as_rfc_3339_and_5424():
    """The `syslog` preset read the file layout only: the wire form with its <PRI>, and lines
    headed by an RFC 3339 time (syslog-ng's and rsyslog's file formats), were all
    unmatched_format, a whole topic unscored. RFC 5424 has a preset of its own."""
    lines = [
        b"<34>Oct 11 22:14:15 mymachine su: 'su root' failed",
        b"2024-06-01T10:00:00.123+02:00 web1 nginx[12]: GET /",
        b"<11>2024-06-01T10:00:00Z web1 cron: failed",
    ]
    res = _parse(LogParser("syslog", "host"), lines, record_ts=_ms(2024, 10, 12))
    assert not res.dead and res.stream == ["mymachine", "web1", "web1"]
    assert res.ts_ms.tolist() == [_ms(2024, 10, 11, 22, 14, 15), _ms(2024, 6, 1, 8, 0, 0, 123_000), _ms(2024, 6, 1, 10)]
    assert [LEVEL_NAMES[v] for v in res.level] == ["FATAL", "UNKNOWN", "ERROR"]  # (PRI mod 8: critical, error)
    assert res.message == ["'su root' failed", "GET /", "failed"] and res.fields[1]["service"] == "nginx"
    # An RFC 3339-headed line without a tag is no syslog line: an application's own log, whose
    # level word was taken for the host.
    app = _parse(LogParser("syslog", "host"), [b"2024-05-01T10:00:00.123Z ERROR [main] com.example.App - served"])
    assert [reason for _, reason, _ in app.dead] == ["unmatched_format"]
    rfc = [
        b"<165>1 2003-10-11T22:14:15.003Z mymachine.example.com evntslog - ID47 "
        + b'[exampleSDID@32473 iut="3" eventSource="App\\]lication"] \xef\xbb\xbfAn application event',
        b"<11>1 - - app 8710 - - disk gone\n  at Disk.check",
        b"<165>1 2003-10-11T22:14:15.003Z host app - - -",
        b"<165>1 2003-10-11T22:14:15.003Z host app - - - -",
    ]
    res = _parse(LogParser("rfc5424", "service"), rfc, [b"key"] * 4, record_ts=7)
    assert res.stream == ["evntslog", "app", "app"] and res.message == ["An application event", "disk gone\n  at Disk.check", "-"]
    assert res.ts_ms.tolist()[:2] == [_ms(2003, 10, 11, 22, 14, 15) + 3, 7]  # (a nil time: the record's)
    assert [LEVEL_NAMES[v] for v in res.level] == ["INFO", "ERROR", "INFO"]
    assert "host" not in res.fields[1] and res.fields[1]["pid"] == "8710" and res.fields[0]["msgid"] == "ID47"
    assert [(pos, reason) for pos, reason, _ in res.dead] == [(2, "empty_message")]


def test_blank_messages_and_quotes_in_logfmt_and_plain_lines():
    """`msg=""` and a line of Unicode white space were scored, all sharing one empty template,
    where the same in JSON is empty_message; an unclosed quote lost the value's last letter."""
    res = _parse(LogParser("logfmt", "service"), [b'level=info msg=""', b"msg=", b'msg="a \\"q\\" b\\\\c"', b'msg="reset'], [b"k"] * 4)
    assert _parse(LogParser("logfmt", "service"), [b'level=error msg="connection reset'], [b"k"]).message == ["connection reset"]
    assert [(pos, reason) for pos, reason, _ in res.dead] == [(0, "empty_message"), (1, "empty_message")]
    assert res.message == ['a "q" b\\c', "reset"]
    plain = _parse(LogParser("plain", "service"), ["\u3000 \u2028".encode(), b"fine"], [b"k"] * 2)
    assert [(pos, reason) for pos, reason, _ in plain.dead] == [(0, "empty_message")] and plain.message == ["fine"]


def test_a_plain_line_has_a_level_only_where_one_is_set_apart():
    """Any level word in the first 120 characters set the level: "no error found" was an
    ERROR line, with the severity prior added to a harmless one."""
    lines = [b"no error found in 3 checks", b"debugger attached: fatal flaw test", b"2024-05-01 ERROR disk", b"[error] x"]
    lines += [b"Error: boom", b"<warn> y", b"fatal: bad", b"app.error: not a level"]
    res = _parse(LogParser("plain", "service"), lines, [b"k"] * len(lines))
    assert [LEVEL_NAMES[v] for v in res.level] == ["UNKNOWN", "UNKNOWN", "ERROR", "ERROR", "ERROR", "WARN", "FATAL", "UNKNOWN"]
    # ... and where common layouts set it apart (a review of the rule above found these lost):
    common = {
        b"[Wed Oct 11 14:32:52.123 2000] [core:error] [pid 35708:tid 1] File does not exist": "ERROR",  # Apache 2.4
        b"2024-05-01T10:00:00.000Z\terror\tapp/main.go:12\tdisk full": "ERROR",  # zap's console encoder
        b"time=2024-05-01T10:00:00Z level=warn disk": "WARN",
        b"Warning disk almost full": "WARN",
        b"2024-05-01 10:00:00.123 [main] error c.e.App - connection refused": "ERROR",
        b"2024-05-01 10:00:00,123 - app - error - Something broke": "ERROR",
        b"12:00:00 INF request served": "INFO",  # zerolog's console writer
    }
    res = _parse(LogParser("plain", "service"), list(common), [b"k"] * len(common))
    assert [LEVEL_NAMES[v] for v in res.level] == list(common.values())


def test_a_custom_layout_keeps_a_stack_traces_further_lines():
    """match() left a trace's further lines out without a word; they join the message when the
    message group ends the first line's match. Only the message: a `.*` in another group stays
    on the first line (a stream id made of the whole trace was the first attempt's regression)."""
    custom = LogParser(r"(?P<ts>\S+ \S+) (?P<level>\w+) (?P<message>.*)", "service")
    ev = _parse(custom, [b"2024-01-01 10:00:00 ERROR NullPointerException: boom\n\tat a.b(C.java:1)"], [b"k"]).event(0)
    assert ev.message == "NullPointerException: boom\n\tat a.b(C.java:1)"
    greedy = LogParser(r"^(?P<ts>\S+) (?P<level>\w+) (?P<service>.*) - (?P<message>.*)$", "service")
    ev = _parse(greedy, [b"2024-05-01T10:00:00Z ERROR billing - payment failed\njava.lang.RuntimeException: x - y"]).event(0)
    assert (ev.stream, ev.message) == ("billing", "payment failed\njava.lang.RuntimeException: x - y")


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


def test_sensor_epoch_seconds_are_read_as_seconds():
    """time.time() and Unix tools write epoch seconds; the sensor decoder read them as
    milliseconds (1767225600 was 1970-01-21, and a day of 5-minute readings fell within 86 s of
    one hour, where the time-of-day profile and the recurrence memory never worked). Below 1e11
    a number is seconds, as on the log path."""
    decoder = Decoder(8, 65536, 256)
    for ts in (1_767_225_600, 1_767_225_600.25, 1_767_225_600_250 // 1000):
        dec = decoder.decode([orjson.dumps({"stream": "s", "ts": ts, "values": {"x": 1.0}})], [None], np.zeros(1, dtype=np.int64))
        assert dec.ts_ms.tolist() == [int(ts * 1000)], ts
    ms = orjson.dumps({"stream": "s", "ts": 1_767_225_600_250, "values": {"x": 1.0}})
    assert decoder.decode([ms], [None], np.zeros(1, dtype=np.int64)).ts_ms.tolist() == [1_767_225_600_250]


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
    # zap's DPanic, log15's and Grafana's four-letter names, zerolog's console ones, RFC 5424's
    # and winston's: UNKNOWN before, so no severity prior for an error line.
    more = ("dpanic", "EROR", "dbug", "informational", "silly", "WRN", "FTL", "INF")
    assert [LEVEL_NAMES[parse_level(x)] for x in more] == ["ERROR", "ERROR", "DEBUG", "INFO", "TRACE", "WARN", "FATAL", "INFO"]
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


# -- JSON layouts of common structured loggers -------------------------------------------------
# Each record is as the logger writes it; before these layouts were read, their levels were
# UNKNOWN (or the records rejected for want of a `message`).


def test_pino_and_bunyan_numeric_levels():
    """pino and bunyan write `level` as 10 trace, 20 debug, 30 info, 40 warn, 50 error, 60 fatal."""
    pino = [
        b'{"level":30,"time":1714557600250,"pid":4242,"hostname":"web-1","reqId":"req-1","res":{"statusCode":200},'
        b'"responseTime":12,"msg":"request completed"}',
        b'{"level":50,"time":1714557601000,"pid":4242,"hostname":"web-1","err":{"type":"Error","message":"ECONNRESET"},'
        b'"msg":"upstream failed"}',
        b'{"level":60,"time":1714557602000,"pid":4242,"hostname":"web-1","msg":"out of memory"}',
        b'{"level":10,"time":1714557603000,"pid":4242,"hostname":"web-1","msg":"cache lookup"}',
    ]
    res = _parse(LogParser("plain", "hostname"), pino)
    assert not res.dead
    assert [LEVEL_NAMES[v] for v in res.level.tolist()] == ["INFO", "ERROR", "FATAL", "TRACE"]
    assert res.message[:2] == ["request completed", "upstream failed"] and res.stream[0] == "web-1"
    assert res.ts_ms.tolist() == [_ms(2024, 5, 1, 10) + 250, *(_ms(2024, 5, 1, 10, 0, s) for s in (1, 2, 3))]
    bunyan = (
        b'{"name":"billing","hostname":"web-1","pid":123,"level":40,"msg":"slow query: 812 ms","time":"2024-05-01T10:00:00.250Z","v":0}'
    )
    ev = _parse(LogParser("plain", "name"), [bunyan]).event(0)
    assert (ev.stream, LEVEL_NAMES[ev.level], ev.message, ev.ts_ms) == ("billing", "WARN", "slow query: 812 ms", _ms(2024, 5, 1, 10) + 250)


def test_opentelemetry_log_records():
    """A log record of the OpenTelemetry data model as OTLP/JSON writes it (lowerCamelCase, int64
    nanoseconds as strings, the body an AnyValue), and as pipelines flatten it (snake_case, or the
    data model's own PascalCase). SeverityNumber 1-4 is TRACE, .., 21-24 FATAL."""
    otlp = (
        b'{"timeUnixNano":"1714557600250000000","observedTimeUnixNano":"1714557600300000000","severityNumber":17,'
        b'"severityText":"Error","traceId":"5B8EFFF798038103D269B633813FC60C","spanId":"EEE19B7EC3C1B174",'
        b'"body":{"stringValue":"charge declined for order 42"},'
        b'"attributes":[{"key":"order.id","value":{"intValue":"42"}}]}'
    )
    ev = _parse(LogParser("plain", "service"), [otlp], [b"checkout"]).event(0)
    assert (ev.stream, LEVEL_NAMES[ev.level], ev.message) == ("checkout", "ERROR", "charge declined for order 42")
    assert ev.ts_ms == _ms(2024, 5, 1, 10) + 250
    # No time (0 is "unknown" to OpenTelemetry): the observed time; no number: the text.
    unset = b'{"timeUnixNano":"0","observedTimeUnixNano":"1714557600300000000","severityText":"Warning","body":{"stringValue":"retrying"}}'
    ev = _parse(LogParser("plain", "service"), [unset], [b"checkout"]).event(0)
    assert (LEVEL_NAMES[ev.level], ev.message, ev.ts_ms) == ("WARN", "retrying", _ms(2024, 5, 1, 10) + 300)
    snake = (
        b'{"time_unix_nano":1714557600250000000,"severity_number":9,"severity_text":"INFO",'
        b'"body":"GET /items 200","service":"catalog","trace_id":"5b8efff798038103d269b633813fc60c"}'
    )
    ev = _parse(LogParser("plain", "service"), [snake]).event(0)
    assert (ev.stream, LEVEL_NAMES[ev.level], ev.message, ev.ts_ms) == ("catalog", "INFO", "GET /items 200", _ms(2024, 5, 1, 10) + 250)
    pascal = (
        b'{"Timestamp":"2024-05-01 10:00:00.250000000","SeverityText":"Critical","SeverityNumber":21,'
        b'"ServiceName":"checkout","Body":"payment service unreachable"}'
    )
    ev = _parse(LogParser("plain", "ServiceName"), [pascal]).event(0)
    assert (ev.stream, LEVEL_NAMES[ev.level], ev.message) == ("checkout", "FATAL", "payment service unreachable")
    assert ev.ts_ms == _ms(2024, 5, 1, 10) + 250
    # The number is OpenTelemetry's scale in its own field (5 is DEBUG, not syslog's notice) and
    # decides over the text; each range of four is one level.
    numbers = [b'{"body":"x","service":"s","severityNumber":%d,"severityText":"INFO"}' % n for n in (1, 4, 5, 8, 12, 13, 20, 24)]
    assert [LEVEL_NAMES[v] for v in _parse(LogParser("plain", "service"), numbers).level.tolist()] == [
        "TRACE", "TRACE", "DEBUG", "DEBUG", "INFO", "WARN", "ERROR", "FATAL",
    ]  # fmt: skip


def test_elastic_common_schema_log_level():
    """ECS: `log.level` as a dotted key (ecs-logging writes it so, and may pad it so the message
    starts at the same column), or nested as {"log": {"level": ...}} (Logstash, Filebeat)."""
    dotted = (
        b'{"@timestamp":"2024-05-01T10:00:00.250Z","log.level":"error","message":"payment failed for order 42",'
        b'"ecs.version":"1.6.0","log":{"logger":"billing.pay","origin":{"file":{"line":42,"name":"pay.py"},"function":"charge"},'
        b'"original":"payment failed for order 42"},"process":{"name":"MainProcess","pid":7,"thread":{"id":1,"name":"MainThread"}},'
        b'"service.name":"billing"}'
    )
    padded = (
        b'{"@timestamp":"2024-05-01T10:00:01.000Z","log.level":" WARN","message":"pool at 90%",'
        b'"ecs.version":"1.2.0","service.name":"billing"}'
    )
    res = _parse(LogParser("plain", "service.name"), [dotted, padded])
    assert not res.dead and res.stream == ["billing", "billing"]
    assert [LEVEL_NAMES[v] for v in res.level.tolist()] == ["ERROR", "WARN"]
    assert res.message == ["payment failed for order 42", "pool at 90%"]
    assert res.ts_ms.tolist() == [_ms(2024, 5, 1, 10) + 250, _ms(2024, 5, 1, 10, 0, 1)]
    nested = (
        b'{"@timestamp":"2024-05-01T10:00:02.500Z","message":"disk usage above 95%","log":{"level":"critical","logger":"disk"},'
        b'"host":{"name":"web-1"},"agent":{"type":"filebeat"}}'
    )
    ev = _parse(LogParser("plain", "service"), [nested], [b"web-1"]).event(0)
    assert (LEVEL_NAMES[ev.level], ev.message, ev.ts_ms) == ("FATAL", "disk usage above 95%", _ms(2024, 5, 1, 10, 0, 2) + 500)


def test_journald_json_records():
    """`journalctl -o json`: PRIORITY is a syslog severity as a string of one digit, MESSAGE the
    text (an array of byte values when it holds control characters), timestamps microseconds as
    strings: _SOURCE_REALTIME_TIMESTAMP (when logged) where present, else __REALTIME_TIMESTAMP
    (when received). The stream can be any field, here _HOSTNAME."""
    syslog = (
        b'{"__CURSOR":"s=6c1d1bb4e3b84e4c9f3e0c6a;i=1a2b;b=9f0e;m=75bcd15;t=6176a0c1e6a9b;x=3d2a","__REALTIME_TIMESTAMP":"1714557600250900",'
        b'"__MONOTONIC_TIMESTAMP":"123456789","_BOOT_ID":"9f0e6c1d1bb4e3b84e4c9f3e0c6a1a2b","_MACHINE_ID":"0c6a1a2b9f0e6c1d1bb4e3b84e4c9f3e",'
        b'"_HOSTNAME":"web-1","PRIORITY":"3","SYSLOG_FACILITY":"4","SYSLOG_IDENTIFIER":"sshd","SYSLOG_PID":"1234","_PID":"1234",'
        b'"_UID":"0","_GID":"0","_COMM":"sshd","_EXE":"/usr/sbin/sshd","_CMDLINE":"sshd: root [priv]","_SYSTEMD_UNIT":"ssh.service",'
        b'"_TRANSPORT":"syslog","MESSAGE":"error: kex_exchange_identification: Connection closed by remote host",'
        b'"_SOURCE_REALTIME_TIMESTAMP":"1714557600250123"}'
    )
    stdout = (
        b'{"__REALTIME_TIMESTAMP":"1714557601000500","_HOSTNAME":"web-1","PRIORITY":"6","SYSLOG_IDENTIFIER":"app",'
        b'"_TRANSPORT":"stdout","_SYSTEMD_UNIT":"app.service","MESSAGE":"listening on :8080"}'
    )
    coloured = (  # "\x1b[33mdisk almost full\x1b[0m"
        b'{"__REALTIME_TIMESTAMP":"1714557602000000","_HOSTNAME":"web-1","PRIORITY":"4","SYSLOG_IDENTIFIER":"app",'
        b'"MESSAGE":[27,91,51,51,109,100,105,115,107,32,97,108,109,111,115,116,32,102,117,108,108,27,91,48,109]}'
    )
    res = _parse(LogParser("plain", "_HOSTNAME"), [syslog, stdout, coloured])
    assert not res.dead and res.stream == ["web-1"] * 3
    assert [LEVEL_NAMES[v] for v in res.level.tolist()] == ["ERROR", "INFO", "WARN"]
    assert res.message == [
        "error: kex_exchange_identification: Connection closed by remote host",
        "listening on :8080",
        "\x1b[33mdisk almost full\x1b[0m",
    ]
    assert res.ts_ms.tolist() == [_ms(2024, 5, 1, 10) + 250, _ms(2024, 5, 1, 10, 0, 1), _ms(2024, 5, 1, 10, 0, 2)]
    assert res.fields[0]["SYSLOG_IDENTIFIER"] == "sshd"
    emerg = _parse(LogParser("plain", "_HOSTNAME"), [stdout.replace(b'"PRIORITY":"6"', b'"PRIORITY":"0"')]).level.tolist()
    assert [LEVEL_NAMES[v] for v in emerg] == ["FATAL"]


def test_serilog_compact_json():
    """Serilog's CLEF: `@t` ISO-8601 (seven fractional digits), `@mt` the template
    (CompactJsonFormatter) or `@m` the rendered message (RenderedCompactJsonFormatter), `@l`
    the level name, left out at Information."""
    compact = b'{"@t":"2024-05-01T10:00:00.2501234Z","@mt":"Hello, {User}","User":"nblumhardt","SourceContext":"App.Greeter"}'
    rendered = (
        b'{"@t":"2024-05-01T12:00:01.5000000+02:00","@m":"Payment for order 42 failed","@i":"a1b2c3d4","@l":"Error",'
        b'"@x":"System.InvalidOperationException: card declined","OrderId":42,"SourceContext":"App.Payments"}'
    )
    verbose = b'{"@t":"2024-05-01T10:00:02.0000000Z","@mt":"Cache {Key} hit","@l":"Verbose","Key":"k1","SourceContext":"App.Cache"}'
    res = _parse(LogParser("plain", "SourceContext"), [compact, rendered, verbose])
    assert not res.dead and res.stream == ["App.Greeter", "App.Payments", "App.Cache"]
    assert [LEVEL_NAMES[v] for v in res.level.tolist()] == ["INFO", "ERROR", "TRACE"]
    assert res.message == ["Hello, {User}", "Payment for order 42 failed", "Cache {Key} hit"]
    assert res.ts_ms.tolist() == [_ms(2024, 5, 1, 10) + 250, _ms(2024, 5, 1, 10, 0, 1) + 500, _ms(2024, 5, 1, 10, 0, 2)]


def test_python_json_logger_records():
    """python-json-logger with "%(asctime)s %(levelname)s %(name)s %(message)s": `levelname`, and
    `asctime` only with its UTC offset (a `datefmt` with %z). logging writes local time, so the
    default layout, which has none, was read as UTC and put a host not on UTC hours off (Berlin
    +1 h, New York -5 h): it leaves the record timestamp, as a `datefmt` that does not read does."""
    raw = b'{"asctime": "2024-05-01 10:00:00,250", "levelname": "WARNING", "name": "app.db", "message": "retrying connection (attempt 2)"}'
    ev = _parse(LogParser("plain", "name"), [raw], record_ts=7).event(0)
    assert (ev.stream, LEVEL_NAMES[ev.level], ev.message) == ("app.db", "WARN", "retrying connection (attempt 2)")
    assert ev.ts_ms == 7
    zoned = b'{"asctime": "2024-05-01T12:00:00+0200", "levelname": "INFO", "name": "app.db", "message": "connected"}'
    assert _parse(LogParser("plain", "name"), [zoned], record_ts=7).event(0).ts_ms == _ms(2024, 5, 1, 10)
    custom = b'{"asctime": "01/05/2024 10:00:00 AM", "levelname": "CRITICAL", "name": "app.db", "message": "giving up"}'
    ev = _parse(LogParser("plain", "name"), [custom], record_ts=7).event(0)
    assert (LEVEL_NAMES[ev.level], ev.message, ev.ts_ms) == ("FATAL", "giving up", 7)


def test_a_layout_time_that_does_not_read_leaves_the_record_time():
    """A record without a generic time field was accepted with the record's time before the
    layouts' own fields were read; one whose `@t` or `Timestamp` does not read must still be."""
    records = [
        b'{"@t": "yesterday", "@mt": "Hello", "SourceContext": "App"}',
        b'{"Timestamp": "01/05/2024 10:00", "Body": "hello", "SourceContext": "App"}',
        b'{"__REALTIME_TIMESTAMP": "soon", "MESSAGE": "hello", "SourceContext": "App"}',
    ]
    res = _parse(LogParser("plain", "SourceContext"), records, record_ts=7)
    assert not res.dead and res.ts_ms.tolist() == [7, 7, 7]


def test_fractions_finer_than_microseconds_read_on_python_3_10(monkeypatch):
    """.NET writes 7 digits of fractional seconds and Go, Docker and OpenTelemetry 9: Python 3.10's
    fromisoformat reads only 3 or 6, so Serilog and Docker records were dead-lettered there. The
    3.10 path is forced here (this runs on a later Python)."""
    from streamer import decode

    monkeypatch.setattr(decode, "_OLD_ISO_PARSER", True)
    base = _ms(2024, 5, 1, 10)
    assert decode.parse_ts("2024-05-01T10:00:00.2501234Z", 0) == base + 250
    assert decode.parse_ts("2024-05-01T10:00:00.250000000+00:00", 0) == base + 250
    assert decode.parse_ts("2024-05-01T10:00:00.25Z", 0) == base + 250
    assert decode.parse_ts("2024-05-01T10:00:00Z", 0) == base


def test_ordinary_records_keep_their_readings():
    """What the layouts above add cannot misread a record with the generic fields: a number
    0..7 in `level` (or `severity`, ...) is still a syslog severity, a number outside 0..7 and
    pino's 10..60 still UNKNOWN (9 is INFO to OpenTelemetry, but not in a generic field), a
    float or a digit string still UNKNOWN, and a generic field present decides over any
    layout's field."""
    parser = LogParser("plain", "service")
    records = [
        b'{"msg": "x", "service": "s", "level": 3}',
        b'{"msg": "x", "service": "s", "severity": 7}',
        b'{"msg": "x", "service": "s", "level": "wat"}',
        b'{"msg": "x", "service": "s", "severity": 9}',
        b'{"msg": "x", "service": "s", "level": 35}',
        b'{"msg": "x", "service": "s", "level": 3.0}',
        b'{"msg": "x", "service": "s", "level": "3"}',
        b'{"msg": "x", "service": "s", "level": "info", "PRIORITY": "3", "severityNumber": 21, "log.level": "error"}',
        b'{"msg": "x", "service": "s", "level": "wat", "levelname": "ERROR"}',
        b'{"msg": "x", "service": "s"}',
    ]
    res = _parse(parser, records, record_ts=5)
    assert not res.dead
    assert [LEVEL_NAMES[v] for v in res.level.tolist()] == [
        "ERROR", "DEBUG", "UNKNOWN", "UNKNOWN", "UNKNOWN", "UNKNOWN", "UNKNOWN", "INFO", "UNKNOWN", "UNKNOWN",
    ]  # fmt: skip
    assert res.ts_ms.tolist() == [5] * len(records)
    # A generic `ts` decides over a layout's timestamp fields too.
    both = b'{"msg": "x", "service": "s", "ts": 1714557600250, "@t": "2030-01-01T00:00:00Z", "__REALTIME_TIMESTAMP": "1"}'
    ev = _parse(parser, [both]).event(0)
    assert ev.ts_ms == _ms(2024, 5, 1, 10) + 250


def test_a_dotted_stream_field_reaches_into_nested_objects():
    """Filebeat, ECS and OpenTelemetry collectors nest the service and host ({"service": {"name":
    ...}}): `stream_field: service.name` read nothing there and every record was dead-lettered
    (`missing_stream` without a key, `invalid_stream` naming `service`). A literal dotted key
    still comes first."""
    ecs = b'{"@timestamp": "2024-05-01T10:00:00Z", "log.level": "error", "message": "payment failed", "service": {"name": "checkout"}}'
    flat = b'{"@timestamp": "2024-05-01T10:00:00Z", "message": "ok", "service.name": "cart", "service": {"name": "other"}}'
    res = _parse(LogParser("plain", "service.name"), [ecs, flat])
    assert not res.dead and res.stream == ["checkout", "cart"]
    assert LEVEL_NAMES[int(res.level[0])] == "ERROR"
    res = _parse(LogParser("plain", "service"), [ecs])
    assert res.dead and res.dead[0][1] == "invalid_stream" and "service.name" in res.dead[0][2]
    # A key with dots inside a nested object, as Elastic's and Vector's OpenTelemetry mappings write it.
    otel = b'{"message": "x", "resource": {"service.name": "checkout", "host.name": "web-1"}}'
    assert _parse(LogParser("plain", "resource.service.name"), [otel]).stream == ["checkout"]


def test_structlog_slog_and_dotnet_json_records():
    """structlog names the message `event`; Go's log/slog writes levels between its named ones
    as "WARN+2"; .NET's JSON console logger writes `LogLevel` and `Message`. The first two were
    dead-lettered or UNKNOWN, the third dead-lettered (missing_message)."""
    structlog = b'{"event": "user logged in", "level": "info", "timestamp": "2024-05-01T10:00:00Z", "logger": "auth"}'
    slog = [
        b'{"time": "2024-05-01T10:00:00Z", "level": "WARN+2", "msg": "disk filling", "service": "db"}',
        b'{"time": "2024-05-01T10:00:01Z", "level": "DEBUG-4", "msg": "tick", "service": "db"}',
        b'{"time": "2024-05-01T10:00:02Z", "level": "ERROR+4", "msg": "fsync failed", "service": "db"}',
    ]
    dotnet = (
        b'{"Timestamp": "2024-05-01T10:00:03Z", "EventId": 12, "LogLevel": "Warning", "Category": "Api.Orders",'
        b' "Message": "Order 17 retried", "State": {"Message": "Order 17 retried", "{OriginalFormat}": "Order {Id} retried"}}'
    )
    ev = _parse(LogParser("plain", "logger"), [structlog]).event(0)
    assert (ev.stream, ev.message, LEVEL_NAMES[ev.level], ev.ts_ms) == ("auth", "user logged in", "INFO", _ms(2024, 5, 1, 10))
    res = _parse(LogParser("plain", "service"), slog)
    assert [LEVEL_NAMES[res.event(i).level] for i in range(3)] == ["WARN", "DEBUG", "ERROR"]
    ev = _parse(LogParser("plain", "Category"), [dotnet]).event(0)
    assert (ev.stream, ev.message, LEVEL_NAMES[ev.level], ev.ts_ms) == ("Api.Orders", "Order 17 retried", "WARN", _ms(2024, 5, 1, 10, 0, 3))
    assert parse_level("NOTICE+1") == parse_level("NOTICE") and parse_level("WARN+") == 0 and parse_level("+2") == 0


def _otlp_batch(resources: list[tuple[str, list[dict]]]) -> bytes:
    """An ExportLogsServiceRequest as the OpenTelemetry Collector's Kafka exporter writes it with
    `encoding: otlp_json` (OTLP/JSON: lowerCamelCase, int64 as strings, enums as integers)."""

    def attrs(pairs: dict) -> list[dict]:
        kinds = {str: "stringValue", bool: "boolValue", int: "intValue", float: "doubleValue"}
        return [{"key": k, "value": {kinds[type(v)]: str(v) if type(v) is int else v}} for k, v in pairs.items()]

    return orjson.dumps(
        {
            "resourceLogs": [
                {
                    "resource": {"attributes": attrs({"service.name": service, "host.name": "node-1"})},
                    "scopeLogs": [{"scope": {"name": "app.requests", "version": "1.0"}, "logRecords": records}],
                    "schemaUrl": "https://opentelemetry.io/schemas/1.24.0",
                }
                for service, records in resources
            ]
        }
    )


def _otlp_record(ns: int, severity: int, text: str, **extra: object) -> dict:
    record = {
        "timeUnixNano": str(ns),
        "observedTimeUnixNano": str(ns + 1_000_000),
        "severityNumber": severity,
        "severityText": "x",
        "body": {"stringValue": text},
        # Attributes named as other layouts' message, level and time fields must not be read as
        # them (a review: levelname and log.level beat severityNumber, MESSAGE the body, @t the time).
        "attributes": [
            {"key": "http.status", "value": {"intValue": "500"}},
            *({"key": k, "value": {"stringValue": "DEBUG"}} for k in ("level", "levelname", "log.level", "LogLevel", "@l")),
            *({"key": k, "value": {"stringValue": "not the body"}} for k in ("MESSAGE", "@m", "message")),
            *({"key": k, "value": {"stringValue": "2001-01-01T00:00:00Z"}} for k in ("@t", "Timestamp", "time")),
        ],
        "traceId": "5b8efff798038103d269b633813fc60c",
        "spanId": "eee19b7ec3c1b174",
    }
    record.update(extra)
    return record


def test_an_otlp_json_batch_is_read_as_its_log_records():
    """The Collector's Kafka exporter sends one batch per message, the service in the resource:
    read as one record it had no message and was dead-lettered whole."""
    t = 1_714_557_600_000_000_000
    batch = _otlp_batch(
        [
            ("checkout", [_otlp_record(t, 9, "order 17 placed"), _otlp_record(t + 5_000_000, 17, "payment declined")]),
            ("cart", [_otlp_record(t + 9_000_000, 13, "cart expired")]),
        ]
    )
    res = _parse(LogParser("plain", "service.name"), [b"plain line", batch], [b"k", b"k"])
    assert res.index.tolist() == [0, 1, 1, 1] and res.entry.tolist() == [0, 0, 1, 2] and not res.dead
    assert res.stream[1:] == ["checkout", "checkout", "cart"]
    assert res.message[1:] == ["order 17 placed", "payment declined", "cart expired"]
    assert res.ts_ms.tolist()[1:] == [1_714_557_600_000, 1_714_557_600_005, 1_714_557_600_009]
    # severityNumber decides, not an attribute that happens to be called `level`
    assert [LEVEL_NAMES[v] for v in res.level.tolist()[1:]] == ["INFO", "ERROR", "WARN"]
    assert res.fields[2]["http.status"] == "500" and res.fields[2]["host.name"] == "node-1"
    assert res.fields[2]["otel.scope.name"] == "app.requests"


def test_an_otlp_batch_with_bad_log_records_scores_the_rest_and_dead_letters_the_record():
    t = 1_714_557_600_000_000_000
    bad_body = _otlp_record(t, 9, "x", body={"arrayValue": {"values": []}}, attributes=[])  # (nothing to stand in)
    blank = _otlp_record(t, 9, "   ")
    batch = _otlp_batch([("checkout", [_otlp_record(t, 9, "a"), bad_body, _otlp_record(t, 9, "b"), blank])])
    res = _parse(LogParser("plain", "service.name"), [batch])
    assert res.message == ["a", "b"] and res.entry.tolist() == [0, 2] and res.index.tolist() == [0, 0]
    assert len(res.dead) == 1
    pos, reason, detail = res.dead[0]
    assert pos == 0 and reason == "missing_message"
    assert "2 of 4 log records not scored" in detail and "log record 1: missing_message" in detail
    assert "log record 3: empty_message" in detail
    # None of them readable: the record is dead-lettered only; an empty batch too.
    none = _otlp_batch([("checkout", [bad_body, bad_body])])
    empty = _otlp_batch([("checkout", [])])
    res = _parse(LogParser("plain", "service.name"), [none, empty, b'{"resourceLogs": [1, {"scopeLogs": "x"}]}'])
    assert len(res) == 0 and [d[1] for d in res.dead] == ["missing_message", "empty_message", "empty_message"]
    assert "all 2 log records" in res.dead[0][2]
    # No service.name and no key: missing_stream, for each record
    res = _parse(LogParser("plain", "service"), [_otlp_batch([("checkout", [_otlp_record(t, 9, "a")])])])
    assert len(res) == 0 and res.dead[0][1] == "missing_stream"


def _otlp_proto_batch(resources: list[tuple[str, list[dict]]]) -> bytes:
    """The same batch as `_otlp_batch`, as the exporter writes it by default (`encoding:
    otlp_proto`): built with OpenTelemetry's own protobuf classes, the ids as the bytes their
    hex spells (protobuf's JSON reader would take them for base64)."""
    from google.protobuf.json_format import ParseDict
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

    batch = orjson.loads(_otlp_batch(resources))
    ids = []
    for resource_logs in batch["resourceLogs"]:
        for record in resource_logs["scopeLogs"][0]["logRecords"]:
            ids.append({k: bytes.fromhex(record.pop(k)) for k in ("traceId", "spanId") if k in record})
    request = ParseDict(batch, ExportLogsServiceRequest())
    records = [r for rl in request.resource_logs for r in rl.scope_logs[0].log_records]
    for record, own in zip(records, ids, strict=True):
        for name, value in own.items():
            setattr(record, {"traceId": "trace_id", "spanId": "span_id"}[name], value)
    return request.SerializeToString()


def _double(key: str, value: float | str) -> dict:
    """A double attribute as the Collector's otlp_json writes it (Go: 3, not 3.0; 2^60 as
    1152921504606847000, its shortest digits; NaN as a string)."""
    return {"key": key, "value": {"doubleValue": value}}


def test_an_otlp_protobuf_batch_reads_as_its_json_twin():
    """`otlp_proto` is the Collector's Kafka exporter's default encoding: each of its messages was
    read as one line of binary noise and scored."""
    t = 1_714_557_600_000_000_000
    doubles = [_double("n", 2.5), _double("s", 3), _double("b", 10**16), _double("x", "NaN"), _double("p", 1152921504606847000)]
    resources = [
        ("checkout", [_otlp_record(t, 9, "order 17 placed"), _otlp_record(t + 5_000_000, 17, "payment declined")]),
        ("cart", [_otlp_record(t + 9_000_000, 13, "cart expired", attributes=doubles)]),
    ]
    proto = _otlp_proto_batch(resources)
    assert proto[:1] == b"\n" and b"{" not in proto[:2]
    parser = LogParser("plain", "service.name")
    res, twin = _parse(parser, [proto], [b"k"]), _parse(parser, [_otlp_batch(resources)], [b"k"])
    assert not res.dead and len(res) == 3 and res.entry.tolist() == [0, 1, 2]
    assert res.message == ["order 17 placed", "payment declined", "cart expired"]
    for name in ("stream", "message", "fields"):
        assert getattr(res, name) == getattr(twin, name), name
    for name in ("ts_ms", "level", "entry", "index"):
        assert getattr(res, name).tolist() == getattr(twin, name).tolist(), name
    assert res.fields[0]["traceId"] == "5b8efff798038103d269b633813fc60c"
    # doubles as the Collector's JSON writes them (Go: 3, not 3.0; 10000000000000000, not 1e+16)
    assert [res.fields[2][k] for k in "nsbxp"] == ["2.5", "3", "10000000000000000", "NaN", "1152921504606847000"]
    assert [LEVEL_NAMES[v] for v in res.level.tolist()] == ["INFO", "ERROR", "WARN"]


def test_bytes_that_start_like_an_otlp_protobuf_batch_but_are_none():
    """A batch cut short is dead-lettered as invalid_otlp, not scored as a line of noise; text that
    starts with a newline is a line, stray bytes and all (a review: a Latin-1 line that started
    with a newline was dead-lettered by the first version)."""
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue

    t = 1_714_557_600_000_000_000
    proto = _otlp_proto_batch([("checkout", [_otlp_record(t, 9, "order 17 placed"), _otlp_record(t, 9, "order 18 placed")])])
    request = ExportLogsServiceRequest()
    request.resource_logs.add().resource.attributes.add(key="host.id", value=AnyValue(bytes_value=b"\xff\xfe"))
    no_records = request.SerializeToString()
    text = [
        b"\nERROR disk full",
        b"\n\x02ab",
        b"\nERROR caf\xe9 au lait failed",
        b"\n\n\xff\xfegarbage",
        # (newline, a character, newline: these start as a batch does; a second review)
        b"\n\n\nERROR disk full on /var",
        b"\n-\nWARN retrying",
        b'\n{\n  "message": "disk full", "service": "api"\n}',
    ]
    res = _parse(LogParser("plain", "service"), [proto[:-7], no_records, *text], [b"k"] * 9)
    assert [d[:2] for d in res.dead] == [(0, "invalid_otlp"), (1, "empty_message")]
    assert "does not parse" in res.dead[0][2]
    assert res.index.tolist() == list(range(2, 9)) and res.message[0].strip() == "ERROR disk full" and LEVEL_NAMES[res.level[0]] == "ERROR"
    assert res.message[-1] == "disk full" and res.stream[-1] == "api"


def test_otlp_traces_or_metrics_on_a_logs_topic_are_named_not_scored():
    """The three OTLP requests share their first fields: a metrics batch decoded as a logs batch,
    a gauge read as a line of binary noise under its service's stream (a second review)."""
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue

    traces = ExportTraceServiceRequest()
    spans = traces.resource_spans.add()
    spans.resource.attributes.add(key="service.name", value=AnyValue(string_value="checkout"))
    spans.scope_spans.add().spans.add(name="GET /api/users", trace_id=bytes(range(16)), span_id=bytes(range(8)), start_time_unix_nano=1)
    metrics = ExportMetricsServiceRequest()
    resource_metrics = metrics.resource_metrics.add()
    resource_metrics.resource.attributes.add(key="service.name", value=AnyValue(string_value="checkout"))
    gauge = resource_metrics.scope_metrics.add().metrics.add(name="memory.usage", unit="By").gauge
    gauge.data_points.add(time_unix_nano=1_714_557_600_000_000_000, as_double=2.5e9)
    # A metric without a name (a broken producer) fits a log record: its gauge became the body
    # of a line of binary noise (a third review).
    nameless = ExportMetricsServiceRequest()
    nameless.CopyFrom(metrics)
    nameless.resource_metrics[0].scope_metrics[0].metrics[0].ClearField("name")
    nameless.resource_metrics[0].scope_metrics[0].metrics[0].ClearField("unit")
    # ...while a logs batch whose records carry attributes only (no body, no times) is read.
    logs = ExportLogsServiceRequest()
    resource_logs = logs.resource_logs.add()
    resource_logs.resource.attributes.add(key="service.name", value=AnyValue(string_value="checkout"))
    resource_logs.scope_logs.add().log_records.add().attributes.add(key="message", value=AnyValue(string_value="disk full"))
    # ...and one without times or a severity number, whose Latin-1 body parses as a gauge (a review)
    latin1 = ExportLogsServiceRequest()
    latin1.resource_logs.add().scope_logs.add().log_records.add(severity_text="INFO").body.string_value = "plain seXor"
    raws = [r.SerializeToString() for r in (traces, metrics, nameless, logs)] + [latin1.SerializeToString().replace(b"X", b"\xf1")]
    res = _parse(LogParser("plain", "service.name"), [*raws, b"\n\x00"], [b"k"] * 6)
    assert [d[1] for d in res.dead] == ["invalid_otlp", "invalid_otlp", "invalid_otlp", "empty_message"]
    assert "an OTLP traces batch" in res.dead[0][2] and "an OTLP metrics batch" in res.dead[1][2] and "metrics" in res.dead[2][2]
    assert res.message == ["disk full", "plain se\ufffdor"] and res.stream == ["checkout", "k"]


def test_a_json_log_record_with_bytes_that_are_not_utf8_is_read():
    """A Latin-1 name in a JSON record (the Collector's otlp_json passes such bytes through) was
    invalid_json: the record was lost where a text line keeps its stray bytes as U+FFFD."""
    latin1 = b'{"message": "user J\xf6rg logged in", "service": "auth"}'
    res = _parse(LogParser("plain", "service"), [latin1, b'{"message": '], [b"k", b"k"])
    assert res.message == ["user J\ufffdrg logged in"] and res.stream == ["auth"]
    assert [d[:2] for d in res.dead] == [(1, "invalid_json")]
    # Not JSON either: the detail is the parse error, not orjson's first "not valid UTF-8".
    res = _parse(LogParser("plain", "service"), [latin1[:-1]], [b"k"])
    assert res.dead[0][1] == "invalid_json" and "UTF-8" not in res.dead[0][2], res.dead


def test_an_otlp_protobuf_batch_with_strings_that_are_not_utf8_is_read():
    """The Collector (Go) relays strings that are not UTF-8, which Python's protobuf refuses: one
    such attribute dead-lettered the whole batch (a review). They are read with U+FFFD."""
    t = 1_714_557_600_000_000_000
    good = _otlp_proto_batch([("checkout", [_otlp_record(t, 9, "user Jxrg logged in"), _otlp_record(t, 9, "order 18 placed")])])
    bad = good.replace(b"user Jxrg", b"user J\xf6rg")
    assert len(bad) == len(good)
    res = _parse(LogParser("plain", "service.name"), [bad], [b"k"])
    assert not res.dead and res.message == ["user J\ufffdrg logged in", "order 18 placed"]


def test_an_otlp_batch_that_would_copy_too_many_attributes_is_oversized():
    """Each log record gets its resource's attributes: 19 KB of protobuf (1,001 one-letter records
    under 1,000 attributes) would become a million fields (a review: 64 KiB took 1.8 GB)."""
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue

    from streamer.otlp import MAX_ATTRIBUTE_COPIES

    def batch(records: int) -> bytes:
        request = ExportLogsServiceRequest()
        resource_logs = request.resource_logs.add()
        for k in range(1000):
            resource_logs.resource.attributes.add(key=f"a{k}", value=AnyValue(string_value=""))
        scope = resource_logs.scope_logs.add()
        for _ in range(records):
            scope.log_records.add(body=AnyValue(string_value="x"))
        return request.SerializeToString()

    assert MAX_ATTRIBUTE_COPIES == 1_000_000
    res = _parse(LogParser("plain", "service.name"), [batch(1001), batch(999)], [b"k", b"k"])
    assert [d[:2] for d in res.dead] == [(0, "oversized")] and len(res) == 999
    assert "1,001,000 attributes" in res.dead[0][2]


def test_an_otlp_batch_of_too_many_log_records_is_oversized():
    """An empty log record is 2 bytes of protobuf (3 of JSON) and hundreds once read: a 1 MB
    batch of them took 631 MB before it was dead-lettered (a review). Capped at 100,000."""
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue

    from streamer.otlp import MAX_LOG_RECORDS

    def proto(records: int) -> bytes:
        request = ExportLogsServiceRequest()
        scope = request.resource_logs.add().scope_logs.add()
        for _ in range(records):
            scope.log_records.add(body=AnyValue(string_value="x"))
        return request.SerializeToString()

    def json(records: int) -> bytes:
        return b'{"resourceLogs":[{"scopeLogs":[{"logRecords":[' + b",".join([b'{"body":{"stringValue":"x"}}'] * records) + b"]}]}]}"

    parser = LogParser("plain", "service.name")
    parser.max_bytes = 1 << 23
    res = _parse(parser, [proto(MAX_LOG_RECORDS + 1), json(MAX_LOG_RECORDS + 1), proto(10), json(10)], [b"k"] * 4)
    assert [d[:2] for d in res.dead] == [(0, "oversized"), (1, "oversized")] and len(res) == 20
    assert "100,001 log records" in res.dead[0][2]


def test_an_otlp_json_batch_under_the_names_before_scope_logs_is_read():
    """Collectors before OTLP 0.19 (2022) wrote instrumentationLibraryLogs and
    instrumentationLibrary: every such batch was dead-lettered as having no log records."""
    old = {
        "resourceLogs": [
            {
                "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "api"}}]},
                "instrumentationLibraryLogs": [
                    {"instrumentationLibrary": {"name": "lib"}, "logRecords": [{"body": {"stringValue": "hello"}, "severityText": "WARN"}]}
                ],
            }
        ]
    }
    res = _parse(LogParser("plain", "service.name"), [orjson.dumps(old)])
    assert not res.dead and res.stream == ["api"] and res.message == ["hello"] and LEVEL_NAMES[res.level[0]] == "WARN"


@pytest.mark.parametrize("shape", ["x", "a-", "ab.", "1_"])
def test_a_long_logfmt_token_without_a_key_does_not_hang_the_parser(shape):
    """The logfmt key pattern was tried at every position of a long token without '=' and
    backtracked through the rest of it each time: one 60 KB line held the GIL for 20-35 s, and
    /healthz, /metrics and the group's heartbeats with it. A hang guard, not a speed claim: the
    line takes milliseconds now; the alarm is 1,000 times that."""
    import signal

    def hung(*_: object) -> None:
        raise TimeoutError("the logfmt parser is still on one 60 KB line after 10 s")

    line = ("level=error msg=boom " + shape * (60_000 // len(shape)) + " code=7").encode()
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(10)
    try:
        ev = _parse(LogParser("logfmt", "service", 65_536), [line], [b"k"]).event(0)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert ev.message == "boom" and ev.fields["code"] == "7" and LEVEL_NAMES[ev.level] == "ERROR"


def test_otlp_attributes_stand_in_for_what_a_log_record_lacks():
    """A Collector's filelog receiver with a JSON parser and no severity or time parser leaves
    the level, time and sometimes the message in attributes only: leaving out every attribute
    named like one (to keep them from overriding the record's own) made ERROR lines UNKNOWN
    and took the collector's observed time (a review of the first fix)."""
    t = 1_714_557_600_000_000_000
    bare = {
        "timeUnixNano": "0",
        "observedTimeUnixNano": str(t),
        "attributes": [
            {"key": "levelname", "value": {"stringValue": "ERROR"}},
            {"key": "@t", "value": {"stringValue": "2024-05-01T09:00:00.500Z"}},
            {"key": "message", "value": {"stringValue": "disk full on /var"}},
        ],
    }
    ev = _parse(LogParser("plain", "service.name"), [_otlp_batch([("db", [bare])])]).event(0)
    assert (ev.stream, ev.message, LEVEL_NAMES[ev.level]) == ("db", "disk full on /var", "ERROR")
    assert ev.ts_ms == _ms(2024, 5, 1, 9, 0, 0, 500_000)
    # What the record has but says nothing with (a null or map body, severity 0 or an enum name,
    # an empty severityText) is not its own either (the next review of this change).
    for unset in (
        {"body": None},
        {"body": {}},
        {"body": {"kvlistValue": {"values": []}}},
        {"severityNumber": "SEVERITY_NUMBER_ERROR"},
        {"severityNumber": 0, "severityText": ""},
    ):
        ev = _parse(LogParser("plain", "service.name"), [_otlp_batch([("db", [{**bare, **unset}])])]).event(0)
        assert (ev.message, LEVEL_NAMES[ev.level]) == ("disk full on /var", "ERROR"), unset


def test_a_null_field_gives_way_to_the_next_name():
    parser = LogParser("plain", "service")
    raw = b'{"message": null, "msg": "disk full", "level": null, "lvl": "error", "service": "s", "ts": null, "time": 5000}'
    res = _parse(parser, [raw])
    assert not res.dead and res.message == ["disk full"] and LEVEL_NAMES[res.level[0]] == "ERROR" and res.ts_ms.tolist() == [5_000_000]
