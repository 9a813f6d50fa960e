"""The pure core: a batch of (slot, features) plus the state bank in, scores and new state out.

`advance` is the single definition of one event's step (surprise against the previous
prediction, normaliser update, GRU step, calibration). Training calls it with gradients on
whole sequences; the daemon calls it through `Detector.process`, which splits an arbitrary
batch into wavefronts: wavefront k holds the k-th event of every stream in the batch, so each
stream advances exactly one step per event and in order, while all streams of a wavefront
share one GRU call.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from models.adapt import (
    GAP_FIELDS,
    NORM_CLIP,
    NORM_CLIP_AFTER,
    averaging_rate,
    clip_around,
    gap,
    gap_update,
    hour_of_day,
    level_q,
    level_update,
    mix,
    mix_update,
    profile_hours,
    profile_lookup,
    profile_scored,
    profile_update,
    running_mean_var,
    shift_q,
    shift_update,
)
from models.calibration import (
    EPISODE_TAIL,
    TAIL_CALM,
    TAIL_THRESHOLD,
    CalibrationConfig,
    combine_scores,
    feature_log10_p,
    half_warmup,
    hist_bin,
    holds_half_warmup,
    learn_tail,
    onset_bins,
    reach_capped,
    run_weight,
    tail_log10_p,
    tail_weight,
)
from models.correlation import active_width, correlation_q, correlation_update, standardised_errors
from models.gru import StreamGRU, gaussian_nll
from models.recurrence import RECUR_FIELDS, recurrence, recurrence_update
from models.repeats import repeat_log10_p, repeat_update
from models.state import StateBank


@dataclass
class StepOutput:
    """Per event: raw surprise (GRU NLL, nats), calibrated score, decision, per-feature parts."""

    surprise: torch.Tensor  # float64 [B]
    score: torch.Tensor  # float64 [B]
    is_anomaly: torch.Tensor  # bool [B]
    contributions: torch.Tensor  # float64 [B, F]: each feature's part of the deciding view, 0 where absent
    valid: torch.Tensor  # bool [B]: there was a prediction to be surprised against
    nll: torch.Tensor  # float32 [B, F]: the GRU's NLL per feature (the training loss)
    view: torch.Tensor  # int64 [B]: index into VIEWS of the view with the smallest p
    held: torch.Tensor  # int8 [B]: index into HELD of why an event at the threshold is not an anomaly (0: it is not held)


# The views of an event, as score records name them; the first five are ranked against the
# state's surprise histograms CAL_HISTS, in the same order. The last two apply only to streams
# of several features: `feature` ranks each feature's prediction error against that feature's
# own history (`cal_feat`; `feature_log10_p` in models/calibration.py).
VIEWS = ("prediction", "time_of_day", "recent_level", "recent_mean", "correlation", "feature", "repeat")
# Why an event at or above the threshold is reported below it: not held, an aftershock of a recent
# alert (the hold-off), a recurrence of something flagged at this hour on the last days, or the
# stream's warm-up (its histories rest on too few events for the score to mean what it says), or a
# duplicate: a re-delivery of the stream's previous event, which was scored when it first came
# (`duplicate`; reported at 0, whatever it scored then).
HELD = ("", "aftershock", "recurrence", "warmup", "duplicate")
# The views of the recent past, which say nothing about an event after a gap.
# (The correlation view is one of them: it compares the features' errors against the stale
# predictions.)
_SHORT_VIEWS = [VIEWS.index(v) for v in ("prediction", "recent_level", "recent_mean", "correlation")]
_REPEAT = VIEWS.index("repeat")
_AFTERSHOCK, _RECURRENCE, _WARMUP, _DUPLICATE = (HELD.index(h) for h in ("aftershock", "recurrence", "warmup", "duplicate"))
# Largest magnitude of a reading the core accepts. State keeps squared deviations in float32 (a
# feature's variance at each hour), which overflows past ~1.8e19: a larger finite reading would
# turn a stream's state into infinities for good. No real sensor reads 1e18 in a sensible unit,
# so the daemon dead-letters such values (reason `out_of_range`) before they get here.
MAX_ABS_VALUE = 1e18
CAL_HISTS = ("cal_hist", "cal_hist_prof", "cal_hist_lvl", "cal_hist_shift", "cal_hist_corr")
# The same views' long-memory histograms (CalibrationConfig.long_window), in the same order.
CAL_HISTS_LONG = ("cal_long", "cal_long_prof", "cal_long_lvl", "cal_long_shift", "cal_long_corr")


def _std(cfg_rel: float, cfg_abs: float, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    return torch.maximum(torch.sqrt(var.clamp(min=0.0)), cfg_rel * mean.abs() + cfg_abs)


def _over(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """mask ([B] per stream or [B, F] per feature) shaped to select whole rows of `like`, a state
    field with more trailing dimensions (a histogram, a profile)."""
    return mask.view(*mask.shape, *([1] * (like.dim() - mask.dim())))


def duplicate(
    state: dict[str, torch.Tensor], x: torch.Tensor, mask: torch.Tensor, ts_ms: torch.Tensor, stamp: torch.Tensor
) -> torch.Tensor:
    """bool [B]: the event repeats its stream's previous one exactly: the same time, the same
    features, the same readings and the same delivery stamp (stamp [B], -1 where none). That is a
    re-delivery (a producer retrying without idempotence resends the record as it was, its
    timestamp included), not a second reading: stepped again, it taught the stream that readings
    repeat, and once 2% of events came twice the repeat view stopped judging stuck sensors; it
    also doubled the events in the stream's other statistics.

    The stamp is what tells a copy from a reading that merely looks the same: a sensor read four
    times a second with whole-second times repeats its time and, when steady, its reading, but
    each reading is sent at its own moment (a review: without the stamp, 250 of 400 such readings
    were taken for copies). Features sent as separate events at the same millisecond are not
    duplicates either (each carries other features than the last), nor is a reading repeated at
    a new time (a stuck sensor's)."""
    same_values = (~mask | (x == state["rep_last"])).all(dim=1)
    same_features = (mask == state["last_mask"]).all(dim=1)
    same_delivery = (stamp >= 0) & (stamp == state["last_stamp"]) & (ts_ms == state["gap_last_ts"])
    return (state["steps"] > 0) & same_delivery & same_features & same_values


# The stream's calibration: what `wakes` empties, as a new stream's; and the time-of-day profile of
# each feature it restarts (kept, it expected the constant at every hour it had seen).
_RESTARTED = CAL_HISTS + CAL_HISTS_LONG + ("cal_feat", "cal_onset_bin", "cal_feat_onset_bin", "cal_onsets", "cal_settle")
_RESTARTED_FEATURE = ("prof_mean", "prof_var", "prof_seen", "prof_start")
# Events in a row that must move a constant stream for it to wake up (`wakes`).
WAKE_AFTER = 3


def wakes(state: dict[str, torch.Tensor], mask: torch.Tensor, flat: torch.Tensor, moved: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(restart [B], the stream's `cal_wake` [B] after this event). A stream that has read one
    value on every feature for so long that each spread sits at its floor (flat [B, F]: a run of
    identical readings at a variance at the floor, a machine off, a sensor not yet in use) and
    whose event moves one of them (moved [B, F]: further than the normaliser's clip) has woken
    up if its next WAKE_AFTER - 1 events move too: it then starts over from the last of them,
    once. Its warm-up runs again, its calibration histories are emptied and the event's
    features' running statistics and time-of-day profiles start from that reading (the profile,
    kept, expected the constant at every hour seen while the stream was off, and the first
    return to such an hour after the new warm-up scored an ordinary reading 1.0: a review); its
    repeat counts, hold-off, recurrence memory and hidden state are kept. The events are scored
    first, against the constant past (the first is usually flagged: the stream woke up). A move
    an event in between takes back is a glitch, handled as ever (winsorised), and the stream may
    still wake later; one of two readings restarted a stream from its value in a first version
    and hid a real step 30 events later. The moves counted are those of a feature that has
    moved already; events of features still constant neither count nor take the move back,
    whether one of them moves too or not: a stream whose events each carry one feature never
    woke while another of its features stayed constant (`-k one_feature_events`), and moves of
    two sensors, a glitch on each, added up to a restart (`-k add_up`). Left (reviews): a count
    left by a sensor that went silent does not expire, so a two-reading glitch before it did
    and two moving readings of another sensor later restart the stream; a sensor whose move is
    taken back as another switches on keeps the stream asleep (below).

    Judged on, its first readings measured hundreds of deviations against spreads at the floor,
    and the few of them not flagged (the histories' tops had climbed to them through the first
    ones' capped records) went into the histories at full weight in their open-ended last bins,
    where ordinary anomalies of the now noisy stream ranked below them for thousands of events: a
    10-sigma spike 400 or 1,500 events after the move was flagged on 0 of 8 streams, now on 8
    (`tests/test_calibration.py -s -k constant_until`). The flat test asks for a run of identical
    readings, not just a spread at the floor (0.01% of the level: a pressure in Pa varies less),
    and the wake-up for WAKE_AFTER moving events in a row (reviews; `-k glitch_or_fine_noise`).
    Once per stream (`cal_wake` WAKE_AFTER): after a restart a feature may be constant again for a while
    (a setpoint), and its next change is a change the stream learns, not a new start.
    (`cal_wake`: 0 asleep or never constant, 1 to WAKE_AFTER - 1 the events in a row that moved,
    WAKE_AFTER restarted.)"""
    wake = state["cal_wake"]
    idle = (flat | (state["norm_n"] == 0)).all(dim=1)
    first = (wake == 0) & idle & (mask & moved & flat).any(dim=1)
    waking = (wake > 0) & (wake < WAKE_AFTER)
    # Counted: a feature that has moved since it was flat (so no longer flat) moves again. Reset:
    # such a feature reads within the clip again (the move was taken back: a glitch). Neither:
    # an event of features still flat (its features come in separate events: a sensor's
    # reading, then another's), whether one of them moves too (a second sensor switching on)
    # or not. (Counted as moves of the first, a glitch on one sensor and later a two-reading
    # glitch on another restarted the stream from the second glitch's value: a review.)
    # (Taken back, the count starts from 0 even where another, still-flat feature moves in that
    # event: counted from 1 there, glitches of one or two readings on two sensors over four events
    # restarted the stream from a glitch. The price, a review's: a sag on one sensor as another
    # switches on keeps the stream asleep, never flat on every feature again.)
    again = waking & (mask & moved & ~flat).any(dim=1)
    back = waking & (mask & ~moved & ~flat).any(dim=1)
    after = torch.where(first, 1, torch.where(again, wake + 1, torch.where(back, 0, wake)))
    return again & (wake + 1 == WAKE_AFTER), after.to(wake.dtype)


def advance(
    model: StreamGRU,
    cal: CalibrationConfig,
    state: dict[str, torch.Tensor],
    x: torch.Tensor,
    mask: torch.Tensor,
    ts_ms: torch.Tensor | None = None,
    stamp: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], StepOutput]:
    """One event for each of B distinct streams. x: float64 [B, F] (anything where ~mask);
    ts_ms: int64 [B] event times (None: all at midnight, so the profile is a local level);
    stamp: int64 [B] delivery stamps (`duplicate`; None or -1: nothing is taken for a copy)."""
    cfg = model.config
    x = torch.where(mask, x, torch.zeros_like(x))
    n, mean, var = state["norm_n"], state["norm_mean"], state["norm_var"]
    timed = ts_ms is not None
    if ts_ms is None:
        ts_ms = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    # (Without times and stamps, as in training and `streamer nab`, nothing tells a re-delivery
    # from a repeated reading.)
    dup = duplicate(state, x, mask, ts_ms, stamp) if stamp is not None and timed and cal.skip_duplicates else None

    # Errors of this event against the predictions made before it: the GRU's (made after the
    # stream's previous event, in normalised units) and the time-of-day profile's.
    std = _std(cfg.rel_std_floor, cfg.abs_std_floor, mean, var)
    floor_var = (cfg.rel_std_floor * mean.abs() + cfg.abs_std_floor) ** 2
    z_prev = ((x - mean) / std).float()
    has_pred = mask & (n >= 2)
    nll = gaussian_nll(z_prev, state["pred_mu"], state["pred_log_sigma"]).clamp(max=cfg.max_feature_nll)
    nll = torch.where(has_pred, nll, torch.zeros_like(nll))
    surprise = nll.double().sum(dim=1)
    # The adaptation below is not part of the training loss (the GRU's NLL): detached, so
    # training does not record a graph for it.
    e_gru = std * (z_prev - state["pred_mu"]).detach().double()
    hour = hour_of_day(ts_ms)
    p_mean, p_var_raw, p_var = profile_lookup(state, hour, mean, var, floor_var)
    e_prof = x - p_mean
    errors = torch.stack((e_gru, e_prof), dim=2)
    r, q_mix, ready = mix(state, errors, has_pred)
    q_prof = torch.where(ready, e_prof * e_prof / p_var, torch.zeros_like(e_prof))
    q_lvl = level_q(state, x, mask, n, floor_var)
    q_shift = shift_q(state, mask, n, mean, var, floor_var)
    z_mix = standardised_errors(r, state["mix_var"], ready)
    corr_k = active_width(ready)
    q_corr, corr_applies = correlation_q(state, z_mix, ready, corr_k)
    valid = ready.any(dim=1)

    # Five views of how unusual the event is, each ranked against the stream's own history of
    # that view: the mixed prediction's error (the next value given the recent past and the
    # hour), the profile's alone (is this a normal reading for this hour at all), the
    # distance from the recent level (is it outside what the stream did in the last ~30 events),
    # the shift of the recent mean (has the stream's average moved lately) and, with two or
    # more features, each feature's error given the others' (is one out of line with the rest).
    steps = state["steps"]
    per_feature = torch.stack((q_mix, q_prof, q_lvl, q_shift, q_corr), dim=1)  # [B, 5, F]
    # A feature that came later than its stream (a sensor added to it, or one whose first
    # readings were missing) has statistics resting on a few readings while the stream is past
    # warm-up: its third reading was flagged as if it were a spike. Like a new stream's, its first
    # half warm-up is kept out of the views (it still learns). Late against the stream's best-fed
    # feature, not its event count: a stream whose events each carry one of its features (a
    # sensor's reading, then another's) has every feature behind its count, and all were kept
    # out through warm-up, so the views' histories learned nothing but zeros and flagged the
    # first event after it, noisy or not.
    late = mask & (n < cal.warmup // 2) & (n.max(dim=1, keepdim=True).values >= cal.warmup // 2)
    per_feature = torch.where(late[:, None, :], 0.0, per_feature)
    # Every view's history learns from the first event on. A feature's profile error is scored
    # only once it has come back to hours it knows (`profile_scored`; always without timestamps,
    # where the profile is a local level), but the view's history learns it before: it knows
    # such comparisons by then. (Learned while not scored, it makes the scored sum the smaller:
    # fewer flags, never more.)
    learned = per_feature.sum(dim=2)  # [B, 5]
    hours = profile_hours(state) if timed else None
    prof_ok = profile_scored(state, hours) if hours is not None else torch.ones_like(mask)
    per_feature[:, 1] = torch.where(prof_ok, per_feature[:, 1], 0.0)  # (a fresh tensor since `late`: learned is summed)
    views = per_feature.sum(dim=2)
    # The correlation view likewise waits for its history to hold half a warm-up of events: in a
    # stream that gains its second feature long after its start, it applies for the first time
    # past warm-up, and an empty history ranked its first events as extreme.
    learns = torch.cat((torch.ones_like(views[:, :-1], dtype=torch.bool), corr_applies[:, None]), dim=1)
    # After a gap (a sensor back after hours offline, a reading that much late) the views of the
    # recent past compare the event with where the stream stood hours before, and flagged readings
    # that were normal for their hour. The time-of-day view judges such an event alone, where it
    # knows the day of every feature the event carries: every hour it learned revisited. On the
    # second day its history is still full of first revisits, and a sensor back broken scored
    # 0.45 and was missed for hours; a feature that joined lately went unjudged. There, every view
    # still applies. Their histories do not learn such an event either.
    prof_applies = (prof_ok & mask).any(dim=1)
    gapped = gap(state, ts_ms) if timed else torch.zeros_like(valid)
    after_gap = gapped
    if hours is not None:
        knows_day = prof_ok & (hours[1] >= hours[0])  # (every hour learned is revisited)
        after_gap = gapped & prof_applies & (knows_day | ~mask).all(dim=1)
    learns[:, _SHORT_VIEWS] &= ~after_gap[:, None]
    applies = learns.clone()
    applies[:, 1] = prof_applies
    applies[:, 4] &= holds_half_warmup(cal, state["cal_hist_corr"])
    # Each view is ranked against two histories of itself: the last ~window events and the last
    # ~long_window. An event counts as unusual as it is against the less surprised of the two: a
    # spike larger than anything in the last 1,000 events is no news when spikes of its size come
    # every few hundred events over the long run (a busy stream's quiet week ending). Taking the
    # larger p keeps the score's meaning (P(score >= s) <= the bound still holds).
    hists = torch.stack([state[k] for k in CAL_HISTS + CAL_HISTS_LONG], dim=1)  # [B, 10, bins]: one call
    nv = len(CAL_HISTS)
    lp_both, _, tops = tail_log10_p(cal, views.repeat(1, 2), hists)
    # The long histories learn the time-of-day view only where it is scored. Before a feature
    # has come back to an hour, its profile error compares the reading with the stream's overall
    # level (an hour never seen), which says nothing of what the stream does at that hour: at a
    # machine's first switch-off that was thousands of times the running readings' spread, and
    # at full weight its trace set the long history's top for ~20,000 events, hiding ordinary
    # spikes in that view (`tests/test_adapt.py -k daily_shift`). The short history still
    # learns it from the first event, to judge the first scored hours against.
    learned_long = torch.cat((learned[:, :1], views[:, 1:2], learned[:, 2:]), dim=1)
    bins = hist_bin(torch.cat((learned, learned_long), dim=1))
    lp = torch.where(applies, torch.minimum(lp_both[:, :nv], lp_both[:, nv:]), 0.0)
    # The per-feature view, a sixth test where it applies: each feature's mixed prediction error
    # against its own history, so a noisy sensor's tail does not hide a quiet one's spike. It
    # learns and judges what the prediction view does (not after a gap, not a late feature).
    kf = active_width(ready, least=1)
    feat_ok = ready[:, :kf] & ~late[:, :kf] & ~after_gap[:, None]
    feat_hist = state["cal_feat"][:, :kf]
    if kf:
        lp_feat, feat_applies, feat_parts, feat_b, feat_top = feature_log10_p(cal, per_feature[:, 0, :kf], feat_hist, feat_ok)
    else:  # (no feature of the wavefront has an error: nothing to judge or learn)
        lp_feat, feat_applies = torch.zeros_like(valid, dtype=lp.dtype), torch.zeros_like(valid)
    # The repeat view, a seventh test where a continuous-valued feature reads the same value for
    # the third time or more in a row (a stuck sensor; models/repeats.py).
    lp_rep, rep_applies, rep_parts, rep_fields = repeat_log10_p(state, x, mask, half_warmup(cal))
    lp = torch.cat((lp, lp_feat[:, None], lp_rep[:, None]), dim=1)
    applies = torch.cat((applies, feat_applies[:, None], rep_applies[:, None]), dim=1)
    level = combine_scores(cal, lp, valid, applies)  # uncapped: recurrences compare above 1
    raw = level.clamp(max=1.0)
    flagged = valid & (steps >= cal.warmup) & (raw >= cal.threshold)
    # In warm-up the score is not yet calibrated (on anomaly-free streams it reached the threshold
    # tens of times as often as after 1,000 events). It is reported like an aftershock, so that a
    # consumer thresholding the score (the NAB harness's CSVs) sees what `is_anomaly` says, and
    # the record says why. (Its learning is unchanged: see the README on warm-up.)
    early = valid & (steps < cal.warmup) & (raw >= cal.threshold)
    # Hold-off: for a few events after an alert, an event that scores no higher than the alert
    # did is its aftershock (a burst's tail, its escalation, the return to normal), not news: it
    # scores a fraction of its score, so an episode raises one alert. One that scores higher is
    # news and alerts again. Scores only go down, so P(score >= s) <= the bound still holds.
    hold_left, hold_score = state["hold_left"], state["hold_score"]
    aftershock = (hold_left > 0) & (raw <= hold_score)
    # A recurrence (flagged in an hour that had flags on each of the last days, and no larger
    # than they were) is reported the same way, and starts no hold-off: it is routine, not news.
    # (Flags are rare: on CPU, a wavefront without one skips the memory, which it would leave as
    # it is. On a GPU the check would force a sync per wavefront, so the memory always runs.)
    recur_runs = x.device.type != "cpu" or bool(flagged.any())
    if recur_runs:
        recurs = flagged & recurrence(state, ts_ms, level, cal.recur_days, cal.recur_margin / cal.decades)
    else:
        recurs = torch.zeros_like(flagged)
    echo = aftershock | recurs
    score = torch.where(echo | early, raw * cal.holdoff_factor, raw)
    is_anomaly = flagged & (score >= cal.threshold)
    held = torch.where(flagged & ~is_anomaly, torch.where(recurs, _RECURRENCE, torch.where(aftershock, _AFTERSHOCK, 0)), 0)
    held = torch.where(early, _WARMUP, held).to(torch.int8)
    alert = flagged & ~echo
    # A run of repeats whose alert (or recurrence) this view decided is one episode:
    # `repeat_update` marks it reported. One flagged but held as another alert's aftershock is
    # not, and is not learned: it is alerted when the hold-off ends.
    view = lp.argmax(dim=1)  # (the deciding view: also the record's)
    rep_decides = (view == _REPEAT)[:, None] & (rep_parts > 0)
    rep_reported, rep_judging = (is_anomaly | recurs)[:, None] & rep_decides, flagged[:, None] & rep_decides
    # Online adaptation skips the events the stream has just flagged, aftershocks included:
    # what the stream learns does not depend on how alerts are reported.
    learn = mask & ~flagged[:, None]
    onset = flagged & ~state["flag_prev"] & ~recurs  # (the first of a run of flags: `tail_weight`, `reach_capped`)
    # The long history learns only unflagged events: it remembers what the stream does in normal
    # operation. A flagged glitch in it, even at a tenth of the weight, would set its top for
    # ~10,000 events and hold every later anomaly of ordinary size below the threshold.
    weight = tail_weight(cal, steps, valid, flagged, onset, state["cal_onsets"])
    # A reading in warm-up that the normaliser itself winsorised (more than NORM_CLIP of its
    # deviations out) is recorded as a flagged event is, though warm-up flags nothing: a sensor
    # steady through warm-up has its spread at the floor, and its first ordinary change (a
    # whole-degree thermostat's first step, ~500 deviations) went into every history at full
    # weight, in the open-ended last bin, where later spikes of any size tie with it: a reading
    # of 10^6 degrees scored under 0.5 for ~2,000 events (a review;
    # `tests/test_calibration.py -k first_step`). NAB's result files are unchanged.
    # (Per feature for the per-feature histories; the summed views' histories take the event's.
    # Nothing is flagged in warm-up, so these events are never flagged ones too.)
    # (The normaliser's winsorised reading, which its update below takes: clipped where it differs.)
    x_norm = clip_around(x, mean, std, NORM_CLIP, n >= NORM_CLIP_AFTER)
    clipped = mask & (x_norm != x) & (steps < cal.warmup)[:, None]
    unsettled = clipped.any(dim=1)
    weight_views = torch.where(unsettled, weight.clamp(max=cal.flagged_weight), weight)
    weight_long = torch.where(flagged | unsettled, 0.0, weight_views)
    weight_short = run_weight(cal, weight_views, onset, bins[:, :nv], tops[:, :nv], state["cal_onset_bin"])
    learns_long = learns.clone()
    learns_long[:, 1] &= prof_applies
    # Nor do the long histories of the views of the recent past learn an episode's tail, up to
    # EPISODE_TAIL events after a flag until one is calm: not normal operation either (a level
    # shift's first tens of events, while the model and the recent level catch up), and at full
    # weight its trace set their top for ~20,000 events, hiding later spikes below it: a spike
    # of 10 noise steps 6,000 events after a lasting shift of 20 was flagged on 4 of 16 AR(1)
    # streams (`tests/test_adapt.py -k level_shift`). The short histories still learn it, so the
    # stream takes a new level as its normal as fast as before. The time-of-day view's long
    # history learns it too: after a shift each hour's first visit meets the old level for a
    # day, as that tail did, and without it the next hour's first readings were flagged again.
    # (A restart empties the count with the histories: `_RESTARTED`.)
    settle = state["cal_settle"]
    learns_long[:, _SHORT_VIEWS] &= (settle == 0)[:, None]
    calm = valid & (raw < TAIL_CALM)  # (ends a tail; an event with no feature ready scores 0 and says nothing)
    cal_weight = torch.cat((weight_short * learns, weight_long[:, None] * learns_long), dim=1)  # [B, 10]
    windows = torch.full((2, nv), float(cal.window), dtype=hists.dtype, device=hists.device)  # (fills: no copy from host)
    windows[1] = float(cal.long_window)
    # (Only the short histories learn flagged events; the long ones take the short ones' caps.)
    capped = reach_capped(cal, flagged, onset, state["cal_onsets"], bins[:, :nv], state["cal_onset_bin"]) | unsettled[:, None]
    capped = capped.repeat(1, 2)
    onset_bin = onset_bins(onset, learns, bins[:, :nv], tops[:, :nv], state["cal_onset_bin"], keep_within=False)
    cal_feat, feat_onset_bin = state["cal_feat"], state["cal_feat_onset_bin"]
    if kf:
        last_f = feat_onset_bin[:, :kf]
        capped_f = reach_capped(cal, flagged, onset, state["cal_onsets"], feat_b, last_f) | clipped[:, :kf]
        weight_f = run_weight(cal, weight, onset, feat_b, feat_top, last_f)
        weight_f = torch.where(clipped[:, :kf], weight_f.clamp(max=cal.flagged_weight), weight_f)
        learned_f = learn_tail(cal, feat_hist, feat_b, weight_f * feat_ok, capped_f, feat_top)
        new_last_f = onset_bins(onset, feat_ok, feat_b, feat_top, last_f, keep_within=True)
        cal_feat = learned_f if kf == cal_feat.shape[1] else torch.cat((learned_f, cal_feat[:, kf:]), dim=1)
        feat_onset_bin = new_last_f if kf == feat_onset_bin.shape[1] else torch.cat((new_last_f, feat_onset_bin[:, kf:]), dim=1)

    # Online normaliser: exact mean/variance at first, exponential window later; winsorised, so
    # a glitch does not blind the stream.
    n_new = torch.where(mask, n + 1, n)
    mean_new, var_new = running_mean_var(mean, var, x_norm, averaging_rate(n, cfg.norm_alpha), mask)
    # (Flat: NORM_CLIP_AFTER identical readings at a spread at its floor; a move, a reading it clips.)
    flat = (var <= floor_var) & (n >= NORM_CLIP_AFTER) & (state["rep_run"] >= NORM_CLIP_AFTER)
    restart, wake = wakes(state, mask, flat, x_norm != x)
    # (Every feature the stream has, not only the event's: with its features in separate events,
    # one kept its count and the other, restarted, was late against it through the new warm-up.
    # One the event does not carry starts from its next reading, as a feature never seen: from
    # its normaliser's mean, still near the old constant where it had moved too, the exact average
    # kept that phantom reading in its spread for ~1,000 readings, and from its last reading, a
    # glitch before it went offline. Reviews.)
    fresh = restart[:, None] & (mask | (n > 0))
    n_new = torch.where(restart[:, None], mask.to(n_new.dtype), n_new)
    mean_new = torch.where(fresh & mask, x, mean_new)
    var_new = torch.where(fresh, 0.0, var_new)
    z_in = (x - mean_new) / _std(cfg.rel_std_floor, cfg.abs_std_floor, mean_new, var_new)
    z_in = torch.where(mask, z_in, torch.zeros_like(z_in)).float()

    b, f = x.shape
    h = state["h"]
    if h.device.type == "cpu" and not bool(mask.all()):
        # On CPU, step only the channels that carry a value: streams rarely use all max_features
        # slots, and the GRU is most of the cost. (On a GPU the nonzero() would force a sync per
        # wavefront, and the spare lanes are free, so every channel is stepped and masked.)
        sel = mask.reshape(-1).nonzero().squeeze(1)
        h_sel, mu_sel, ls_sel = model.step(z_in.reshape(-1)[sel], h.reshape(b * f, -1)[sel])
        h_new = h.reshape(b * f, -1).index_copy(0, sel, h_sel).reshape(h.shape)
        mu_new = state["pred_mu"].reshape(-1).index_copy(0, sel, mu_sel).reshape(b, f)
        ls_new = state["pred_log_sigma"].reshape(-1).index_copy(0, sel, ls_sel).reshape(b, f)
    else:
        h_step, mu, log_sigma = model.step(z_in.reshape(b * f), h.reshape(b * f, -1))
        h_new = torch.where(mask.unsqueeze(-1), h_step.reshape(h.shape), h)
        mu_new = torch.where(mask, mu.reshape(b, f), state["pred_mu"])
        ls_new = torch.where(mask, log_sigma.reshape(b, f), state["pred_log_sigma"])

    new_state = {
        "h": h_new,
        "norm_n": n_new,
        "norm_mean": mean_new,
        "norm_var": var_new,
        "pred_mu": mu_new,
        "pred_log_sigma": ls_new,
        # (A stream's very first event starts its hour at its own value, not at the empty
        # normaliser's zero.)
        **profile_update(state, ts_ms, hour, x, torch.where(n > 0, p_mean, x), p_var_raw, learn),
        **mix_update(state, errors, r, floor_var, ready, has_pred, learn, n),
        **dict(zip(CAL_HISTS + CAL_HISTS_LONG, learn_tail(cal, hists, bins, cal_weight, capped, tops, windows.reshape(-1)).unbind(1))),
        # (After a gap the recent level starts again from this reading: against the level of hours
        # before, the readings after it were flagged instead. Forward in time only: restarted at a
        # late reading, the level made the next on-time reading look far from it.)
        **level_update(state, x, n, mask, restart=mask & (after_gap & (ts_ms > state["gap_last_ts"]))[:, None]),
        **shift_update(state, x, n, learn, mean, std),
        **correlation_update(state, z_mix, ready, learn, corr_k),
        **(gap_update(state, ts_ms, gapped) if timed else {k: state[k] for k in GAP_FIELDS}),
        # (Runs of flags, not flags: one long outage is one run, not a stream flagged again and
        # again; a nightly job's recurrences start none.)
        "cal_onsets": state["cal_onsets"] * (1.0 - 1.0 / cal.window) + onset.double(),
        "flag_prev": flagged,
        "cal_settle": torch.where(flagged, EPISODE_TAIL, torch.where(calm, 0, (settle - 1).clamp(min=0))).to(torch.int8),
        "cal_feat": cal_feat,
        "cal_onset_bin": onset_bin,
        "cal_feat_onset_bin": feat_onset_bin,
        **repeat_update(state, rep_fields, mask, flagged, rep_reported, rep_judging, cal.flagged_weight, cal.window, cal.long_window),
        "steps": steps + 1,
        "hold_left": torch.where(alert, cal.holdoff, (hold_left - 1).clamp(min=0)).to(hold_left.dtype),
        "hold_score": torch.where(alert, raw, hold_score),
        **(recurrence_update(state, ts_ms, level, flagged) if recur_runs else {k: state[k] for k in RECUR_FIELDS}),
    }
    # The explanation is the decomposition of the statistic that decided the score: the views'
    # scales differ (a recent-mean shift of 50 is extreme where a prediction error of 50 may be
    # routine), so features are compared within that one view.
    # (The per-feature view's parts are each feature's -log10 p: its own surprise, in decades.)
    parts = torch.zeros_like(per_feature[:, :1])
    if kf:
        parts[:, 0, :kf] = feat_parts
    per_feature = torch.cat((per_feature, parts, rep_parts[:, None].to(per_feature.dtype)), dim=1)
    contributions = per_feature.gather(1, view[:, None, None].expand(-1, 1, per_feature.shape[2])).squeeze(1)
    # In float64: a near-flat feature that jumps reaches ~1e48, past float32, where two such
    # features would tie at its maximum and the explanation would name the first, not the larger.
    contributions = contributions.double().clamp(max=torch.finfo(torch.float64).max)
    new_state["last_mask"] = mask
    new_state["cal_wake"] = wake
    # (Rare: on CPU a wavefront without a restart skips the copy, as for duplicates below.)
    if x.device.type != "cpu" or bool(restart.any()):
        for k in _RESTARTED:
            v = new_state[k]
            new_state[k] = torch.where(_over(restart, v), torch.zeros_like(v), v)
        for k in _RESTARTED_FEATURE:
            v = new_state[k]
            new_state[k] = torch.where(_over(fresh, v), torch.zeros_like(v), v)
        new_state["steps"] = torch.where(restart, 1, new_state["steps"]).to(steps.dtype)
    new_state["last_stamp"] = torch.full_like(state["last_stamp"], -1) if stamp is None else stamp
    # A duplicate leaves its stream as it was and reports nothing new. (Rare: on CPU a wavefront
    # without one skips the copy; on a GPU the check would force a sync, so the copy always runs.)
    if dup is not None and (x.device.type != "cpu" or bool(dup.any())):
        new_state = {k: torch.where(_over(dup, v), state[k], v) for k, v in new_state.items()}
        surprise, score = torch.where(dup, 0.0, surprise), torch.where(dup, 0.0, score)
        is_anomaly, valid = is_anomaly & ~dup, valid & ~dup
        contributions = torch.where(dup[:, None], 0.0, contributions)
        nll = torch.where(dup[:, None], 0.0, nll)
        held = torch.where(dup, _DUPLICATE, held).to(torch.int8)
    return new_state, StepOutput(surprise, score, is_anomaly, contributions, valid, nll, view, held)


def wavefronts(slots: np.ndarray) -> list[np.ndarray]:
    """Split event indices into wavefronts: the k-th event of every slot, in input order.

    Vectorised: a stable sort by slot gives each event its rank within its stream; a stable
    sort by rank then lays the wavefronts out one after another.
    """
    n = len(slots)
    if n == 0:
        return []
    by_slot = np.argsort(slots, kind="stable")
    sorted_slots = slots[by_slot]
    starts = np.r_[True, sorted_slots[1:] != sorted_slots[:-1]]
    group_start = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
    rank = np.empty(n, dtype=np.int64)
    rank[by_slot] = np.arange(n) - group_start
    by_rank = np.argsort(rank, kind="stable")
    counts = np.bincount(rank)
    return np.split(by_rank, np.cumsum(counts)[:-1])


@dataclass
class BatchResult:
    """Host-side results for a batch, in input order."""

    surprise: np.ndarray  # float64 [N]
    score: np.ndarray  # float64 [N]
    is_anomaly: np.ndarray  # bool [N]
    contributions: np.ndarray  # float64 [N, F]
    valid: np.ndarray  # bool [N]
    view: np.ndarray  # int64 [N]: index into VIEWS of the view that decided the score
    held: np.ndarray  # int8 [N]: index into HELD of why an event at the threshold is not an anomaly
    wavefronts: int

    def top_feature(self, mask: np.ndarray) -> np.ndarray:
        """Index of the feature with the largest surprise per event, -1 where none scored."""
        contrib = np.where(mask & self.valid[:, None], self.contributions, -np.inf)
        top = contrib.argmax(axis=1)
        return np.where(np.isfinite(contrib.max(axis=1)), top, -1)


CPU_CHUNK = 8192


class Detector:
    """The model, its calibration settings and the state bank, on one device."""

    def __init__(
        self,
        model: StreamGRU,
        calibration: CalibrationConfig | None = None,
        device: str | torch.device = "cpu",
        capacity: int = 1024,
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.calibration = calibration or CalibrationConfig(threshold=TAIL_THRESHOLD)
        self.bank = StateBank(model.config, self.device, capacity)

    def swap_model(self, model: StreamGRU) -> bool:
        """Serve a new model. Returns True when every stream's state was kept (same
        architecture: the hidden states mean the same to the new weights' shapes), False when the
        bank was rebuilt empty for a different architecture."""
        model = model.to(self.device).eval()
        same = model.config == self.model.config
        # Everything that can fail (allocation included) before anything is replaced: a failed
        # swap leaves the detector serving the old model with its states.
        bank = self.bank if same else StateBank(model.config, self.device, self.bank.capacity)
        self.model, self.bank = model, bank
        return same

    @property
    def max_features(self) -> int:
        return self.model.config.max_features

    @torch.no_grad()
    def process(
        self, slots: np.ndarray, x: np.ndarray, mask: np.ndarray, ts_ms: np.ndarray | None = None, stamps: np.ndarray | None = None
    ) -> BatchResult:
        """Step every event once, in order per slot. slots: int [N]; x: float [N, F]; mask: bool
        [N, F]; ts_ms: int [N] event times in epoch milliseconds (None: no time of day); stamps:
        int [N] each event's delivery stamp, -1 where it has none (the daemon's: the Kafka
        record's timestamp; None: no event is taken for a re-delivery, `duplicate`). Present
        values must be finite with magnitude <= MAX_ABS_VALUE (ValueError otherwise: one bad
        value would corrupt its stream's state, and the caller knows which event it was)."""
        present = np.asarray(x)[np.asarray(mask, dtype=bool)]
        if present.size and not np.abs(present).max() <= MAX_ABS_VALUE:  # (also catches NaN)
            raise ValueError(f"readings must be finite with magnitude <= {MAX_ABS_VALUE:g}")
        n = len(slots)
        f = self.max_features
        dev = self.device
        out_surprise = torch.zeros(n, dtype=torch.float64, device=dev)
        out_score = torch.zeros(n, dtype=torch.float64, device=dev)
        out_anom = torch.zeros(n, dtype=torch.bool, device=dev)
        out_contrib = torch.zeros((n, f), dtype=torch.float64, device=dev)
        out_valid = torch.zeros(n, dtype=torch.bool, device=dev)
        out_view = torch.zeros(n, dtype=torch.int64, device=dev)
        out_held = torch.zeros(n, dtype=torch.int8, device=dev)
        if n == 0:
            return BatchResult(
                np.zeros(0),
                np.zeros(0),
                np.zeros(0, bool),
                np.zeros((0, f), np.float64),
                np.zeros(0, bool),
                np.zeros(0, np.int64),
                np.zeros(0, np.int8),
                0,
            )
        self.bank.ensure_capacity(int(slots.max()) + 1)
        x_dev = torch.as_tensor(x, dtype=torch.float64).to(dev, non_blocking=True)
        mask_dev = torch.as_tensor(mask, dtype=torch.bool).to(dev, non_blocking=True)
        slots_dev = torch.as_tensor(slots, dtype=torch.int64).to(dev, non_blocking=True)
        ts = np.zeros(n, dtype=np.int64) if ts_ms is None else np.asarray(ts_ms, dtype=np.int64)
        ts_dev = torch.as_tensor(ts).to(dev, non_blocking=True)
        stamps_dev = None if stamps is None else torch.as_tensor(np.asarray(stamps, dtype=np.int64)).to(dev, non_blocking=True)
        waves = wavefronts(np.asarray(slots))
        if dev.type == "cpu":
            # Rows of one wavefront are independent; on CPU, cache-sized pieces run faster than
            # one huge GRU call (and bound the temporaries' memory).
            pieces = [w[i : i + CPU_CHUNK] for w in waves for i in range(0, len(w), CPU_CHUNK)]
        else:
            pieces = waves
        for wave in pieces:
            idx = torch.as_tensor(wave).to(dev, non_blocking=True)
            rows = slots_dev[idx]
            wave_ts = None if ts_ms is None else ts_dev[idx]  # (untimed: the profile is a local level)
            wave_stamp = None if stamps_dev is None else stamps_dev[idx]
            new_state, out = advance(self.model, self.calibration, self.bank.gather(rows), x_dev[idx], mask_dev[idx], wave_ts, wave_stamp)
            self.bank.scatter(rows, new_state)
            out_surprise[idx] = out.surprise
            out_score[idx] = out.score
            out_anom[idx] = out.is_anomaly
            out_contrib[idx] = out.contributions
            out_valid[idx] = out.valid
            out_view[idx] = out.view
            out_held[idx] = out.held
        return BatchResult(
            out_surprise.cpu().numpy(),
            out_score.cpu().numpy(),
            out_anom.cpu().numpy(),
            out_contrib.cpu().numpy(),
            out_valid.cpu().numpy(),
            out_view.cpu().numpy(),
            out_held.cpu().numpy(),
            len(waves),
        )
