"""UpdateRatio: the median layer's update-to-parameter ratio, per sampled step."""

from __future__ import annotations

import numpy as np
import pytest

from runwatch.detectors.update_ratio import UpdateRatio

LAYERS = [f"blocks.{i}.{part}" for i in range(4) for part in ("attn", "mlp", "norm")]


def feed(detector: UpdateRatio, levels: list[float], seed: int = 0) -> list[tuple[str, int]]:
    """One sample every 10 steps; each layer's ratio is lognormal around the level."""
    rng = np.random.default_rng(seed)
    found = []
    for i, level in enumerate(levels):
        for layer in LAYERS:
            ratio = float(level * np.exp(rng.normal(0, 0.5)))
            anomaly = detector.update(f"update_ratio/{layer}", 0, 10 * i, ratio, 10.0 * i)
            if anomaly is not None:
                found.append((anomaly.kind, anomaly.step))
    return found


@pytest.mark.parametrize("seed", range(5))
def test_silent_on_healthy_ratios_even_when_one_layer_is_large(seed: int) -> None:
    detector = UpdateRatio()
    assert feed(detector, [0.007] * 300, seed) == []
    for step in range(3000, 3200, 10):  # a freshly initialised head: one layer at 10 %
        assert detector.update("update_ratio/head", 0, step, 0.1, float(step)) is None
        for layer in LAYERS:
            assert detector.update(f"update_ratio/{layer}", 0, step, 0.006, float(step)) is None


def test_too_high_a_learning_rate_is_one_finding_after_the_warmup() -> None:
    levels = [0.05] * 30 + [0.006] * 20 + [0.04] * 10
    found = feed(UpdateRatio(), levels)
    # warm-up: samples 0-9; three high samples 10-12, judged when the next one begins
    assert found == [("update_ratio_high", 120), ("update_ratio_high", 520)]


def test_snapshot_restore_makes_the_same_decisions() -> None:
    first = UpdateRatio()
    feed(first, [0.006] * 15)
    restored = UpdateRatio()
    restored.restore(first.snapshot())
    levels = [0.006] * 5 + [0.05] * 10
    assert feed(first, levels, seed=3) == feed(restored, levels, seed=3) != []


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="above"):
        UpdateRatio(above=0)
    with pytest.raises(ValueError, match="sustained"):
        UpdateRatio(sustained=0)
