"""Spikes of a positive signal (loss, gradient norm) against a trend-following EWMA of its log.

Why the log: loss and gradient norms are positive and multiplicative (a spike doubles the
loss, whatever its level), so deviations are compared on the log scale, where a descending
loss curve has roughly constant noise. Why a trend: a plain EWMA lags a falling loss, and the
lag inflates its variance, so early in training a doubled loss scored a z of 1-5 on a seeded
synthetic curve; Holt's linear trend (an EWMA of the level and one of its slope) predicts the
next value instead, and the same doubling scores 9-15 while the healthy curve stays below 4.
O(1) state; ``alpha = 2 / (128 + 1)`` is the EWMA equivalent of the 128-step window that
OLMo-core uses to skip steps, and ``z = 6`` is its threshold (DESIGN.md, "Published figures");
the slope is smoothed more slowly (``beta = 0.02``) so that a spike barely moves it.

Two findings: one step far above the mean (``z >= threshold``) is a *spike*; ``sustained``
consecutive steps above ``sustained_z`` is a *sustained* rise, reported once (the spike that
may have begun it is reported too, and no further spike until the values come back down).
llm-foundry's KillLossSpike counts 5 steps above twice the running mean: ``log 2 / std`` is
about 3 here for a noisy loss. A spike is not learned at full weight (its value is clipped
to the threshold before it updates the statistics), so one outlier does not blind the
detector to the next. Non-finite
values are :class:`~runwatch.detectors.nonfinite.NonFinite`'s and ignored here.
"""

from __future__ import annotations

import math

from runwatch.detectors.base import Anomaly, SeriesDetector, check_positive

MIN_STD = 0.01
"""Floor of the log-scale standard deviation: a 1 % change is never 6 sigmas."""


class Spike(SeriesDetector):
    """z-score of ``log(value)`` against its EWMA mean and variance.

    Parameters
    ----------
    kind
        Anomaly kind of a spike (``"loss_spike"``); a sustained rise is ``kind`` with
        ``_sustained`` appended.
    alpha, beta
        EWMA weights of a new observation in the level and of a new slope in the trend.
    threshold
        z-score of a spike.
    sustained_z, sustained
        z-score and number of consecutive steps of a sustained rise.
    warmup
        Observations learned before any finding.

    >>> d = Spike(kind="loss_spike", warmup=10)
    >>> losses = [2.0 - 0.01 * i for i in range(50)] + [8.0] + [1.5] * 5
    >>> [(a.kind, a.step) for s, x in enumerate(losses) if (a := d.update(s, x, 0.0))]
    [('loss_spike', 50)]
    """

    name = "spike"

    def __init__(
        self,
        kind: str = "spike",
        alpha: float = 2 / 129,
        beta: float = 0.02,
        threshold: float = 6.0,
        sustained_z: float = 3.0,
        sustained: int = 5,
        warmup: int = 20,
    ) -> None:
        check_positive(alpha=alpha, beta=beta, threshold=threshold, sustained_z=sustained_z)
        if not (alpha < 1 and beta < 1):
            raise ValueError(f"alpha and beta must be < 1, not {alpha!r}, {beta!r}")
        if sustained < 1 or warmup < 2:
            raise ValueError(f"need sustained >= 1 and warmup >= 2, not {sustained}, {warmup}")
        self.kind = kind
        self.alpha = alpha
        self.beta = beta
        self.threshold = threshold
        self.sustained_z = sustained_z
        self.sustained = sustained
        self.warmup = warmup
        self._reset()

    def _reset(self) -> None:
        self._n = 0
        self._level = 0.0
        self._trend = 0.0
        self._var = 0.0
        self._run = 0
        self._reported_run = False

    def score(self, value: float) -> float:
        """z-score of ``value`` now (0 during warm-up); pure."""
        if self._n < self.warmup or not value > 0 or not math.isfinite(value):
            return 0.0
        return (math.log(value) - self._predicted()) / max(math.sqrt(self._var), MIN_STD)

    def _predicted(self) -> float:
        return self._level + self._trend

    def update(self, step: int, value: float, wall_time: float) -> Anomaly | None:
        if not value > 0 or not math.isfinite(value):
            return None
        z = self.score(value)
        x = math.log(value)
        std = max(math.sqrt(self._var), MIN_STD)
        found = None
        if self._n >= self.warmup:
            in_episode = self._run > 0
            self._run = self._run + 1 if z >= self.sustained_z else 0
            if z >= self.threshold:
                x = (
                    self._predicted() + self.threshold * std
                )  # learn an outlier only up to the threshold
                if not in_episode:
                    found = self.anomaly(
                        self.kind,
                        "warning",
                        step,
                        z,
                        f"{getattr(self, 'key', 'value')} jumped to {value:.4g} at step {step}, "
                        f"{z:.1f} standard deviations above its recent level "
                        f"{math.exp(self._predicted()):.4g}",
                        value=value,
                        mean=math.exp(self._predicted()),
                        z=z,
                    )
            if self._run == 0:
                self._reported_run = False
            elif self._run >= self.sustained and not self._reported_run:
                self._reported_run = True
                found = self.anomaly(
                    f"{self.kind}_sustained",
                    "warning",
                    step,
                    z,
                    f"{getattr(self, 'key', 'value')} has stayed high for {self._run} steps "
                    f"(now {value:.4g}, recent level {math.exp(self._predicted()):.4g})",
                    value=value,
                    mean=math.exp(self._predicted()),
                    steps=self._run,
                )
        if self._n >= self.warmup:  # nor a dip: one tiny value must not blow up the variance
            x = max(x, self._predicted() - self.threshold * std)
        self._learn(x)
        return found

    def _learn(self, x: float) -> None:
        self._n += 1
        if self._n == 1:
            self._level = x
            return
        alpha = max(self.alpha, 1 / self._n)  # the first steps: plain running means
        beta = max(self.beta, 1 / self._n)
        predicted = self._predicted()
        error = x - predicted
        level = predicted + alpha * error
        self._trend += beta * (level - self._level - self._trend)
        self._level = level
        self._var = (1 - alpha) * (self._var + alpha * error * error)
