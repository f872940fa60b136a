"""Every training and system signal of a watched loop arrives at a real collector, right."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import runwatch
from runwatch.agent import Run
from runwatch.agent.distributed import Placement
from runwatch.agent.options import resolve
from runwatch.agent.safety import Faults
from runwatch.agent.system import SystemSampler
from tests.conftest import Collector

STEPS = 12


class Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(3))
        self.head = nn.Linear(16, 32)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _train(run: Run, steps: int = STEPS) -> tuple[list[float], list[float], list[float]]:
    """A real loop; returns what torch itself says the loss, grad norm and lr were."""
    torch.manual_seed(0)
    model = Blocks()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5)
    run.watch(model, optimizer, scheduler, layer_every=5, activation_every=4)
    losses, norms, lrs = [], [], []
    for _ in range(steps):
        tokens = torch.randint(0, 32, (8, 10))
        logits = model(tokens)
        loss = nn.functional.cross_entropy(logits.reshape(-1, 32), tokens.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        norms.append(float(nn.utils.clip_grad_norm_(model.parameters(), math.inf)))
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
        run.log({"train/loss": loss})
        losses.append(loss.item())
    return losses, norms, lrs


def _values(collector: Collector, run_id: int, key: str) -> dict[int, float]:
    with collector.client() as client:
        points = client.metrics(run_id, key, max_points=10_000)["points"]
    return {step: value for step, _, value in points}


def test_watched_loop_signals_arrive_with_torchs_values(
    collector: Collector, spool_dir: Path
) -> None:
    run = runwatch.init(
        project="agent",
        name="signals",
        server=collector.url,
        spool_dir=spool_dir,
        system_interval=0.05,
    )
    assert isinstance(run, Run)
    losses, norms, lrs = _train(run)
    assert run.flush(20)
    run.finish()

    assert list(_values(collector, run.id, "train/loss").values()) == pytest.approx(losses)
    grad = _values(collector, run.id, "train/grad_norm")
    assert list(grad) == list(range(STEPS))
    assert list(grad.values()) == pytest.approx(norms, rel=1e-5)
    assert list(_values(collector, run.id, "train/lr").values()) == pytest.approx(lrs)
    for key in ("train/step_time", "train/samples_per_s", "train/tokens_per_s"):
        values = _values(collector, run.id, key)
        assert len(values) == STEPS and all(v > 0 for v in values.values()), key
    wait = _values(collector, run.id, "train/data_wait")  # from the end of the previous step
    assert list(wait) == list(range(1, STEPS)) and all(v > 0 for v in wait.values())
    samples = _values(collector, run.id, "train/samples_per_s")
    step_time = _values(collector, run.id, "train/step_time")
    assert samples[3] == pytest.approx(8 / step_time[3])

    with collector.client() as client:
        keys = {s["key"]: s for s in client.series(run.id)}
    layers = {"embed", "blocks.0.0", "blocks.1.0", "blocks.2.0", "head"}
    for signal in ("grad_norm", "param_norm", "update_ratio"):
        assert {k.split("/", 1)[1] for k in keys if k.startswith(f"{signal}/")} == layers
        assert keys[f"{signal}/head"]["n_points"] == len(range(0, STEPS, 5))
    stats = ("mean", "std", "abs_max", "zero_frac", "nonfinite_frac")
    for block in ("blocks.0", "blocks.1", "blocks.2"):  # "auto": the ModuleList's children
        for stat in stats:
            assert keys[f"act/{block}/{stat}"]["n_points"] == len(range(0, STEPS, 4))
    zero = _values(collector, run.id, "act/blocks.0/zero_frac")
    assert all(0.2 < v < 0.8 for v in zero.values()), "a ReLU output is about half zeros"
    assert {"sys/mem_used_percent", "sys/proc_rss_gb", "sys/mem_available_gb"} <= set(keys)


def test_a_failing_sampler_leaves_training_and_the_other_signals_alone(
    collector: Collector, spool_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: SystemSampler) -> dict[str, float]:
        raise RuntimeError("psutil exploded")

    monkeypatch.setattr(SystemSampler, "sample", broken)  # a fault we cannot provoke otherwise
    faults = Faults()
    options = resolve(
        "agent",
        name="sampler-fault",
        server=collector.url,
        spool_dir=spool_dir,
        system_interval=0.01,
    )
    run = Run(options, Placement(0, 1, 0), faults=faults)
    losses, _, _ = _train(run)
    assert run.flush(20)
    run.finish()
    assert faults.failed("system sampler")
    assert set(faults.counts()) == {"system sampler"}
    assert list(_values(collector, run.id, "train/loss").values()) == pytest.approx(losses)
    assert len(_values(collector, run.id, "train/grad_norm")) == STEPS
