"""Checkpoints on real tiny models: atomic saves, exact round trips (parameters, optimizer state,
scheduler, random generators), user hooks, loads that fail without touching the model, routine
and commanded checkpoints, registration with a fake collector and retention, and resume."""

from __future__ import annotations

import copy
import logging
import random
import re
from pathlib import Path
from typing import Any

import numpy
import pytest
import torch
from torch import nn

import runwatch
from runwatch.agent import DisabledRun
from runwatch.agent import control as control_module
from runwatch.agent.checkpoint import Checkpointer, CheckpointError, folder_name
from runwatch.agent.control import Control
from runwatch.agent.options import RESUME_FROM_ENV
from tests.agent.test_control import FakeCollector, backward, mlp, params, start


def train(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, steps: range) -> None:
    for step in steps:
        optimizer.zero_grad()
        backward(model, step)
        optimizer.step()
        scheduler.step()


def setup(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    model = mlp(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    return model, optimizer, scheduler


def draws() -> tuple[list[float], float, list[float]]:
    """One value from each random generator a checkpoint holds."""
    return torch.rand(3).tolist(), random.random(), numpy.random.rand(2).tolist()


class Flaky(nn.Module):
    """A module whose extra state cannot be pickled while ``broken``: torch.save fails after it
    has written part of the file."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()
        self.broken = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def get_extra_state(self) -> Any:
        return (lambda: None) if self.broken else {"ok": True}

    def set_extra_state(self, state: Any) -> None:
        pass


# -- the checkpointer ------------------------------------------------------------------------------


def test_a_failing_save_leaves_no_partial_file_and_earlier_ones_intact(tmp_path: Path) -> None:
    model = Flaky()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    checkpointer = Checkpointer(model, optimizer, directory=tmp_path)
    path = checkpointer.save(5)
    assert path is not None
    good = Path(path).read_bytes()
    model.broken = True
    with pytest.raises(CheckpointError, match=r"saving .*step-000000005-1\.pt failed"):
        checkpointer.save(5)
    with pytest.raises(CheckpointError):
        checkpointer.save(6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000005.pt"]  # no temp file
    assert Path(path).read_bytes() == good
    model.broken = False
    assert checkpointer.load(path) == 5


def test_a_round_trip_restores_parameters_optimizer_scheduler_and_random_generators(
    tmp_path: Path,
) -> None:
    model, optimizer, scheduler = setup()
    train(model, optimizer, scheduler, range(5))
    checkpointer = Checkpointer(model, optimizer, scheduler, directory=tmp_path)
    saved_params = params(model)
    saved_step = float(optimizer.state_dict()["state"][0]["step"])
    exp_avg = [optimizer.state[p]["exp_avg"].clone() for p in model.parameters()]
    random.seed(1)
    numpy.random.seed(2)
    path = checkpointer.save(5, "test")
    assert path is not None
    expected_draws = draws()
    train(model, optimizer, scheduler, range(5, 9))
    draws()
    assert scheduler.last_epoch == 9
    assert checkpointer.load(path) == 5
    assert all(torch.equal(a, b) for a, b in zip(saved_params, model.parameters(), strict=True))
    assert scheduler.last_epoch == 5 and scheduler.get_last_lr() == [0.005]
    assert optimizer.param_groups[0]["lr"] == 0.005
    for p, before in zip(model.parameters(), exp_avg, strict=True):
        assert torch.equal(optimizer.state[p]["exp_avg"], before)
        assert p.grad is None
    assert float(optimizer.state_dict()["state"][0]["step"]) == saved_step == 5
    assert draws() == expected_draws


def test_the_module_inside_a_wrapper_is_saved_without_its_prefix(tmp_path: Path) -> None:
    wrapped = nn.DataParallel(mlp(1))
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    path = Checkpointer(wrapped, optimizer, directory=tmp_path).save(0)
    assert path is not None
    state = torch.load(path, weights_only=True)
    assert sorted(state["model"]) == sorted(mlp().state_dict())
    plain = mlp(2)
    Checkpointer(plain, torch.optim.SGD(plain.parameters(), lr=0.1), directory=tmp_path).load(path)
    assert all(
        torch.equal(a, b) for a, b in zip(plain.parameters(), wrapped.parameters(), strict=True)
    )


@pytest.mark.parametrize("fault", ["missing", "garbage", "other model", "other optimizer"])
def test_a_load_that_fails_changes_nothing(tmp_path: Path, fault: str) -> None:
    model, optimizer, scheduler = setup()
    train(model, optimizer, scheduler, range(3))
    path = tmp_path / "step-000000003.pt"
    if fault == "garbage":
        path.write_bytes(b"PK\x03\x04 not a checkpoint")
    elif fault == "other model":
        other = nn.Sequential(nn.Linear(4, 9), nn.Tanh(), nn.Linear(9, 1))
        Checkpointer(other, torch.optim.Adam(other.parameters()), directory=tmp_path).save(3)
    elif fault == "other optimizer":
        twin = mlp()
        groups = [{"params": list(twin[0].parameters())}, {"params": list(twin[2].parameters())}]
        Checkpointer(twin, torch.optim.Adam(groups), directory=tmp_path).save(3)
    before, lr, epoch = params(model), optimizer.param_groups[0]["lr"], scheduler.last_epoch
    state = optimizer.state_dict()["state"][0]["exp_avg"].clone()
    checkpointer = Checkpointer(model, optimizer, scheduler, directory=tmp_path)
    reason = {
        "missing": "does not exist",
        "garbage": "cannot read",
        "other model": r"does not fit the model: 0.weight is \(8, 4\) in the model, \(9, 4\)",
        "other optimizer": "does not fit the optimizer",
    }[fault]
    with pytest.raises(CheckpointError, match=reason):
        checkpointer.load(str(path))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert optimizer.param_groups[0]["lr"] == lr and scheduler.last_epoch == epoch
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], state)


def test_user_hooks_replace_torch_save_and_load_and_their_files_are_never_pruned(
    tmp_path: Path,
) -> None:
    store: dict[str, dict[str, Any]] = {}
    model, optimizer, scheduler = setup()
    checkpointer = Checkpointer(
        model,
        optimizer,
        scheduler,
        directory=tmp_path,
        save=lambda path, state: store.__setitem__(path, copy.deepcopy(state)),
        load=lambda path: store[path],
    )
    path = checkpointer.save(2, "hooked")
    assert path is not None and list(store) == [path] and not Path(path).exists()
    before = params(model)
    train(model, optimizer, scheduler, range(2))
    assert checkpointer.load(path) == 2
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert not checkpointer.owns(path)


def test_registrations_queue_without_waiting_and_drop_the_oldest_beyond_the_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control_module, "MAX_REGISTRATIONS", 2)
    control = Control()
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    checkpointer = Checkpointer(model, optimizer, directory=tmp_path, control=control, keep=2)
    path = checkpointer.save(4, "r" * 600, command=17)
    registration = control.next_registration()
    assert registration is not None
    body = registration.body
    assert body["path"] == path and body["step"] == 4 and body["command"] == 17
    assert body["size_bytes"] == Path(path).stat().st_size and body["keep"] == 2
    assert body["reason"] == "r" * 500
    rank1 = Checkpointer(model, optimizer, directory=tmp_path / "r1", control=control, rank=1)
    assert rank1.save(4) is None and not (tmp_path / "r1").exists()
    for step in (5, 6, 7):
        checkpointer.save(step)
    queued = []
    while (registration := control.next_registration()) is not None:
        queued.append(registration.body["step"])
        control.registration_done(registration)
    assert queued == [6, 7] and control.registrations_dropped == 2  # 4 and 5 went


def test_a_run_folder_is_its_name_or_a_safe_and_unique_form_of_it() -> None:
    assert folder_name("exp/a b") != folder_name("exp_a_b") and folder_name("run-1") == "run-1"


def test_a_folder_whose_files_cannot_be_looked_up_fails_the_save_with_a_checkpoint_error(
    tmp_path: Path,
) -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    folder = tmp_path / ("x" * 300)  # too long a name: even stat fails
    checkpointer = Checkpointer(model, optimizer, directory=folder)
    with pytest.raises(CheckpointError, match=r"saving step 4 in .*x failed: OSError: .*too long"):
        checkpointer.save(4)


def broken_on_request(part: str) -> Any:
    """A ``load`` hook: the file's state, with ``part`` spoiled when the path ends in
    ``#broken`` (past the agent's checks: the watched object itself refuses it)."""

    def load(path: str) -> dict[str, Any]:
        state = torch.load(path.removesuffix("#broken"), weights_only=True)
        if path.endswith("#broken"):
            if part == "optimizer":
                state["optimizer"] = {**state["optimizer"], "state": "spoiled"}
            elif part == "scheduler":
                state["scheduler"] = "spoiled"
            else:
                state["rng"] = {**state["rng"], "python": "spoiled"}
        return state

    return load


@pytest.mark.parametrize("part", ["optimizer", "scheduler", "rng"])
def test_a_state_a_watched_object_refuses_leaves_every_object_as_it_was(
    tmp_path: Path, part: str
) -> None:
    model, optimizer, scheduler = setup()
    checkpointer = Checkpointer(
        model, optimizer, scheduler, directory=tmp_path, load=broken_on_request(part)
    )
    train(model, optimizer, scheduler, range(3))
    path = checkpointer.save(3)
    assert path is not None
    train(model, optimizer, scheduler, range(3, 5))
    before, lr, epoch = params(model), optimizer.param_groups[0]["lr"], scheduler.last_epoch
    exp_avg = [optimizer.state[p]["exp_avg"].clone() for p in model.parameters()]
    generators = torch.get_rng_state(), random.getstate(), numpy.random.get_state()
    with pytest.raises(CheckpointError, match=rf"cannot load {re.escape(path)}#broken: \w+Error"):
        checkpointer.load(f"{path}#broken")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert optimizer.param_groups[0]["lr"] == lr and scheduler.last_epoch == epoch == 5
    for p, moment in zip(model.parameters(), exp_avg, strict=True):
        assert torch.equal(optimizer.state[p]["exp_avg"], moment) and p.grad is not None
    got = draws()
    torch.set_rng_state(generators[0])
    random.setstate(generators[1])
    numpy.random.set_state(generators[2])
    assert got == draws()
    assert checkpointer.load(path) == 3 and scheduler.last_epoch == 3  # a sound one still loads


# -- through the run ------------------------------------------------------------------------------


def test_routine_checkpoints_are_registered_and_retention_deletes_the_agents_files(
    fake: FakeCollector, spool_dir: Path, tmp_path: Path
) -> None:
    fake.fail_registrations = 2  # the collector is away for a moment: registrations wait
    run = start(fake, spool_dir, keep_checkpoints=2)
    model, optimizer, scheduler = setup()
    run.watch(model, optimizer, scheduler, layer_every=0, activation_every=0, checkpoint_every=3)
    folder = tmp_path / "checkpoints" / "control"
    folder.mkdir(parents=True)
    stranger = folder / "notes.txt"
    stranger.write_text("not a checkpoint of the agent")
    fake.checkpoints.append({"id": 1, "path": str(stranger), "step": 0, "deleted": False})
    for step in range(10):
        optimizer.zero_grad()
        backward(model, step)
        optimizer.step()
        scheduler.step()
    manual = run.checkpoint("before eval")
    assert run.flush(10)
    run.finish()
    assert manual == str(folder / "step-000000010.pt")
    registered = [(c["step"], c.get("reason"), c["deleted"]) for c in fake.checkpoints]
    assert registered == [
        (0, None, True),  # pruned by the collector, but not a file this agent wrote
        (3, "routine", True),
        (6, "routine", True),
        (9, "routine", False),
        (10, "before eval", False),
    ]
    assert sorted(p.name for p in folder.glob("*.pt")) == ["step-000000009.pt", manual[-17:]]
    assert stranger.exists()
    assert fake.series("control/checkpoint") == {3: 3.0, 6: 6.0, 9: 9.0, 10: 10.0}


def test_a_checkpoint_command_saves_the_state_after_its_step_updates(
    fake: FakeCollector, spool_dir: Path, tmp_path: Path
) -> None:
    run = start(fake, spool_dir)
    model, optimizer, scheduler = setup()
    run.watch(model, optimizer, scheduler, layer_every=0, activation_every=0)
    cid = fake.issue("checkpoint", {"reason": "before lr change"}, at_step=4)
    fake.issue("stop", {"reason": "done"}, at_step=6)
    run.log({"sync": 1.0})
    assert run.flush(10)
    states = {}
    for step in range(10):
        states[step] = params(model)  # after `step` updates
        optimizer.zero_grad()
        backward(model, step)
        optimizer.step()
        scheduler.step()
        if run.should_stop:
            break
    assert step == 6
    run.finish()
    folder = tmp_path / "checkpoints" / "control"
    (ack,) = fake.acks_of(cid)
    assert ack["status"] == "applied" and ack["step"] == 4
    assert ack["detail"] == f"checkpoint of step 4 saved to {folder / 'step-000000004.pt'}"
    state = torch.load(folder / "step-000000004.pt", weights_only=True)
    assert state["step"] == 4 and state["scheduler"]["last_epoch"] == 4
    assert all(torch.equal(a, b) for a, b in zip(states[4], state["model"].values(), strict=True))
    stopped = torch.load(folder / "step-000000006.pt", weights_only=True)
    assert stopped["step"] == 6
    assert [(c["step"], c["reason"], c["command"]) for c in fake.checkpoints] == [
        (4, "before lr change", cid),
        (6, "stop: done", cid + 1),
    ]


def test_a_stop_whose_checkpoint_cannot_be_saved_still_stops(
    fake: FakeCollector, spool_dir: Path, tmp_path: Path
) -> None:
    run = start(fake, spool_dir, checkpoint_dir=tmp_path / ("x" * 300))
    model, optimizer, scheduler = setup()
    run.watch(model, optimizer, scheduler, layer_every=0, activation_every=0)
    cid = fake.issue("stop", {"reason": "done"}, at_step=2)
    run.log({"sync": 1.0})
    assert run.flush(10)
    for step in range(10):
        optimizer.zero_grad()
        backward(model, step)
        optimizer.step()
        scheduler.step()
        if run.should_stop:
            break
    assert step == 2
    assert run.flush(10)
    run.finish()
    (ack,) = fake.acks_of(cid)
    assert (ack["status"], ack["step"]) == ("applied", 2)
    assert ack["detail"].startswith("stop requested: done; checkpoint failed: saving step 2 in ")
    assert "File name too long" in ack["detail"]


def test_resume_loads_the_checkpoint_named_by_the_environment(
    fake: FakeCollector, spool_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = start(fake, spool_dir)
    model, optimizer, scheduler = setup()
    run.watch(model, optimizer, scheduler, layer_every=0, activation_every=0)
    assert run.resume_checkpoint() is None and run.resume() is None
    train(model, optimizer, scheduler, range(7))
    path = run.checkpoint()
    run.finish()
    assert path is not None and path.endswith("step-000000007.pt")
    saved = params(model)

    monkeypatch.setenv(RESUME_FROM_ENV, path)
    run = start(fake, spool_dir)
    model, optimizer, scheduler = setup(seed=3)
    run.watch(model, optimizer, scheduler, layer_every=0, activation_every=0)
    assert run.resume_checkpoint() == path
    assert run.resume() == 7
    assert run.step == 7 and scheduler.last_epoch == 7
    assert all(torch.equal(a, b) for a, b in zip(saved, model.parameters(), strict=True))
    train(model, optimizer, scheduler, range(7, 9))
    assert run.step == 8
    assert run.flush(10)
    run.finish()
    assert fake.series("control/resumed")[7] == 7.0
    assert 8 in fake.series("train/grad_norm")


def test_resume_from_an_unreadable_file_logs_and_changes_nothing(
    fake: FakeCollector,
    spool_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    broken = tmp_path / "step-000000012.pt"
    broken.write_bytes(b"\x00" * 64)
    monkeypatch.setenv(RESUME_FROM_ENV, str(broken))
    run = start(fake, spool_dir)
    model, optimizer, scheduler = setup()
    before = params(model)
    assert run.resume() is None  # before watch: nothing to load into
    run.watch(model, optimizer, scheduler, layer_every=0, activation_every=0)
    with caplog.at_level(logging.ERROR, "runwatch.agent"):
        assert run.resume() is None
    run.finish()
    assert f"cannot resume: cannot read {broken}" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert run.step == 0


def test_a_disabled_run_has_the_same_surface(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(RESUME_FROM_ENV, "/ckpt/step-000000100.pt")
    run = runwatch.init(project="off", disabled=True, checkpoint_dir="/nowhere", keep_checkpoints=0)
    assert isinstance(run, DisabledRun)
    assert run.checkpoint("x") is None and run.resume() is None
    assert run.resume_checkpoint() == "/ckpt/step-000000100.pt"
    assert list(run.data([1, 2])) == [1, 2]


def test_bad_checkpoint_options_are_refused(fake: FakeCollector, spool_dir: Path) -> None:
    with pytest.raises(ValueError, match="keep_checkpoints must be an integer >= 0"):
        runwatch.init(project="x", disabled=True, keep_checkpoints=-1)
    run = start(fake, spool_dir)
    model = mlp()
    with pytest.raises(ValueError, match="checkpoint_every must be an integer >= 1"):
        run.watch(model, torch.optim.SGD(model.parameters(), lr=0.1), checkpoint_every=0)
    run.finish()
