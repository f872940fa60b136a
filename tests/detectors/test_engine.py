"""The engine routes points to the right detectors and survives a snapshot; the reference
detectors (non-finite, spike) on seeded streams."""

from __future__ import annotations

import math

import numpy as np
import pytest

from runwatch.detectors.defaults import default_engine
from runwatch.detectors.engine import Engine, Rule
from runwatch.detectors.nonfinite import NonFinite
from runwatch.detectors.spike import Spike


def noisy_loss(seed: int, steps: int) -> list[float]:
    """A descending training loss with multiplicative noise, like a real one."""
    rng = np.random.default_rng(seed)
    base = 0.8 + 3.0 * np.exp(-np.arange(steps) / 300)
    return list(base * np.exp(rng.normal(0, 0.05, steps)))


def findings(engine: Engine, key: str, values: list[float]) -> list[tuple[str, int]]:
    return [
        (a.kind, a.step)
        for step, value in enumerate(values)
        for a in engine.observe(key, 0, step, value, float(step))
    ]


@pytest.mark.parametrize("seed", range(5))
def test_default_engine_is_silent_on_a_healthy_loss(seed: int) -> None:
    engine = default_engine()
    assert findings(engine, "train/loss", noisy_loss(seed, 3000)) == []


@pytest.mark.parametrize("seed", range(5))
def test_a_spike_and_a_nan_are_found_at_their_step(seed: int) -> None:
    loss = noisy_loss(seed, 1000)
    loss[600] *= 4
    loss[800] = math.nan
    assert findings(default_engine(), "train/loss", loss) == [
        ("loss_spike", 600),
        ("nonfinite_loss", 800),
    ]


def test_a_sustained_rise_is_one_finding_not_one_per_step() -> None:
    loss = noisy_loss(0, 1000)
    loss[500:] = [v * 3 for v in loss[500:]]  # far above the level, step after step
    found = findings(Engine([Rule("*", Spike, {"kind": "loss_spike"})]), "train/loss", loss)
    assert found == [("loss_spike", 500), ("loss_spike_sustained", 504)]


def test_warmup_is_quiet() -> None:
    detector = Spike(warmup=20)
    assert all(detector.update(s, 10.0 ** (s % 3), 0.0) is None for s in range(20))


def test_snapshot_restore_makes_the_same_decisions() -> None:
    loss = noisy_loss(1, 1200)
    loss[900] *= 5
    loss[1000] = math.inf
    first = default_engine()
    findings(first, "train/loss", loss[:700])
    restored = Engine.restore(first.snapshot())
    rest = loss[700:]
    continued = [
        (a.kind, a.step)
        for step, value in enumerate(rest, 700)
        for a in first.observe("train/loss", 0, step, value, float(step))
    ]
    again = [
        (a.kind, a.step)
        for step, value in enumerate(rest, 700)
        for a in restored.observe("train/loss", 0, step, value, float(step))
    ]
    assert continued == again == [("loss_spike", 900), ("nonfinite_loss", 1000)]


def test_series_are_per_key_and_rank_and_unmatched_keys_cost_nothing() -> None:
    engine = Engine([Rule("train/*", NonFinite)])
    assert engine.observe("train/loss", 0, 0, math.nan, 0.0)
    assert engine.observe("train/loss", 1, 0, math.nan, 0.0), "rank 1 is its own series"
    assert not engine.observe("train/loss", 0, 1, math.nan, 0.0), "one finding per episode"
    assert engine.observe("sys/cpu_percent", 0, 0, math.nan, 0.0) == []
    assert set(engine._series) == {("train/loss", 0), ("train/loss", 1)}


def test_restore_refuses_what_is_not_an_engine() -> None:
    import pickle

    with pytest.raises(TypeError, match="not an engine"):
        Engine.restore(pickle.dumps({"a": 1}))


def test_detectors_refuse_bad_parameters() -> None:
    with pytest.raises(ValueError, match="alpha"):
        Spike(alpha=0)
    with pytest.raises(ValueError, match="severity"):
        NonFinite(severity="fatal")  # type: ignore[arg-type]
