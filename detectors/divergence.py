"""Divergence: the smoothed loss climbs well above the best level it reached, and stays there.

A spike is one bad batch; divergence is the run going the wrong way (a learning rate too
high once the warm-up ends, a corrupted optimizer state, a bad restore): the loss climbs and
does not come back. The loss is smoothed by an EWMA, the lowest smoothed level seen is the
*best*, and a finding is ``window`` consecutive observations of the smoothed loss above
``best + margin * |best|``.

Defaults and why:

- ``alpha = 2 / 129``: the EWMA equivalent of a 128-step window, the window OLMo-core judges
  loss spikes over (DESIGN.md, "Published figures") and the one :class:`Spike` uses. It
  averages batch noise away (the smoothed level's noise is ~9 % of the loss's own) and lets
  one spike move the level by ~1.5 % of its height, so spikes stay :class:`Spike`'s.
- ``margin = 0.2``: a descending or flat loss never sits 20 % above its own best smoothed
  level (the smoothed level's dips are a few percent), while a diverging loss passes it
  within tens of steps. Loss bumps a healthy run shows (a learning-rate warm-up, a data
  mixture change) are mostly below that; a 20 % lasting rise is worth a person's look.
  Relative, so it means the same at loss 8 and at loss 0.3; against ``|best|``, so a
  negative loss does not invert it.
- ``window = 20``: the rise must last, so that a spike lifting the smoothed level for a few
  steps, or a wobble, does not count; 20 observations is a small delay next to the ~64-step
  lag of the EWMA itself.
- ``noise_z = 8``: for very noisy losses (reinforcement learning, tiny batches) the smoothed
  level itself wanders; the rise must also be ``noise_z`` standard deviations of the
  smoothed level, estimated from successive differences (``|x_t - x_{t-1}|``, insensitive to
  a trend). Over 10^4 steps the smoothed level of a flat noisy loss ranges over ~6 of its
  deviations (measured: 6 flags a quarter of 30 plateaus with 50 % noise, 8 none), so 8 keeps
  a long plateau silent. For an ordinary loss (5-20 % batch noise) this floor is far below
  the margin and changes nothing.
- ``warmup = 100``: the first steps fall fast and are often chaotic (learning-rate warm-up);
  the best level is only tracked from then on.

Non-finite values are :class:`~runwatch.detectors.nonfinite.NonFinite`'s and ignored here,
and so are values beyond ±1e300, whose sums would overflow.
One finding per episode: another one needs the rise back below half the threshold first.
"""

from __future__ import annotations

import math

from runwatch.detectors.base import Anomaly, SeriesDetector, check_positive

HUGE = 1e300
"""Values this large are taken as infinities (ignored): sums of them would overflow."""
SQRT_PI_2 = math.sqrt(math.pi) / 2
"""Standard deviation of white noise per unit of mean absolute successive difference."""


class Divergence(SeriesDetector):
    """The EWMA of the loss stays ``margin`` above its best (lowest) level for ``window`` steps.

    Parameters
    ----------
    kind
        Anomaly kind reported (``"divergence"``), severity ``"critical"``.
    alpha
        EWMA weight of a new observation (the smoothed loss).
    margin
        Relative rise above the best smoothed level, as a fraction of ``|best|``.
    window
        Consecutive observations the smoothed loss must stay above the threshold.
    noise_z
        The rise must also be this many standard deviations of the smoothed level.
    warmup
        Observations learned before the best level is tracked and anything is reported.

    >>> d = Divergence(warmup=10, window=5)
    >>> loss = [3.0 - 0.01 * s for s in range(200)] + [1.0 + 0.05 * s for s in range(100)]
    >>> [(a.kind, a.step) for s, x in enumerate(loss) if (a := d.update(s, x, 0.0))]
    [('divergence', 245)]
    """

    name = "divergence"

    def __init__(
        self,
        kind: str = "divergence",
        alpha: float = 2 / 129,
        margin: float = 0.2,
        window: int = 20,
        noise_z: float = 8.0,
        warmup: int = 100,
    ) -> None:
        check_positive(alpha=alpha, margin=margin)
        if not alpha < 1:
            raise ValueError(f"alpha must be < 1, not {alpha!r}")
        if not noise_z >= 0:
            raise ValueError(f"noise_z must be >= 0, not {noise_z!r}")
        if window < 1 or warmup < 1:
            raise ValueError(f"need window >= 1 and warmup >= 1, not {window}, {warmup}")
        self.kind = kind
        self.alpha = alpha
        self.margin = margin
        self.window = window
        self.noise_z = noise_z
        self.warmup = warmup
        self._reset()

    def _reset(self) -> None:
        self._n = 0
        self._level = 0.0  # the smoothed loss
        self._last = 0.0  # the previous observation
        self._mad = 0.0  # EWMA of |x_t - x_{t-1}|
        self._best = math.inf
        self._run = 0
        self._reported = False

    def update(self, step: int, value: float, wall_time: float) -> Anomaly | None:
        if not abs(value) < HUGE:  # NaN, ±Inf and absurd values (sums would overflow)
            return None
        self._learn(value)
        if self._n < self.warmup:
            return None
        level, best = self._level, self._best
        if level < best:
            self._best = best = level
        rise = level - best
        threshold = max(self.margin * abs(best), self.noise_z * self._level_std())
        if not rise > threshold:
            self._run = 0
            if (
                rise <= threshold / 2
            ):  # hysteresis: a level hovering at the threshold is one episode
                self._reported = False
            return None
        self._run += 1
        if self._run < self.window or self._reported:
            return None
        self._reported = True
        ratio = rise / abs(best) if best else math.inf
        return self.anomaly(
            self.kind,
            "critical",
            step,
            ratio,
            f"{getattr(self, 'key', 'value')} is diverging: its smoothed level {level:.4g} has "
            f"stayed {ratio:.0%} above its best {best:.4g} for {self._run} steps; lower the "
            "learning rate or roll back to the last good checkpoint",
            value=value,
            level=level,
            best=best,
            rise=ratio,
            steps=float(self._run),
        )

    def _learn(self, x: float) -> None:
        self._n += 1
        if self._n == 1:
            self._level = self._last = x
            return
        alpha = max(self.alpha, 1 / self._n)  # the first steps: a plain running mean
        self._level += alpha * (x - self._level)
        self._mad += alpha * (abs(x - self._last) - self._mad)
        self._last = x

    def _level_std(self) -> float:
        """Standard deviation of the smoothed level, for white noise around it."""
        sigma = SQRT_PI_2 * self._mad
        return sigma * math.sqrt(self.alpha / (2 - self.alpha))
