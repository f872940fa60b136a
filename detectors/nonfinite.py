"""Non-finite values: a NaN or infinite loss, gradient norm or activation, at once and critical.

No warm-up and no statistics: the first NaN loss is the most important point a run can
send (a step that produced it has already poisoned the weights unless it is skipped). One
finding per episode: the next is reported after a finite value was seen again.
"""

from __future__ import annotations

import math

from runwatch.detectors.base import Anomaly, SeriesDetector, Severity, check_choice


class NonFinite(SeriesDetector):
    """Fires on the first NaN/±Inf of an episode.

    Parameters
    ----------
    kind
        The anomaly kind reported, e.g. ``"nonfinite_loss"``.
    severity
        ``"critical"`` by default: nothing good follows a NaN loss.

    >>> d = NonFinite(kind="nonfinite_loss")
    >>> stream = [1.0, float("nan"), float("nan"), 2.0, float("inf")]
    >>> [d.update(s, v, 0.0) is not None for s, v in enumerate(stream)]
    [False, True, False, False, True]
    """

    name = "nonfinite"

    def __init__(self, kind: str = "nonfinite", severity: Severity = "critical") -> None:
        check_choice("severity", severity, ("info", "warning", "critical"))
        self.kind = kind
        self.severity: Severity = severity
        self._reset()

    def _reset(self) -> None:
        self._in_episode = False

    def update(self, step: int, value: float, wall_time: float) -> Anomaly | None:
        if not self._is_bad(value):
            self._in_episode = False
            return None
        if self._in_episode:
            return None
        self._in_episode = True
        score = value if math.isfinite(value) else 1.0
        return self.anomaly(
            self.kind, self.severity, step, score, self._describe(value, step), value=value
        )

    def _is_bad(self, value: float) -> bool:
        return not math.isfinite(value)

    def _describe(self, value: float, step: int) -> str:
        what = "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf")
        return (
            f"{getattr(self, 'key', 'value')} is {what} at step {step}: skip the step or roll "
            "back to the last good checkpoint"
        )


class Positive(NonFinite):
    """Fires when a fraction that should stay 0 (e.g. ``act/*/nonfinite_frac``) turns positive.

    Parameters
    ----------
    kind
        The anomaly kind reported, e.g. ``"nonfinite_activations"``.
    severity
        ``"critical"`` by default: non-finite activations reach the loss within a step.

    >>> d = Positive(kind="nonfinite_activations")
    >>> [d.update(s, v, 0.0) is not None for s, v in enumerate([0.0, 0.01, 0.02, 0.0, 0.5])]
    [False, True, False, False, True]
    """

    name = "positive"

    def _is_bad(self, value: float) -> bool:
        return value > 0 or math.isnan(value)

    def _describe(self, value: float, step: int) -> str:
        return (
            f"{getattr(self, 'key', 'value')} = {value:.3g} at step {step}: non-finite values "
            "inside the model"
        )
