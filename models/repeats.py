"""The repeat view: a continuous-valued sensor that reports the same reading again and again.

A stuck sensor (a frozen ADC, a gateway re-sending its last known value, a driver that lost
its device) is the classic sensor fault, and the other views barely see it: a frozen reading
inside the stream's normal range is a small prediction error, and on a stream that follows a
driver the errors grow only as the driver moves away. What gives it away is that the reading
repeats exactly, which a continuous measurement almost never does.

Ranking against the stream's own history, as the other views do, cannot say how rare that is:
a 1,000-event history of a float sensor holds no repeat at all, so every first one would lie
beyond it. Instead each feature keeps decayed counts of exact repeats in two states, after a
reading that changed and after one that repeated (a two-state Markov chain, so that a feature
whose repeats come in pairs, as a quantised value does around its turning points, is not taken
for stuck on its next pair), and a run of L identical readings has probability
r_changed * r_repeated^(L - 2). The view judges only features whose repeats are rare overall
(`REPEAT_RARE`): counts, quantised readings and setpoints repeat as a matter of course, and
their runs (a quiet night of zero tweets) are not faults. It applies from a run's third
reading: one repeat's p is at least the prior's one in ~2,000, which cannot reach the default
threshold on its own.

A run whose alert this view decided is one episode: it is not judged again for as long as it
goes on (one alert per stuck run, not one per reading or per hold-off), and its readings are not
learned: a stuck sensor says nothing about the sensor. So the rates never learn runs the view
keeps flagging, and a run at a value where the feature had a run lately (`REPEAT_ROUTINE`) is
not judged either: a CPU pinned at 100% in bursts, a machine off (at 0) at odd times, a valve at
either end of its travel. A stuck sensor freezes at whatever it read last, so its next freeze
is judged afresh (a resting value that differs every time, a parked GPS, is flagged every
time). A feature whose repeats become common for good (a firmware that quantises its readings
from some day on) is learned from each new run's first repeat, which follows a change, and
stops being judged after about ten such runs in a window.
"""

from __future__ import annotations

import torch

# Repeats are rare in a feature while fewer than this share of its readings after a change, and
# of all its readings, repeated the one before (counts decayed over the calibration window).
REPEAT_RARE = 0.01
# A run is judged from this many identical readings on.
REPEAT_RUN = 3
# ...unless the feature has had a run at this value lately: runs of REPEAT_RUN readings or more
# that ended there, counted and decayed over the calibration's long window, at least this many
# (one within its last ~6,000 readings). A stuck sensor freezes at whatever it read last, which
# it has practically never sat at before; a limit, an off state or an error code is sat at again
# and again. Each feature remembers two such values (a valve rests at either end), the one with
# fewer runs giving way to a new value. (Counted at any value, two stuck episodes made every
# later freeze of the feature routine: `tests/test_repeats.py`.)
REPEAT_ROUTINE = 0.3
# State fields (models/state.py): each feature's last reading, the length of its current run of
# identical readings, -log10 of that run's probability, the decayed counts [repeats after a
# change, readings after a change, repeats after a repeat, readings after a repeat] (over the
# calibration window), two values it sat at and the runs that ended at each (over the long window).
REPEAT_FIELDS = ("rep_last", "rep_run", "rep_lp", "rep_counts", "rep_home", "rep_home_runs")


def _rates(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    c = counts.double()
    r_changed = (c[..., 0] + 0.5) / (c[..., 1] + 1.0)
    r_repeated = (c[..., 2] + 0.5) / (c[..., 3] + 1.0)
    seen = c[..., 1] + c[..., 3]
    overall = (c[..., 0] + c[..., 2] + 0.5) / (seen + 1.0)
    return r_changed, r_repeated, seen, overall


def repeat_log10_p(
    state: dict[str, torch.Tensor], x: torch.Tensor, mask: torch.Tensor, history: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The view for events x [B, F] (present where mask): (-log10 p [B], whether it applies [B],
    each feature's -log10 p [B, F] (0 where not judged), and the run fields after this reading
    for `repeat_update`). A feature is judged once its counts hold `history` readings; the
    view's p is the smallest feature's times the features judged (Bonferroni)."""
    r_changed, r_repeated, seen, overall = _rates(state["rep_counts"])
    same = mask & (x == state["rep_last"]) & (state["rep_run"] > 0)
    run = torch.where(mask, torch.where(same, state["rep_run"] + 1, 1), state["rep_run"])
    # The run's probability, one reading at a time under the rates it had when each came. A run
    # already reported (rep_lp < 0: it alerted) is one episode however long it goes on: its
    # score rises with every reading, and the hold-off lets a higher score through as news.
    step = torch.where(state["rep_run"] > 1, r_repeated, r_changed)
    before = state["rep_lp"]
    run_lp = torch.where(same, torch.where(before < 0, before, before - torch.log10(step)), torch.where(mask, 0.0, before))
    routine = ((state["rep_home"] == x[..., None]) & (state["rep_home_runs"] >= REPEAT_ROUTINE)).any(dim=-1)
    judged = mask & (r_changed < REPEAT_RARE) & (overall < REPEAT_RARE) & (seen >= history) & ~routine
    parts = torch.where(judged & (run >= REPEAT_RUN), run_lp.clamp(min=0.0), 0.0)
    n = judged.sum(dim=1)
    applies = (parts > 0).any(dim=1)
    view = parts.amax(dim=1) - torch.log10(n.clamp(min=1).double())
    fields = {"rep_last": torch.where(mask, x, state["rep_last"]), "rep_run": run.to(state["rep_run"].dtype), "rep_lp": run_lp}
    return torch.where(applies, view, 0.0), applies, parts, fields


def repeat_update(
    state: dict[str, torch.Tensor],
    fields: dict[str, torch.Tensor],
    mask: torch.Tensor,
    flagged: torch.Tensor,
    reported: torch.Tensor,
    judging: torch.Tensor,
    flagged_weight: float,
    window: float,
    long_window: float,
) -> dict[str, torch.Tensor]:
    """The repeat state after this event: `fields` from `repeat_log10_p` (runs `reported` [B, F],
    those whose alert this view decided, marked so for as long as they go on), and the counts
    with each present reading learned (a flagged event's, and any after a repeat, at
    `flagged_weight`: a reading that extends a run is what the view judges, and learned at full
    weight a stuck sensor's first readings would make its repeats ordinary before they reached
    the threshold; every reading after a repeat counts alike, so the rate of repeats after a
    repeat is not biased by it). Not learned at all: the rest of a reported run (a stuck sensor
    says nothing about the sensor, and its hundreds of repeats, even at a tenth, made the next
    stuck run 1,500 readings later look ordinary: `tests/test_repeats.py`), and a run flagged
    but held while `judging` [B, F] it (an aftershock of another alert: learned, it lifted the
    feature's repeats over REPEAT_RARE and the stuck run was never reported). Every run of
    REPEAT_RUN readings or more is counted at its value, over `long_window`: a feature with a run
    there lately sits there routinely (a CPU pinned at 100% in bursts, a machine off at odd
    times), even while its repeats are rare, which the rates alone never learned, as the view's
    own runs are left out of them. (Counted as they end: a run counted while it lasts made itself
    routine.)"""
    prev = state["rep_run"]
    had = mask & (prev > 0)  # (a feature's first reading follows nothing)
    after_repeat = prev > 1
    w = torch.where(flagged[:, None] | after_repeat, flagged_weight, 1.0)
    w = torch.where(had & (fields["rep_lp"] >= 0) & ~judging, w, 0.0)
    repeated = (fields["rep_run"] > 1).double()
    decay = (1.0 - 1.0 / window) ** w
    c = state["rep_counts"].double() * decay[..., None]
    a = after_repeat.double()
    runs = state["rep_home_runs"].double() * torch.where(mask, 1.0 - 1.0 / long_window, 1.0)[..., None]
    ended = mask & (fields["rep_run"] == 1) & (prev >= REPEAT_RUN)  # (counted as it ends: not itself)
    home = state["rep_home"]
    at = (home == state["rep_last"][..., None]) & (runs > 0)
    fresh = (ended & ~at.any(dim=-1))[..., None] & (torch.arange(2, device=home.device) == runs.argmin(dim=-1, keepdim=True))
    runs = torch.where(fresh, 1.0, runs + (ended[..., None] & at).double())
    home = torch.where(fresh, state["rep_last"][..., None], home)
    add = torch.stack((w * repeated * (1 - a), w * (1 - a), w * repeated * a, w * a), dim=-1)
    run_lp = torch.where(reported, -1.0, fields["rep_lp"])
    return {
        **fields,
        "rep_lp": run_lp,
        "rep_counts": (c + add).to(state["rep_counts"].dtype),
        "rep_home": home,
        "rep_home_runs": runs.to(state["rep_home_runs"].dtype),
    }
