"""Mutated events through both parsers: nothing raises, and what is accepted is safe to step
and to write back out (finite values within range, text every output can encode)."""

from __future__ import annotations

import random

import numpy as np

from models.detector import MAX_ABS_VALUE
from streamer.decode import Decoder, parse_ts
from streamer.logparse import LogParser

SEEDS = [
    b'{"stream":"s-1","ts":1700000000000,"values":{"a":1.5,"b":-2}}',
    b'{"stream":"s","ts":"2024-01-01T00:00:00Z","value":3}',
    b'{"message":"m","service":"x","ts":"1700000000","level":"warn"}',
    b"Jun 14 15:16:01 combo sshd[1]: fine",
    b"- 1117838570 2005.06.03 R02-M1-N0-C:J12-U11 2005-06-03-15.42.50.675872 R02-M1-N0-C:J12-U11 RAS KERNEL INFO cache error",
    b'ts=1700000000 level=info service=api msg="hello"',
]
# Pieces that broke parsers before or are classic trouble: huge or tiny numbers, non-finite
# literals, lone surrogates, NULs, stray bytes, impossible dates.
ATOMS = [
    b"1e999", b"-0", b"1" + b"0" * 400, b'"\\ud800"', b"null", b"true", b"[]", b"{}", b'"x"', b"NaN",
    b"9" * 25, b"-" + b"9" * 25, b"1.7976931348623157e308", b'"2024-13-45"', b'"\\u0000"', b"\xff",
    b"1e-400", b"99999999999", b"2024-02-30", b"Feb 30", b"1e300",
]  # fmt: skip


def _mutate(rng: random.Random, raw: bytes) -> bytes:
    r = bytearray(raw)
    for _ in range(rng.randint(1, 3)):
        pos = rng.randrange(len(r) + 1)
        op = rng.random()
        if op < 0.3:
            r[pos:pos] = rng.choice(ATOMS)
        elif op < 0.5:
            del r[pos : pos + rng.randint(1, 5)]
        elif op < 0.7:
            r[pos:pos] = bytes([rng.randrange(256)])
        else:  # replace the value after a separator
            k = r.find(rng.choice([b":", b"=", b" "]), pos)
            if k >= 0:
                end = k + 1
                while end < len(r) and r[end : end + 1] not in b",} ":
                    end += 1
                r[k + 1 : end] = rng.choice(ATOMS)
    return bytes(r)


def test_mutated_events_are_rejected_or_safe():
    rng = random.Random(0)
    decoder = Decoder(8, 1 << 16, 256)
    parsers = [LogParser(fmt) for fmt in ("plain", "syslog", "bgl", "logfmt")]
    raws = [_mutate(rng, rng.choice(SEEDS)) for _ in range(3000)]
    keys = [rng.choice([None, b"k", b"\xff"]) for _ in raws]
    ts = np.zeros(len(raws), dtype=np.int64)
    dec = decoder.decode(raws, keys, ts)
    assert len(dec.index) + len(dec.dead) == len(raws)
    assert len(dec.index) > 100 and len(dec.dead) > 100  # the mutations reach both sides
    values = dec.x[dec.mask]
    assert np.isfinite(values).all() and (np.abs(values) <= MAX_ABS_VALUE).all()
    for stream in dec.stream:
        stream.encode()
    for parser in parsers:
        logs = parser.parse(raws, keys, ts)
        assert len(logs.index) + len(logs.dead) == len(raws)
        for text in [*logs.stream, *logs.message, *(s for f in logs.fields for kv in f.items() for s in kv)]:
            text.encode()


def test_iso_timestamps_are_read_to_the_exact_millisecond():
    """int(dt.timestamp() * 1000) goes through a float: 1.3% of millisecond timestamps in
    2004-2019 and 3.9% in 2030-2039 came out 1 ms early (in every score record's ts)."""
    from datetime import datetime, timezone

    rng = random.Random(5)
    for _ in range(20_000):
        ms = rng.randrange(-2_000_000_000_000, 4_000_000_000_000)
        text = datetime.fromtimestamp(ms // 1000, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S") + f".{ms % 1000:03d}Z"
        assert parse_ts(text, 0) == ms, text
    assert parse_ts("2004-02-08T10:04:34.126Z", 0) == 1_076_234_674_126


def test_edge_cases_of_json_events_get_the_reason_the_readme_gives():
    """An integer of over 4,300 digits was `invalid_json` (Python's conversion limit), not
    `out_of_range`; RFC 3339's lowercase z, and a trailing newline, made a valid time
    `invalid_timestamp`; an empty stream id with a key there was dead-lettered as having "no
    message key"."""
    decoder = Decoder(8, 1 << 16, 256)
    raws = [
        b'{"stream":"s","values":{"a":1' + b"1" * 5000 + b"}}",
        b'{"stream":"s","values":{"a":-1' + b"1" * 5000 + b"}}",
        b'{"stream":"s","ts":"2024-01-01T00:00:00.5z","values":{"a":1}}',
        b'{"stream":"s","ts":"2024-01-01t00:00:00Z\\n","values":{"a":1}}',
        b'{"stream":"","values":{"a":1}}',
        b'{"values":{"a":1}}',
    ]
    keys = [None, None, None, None, b"k", b""]
    dec = decoder.decode(raws, keys, np.zeros(len(raws), dtype=np.int64))
    assert dec.index.tolist() == [2, 3] and dec.ts_ms.tolist() == [1_704_067_200_500, 1_704_067_200_000]
    reasons = {pos: (reason, detail) for pos, reason, detail in dec.dead}
    assert reasons[0][0] == reasons[1][0] == "out_of_range"
    assert reasons[4] == ("missing_stream", "the 'stream' field naming the stream is empty")
    assert reasons[5] == ("missing_stream", "the message key naming the stream is empty")
