"""Rollback on real tiny models: the loop iterates ``run.data(...)``; a rollback command restores
the checkpoint at its step, resets the step counter, drops batches, cuts the learning rate, and
happens once; under DDP both ranks end identical and equal to the checkpoint.

Expected trajectories are computed next to the test by a plain loop that loads the same file,
never by the code under test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

import runwatch
from runwatch.agent.interventions import NEEDS_DATA
from runwatch.agent.run import Run
from tests.agent.conftest import free_port
from tests.agent.test_checkpoint import broken_on_request
from tests.agent.test_control import (
    FakeCollector,
    backward,
    deliver,
    mlp,
    params,
    start,
)
from tests.conftest import Collector, start_collector


def watched(run: Run, every: int = 5) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.5)
    run.watch(
        model, optimizer, scheduler, layer_every=0, activation_every=0, checkpoint_every=every
    )
    return model, optimizer, scheduler


def loop(
    run: Run, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, data: Any
) -> tuple[list[tuple[int, int]], dict[int, list[torch.Tensor]]]:
    """Train on ``run.data(data)``: (batch, step of its update) pairs, parameters at each fetch."""
    seen: list[tuple[int, int]] = []
    fetched: dict[int, list[torch.Tensor]] = {}
    for i in run.data(data):
        fetched[i] = params(model)
        optimizer.zero_grad()
        backward(model, i)
        optimizer.step()
        scheduler.step()
        seen.append((i, run.step))
        deliver(run)  # the collector's commands arrive, acks go out
    return seen, fetched


def rollback_args(path: Path, step: int, **extra: Any) -> dict[str, Any]:
    return {"checkpoint": 1, "path": str(path), "step": step, **extra}


def test_a_rollback_restores_the_checkpoint_skips_batches_and_cuts_the_lr(
    fake: FakeCollector, spool_dir: Path, tmp_path: Path
) -> None:
    run = start(fake, spool_dir)
    model, optimizer, scheduler = watched(run)
    path = tmp_path / "checkpoints" / "control" / "step-000000005.pt"
    args = rollback_args(path, 5, skip_batches=3, lr_factor=0.5, lr_steps=2)
    cid = fake.issue("rollback", args, at_step=12)
    deliver(run)
    seen, fetched = loop(run, model, optimizer, scheduler, range(25))
    run.finish()

    assert seen == [(i, i) for i in range(12)] + [(i, i - 10) for i in range(15, 25)]
    saved = torch.load(path, weights_only=True)
    assert all(torch.equal(a, b) for a, b in zip(fetched[15], saved["model"].values(), strict=True))
    (ack,) = fake.acks_of(cid)
    assert (ack["status"], ack["step"], ack["detail"]) == (
        "applied",
        12,
        "rolled back to step 5 (checkpoint 1), lr x 0.5 for 2 steps, skipped 3 batches",
    )
    assert fake.series("control/rollback") == {12: 5.0}
    lr = fake.series("train/lr")
    expected = {s: 0.1 * 0.5 ** (s // 4) * (0.5 if s in (5, 6) else 1) for s in range(15)}
    assert lr == pytest.approx(expected, rel=1e-12)  # the scheduler kept its schedule

    # The same from the file by hand: load, train on batches 15.., the lr cut for 2 steps.
    ref = mlp(seed=7)
    ref_optimizer = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    ref_scheduler = torch.optim.lr_scheduler.StepLR(ref_optimizer, step_size=4, gamma=0.5)
    ref.load_state_dict(saved["model"])
    ref_optimizer.load_state_dict(saved["optimizer"])
    ref_scheduler.load_state_dict(saved["scheduler"])
    for step, i in enumerate(range(15, 25), start=5):
        ref_optimizer.zero_grad()
        backward(ref, i)
        group = ref_optimizer.param_groups[0]
        unscaled = group["lr"]
        group["lr"] = unscaled * 0.5 if step in (5, 6) else unscaled
        ref_optimizer.step()
        group["lr"] = unscaled
        ref_scheduler.step()
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), model.parameters(), strict=True))
    assert scheduler.last_epoch == ref_scheduler.last_epoch == 15


def test_data_that_runs_out_while_skipping_ends_the_loop(
    fake: FakeCollector, spool_dir: Path, tmp_path: Path
) -> None:
    run = start(fake, spool_dir)
    model, optimizer, scheduler = watched(run)
    path = tmp_path / "checkpoints" / "control" / "step-000000005.pt"
    cid = fake.issue("rollback", rollback_args(path, 5, skip_batches=5), at_step=12)
    deliver(run)
    seen, _ = loop(run, model, optimizer, scheduler, iter(range(14)))
    assert run.flush(10)
    run.finish()
    assert seen == [(i, i) for i in range(12)]
    assert run.step == 5
    (ack,) = fake.acks_of(cid)
    assert ack["detail"] == (
        "rolled back to step 5 (checkpoint 1), skipped 2 of 5 batches: the data ran out"
    )


def test_a_redelivered_rollback_is_applied_once_even_when_its_step_comes_again(
    fake: FakeCollector, spool_dir: Path, tmp_path: Path
) -> None:
    run = start(fake, spool_dir)
    model, optimizer, scheduler = watched(run, every=3)
    path = tmp_path / "checkpoints" / "control" / "step-000000003.pt"
    cid = fake.issue("rollback", rollback_args(path, 3, skip_batches=1), at_step=6, replies=40)
    deliver(run)
    seen, _ = loop(run, model, optimizer, scheduler, range(14))
    run.finish()
    assert seen == [(i, i) for i in range(6)] + [(i, i - 4) for i in range(7, 14)]
    assert fake.served[cid] > 10  # it kept coming, also at the second pass of step 6
    acks = fake.acks_of(cid)
    assert {(a["status"], a["step"]) for a in acks} == {("applied", 6)}
    assert fake.series("control/rollback") == {6: 3.0}


def test_a_rollback_without_run_data_fails_at_its_step_and_changes_nothing(
    fake: FakeCollector, spool_dir: Path, tmp_path: Path
) -> None:
    run = start(fake, spool_dir)
    model, optimizer, scheduler = watched(run)
    path = tmp_path / "checkpoints" / "control" / "step-000000005.pt"
    cid = fake.issue("rollback", rollback_args(path, 5, skip_batches=2), at_step=7)
    deliver(run)
    for i in range(9):
        optimizer.zero_grad()
        backward(model, i)
        optimizer.step()
        scheduler.step()
        deliver(run)
    assert run.step == 8
    run.finish()
    (ack,) = fake.acks_of(cid)
    assert (ack["status"], ack["step"], ack["detail"]) == ("failed", 7, NEEDS_DATA)


def test_a_data_wrapper_never_iterated_leaves_rollbacks_to_the_pre_step_hook(
    fake: FakeCollector, spool_dir: Path, tmp_path: Path
) -> None:
    run = start(fake, spool_dir)
    model, optimizer, scheduler = watched(run)
    unused = run.data(range(10))  # made, but the loop iterates something else
    path = tmp_path / "checkpoints" / "control" / "step-000000005.pt"
    cid = fake.issue("rollback", rollback_args(path, 5, skip_batches=2), at_step=7)
    deliver(run)
    for i in range(9):
        optimizer.zero_grad()
        backward(model, i)
        optimizer.step()
        scheduler.step()
        deliver(run)
    run.finish()
    (ack,) = fake.acks_of(cid)
    assert (ack["status"], ack["step"], ack["detail"]) == ("failed", 7, NEEDS_DATA)
    assert list(unused) == list(range(10))


def test_a_rollback_the_optimizer_or_scheduler_refuses_changes_nothing_and_a_later_one_applies(
    fake: FakeCollector, spool_dir: Path, tmp_path: Path
) -> None:
    run = start(fake, spool_dir)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.5)
    run.watch(
        model,
        optimizer,
        scheduler,
        layer_every=0,
        activation_every=0,
        checkpoint_every=5,
        load=broken_on_request("scheduler"),
    )
    path = tmp_path / "checkpoints" / "control" / "step-000000005.pt"
    bad = fake.issue("rollback", rollback_args(Path(f"{path}#broken"), 5), at_step=7)
    good = fake.issue("rollback", rollback_args(path, 5), at_step=9)
    deliver(run)
    seen, fetched = loop(run, model, optimizer, scheduler, range(14))
    run.finish()

    assert seen == [(i, i) for i in range(9)] + [(i, i - 4) for i in range(9, 14)]
    (ack,) = fake.acks_of(bad)
    assert (ack["status"], ack["step"]) == ("failed", 7)
    assert ack["detail"].startswith(f"rollback: cannot load {path}#broken: ValueError")
    (ack,) = fake.acks_of(good)
    assert (ack["status"], ack["step"]) == ("applied", 9)
    assert fake.series("control/rollback") == {9: 5.0}
    # Untouched by the failed one: the model as a plain loop leaves it, the schedule going on.
    ref = mlp()
    ref_optimizer = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    ref_scheduler = torch.optim.lr_scheduler.StepLR(ref_optimizer, step_size=4, gamma=0.5)
    for i in range(7):
        ref_optimizer.zero_grad()
        backward(ref, i)
        ref_optimizer.step()
        ref_scheduler.step()
    assert all(torch.equal(a, b) for a, b in zip(fetched[7], ref.parameters(), strict=True))
    assert fake.series("train/lr")[7] == 0.05 and fake.series("train/lr")[8] == 0.025
    saved = torch.load(path, weights_only=True)
    assert all(torch.equal(a, b) for a, b in zip(fetched[9], saved["model"].values(), strict=True))


@pytest.mark.parametrize("fault", ["missing", "corrupt"])
def test_a_rollback_to_an_unreadable_file_fails_and_the_loop_goes_on(
    fake: FakeCollector, spool_dir: Path, tmp_path: Path, fault: str
) -> None:
    path = tmp_path / "step-000000002.pt"
    if fault == "corrupt":
        path.write_bytes(b"not a zip file")
    run = start(fake, spool_dir)
    model, optimizer, scheduler = watched(run)
    cid = fake.issue("rollback", rollback_args(path, 2, skip_batches=2), at_step=4)
    deliver(run)
    seen, _ = loop(run, model, optimizer, scheduler, range(8))
    run.finish()
    assert seen == [(i, i) for i in range(8)]
    (ack,) = fake.acks_of(cid)
    reason = "does not exist" if fault == "missing" else "cannot read"
    assert ack["status"] == "failed" and ack["step"] == 4
    assert ack["detail"].startswith("rollback: ") and reason in ack["detail"]
    assert not fake.series("control/rollback")


# -- two ranks ----------------------------------------------------------------------------------

WORLD = 2


def _ddp_rank(rank: int, port: int, server: str, spool: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = nn.parallel.DistributedDataParallel(mlp())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.7)
        run = runwatch.init(
            project="ddp-rollback",
            name="ddp-rollback",
            server=server,
            spool_dir=spool,
            system_interval=0,
            flush_interval=0.05,
            checkpoint_dir=f"{out}/checkpoints",
        )
        run.watch(
            model, optimizer, scheduler, layer_every=0, activation_every=0, checkpoint_every=4
        )
        generator = torch.Generator().manual_seed(rank)
        data = [(i, torch.randn(16, 4, generator=generator)) for i in range(16)]
        previous = -1
        for i, x in run.data(data):
            if run.step < previous:  # the first batch after the rollback
                torch.save(model.module.state_dict(), f"{out}/restored-{rank}.pt")
                torch.save(i, f"{out}/first-{rank}.pt")
            previous = run.step
            optimizer.zero_grad()
            F.mse_loss(model(x), x.sum(1, keepdim=True)).backward()
            optimizer.step()
            scheduler.step()
            if i == 0:
                assert run.flush(10)  # the reply to this rank's first batch had the commands
        assert run.flush(10)
        dist.barrier()
        run.finish()
        torch.save(model.module.state_dict(), f"{out}/final-{rank}.pt")
        dist.barrier()  # no rank tears the group down while the other still talks through it
    finally:
        dist.destroy_process_group()


def test_two_ranks_roll_back_at_the_same_step_and_stay_identical(
    fake: FakeCollector, spool_dir: Path, tmp_path: Path
) -> None:
    path = tmp_path / "checkpoints" / "ddp-rollback" / "step-000000004.pt"
    cut = fake.issue("lr_scale", {"factor": 0.5, "steps": 2}, at_step=2)
    args = rollback_args(path, 4, skip_batches=2, lr_factor=0.5, lr_steps=3)
    back = fake.issue("rollback", args, at_step=9)
    margs = (free_port(), fake.url, str(spool_dir), str(tmp_path))
    mp.start_processes(_ddp_rank, args=margs, nprocs=WORLD, start_method="spawn", join=True)
    saved = torch.load(path, weights_only=True)["model"]
    first = [torch.load(tmp_path / f"first-{rank}.pt") for rank in range(WORLD)]
    assert first == [11, 11]  # batches 9 and 10 skipped on both ranks
    for rank in range(WORLD):
        restored = torch.load(tmp_path / f"restored-{rank}.pt")
        assert all(torch.equal(restored[k], v) for k, v in saved.items())
    finals = [torch.load(tmp_path / f"final-{rank}.pt") for rank in range(WORLD)]
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in saved)
    assert not all(torch.equal(finals[0][k], v) for k, v in saved.items())
    for cid, step in ((cut, 2), (back, 9)):
        acks = sorted((a["rank"], a["status"], a["step"]) for a in fake.acks_of(cid))
        assert acks == [(0, "applied", step), (1, "applied", step)]
    assert [c["step"] for c in fake.checkpoints] == [4, 8, 8]  # rank 0 alone registers


# -- the whole way, on the real collector -------------------------------------------------------


@pytest.fixture
def quick_collector(db_url: str) -> Iterator[Collector]:
    """A collector that calls a checkpoint good 20 steps after it, not 100."""
    yield from start_collector(db_url, checkpoint_verify_steps=20, checkpoint_suspect_before=5)


def test_checkpoints_registered_with_the_collector_and_a_rollback_to_the_last_good_one(
    quick_collector: Collector, spool_dir: Path, tmp_path: Path
) -> None:
    run = runwatch.init(
        project="rollback",
        name="e2e",
        server=quick_collector.url,
        spool_dir=spool_dir,
        system_interval=0,
        flush_interval=0.05,
        checkpoint_dir=tmp_path / "checkpoints",
        keep_checkpoints=1,
    )
    assert isinstance(run, Run)
    model, optimizer, scheduler = watched(run, every=10)
    issued: dict[str, Any] | None = None
    steps: list[int] = []
    with quick_collector.client() as client:
        for i in run.data(range(200)):
            optimizer.zero_grad()
            backward(model, i)
            optimizer.step()
            scheduler.step()
            steps.append(run.step)
            run.log({"train/loss": 1.0})
            assert run.flush(10)
            if issued is None and run.step == 45:
                issued = client.issue_command(
                    run.id, "rollback", at_step=50, checkpoint="last_good", skip_batches=3
                )
            if issued is not None and run.step == 30 and len(steps) > 60:
                break
        run.finish()
        audit = client.commands(run.id)[0]
        listed = client.checkpoints(run.id, include_deleted=True)
        rolled = client.metrics(run.id, "control/rollback")["points"]
    assert issued is not None
    target = issued["args"]["step"]
    assert target == 20 and issued["args"]["path"].endswith("step-000000020.pt")
    ack = audit["acks"][0]
    assert (audit["state"], ack["status"], ack["step"]) == ("applied", "applied", 50)
    assert ack["detail"].startswith(
        f"rolled back to step 20 (checkpoint {issued['args']['checkpoint']})"
    )
    assert steps[:50] == list(range(50)) and steps[50:53] == [20, 21, 22]
    assert [(s, v) for s, _, v in rolled] == [(50, 20.0)]
    assert {c["step"] for c in listed} == {10, 20, 30, 40}
    for record in listed:  # the agent deleted what the collector dropped, and only that
        assert Path(record["path"]).exists() == (record["deleted_at"] is None), record
