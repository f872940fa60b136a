"""Overfitting: validation loss turns up while the training loss keeps falling.

At each validation point the *gap* is ``val/loss`` minus the smoothed training loss (an
EWMA of ``train/loss``, ``alpha``), and the detector remembers the best (lowest) validation
loss with the gap and training loss of that moment. While the validation loss improves
nothing is judged: a gap that widens while validation still improves is the price of
training longer, not a reason to stop. Once a validation comes in above the best, either of
two findings (``"generalization_gap"``, warning) is made:

- **A trend**: none of the last ``k`` validations improved on the best, the gap grew at
  each of them, and in all by at least ``min_growth`` of the best validation loss and
  ``noise_z`` standard deviations of a difference of two gaps, while the smoothed training
  loss fell over them: early stopping's patience, with the gap as its witness. (The gap of a
  healthy run grows too, as the training loss falls faster than the validation loss; what
  makes it overfitting is validation no longer following.)
- **A widening**: the gap is wider than at the best validation by ``margin`` of the best
  validation loss plus the same noise allowance, and the training loss is below what it
  was then. This one catches a noisy validation loss whose gap does not grow monotonically,
  and a fast memorisation.

The noise of a gap (the smoothed training loss's, and the validation loss's own when the
user validates on a random subset) is estimated from the gaps' second differences
(``var(g[i] - 2 g[i-1] + g[i-2]) = 6 var(g)`` for white noise; a linear trend, which an
overfitting gap is, cancels out), an EWMA over ~60 validations (:data:`NOISE_ALPHA`), each
clipped at 4 deviations so that a jump (a new data mixture, a restart) does not blind the
detector for the next hundred validations. Without
the allowance the best validation loss, the lowest of many noisy measurements, sits a few
deviations below the truth, and any later ordinary one looks like a widening.

The margins are relative to the loss level, so they mean the same for a language model at
2.5 and a classifier at 0.05. One finding per episode; a new best validation loss ends it
(the model generalises again). The message names the step of the best validation: the
checkpoint to keep.

Defaults and why, for validations every 20-200 steps: ``k = 4`` validations and
``noise_z = 4``: measured on simulated runs of 400 validations (power-law training loss
with 5 % batch noise, validation noise 0.5-2 %, a plateau or a slowly widening healthy gap),
no finding in 120 runs (8 with ``k = 3``; 88 without the noise allowance on the widening,
most of them the noisiest validation). An
overfitting gap is found ``k`` validations after the validation loss stops improving when
its growth is clear of the noise (a run validating every 200 steps: 600-800 steps), later
when it creeps (the same run validating every 50 steps, where one validation's growth is
a quarter as large: 1,300-1,700 steps).
``min_growth = 0.01``: a 1 % change of the loss is the least worth a person's look;
``margin = 0.1``: a gap 10 % of the loss wider than at the best validation is overfitting
whatever the trend; ``alpha = 0.05`` (~40 training steps): the smoothed training loss has
a sixth of the per-batch noise and lags a falling loss by ~20 steps, which biases the gap
by about the same small amount at the best validation and now. ``warmup = 20`` training
losses before a validation counts. Only rank ``rank``'s series are read (rank 0 sends the
training scalars); non-finite values are ignored (they are
:class:`~runwatch.detectors.nonfinite.NonFinite`'s).
"""

from __future__ import annotations

import math
from collections import deque

from runwatch.detectors.base import Anomaly, RunDetector, check_positive

TRAIN = "train/loss"
VAL = "val/loss"
TINY = 1e-12
"""Least loss scale: a best validation loss of exactly 0 leaves the margins at this."""
NOISE_ALPHA = 0.03
"""EWMA weight of a new squared second difference of the gap (~60 validations)."""
NOISE_WARMUP = 5
"""Second differences learned as they are; later ones are clipped at ``NOISE_CLIP`` deviations."""
NOISE_CLIP = 4.0


class GeneralizationGap(RunDetector):
    """Validation loss above its best, with a growing gap to a still-falling training loss.

    Parameters
    ----------
    k
        Consecutive validations over which the gap must grow (the trend finding).
    min_growth
        Least growth of the gap over those validations, a fraction of the best val loss.
    noise_z
        Least growth (trend) and extra widening (widening), in standard deviations of the
        difference of two gaps.
    margin
        Widening of the gap since the best validation, a fraction of the best val loss
        (the widening finding).
    alpha
        EWMA weight of a new training loss.
    warmup
        Training losses learned before a validation is judged.
    rank
        The rank whose ``train/loss`` and ``val/loss`` are read.

    >>> d = GeneralizationGap()
    >>> found = []
    >>> for step in range(1, 1001):
    ...     found.append(d.update("train/loss", 0, step, 3.0 / step**0.3, 0.0))
    ...     if step % 100 == 0:  # validation: falls, bottoms out at step 400, then climbs
    ...         val = 1.2 + 0.002 * (step / 100 - 4) ** 2
    ...         found.append(d.update("val/loss", 0, step, val, 0.0))
    >>> [(a.kind, a.step, a.evidence["best_step"]) for a in found if a]
    [('generalization_gap', 800, 400.0)]
    """

    name = "generalization_gap"
    patterns = (TRAIN, VAL)

    def __init__(
        self,
        k: int = 4,
        min_growth: float = 0.01,
        noise_z: float = 4.0,
        margin: float = 0.1,
        alpha: float = 0.05,
        warmup: int = 20,
        rank: int = 0,
    ) -> None:
        check_positive(margin=margin, alpha=alpha)
        if not (min_growth >= 0 and noise_z >= 0 and alpha < 1):
            raise ValueError(
                f"need min_growth >= 0, noise_z >= 0 and alpha < 1, not {min_growth}, "
                f"{noise_z}, {alpha}"
            )
        if k < 1 or warmup < 1:
            raise ValueError(f"need k >= 1 and warmup >= 1, not {k}, {warmup}")
        self.k = k
        self.min_growth = min_growth
        self.noise_z = noise_z
        self.margin = margin
        self.alpha = alpha
        self.warmup = warmup
        self.rank = rank
        self._reset()

    def _reset(self) -> None:
        self._n = 0  # training losses learned
        self._train = 0.0  # their EWMA
        self._history: deque[tuple[float, float]] = deque(maxlen=self.k + 1)  # (gap, train)
        self._best: tuple[float, float, float, int] | None = None  # val, gap, train, step
        self._since_best = 0  # validations since the best one
        self._gaps: deque[float] = deque(maxlen=3)  # the last gaps, for their noise
        self._noise_n = 0  # second differences of the gap seen
        self._noise = 0.0  # their mean square (EWMA)
        self._reported = False

    def update(
        self, key: str, rank: int, step: int, value: float, wall_time: float
    ) -> Anomaly | None:
        if rank != self.rank or not math.isfinite(value):
            return None
        if key == TRAIN:
            self._n += 1
            self._train += max(self.alpha, 1 / self._n) * (value - self._train)
            return None
        if key != VAL or self._n < self.warmup:
            return None
        train = self._train
        gap = value - train
        history = self._history
        history.append((gap, train))
        self._learn_noise(gap)
        best = self._best
        if best is None or value <= best[0]:
            self._best = (value, gap, train, step)
            self._since_best = 0
            self._reported = False
            return None
        self._since_best += 1
        if self._reported:
            return None
        best_val, best_gap, best_train, _ = best
        scale = max(abs(best_val), TINY)
        noise = self.noise_z * self.gap_noise() * math.sqrt(2)  # of a difference of two gaps
        trend = (
            self._since_best >= self.k
            and len(history) > self.k
            and all(history[i + 1][0] > history[i][0] for i in range(self.k))
            and history[-1][0] - history[0][0] >= self.min_growth * scale
            and history[-1][0] - history[0][0] >= noise
            and history[-1][1] < history[0][1]
        )
        widening = gap - best_gap >= self.margin * scale + noise and train < best_train
        if not (trend or widening):
            return None
        self._reported = True
        return self._finding(step, value, gap, train, best, "trend" if trend else "widening")

    def gap_noise(self) -> float:
        """Standard deviation of one gap measurement, from the gaps' second differences."""
        return math.sqrt(self._noise / 6)  # var(g[i] - 2 g[i-1] + g[i-2]) = 6 var(g)

    def _learn_noise(self, gap: float) -> None:
        gaps = self._gaps
        gaps.append(gap)
        if len(gaps) == 3:
            second = gaps[2] - 2 * gaps[1] + gaps[0]
            if self._noise_n >= NOISE_WARMUP:  # a jump (a new regime) counts as a big wobble only
                bound = NOISE_CLIP * math.sqrt(self._noise)
                second = max(-bound, min(second, bound))
            self._noise_n += 1
            self._noise += max(NOISE_ALPHA, 1 / self._noise_n) * (second * second - self._noise)

    def _finding(
        self,
        step: int,
        val: float,
        gap: float,
        train: float,
        best: tuple[float, float, float, int],
        why: str,
    ) -> Anomaly:
        best_val, best_gap, best_train, best_step = best
        how = (
            f"it grew at each of the last {self.k} validations"
            if why == "trend"
            else f"it widened by {(gap - best_gap) / max(abs(best_val), TINY):.0%} of the loss"
        )
        return self.anomaly(
            "generalization_gap",
            "warning",
            VAL,
            self.rank,
            step,
            (gap - best_gap) / max(abs(best_val), TINY),
            f"overfitting: val/loss {val:.4g} at step {step} is above its best {best_val:.4g} "
            f"(step {best_step}) while the training loss fell from {best_train:.4g} to "
            f"{train:.4g}; the gap grew from {best_gap:.4g} to {gap:.4g} ({how}). Stop early "
            f"or regularise; the checkpoint around step {best_step} generalised best",
            val=val,
            train=train,
            gap=gap,
            best_val=best_val,
            best_gap=best_gap,
            best_train=best_train,
            best_step=float(best_step),
        )
