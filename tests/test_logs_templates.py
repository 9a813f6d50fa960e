"""Template mining: ids survive save/restore, the template bound recycles rows LRU, state is data."""

from __future__ import annotations

import jsonpickle
import orjson
import pytest

from models.logs.templates import NO_TEMPLATE, MinerConfig, TemplateBook, numeric_params

LINES = [
    "user alice logged in from 10.0.0.1",
    "user bob logged in from 10.0.0.7",
    "disk /dev/sda1 at 91% capacity",
    "request 4411 took 35 ms",
    "request 4412 took 120 ms",
    "user carol logged in from 10.0.3.9",
    "cache miss for key 0xdeadbeef",
    "disk /dev/sdb2 at 40% capacity",
    "request 4413 took 8 ms",
]


def test_masks_and_numbers():
    book = TemplateBook()
    mined = book.add(["request 4411 took 35 ms", "request 4412 took 120 ms", "peer 10.1.2.3:8080 sent 0x1f"])
    assert mined.template_id[0] == mined.template_id[1]
    assert mined.is_new.tolist() == [True, False, True]
    assert book.template(int(mined.template_id[0])) == "request <NUM> took <NUM> ms"
    assert mined.text[2] == "peer <IP> sent <HEX>"
    assert mined.params[1, :2].tolist() == [4412.0, 120.0] and mined.params_mask[1].tolist() == [True, True, False, False]
    assert numeric_params("a1 b2 7 -3.5 x", 4) == [7.0, -3.5]
    # A number of 309 digits or more is inf as a float: it turned every weight of the partition's
    # model into NaN at the next update, and every later score on the partition into null.
    assert numeric_params("bitmap " + "1" * 320 + " size 12", 4) == [12.0]


def test_restore_keeps_ids_and_new_templates_get_new_ids():
    book = TemplateBook()
    first = book.add(LINES[:5])
    restored = TemplateBook.from_bytes(book.to_bytes())
    assert restored.to_bytes() == book.to_bytes()
    a = book.add([*LINES[5:], "kernel panic: attempted to kill init"])
    b = restored.add([*LINES[5:], "kernel panic: attempted to kill init"])
    assert a.template_id.tolist() == b.template_id.tolist()
    assert a.row.tolist() == b.row.tolist()
    assert a.text == b.text
    # Lines of known templates keep their ids; the never-seen line gets a fresh, larger id.
    assert b.template_id[0] == first.template_id[0]
    assert b.is_new[-1] and b.template_id[-1] > max(first.template_id.max(), b.template_id[:-1].max())
    assert book.to_bytes() == restored.to_bytes()


def test_bound_recycles_the_least_recently_used_row():
    book = TemplateBook(MinerConfig(max_templates=3))
    m = book.add(["alpha one", "beta two three", "gamma x y z", "alpha one"])  # gamma's row is the third
    assert len(book) == 3
    rows = dict(zip(m.template_id.tolist(), m.row.tolist()))
    restored = TemplateBook.from_bytes(book.to_bytes())
    # "beta" is now least recently used: a fourth template evicts it and takes its row.
    for bk in (book, restored):
        n = bk.add(["delta q w e r"])
        assert len(bk) == 3
        beta = int(m.template_id[1])
        assert n.recycled == [(0, rows[beta], beta, "beta two three")]
        assert n.row[0] == rows[beta] and bk.template(beta) is None
        assert NO_TEMPLATE not in bk.tid_of_row.tolist()
        again = bk.add(["beta two three"])  # comes back as a new template with a new id
        assert again.is_new[0] and again.template_id[0] > n.template_id[0]
    assert book.to_bytes() == restored.to_bytes()


def test_state_is_plain_json_and_foreign_state_is_refused():
    book = TemplateBook()
    book.add(LINES)
    payload = orjson.loads(book.to_bytes())
    assert payload["format"] == "streamer-log-templates" and payload["config"]["max_templates"] == 1024
    with pytest.raises(ValueError):
        TemplateBook.from_bytes(jsonpickle.dumps(book.miner.drain, keys=True).encode())  # Drain3's own format
    with pytest.raises(ValueError):
        TemplateBook.from_bytes(b"\x80\x04not json")
