"""Deterministic synthetic fleet of IoT sensor streams with injected, labelled anomalies.

Why: the demo producer, the detector tests and GRU pretraining all need telemetry that
looks like real machines, whose ground-truth anomalies are known, and that can be
regenerated bit for bit for any time range.  Every value is a pure function of
(seed, stream, absolute step): per-stream parameters are drawn once from the seed, and all
randomness comes from a counter-based generator (Philox) whose counter is derived from the
step index, so a range gives identical values however it is split into chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FEATURES: tuple[str, ...] = ("temp", "rpm", "vibration", "pressure")
KINDS: tuple[str, ...] = ("spike", "level_shift", "stuck", "drift")
MACHINES: tuple[str, ...] = ("pump", "fan", "compressor", "chiller")

_MASK64 = (1 << 64) - 1
_TAG_PARAMS, _TAG_NOISE, _TAG_ANOM, _TAG_KNOT = 1, 2, 3, 16
_KNOTS_PER_DAY = (48, 16, 32, 96)  # wander channels: load, temp, pressure, rpm
_DURATION = {"spike": (1, 3), "level_shift": (100, 400), "stuck": (60, 300), "drift": (200, 500)}
_MAGNITUDE = {"spike": (6.0, 12.0), "level_shift": (5.0, 8.0), "stuck": (0.0, 0.0), "drift": (6.0, 9.0)}
_TWO_PI = 2.0 * np.pi
# Per-stream parameter ranges (uniform), by subsystem; machine kinds override a few below.
_LOAD = {"load_base": (0.45, 0.7), "day_amp": (0.08, 0.3), "day_sharp": (0.3, 4.0), "day_phase": (0.0, _TWO_PI)}
_LOAD2 = {"h2_amp": (0.0, 0.06), "h2_phase": (0.0, _TWO_PI), "week_amp": (0.02, 0.12), "week_phase": (0.0, _TWO_PI)}
_RPM = {"load_wander": (0.02, 0.06), "rpm_nom": (1250.0, 3000.0), "rpm_wander": (0.003, 0.01), "rpm_noise": (0.002, 0.006)}
_TEMP = {"temp_base": (40.0, 68.0), "temp_gain": (6.0, 18.0), "amb_amp": (1.0, 4.0), "amb_phase": (0.0, _TWO_PI)}
_TEMP2 = {"temp_week": (0.0, 1.5), "temp_wander": (0.3, 1.2), "temp_noise": (0.05, 0.15), "tail_prob": (0.002, 0.02)}
_VIB_PRESS = {"vib_base": (0.12, 1.4), "vib_noise": (0.04, 0.1), "press_base": (1.5, 7.5), "press_gain": (0.05, 0.2)}
_PRESS = {"press_wander": (0.01, 0.04), "press_noise": (0.005, 0.015)}
_PARAMS: dict[str, tuple[float, float]] = {**_LOAD, **_LOAD2, **_RPM, **_TEMP, **_TEMP2, **_VIB_PRESS, **_PRESS}
_MACHINE_PARAMS: dict[str, dict[str, tuple[float, float]]] = {
    "pump": {"rpm_nom": (1400.0, 3000.0), "press_base": (3.0, 8.0)},
    "fan": {"rpm_nom": (1250.0, 2800.0), "press_base": (1.2, 3.0), "temp_base": (40.0, 55.0)},
    "compressor": {"rpm_nom": (1500.0, 3000.0), "press_base": (5.0, 9.0), "temp_base": (55.0, 70.0)},
    "chiller": {"rpm_nom": (1250.0, 2200.0), "press_base": (2.0, 6.0)},
}


@dataclass(frozen=True)
class Anomaly:
    """One injected anomaly on one feature of one stream, over steps [start, end)."""

    stream: int
    feature: int
    kind: str
    start: int
    end: int


@dataclass
class Chunk:
    """A contiguous slice of the fleet's time line, with ground truth for scoring."""

    start_step: int
    ts_ms: np.ndarray
    values: np.ndarray
    labels: np.ndarray
    anomalies: list[Anomaly]


def _uniforms(seed: int, stream: int, tag: int, first_row: int, n_rows: int, width: int) -> np.ndarray:
    """Rows [first_row, first_row + n_rows) of an endless table of uniforms, random access.

    Why: one Philox counter value yields four 64-bit words and ``random()`` uses one word
    per double, so with ``width`` a multiple of 4 row r starts at counter r * width / 4 and
    any slice is produced without generating what precedes it.
    """
    if first_row < 0:
        raise ValueError("steps must be non-negative")
    key = np.array([seed & _MASK64, stream], dtype=np.uint64)
    counter = np.array([first_row * (width // 4), tag, 0, 0], dtype=np.uint64)
    return np.random.Generator(np.random.Philox(key=key, counter=counter)).random((n_rows, width))


def _gauss(u1: np.ndarray, u2: np.ndarray) -> np.ndarray:
    """Box-Muller normals from uniforms, so each normal depends on exactly two table cells."""
    return np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(_TWO_PI * u2)


class SensorFleet:
    """n_streams machines, each with len(FEATURES) features, sampled every interval_ms."""

    def __init__(
        self,
        n_streams: int = 120,
        seed: int = 0,
        interval_ms: int = 60_000,
        start_ms: int = 1_732_190_400_000,
        anomaly_every: int = 2000,
        warmup_steps: int = 500,
    ) -> None:
        """Draw per-stream parameters once; everything else is computed on demand."""
        if n_streams < 1 or interval_ms < 1 or anomaly_every < 20 or warmup_steps < 0:
            raise ValueError("need n_streams, interval_ms >= 1, anomaly_every >= 20, warmup >= 0")
        self.n_streams, self.seed = n_streams, seed
        self.interval_ms, self.start_ms = interval_ms, start_ms
        self.anomaly_every, self.warmup_steps = anomaly_every, warmup_steps
        self.n_features = len(FEATURES)
        self.period_day = max(2, round(86_400_000 / interval_ms))
        self.period_week = 7 * self.period_day
        self.machines = [MACHINES[s % len(MACHINES)] for s in range(n_streams)]
        self.stream_ids: list[str] = [f"{m}-{s:03d}" for s, m in enumerate(self.machines)]
        names = list(_PARAMS)
        table = np.empty((len(names), n_streams))
        for s, machine in enumerate(self.machines):
            u = _uniforms(seed, s, _TAG_PARAMS, 0, 1, 4 * (len(names) // 4 + 1))[0]
            for i, name in enumerate(names):
                lo, hi = _MACHINE_PARAMS[machine].get(name, _PARAMS[name])
                table[i, s] = lo + (hi - lo) * u[i]
        self._p = dict(zip(names, table, strict=True))
        self.sigma = self._reference_sigma()

    def _reference_sigma(self) -> np.ndarray:
        """Approximate std of each clean feature (noise + cycles + wander), [streams, features].

        Why: anomaly magnitudes are given in these units so they stand out equally on every
        stream and feature; computed analytically from the parameters so it is cheap.
        """
        p = self._p
        x = np.linspace(0.0, _TWO_PI, 256, endpoint=False)
        k = p["day_sharp"][:, None]
        shape = np.tanh(k * np.sin(x)) / np.tanh(k)
        shape_var, shape_sin = np.mean(shape**2, axis=1), np.mean(shape * np.sin(x), axis=1)
        var_load = p["day_amp"] ** 2 * shape_var + p["h2_amp"] ** 2 / 2 + p["week_amp"] ** 2 / 2 + 0.75 * p["load_wander"] ** 2
        var_ratio = 0.09 * var_load + 0.75 * p["rpm_wander"] ** 2 + p["rpm_noise"] ** 2
        cross = np.cos(p["amb_phase"] - p["day_phase"]) * shape_sin  # load vs ambient cycle
        temp = (
            p["temp_gain"] ** 2 / 0.09 * var_ratio
            + p["amb_amp"] ** 2 / 2
            + p["temp_week"] ** 2 / 2
            + 0.75 * p["temp_wander"] ** 2
            + p["temp_noise"] ** 2
            + 2 * p["temp_gain"] * p["day_amp"] * p["amb_amp"] * cross
            + p["temp_gain"] * p["week_amp"] * p["temp_week"]
        )
        rpm = p["rpm_nom"] ** 2 * var_ratio
        ratio = 0.7 + 0.3 * p["load_base"]
        vib = p["vib_base"] ** 2 * ((0.8 * ratio) ** 2 * var_ratio + p["vib_noise"] ** 2)
        press = p["press_base"] ** 2 * (p["press_gain"] ** 2 * var_load + 0.75 * p["press_wander"] ** 2 + p["press_noise"] ** 2)
        return np.sqrt(np.stack([temp, rpm, vib, press], axis=1))

    def _wander(self, streams: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Slow random wander per channel, [channels, streams, steps]: Catmull-Rom through
        unit-normal knots indexed by absolute knot number, so it is smooth and chunk-free."""
        out = np.empty((len(_KNOTS_PER_DAY), len(streams), len(t)))
        for c, per_day in enumerate(_KNOTS_PER_DAY):
            spacing = max(2, self.period_day // per_day)
            j = t // spacing
            f = ((t - j * spacing) / spacing)[None, :]
            j0, nk = int(j[0]), int(j[-1] - j[0]) + 4  # stored knot i is knot i - 1
            u = [_uniforms(self.seed, int(s), _TAG_KNOT + c, j0, nk, 4) for s in streams]
            knots = np.stack([_gauss(row[:, 0], row[:, 1]) for row in u])
            rel = j - j0
            p0, p1, p2, p3 = (knots[:, rel + i] for i in range(4))
            out[c] = 0.5 * (2 * p1 + (p2 - p0) * f + (2 * p0 - 5 * p1 + 4 * p2 - p3) * f**2 + (3 * p1 - p0 - 3 * p2 + p3) * f**3)
        return out

    def _noise(self, streams: np.ndarray, start: int, n: int) -> np.ndarray:
        """Per-step noise [streams, steps, features]: Gaussian, occasionally inflated (mild heavy
        tail, capped at 4 sd so it never rivals an injected anomaly)."""
        u = np.stack([_uniforms(self.seed, int(s), _TAG_NOISE, start, n, 12) for s in streams])
        z = _gauss(u[..., 0:4], u[..., 4:8])
        tail = u[..., 8:12] < self._p["tail_prob"][streams, None, None]
        return np.clip(np.where(tail, 2.5 * z, z), -4.0, 4.0)

    def _clean(self, streams: np.ndarray, start: int, n: int) -> np.ndarray:
        """Anomaly-free values [streams, steps, features] for absolute steps [start, start + n)."""
        if n == 0:
            return np.zeros((len(streams), 0, self.n_features))
        t = np.arange(start, start + n, dtype=np.int64)

        def p(name: str) -> np.ndarray:
            return self._p[name][streams, None]

        day = _TWO_PI * (t % self.period_day) / self.period_day
        week = _TWO_PI * (t % self.period_week) / self.period_week
        wander, noise = self._wander(streams, t), self._noise(streams, start, n)
        sharp = p("day_sharp")
        week_cycle = np.sin(week + p("week_phase"))
        load = (
            p("load_base")
            + p("day_amp") * np.tanh(sharp * np.sin(day + p("day_phase"))) / np.tanh(sharp)
            + p("h2_amp") * np.sin(2 * day + p("h2_phase"))
            + p("week_amp") * week_cycle
            + p("load_wander") * wander[0]
        )
        load = np.clip(load, 0.05, 1.0)
        ratio = 0.7 + 0.3 * load + p("rpm_wander") * wander[3] + p("rpm_noise") * noise[..., 1]
        rpm = p("rpm_nom") * ratio  # rpm drives temperature and vibration below
        temp = (
            p("temp_base")
            + p("temp_gain") * (ratio - 0.7 - 0.3 * p("load_base")) / 0.3
            + p("amb_amp") * np.sin(day + p("amb_phase"))
            + p("temp_week") * week_cycle
            + p("temp_wander") * wander[1]
            + p("temp_noise") * noise[..., 0]
        )
        vib = p("vib_base") * (0.6 + 0.4 * ratio**2 + p("vib_noise") * noise[..., 2])
        press = p("press_base") * (
            1.0 + p("press_gain") * (load - p("load_base")) + p("press_wander") * wander[2] + p("press_noise") * noise[..., 3]
        )
        return np.stack([temp, rpm, vib, press], axis=-1)

    def _scheduled(self, start_step: int, end_step: int) -> list[tuple[Anomaly, float]]:
        """Anomalies overlapping [start_step, end_step) with their signed amplitude.

        Why: each slot of ``anomaly_every`` steps has two halves, each holding one anomaly
        with probability 1/2 drawn from uniforms addressed by slot, so the schedule is a pure
        function of (seed, stream, slot); anomalies never overlap and leave a gap before the
        next one, and they average one per stream per slot.
        """
        if end_step <= start_step:
            return []
        every = self.anomaly_every
        half = every // 2
        gap = max(1, half // 20)
        room = half - 2 * gap  # durations are capped to this: use anomaly_every >= 1100 for all
        slot_lo, slot_hi = max(0, start_step) // every, (end_step - 1) // every + 1
        halves = np.arange(2 * slot_lo, 2 * slot_hi)
        half_start = (halves // 2) * every + (halves % 2) * half
        found: list[tuple[Anomaly, float]] = []
        for s in range(self.n_streams):
            u = _uniforms(self.seed, s, _TAG_ANOM, slot_lo, slot_hi - slot_lo, 16).reshape(-1, 8)
            for i in np.flatnonzero(u[:, 0] < 0.5):
                kind, feature = KINDS[int(u[i, 1] * len(KINDS))], int(u[i, 2] * self.n_features)
                lo, hi = _DURATION[kind]
                dur = min(lo + int(u[i, 3] * (hi - lo + 1)), room)
                begin = int(half_start[i]) + gap + int(u[i, 4] * (room - dur + 1))
                if begin < self.warmup_steps or begin >= end_step or begin + dur <= start_step:
                    continue
                mag_lo, mag_hi = _MAGNITUDE[kind]
                sign = 1.0 if FEATURES[feature] == "vibration" or u[i, 6] < 0.5 else -1.0
                amp = sign * (mag_lo + (mag_hi - mag_lo) * u[i, 5]) * self.sigma[s, feature]
                found.append((Anomaly(s, feature, kind, begin, begin + dur), float(amp)))
        found.sort(key=lambda item: (item[0].start, item[0].stream))
        return found

    def anomalies_between(self, start_step: int, end_step: int) -> list[Anomaly]:
        """All injected anomalies overlapping steps [start_step, end_step), sorted by start."""
        return [a for a, _ in self._scheduled(start_step, end_step)]

    def generate(self, start_step: int, n_steps: int, clean: bool = False) -> Chunk:
        """Values for absolute steps [start_step, start_step + n_steps); ``clean`` skips injection
        (the labels and anomaly list still describe what would have been injected)."""
        if start_step < 0 or n_steps < 0:
            raise ValueError("start_step and n_steps must be non-negative")
        end = start_step + n_steps
        streams = np.arange(self.n_streams)
        base = self._clean(streams, start_step, n_steps)
        values = base.copy()
        labels = np.zeros((self.n_streams, n_steps), dtype=bool)
        scheduled = self._scheduled(start_step, end)
        for a, amp in scheduled:
            lo, hi = max(a.start, start_step) - start_step, min(a.end, end) - start_step
            labels[a.stream, lo:hi] = True
            if clean:
                continue
            seg = values[a.stream, lo:hi, a.feature]
            if a.kind == "stuck":
                prev = a.start - 1
                seg[:] = (
                    base[a.stream, prev - start_step, a.feature]
                    if prev >= start_step
                    else self._clean(np.array([a.stream]), prev, 1)[0, 0, a.feature]
                )
            elif a.kind == "drift":
                seg += amp * (np.arange(lo, hi) + start_step - a.start + 1) / (a.end - a.start)
            else:
                seg += amp
        ts = self.start_ms + np.arange(start_step, end, dtype=np.int64) * self.interval_ms
        return Chunk(start_step, ts, values, labels, [a for a, _ in scheduled])


def _family(rng: np.random.Generator, fam: int, m: int, n: int) -> np.ndarray:
    """One family of normal dynamics, [m, n], roughly unit scale before random rescaling."""
    t = np.arange(n, dtype=np.float64)[None, :]

    def col(lo: float, hi: float) -> np.ndarray:
        return rng.uniform(lo, hi, (m, 1))

    def periods() -> np.ndarray:
        return np.exp(col(np.log(5.0), np.log(500.0)))

    if fam == 0:  # sines with harmonics
        period, x = periods(), np.zeros((m, n))
        for h in (1, 2, 3):
            use = rng.random((m, 1)) < (1.0 if h == 1 else 0.6)
            amp = col(0.2, 1.0) / h ** col(0.5, 2.0) * use
            x = x + amp * np.sin(_TWO_PI * h * t / period + col(0.0, _TWO_PI))
        return x
    if fam == 1:  # trend plus season
        s = t / n
        season = np.sin(_TWO_PI * t / periods() + col(0, 6.3))
        return col(-3, 3) * s + col(-2, 2) * s**2 + col(0, 0.5) * season
    if fam == 2:  # random walk with drift
        return np.cumsum(rng.normal(col(-0.05, 0.05), 1.0, (m, n)), axis=1)
    if fam == 3:  # AR(1) / AR(2), stationary coefficients
        phi2 = np.where(rng.random((m, 1)) < 0.5, 0.0, col(-0.95, 0.0))[:, 0]
        phi1 = col(-0.5, 1.0)[:, 0] * (0.98 - phi2)  # inside the AR(2) stationarity triangle
        x = rng.normal(size=(m, n))
        for i in range(2, n):  # vectorised over the batch; the recursion needs a loop over time
            x[:, i] += phi1 * x[:, i - 1] + phi2 * x[:, i - 2]
        return x
    if fam == 4:  # regime switches
        k = rng.integers(2, 5, (m, 1))
        regime = np.cumsum(rng.random((m, n)) < col(0.002, 0.03), axis=1) % k
        levels, sds = rng.normal(0.0, 3.0, (m, 4)), rng.uniform(0.05, 1.0, (m, 4))
        noise = np.take_along_axis(sds, regime, 1) * rng.normal(size=(m, n))
        return np.take_along_axis(levels, regime, 1) + noise
    if fam == 5:  # square waves / on-off duty cycles
        period = np.exp(col(np.log(6.0), np.log(300.0)))
        return (((t + col(0, 300)) % period) < col(0.1, 0.9) * period).astype(np.float64)
    if fam == 6:  # count data with a varying rate
        wave = np.sin(_TWO_PI * t / periods() + col(0, 6.3))
        rate = np.exp(col(np.log(0.3), np.log(40.0)) + col(0, 1) * wave)
        return rng.poisson(rate).astype(np.float64)
    if fam == 7:  # heavy-tailed noise around a level
        return rng.standard_t(np.broadcast_to(col(2.5, 6.0), (m, n)))
    if fam == 8:  # regular spikes: pulses of fixed width every period
        period, width = np.floor(periods()), rng.integers(1, 4, (m, 1))
        return ((t + col(0, 500)).astype(np.int64) % period < width) * col(3, 10)
    period = periods()  # fam 9: sawtooth (fill / drain cycles)
    saw = ((t + col(0, 500)) % period) / period
    return np.where(rng.random((m, 1)) < 0.5, saw, 1.0 - saw)


_N_FAMILIES = 10


def univariate_batch(rng: np.random.Generator, batch: int, length: int) -> np.ndarray:
    """float32 [batch, length] of diverse, anomaly-free univariate series for pretraining.

    Why: the GRU should learn generic normal dynamics (cycles, trends, persistence, regimes,
    counts, heavy tails, regular pulses) at any offset and scale before it sees the fleet.
    """
    fam = rng.integers(0, _N_FAMILIES, batch)
    out = np.empty((batch, length))
    for f in range(_N_FAMILIES):
        idx = np.flatnonzero(fam == f)
        if idx.size:
            out[idx] = _family(rng, f, idx.size, length)
    counts = fam == 6  # counts keep their integer values and natural scale
    x = out[~counts]
    x = (x - x.mean(axis=1, keepdims=True)) / (x.std(axis=1, keepdims=True) + 1e-9)
    x = x + 10 ** rng.uniform(-3, -0.3, (len(x), 1)) * rng.normal(size=x.shape)
    scale = 10 ** rng.uniform(-2, 3, (len(x), 1))
    offset = np.where(rng.random((len(x), 1)) < 0.3, 0.0, rng.choice([-1.0, 1.0], (len(x), 1)) * 10 ** rng.uniform(-2, 4, (len(x), 1)))
    out[~counts] = x * scale + offset
    return out.astype(np.float32)
