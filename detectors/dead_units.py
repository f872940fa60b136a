"""Dead units and saturation: a layer whose outputs stop carrying information.

Both watch per-layer activation statistics the agent samples every 10 steps, so every count
here is in *observations*.

:class:`DeadUnits` (``act/{module}/zero_frac``). What dies is the *live* fraction
``1 - zero_frac``: with a baseline of 0.5, a zero fraction of 0.75 means half the units that
fired no longer do. A finding is the live fraction falling to ``1 - dead_share`` of its
baseline (half, by default) while the zero fraction rose by at least ``min_rise``, for
``sustained`` observations in a row. Why relative to the live fraction and not an absolute
level such as 0.9: trained ReLU networks are legitimately very sparse (the "lazy neuron"
phenomenon, Li et al. 2022: 90-97 % zeros in the MLPs of trained T5 and ViT), so 0.95 can be
healthy; and a layer at 0.02 zeros whose outputs go to 0.6 has lost most of its units
without crossing 0.9. Why a *moving* baseline (an EWMA, ``alpha = 0.05``, of
``log(1 - zero_frac)``, ~20 observations = 200 steps) rather than the warm-up level: that
sparsity emerges over thousands of steps, a slow exponential decay of the live fraction
that such a baseline follows closely (it trails by rate/``alpha``), while units killed by one
bad update (a learning-rate spike, a large gradient) die within a few observations and
leave it far behind. The baseline stands still while a finding is being judged and learns
the new level once it is reported, so a layer that stays sparse is reported once. Defaults:
``dead_share = 0.5``, ``min_rise = 0.05`` (a fraction near 1 moving in its last digits is
not news), ``sustained = 5`` (50 steps: units that revive at the next steps were not dead),
``warmup = 20`` observations.

:class:`Saturation` (``act/{module}/abs_max``). Two signs of a layer at its limit, one kind:

- *Pinned*: the absolute maximum repeats exactly (to a relative ``1e-6``) for ``sustained``
  observations. A healthy layer's maximum over a batch of fresh data changes from sample to
  sample; a repeated one is a ceiling: tanh or sigmoid at 1.0, hardtanh/ReLU6 at their
  clamps, a value clamped to the fp16 maximum 65504. General, because it needs no knowledge
  of which ceiling. Some series repeat by nature (a bf16 maximum has 8 bits of mantissa,
  so it repeats often; a layer fed fixed-range inputs repeats always): with ``p`` the share
  of observations that repeated their predecessor before the run (an EWMA, ``alpha``), a
  run counts only once it is also long enough to happen by chance at most once in
  ``1 / chance`` (10^6) runs, ``log(chance) / log(p)`` repeats: 10 when ``p = 0.2``, 27
  when ``p = 0.6``, ~1,400 (off, in effect) for a series that always repeats. Zero
  repeated is a dead layer (:class:`DeadUnits`), not a ceiling, and is not reported here.
- *Exploding*: the absolute maximum ``explode`` (100: two orders of magnitude) times above
  its reference level, an EWMA of its logarithm, for ``sustained_explode`` (3)
  observations. Two orders of magnitude is far beyond healthy growth and beyond the 2x of
  :class:`~runwatch.detectors.drift.ActivationDrift`: it is where bf16 loses the small
  values next to the large ones and fp16 is a few more doublings from overflow.

Non-finite values are :class:`~runwatch.detectors.nonfinite.NonFinite`'s and ignored here.
"""

from __future__ import annotations

import math

from runwatch.detectors.base import Anomaly, SeriesDetector, check_positive

MIN_LIVE = 1e-6
"""Live fractions below this are taken as this (``log 0``)."""
TINY = 1e-30


class DeadUnits(SeriesDetector):
    """The live fraction ``1 - zero_frac`` falls to ``1 - dead_share`` of its recent baseline.

    Parameters
    ----------
    kind
        Anomaly kind reported (``"dead_units"``), severity ``"warning"``.
    dead_share
        Share of the baseline's live units that must have gone silent.
    min_rise
        Least rise of the zero fraction above its baseline.
    alpha
        EWMA weight with which the baseline learns ``log(1 - zero_frac)``.
    sustained
        Consecutive observations the condition must hold.
    warmup
        Observations learned before any finding.

    >>> d = DeadUnits()
    >>> zero_frac = [0.5] * 50 + [0.97] * 10
    >>> [(a.kind, a.step) for s, z in enumerate(zero_frac) if (a := d.update(s, z, 0.0))]
    [('dead_units', 54)]
    """

    name = "dead_units"

    def __init__(
        self,
        kind: str = "dead_units",
        dead_share: float = 0.5,
        min_rise: float = 0.05,
        alpha: float = 0.05,
        sustained: int = 5,
        warmup: int = 20,
    ) -> None:
        check_positive(dead_share=dead_share, alpha=alpha)
        if not (dead_share < 1 and alpha < 1 and 0 <= min_rise < 1):
            raise ValueError(
                f"need dead_share, alpha < 1 and 0 <= min_rise < 1, not "
                f"{dead_share!r}, {alpha!r}, {min_rise!r}"
            )
        if sustained < 1 or warmup < 1:
            raise ValueError(f"need sustained >= 1 and warmup >= 1, not {sustained}, {warmup}")
        self.kind = kind
        self.dead_share = dead_share
        self.min_rise = min_rise
        self.alpha = alpha
        self.sustained = sustained
        self.warmup = warmup
        self._reset()

    def _reset(self) -> None:
        self._n = 0
        self._baseline = 0.0  # EWMA of log(live fraction)
        self._run = 0
        self._reported = False

    def update(self, step: int, value: float, wall_time: float) -> Anomaly | None:
        if not math.isfinite(value):
            return None
        zero = min(max(value, 0.0), 1.0)
        live = math.log(max(1.0 - zero, MIN_LIVE))
        self._n += 1
        if self._n <= self.warmup:
            self._learn(live)
            return None
        base_zero = 1.0 - math.exp(self._baseline)
        dead = live <= self._baseline + math.log1p(-self.dead_share) and (
            zero >= base_zero + self.min_rise
        )
        if not dead:
            self._run = 0
            self._reported = False
            self._learn(live)
            return None
        self._run += 1
        if self._reported:
            self._learn(live)  # reported: the new level is learned, and the episode ends
            return None
        if self._run < self.sustained:
            return None  # the baseline stands still while the finding is judged
        self._reported = True
        share = 1.0 - (1.0 - zero) / (1.0 - base_zero) if base_zero < 1 else 1.0
        return self.anomaly(
            self.kind,
            "warning",
            step,
            share,
            f"{getattr(self, 'key', 'value')}: {zero:.1%} of activations are zero, "
            f"{base_zero:.1%} before; {share:.0%} of the units that were active have gone "
            f"silent for {self._run} observations (dying ReLUs: check the learning rate)",
            value=zero,
            baseline=base_zero,
            dead_share=share,
            observations=float(self._run),
        )

    def _learn(self, live: float) -> None:
        alpha = max(self.alpha, 1 / self._n)  # the first observations: a plain running mean
        self._baseline += alpha * (live - self._baseline)


class Saturation(SeriesDetector):
    """An absolute maximum pinned at a ceiling, or ``explode`` times above its level.

    Parameters
    ----------
    kind
        Anomaly kind reported (``"saturation"``), severity ``"warning"``.
    sustained
        Consecutive repeats of the same value that make it pinned.
    rtol
        Relative tolerance of a repeat.
    chance
        A run of repeats is pinned only if runs that long would happen by chance at most this
        often, given how often the series repeated before the run.
    explode
        Factor above the reference level that is an explosion.
    sustained_explode
        Consecutive observations of an explosion.
    alpha
        EWMA weight of the reference level (of the logarithm) and of the repeat share.
    warmup
        Observations learned before any finding.

    >>> d = Saturation()
    >>> abs_max = [0.9 + 0.001 * (s % 7) for s in range(40)] + [1.0] * 20
    >>> [(a.kind, a.step) for s, x in enumerate(abs_max) if (a := d.update(s, x, 0.0))]
    [('saturation', 49)]
    """

    name = "saturation"

    def __init__(
        self,
        kind: str = "saturation",
        sustained: int = 10,
        rtol: float = 1e-6,
        chance: float = 1e-6,
        explode: float = 100.0,
        sustained_explode: int = 3,
        alpha: float = 0.02,
        warmup: int = 20,
    ) -> None:
        check_positive(alpha=alpha, chance=chance)
        if not (rtol >= 0 and explode > 1 and alpha < 1 and chance < 1):
            raise ValueError(
                f"need rtol >= 0, explode > 1, alpha < 1, chance < 1, not "
                f"{rtol!r}, {explode!r}, {alpha!r}, {chance!r}"
            )
        if sustained < 2 or sustained_explode < 1 or warmup < 1:
            raise ValueError(
                f"need sustained >= 2, sustained_explode >= 1, warmup >= 1, not "
                f"{sustained}, {sustained_explode}, {warmup}"
            )
        self.kind = kind
        self.sustained = sustained
        self.rtol = rtol
        self.chance = chance
        self.explode = explode
        self.sustained_explode = sustained_explode
        self.alpha = alpha
        self.warmup = warmup
        self._reset()

    def _reset(self) -> None:
        self._n = 0
        self._last = math.nan
        self._repeats = 1  # length of the current run of equal values
        self._repeat_share = 0.0  # EWMA of "this value repeats the last"
        self._run_share = 0.0  # the share when the current run of repeats began
        self._run_start = 0  # the observation at which it began
        self._level = 0.0  # EWMA of log|value|
        self._high = 0  # consecutive observations above explode x level
        self._pinned_reported = False
        self._explode_reported = False

    def update(self, step: int, value: float, wall_time: float) -> Anomaly | None:
        if not math.isfinite(value):
            return None
        x = abs(value)
        repeat = x == self._last or abs(x - self._last) <= self.rtol * self._last
        self._n += 1
        if repeat and self._repeats == 1:
            self._run_share = self._repeat_share  # how often values repeated before this run
            self._run_start = self._n
        self._repeats = self._repeats + 1 if repeat else 1
        self._last = x
        logx = math.log(max(x, TINY))
        if self._n <= self.warmup:
            self._learn(logx, repeat)
            return None
        found = self._check_explode(step, x, logx)
        pinned = self._check_pinned(step, x, repeat)
        return found or pinned

    def _check_explode(self, step: int, x: float, logx: float) -> Anomaly | None:
        ratio = logx - self._level
        high = ratio >= math.log(self.explode)
        self._high = self._high + 1 if high else 0
        if not high:
            if ratio < math.log(self.explode) / 2:  # hysteresis: hovering at the bound is one
                self._explode_reported = False
            self._learn_level(logx)
            return None
        if self._explode_reported or self._pinned_reported:
            self._learn_level(logx)
            return None
        if self._high < self.sustained_explode:
            return None  # the level stands still while the finding is judged
        self._explode_reported = True
        self._pinned_reported = self._repeats > 1  # a clamp reached by the explosion: the same
        level = math.exp(self._level)
        return self.anomaly(
            self.kind,
            "warning",
            step,
            x / level,
            f"{getattr(self, 'key', 'value')} exploded to {x:.4g}, {x / level:.0f}x its "
            f"recent level {level:.3g}, for {self._high} observations: headed for overflow",
            value=x,
            level=level,
            ratio=x / level,
            pinned=0.0,
        )

    def _check_pinned(self, step: int, x: float, repeat: bool) -> Anomaly | None:
        share = self._run_share
        needed = self.sustained
        if share > 0:  # repeats this long happen by chance about once in 1 / chance runs
            needed = max(needed, math.ceil(math.log(self.chance) / math.log(min(share, 0.9999))))
        self._learn_share(repeat)
        # a run that began in the warm-up is how the series is, not a ceiling it reached
        pinned = self._repeats >= needed and x > 0 and self._run_start > self.warmup
        if not pinned:
            self._pinned_reported = self._pinned_reported and repeat
            return None
        if self._pinned_reported or self._explode_reported:
            return None  # one finding for one episode of the kind
        self._pinned_reported = True
        return self.anomaly(
            self.kind,
            "warning",
            step,
            float(self._repeats),
            f"{getattr(self, 'key', 'value')} has been pinned at {x:.6g} for {self._repeats} "
            "observations: the activation saturates at a ceiling (tanh/sigmoid, a clamp, "
            "the fp16 maximum)",
            value=x,
            level=math.exp(self._level),
            ratio=1.0,
            pinned=float(self._repeats),
        )

    def _learn(self, logx: float, repeat: bool) -> None:
        self._learn_level(logx)
        self._learn_share(repeat)

    def _learn_level(self, logx: float) -> None:
        alpha = max(self.alpha, 1 / self._n)
        self._level += alpha * (logx - self._level)

    def _learn_share(self, repeat: bool) -> None:
        alpha = max(self.alpha, 1 / self._n)
        self._repeat_share += alpha * (float(repeat) - self._repeat_share)
