"""Calibration: surprise to a score in [0, 1] that means the same on every stream.

A stream's raw surprise depends on how predictable it is and how many features it has, so a
global threshold on it would flag noisy streams forever and quiet ones never. Every score is
therefore a tail probability p under the stream's own history, put on a log scale:
score = -log10(p) / decades, capped at 1 (0.5 = one in a thousand with the default 6 decades).
Sensor streams get p from decayed histograms of their own surprise (`tail_log10_p`); log
streams from a moment fit (models/logs/calibration.py). The calibrator's state is part of the
stream's state, saved and restored with its hidden state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CalibrationConfig:
    """Per-stream decision settings; not part of the weights, set from config.yaml."""

    warmup: int = 100  # events per stream before anything may be flagged
    threshold: float = 0.5  # is_anomaly at or above this score; 0.5 is p <= 1e-3
    decades: float = 6.0  # score = -log10(tail probability) / decades, capped at 1
    # Moment-based calibrator of log streams (models/logs/calibration.py).
    alpha: float = 0.005  # exponential window of its statistics (~200 events)
    winsor: float = 25.0  # cap on one event's statistic, in multiples of the stream's mean
    # Empirical tail calibrator (sensor streams): a decayed histogram of log-surprise.
    window: int = 1000  # events of history the histogram remembers (exponential decay)
    long_window: int = 5000  # ...and the second, long-memory histogram of every view
    tail_slope: float = 3.0  # beyond the largest surprise seen: p falls as q^-tail_slope
    flagged_weight: float = 0.1  # a flagged event counts this much in the surprise history (more after recent runs of flags)
    flagged_reach: int = 8  # ...and is recorded at most this many bins above the history's top
    # For `holdoff` events after an alert, an event no more surprising than the alert scores
    # `holdoff_factor` times its score (at most 0.4: below the default threshold): one alert per
    # episode, not one per aftershock.
    holdoff: int = 30
    holdoff_factor: float = 0.4
    # An event flagged in an hour of the day that had flags on each of the `recur_days` days
    # before is a recurrence (a nightly job), reported like an aftershock unless it scores more
    # than `recur_margin` decades above them (models/recurrence.py). 0 turns this off.
    recur_days: int = 2
    recur_margin: float = 1.0
    # An event identical to its stream's previous one (same time, same features, same readings) is
    # a re-delivery (an at-least-once producer retrying), not a second reading: it is reported
    # held as a duplicate and does not advance the stream (models/detector.py `duplicate`).
    skip_duplicates: bool = True

    def __post_init__(self) -> None:
        if self.warmup < 0:
            raise ValueError("warmup must be >= 0")
        if self.decades <= 0:
            raise ValueError("decades must be > 0")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError("threshold must be in (0, 1]")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError("alpha must be in (0, 1)")
        if self.window < 2:
            raise ValueError("window must be >= 2")
        if self.long_window < self.window:
            raise ValueError("long_window must be >= window")
        if not 0.0 < self.flagged_weight <= 1.0:
            raise ValueError("flagged_weight must be in (0, 1]")
        if self.flagged_reach < 0:
            raise ValueError("flagged_reach must be >= 0")
        if self.holdoff < 0:
            raise ValueError("holdoff must be >= 0")
        if not 0.0 < self.holdoff_factor <= 1.0:
            raise ValueError("holdoff_factor must be in (0, 1]")
        if self.recur_days < 0:
            raise ValueError("recur_days must be >= 0")
        if self.recur_margin < 0:
            raise ValueError("recur_margin must be >= 0")


TAIL_THRESHOLD = 0.5

# Histogram over ln(q): 64 bins of 0.375 from e^-12 to e^12 cover every surprise that matters;
# anything outside lands in the end bins.
HIST_BINS = 64
HIST_LO = -12.0
HIST_HI = 12.0
HIST_PRIOR = 1.0
# A bin is part of the history while it holds at least this share of one event: a decayed trace
# of an old spike (a flagged one at 1/10 weight falls below it ~2,300 events later) no longer
# sets the top from which the tail is extrapolated, so one glitch does not cap later scores.
HIST_OCCUPIED = 0.01


# The views of the recent past keep an episode out of their long histories: its flagged events
# and its tail, the events after its last flag while the model, the recent level and the recent
# mean catch up with a new level or a burst dies down (models/detector.py `advance`): at most
# EPISODE_TAIL of them, ending with the first calm one (a scored event under TAIL_CALM; by the
# calibration's bound at most one ordinary event in four scores more, 9-18% on anomaly-free
# streams). Without the calm end, a busy stream's next spike 20 events after a flagged one was a
# tail's, and its large surprise (the model not yet used to such spikes) was what kept the
# stream's habitual spike from being news after a quiet spell (the README, under calibration).
# A level shift's tail on a wandering sensor turns calm 4-7 events in, past its largest
# surprises, which are what set the long history's top (a review). A shift in two steps whose
# second is not flagged (+10, then +10 again 10-20 events later) lets the second step's tail in
# again, as before tails were skipped.
EPISODE_TAIL = 30
TAIL_CALM = 0.1


def _top_bin(h: torch.Tensor) -> torch.Tensor:
    """Highest bin of each history holding at least HIST_OCCUPIED, -1 where none does."""
    # (In uint8: with thousands of streams the histograms are most of the step's memory traffic.)
    rank = torch.arange(1, HIST_BINS + 1, dtype=torch.uint8, device=h.device)
    return ((h >= HIST_OCCUPIED) * rank).amax(dim=-1).long() - 1


def tail_log10_p(cfg: CalibrationConfig, sq: torch.Tensor, hist: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-log10 P(a surprise at least this large) under the stream's own decayed history.

    Model-based tails (chi-square, gamma) are wrong for real streams, whose surprise is a
    mixture: a perfectly regular series is calm for hours and then surprising at every daily
    transition. A histogram of the stream's own log-surprise learns such a mixture, so a
    transition seen a few times stops being flagged. Beyond the largest surprise in the
    history, the tail is extrapolated as a power law in q, which is what puts a spike an order
    of magnitude above anything seen before far into the tail.

    sq: float64 [...] a non-negative surprise statistic; hist: float32 [..., HIST_BINS] decayed
    counts (any leading shape, so several views of a batch are ranked in one call). Returns
    (-log10 p [...], the bin of each sq [...], each history's top bin [...]) for `learn_tail`.
    """
    width = (HIST_HI - HIST_LO) / HIST_BINS
    lq = torch.log(sq.clamp(min=1e-30))
    b = _bin_of_log(lq)
    # Count above the event's bin plus half its own: a masked sum of positive counts, so float32
    # loses nothing to cancellation (a cumulative sum minus the total would), and it reads the
    # histograms fewer times than a cumsum in float64 did (this was half of a 100,000-stream step).
    here = hist.gather(-1, b[..., None]).squeeze(-1)
    beyond = torch.arange(HIST_BINS, device=hist.device) > b[..., None]
    above = (torch.where(beyond, hist, 0.0).sum(dim=-1) + 0.5 * here).double()
    total = hist.sum(dim=-1).double()
    log_norm = torch.log(total + 2 * HIST_PRIOR)
    # The prior's pseudo-event sits beyond everything seen: a power-law tail from the upper edge
    # of the highest occupied bin. Added to the history's own count (not used only where that
    # count is zero), it also ranks events in the open-ended last bin, which would otherwise cap
    # every surprise above e^HIST_HI at one p once the stream has had one such event.
    top = _top_bin(hist)
    top_edge = HIST_LO + (top + 1).double() * width
    excess = torch.where(top >= 0, (lq - top_edge).clamp(min=0.0), 0.0)
    log_tail = math.log(HIST_PRIOR) - cfg.tail_slope * excess
    log_p = torch.logaddexp(torch.log(above.clamp(min=0.0)), log_tail) - log_norm
    return -log_p / math.log(10.0), b, top


def hist_bin(sq: torch.Tensor) -> torch.Tensor:
    """The histogram bin of each statistic (log-spaced from e^HIST_LO to e^HIST_HI)."""
    return _bin_of_log(torch.log(sq.clamp(min=1e-30)))


def _bin_of_log(lq: torch.Tensor) -> torch.Tensor:
    width = (HIST_HI - HIST_LO) / HIST_BINS
    return ((lq - HIST_LO) / width).floor().clamp(0, HIST_BINS - 1).long()


def learn_tail(
    cfg: CalibrationConfig,
    hist: torch.Tensor,
    b: torch.Tensor,
    weight: torch.Tensor,
    capped: torch.Tensor,
    top: torch.Tensor,
    window: torch.Tensor | None = None,
) -> torch.Tensor:
    """The histograms [..., HIST_BINS] after adding bin b [...] with `weight` [...] in [0, 1]
    (older counts decay first, by as much as `weight` events would decay them, over `window`
    [...] events: cfg.window where None).

    Where `capped` [...] (flagged events: `reach_capped`), the event is recorded at most
    `flagged_reach` bins above the history's top (`top` [...], as `tail_log10_p` found it; 8 bins:
    a factor of e^3 in surprise). The history learns that something far beyond its range
    happened, not how far: recorded at its full size, one enormous glitch would sit above every
    later anomaly of ordinary size and cap their scores for as long as it is remembered."""
    b = torch.where(capped & (top >= 0), torch.minimum(b, top + cfg.flagged_reach), b)
    w = torch.as_tensor(float(cfg.window) if window is None else window, dtype=hist.dtype, device=hist.device)
    decay = (1.0 - 1.0 / w) ** weight.to(hist.dtype)
    new = hist * decay[..., None]
    return new.scatter_add_(-1, b[..., None], weight.to(new.dtype)[..., None])


def tail_weight(
    cfg: CalibrationConfig, steps: torch.Tensor, valid: torch.Tensor, flagged: torch.Tensor, onset: torch.Tensor, onsets: torch.Tensor
) -> torch.Tensor:
    """How much each event counts in its stream's surprise history.

    Nothing during the first half of warm-up: while a stream's statistics rest on a handful of
    readings every glitch is an enormous surprise, and a history holding it would hide the
    stream's first real anomalies for a whole window. The second half of warm-up gives the
    history some events to judge the first flags against.

    Flagged events count at `flagged_weight`, not 0: a lasting change (a new level, a new noise
    regime) must become the new normal, and a flagged event in the history is enough to stop
    flagging its like. Not 1 either: an outage should not widen the history as much as a
    normal event does.

    Unless the stream keeps being flagged: `onsets` [...] is how many runs of flagged events
    (not recurrences) began in its last ~window events (decayed, before this one), and the
    first event of a run (`onset` [...]: flagged, the previous event not) counts
    flagged_weight^(1 / (1 + onsets)): 0.1, then 0.32, 0.46, 0.56... after one, two, three
    recent onsets. A stream flagged afresh several times per window is beyond the rate its
    threshold promises, so its history is not learning what it keeps seeing. That happened on
    sparse 0/1 streams (an error flag): each one comes after a quiet spell that shrank every
    view's spread, often lies beyond the history's top, and at a tenth of its weight the history
    took a dozen ones to learn their like, flagging most ones meanwhile
    (`tests/test_calibration.py -k sparse_event`). The rest of a run counts a tenth whatever came
    before: counted with their own onset, a glitch of a few readings left a trace at 0.32 that
    hid a spike 3,000 events later (`tests/test_adapt.py -k outage`). So does, in each history,
    a run's first event far beyond both its top and the last run's first (`run_weight`: a
    glitch). (Runs, not alerts: the hold-off changes what is reported, never what a stream
    learns.)
    """
    fw = torch.where(onset, cfg.flagged_weight ** (1.0 / (1.0 + onsets.double())), cfg.flagged_weight)
    w = torch.where(flagged, fw, 1.0)
    return torch.where(valid & (steps >= cfg.warmup // 2), w, 0.0).double()


def reach_capped(
    cfg: CalibrationConfig, flagged: torch.Tensor, onset: torch.Tensor, onsets: torch.Tensor, b: torch.Tensor, last: torch.Tensor
) -> torch.Tensor:
    """Which events `learn_tail` records at most `flagged_reach` bins above their history's top
    [..., K]: every flagged event (flagged [...]) but the first of a run of flags (`onset` [...],
    as in `tail_weight`) on a stream that began about two runs or more in its last ~window events
    (`onsets` [...] >= 1, decayed and before this one: two runs within ~700 events do it), when
    its bin b [..., K] is no more than `flagged_reach` above the bin of the last run's first event
    in that history (`last` [..., K], `onset_bins`: at its own size, where it lay beyond the
    history's top; 0, none, where it lay within or there was none).

    The cap keeps one enormous glitch from capping every later anomaly's score. A stream flagged
    afresh again and again, each time about as far out, is past the rate its threshold promises
    (about one run a window at the default) and is showing its own range, which, capped, its
    history learned only 8 bins a flag at a time: a 0/1 error flag whose ones come one event in
    300 measures each one against a spread that shrank while it was quiet, far beyond the
    history's top, and took about five flagged ones per view to raise the top to them, each
    scored 1.0 (p <= 1e-6 for a one-in-300 event) on the way. Recording such a run's first event
    at its own size cut those flags from 1.72 to 1.30 per 1,000 events and (when it was made) on three such
    features from 1.32 to 0.45 (`tests/test_calibration.py -k sparse_event`). A glitch far beyond
    the stream's earlier flags stays capped: uncapped on a stream with two recent alerts, a
    1e12-sigma glitch hid 200-sigma spikes for thousands of events (`tests/test_adapt.py -k
    alerted_lately`). After a single earlier run it is not enough to say the stream does this:
    lifting the cap there cost 1.25 NAB points (the NAB command in the README with `onsets >= 0.6`
    here, before the size check); the rest of a run stays capped, as it stays at a tenth's weight."""
    lifted = (onset & (onsets >= 1.0))[..., None] & (b <= last.long() + cfg.flagged_reach)
    return flagged[..., None] & ~lifted


def run_weight(
    cfg: CalibrationConfig, weight: torch.Tensor, onset: torch.Tensor, b: torch.Tensor, top: torch.Tensor, last: torch.Tensor
) -> torch.Tensor:
    """Each history's weight [..., K] for the event `tail_weight` weighs weight [...]: a run's
    first flag (onset [...]) whose bin b [..., K] lies more than `flagged_reach` beyond both the
    history's top [..., K] and the last run's first (`last` [..., K], as in `reach_capped`)
    counts `flagged_weight`, as on a stream's first run, however many runs came before it. The
    faster learning is for a stream that keeps going about as far out, not for a glitch beyond
    everything it did: on a stream with two recent alerts a 1e12-sigma glitch counted 0.46, and
    its capped record outlasted 3,000 events and held 40- and 80-sigma spikes at 0.40 there
    (`tests/test_adapt.py -k later_spikes`)."""
    far = onset[..., None] & (b > torch.maximum(top, last.long()) + cfg.flagged_reach)
    return torch.where(far, cfg.flagged_weight, weight[..., None].to(torch.float64))


def onset_bins(
    onset: torch.Tensor, learns: torch.Tensor, b: torch.Tensor, top: torch.Tensor, last: torch.Tensor, keep_within: bool
) -> torch.Tensor:
    """`last` [..., K] (int8) after a run's first event (onset [...]) in the histories that learn
    it (learns [..., K]): its own bin b [..., K] where it lay beyond their top [..., K], what
    `reach_capped` compares the next run with; 0 (none) where it lay within, so that a glitch's
    bin does not outlive the runs after it: kept, after a glitch and a run inside the range the
    glitch's capped record made, a second glitch was recorded at its size and hid 200-sigma
    spikes (`tests/test_adapt.py -k glitch_twice`). `keep_within` keeps the last bin there
    instead: for the per-feature histories, where an event flagged for one feature is a run's
    first event for all (on a stream of three 0/1 flags, the zeros of the two that did not move
    would reset theirs)."""
    beyond = onset[..., None] & learns & (b > top)
    within = onset[..., None] & learns & (b <= top) & (not keep_within)
    return torch.where(beyond, b.to(last.dtype), torch.where(within, torch.zeros_like(last), last))


def combine_scores(cfg: CalibrationConfig, log10_p: torch.Tensor, valid: torch.Tensor, applies: torch.Tensor) -> torch.Tensor:
    """One score from several tail probabilities of the same event, log10_p [B, K] (Bonferroni:
    the smallest p times the number of tests), so adding a detector does not add false positives.
    applies [B, K]: which tests the event had; only those count. Not capped at 1: the score is
    min(1, this), and what lies above 1 still tells a larger anomaly from a smaller one."""
    k = applies.sum(dim=-1).clamp(min=1).to(log10_p.dtype)
    lp = torch.where(applies, log10_p, -math.inf).max(dim=-1).values - torch.log10(k)
    return torch.where(valid & applies.any(dim=-1), (lp / cfg.decades).clamp(min=0.0), torch.zeros_like(lp))


def half_warmup(cfg: CalibrationConfig) -> int:
    """Events a view's history must hold before views that start later than their stream (the
    correlation view, the per-feature view, the repeat view) apply: half a warm-up, not while a
    few events make every new one look extreme. (Capped at half a window: a decayed history's
    mass never reaches more than ~window.)"""
    return min(cfg.warmup, cfg.window) // 2


def holds_half_warmup(cfg: CalibrationConfig, hist: torch.Tensor) -> torch.Tensor:
    """Whether each history [..., HIST_BINS] holds `half_warmup` events."""
    return hist.sum(dim=-1) >= half_warmup(cfg)


def feature_log10_p(
    cfg: CalibrationConfig, q: torch.Tensor, hist: torch.Tensor, usable: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-feature view: each feature's prediction error q [B, K] ranked against that
    feature's own history hist [B, K, HIST_BINS], for streams of two or more features.

    The other views rank a sum over features against one history per view, so that history's
    tail is the noisiest feature's: beside a heavy-tailed sensor, an 8-deviation spike in a quiet
    one was flagged 0 times in 20 (95% beside a Gaussian one). Here each feature is judged by
    its own tail, and the smallest p times the number of features judged (Bonferroni) is the
    view's p. usable [B, K]: features that have an error this event. The view applies where two
    or more of them have histories holding half a warm-up (a single-feature stream never uses
    it: its one feature is the prediction view already). Only the event's own features count:
    counting every feature the stream ever had made the view apply to a stream whose second
    sensor died long ago, and made a stream's scores depend on which other streams shared its
    batch (K is the batch's width on CPU).

    Returns (-log10 p of the view [B], whether it applies [B], each feature's -log10 p [B, K]
    (0 where not judged: the record's contributions), bins [B, K] and tops [B, K] for
    `learn_tail`)."""
    lp, b, top = tail_log10_p(cfg, q, hist)
    judged = usable & holds_half_warmup(cfg, hist)
    n = judged.sum(dim=1)
    applies = n >= 2
    parts = torch.where(judged, lp, 0.0)
    view = torch.where(judged, lp, -math.inf).amax(dim=1) - torch.log10(n.clamp(min=1).to(lp.dtype))
    return torch.where(applies, view, 0.0), applies, parts.clamp(min=0.0), b, top
