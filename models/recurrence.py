"""Recurring events: something flagged at the same hour on each of the last days is expected.

A nightly job, a daily batch load or a backup is an anomaly the first night and routine by the
third. The calibration histories cannot learn it at every sampling rate: they count events, not
days, and a flagged event's trace in them lasts ~2,300 events, which is eight days at 5-minute
readings but less than one at 30-second readings. So each stream also remembers, for every UTC
hour of the day, the last day something was flagged in that hour, how many consecutive days up
to it had a flag there, and the largest score flagged there that day. An event flagged in an
hour (or next to one: jobs drift, and DST moves a local-time job by an hour in UTC) that had
flags on each of the `recur_days` days before it, and whose uncapped score is no more than
`recur_margin` decades of tail probability above that day's largest, is a recurrence: it is
reported like an aftershock of an alert, not as news.

Keyed by the event's own timestamp (the daemon falls back to the Kafka record's): without
timestamps every event is at midnight of day 0 and nothing ever recurs. Only daily recurrence
is recognised (a weekly job is seven days apart and is not).
"""

from __future__ import annotations

import torch

from models.adapt import DAY_MS, PROFILE_BINS, hour_of_day

# Neighbouring hours count as the same slot: a job that starts at 01:58 one night and 02:03
# the next is the same job.
_REACH = 1  # hours either side
# The memory's state fields (models/state.py).
RECUR_FIELDS = ("recur_day", "recur_run", "recur_peak")
# The state keeps days in int32 (about 5.9 million years either side of 1970); the daemon
# accepts any int64 millisecond timestamp, so days beyond are clamped (one side of a day, not
# wrapped into a random one).
_DAY_LIMIT = 2**31 - 2
# A slot's last flagged day further ahead of a flagged event than this was stamped by a clock
# that was wrong; later data may arrive a few days late, but not a week.
_SKEW_DAYS = 7


def _day(ts_ms: torch.Tensor) -> torch.Tensor:
    return torch.div(ts_ms, DAY_MS, rounding_mode="floor").clamp(-_DAY_LIMIT, _DAY_LIMIT)


def _slots(ts_ms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The hour slots [B, 3] of an event (its hour and its neighbours) and the UTC day [B, 3] that
    each slot's hour falls on around the event: 23:00 next to a 00:10 event is the previous day's,
    so that a midnight job that runs at 23:59 one night and 00:01 the next is one job."""
    hour = hour_of_day(ts_ms)[:, None] + torch.arange(-_REACH, _REACH + 1, device=ts_ms.device)  # (arange: no host copy)
    day = _day(ts_ms)[:, None] + torch.div(hour, PROFILE_BINS, rounding_mode="floor")
    return torch.remainder(hour, PROFILE_BINS), day


def recurrence(state: dict[str, torch.Tensor], ts_ms: torch.Tensor, level: torch.Tensor, days: int, margin: float) -> torch.Tensor:
    """bool [B]: the event recurs: its hour had a flag on each of the `days` days before today,
    and its `level` (the uncapped score) is at most `margin` above the largest flagged on the
    slot's last day. (The last day's, not the run's: the first nights are scored against a
    history that had never seen the job, and would let anything through later.)"""
    if days <= 0:
        return torch.zeros_like(level, dtype=torch.bool)
    slots, day = _slots(ts_ms)
    last = state["recur_day"].gather(1, slots).long()
    run = state["recur_run"].gather(1, slots).long()
    peak = state["recur_peak"].gather(1, slots)
    # Consecutive days before today with a flag in this slot: the run as of its last day, less
    # today where today is that day.
    before = torch.where(last == day - 1, run, torch.where(last == day, run - 1, 0))
    return ((before >= days) & (level[:, None] <= peak + margin)).any(dim=1)


def recurrence_update(
    state: dict[str, torch.Tensor], ts_ms: torch.Tensor, level: torch.Tensor, flagged: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The memory after the events `flagged` [B] (recurrences included, so a run of days goes
    on while its events are no longer reported): a flag on the day after the slot's last one
    extends the run, one on a later day starts a new run. Only the event's own hour is marked."""
    day = _day(ts_ms)
    hour = hour_of_day(ts_ms)[:, None]
    last = state["recur_day"].gather(1, hour).squeeze(1).long()
    run = state["recur_run"].gather(1, hour).squeeze(1).long()
    peak = state["recur_peak"].gather(1, hour).squeeze(1)
    next_day = last == day - 1
    same_day = (last == day) & (run > 0)
    new_run = torch.where(same_day, run, torch.where(next_day, run + 1, 1))
    new_peak = torch.where(same_day, torch.maximum(peak, level), level)
    # Late events from an earlier day than the slot's last leave it alone (an empty slot, run 0,
    # has no last day: its 0 is not 1970-01-01, or events before 1970 would never be recorded),
    # unless that last day is more than a week ahead: a clock-skewed stamp set it, and one flag
    # stamped a year ahead froze the slot until then (a nightly job alerted again every night).
    f = flagged & ((day >= last) | (run == 0) | (last > day + _SKEW_DAYS))
    return {
        "recur_day": state["recur_day"].scatter(1, hour, torch.where(f, day, last).to(state["recur_day"].dtype)[:, None]),
        "recur_run": state["recur_run"].scatter(1, hour, torch.where(f, new_run, run).to(state["recur_run"].dtype)[:, None]),
        "recur_peak": state["recur_peak"].scatter(1, hour, torch.where(f, new_peak, peak).to(state["recur_peak"].dtype)[:, None]),
    }
