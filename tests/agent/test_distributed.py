"""Two real ranks (gloo on loopback): one run, every rank's timings and system metrics tagged
with its rank, training scalars from rank 0 only."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import runwatch
from tests.agent.conftest import free_port
from tests.conftest import Collector, start_collector

STEPS = 12
WORLD = 2


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[Collector]:
    """SQLite only: the storage path is not what this test is about, and ranks take seconds."""
    yield from start_collector(f"sqlite:///{tmp_path / 'collector.db'}")


def _train(rank: int, port: int, server: str, spool: str, all_ranks: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(
            nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        )
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        run = runwatch.init(  # no name: rank 0 makes one and every rank uses it
            project="ddp",
            server=server,
            spool_dir=spool,
            system_interval=0.2,
            heartbeat_interval=0.2,
            all_ranks=all_ranks,
        )
        run.watch(model, optimizer, layer_every=4, activation_every=0)
        generator = torch.Generator().manual_seed(rank)
        for _ in range(STEPS):
            x = torch.randn(32, 8, generator=generator)
            loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            run.log({"train/loss": loss})
        assert run.flush(30)
        dist.barrier()  # rank 0 ends the run only after every rank delivered
        run.finish()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("all_ranks", [False, True], ids=["rank0-scalars", "all-ranks"])
def test_two_gloo_ranks_share_one_run_tagged_by_rank(
    collector: Collector, spool_dir: Path, all_ranks: bool
) -> None:
    args = (free_port(), collector.url, str(spool_dir), all_ranks)
    mp.start_processes(_train, args=args, nprocs=WORLD, start_method="spawn", join=True)
    with collector.client() as client:
        runs = client.runs(project="ddp")
        assert len(runs) == 1 and runs[0]["state"] == "finished"
        series = client.series(runs[0]["id"])
    by_rank = {r: {s["key"]: s for s in series if s["rank"] == r} for r in range(WORLD)}
    for rank in range(WORLD):
        keys = by_rank[rank]
        assert keys["train/step_time"]["n_points"] == STEPS, rank
        assert {"train/data_wait", "train/samples_per_s", "sys/proc_rss_gb"} <= set(keys)
    assert by_rank[0]["train/loss"]["n_points"] == STEPS
    assert by_rank[0]["train/grad_norm"]["n_points"] == STEPS
    assert {"grad_norm/module.0", "grad_norm/module.2"} <= set(by_rank[0])
    if all_ranks:
        assert by_rank[1]["train/loss"]["n_points"] == STEPS
    else:
        scalars = ("train/loss", "train/grad_norm", "grad_norm/")
        assert not any(key.startswith(scalars) for key in by_rank[1])
