"""The core benchmark feeds the detector what the daemon does (bench/core.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.core import CORE_EVENTS, BatchMaker, CoreCase, bench_case
from models.detector import HELD, Detector
from models.gru import DEFAULT_WEIGHTS, load_checkpoint


def test_the_core_events_carry_times_and_stamps_like_the_daemons():
    """Each stream's events a second apart on its own clock, stamped a little later, so that
    the time-of-day profile, the gap check and the duplicate check run; none is a copy."""
    maker = BatchMaker(3, 8)
    slots, x, mask, ts, stamps = maker.make(6)
    assert slots.tolist() == [0, 1, 2, 0, 1, 2]
    assert (ts[3:] - ts[:3] == 1000).all() and (stamps > ts).all()
    _, _, _, ts2, _ = maker.make(3)  # (the next poll goes on where this one stopped)
    assert (ts2 - ts[3:] == 1000).all()
    model, _ = load_checkpoint(DEFAULT_WEIGHTS)
    res = Detector(model).process(slots, x, mask, ts, stamps)
    assert not (res.held == HELD.index("duplicate")).any()
    assert len(BatchMaker(3, 8, carry="untimed").make(6)) == 3
    assert len(BatchMaker(3, 8, carry="no-stamps").make(6)) == 4


@pytest.mark.parametrize("carry", CORE_EVENTS)
def test_a_core_case_runs_with_each_kind_of_event(carry):
    model, _ = load_checkpoint(DEFAULT_WEIGHTS)
    r = bench_case(model, CoreCase(2, 20), torch.device("cpu"), 1, 0.0, 10.0, 1, carry)
    assert r.events_carry == carry and r.events == r.batches * r.batch and np.isfinite(r.events_per_s)
