"""System findings on one series: throughput drops, step-time regressions, memory growth,
hardware error counters.

Timings (``train/step_time``, ``train/data_wait``, ``train/samples_per_s``,
``train/tokens_per_s``) arrive every step; ``sys/*`` samples every 5 s, stamped with the
trainer's current step (so several may share a step, and a hung trainer repeats one): what
needs time uses ``wall_time``.

:class:`Drop` and :class:`Regression` compare the **mid-mean** (the mean of the middle half,
the interquartile mean) **of the last ``sustained`` observations** with a baseline, the EWMA
(``alpha``) of that mid-mean:

- "Sustained" is robust both ways: a lone slow step (a checkpoint save, an evaluation, a
  garbage collection) is trimmed away, and bad observations with good ones between (GPU
  utilisation toggling between 0 and 100 % when the data loader starves it) move the
  mid-mean in proportion once they are about half. A clean change is found after half to
  three quarters of ``sustained`` observations, the further it went the sooner.
- The baseline learns the mid-mean, not the raw values, so the first steps (compilation,
  cache warm-up: a 60 s step among 0.5 s ones) do not inflate it. It stands still while a
  finding is judged, learns ten times slower while the level is between the square root of
  the bound and the bound (a change under way barely moves it; a lasting moderate one is
  still learned), and learns the new level once a finding is reported: a lasting change (a
  longer sequence length, another phase of training) becomes the new normal, and a later
  change from it is reported again.
- An episode ends once the level has stayed within the square root of the bound for
  ``sustained`` observations (hysteresis: a degraded, noisy level dipping in and out is one
  episode).
- ``duration_s`` adds a wall-time floor to "sustained" (restarting whenever the level is
  back within the square root of the bound), for series sampled in time
  (``sys/gpu*/util_percent`` every 5 s) where a checkpoint save of a few minutes must not
  count: use ``duration_s=300`` there.

Defaults: ``sustained = 20``, ``alpha = 0.02`` (the baseline remembers ~50 observations),
``warmup = 50``, and:

- :class:`Drop` (``fraction = 0.5``): throughput or utilisation below half its baseline: a
  halving is far outside step-to-step noise (a few percent for throughput), is what a
  failing data pipeline, a throttling GPU or a straggler on the other side of a collective
  looks like, and is cheap to explain to the on-call engineer.
- :class:`Regression` (``factor = 1.5``): step time 1.5x its baseline is a relative
  performance of 0.67, past the 0.75 at which NVIDIA's Resiliency Extension calls a rank a
  straggler (DESIGN.md, "Published figures"). For ``train/data_wait`` use ``factor=2,
  min_value=0.05``: the wait is small and noisy when healthy, so only a doubling that is
  also 50 ms a step is a data stall (whether the wait dominates the step is for a detector
  that sees both series).

:class:`MemoryGrowth` (``sys/proc_rss_gb``, ``sys/gpu*/mem_used_gb``) fits least-squares
lines to the last ``window`` (120: 10 min at 5 s) ``(wall_time, value)`` pairs every
``every`` (12: a minute) observations, with numpy in closed form (a bounded window, no refit
per point; scikit-learn would add nothing to a one-variable least squares). A fit shows
growth when

- the slope is ``t_min`` (5) standard errors above zero;
- it is *steady*: each half of the window alone has at least half that slope. One step up
  (a cache filled, the allocator reserving a new pool, an evaluation set loaded) tilts
  every window it is in, but only one half of each, so it never counts; a leak, smooth or
  in a staircase of allocations, tilts both;
- at that rate the value reaches the target within ``horizon_s`` (a day): ``capacity_gb``
  when given (the host's RAM, the GPU's memory), else ``1 + headroom`` (twice) the current
  value. Without it, slow growth of a large process is no news.

A finding needs ``sustained`` (5) such fits in a row, and the slope not fallen below half its
peak in that run (growth slowing down like that is something filling up, not a leak; the run
starts again from there). Fits start once ``min_points`` (60: 5 min) are in, the warm-up, so
a leak from the first step is reported ~10 min into the run. Evidence: ``slope_gb_per_h``
and ``eta_s`` (seconds to the target). One episode ends after ``sustained`` fits with under
half the slope reported (a slow, noisy leak is not reported again at every unlucky fit).

:class:`CounterIncrease` (``sys/gpu*/ecc_corrected``, ``ecc_uncorrected``, ``xid_errors``):
any increase of a cumulative counter is a finding; the first value is the baseline (errors
from before the run are not this run's), a decrease is a counter reset and a new baseline.
Increases within ``cooldown_s`` (10 min) of the last one belong to the same episode, so a
GPU spewing corrected errors is one finding, not one per sample.

Non-finite values are ignored here (:class:`~runwatch.detectors.nonfinite.NonFinite`'s);
negative ones too (none of these series can be negative), and values beyond 1e300, whose
sums would overflow.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from runwatch.detectors.base import Anomaly, SeriesDetector, Severity, check_choice, check_positive

SEVERITY_CHOICES = ("info", "warning", "critical")
HUGE = 1e300
"""Values this large are taken as infinities (ignored): sums of them would overflow."""
STEADY = 0.5
"""Memory growth is steady when each half of the window, and each fit of a run, keeps at
least this share of the slope."""


class _Shift(SeriesDetector):
    """The mid-mean of the last ``sustained`` observations beyond its EWMA baseline."""

    alpha: float
    sustained: int
    duration_s: float
    warmup: int

    def _reset(self) -> None:
        self._n = 0
        self._window: deque[float] = deque(maxlen=self.sustained)
        self._baseline = 0.0
        self._since = math.nan  # wall time at which the level went beyond
        self._reported = False
        self._quiet = 0  # observations in a row within the square root of the bound

    def update(self, step: int, value: float, wall_time: float) -> Anomaly | None:
        if not 0 <= value < HUGE:
            return None
        self._n += 1
        self._window.append(value)
        level = _midmean(self._window)
        if self._n <= self.warmup:
            self._baseline = level
            return None
        settled = self._settled(level, self._baseline)
        self._quiet = self._quiet + 1 if settled else 0
        if self._quiet >= self.sustained:  # hysteresis: an episode ends once the level settled
            self._reported = False
        if not self._beyond(level, self._baseline):
            if settled:
                self._since = math.nan
                self._learn(level, self.alpha)
            else:  # between the bound's square root and the bound: learned ten times slower
                self._learn(level, self.alpha / 10)
            return None
        if self._reported:
            self._learn(level, self.alpha)  # reported: the new level is learned; episode ends
            return None
        if math.isnan(self._since):
            self._since = wall_time
        if wall_time - self._since < self.duration_s:
            return None  # the baseline stands still while the finding is judged
        self._reported = True
        return self._finding(step, level, self._baseline, wall_time - self._since)

    def _configure(
        self,
        kind: str,
        alpha: float,
        sustained: int,
        duration_s: float,
        warmup: int,
        severity: Severity,
    ) -> None:
        """Check and store the parameters both shifts share, then start learning."""
        check_positive(alpha=alpha)
        check_choice("severity", severity, SEVERITY_CHOICES)
        if not (alpha < 1 and duration_s >= 0):
            raise ValueError(f"need alpha < 1 and duration_s >= 0, not {alpha!r}, {duration_s!r}")
        if sustained < 1 or warmup < 1:
            raise ValueError(f"need sustained >= 1 and warmup >= 1, not {sustained}, {warmup}")
        self.kind = kind
        self.alpha = alpha
        self.sustained = sustained
        self.duration_s = duration_s
        self.warmup = warmup
        self.severity: Severity = severity
        self._reset()

    def _learn(self, level: float, alpha: float) -> None:
        self._baseline += alpha * (level - self._baseline)

    def _beyond(self, level: float, baseline: float) -> bool:
        raise NotImplementedError

    def _settled(self, level: float, baseline: float) -> bool:
        raise NotImplementedError

    def _finding(self, step: int, level: float, baseline: float, lasted: float) -> Anomaly:
        raise NotImplementedError


class Drop(_Shift):
    """The mid-mean of the last ``sustained`` observations below ``fraction`` of its baseline.

    For throughput (``train/samples_per_s``, ``train/tokens_per_s``) and utilisation
    (``sys/gpu*/util_percent``).

    Parameters
    ----------
    kind
        Anomaly kind reported: ``"throughput_drop"``, ``"gpu_util_collapse"``.
    fraction
        Share of the baseline below which the level has dropped.
    alpha
        EWMA weight with which the baseline learns the mid-mean.
    sustained
        Observations in the mid-mean (a finding needs about half of them low).
    duration_s
        Wall-clock seconds the level must also stay low.
    warmup
        Observations learned before any finding.
    severity
        Severity reported.

    >>> d = Drop(kind="throughput_drop", sustained=10, warmup=20)
    >>> speed = [1000.0 + 10 * (s % 5) for s in range(100)] + [300.0] * 20
    >>> [(a.kind, a.step) for s, x in enumerate(speed) if (a := d.update(s, x, float(s)))]
    [('throughput_drop', 106)]
    """

    name = "drop"

    def __init__(
        self,
        kind: str = "throughput_drop",
        fraction: float = 0.5,
        alpha: float = 0.02,
        sustained: int = 20,
        duration_s: float = 0.0,
        warmup: int = 50,
        severity: Severity = "warning",
    ) -> None:
        check_positive(fraction=fraction)
        if not fraction < 1:
            raise ValueError(f"need fraction < 1, not {fraction!r}")
        self.fraction = fraction
        self._configure(kind, alpha, sustained, duration_s, warmup, severity)

    def _beyond(self, level: float, baseline: float) -> bool:
        return level < self.fraction * baseline

    def _settled(self, level: float, baseline: float) -> bool:
        return level >= math.sqrt(self.fraction) * baseline

    def _finding(self, step: int, level: float, baseline: float, lasted: float) -> Anomaly:
        ratio = level / baseline if baseline > 0 else 0.0
        return self.anomaly(
            self.kind,
            self.severity,
            step,
            ratio,
            f"{getattr(self, 'key', 'value')} dropped to {level:.4g}, {ratio:.0%} of its usual "
            f"{baseline:.4g} (mid-mean of the last {len(self._window)} observations)",
            value=level,
            baseline=baseline,
            ratio=ratio,
            lasted_s=lasted,
        )


class Regression(_Shift):
    """The mid-mean of the last ``sustained`` observations above ``factor`` x its baseline.

    For ``train/step_time`` (``"step_time_regression"``) and ``train/data_wait``
    (``"data_stall"``, with ``factor=2, min_value=0.05``).

    Parameters
    ----------
    kind
        Anomaly kind reported.
    factor
        Multiple of the baseline above which the level has regressed.
    min_value
        The level must also be above this (seconds): tiny waits doubling are no news.
    alpha
        EWMA weight with which the baseline learns the mid-mean.
    sustained
        Observations in the mid-mean (a finding needs about half of them high).
    duration_s
        Wall-clock seconds the level must also stay high.
    warmup
        Observations learned before any finding.
    severity
        Severity reported.

    >>> d = Regression(sustained=10, warmup=20)
    >>> step_time = [0.5 + 0.01 * (s % 3) for s in range(100)] + [1.2] * 20
    >>> step_time[60] = 30.0  # a checkpoint save: one slow step is not a regression
    >>> [(a.kind, a.step) for s, x in enumerate(step_time) if (a := d.update(s, x, float(s)))]
    [('step_time_regression', 104)]
    """

    name = "regression"

    def __init__(
        self,
        kind: str = "step_time_regression",
        factor: float = 1.5,
        min_value: float = 0.0,
        alpha: float = 0.02,
        sustained: int = 20,
        duration_s: float = 0.0,
        warmup: int = 50,
        severity: Severity = "warning",
    ) -> None:
        if not (factor > 1 and min_value >= 0):
            raise ValueError(f"need factor > 1 and min_value >= 0, not {factor!r}, {min_value!r}")
        self.factor = factor
        self.min_value = min_value
        self._configure(kind, alpha, sustained, duration_s, warmup, severity)

    def _beyond(self, level: float, baseline: float) -> bool:
        return level > self.factor * baseline and level > self.min_value

    def _settled(self, level: float, baseline: float) -> bool:
        return level <= math.sqrt(self.factor) * baseline or level <= self.min_value

    def _finding(self, step: int, level: float, baseline: float, lasted: float) -> Anomaly:
        ratio = level / baseline if baseline > 0 else math.inf
        return self.anomaly(
            self.kind,
            self.severity,
            step,
            ratio,
            f"{getattr(self, 'key', 'value')} rose to {level:.4g}, {ratio:.1f}x its usual "
            f"{baseline:.4g} (mid-mean of the last {len(self._window)} observations)",
            value=level,
            baseline=baseline,
            ratio=ratio,
            lasted_s=lasted,
        )


class MemoryGrowth(SeriesDetector):
    """A significant, steady, lasting upward slope that reaches the target within a horizon.

    Parameters
    ----------
    kind
        Anomaly kind reported (``"memory_growth"``), severity ``"warning"``.
    window
        Most recent observations (``(wall_time, value)`` pairs) the lines are fitted to.
    every
        Observations between fits.
    sustained
        Consecutive fits showing growth before a finding; one episode ends after as many
        fits with under half the slope reported.
    min_points
        Observations in the window before the first fit (the warm-up).
    t_min
        Least slope, in standard errors above zero.
    horizon_s
        Growth counts when it would reach the target within this many seconds.
    capacity_gb
        The memory there is (host RAM, GPU memory), the target; ``None``: unknown.
    headroom
        Without a capacity the target is ``(1 + headroom)`` x the current value.

    >>> d = MemoryGrowth(window=20, every=5, sustained=3, min_points=20, capacity_gb=64.0)
    >>> rss = [10.0 + 0.001 * t for t in range(0, 600, 5)]  # 3.6 GB/h from 10 GB
    >>> found = [a for i, x in enumerate(rss) if (a := d.update(i, x, 5.0 * i))]
    >>> [(a.kind, a.step, round(a.evidence["slope_gb_per_h"], 1), round(a.evidence["eta_s"]))
    ...  for a in found]
    [('memory_growth', 29, 3.6, 53855)]
    """

    name = "memory_growth"

    def __init__(
        self,
        kind: str = "memory_growth",
        window: int = 120,
        every: int = 12,
        sustained: int = 5,
        min_points: int = 60,
        t_min: float = 5.0,
        horizon_s: float = 86400.0,
        capacity_gb: float | None = None,
        headroom: float = 1.0,
    ) -> None:
        check_positive(t_min=t_min, horizon_s=horizon_s, headroom=headroom)
        if capacity_gb is not None:
            check_positive(capacity_gb=capacity_gb)
        if not (6 <= min_points <= window and every >= 1 and sustained >= 1):
            raise ValueError(
                f"need 6 <= min_points <= window, every >= 1, sustained >= 1, not "
                f"{min_points}, {window}, {every}, {sustained}"
            )
        self.kind = kind
        self.window = window
        self.every = every
        self.sustained = sustained
        self.min_points = min_points
        self.t_min = t_min
        self.horizon_s = horizon_s
        self.capacity_gb = capacity_gb
        self.headroom = headroom
        self._reset()

    def _reset(self) -> None:
        self._times: deque[float] = deque(maxlen=self.window)
        self._values: deque[float] = deque(maxlen=self.window)
        self._until_fit = self.every
        self._growing = 0  # consecutive fits with growth
        self._peak = 0.0  # the steepest slope of this run of fits
        self._flat = 0  # consecutive fits, once reported, with under half the slope reported
        self._reported = False
        self._reported_slope = 0.0

    def update(self, step: int, value: float, wall_time: float) -> Anomaly | None:
        if not (0 <= value < HUGE and math.isfinite(wall_time)):
            return None
        self._times.append(wall_time)
        self._values.append(value)
        self._until_fit -= 1
        if self._until_fit > 0 or len(self._values) < self.min_points:
            return None
        self._until_fit = self.every
        slope, now, growing = self._fit()
        if not growing:
            self._growing = 0
            # the episode ends once the slope has stayed under half the one reported
            self._flat = self._flat + 1 if slope < STEADY * self._reported_slope else 0
            if self._flat >= self.sustained:
                self._reported, self._reported_slope = False, 0.0
            return None
        if slope < STEADY * self._peak:  # slowing down: filling up, not leaking; start again
            self._growing = 0
        self._peak = slope if self._growing == 0 else max(self._peak, slope)
        self._growing += 1
        self._flat = 0
        if self._reported or self._growing < self.sustained:
            return None
        self._reported, self._reported_slope = True, slope
        target, eta = self._eta(slope, now)
        per_hour = slope * 3600
        where = (
            f"the capacity {target:.4g} GB"
            if self.capacity_gb is not None
            else f"{target:.4g} GB ({1 + self.headroom:.3g}x)"
        )
        return self.anomaly(
            self.kind,
            "warning",
            step,
            per_hour / max(now, 1e-9),
            f"{getattr(self, 'key', 'value')} has grown steadily for {self._growing} fits "
            f"({per_hour:.3g} GB/h, now {now:.4g} GB): it reaches {where} in ~"
            f"{_duration(eta)} at this rate",
            slope_gb_per_h=per_hour,
            eta_s=eta,
            value=now,
            target_gb=target,
        )

    def _fit(self) -> tuple[float, float, bool]:
        """(slope per s, fitted value now, whether that is growth) over the window.

        The newest ``min_points``, twice as many, ... up to the whole window are each fitted,
        and the first that shows growth counts: a leak that began a minute ago fills the short
        windows before the long one, and each window still rejects a single step up.
        """
        t_all = np.fromiter(self._times, float, len(self._times))
        v_all = np.fromiter(self._values, float, len(self._values))
        t_all = t_all - t_all[-1]  # the newest time is 0: no precision lost to epoch seconds
        sizes = [*range(self.min_points, len(t_all), self.min_points), len(t_all)]
        result = (0.0, float(v_all[-1]), False)
        for size in sizes:
            result = self._fit_window(t_all[-size:], v_all[-size:])
            if result[2]:
                break
        return result

    def _fit_window(self, t: np.ndarray, v: np.ndarray) -> tuple[float, float, bool]:
        line = _line(t, v)
        if line is None:
            return 0.0, float(v[-1]), False
        slope, se, now = line
        if not slope > 0 or (se > 0 and slope / se < self.t_min):
            return slope, now, False
        half = len(t) // 2
        for part in (slice(0, half), slice(half, None)):  # steady: both halves rise
            line = _line(t[part], v[part])
            if line is None or not line[0] >= STEADY * slope:
                return slope, now, False
        return slope, now, self._eta(slope, now)[1] <= self.horizon_s

    def _eta(self, slope: float, now: float) -> tuple[float, float]:
        """The target and the seconds to it at ``slope``."""
        target = self.capacity_gb if self.capacity_gb is not None else now * (1 + self.headroom)
        return target, max(target - now, 0.0) / slope


def _line(t: np.ndarray, v: np.ndarray) -> tuple[float, float, float] | None:
    """Least squares ``v ~ a + b t``: (b, its standard error, the fitted value at t = 0)."""
    if len(t) < 3:
        return None
    with np.errstate(all="ignore"):  # absurd values (1e308 GB) overflow: no line, no warning
        tm, vm = t.mean(), v.mean()
        dt = t - tm
        sxx = float(dt @ dt)
        if not sxx > 0:
            return None
        slope = float(dt @ (v - vm)) / sxx
        resid = v - vm - slope * dt
        se = math.sqrt(float(resid @ resid) / (len(t) - 2) / sxx)
        now = float(vm - slope * tm)
    if not (math.isfinite(slope) and math.isfinite(se) and math.isfinite(now)):
        return None
    return slope, se, now


class CounterIncrease(SeriesDetector):
    """Any increase of a cumulative counter (ECC errors, Xid errors).

    Parameters
    ----------
    kind
        Anomaly kind reported (``"hardware_errors"``).
    severity
        ``"critical"`` by default (an uncorrected ECC or Xid error loses work); corrected ECC
        errors are a warning.
    cooldown_s
        Increases within this many seconds of the previous one are the same episode.

    >>> d = CounterIncrease()
    >>> xid = [0, 0, 0, 1, 1, 3, 3, 3]
    >>> [(a.step, a.evidence["delta"]) for s, x in enumerate(xid) if (a := d.update(s, x, 5.0 * s))]
    [(3, 1.0)]
    """

    name = "counter_increase"

    def __init__(
        self,
        kind: str = "hardware_errors",
        severity: Severity = "critical",
        cooldown_s: float = 600.0,
    ) -> None:
        check_choice("severity", severity, SEVERITY_CHOICES)
        if not cooldown_s >= 0:
            raise ValueError(f"cooldown_s must be >= 0, not {cooldown_s!r}")
        self.kind = kind
        self.severity: Severity = severity
        self.cooldown_s = cooldown_s
        self._reset()

    def _reset(self) -> None:
        self._last = math.nan
        self._last_increase = -math.inf  # wall time of the last increase

    def update(self, step: int, value: float, wall_time: float) -> Anomaly | None:
        value = float(value)
        if not (math.isfinite(value) and value >= 0):
            return None
        last, self._last = self._last, value
        if math.isnan(last) or value <= last:
            return None  # the baseline, no change, or a counter reset (a new baseline)
        delta = value - last
        previous, self._last_increase = self._last_increase, wall_time
        if wall_time - previous < self.cooldown_s:
            return None  # the same episode
        return self.anomaly(
            self.kind,
            self.severity,
            step,
            delta,
            f"{getattr(self, 'key', 'value')} rose by {delta:g} to {value:g} at step {step}: "
            "the hardware reports errors; checkpoint now and consider draining this GPU",
            delta=delta,
            value=value,
        )


def _midmean(values: deque[float]) -> float:
    """Mean of the middle half (the interquartile mean): a median that still averages."""
    ordered = sorted(values)
    n = len(ordered)
    cut = n // 4
    middle = ordered[cut : n - cut]
    return sum(middle) / len(middle)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
