"""The one-series detectors on seeded synthetic streams: silent on healthy noisy series, and
the planted fault found at the step it is found (golden indices, river-style)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

from runwatch.detectors.base import SeriesDetector
from runwatch.detectors.dead_units import DeadUnits, Saturation
from runwatch.detectors.divergence import Divergence
from runwatch.detectors.drift import ActivationDrift
from runwatch.detectors.system import CounterIncrease, Drop, MemoryGrowth, Regression

SEEDS = range(5)
LAYER_EVERY = 10  # the agent samples per-layer statistics every 10 steps
SYSTEM_INTERVAL = 5.0  # and system metrics every 5 s


def found(
    detector: SeriesDetector, values: np.ndarray | list[float], every: int = 1, dt: float = 1.0
) -> list[tuple[str, int]]:
    """(kind, step) of every finding; observation ``i`` is step ``i * every`` at ``i * dt`` s."""
    return [
        (a.kind, a.step)
        for i, value in enumerate(values)
        if (a := detector.update(i * every, float(value), i * dt)) is not None
    ]


def noisy_loss(seed: int, steps: int, noise: float = 0.05) -> np.ndarray:
    """A descending training loss with multiplicative noise."""
    rng = np.random.default_rng(seed)
    base = 0.8 + 3.0 * np.exp(-np.arange(steps) / 300)
    return base * np.exp(rng.normal(0, noise, steps))


def activations(seed: int, n: int = 2000, noise: float = 0.1, growth: float = 3.0) -> np.ndarray:
    """A healthy per-layer scale: fast growth early (x5), then slow growth (x``growth``)."""
    rng = np.random.default_rng(seed)
    i = np.arange(n)
    level = math.log(growth) * i / n - math.log(5) * np.exp(-i / 30)
    return np.exp(level + rng.normal(0, noise, n))


# --- Divergence ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_divergence_is_silent_on_a_descending_loss_and_a_noisy_plateau(seed: int) -> None:
    assert found(Divergence(), noisy_loss(seed, 2000)) == []
    assert found(Divergence(), noisy_loss(seed, 2000, noise=0.2)) == []
    rng = np.random.default_rng(seed)
    # a plateau with 50 % noise: its smoothed level wanders, and must not count
    assert found(Divergence(), 2.0 + rng.normal(0, 1.0, 6000)) == []


@pytest.mark.parametrize(
    ("seed", "at_climb", "at_step"),
    [(0, 1083, 1056), (1, 1084, 1057), (2, 1085, 1059), (3, 1084, 1058), (4, 1083, 1059)],
)
def test_divergence_finds_a_loss_that_climbs_and_stays_up(
    seed: int, at_climb: int, at_step: int
) -> None:
    loss = noisy_loss(seed, 2000)
    t = np.arange(2000)
    climbing = loss * (1 + 2 * np.clip((t - 1000) / 200, 0, 1))  # x3 over 200 steps from 1000
    assert found(Divergence(), climbing) == [("divergence", at_climb)]
    jumped = loss.copy()
    jumped[1000:] *= 1.5  # a bad restore, or a learning rate far too high
    assert found(Divergence(), jumped) == [("divergence", at_step)]


@pytest.mark.parametrize("seed", SEEDS)
def test_divergence_leaves_spikes_and_short_bumps_alone(seed: int) -> None:
    loss = noisy_loss(seed, 2000)
    loss[1000:1005] *= 3  # five bad batches
    loss[1500:1530] *= 1.6  # a bump that comes back
    assert found(Divergence(), loss) == []


def test_divergence_is_critical_with_evidence_and_works_below_zero() -> None:
    loss = -1.0 - 2.0 * (1 - np.exp(-np.arange(1500) / 200))  # a negative loss, falling to -3
    loss[1000:] = -2.0  # then rising by a third of its magnitude
    detector = Divergence()
    detector.bind("train/loss", 0)
    findings = [a for i, v in enumerate(loss) if (a := detector.update(i, float(v), 0.0))]
    assert [(a.kind, a.severity, a.step) for a in findings] == [("divergence", "critical", 1078)]
    assert findings[0].evidence["best"] == pytest.approx(-3.0, abs=0.03)
    assert "train/loss is diverging" in findings[0].message


# --- ActivationDrift ----------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_activation_drift_is_silent_on_healthy_growth(seed: int) -> None:
    assert found(ActivationDrift(), activations(seed), LAYER_EVERY) == []
    assert found(ActivationDrift(), activations(seed, growth=10.0), LAYER_EVERY) == []
    assert found(ActivationDrift(), activations(seed, noise=0.3), LAYER_EVERY) == []
    rng = np.random.default_rng(seed)
    abs_max = 10 * np.exp(np.log(2) * np.arange(2000) / 2000 + rng.gumbel(0, 0.25, 2000))
    assert found(ActivationDrift(), abs_max, LAYER_EVERY) == []


@pytest.mark.parametrize(
    ("seed", "at_up", "at_down"),
    [(0, 10090, 10080), (1, 10090, 10080), (2, 10100, 10080), (3, 10100, 10080), (4, 10090, 10080)],
)
def test_activation_drift_finds_a_shift_of_scale(seed: int, at_up: int, at_down: int) -> None:
    up, down = activations(seed), activations(seed)
    up[1000:] *= 3
    down[1000:] *= 0.3
    assert found(ActivationDrift(), up, LAYER_EVERY) == [("activation_drift", at_up)]
    assert found(ActivationDrift(), down, LAYER_EVERY) == [("activation_drift", at_down)]


def test_activation_drift_reports_before_and_after_and_ignores_a_blip() -> None:
    values = activations(0)
    values[700:702] *= 10  # two odd samples
    values[1000:] *= 4
    detector = ActivationDrift()
    findings = [a for i, v in enumerate(values) if (a := detector.update(i, float(v), 0.0))]
    assert [(a.kind, a.severity, a.step) for a in findings] == [
        ("activation_drift", "warning", 1008)
    ]
    evidence = findings[0].evidence
    assert evidence["after"] / evidence["before"] == pytest.approx(evidence["ratio"])
    assert 3 < evidence["ratio"] < 5


def test_activation_drift_on_a_mean_near_zero_with_the_recommended_options() -> None:
    for seed in SEEDS:
        mean = np.random.default_rng(seed).normal(0.0, 0.05, 2000)
        assert found(ActivationDrift(min_ratio=4, recent=15), mean, LAYER_EVERY) == []
    mean = np.random.default_rng(0).normal(0.0, 0.05, 2000)
    mean[1000:] += 0.2  # a bias growing five times the usual size of the mean
    assert found(ActivationDrift(min_ratio=4, recent=15), mean, LAYER_EVERY) == [
        ("activation_drift", 10150)
    ]


# --- DeadUnits and Saturation -------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_dead_units_is_silent_on_healthy_sparsity(seed: int) -> None:
    rng = np.random.default_rng(seed)
    i = np.arange(2000)
    slowly_sparser = 0.5 + 0.1 * i / 2000 + rng.normal(0, 0.01, 2000)
    # ReLU MLPs growing very sparse over ~2,000 steps (the lazy neuron phenomenon)
    lazy = 1 - (0.45 * np.exp(-i / 200) + 0.05) + rng.normal(0, 0.005, 2000)
    gelu = np.abs(rng.normal(0, 1e-4, 2000))
    for zero_frac in (slowly_sparser, lazy, gelu):
        assert found(DeadUnits(), np.clip(zero_frac, 0, 1), LAYER_EVERY) == []


@pytest.mark.parametrize("seed", range(3))
def test_dead_units_finds_units_dying_at_once(seed: int) -> None:
    rng = np.random.default_rng(seed)
    relu = 0.5 + rng.normal(0, 0.01, 1000)
    relu[600:] = 0.97 + rng.normal(0, 0.005, 400)
    sparse = 0.9 + rng.normal(0, 0.005, 1000)  # already sparse: 0.98 is 80 % of the rest dying
    sparse[600:] = 0.98 + rng.normal(0, 0.002, 400)
    blip = 0.5 + rng.normal(0, 0.01, 1000)
    blip[600:603] = 0.97  # revived after three samples: not dead
    assert found(DeadUnits(), relu, LAYER_EVERY) == [("dead_units", 6040)]
    assert found(DeadUnits(), sparse, LAYER_EVERY) == [("dead_units", 6040)]
    assert found(DeadUnits(), blip, LAYER_EVERY) == []


def bf16(values: np.ndarray) -> np.ndarray:
    """Round to bfloat16 (8 bits of mantissa): such maxima repeat often."""
    bits = values.astype(np.float32).view(np.uint32) & np.uint32(0xFFFF0000)
    return bits.view(np.float32).astype(float)


@pytest.mark.parametrize("seed", SEEDS)
def test_saturation_is_silent_on_varying_and_naturally_constant_maxima(seed: int) -> None:
    rng = np.random.default_rng(seed)
    abs_max = 5 * np.exp(np.log(2) * np.arange(2000) / 2000 + rng.gumbel(0, 0.2, 2000))
    tanh = np.tanh(np.float32(3 + rng.normal(0, 0.5, 2000))).astype(float)
    for values in (abs_max, bf16(abs_max), np.round(abs_max, 1), tanh, np.ones(2000)):
        assert found(Saturation(), values, LAYER_EVERY) == []


@pytest.mark.parametrize("seed", range(3))
def test_saturation_finds_a_ceiling_and_an_explosion_once(seed: int) -> None:
    abs_max = 5 * np.exp(np.random.default_rng(seed).gumbel(0, 0.2, 1000))
    pinned, exploded, clamped = abs_max.copy(), abs_max.copy(), abs_max.copy()
    pinned[600:] = 1.0  # tanh saturated
    exploded[600:] *= 300
    clamped[600:] = 65504.0  # exploded into the fp16 clamp: one finding, not two
    assert found(Saturation(), pinned, LAYER_EVERY) == [("saturation", 6090)]
    assert found(Saturation(), exploded, LAYER_EVERY) == [("saturation", 6020)]
    assert found(Saturation(), clamped, LAYER_EVERY) == [("saturation", 6020)]


# --- Drop, Regression ---------------------------------------------------------------------


def step_times(seed: int, n: int = 3000) -> np.ndarray:
    """0.5 s steps with 5 % noise, a 60 s first step, a checkpoint save every 500 steps, and
    fifty random 3x hiccups."""
    rng = np.random.default_rng(seed)
    times = 0.5 * np.exp(rng.normal(0, 0.05, n))
    times[:3] = 60.0
    times[::500] *= 50
    times[rng.integers(0, n, 50)] *= 3
    return times


@pytest.mark.parametrize("seed", SEEDS)
def test_timings_are_silent_when_healthy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    times = step_times(seed)
    wait = np.abs(rng.normal(0.002, 0.002, 3000))
    wait[rng.integers(0, 3000, 30)] = 0.5
    util = np.clip(rng.normal(95, 5, 3000), 0, 100)
    util[rng.random(3000) < 0.1] = 0
    for start in range(100, 2900, 360):  # a 3 min checkpoint save every 30 min
        util[start : start + 36] = rng.uniform(0, 5, 36)
    assert found(Regression(), times) == []
    assert found(Drop(), 256 / times) == []
    assert found(Regression(kind="data_stall", factor=2, min_value=0.05), wait) == []
    gpu = Drop(kind="gpu_util_collapse", duration_s=300)
    assert found(gpu, util, dt=SYSTEM_INTERVAL) == []


@pytest.mark.parametrize(
    ("seed", "at_slower", "at_util"),
    [(0, 2010, 2073), (1, 2010, 2072), (2, 2009, 2073), (3, 2010, 2072), (4, 2010, 2073)],
)
def test_timings_find_regressions_drops_and_stalls(seed: int, at_slower: int, at_util: int) -> None:
    rng = np.random.default_rng(seed)
    times = 0.5 * np.exp(rng.normal(0, 0.05, 3000))
    times[:3] = 60.0
    slower = times.copy()
    slower[2000:] *= 2
    throughput = 256 / times
    throughput[2000:] *= 0.4
    wait = np.abs(rng.normal(0.002, 0.002, 3000))
    wait[2000:] += 0.2
    util = np.clip(rng.normal(95, 3, 3000), 0, 100)
    util[2000:] = np.clip(rng.normal(30, 10, 1000), 0, 100)
    assert found(Regression(), slower) == [("step_time_regression", at_slower)]
    assert found(Drop(), throughput) == [("throughput_drop", 2013)]
    assert found(Regression(kind="data_stall", factor=2, min_value=0.05), wait) == [
        ("data_stall", 2007)
    ]
    gpu = Drop(kind="gpu_util_collapse", duration_s=300)
    assert found(gpu, util, dt=SYSTEM_INTERVAL) == [("gpu_util_collapse", at_util)]


def test_a_lasting_change_is_one_finding_and_then_the_new_normal() -> None:
    times = 0.5 * np.exp(np.random.default_rng(0).normal(0, 0.05, 4000))
    times[1000:] *= 2  # e.g. a longer sequence length from here on
    times[3000:] *= 2  # and a real regression from the new normal
    assert found(Regression(), times) == [
        ("step_time_regression", 1010),
        ("step_time_regression", 3010),
    ]


# --- MemoryGrowth -------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_memory_growth_is_silent_on_flat_memory_with_steps(seed: int) -> None:
    rng = np.random.default_rng(seed)
    seconds = np.arange(4000) * SYSTEM_INTERVAL
    rss = 20 + rng.normal(0, 0.05, 4000)
    stepped = rss.copy()
    stepped[2000:] += 2  # an evaluation set loaded
    stepped[3000:] += 1
    startup = 20 + 10 * (1 - np.exp(-seconds / 120)) + rng.normal(0, 0.05, 4000)
    gpu = np.full(4000, 70.3)  # the caching allocator: flat
    for memory in (rss, stepped, startup, gpu):
        assert found(MemoryGrowth(), memory, dt=SYSTEM_INTERVAL) == []


@pytest.mark.parametrize(("seed", "at"), [(0, 839), (1, 839), (2, 827), (3, 815), (4, 863)])
def test_memory_growth_finds_a_leak_with_its_rate_and_eta(seed: int, at: int) -> None:
    rng = np.random.default_rng(seed)
    seconds = np.arange(2000) * SYSTEM_INTERVAL
    leak = 20 + rng.normal(0, 0.05, 2000) + np.clip(seconds - 3600, 0, None) / 3600 * 2.0
    detector = MemoryGrowth(capacity_gb=32.0)
    findings = [
        (i, a) for i, v in enumerate(leak) if (a := detector.update(i, float(v), seconds[i]))
    ]
    assert [(i, a.kind, a.severity) for i, a in findings] == [(at, "memory_growth", "warning")]
    evidence = findings[0][1].evidence
    assert evidence["slope_gb_per_h"] == pytest.approx(2.0, rel=0.15)
    now = 20 + (seconds[at] - 3600) / 3600 * 2.0
    assert evidence["eta_s"] == pytest.approx((32 - now) / 2.0 * 3600, rel=0.15)
    # without a capacity: the time to double; the same finding at the same point
    assert found(MemoryGrowth(), leak, dt=SYSTEM_INTERVAL) == [("memory_growth", at)]


def test_memory_growth_in_a_staircase_of_allocations() -> None:
    seconds = np.arange(2000) * SYSTEM_INTERVAL
    stairs = 40 + 0.5 * np.floor(np.clip(seconds - 3600, 0, None) / 120)  # 0.5 GB every 2 min
    assert found(MemoryGrowth(capacity_gb=80), stairs, dt=SYSTEM_INTERVAL) == [
        ("memory_growth", 827)
    ]


# --- CounterIncrease ----------------------------------------------------------------------


def test_counter_increase_reports_an_episode_once_and_a_reset_as_a_new_baseline() -> None:
    xid = [3.0] * 10 + [4.0] * 10 + [6.0] * 10 + [0.0] * 200 + [1.0] * 5
    detector = CounterIncrease()
    findings = [a for i, v in enumerate(xid) if (a := detector.update(i, v, i * SYSTEM_INTERVAL))]
    # 3 before the run is the baseline; +1 at 10 and +2 at 20 (50 s later) are one episode;
    # the driver reset to 0 is a new baseline; +1 at 230, 17 min later, is a new episode
    assert [(a.step, a.evidence["delta"], a.severity) for a in findings] == [
        (10, 1.0, "critical"),
        (230, 1.0, "critical"),
    ]


# --- parameters ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: Divergence(margin=0), "margin"),
        (lambda: ActivationDrift(min_ratio=1.0), "min_ratio"),
        (lambda: DeadUnits(dead_share=1.0), "dead_share"),
        (lambda: Saturation(explode=0.5), "explode"),
        (lambda: Drop(fraction=1.5), "fraction"),
        (lambda: Regression(factor=0.9), "factor"),
        (lambda: Regression(severity="fatal"), "severity"),  # type: ignore[arg-type]
        (lambda: MemoryGrowth(min_points=500), "min_points"),
        (lambda: CounterIncrease(cooldown_s=-1), "cooldown_s"),
    ],
)
def test_detectors_refuse_bad_parameters(make: Callable[[], object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()
