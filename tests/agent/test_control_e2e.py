"""An operator's command travels the whole way: API -> ingest reply -> applied at its step in a
real training loop -> acknowledged -> visible in the audit log and as a series."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

import runwatch
from tests.conftest import Collector


def test_an_lr_cut_reaches_the_loop_at_its_step_and_is_acknowledged_once(
    collector: Collector, spool_dir: Path
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1000, gamma=0.5)
    run = runwatch.init(
        project="control",
        name="e2e",
        server=collector.url,
        spool_dir=spool_dir,
        system_interval=0,
        flush_interval=0.05,
    )
    run.watch(model, optimizer, scheduler)

    def step() -> None:
        x = torch.randn(16, 8)
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        run.log({"train/loss": loss})
        assert run.flush(10)

    for _ in range(5):
        step()
    with collector.client() as client:
        # at_step explicit: by default the collector leaves ~5 s of steps for delivery, which
        # is thousands of steps of this toy loop
        command = client.issue_command(
            run.id, "lr_scale", at_step=run.step + 5, factor=0.5, steps=3
        )
        at = command["at_step"]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            step()
            audit = client.commands(run.id)[0]
            if audit["state"] == "applied" and run.step > at + 4:
                break
        run.finish()
        audit = client.commands(run.id)[0]
        lr = {s: v for s, _, v in client.metrics(run.id, "train/lr", max_points=10_000)["points"]}
        applied = {s: v for s, _, v in client.metrics(run.id, "control/lr_scale")["points"]}
    assert audit["state"] == "applied" and audit["source"].startswith("api:")
    assert [(a["rank"], a["status"], a["step"]) for a in audit["acks"]] == [(0, "applied", at)]
    assert applied == {at: 0.5}
    assert [lr[s] for s in range(at - 1, at + 4)] == [0.1, 0.05, 0.05, 0.05, 0.1]
