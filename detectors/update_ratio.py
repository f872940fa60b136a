"""Update-to-parameter ratios too large: the learning rate is too high for these weights.

The agent records ``update_ratio/{layer}`` = ||delta theta|| / ||theta|| of each layer's optimizer
step every ``layer_every`` steps. A well-known rule of thumb (Karpathy, "A Recipe for Training
Neural Networks"; the same figure is used to tune muP learning rates) puts a healthy ratio
around 1e-3 per step; at 1.5 % per step the weights are replaced within a hundred steps, and
training stops making progress or diverges. The finding (``"update_ratio_high"``, warning) is
the *median* over the layers of one sampled step above ``above`` (1.5 %) for ``sustained`` (3)
samples in a row, so one layer (a norm, a bias, a freshly initialised head) does not make it.
The first ``warmup`` samples (10: the first 100 steps at the agent's default cadence) are
skipped: Adam's first steps and a warm-up's start move small weights by large fractions.
One finding per episode; the message gives the median ratio and the worst layer.

Measured on the scenario benchmark's byte-level transformer: a healthy run's median ratio is
0.3-0.4 % after its first 50 steps (0.75 % at most, during warm-up), a run warmed up to a 30x
peak learning rate 1.5-3.4 % from step 10 to step 170 (while its loss merely plateaus).
"""

from __future__ import annotations

import math
import statistics

from runwatch.detectors.base import Anomaly, RunDetector, check_positive


class UpdateRatio(RunDetector):
    """Median update-to-parameter ratio over the layers, per sampled step.

    Parameters
    ----------
    above
        Median ratio that is too large.
    sustained
        Sampled steps in a row above it that make a finding.
    warmup
        Sampled steps skipped at the start of the run.

    >>> d = UpdateRatio(warmup=1, sustained=2)
    >>> found = []
    >>> for step in range(0, 60, 10):
    ...     ratio = 0.005 if step < 30 else 0.05
    ...     for layer in ("a", "b", "c"):
    ...         a = d.update(f"update_ratio/{layer}", 0, step, ratio, float(step))
    ...         found += [(a.kind, a.step)] if a else []
    >>> found
    [('update_ratio_high', 40)]
    """

    name = "update_ratio"
    patterns = ("update_ratio/*",)

    def __init__(self, above: float = 0.015, sustained: int = 3, warmup: int = 10) -> None:
        check_positive(above=above)
        if sustained < 1 or warmup < 0:
            raise ValueError(f"need sustained >= 1 and warmup >= 0, not {sustained}, {warmup}")
        self.above = above
        self.sustained = sustained
        self.warmup = warmup
        self._reset()

    def _reset(self) -> None:
        self._step: int | None = None
        self._ratios: dict[str, float] = {}
        self._samples = 0
        self._run = 0
        self._reported = False

    def update(
        self, key: str, rank: int, step: int, value: float, wall_time: float
    ) -> Anomaly | None:
        found = None
        if self._step is not None and step != self._step and self._ratios:
            found = self._judge(self._step, rank)
            self._ratios = {}
        self._step = step
        if math.isfinite(value) and value >= 0:
            self._ratios[key.partition("/")[2]] = value
        return found

    def _judge(self, step: int, rank: int) -> Anomaly | None:
        """One sampled step is complete (the next has begun): judge its median."""
        self._samples += 1
        if self._samples <= self.warmup:
            return None
        median = statistics.median(self._ratios.values())
        if median <= self.above:
            self._run = 0
            self._reported = False
            return None
        self._run += 1
        if self._run < self.sustained or self._reported:
            return None
        self._reported = True
        worst = max(self._ratios, key=self._ratios.__getitem__)
        return self.anomaly(
            "update_ratio_high",
            "warning",
            f"update_ratio/{worst}",
            rank,
            step,
            median / self.above,
            f"the optimizer changes the weights by {100 * median:.1f} % per step (median over "
            f"{len(self._ratios)} layers, {self._run} samples in a row; worst "
            f"{worst} {100 * self._ratios[worst]:.1f} %): far above the ~0.1 % of a healthy run, "
            "the learning rate is likely too high",
            median=median,
            worst=self._ratios[worst],
        )
