"""Run detectors on seeded synthetic streams: where they find planted faults, that they stay
silent on healthy runs, that a snapshot restores the same decisions, and that the engine
routes their keys to them."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import pytest

from runwatch.detectors.base import Anomaly, RunDetector
from runwatch.detectors.engine import Engine, RunRule
from runwatch.detectors.generalization import GeneralizationGap
from runwatch.detectors.liveness import Liveness
from runwatch.detectors.lr_coupling import LrLossCoupling
from runwatch.detectors.multivariate import SystemOutlier
from runwatch.detectors.straggler import Straggler

# An event is a point ("p", key, rank, step, value, wall_time) or a check ("c", now, heartbeats).
Event = tuple[Any, ...]


def point(key: str, rank: int, step: int, value: float, wall: float = 0.0) -> Event:
    return ("p", key, rank, step, value, wall)


def check(now: float, heartbeats: dict[int, float]) -> Event:
    return ("c", now, dict(heartbeats))


def run(detector: RunDetector, events: Iterable[Event]) -> list[Anomaly]:
    found: list[Anomaly] = []
    for event in events:
        if event[0] == "p":
            if (a := detector.update(*event[1:])) is not None:
                found.append(a)
        else:
            found += detector.check(event[1], event[2])
    return found


def summary(found: list[Anomaly]) -> list[tuple[str, int, int]]:
    return [(a.kind, a.rank, a.step) for a in found]


def assert_snapshot_identical(make: Callable[[], RunDetector], events: list[Event]) -> None:
    """A detector restored from a snapshot taken at any of three points decides exactly as the
    original does from there on."""
    for cut in (len(events) // 4, len(events) // 2, 3 * len(events) // 4):
        original = make()
        run(original, events[:cut])
        restored = make()
        restored.restore(original.snapshot())
        assert run(restored, events[cut:]) == run(original, events[cut:])


# -- generalization gap -------------------------------------------------------------------


def overfitting(seed: int, steps: int = 400, every: int = 20, turn: int = 120) -> list[Event]:
    """A tiny training set trained too long: training loss towards 0, validation turns up."""
    rng = np.random.default_rng(seed)
    events = []
    for step in range(steps):
        train = 0.1 + 3.0 * math.exp(-step / 120)
        events.append(point("train/loss", 0, step, train * math.exp(rng.normal(0, 0.1))))
        if step % every == every - 1:
            val = 2.0 + 0.6 * math.exp(-step / 60) + 0.004 * max(0, step - turn)
            events.append(point("val/loss", 0, step, val * math.exp(rng.normal(0, 0.003))))
    return events


def healthy_validation(
    seed: int, steps: int = 20_000, every: int = 50, val_noise: float = 0.01
) -> list[Event]:
    """Power-law training loss with 5 % batch noise; validation follows with a small gap."""
    rng = np.random.default_rng(seed)
    events = []
    for step in range(1, steps + 1):
        train = 1.0 + 3.0 * step**-0.3
        events.append(point("train/loss", 0, step, train * math.exp(rng.normal(0, 0.05))))
        if step % every == 0:
            val = (train + 0.02 + 0.03 * step / steps) * math.exp(rng.normal(0, val_noise))
            events.append(point("val/loss", 0, step, val))
    return events


def test_generalization_gap_finds_the_turn_of_the_validation_loss() -> None:
    found = run(GeneralizationGap(), overfitting(0))
    assert summary(found) == [("generalization_gap", 0, 159)]
    assert found[0].severity == "warning" and found[0].key == "val/loss"
    assert found[0].evidence["best_step"] == 119.0  # the checkpoint to keep
    assert "above its best" in found[0].message and "step 119" in found[0].message
    for seed in range(1, 6):  # within four validations of the turn, on every seed
        found = run(GeneralizationGap(), overfitting(seed))
        assert len(found) == 1 and 139 <= found[0].step <= 199, summary(found)


@pytest.mark.parametrize(("every", "val_noise"), [(50, 0.005), (50, 0.02), (200, 0.01)])
def test_generalization_gap_is_silent_on_healthy_runs(every: int, val_noise: float) -> None:
    for seed in range(3):
        assert run(GeneralizationGap(), healthy_validation(seed, 20_000, every, val_noise)) == []


def test_generalization_gap_reports_once_per_episode() -> None:
    detector = GeneralizationGap()
    found = run(detector, overfitting(0, steps=800))  # keeps climbing: one finding
    assert len(found) == 1
    # The model generalises again (a new best validation loss), then overfits again.
    events = [point("val/loss", 0, 800, 1.0)]
    for step in range(801, 1200):
        events.append(point("train/loss", 0, step, 0.05 * math.exp(-(step - 800) / 100)))
        if step % 20 == 19:
            events.append(point("val/loss", 0, step, 1.0 + 0.01 * (step - 800) / 20))
    assert summary(run(detector, events)) == [("generalization_gap", 0, 879)]


def test_generalization_gap_reads_only_its_rank() -> None:
    events = [(*e[:2], 1, *e[3:]) for e in overfitting(0)]
    assert run(GeneralizationGap(), events) == []
    assert len(run(GeneralizationGap(rank=1), events)) == 1


def test_generalization_gap_snapshot() -> None:
    assert_snapshot_identical(GeneralizationGap, overfitting(3, steps=600))


# -- learning rate and loss ---------------------------------------------------------------


def schedule(
    seed: int,
    steps: int = 3000,
    warmup: int = 200,
    noise: float = 0.05,
    hard: float = 0.0,
    jump_at: int | None = None,
    jump: float = 10.0,
) -> list[Event]:
    """Linear warm-up, cosine decay, a power-law loss with log-normal noise and a fraction
    ``hard`` of hard batches; from ``jump_at`` the LR times ``jump`` and the loss rising 15 %
    a step for five steps."""
    rng = np.random.default_rng(seed)
    events = []
    for step in range(steps):
        lr = 3e-4 * min(1.0, (step + 1) / warmup)
        lr *= 0.55 + 0.45 * math.cos(math.pi * max(0, step - warmup) / steps)
        loss = 1.0 + 3.0 * (step + 1) ** -0.3
        if jump_at is not None and step >= jump_at:
            lr *= jump
            loss *= 1 + 0.15 * min(step - jump_at, 5)
        e = rng.normal(0, noise) + (rng.exponential(0.3) if rng.random() < hard else 0.0)
        events += [point("train/lr", 0, step, lr), point("train/loss", 0, step, loss * math.exp(e))]
    return events


def test_lr_loss_coupling_finds_a_jump_after_an_lr_increase() -> None:
    found = run(LrLossCoupling(), schedule(0, jump_at=1500))
    assert summary(found) == [("lr_loss_jump", 0, 1502)]
    assert found[0].evidence["lr_step"] == 1500.0
    assert found[0].evidence["lr_after"] / found[0].evidence["lr_before"] == pytest.approx(
        10, rel=1e-2
    )
    assert "rose from" in found[0].message and "at step 1500" in found[0].message
    delays = []
    for seed in range(20):
        (a,) = run(LrLossCoupling(), schedule(seed, jump_at=1500))
        delays.append(a.step - 1500)
    assert sorted(delays)[10] <= 3 and max(delays) <= 4  # median delay: 3 steps


def test_lr_loss_coupling_blames_the_end_of_the_warmup() -> None:
    events = []
    for step in range(400):  # warm-up to step 99, then the loss climbs: the peak is too high
        lr = 9e-2 * min(1.0, (step + 1) / 100)
        loss = (3.0 - step / 200) if step < 105 else 2.5 + 0.1 * (step - 104)
        events += [point("train/lr", 0, step, lr), point("train/loss", 0, step, loss)]
    found = run(LrLossCoupling(), events)
    assert summary(found) == [("lr_loss_jump", 0, 109)]  # 10 % above
    assert found[0].evidence["lr_step"] == 99.0
    assert "warm-up ended at step 99" in found[0].message


@pytest.mark.parametrize(("noise", "hard"), [(0.02, 0.01), (0.05, 0.01), (0.15, 0.0)])
def test_lr_loss_coupling_is_silent_on_healthy_schedules(noise: float, hard: float) -> None:
    for seed in range(8):
        assert run(LrLossCoupling(), schedule(seed, noise=noise, hard=hard)) == []


def test_lr_loss_coupling_leaves_a_jump_without_an_lr_rise_alone() -> None:
    events = schedule(0)
    events = [
        (*e[:4], e[4] * 3, *e[5:]) if e[1] == "train/loss" and 1500 <= e[3] < 1510 else e
        for e in events
    ]
    assert run(LrLossCoupling(), events) == []  # a spike: Spike's business, not this one's


def test_lr_loss_coupling_snapshot() -> None:
    assert_snapshot_identical(LrLossCoupling, schedule(1, steps=1800, jump_at=1500))


# -- liveness -----------------------------------------------------------------------------


def steady(
    ranks: int, steps: int, interval: float = 1.0, start: float = 1000.0, first: int = 0
) -> list[Event]:
    """Every rank completes a step every ``interval`` seconds; a check (heartbeats on time)
    every 2 s."""
    events: list[Event] = []
    for i in range(steps):
        t = start + interval * i
        for rank in range(ranks):
            events.append(point("train/step_time", rank, first + i, interval, t + 0.01 * rank))
        if i % 2 == 0:
            events.append(check(t + 0.5, {r: t + 0.4 for r in range(ranks)}))
    return events


def stuck(ranks: int, start: float, until: float, every: float = 2.0) -> list[Event]:
    """Checks while heartbeats keep arriving and no rank makes progress."""
    return [
        check(t, {r: t - 0.1 for r in range(ranks)})
        for t in np.arange(start, until, every).tolist()
    ]


def test_liveness_finds_a_hang_after_five_step_intervals() -> None:
    detector = Liveness(min_timeout=3.0)
    events = steady(1, 100) + stuck(1, 1100.5, 1200.0)  # last step 99 at 1099
    dated = [(e[1], a) for e in events for a in run(detector, [e])]
    # Timeout 5 s (5 x the 1 s interval). Step 99 is placed at the next check's heartbeat
    # (1100.4), so the first check whose heartbeat is past 1105.4 finds the hang.
    assert [(t, a.kind, a.rank, a.step) for t, a in dated] == [(1106.5, "hang", 0, 99)]
    hang = dated[0][1]
    assert hang.severity == "critical" and hang.key == "train/step_time"
    assert hang.evidence["timeout_s"] == 5.0 and hang.evidence["interval_s"] == 1.0
    assert detector.timeout() == 5.0


def test_liveness_learns_the_pauses_of_a_healthy_run() -> None:
    # An evaluation every 200 steps: the first takes 30 s (within min_timeout), the later
    # ones 100 s (beyond it, within 5 x the first). Never a hang.
    events: list[Event] = []
    t = 1000.0
    for step in range(1000):
        if step % 200 == 199:  # checks during the pause, heartbeats still arriving
            pause = 30.0 if step == 199 else 100.0
            events += stuck(1, t + 1.5, t + pause)
            t += pause
        else:
            t += 1.0
        events.append(point("train/loss", 0, step, 1.0, t))
        events.append(check(t + 0.5, {0: t + 0.5}))
    detector = Liveness(min_timeout=60.0)
    assert run(detector, events) == []
    assert detector.timeout() == 500.0  # 5 x the longest pause seen


def test_liveness_hang_ends_at_the_next_progress_and_is_not_learned() -> None:
    events = (
        steady(1, 20)
        + stuck(1, 1020.5, 1060.0)
        + steady(1, 20, start=1060.0, first=20)
        + stuck(1, 1080.5, 1130.0)
    )
    detector = Liveness(min_timeout=10.0)
    assert summary(run(detector, events)) == [("hang", 0, 19), ("hang", 0, 39)]
    assert detector.timeout() == 10.0  # the 41 s stall was a hang, not a step interval


def test_liveness_reports_ranks_that_hang_together_once() -> None:
    events = steady(8, 50)
    # Rank 5 stops one step before the others (the culprit); then nothing moves.
    events = [e for e in events if not (e[0] == "p" and e[2] == 5 and e[3] == 49)]
    found = run(Liveness(min_timeout=3.0), events + stuck(8, 1050.5, 1100.0))
    assert summary(found) == [("hang", 5, 48)]  # the others joined the incident
    assert "5 (step 48)" in found[0].message
    # All at the same time: one anomaly names them all.
    found = run(Liveness(min_timeout=3.0), steady(8, 50) + stuck(8, 1050.5, 1100.0))
    assert [(a.kind, a.evidence["ranks"]) for a in found] == [("hang", 8.0)]
    assert "0 (step 49), 1 (step 49)" in found[0].message


def two_ranks(until: float, silent_from: float | None = None, start: float = 1000.0) -> list[Event]:
    """Two ranks stepping every second, checks every 5 s; rank 1 (points and heartbeats)
    silent from ``silent_from``."""
    events: list[Event] = []
    last = {0: start, 1: start}
    for i in range(int(until - start)):
        t = start + i
        for rank in (0, 1):
            if rank == 0 or silent_from is None or t < silent_from:
                events.append(point("train/step_time", rank, int(t), 1.0, t))
                last[rank] = t + 0.1
        if i % 5 == 1:
            events.append(check(t + 0.5, dict(last)))
    return events


def test_liveness_finds_a_silent_agent_and_clears_it() -> None:
    detector = Liveness(min_timeout=10.0, silent_after=30.0)
    events = two_ranks(1080.0, silent_from=1010.0)  # rank 1's last contact: 1009.1
    dated = [(e[1], a) for e in events for a in run(detector, [e])]
    assert [(t, a.kind, a.rank, a.step) for t, a in dated] == [(1041.5, "agent_silent", 1, 1009)]
    assert dated[0][1].evidence["quiet_s"] == pytest.approx(32.4)
    # Rank 1 comes back (a heartbeat and steps): the silence is over, and no hang either.
    back = two_ranks(1120.0, start=1080.0)
    assert run(detector, back) == []
    again = two_ranks(1200.0, silent_from=1150.0, start=1120.0)
    assert summary(run(detector, again)) == [("agent_silent", 1, 1149)]  # a new episode


def test_liveness_gives_agents_time_after_the_collector_was_away() -> None:
    detector = Liveness(min_timeout=60.0, silent_after=30.0)
    run(detector, two_ranks(1010.0))
    # No check for 10 minutes (the collector was restarted): the heartbeats it knows are old.
    assert detector.check(1700.0, {0: 1009.1, 1: 1009.1}) == []
    events = [point("train/step_time", 0, 1720, 1.0, 1720.0), check(1725.0, {0: 1724.0, 1: 1009.1})]
    assert run(detector, events) == []
    assert summary(detector.check(1731.0, {0: 1730.0, 1: 1009.1})) == [("agent_silent", 1, 1009)]


def test_liveness_counts_a_rollback_and_ignores_late_points() -> None:
    detector = Liveness(min_timeout=3.0)
    events = steady(1, 50)  # steps 0..49 until 1049
    # A late point from before (step 10, measured at 1010) is no progress; a rollback to
    # step 20 measured after the last progress is (a 5 s interval).
    events += [point("train/loss", 0, 10, 1.0, 1010.0), *stuck(1, 1050.5, 1054.0)]
    events += [point("train/loss", 0, 20, 1.0, 1054.0), *stuck(1, 1054.5, 1090.0)]
    found = run(detector, events)
    assert summary(found) == [("hang", 0, 20)]
    assert found[0].evidence["timeout_s"] == 25.0


def test_liveness_waits_longer_for_the_first_step() -> None:
    events = [point("sys/cpu_percent", 0, 0, 50.0, 1000.0), *stuck(1, 1000.0, 1700.0, 10.0)]
    found = run(Liveness(min_timeout=60.0, startup_timeout=600.0), events)
    assert [(a.kind, a.step) for a in found] == [("hang", 0)]
    assert found[0].evidence["timeout_s"] == 600.0
    assert (
        run(Liveness(min_timeout=60.0, startup_timeout=None), events)[0].evidence["timeout_s"]
        == 60.0
    )


def test_liveness_is_silent_on_a_healthy_run_and_judges_nothing_without_heartbeats() -> None:
    rng = np.random.default_rng(0)
    events: list[Event] = []
    t = 1000.0
    for step in range(3000):
        t += float(rng.lognormal(0, 0.5))  # heavy-tailed step times around 1 s
        events.append(point("train/step_time", 0, step, 1.0, t))
        if step % 3 == 0:
            events.append(check(t + 0.2, {0: t + 0.1}))
    assert run(Liveness(min_timeout=30.0), events) == []
    detector = Liveness(min_timeout=3.0)
    run(detector, steady(1, 10))
    assert detector.check(2000.0, {}) == []  # no heartbeats known for rank 0: nothing judged


def test_liveness_snapshot() -> None:
    events = steady(2, 60) + stuck(2, 1060.5, 1100.0) + steady(2, 30, start=1100.0, first=60)
    events += stuck(2, 1130.5, 1200.0)
    assert_snapshot_identical(lambda: Liveness(min_timeout=5.0), events)


# -- straggler ----------------------------------------------------------------------------


def ranks_timing(
    seed: int,
    steps: int,
    ranks: int,
    *,
    sync: bool,
    cv: float = 0.3,
    slow: int | None = None,
    onset: int = 0,
    via: str = "step",
) -> list[Event]:
    """Step times and data waits of ``ranks`` ranks around 0.1 s; synchronous ranks share one
    step time. Rank 0 evaluates for 3 s every 200 steps. From ``onset`` rank ``slow`` takes
    0.1 s longer, in its step (``via="step"``) or before it (``via="wait"``)."""
    rng = np.random.default_rng(seed)
    events = []
    for step in range(steps):
        evaluation = step % 200 == 199
        common = 0.1 * rng.lognormal(0, cv) + (3.0 if evaluation else 0.0)
        extra = 0.1 if slow is not None and step >= onset else 0.0
        for rank in range(ranks):
            wait = 0.002 * rng.lognormal(0, 1.0) + (3.0 if rank == 0 and evaluation else 0.0)
            time = common if sync else 0.1 * rng.lognormal(0, cv) + (wait if rank == 0 else 0)
            if extra and sync and via == "wait":  # everyone waits for the slow rank's data
                time += extra
            if extra and not sync and rank == slow:
                time += extra
            if extra and rank == slow and via == "wait":
                wait += extra
            events.append(point("train/data_wait", rank, step, wait))
            events.append(point("train/step_time", rank, step, time))
    return events


def test_straggler_names_the_rank_that_waits_for_its_data() -> None:
    # Synchronous data parallel: both ranks' step times double, rank 1's data wait grows.
    found = run(Straggler(), ranks_timing(0, 400, 2, sync=True, slow=1, onset=200, via="wait"))
    assert summary(found) == [("straggler", 1, 218)]
    assert found[0].key == "train/data_wait" and found[0].evidence["relative_performance"] < 0.75
    for seed in range(1, 5):
        events = ranks_timing(seed, 400, 8, sync=True, slow=3, onset=200, via="wait")
        found = run(Straggler(), events)
        assert [(a.rank, a.key) for a in found] == [(3, "train/data_wait")]
        assert 212 <= found[0].step <= 222


def test_straggler_names_the_slow_rank_among_independent_ones() -> None:
    found = run(Straggler(), ranks_timing(0, 400, 8, sync=False, slow=6, onset=200))
    assert summary(found) == [("straggler", 6, 219)]
    assert found[0].key == "train/step_time"
    assert "rank 6 is a straggler" in found[0].message


@pytest.mark.parametrize(("ranks", "sync"), [(2, True), (8, True), (2, False), (8, False)])
def test_straggler_is_silent_on_healthy_ranks(ranks: int, sync: bool) -> None:
    for seed in range(3):
        assert run(Straggler(), ranks_timing(seed, 2000, ranks, sync=sync)) == []


def test_straggler_needs_two_ranks_and_reports_once_per_episode() -> None:
    one = [e for e in ranks_timing(0, 400, 2, sync=False, slow=0, onset=100) if e[2] == 0]
    assert run(Straggler(), one) == []
    events = ranks_timing(0, 300, 4, sync=False, slow=2, onset=100)  # slow from 100 on
    healed = ranks_timing(1, 200, 4, sync=False)  # healthy again
    again = ranks_timing(2, 200, 4, sync=False, slow=2, onset=0)
    shift = [(*e[:3], e[3] + 300, *e[4:]) for e in healed]
    shift += [(*e[:3], e[3] + 500, *e[4:]) for e in again]
    found = run(Straggler(), events + shift)
    assert [(a.rank, a.step // 100) for a in found] == [(2, 1), (2, 5)]


def test_straggler_snapshot() -> None:
    assert_snapshot_identical(
        Straggler, ranks_timing(4, 400, 4, sync=True, slow=2, onset=150, via="wait")
    )


# -- system outlier -----------------------------------------------------------------------


def system(seed: int, samples: int, rank: int = 0) -> Iterator[tuple[int, dict[str, float]]]:
    """Noisy healthy system samples of one rank, (trainer step, values) every 5 s: bursty disk
    reads, a checkpoint write burst every 30 min, autocorrelated CPU, network and power, a
    slowly wandering temperature, and a 30 s evaluation every 33 min (no step advances, the
    GPU idles) with one odd utilisation dip now and then."""
    rng = np.random.default_rng([seed, rank])
    ar = np.zeros(4)
    step = 0
    for i in range(samples):
        ar = 0.8 * ar + rng.normal(0, 1, 4)
        evaluation = i % 400 >= 394
        step += 0 if evaluation else 10
        util = 30.0 if evaluation else min(100.0, 97 + rng.normal(0, 2))
        yield (
            step,
            {
                "sys/cpu_percent": 35 + 3 * ar[0] + (20 if rng.random() < 0.02 else 0),
                "sys/proc_cpu_percent": 110 + rng.normal(0, 10),
                "sys/mem_used_percent": 45 + math.sin(i / 500) + rng.normal(0, 0.2),
                "sys/mem_available_gb": 200.0,
                "sys/proc_rss_gb": 6.0 + 0.00005 * i + rng.normal(0, 0.01),
                "sys/disk_read_mb_s": rng.exponential(2)
                + (rng.uniform(100, 500) if rng.random() < 0.05 else 0),
                "sys/disk_write_mb_s": 0.5 + rng.exponential(0.3) + (800 if i % 360 < 2 else 0),
                "sys/net_sent_mb_s": 300 + 20 * ar[1],
                "sys/net_recv_mb_s": 300 + 20 * ar[2],
                "sys/gpu0/util_percent": 60.0 if i % 700 == 650 else util,
                "sys/gpu0/mem_used_gb": 60 + rng.normal(0, 0.01),
                "sys/gpu0/mem_total_gb": 80.0,
                "sys/gpu0/temp_c": 68 + 2 * math.sin(i / 300) + rng.normal(0, 0.5),
                "sys/gpu0/power_w": 550 + 25 * ar[3] + rng.normal(0, 10),
                "sys/gpu0/ecc_corrected": float(i // 1000),  # a counter: left out
            },
        )


FAULTS: dict[str, Callable[[dict[str, float], int], None]] = {
    "leak": lambda s, j: s.__setitem__("sys/proc_rss_gb", s["sys/proc_rss_gb"] + 0.02 * j),
    "throttle": lambda s, j: s.update(
        {
            "sys/gpu0/temp_c": s["sys/gpu0/temp_c"] + 15,
            "sys/gpu0/power_w": 0.65 * s["sys/gpu0/power_w"],
        }
    ),
    "contention": lambda s, j: s.__setitem__("sys/cpu_percent", s["sys/cpu_percent"] + 40),
    "network": lambda s, j: s.update(
        {k: 0.3 * s[k] for k in ("sys/net_sent_mb_s", "sys/net_recv_mb_s")}
    ),
}


def system_events(
    seed: int, samples: int, ranks: int = 4, fault: str | None = None, onset: int = 0, on: int = 1
) -> list[Event]:
    """Every rank's samples, interleaved as they arrive; ``fault`` on rank ``on`` from sample
    ``onset`` on."""
    streams = [system(seed, samples, rank) for rank in range(ranks)]
    events = []
    for i in range(samples):
        for rank, stream in enumerate(streams):
            step, values = next(stream)
            if fault is not None and rank == on and i >= onset:
                FAULTS[fault](values, i - onset)
            wall = 1000.0 + 5.0 * i + 0.01 * rank
            events += [point(key, rank, step, value, wall) for key, value in values.items()]
    return events


def sample_of(anomaly: Anomaly) -> int:
    """The index of the sample an anomaly was found in (the first at its step)."""
    return next(i for i, (step, _) in enumerate(system(0, 10**6)) if step == anomaly.step)


def test_system_outlier_is_silent_on_healthy_noisy_metrics() -> None:
    for seed in range(3):
        assert run(SystemOutlier(), system_events(seed, 3000)) == []


@pytest.mark.parametrize(
    ("fault", "keys", "first", "bounds"),
    [
        ("leak", ("sys/proc_rss_gb",), 1070, (1060, 1080)),  # found at +1.4 GB (+23 %)
        # Seed 0's sample 999 holds a disk-read burst: with it, six outlying samples in a row
        # end at 1004.
        ("throttle", ("sys/gpu0/temp_c", "sys/gpu0/power_w"), 1004, (1004, 1005)),
        ("contention", ("sys/cpu_percent",), 1004, (1004, 1005)),
        ("network", ("sys/net_recv_mb_s", "sys/net_sent_mb_s"), 1004, (1004, 1005)),
    ],
)
def test_system_outlier_finds_faults_on_one_rank(
    fault: str, keys: tuple[str, ...], first: int, bounds: tuple[int, int]
) -> None:
    for seed in range(3):
        found = run(SystemOutlier(), system_events(seed, 1200, fault=fault, onset=1000))
        assert [(a.kind, a.rank) for a in found] == [("system_outlier", 1)], summary(found)
        assert found[0].key in keys and found[0].key in found[0].message
        sample = sample_of(found[0])
        assert sample == first if seed == 0 else bounds[0] <= sample <= bounds[1]


def test_system_outlier_judges_a_sample_as_soon_as_it_is_complete() -> None:
    events = system_events(0, 1100, ranks=1, fault="throttle", onset=1000, on=0)
    detector = SystemOutlier()
    for index, event in enumerate(events):
        if (a := run(detector, [event])) != []:
            # Found at the last key of the faulty sample that it judges, not at the next
            # sample's first: what follows in that sample is left out.
            rest = [e[1] for e in events[index + 1 :] if e[5] == event[5]]
            assert event[3] == a[0].step and rest == ["sys/gpu0/ecc_corrected"]
            break
    else:
        pytest.fail("no finding")


def test_system_outlier_judges_only_while_the_trainer_progresses() -> None:
    events = system_events(0, 400, ranks=1)
    last_step = events[-1][3]
    wild = [
        point(e[1], 0, last_step, e[4] * 5, e[5] + 5.0 * 400)  # a pause: the step stays put
        for e in system_events(1, 100, ranks=1)
    ]
    assert run(SystemOutlier(), events + wild) == []


def test_system_outlier_state_is_bounded() -> None:
    detector = SystemOutlier(reference_size=64)
    run(detector, system_events(0, 500, ranks=8))
    assert detector._reference.shape == (64, 12)  # 16 keys less 4 left out
    assert all(r.healthy == [] for r in detector._ranks.values())
    assert len(detector.snapshot()) < 64 * 12 * 8 + 8 * 2000


def test_system_outlier_snapshot() -> None:
    assert_snapshot_identical(
        lambda: SystemOutlier(skip=2, window=20),
        system_events(2, 200, ranks=2, fault="contention", onset=120),
    )


# -- routing ------------------------------------------------------------------------------


def test_engine_routes_each_detector_its_keys() -> None:
    by_kind = {
        "generalization_gap": RunRule(GeneralizationGap),
        "lr_loss_jump": RunRule(LrLossCoupling),
        "hang": RunRule(Liveness, {"min_timeout": 30.0}),
        "straggler": RunRule(Straggler),
        "system_outlier": RunRule(SystemOutlier, {"skip": 2, "window": 20}),
    }
    rules = list(by_kind.values())
    streams = {
        "generalization_gap": overfitting(0),
        "lr_loss_jump": schedule(0, steps=1600, jump_at=1500),
        "straggler": ranks_timing(0, 400, 2, sync=True, slow=1, onset=200, via="wait"),
        "system_outlier": system_events(0, 200, ranks=2, fault="contention", onset=100),
    }
    for kind, events in streams.items():  # each run's engine finds its fault, and only it
        engine = Engine([], rules)
        found = [a for event in events for a in engine.observe(*event[1:])]
        assert [a.kind for a in found] == [kind]
        assert found == run(by_kind[kind].make(), events)  # as when fed directly
    # Every point reached the liveness detector too; now time passes with no progress.
    restored = Engine.restore(engine.snapshot())
    for e in (engine, restored):
        assert e.check(2000.0, {0: 1999.0}) == []  # the first check only places progress
        assert [a.kind for a in e.check(2031.0, {0: 2030.0})] == ["hang"]
