"""Activation drift: a per-layer statistic moves to a new level, several times away from the old.

Used on ``act/{module}/std``, ``act/{module}/abs_max`` and ``act/{module}/mean``, which the
agent samples every 10 steps, so every count here is in *observations*, not steps.

Two conditions, both needed:

1. **A change that matters.** The *recent* level (the median of the last ``recent``
   values of ``log|value|``: robust to a stray near-zero mean or one odd batch; logs because
   scale changes are multiplicative, a layer whose activations double has moved as far at
   0.01 as at 100) stands ``min_ratio`` times above or below the *reference* level: an EWMA
   (``alpha``) of the recent level as it was ``lag`` observations ago. The slow, healthy
   growth of activations as the weights grow moves the reference along (it trails by
   ~``lag + 1/alpha`` observations, a few percent of a doubling that takes thousands of
   steps); a shift to a new level leaves it behind. While such a change is being judged the
   reference stands still, so a change is judged against the level before it.
2. **A change, statistically.** river's :class:`~river.drift.ADWIN` has found a change in
   the deviation ``log|value| - reference`` since the level left the reference (or within
   ``lag`` observations before). ADWIN was chosen over Page-Hinkley because it needs no
   threshold in the series' units: it compares the means of two sub-windows of an adaptive
   window with a bound that uses the window's own variance, so one ``delta`` (a confidence,
   river's default 0.002) serves a smooth ``std`` and a noisy ``abs_max`` alike, and it
   finds rises and falls; Page-Hinkley's threshold and allowance are in the series' units
   and its mean runs from its last reset. ADWIN sees the deviation from the reference, not
   the raw log-values: healthy growth is a constant offset there, so ADWIN does not cut its
   window now and then for the growth (river restarts an ADWIN after every detection, and a
   young ADWIN needs ~90 observations to see a tripling that an old one sees in ~10). It is
   checked at every observation (``clock=1``; the default of one check per 32 would add
   320 steps of delay on these sparse series).

Defaults and why: ``min_ratio = 2`` (a layer's activation scale doubling or halving within a
couple of hundred steps is the kind of drift the OPT-175B logbook answered with a
learning-rate cut; growth slower than that is training); ``lag = 20`` observations (200
steps) keeps the reference out of a change while ADWIN confirms it (10-20 observations for
a doubling in typical noise); ``alpha = 0.05`` lets the reference follow healthy growth;
``recent = 5``: a median of five needs three odd observations to move; ``warmup = 100``
observations (1,000 steps): activations grow fast while the learning rate warms up. For
``act/*/mean``, whose log-magnitude is very noisy when the mean sits near zero (a centred
layer), use ``min_ratio=4, recent=15`` (measured on 2,000 observations of a mean around 0
or 0.02 with noise 0.05: a finding in 3 runs of 1,000, against ~1 in 15 with the defaults;
a shift of the mean to 0.2 is found 15 observations later).

Evidence: ``before`` and ``after`` levels (magnitudes, in the series' units) and their
``ratio``. Warning severity. One finding per episode: the episode ends once the recent
level has stayed within ``sqrt(min_ratio)`` of the reference for ``lag`` observations (it
came back, or the reference learned it: a lasting change becomes the new normal after
~``lag + 1/alpha`` observations). Non-finite values are
:class:`~runwatch.detectors.nonfinite.NonFinite`'s and ignored here.
"""

from __future__ import annotations

import math
from collections import deque

from river.drift import ADWIN

from runwatch.detectors.base import Anomaly, SeriesDetector, check_positive

TINY = 1e-30
"""Magnitudes below this are taken as this (``log 0`` is not a number)."""


class ActivationDrift(SeriesDetector):
    """A ``min_ratio`` change of the recent level of ``log|value|``, confirmed by ADWIN.

    Parameters
    ----------
    kind
        Anomaly kind reported (``"activation_drift"``), severity ``"warning"``.
    min_ratio
        Least factor (up or down) between the recent and the reference level.
    delta
        ADWIN's significance (smaller: fewer, later detections).
    lag
        Observations by which the reference trails; also how long before the level leaves
        the reference an ADWIN detection still counts, and how long the level must have
        settled before the episode ends.
    alpha
        EWMA weight with which the reference learns the level it trails.
    recent
        Observations in the median that is the recent level.
    warmup
        Observations learned before any finding.

    >>> d = ActivationDrift(warmup=30)
    >>> std = [1.0 + 0.01 * (s % 7) for s in range(200)] + [4.0 + 0.04 * (s % 7) for s in range(50)]
    >>> [(a.kind, a.step, round(a.evidence["ratio"], 1)) for s, x in enumerate(std)
    ...  if (a := d.update(s, x, 0.0))]
    [('activation_drift', 210, 4.0)]
    """

    name = "activation_drift"

    def __init__(
        self,
        kind: str = "activation_drift",
        min_ratio: float = 2.0,
        delta: float = 0.002,
        lag: int = 20,
        alpha: float = 0.05,
        recent: int = 5,
        warmup: int = 100,
    ) -> None:
        check_positive(delta=delta, alpha=alpha)
        if not min_ratio > 1:
            raise ValueError(f"min_ratio must be > 1, not {min_ratio!r}")
        if not (delta < 1 and alpha < 1):
            raise ValueError(f"need delta < 1 and alpha < 1, not {delta!r}, {alpha!r}")
        if lag < 1 or recent < 1 or warmup < 1:
            raise ValueError(f"need lag, recent, warmup >= 1, not {lag}, {recent}, {warmup}")
        self.kind = kind
        self.min_ratio = min_ratio
        self.delta = delta
        self.lag = lag
        self.alpha = alpha
        self.recent = recent
        self.warmup = warmup
        self._reset()

    def _reset(self) -> None:
        self._adwin = ADWIN(delta=self.delta, clock=1)
        self._n = 0
        self._recent: deque[float] = deque(maxlen=self.recent)  # last log-values
        self._levels: deque[float] = deque(maxlen=self.lag)  # last recent levels
        self._reference = math.nan
        self._last_change = -math.inf  # observation at which ADWIN last found a change
        self._since = math.inf  # observation at which the recent level left the reference
        self._reported = False
        self._quiet = 0  # observations in a row within sqrt(min_ratio) of the reference

    def update(self, step: int, value: float, wall_time: float) -> Anomaly | None:
        if not math.isfinite(value):
            return None
        x = math.log(max(abs(value), TINY))
        self._n += 1
        self._recent.append(x)
        level = _median(self._recent)
        bound = math.log(self.min_ratio)
        reference = self._reference
        pending = self._n > self.warmup and not self._reported and abs(level - reference) >= bound
        if len(self._levels) == self.lag and not pending:  # frozen while a change is judged
            old = self._levels[0]
            reference = old if math.isnan(reference) else reference + self.alpha * (old - reference)
            self._reference = reference
        self._levels.append(level)
        if math.isnan(reference):
            return None
        # ADWIN sees the deviation from the reference: healthy growth is a constant offset
        # there, so ADWIN keeps its long window (and its speed) instead of cutting it now and
        # then for the growth and starting again blind.
        self._adwin.update(x - reference)
        if self._adwin.drift_detected:
            self._last_change = self._n
        change = level - reference
        self._quiet = self._quiet + 1 if abs(change) < bound / 2 else 0
        if self._quiet >= self.lag:  # hysteresis: the episode ends once the level has settled
            self._reported = False
        if self._n < self.warmup or abs(change) < bound:
            self._since = math.inf
            return None
        self._since = min(self._since, self._n)
        if self._reported or self._last_change < self._since - self.lag:
            return None
        self._reported = True
        before, after = math.exp(reference), math.exp(level)
        ratio = math.exp(min(abs(change), 700.0))  # 1e308 after 1e-30 overflows exp
        way = "grew" if change > 0 else "shrank"
        return self.anomaly(
            self.kind,
            "warning",
            step,
            ratio,
            f"{getattr(self, 'key', 'value')} {way} {ratio:.1f}x: |value| ~{after:.3g} now, "
            f"~{before:.3g} before (step {step}); check the learning rate and the data",
            before=before,
            after=after,
            ratio=ratio,
            value=value,
        )


def _median(values: deque[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
