"""The log core on CPU: the step invariant (with online learning and row recycling), snapshots,
score bounds, and gradients through `advance`."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch

from models.logs.calibration import log_calibration
from models.logs.detector import advance, batch_events, empty_log_state
from models.logs.model import LogGRU, LogModelConfig, load_log_checkpoint, save_log_checkpoint
from models.logs.online import OnlineConfig
from models.logs.partition import LogPartition, LogScores
from models.logs.synth import generate
from models.logs.templates import MinerConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _events(n: int = 600, seed: int = 3) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    lines = [ln for ln in generate(seed, instances=6, duration_s=900.0, warmup_s=200.0)][:n]
    level = {"DEBUG": 2, "INFO": 3, "WARN": 4, "ERROR": 5}
    return (
        [ln.stream for ln in lines],
        np.array([ln.ts_ms for ln in lines], dtype=np.int64),
        np.array([level[ln.level] for ln in lines], dtype=np.int8),
        [ln.message for ln in lines],
    )


def _partition(vocab: int = 1024) -> LogPartition:
    cfg = LogModelConfig(vocab=vocab)
    return LogPartition(LogGRU(cfg), log_calibration(warmup=20), OnlineConfig(update_every=16, buffer=48), MinerConfig(max_templates=vocab))


def _run(part: LogPartition, data: tuple[list[str], np.ndarray, np.ndarray, list[str]], cuts: list[int]) -> list[LogScores]:
    stream, ts, level, msg = data
    bounds = [0, *cuts, len(stream)]
    return [part.process(stream[a:b], ts[a:b], level[a:b], msg[a:b]) for a, b in itertools.pairwise(bounds)]


def _cat(results: list[LogScores], name: str) -> np.ndarray:
    return np.concatenate([getattr(r, name) for r in results])


@pytest.mark.parametrize("vocab", [1024, 6])  # 6 rows: templates outnumber rows, rows get recycled
def test_batched_equals_one_event_at_a_time(vocab: int):
    data = _events(500)
    whole = _run(_partition(vocab), data, [])
    rng = np.random.default_rng(0)
    ragged = _run(_partition(vocab), data, sorted(rng.choice(np.arange(1, 500), 30, replace=False).tolist()))
    single = _run(_partition(vocab), data, list(range(1, 500)))
    # Streams share GRU calls between the update points (every 16 lines here).
    assert sum(r.wavefronts for r in whole) < 0.7 * sum(r.wavefronts for r in single)
    if vocab == 6:
        assert _cat(whole, "template_id").max() > 6  # more templates than rows were seen
    for other in (ragged, single):
        np.testing.assert_allclose(_cat(other, "surprise"), _cat(whole, "surprise"), atol=1e-3, rtol=1e-4)
        np.testing.assert_allclose(_cat(other, "score"), _cat(whole, "score"), atol=1e-5)
        np.testing.assert_array_equal(_cat(other, "is_anomaly"), _cat(whole, "is_anomaly"))
        np.testing.assert_array_equal(_cat(other, "template_id"), _cat(whole, "template_id"))
        np.testing.assert_array_equal(_cat(other, "expected_template_id"), _cat(whole, "expected_template_id"))
    assert sum(r.updates for r in whole) == 500 // 16 == sum(r.updates for r in single)


def test_snapshot_restore_continues_exactly():
    data = _events(600)
    stream, ts, level, msg = data
    reference = _partition()
    uninterrupted = _run(reference, data, [256])
    first = _partition()
    _run(first, (stream[:256], ts[:256], level[:256], msg[:256]), [])
    buf = io.BytesIO()
    torch.save(first.snapshot(), buf)
    buf.seek(0)
    restored = LogPartition.restore(torch.load(buf, weights_only=True))
    rest = restored.process(stream[256:], ts[256:], level[256:], msg[256:])
    np.testing.assert_allclose(rest.surprise, uninterrupted[1].surprise, atol=1e-6)
    np.testing.assert_allclose(rest.score, uninterrupted[1].score, atol=1e-9)
    np.testing.assert_array_equal(rest.template_id, uninterrupted[1].template_id)
    assert rest.template == uninterrupted[1].template
    assert len(restored) == len(reference)
    assert restored.book.to_bytes() == reference.book.to_bytes()


def test_scores_bounded_records_and_warmup():
    part = _partition()
    data = _events(600)
    res = _run(part, data, [300])
    score = _cat(res, "score")
    assert np.all((score >= 0) & (score <= 1)) and np.isfinite(_cat(res, "surprise")).all()
    rec = res[0].record(5)
    assert set(rec) >= {"stream", "ts", "surprise", "score", "is_anomaly", "template_id", "template", "expected_template", "contributions"}
    assert set(rec["contributions"]) == {"template", "level", "timing"}
    # Nothing is flagged before a stream's warm-up (20 lines here).
    stream = data[0]
    seen: dict[str, int] = {}
    rank = []
    for s in stream:
        rank.append(seen.get(s, 0))
        seen[s] = rank[-1] + 1
    assert not _cat(res, "is_anomaly")[np.array(rank) < 20].any()
    part.forget([stream[0]])
    assert stream[0] not in part.slot_of


def test_advance_has_gradients_and_checkpoints_load_weights_only(tmp_path):
    cfg = LogModelConfig(vocab=16)
    model = LogGRU(cfg)
    state = empty_log_state(cfg, 3)
    active = torch.ones((3, cfg.vocab + 1), dtype=torch.bool)
    total = torch.zeros(())
    for t in range(4):
        ev = batch_events(
            np.array([1, 2, 3]),
            np.array([t == 0] * 3),
            np.array([3, 3, 5]),
            np.array([1000.0 * t] * 3),
            np.zeros((3, 4)),
            np.zeros((3, 4), bool),
            torch.device("cpu"),
        )
        state, out, _ = advance(model, log_calibration(), state, ev, active)
        total = total + out.loss.sum()
    total.backward()
    assert model.cell.weight_hh.grad is not None and model.cell.weight_hh.grad.abs().sum() > 0
    assert model.timing_head.weight.grad is not None
    path = tmp_path / "logs.pt"
    save_log_checkpoint(path, model, {"name": "test", "data": "none"})
    loaded, meta = load_log_checkpoint(path)
    assert meta["config"]["vocab"] == 16
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)


def test_an_update_whose_loss_is_not_finite_is_skipped():
    """The last line of defence under the input guards: one non-finite input in the example
    buffer made the next update turn every weight into NaN, for good. The update is skipped."""
    part = _partition()
    data = _events(200)
    _run(part, data, [200])
    det = part.detector
    assert det.buffer is not None
    before = {k: v.clone() for k, v in det.model.state_dict().items()}
    det.buffer["prev_feats"][0] = float("inf")
    det._update(torch.ones(1, det.config.vocab + 1, dtype=torch.bool))
    after = det.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_the_expected_template_is_the_rows_owner_when_the_line_was_scored():
    """Row 0 belonged to template 1, passed to template 5 at line 3 and to template 8 at line 6;
    row 1 was never recycled. Lines before 3 that expected row 0 were reported as expecting
    template 5, the second owner, not 1."""
    from models.logs.partition import owners_at

    rows = np.array([0, 1, 0, 0, 0, 1, 0, 0, 0])
    owner_now = np.array([8, 2, -1])
    got = owners_at(rows, owner_now, [(3, 0, 1, "a"), (6, 0, 5, "b")])
    assert got.tolist() == [1, 2, 1, 5, 5, 2, 8, 8, 8]
