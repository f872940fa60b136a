"""A loss jump right after the learning rate went up: the learning rate is the suspect.

A loss spike on its own has many causes (a bad batch, a data-mixture boundary, numerics);
one that follows a learning-rate increase within a few steps almost always has one: the
learning rate. Naming it saves the on-call engineer the search, and the policy that answers
(a temporary LR cut, ``lr_scale``) is the right one. This detector remembers the learning
rate's rises and judges the loss only in the ``window`` steps that follow one, against the
loss's level *before* the rise, so it can afford a lower threshold than a blind spike rule
(z 4 here, 6 in :class:`~runwatch.detectors.spike.Spike`): it is a conditional test.

Two kinds of rise arm it:

- **An increase**: one change of ``train/lr`` by a factor of at least ``factor`` (1.5): a
  schedule restart (SGDR), a hand-set LR, a restored schedule after an ``lr_scale``
  intervention, a resume that lost the scheduler's state.
- **The end of the warm-up**: the LR rose for at least ``min_rises`` (10) changes in a row
  and then stopped rising; the peak (the last rise) is where a too-high peak learning rate
  starts to hurt. Flat steps in between end the count, so a step-wise schedule arms at each
  of its plateaus, which is harmless: arming only names the suspect.

The loss is followed on the log scale (loss is positive and multiplicative: a jump doubles
it whatever its level) by an EWMA (``alpha``); its noise by an EWMA of squared successive
differences (``sqrt(E[d^2] / 2)`` is the standard deviation of white noise, and a falling
loss adds next to nothing to it, unlike the spread around a lagging mean). At the rise both
are frozen as the *baseline*: a loss that climbs over several steps is still judged against
where it stood before. A finding (``"lr_loss_jump"``, warning) is ``sustained`` losses among
``within`` successive ones, in the window, ``threshold`` baseline deviations above the baseline
level and at least ``min_ratio`` times it (so a very smooth loss needs a 10 % jump, not a 4 %
one). One finding per rise; no rise is armed during the first ``warmup`` losses (the first
steps' loss is chaotic, and the rises then are the warm-up's own).

Defaults and why: ``factor = 1.5``: a warm-up's per-step rise is ``1 + 1/t`` (below 1.5 past
its third step); a deliberate change is 2x or more. ``window = 100`` steps: a too-high LR
shows within steps to tens of steps. ``threshold = 4`` and ``sustained = 2``: one hard batch
is one high loss, a learning rate that is too high keeps the loss up (``within = 3``: a loss
that jumps, dips once below the bar and jumps again, as in the scenario benchmark's LR spike,
is found a step earlier than with two in a row); measured on 120
simulated healthy runs (warm-up then cosine, 2-15 % loss noise, 1 % of the batches hard),
no finding with two losses in a row, 17 with one (all hard batches after the warm-up's
end). A 10x learning-rate increase is found 2 steps after it with 2 % loss noise, 3 with
5 % (median), 8 with 15 % (the loss in those runs rising 15 % a step for 5 steps).
``alpha = 0.05``: ~40 steps of memory for the level and the noise. Only rank ``rank``'s
series are read (rank 0 sends the training scalars). Losses that are not positive are
ignored (a log scale); so are non-finite values, which are
:class:`~runwatch.detectors.nonfinite.NonFinite`'s.
"""

from __future__ import annotations

import math

from runwatch.detectors.base import Anomaly, RunDetector, check_positive

LR = "train/lr"
LOSS = "train/loss"
MIN_STD = 0.01
"""Floor of the log-loss noise: a 1 % wobble is never 4 standard deviations."""
RISE = 1 + 1e-9
"""An LR above the previous one by more than this factor rose (not float noise)."""


class LrLossCoupling(RunDetector):
    """A loss jump within ``window`` steps of a learning-rate rise (an increase, a warm-up end).

    Parameters
    ----------
    factor
        Least one-change LR increase that arms the detector.
    window
        Steps after the rise in which a loss jump is attributed to it.
    threshold
        Baseline deviations (log scale) above the baseline level that make a jump.
    min_ratio
        Least ratio of the loss to the baseline level that makes a jump.
    sustained, within
        Jumped losses among ``within`` successive losses that make a finding.
    alpha
        EWMA weight of a new loss, for its level and its noise.
    warmup
        Losses learned before a rise arms the detector.
    min_rises
        LR rises in a row that make a warm-up, whose end arms the detector.
    rank
        The rank whose ``train/lr`` and ``train/loss`` are read.

    >>> import math
    >>> d = LrLossCoupling()
    >>> found = []
    >>> for step in range(300):
    ...     lr = 1e-3 if step < 200 else 1e-2  # ten times the LR at step 200
    ...     loss = 2.0 + 0.02 * math.sin(step) if step < 202 else 3.5
    ...     found.append(d.update("train/lr", 0, step, lr, 0.0))
    ...     found.append(d.update("train/loss", 0, step, loss, 0.0))
    >>> [(a.kind, a.step, a.evidence["lr_step"]) for a in found if a]
    [('lr_loss_jump', 203, 200.0)]
    """

    name = "lr_loss_coupling"
    patterns = (LR, LOSS)

    def __init__(
        self,
        factor: float = 1.5,
        window: int = 100,
        threshold: float = 4.0,
        min_ratio: float = 1.1,
        sustained: int = 2,
        within: int = 3,
        alpha: float = 0.05,
        warmup: int = 20,
        min_rises: int = 10,
        rank: int = 0,
    ) -> None:
        check_positive(threshold=threshold, alpha=alpha)
        if not (factor > 1 and min_ratio >= 1 and alpha < 1):
            raise ValueError(
                f"need factor > 1, min_ratio >= 1 and alpha < 1, not {factor!r}, "
                f"{min_ratio!r}, {alpha!r}"
            )
        if window < 1 or not 1 <= sustained <= within or warmup < 2 or min_rises < 1:
            raise ValueError(
                f"need window, min_rises >= 1, 1 <= sustained <= within and warmup >= 2, not "
                f"{window}, {min_rises}, {sustained}, {within}, {warmup}"
            )
        self.factor = factor
        self.window = window
        self.threshold = threshold
        self.min_ratio = min_ratio
        self.sustained = sustained
        self.within = within
        self.alpha = alpha
        self.warmup = warmup
        self.min_rises = min_rises
        self.rank = rank
        self._reset()

    def _reset(self) -> None:
        self._lr = math.nan  # last learning rate
        self._lr_step = 0
        self._rises = 0  # LR rises in a row
        self._n = 0  # losses learned
        self._mean = 0.0  # EWMA of log(loss)
        self._dvar = 0.0  # EWMA of squared successive differences of log(loss)
        self._last = 0.0  # last log(loss)
        self._armed: tuple[int, str, float, float] | None = None  # step, why, LR before, after
        self._base_mean = 0.0
        self._base_std = MIN_STD
        self._reported = False
        self._recent: list[bool] = []  # the last ``within`` losses: above the threshold?

    def update(
        self, key: str, rank: int, step: int, value: float, wall_time: float
    ) -> Anomaly | None:
        if rank != self.rank or not math.isfinite(value):
            return None
        if key == LR:
            if value >= 0:
                self._learn_lr(step, value)
            return None
        if key != LOSS or not value > 0:
            return None
        x = math.log(value)
        found = None
        armed = self._armed
        if armed is not None:
            if step - armed[0] > self.window:
                self._armed = None
            elif not self._reported:
                z = (x - self._base_mean) / self._base_std
                high = z >= self.threshold and x - self._base_mean >= math.log(self.min_ratio)
                self._recent = [*self._recent[1 - self.within :], high]
                if high and sum(self._recent) >= self.sustained:
                    self._reported = True
                    found = self._finding(step, value, z, armed)
        self._learn_loss(x)
        return found

    def _learn_lr(self, step: int, lr: float) -> None:
        before, before_step = self._lr, self._lr_step
        self._lr, self._lr_step = lr, step
        if math.isnan(before):
            return
        if lr > before * RISE:
            self._rises += 1
            if lr >= before * self.factor:
                self._arm(step, "increase", before, lr)
            return
        if self._rises >= self.min_rises:
            self._arm(before_step, "warmup_end", before, before)
        self._rises = 0

    def _arm(self, step: int, why: str, before: float, after: float) -> None:
        if self._n < self.warmup:
            return
        judging = self._armed is not None and not self._reported
        if not judging:  # a second rise while the first is judged keeps the older baseline
            self._base_mean = self._mean
            self._base_std = max(math.sqrt(self._dvar / 2), MIN_STD)
        self._armed = (step, why, before, after)
        self._reported = False
        self._recent = []

    def _learn_loss(self, x: float) -> None:
        self._n += 1
        if self._n == 1:
            self._mean = self._last = x
            return
        std = max(math.sqrt(self._dvar / 2), MIN_STD)
        if self._n > self.warmup:  # a jump is learned only up to the threshold
            x = min(x, self._mean + self.threshold * std)
        d = x - self._last
        if self._n > self.warmup:  # and so is a jump's difference
            bound = self.threshold * std * math.sqrt(2)
            d = max(-bound, min(d, bound))
        alpha = max(self.alpha, 1 / self._n)
        self._mean += alpha * (x - self._mean)
        self._dvar += max(self.alpha, 1 / (self._n - 1)) * (d * d - self._dvar)
        self._last = x

    def _finding(
        self, step: int, value: float, z: float, armed: tuple[int, str, float, float]
    ) -> Anomaly:
        lr_step, why, before, after = armed
        base = math.exp(self._base_mean)
        ratio = value / base
        if why == "increase":
            cause = (
                f"{step - lr_step} step(s) after the learning rate rose from {before:.3g} to "
                f"{after:.3g} (x{after / before:.3g}) at step {lr_step}"
                if before > 0
                else f"{step - lr_step} step(s) after the learning rate rose from 0 to "
                f"{after:.3g} at step {lr_step}"
            )
        else:
            cause = (
                f"{step - lr_step} step(s) after the warm-up ended at step {lr_step} (peak "
                f"learning rate {after:.3g}): the peak may be too high"
            )
        return self.anomaly(
            "lr_loss_jump",
            "warning",
            LOSS,
            self.rank,
            step,
            z,
            f"train/loss jumped to {value:.4g} at step {step} ({ratio:.2f}x its level "
            f"{base:.4g} before), {cause}",
            value=value,
            baseline=base,
            ratio=ratio,
            z=z,
            lr_before=before,
            lr_after=after,
            lr_step=float(lr_step),
        )
