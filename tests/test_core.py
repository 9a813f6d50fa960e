"""The pure core on CPU: wavefronts, the step invariant, checkpoints, calibration bounds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.calibration import TAIL_THRESHOLD, CalibrationConfig
from models.detector import HELD, MAX_ABS_VALUE, Detector, wavefronts
from models.gru import DEFAULT_WEIGHTS, ModelConfig, StreamGRU, load_checkpoint, save_checkpoint


def test_wavefronts_keep_order_and_hold_each_slot_once():
    rng = np.random.default_rng(0)
    slots = rng.integers(0, 50, 2000)
    waves = wavefronts(slots)
    seen = np.concatenate(waves)
    assert sorted(seen.tolist()) == list(range(len(slots)))
    rank_of = {}
    for k, wave in enumerate(waves):
        assert len(set(slots[wave].tolist())) == len(wave), "a slot twice in one wavefront"
        for i in wave:
            rank_of[int(i)] = k
    for s in range(50):
        idx = np.flatnonzero(slots == s)
        assert [rank_of[int(i)] for i in idx] == list(range(len(idx))), "a stream's events out of order"
    assert len(waves) == np.bincount(slots).max()


def _random_batch(rng, n, streams, f=8, used=3):
    slots = rng.integers(0, streams, n)
    x = rng.normal(0, 5, (n, f)) + slots[:, None]
    mask = np.zeros((n, f), dtype=bool)
    mask[:, :used] = True
    return slots, x, mask


def test_batched_equals_one_event_at_a_time():
    # Streams use different features (one; three; two apart; four of which three come and go),
    # so a wavefront mixes streams the correlation and per-feature views apply to with streams
    # they do not, and is wider than some of its events: a stream's results must not depend on
    # which others share its batch. (The per-feature view once counted the histories of features
    # an event lacked only where another stream widened the batch.)
    model, _ = load_checkpoint(DEFAULT_WEIGHTS)
    rng = np.random.default_rng(1)
    slots, x, mask = _random_batch(rng, 2400, 24)
    uses = np.array(
        [
            [True] + [False] * 7,
            [True] * 3 + [False] * 5,
            [False, True, False, False, False, True, False, False],
            [True] * 4 + [False] * 4,
        ]
    )
    mask = uses[slots % 4]
    mask[:, 1:4] &= (slots % 4 != 3)[:, None] | (rng.random((len(slots), 3)) < 0.5)
    batched = Detector(model, CalibrationConfig(warmup=5, threshold=TAIL_THRESHOLD))
    single = Detector(model, CalibrationConfig(warmup=5, threshold=TAIL_THRESHOLD))
    got = batched.process(slots, x, mask)
    assert got.wavefronts < len(slots) / 10
    for i in range(len(slots)):
        one = single.process(slots[i : i + 1], x[i : i + 1], mask[i : i + 1])
        assert one.surprise[0] == pytest.approx(got.surprise[i], abs=1e-4)
        assert one.score[0] == pytest.approx(got.score[i], abs=1e-6)
        assert one.is_anomaly[0] == got.is_anomaly[i]
        assert one.view[0] == got.view[i]
    for name, t in batched.bank.tensors.items():
        torch.testing.assert_close(t, single.bank.tensors[name], atol=1e-5, rtol=1e-5, msg=name)


def test_scores_bounded_and_nothing_flagged_during_warmup():
    model, _ = load_checkpoint(DEFAULT_WEIGHTS)
    det = Detector(model, CalibrationConfig(warmup=50, threshold=0.2))
    rng = np.random.default_rng(2)
    x = rng.standard_cauchy((400, 8))  # wild values: scores must still be in [0, 1]
    mask = np.ones((400, 8), dtype=bool)
    res = det.process(np.zeros(400, dtype=np.int64), x, mask)
    assert np.all((res.score >= 0) & (res.score <= 1))
    assert np.isfinite(res.surprise).all()
    assert not res.is_anomaly[:50].any()
    assert res.is_anomaly[50:].any()  # threshold 0.2 (p <= 0.06) flags plenty once warm


def test_readings_at_the_range_limit_keep_the_state_finite():
    """The daemon dead-letters readings beyond MAX_ABS_VALUE; everything up to it must keep
    scores, explanations and state finite, including a flat stream that jumps by the limit
    (its squared deviation, ~1e48 against the noise floor, overflowed the float32 explanation)."""
    model, _ = load_checkpoint(DEFAULT_WEIGHTS)
    det = Detector(model, CalibrationConfig(warmup=10))
    n = 300
    x = np.zeros((n, 8))
    x[200, 0] = MAX_ABS_VALUE
    x[::2, 1] = -MAX_ABS_VALUE
    x[1::2, 1] = MAX_ABS_VALUE
    x[:, 2] = MAX_ABS_VALUE * np.random.default_rng(0).uniform(-1, 1, n)
    mask = np.zeros_like(x, dtype=bool)
    mask[:, :3] = True
    res = det.process(np.zeros(n, dtype=np.int64), x, mask)
    assert np.isfinite(res.score).all() and np.isfinite(res.contributions).all() and np.isfinite(res.surprise).all()
    assert res.is_anomaly[200] and res.top_feature(mask)[200] == 0
    for name, t in det.bank.tensors.items():
        if t.is_floating_point():
            assert torch.isfinite(t).all(), name
    with pytest.raises(ValueError, match="magnitude"):
        det.process(np.zeros(1, dtype=np.int64), np.full((1, 8), 1e300), mask[:1])


@pytest.mark.parametrize("jumps", [(1e14, 0.0, 1e18), (1e18, 0.0, 1e14)])
def test_the_explanation_names_the_larger_of_two_huge_jumps(jumps):
    """Two near-flat sensors jump at once, by 1e14 and 1e18: both contributions are beyond what
    float32 holds (~1e40 and ~1e48), and clamped there they tied, so the first feature was named
    whichever jumped more."""
    model, _ = load_checkpoint(DEFAULT_WEIGHTS)
    det = Detector(model, CalibrationConfig(warmup=50))
    n = 500
    x = np.zeros((n, 8))
    x[:, :3] = np.random.default_rng(1).normal(0.0, 1e-7, (n, 3))
    x[-1, :3] += jumps
    mask = np.zeros_like(x, dtype=bool)
    mask[:, :3] = True
    res = det.process(np.zeros(n, dtype=np.int64), x, mask)
    assert res.is_anomaly[-1] and np.isfinite(res.contributions[-1]).all()
    assert res.top_feature(mask)[-1] == int(np.argmax(jumps)), res.contributions[-1, :3]


def test_absent_features_do_not_move_their_state():
    model, _ = load_checkpoint(DEFAULT_WEIGHTS)
    det = Detector(model)
    x = np.ones((1, 8))
    mask = np.zeros((1, 8), dtype=bool)
    mask[0, 0] = True
    det.process(np.array([0]), x, mask)
    assert det.bank.tensors["h"][0, 1:].abs().sum() == 0
    assert det.bank.tensors["h"][0, 0].abs().sum() > 0


def test_bank_grows_and_keeps_rows():
    model = StreamGRU(ModelConfig())
    det = Detector(model, capacity=2)
    x = np.ones((3, 8))
    mask = np.ones((3, 8), dtype=bool)
    det.process(np.array([0, 1, 0]), x, mask)
    before = det.bank.tensors["h"][:2].clone()
    det.process(np.array([5000]), x[:1], mask[:1])
    assert det.bank.capacity >= 5001
    torch.testing.assert_close(det.bank.tensors["h"][:2], before)


def test_checkpoint_roundtrip_with_weights_only(tmp_path):
    model = StreamGRU(ModelConfig(hidden=8))
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, {"name": "t", "data": "none"})
    loaded, meta = load_checkpoint(path)
    assert meta["config"]["hidden"] == 8
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_checkpoint_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "streamer-gru", "payload": _Evil()}, path)
    with pytest.raises(ValueError, match="not a streamer-gru checkpoint"):  # (refused by the safe loader: nothing ran)
        load_checkpoint(path)


def test_bundled_weights_describe_their_training():
    _, meta = load_checkpoint(DEFAULT_WEIGHTS)
    assert "synthetic" in meta["training"]["data"]
    assert meta["training"]["final_loss"] < meta["training"]["first_loss"]


def test_a_save_syncs_the_file_then_the_folder_that_names_it(tmp_path, monkeypatch):
    """The file's fsync covers its bytes, not the renamed entry: after a power cut the old
    snapshot could come back, though save_payload says durably."""
    import os
    import stat

    from models.gru import save_atomically

    synced, real = [], os.fsync

    def spy(fd: int) -> None:
        synced.append("folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    save_atomically({"a": 1}, tmp_path / "x.pt")
    assert synced == ["file", "folder"]


def _timed_stream(n: int = 600, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A two-feature stream with a spike at event 400 (where it has one), one reading a minute."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 8))
    mask = np.zeros((n, 8), dtype=bool)
    x[:, :2] = np.cumsum(rng.normal(0, 1, (n, 2)), axis=0) * 0.2 + [20.0, 5.0] + rng.normal(0, 1, (n, 2))
    x[400:401, 0] += 40.0
    mask[:, :2] = True
    return x, mask, 1_700_000_000_000 + np.arange(n, dtype=np.int64) * 60_000


def test_a_redelivered_event_is_held_as_a_duplicate_and_changes_nothing():
    """An event delivered twice in a row (a producer retrying: the same record, its timestamp, the
    stamp, included) is scored once: the copy is held as a duplicate at 0 and the stream's state
    and every later score are what they are without it, the spike's copy included (it is not
    alerted twice)."""
    model, _ = load_checkpoint(DEFAULT_WEIGHTS)
    x, mask, ts = _timed_stream()
    rng = np.random.default_rng(1)
    twice = np.sort(np.r_[rng.choice(600, 60, replace=False), 400])
    idx = np.sort(np.r_[np.arange(600), twice])
    once = Detector(model, CalibrationConfig(warmup=50))
    plain = once.process(np.zeros(600, dtype=np.int64), x, mask, ts, ts + 7)
    dup = Detector(model, CalibrationConfig(warmup=50))
    got = dup.process(np.zeros(len(idx), dtype=np.int64), x[idx], mask[idx], ts[idx], ts[idx] + 7)
    copy = np.r_[False, idx[1:] == idx[:-1]]
    assert copy.sum() == len(np.unique(twice))
    assert plain.is_anomaly[400] and got.is_anomaly[~copy].tolist() == plain.is_anomaly.tolist()
    np.testing.assert_array_equal(got.score[~copy], plain.score)
    np.testing.assert_array_equal(got.view[~copy], plain.view)
    assert all(HELD[h] == "duplicate" for h in got.held[copy])
    assert (got.score[copy] == 0).all() and not got.is_anomaly[copy].any() and not got.valid[copy].any()
    for name, t in dup.bank.tensors.items():
        assert torch.equal(t, once.bank.tensors[name]), name


def test_what_is_not_a_duplicate_is_stepped():
    """Only the previous event repeated exactly, its delivery stamp included, is a duplicate: not
    a reading repeated at a new time (a stuck sensor), not features sent as separate events at
    the same millisecond (the second carries other features, even where its reading equals that
    feature's last one), not a steady reading at the same (whole-second) time sent again later
    (another stamp), not an event without a stamp (-1: no time of its own), and nothing without
    stamps (`streamer nab`) or when detector.skip_duplicates is off."""
    model, _ = load_checkpoint(DEFAULT_WEIGHTS)
    x, mask, ts = _timed_stream(200)
    det = Detector(model, CalibrationConfig(warmup=50))
    det.process(np.zeros(200, dtype=np.int64), x, mask, ts, ts)
    one, other = np.zeros((1, 8), dtype=bool), np.zeros((1, 8), dtype=bool)
    one[0, 0], other[0, 1] = True, True
    t = ts[-1:] + 60_000
    none = np.array([-1])
    events = [(mask[-1:], t, t), (one, t + 60_000, t), (other, t + 60_000, t), (other, t + 60_000, t + 250)]
    events += [(other, t + 60_000, none), (other, t + 60_000, none)]
    held = []
    for ms, when, stamp in events:
        held.append(HELD[det.process(np.zeros(1, dtype=np.int64), x[-1:], ms, when, stamp).held[0]])
    assert held == ["", "", "", "", "", ""] and int(det.bank.tensors["steps"][0]) == 206
    res = det.process(np.zeros(2, dtype=np.int64), x[[-1, -1]], np.r_[one, one], np.r_[t, t] + 120_000, np.r_[t, t] + 9)
    assert [HELD[h] for h in res.held] == ["", "duplicate"] and int(det.bank.tensors["steps"][0]) == 207
    for cal, stamps in ((CalibrationConfig(warmup=50), None), (CalibrationConfig(warmup=50, skip_duplicates=False), ts[[0, 1, 1]])):
        kept = Detector(model, cal)
        res = kept.process(np.zeros(3, dtype=np.int64), x[[0, 1, 1]], mask[:3], ts[[0, 1, 1]], stamps)
        assert "duplicate" not in [HELD[h] for h in res.held] and int(kept.bank.tensors["steps"][0]) == 3
