"""Online adaptation: what each stream learns about itself after pretraining.

The pretrained GRU knows generic dynamics (trends, noise, short cycles) but only 32 numbers of
memory per feature, so it cannot hold a day's shape, and it cannot know whether a given stream
is better predicted by its recent past or by what it usually does at this hour. Two small
per-stream learners fill that gap, both updated online and both skipping events the stream has
just flagged (learning an anomaly would teach the stream to stop seeing it):

* a time-of-day profile: per feature, an exponentially weighted mean and variance for each hour
  of the (UTC) day, keyed by the event timestamp. It is the expectation "what this sensor reads
  at this hour", learned per event (so the faster a stream is sampled, the shorter its memory in
  days); a stream with no daily rhythm, or events without timestamps, degrade gracefully to a
  fast local level.
* a predictor mixture: per feature, the running mean squared error of the GRU's and the
  profile's predictions, weighted by inverse error, so each stream trusts whichever predictor
  has been right for it, plus the running variance of the mixed prediction's error.

A third statistic is not a predictor of normal behaviour but a description of the recent past:

* the recent level: per feature, the exponentially weighted mean and variance of the last ~30
  events (exact averages before that). It answers "is this reading outside what the stream did
  lately", which neither learner above asks: the GRU's one-step prediction follows a change
  within a few events, and the profile's hour may have learned a wide spread. It learns every
  event, flagged or not: after a spike its spread widens for a while, so the spike's own
  aftermath is not flagged again by this view.

A fourth looks at the recent past as a whole rather than at this event:

* the recent mean: per feature, an exponentially weighted mean of the last ~10 events before
  this one, compared with the stream's long-run mean and variance (the normaliser's, ~1,000
  events) in units of the noise such an average should have (an EWMA control chart). It
  answers "has the stream's average moved lately", which catches a sustained shift or a
  change of pattern whose single readings are each unremarkable. Like the learners above it
  skips flagged events, and it clips each reading (see `shift_update`), so a spike's aftermath
  does not look like a shift.

Everything is a tensor row in the state bank, so it is batched, saved and restored with the
hidden state. Pure torch; no Kafka.
"""

from __future__ import annotations

import torch

PROFILE_BINS = 24  # hours of the day
DAY_MS = 86_400_000
PROFILE_ALPHA = 0.1  # per event in that hour: with 5-minute data the profile is about the last day
MIX_ALPHA = 0.01  # error statistics follow the last ~100 events
LEVEL_ALPHA = 0.03  # the recent level follows the last ~30 events
SHIFT_ALPHA = 0.1  # the recent mean follows the last ~10 events
SHIFT_CLIP = 3.0  # a reading moves it as if it were at most this many long-run deviations away
# The profile view is scored once a stream has come back to this many hours of the day.
PROFILE_REVISITS = 2
# An event more than GAP_FACTOR times the stream's usual interval from the previous one comes
# after a gap; the usual interval (an upper level of the stream's intervals, see `gap_update`,
# moving down GAP_DOWN in log units per shorter interval) is trusted from GAP_AFTER intervals.
GAP_FACTOR = 12.0
GAP_DOWN = 0.05
GAP_UP_SHARE = 0.25
GAP_AFTER = 10
# The gap memory's state fields (models/state.py).
GAP_FIELDS = ("gap_last_ts", "gap_log", "gap_n")
# From this many readings of a feature on, its profile's start is settled: a reading stamped more
# than a day before it is a clock error and does not move it (see `profile_update`).
PROFILE_START_SETTLED = 3
PROFILE_VAR_SHARE = 0.001  # the profile's variance is never below 0.1% of the stream's variance
# The normaliser learns a reading as if it were at most this many deviations from its mean, once
# it rests on NORM_CLIP_AFTER readings (see `clip_around`).
NORM_CLIP = 20.0
NORM_CLIP_AFTER = 30


def averaging_rate(n: torch.Tensor, floor: float) -> torch.Tensor:
    """Weight of the next reading in a running average over n earlier ones: 1/(n+1) (the exact
    average, so a cold start is not remembered as if it were history) until that falls to
    `floor`, then an exponential window of about 1/floor events."""
    return torch.clamp(1.0 / (n + 1.0), min=floor)


def running_mean_var(
    mean: torch.Tensor, var: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, where: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance after x at rate alpha where `where` (exponentially weighted, exact for
    alpha = 1/(n+1)); unchanged elsewhere."""
    d = x - mean
    return torch.where(where, mean + alpha * d, mean), torch.where(where, (1.0 - alpha) * (var + alpha * d * d), var)


def clip_around(x: torch.Tensor, centre: torch.Tensor, spread: torch.Tensor, k: float, where: torch.Tensor) -> torch.Tensor:
    """x limited to centre +- k * spread where `where` (a winsorised update).

    Statistics that every reading updates are clipped so that one absurd reading cannot own
    them: unclipped, a glitch of 10^6 deviations multiplies the normaliser's variance by about
    10^9 and leaves the stream blind for tens of thousands of events, while a real change of
    level is made of many readings and still moves a clipped average (each one moves it by the
    clip, which grows with the spread it widens)."""
    return torch.where(where, torch.minimum(torch.maximum(x, centre - k * spread), centre + k * spread), x)


def hour_of_day(ts_ms: torch.Tensor) -> torch.Tensor:
    """[B] int64 epoch milliseconds to the profile bin of each event."""
    return torch.remainder(ts_ms, DAY_MS) * PROFILE_BINS // DAY_MS


def profile_lookup(
    state: dict[str, torch.Tensor], hour: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, floor_var: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expected value of each feature at this hour, its learned variance and the variance to
    score against (floored), [B, F] each. An hour never seen falls back to the stream's overall
    mean and variance (the normaliser's), so a new stream starts from its global level."""
    idx = hour[:, None, None].expand(-1, mean.shape[1], 1)
    seen = ((state["prof_seen"] >> hour[:, None]) & 1).bool()
    p_mean = torch.where(seen, state["prof_mean"].gather(2, idx).squeeze(2), mean)
    p_var = torch.where(seen, state["prof_var"].gather(2, idx).squeeze(2).double(), var)
    return p_mean, p_var, p_var + PROFILE_VAR_SHARE * var + floor_var


def profile_update(
    state: dict[str, torch.Tensor],
    ts_ms: torch.Tensor,
    hour: torch.Tensor,
    x: torch.Tensor,
    p_mean: torch.Tensor,
    p_var_raw: torch.Tensor,
    learn: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """New profile tensors after learning x at this hour where `learn` [B, F]."""
    idx = hour[:, None, None].expand(-1, x.shape[1], 1)
    d = x - p_mean
    m = torch.where(learn, p_mean + PROFILE_ALPHA * d, p_mean)
    v = torch.where(learn, (1.0 - PROFILE_ALPHA) * (p_var_raw + PROFILE_ALPHA * d * d), p_var_raw)
    seen = state["prof_seen"]
    one = torch.ones_like(seen)
    # A revisit: an hour the feature had learned, a day or more after the feature's first
    # reading (so at least the next day's same hour: every other hour's first visit ends within
    # the first day; a reading stamped before its predecessor is no revisit). The start is the
    # epoch hour of the first reading, valid where any hour is seen (a snapshot older than the
    # field has it at 0: long ago).
    now = torch.div(ts_ms, 3_600_000, rounding_mode="floor").clamp(-(2**31), 2**31 - 1)[:, None]
    # (The earliest reading, not the first: a first reading stamped a year ahead would otherwise
    # put every later reading "before the start" and no hour would ever count as revisited. Once
    # the start rests on a few readings, though, one stamped more than a day before it (a clock
    # reset to 1970, a stamp of 0) is the clock's error and does not move it: it made every hour
    # count as revisited at once: the second-day storm of tests/test_adapt.py came back.)
    old = state["prof_start"].long()
    settled = (state["norm_n"] >= PROFILE_START_SETTLED) & (now < old - PROFILE_BINS)
    start = torch.where(seen != 0, torch.where(settled, old, torch.minimum(old, now)), now)
    was_seen = ((seen >> hour[:, None]) & 1).bool()
    back = learn & was_seen & (now - start >= PROFILE_BINS)
    bit = torch.where(learn, one << hour[:, None], 0) | torch.where(back, one << (hour[:, None] + PROFILE_BINS), 0)
    return {
        "prof_mean": state["prof_mean"].scatter(2, idx, m.unsqueeze(2)),
        "prof_var": state["prof_var"].scatter(2, idx, v.to(state["prof_var"].dtype).unsqueeze(2)),
        "prof_seen": seen | bit,
        "prof_start": torch.where(learn, start, state["prof_start"].long()).to(state["prof_start"].dtype),
    }


def profile_scored(state: dict[str, torch.Tensor], hours: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """[B, F] whether each feature's profile error is scored: once the feature has come back to
    PROFILE_REVISITS hours of the day it had learned before (or to every hour it knows, for a
    stream read once a day), a day or more after its first reading.

    On its first day a stream's profile holds, for each hour, the readings of that hour alone
    (with 1-minute data, the last ~10 of them): its spread says nothing about how different the
    same hour is from one day to the next. The first revisits then measured that difference
    against the within-hour spread, and against a calibration history that had never seen such
    a comparison: a stream with no daily rhythm (a random walk, a slow cycle) was flagged with
    scores of 1.0 about a day after it started, every stream of a fleet at once. The view's
    history still learns from the first event on, so by the time it is scored it has seen a
    couple of hours of revisits. A feature that joins a stream later is scored in the view from
    its own second day (and one that stopped reporting on its first day never is, without
    holding the stream's other features back). `hours`: `profile_hours(state)`, where the caller
    has it already."""
    known, revisited = profile_hours(state) if hours is None else hours
    return (state["prof_seen"] != 0) & (revisited >= torch.clamp(known, max=PROFILE_REVISITS))


def profile_hours(state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, F] each, the hours of the day each feature's profile has learned and has revisited."""
    seen = state["prof_seen"]
    shifts = torch.arange(2 * PROFILE_BINS, device=seen.device)
    bits = (seen[..., None] >> shifts) & 1  # [B, F, 48]
    return bits[..., :PROFILE_BINS].sum(dim=-1), bits[..., PROFILE_BINS:].sum(dim=-1)


def mix(state: dict[str, torch.Tensor], errors: torch.Tensor, has_pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mixed prediction error and its squared standardised value per feature.

    errors: [B, F, P] float64, the errors (x - prediction) of the P predictors. Returns the mixed
    error r [B, F], r^2 / variance [B, F] and whether the mixture was ready to score ([B, F]:
    the first prediction only initialises it)."""
    ready = has_pred & (state["mix_var"] > 0)
    w = 1.0 / state["mix_mse"].clamp(min=1e-300)
    w = w / w.sum(dim=2, keepdim=True)
    r = (w * errors).sum(dim=2)
    q = torch.where(ready, r * r / state["mix_var"].clamp(min=1e-300), torch.zeros_like(r))
    return r, q, ready


def mix_update(
    state: dict[str, torch.Tensor],
    errors: torch.Tensor,
    r: torch.Tensor,
    floor_var: torch.Tensor,
    ready: torch.Tensor,
    has_pred: torch.Tensor,
    learn: torch.Tensor,
    n: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The error statistics after this event. n [B, F]: the feature's events before this one.
    Until 1/MIX_ALPHA events they are plain averages since the first prediction: an
    exponential average would remember the cold start's errors (made before the normaliser and
    profile knew the stream's level) for hundreds of events and understate every surprise."""
    e2 = errors * errors + floor_var.unsqueeze(2)
    # (Not from a flagged event either: a feature whose first prediction met an outage kept the
    # outage's error as its mixture variance, 300 events on 10 times a normal start's.)
    first = has_pred & ~ready & learn
    step = ready & learn
    alpha = averaging_rate((n - 2.0).clamp(min=0.0), MIX_ALPHA)  # the first prediction comes with the third event
    mse = torch.where(first.unsqueeze(2), e2, state["mix_mse"])
    mse = torch.where(step.unsqueeze(2), (1.0 - alpha.unsqueeze(2)) * mse + alpha.unsqueeze(2) * e2, mse)
    var = torch.where(first, e2.mean(dim=2), state["mix_var"])
    var = torch.where(step, (1.0 - alpha) * var + alpha * (r * r + floor_var), var)
    return {"mix_mse": mse, "mix_var": var}


def level_q(state: dict[str, torch.Tensor], x: torch.Tensor, mask: torch.Tensor, n: torch.Tensor, floor_var: torch.Tensor) -> torch.Tensor:
    """Squared distance of x from the stream's recent level, in units of its recent spread [B, F];
    0 where the feature is absent or has fewer than two earlier events to make a level of."""
    ready = mask & (n >= 2)
    d = x - state["lvl_mean"]
    return torch.where(ready, d * d / (state["lvl_var"] + floor_var), torch.zeros_like(d))


def level_update(
    state: dict[str, torch.Tensor], x: torch.Tensor, n: torch.Tensor, learn: torch.Tensor, restart: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """The recent level after x where `learn`: exact averages for the first 1/LEVEL_ALPHA events;
    where `restart` (after a gap) the mean is x itself and the spread is kept."""
    m, v = running_mean_var(state["lvl_mean"], state["lvl_var"], x, averaging_rate(n, LEVEL_ALPHA), learn)
    if restart is not None:
        m = torch.where(restart, x, m)
    return {"lvl_mean": m, "lvl_var": v}


def shift_q(
    state: dict[str, torch.Tensor], mask: torch.Tensor, n: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, floor_var: torch.Tensor
) -> torch.Tensor:
    """Squared distance of the recent mean (events before this one) from the long-run mean
    `mean`, in units of the standard deviation an average over ~1/SHIFT_ALPHA independent
    readings of variance `var` would have [B, F]; 0 where absent or before two events."""
    ready = mask & (n >= 2)
    d = state["shift_mean"] - mean
    return torch.where(ready, d * d / (var * (SHIFT_ALPHA / (2.0 - SHIFT_ALPHA)) + floor_var), torch.zeros_like(d))


def shift_update(
    state: dict[str, torch.Tensor], x: torch.Tensor, n: torch.Tensor, learn: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The recent mean after x where `learn`: exact averages for the first 1/SHIFT_ALPHA events.

    Each reading enters clipped to the long-run mean +- SHIFT_CLIP long-run standard deviations
    (`mean`, `std`; from the third event on), so one spike that was not flagged moves the recent
    mean by a fraction of a deviation instead of making the next ~10 ordinary readings look like
    a shift; a real shift is made of many readings and moves it all the same."""
    alpha = averaging_rate(n, SHIFT_ALPHA)
    x = clip_around(x, mean, std, SHIFT_CLIP, n >= 2)
    return {"shift_mean": torch.where(learn, state["shift_mean"] + alpha * (x - state["shift_mean"]), state["shift_mean"])}


def gap(state: dict[str, torch.Tensor], ts_ms: torch.Tensor) -> torch.Tensor:
    """bool [B]: this event comes after a gap: its stamp is more than GAP_FACTOR times the
    stream's usual interval from the previous event's (either way: a sensor back after hours
    offline, a reading that much late, the on-time reading after one, a stamp a year ahead and
    the reading after it), once GAP_AFTER intervals have set the usual one. The views of the
    recent past say nothing then: a sensor back after five hours at a normal reading for its
    hour was flagged for being far from where it stood five hours before."""
    last = state["gap_last_ts"]
    dt = (ts_ms - last).abs().double()
    usual = torch.exp(state["gap_log"])
    return (state["gap_n"] >= GAP_AFTER) & (dt > GAP_FACTOR * usual)


def gap_update(state: dict[str, torch.Tensor], ts_ms: torch.Tensor, after_gap: torch.Tensor) -> dict[str, torch.Tensor]:
    """The previous event's stamp and the usual interval after this event.

    The usual interval is an upper level of the stream's intervals, not their mean: a log value
    that moves halfway up to a longer interval and GAP_DOWN down per shorter one. Devices that
    send each feature as its own event a few ms apart, or gateways that flush buffers, have
    intervals of milliseconds between their real ones; a mean of them made every real interval
    a gap. A gap moves it up a quarter of the way only, so one outage does not hide the next for
    long, while a stream that really slowed down, or whose first intervals were a burst (a
    buffer flushed on connect, features a few ms apart), climbs out within a few readings: moved
    up by a fixed step, a stream of 4 features sent 2 ms apart stayed "after a gap" for good.
    Equal or earlier stamps (no timestamps, duplicates, a late reading) teach nothing."""
    last = state["gap_last_ts"]
    dt = (ts_ms - last).double()
    n = state["gap_n"]
    known = (n > 0) | (last != 0)  # (the first event has no interval: last is its own stamp then)
    step = known & (dt > 0)
    lg = torch.log(dt.clamp(min=1.0))
    old = state["gap_log"]
    moved = torch.where(lg > old, old + 0.5 * (lg - old), old - GAP_DOWN)
    moved = torch.where(after_gap, old + GAP_UP_SHARE * (lg - old), moved)
    new = torch.where(n == 0, lg, moved)
    return {
        "gap_last_ts": ts_ms,
        "gap_log": torch.where(step, new, old),
        "gap_n": torch.where(step, (n + 1).clamp(max=GAP_AFTER), n),
    }
