"""The agent's control channel on real tiny models, real optimizers and schedulers: commands
arrive in ingest replies from a fake collector on loopback, are applied at their step, once,
and acknowledged.

Expected values are computed by hand next to the loop (the scheduler alone, ``clip`` by the
formula, ZClip's EMA from the recorded norms), never by the code under test.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import msgpack
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from transformers import TrainerControl

import runwatch
from runwatch.agent.buffer import PointBuffer
from runwatch.agent.control import FORGOTTEN, Control
from runwatch.agent.hooks import Watcher
from runwatch.agent.integrations.lightning import RunwatchCallback as LightningCallback
from runwatch.agent.integrations.transformers import RunwatchCallback as HfCallback
from runwatch.agent.interventions import Interventions
from runwatch.agent.run import Run
from tests.agent.conftest import free_port

RUN_ID = 9


class FakeCollector:
    """The collector's side of the control channel, on loopback: creates run 9, answers every
    ingest with the commands the rank has not acknowledged (or, for ``replies=n``, in the next
    n replies whatever happens), records points and acknowledgements."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.commands: list[dict[str, Any]] = []
        self.replies_left: dict[int, int] = {}
        self.served: dict[int, int] = {}
        self.acks: list[dict[str, Any]] = []
        self.points: list[tuple[int, int, str, float]] = []
        self.fail_acks = 0
        """Answer this many acknowledgements with 503 first."""
        self.runs: list[dict[str, Any]] = []
        """The bodies of ``POST /api/v1/runs``."""
        self.checkpoints: list[dict[str, Any]] = []
        """Registered checkpoints, with ``id`` and ``deleted``."""
        self.fail_registrations = 0
        """Answer this many checkpoint registrations with 503 first."""
        self._next_id = 100
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                status, reply = fake.answer(self.path, body)
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def issue(
        self,
        kind: str,
        args: dict[str, Any] | None = None,
        at_step: int | None = None,
        *,
        replies: int | None = None,
    ) -> int:
        with self.lock:
            self._next_id += 1
            cid = self._next_id
            command = {"id": cid, "type": kind, "args": args or {}, "at_step": at_step}
            self.commands.append({**command, "source": "test"})
            if replies is not None:
                self.replies_left[cid] = replies
        return cid

    def answer(self, path: str, body: bytes) -> tuple[int, Any]:
        with self.lock:
            if path == "/api/v1/runs":
                self.runs.append(json.loads(body))
                return 200, {"id": RUN_ID, "resumed": False}
            if path.endswith("/finish"):
                return 200, {}
            if match := re.fullmatch(r"/api/v1/commands/(\d+)/ack", path):
                if self.fail_acks:
                    self.fail_acks -= 1
                    return 503, {"detail": "scripted"}
                self.acks.append({"id": int(match[1]), **json.loads(body)})
                return 200, {}
            if re.fullmatch(rf"/api/v1/runs/{RUN_ID}/checkpoints", path):
                if self.fail_registrations:
                    self.fail_registrations -= 1
                    return 503, {"detail": "scripted"}
                return 201, self._register(json.loads(body))
            assert path == "/api/v1/ingest", path
            batch = msgpack.unpackb(body)
            rank = batch["rank"]
            self.points += [(rank, s, k, v) for s, _, k, v in batch["points"]]
            commands = [c for c in self.commands if self._serves(c["id"], rank)]
            for c in commands:
                self.served[c["id"]] = self.served.get(c["id"], 0) + 1
            return 200, {"accepted": len(batch["points"]), "duplicate": False, "commands": commands}

    def _register(self, body: dict[str, Any]) -> dict[str, Any]:
        """Store a checkpoint; retention as simple as the agent needs: the ``keep`` newest."""
        record = {"id": len(self.checkpoints) + 1, **body, "deleted": False}
        self.checkpoints.append(record)
        live = [c for c in self.checkpoints if not c["deleted"]]
        prune = live[: -body["keep"]] if body["keep"] else []
        for c in prune:
            c["deleted"] = True
        return {"checkpoint": record, "prune": prune}

    def _serves(self, cid: int, rank: int) -> bool:
        if cid in self.replies_left:
            left = self.replies_left[cid]
            self.replies_left[cid] = left - 1
            return left > 0
        return not any(a["id"] == cid and a["rank"] == rank for a in self.acks)

    def acks_of(self, cid: int) -> list[dict[str, Any]]:
        with self.lock:
            return [a for a in self.acks if a["id"] == cid]

    def series(self, key: str, rank: int = 0) -> dict[int, float]:
        with self.lock:
            return {s: v for r, s, k, v in self.points if k == key and r == rank}


@contextmanager
def serving() -> Iterator[FakeCollector]:
    """A :class:`FakeCollector` answering on loopback for the block."""
    collector = FakeCollector()
    thread = threading.Thread(target=collector.server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield collector
    finally:
        collector.server.shutdown()
        collector.server.server_close()


def start(fake: FakeCollector, spool_dir: Path, **options: Any) -> Run:
    run = runwatch.init(
        project="control",
        name="control",
        server=fake.url,
        spool_dir=spool_dir,
        system_interval=0,
        flush_interval=0.05,
        **{"checkpoint_dir": spool_dir.parent / "checkpoints", **options},
    )
    assert isinstance(run, Run)
    return run


def deliver(run: Run) -> None:
    """One ingest round trip: what the collector has for this rank arrives; acks go out."""
    run.log({"sync": 1.0})
    assert run.flush(10)


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(16, 4, generator=generator)
    return x, x.sum(1, keepdim=True)


def backward(model: nn.Module, step: int, scale: float = 1.0) -> None:
    x, y = batch(step)
    (scale * F.mse_loss(model(x), y)).backward()


def params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def moved(before: list[torch.Tensor], model: nn.Module) -> bool:
    return any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


def global_norm(model: nn.Module) -> float:
    return math.sqrt(sum(float(p.grad.square().sum()) for p in model.parameters()))


# -- exactly once -----------------------------------------------------------------------------


def test_a_redelivered_command_is_applied_once_and_acked_with_its_outcome(
    fake: FakeCollector, spool_dir: Path
) -> None:
    run = start(fake, spool_dir)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    run.watch(model, optimizer, layer_every=0, activation_every=0)
    fake.fail_acks = 2  # the first acknowledgements meet a collector in trouble: retried
    cid = fake.issue("skip_step", replies=5)  # in the next five replies, acked or not
    stepped = []
    for step in range(8):
        optimizer.zero_grad()
        backward(model, step)
        before = params(model)
        optimizer.step()
        stepped.append(moved(before, model))
        deliver(run)  # one reply per step: the command arrives after step 0, and four more times
    run.finish()
    assert fake.served[cid] == 5
    assert stepped == [True, False, True, True, True, True, True, True]  # applied once, at 1
    acks = fake.acks_of(cid)
    assert acks and all(ack == acks[0] for ack in acks), acks
    expected = {"id": cid, "run": RUN_ID, "rank": 0, "status": "applied", "step": 1}
    assert expected.items() <= acks[0].items() and acks[0]["detail"] == "step skipped"
    assert fake.series("control/skip_step") == {1: 1.0}
    assert fake.series("control/skipped_step") == {1: 1.0}


def test_control_remembers_a_bounded_number_of_outcomes() -> None:
    control = Control(remembered=3)
    for cid in range(1, 6):
        control.receive([{"id": cid, "type": "stop", "args": {}, "at_step": None}])
        assert [c.id for c in control.due(cid)] == [cid]
        control.settle(cid, "applied", "stop requested", cid)
    while (ack := control.next_ack()) is not None:
        control.ack_done(ack)
    # 3..5 are remembered: re-acked as they were. 1 is forgotten: never applied again.
    control.receive([{"id": i, "type": "stop", "args": {}, "at_step": None} for i in (1, 5)])
    assert not control.busy and control.due(6) == []
    acks = [control.next_ack(), None]
    assert acks[0] is not None
    control.ack_done(acks[0])
    acks[1] = control.next_ack()
    assert [(a.command, a.status, a.detail) for a in acks if a] == [
        (1, "failed", FORGOTTEN),
        (5, "applied", "stop requested"),
    ]


def test_commands_that_cannot_be_applied_are_acked_failed_on_arrival(
    fake: FakeCollector, spool_dir: Path
) -> None:
    run = start(fake, spool_dir)
    issued = {
        fake.issue("rollback", {"checkpoint": "last_good"}): "rollback: the command names no",
        fake.issue("rollback", {"path": "/x.pt", "skip_batches": -1}): "rollback: skip_batches",
        fake.issue("rollback", {"path": "/x.pt", "lr_factor": 2}): "rollback: lr_factor must",
        fake.issue("lr_scale", {"factor": -1, "steps": 3}): "lr_scale: factor must be",
        fake.issue("clip", {"mode": "adaptive", "alpha": 1.5}): "clip: alpha must be",
        fake.issue("explode"): "unknown command type 'explode'",
    }
    deliver(run)
    run.finish()
    for cid, detail in issued.items():
        (ack,) = fake.acks_of(cid)
        assert ack["status"] == "failed" and ack["step"] is None
        assert ack["detail"].startswith(detail), ack


def test_a_single_process_applies_a_command_for_a_step_already_past_at_once(
    fake: FakeCollector, spool_dir: Path
) -> None:
    """No ranks to split: late is better than never (the collector tells the agent's world
    size when it issues, and gives such a run its next step)."""
    run = start(fake, spool_dir)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    run.watch(model, optimizer, layer_every=0, activation_every=0)
    for step in range(4):
        optimizer.zero_grad()
        backward(model, step)
        optimizer.step()
    cid = fake.issue("skip_step", {}, at_step=1)
    deliver(run)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.zero_grad()
    backward(model, 4)
    optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert run.flush(10)
    run.finish()
    (ack,) = fake.acks_of(cid)
    assert ack["status"] == "applied" and ack["step"] == 4
    assert fake.runs[0]["world_size"] == 1


def test_a_command_redelivered_while_it_is_being_applied_is_not_taken_again() -> None:
    """The sender thread receives the command again while the training thread applies it (a
    rollback loading its file): after the rollback the step comes round again, and a second
    copy waiting for it would roll back a second time (this split two DDP ranks)."""
    control = Control(single_process=False)
    command = {"id": 7, "type": "skip_step", "args": {}, "at_step": 9}
    control.receive([command])
    assert [c.id for c in control.due(9)] == [7]
    control.receive([command])  # the reply to a batch sent while it was being applied
    assert not control.busy
    control.settle(7, "applied", "step skipped", 9)
    control.receive([command])
    assert control.due(9) == [] and not control.busy
    ack = control.next_ack()
    assert ack is not None and (ack.command, ack.status) == (7, "applied")


def test_a_command_being_applied_when_interventions_fail_is_acked_failed() -> None:
    control = Control(single_process=False)
    control.receive([{"id": 8, "type": "skip_step", "args": {}, "at_step": 3}])
    assert [c.id for c in control.due(3)] == [8]
    control.refuse_all("interventions off")
    ack = control.next_ack()
    assert ack is not None and (ack.command, ack.status, ack.detail) == (
        8,
        "failed",
        "interventions off",
    )


def test_a_rank_of_several_expires_a_command_for_a_step_already_past() -> None:
    control = Control(single_process=False)
    control.receive([{"id": 5, "type": "skip_step", "args": {}, "at_step": 1}])
    assert control.due(4) == []
    ack = control.next_ack()
    assert ack is not None and ack.status == "expired" and ack.step == 4
    assert "past 1" in ack.detail


# -- lr_scale -----------------------------------------------------------------------------------


def step_lr(optimizer: torch.optim.Optimizer) -> Any:
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.3)


def lambda_lr(optimizer: torch.optim.Optimizer) -> Any:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1 / (1 + 0.7 * i))


def one_cycle(optimizer: torch.optim.Optimizer) -> Any:
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.3, total_steps=12)


@pytest.mark.parametrize("make_scheduler", [step_lr, lambda_lr, one_cycle])
def test_lr_scale_scales_a_window_and_leaves_the_schedule_alone(
    fake: FakeCollector, spool_dir: Path, make_scheduler: Any
) -> None:
    steps, factor, at, window = 10, 0.7, 2, 3  # 0.1 x 0.7 / 0.7 != 0.1: restore, not divide
    reference = torch.optim.SGD(mlp().parameters(), lr=0.1, momentum=0.9)
    reference_scheduler = make_scheduler(reference)
    scheduled = []
    for _ in range(steps):
        scheduled.append(reference.param_groups[0]["lr"])
        reference.step()  # no gradients: only the schedule moves
        reference_scheduler.step()

    run = start(fake, spool_dir)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = make_scheduler(optimizer)
    run.watch(model, optimizer, scheduler, layer_every=0, activation_every=0)
    cid = fake.issue("lr_scale", {"factor": factor, "steps": window}, at_step=at)
    deliver(run)
    for step in range(steps):
        optimizer.zero_grad()
        backward(model, step)
        group = optimizer.param_groups[0]
        if step == at:  # without momentum for one step, SGD moves by exactly lr x grad
            momentum, group["momentum"] = group["momentum"], 0.0
            grads = [p.grad.clone() for p in model.parameters()]
            before = params(model)
        optimizer.step()
        if step == at:
            group["momentum"] = momentum
            for b, p, g in zip(before, model.parameters(), grads, strict=True):
                torch.testing.assert_close(b - p.detach(), factor * scheduled[at] * g)
        scheduler.step()
    assert run.flush(10)
    run.finish()
    used = fake.series("train/lr")  # the rate each step used, read in the post-step hook
    expected = {s: lr * factor if at <= s < at + window else lr for s, lr in enumerate(scheduled)}
    assert used == expected
    assert optimizer.param_groups[0]["lr"] == reference.param_groups[0]["lr"]
    assert scheduler.state_dict() == reference_scheduler.state_dict()
    assert fake.series("control/lr_scale") == {at: factor}
    assert [a["step"] for a in fake.acks_of(cid)] == [at]


# -- clip ---------------------------------------------------------------------------------------


def test_clip_bounds_the_applied_gradient_norm_from_its_step_on(
    fake: FakeCollector, spool_dir: Path
) -> None:
    max_norm, at, lr = 0.5, 2, 1.0
    run = start(fake, spool_dir)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    run.watch(model, optimizer, layer_every=0, activation_every=0)
    cid = fake.issue("clip", {"max_norm": max_norm}, at_step=at)
    deliver(run)
    coefs, norms = {}, {}
    for step in range(6):
        optimizer.zero_grad()
        backward(model, step, scale=4.0)  # gradient norms well above max_norm
        grads = [p.grad.clone() for p in model.parameters()]
        norms[step] = global_norm(model)
        coefs[step] = min(1.0, max_norm / (norms[step] + 1e-6)) if step >= at else 1.0
        before = params(model)
        optimizer.step()
        change = [b - p.detach() for b, p in zip(before, model.parameters(), strict=True)]
        for delta, grad in zip(change, grads, strict=True):  # SGD: change = lr x clipped grad
            torch.testing.assert_close(delta, lr * coefs[step] * grad)
        if step >= at:
            assert math.sqrt(sum(float(d.square().sum()) for d in change)) <= max_norm * 1.0001
    assert run.flush(10)
    run.finish()
    assert all(coefs[s] < 0.5 for s in range(at, 6)), coefs
    recorded = fake.series("control/clip_coef")
    assert recorded.keys() == set(range(at, 6))
    for step, coef in recorded.items():
        assert coef == pytest.approx(coefs[step], rel=1e-5)
    grad_norms = fake.series("train/grad_norm")  # before clipping
    assert all(grad_norms[s] == pytest.approx(norms[s], rel=1e-5) for s in range(6))
    assert fake.series("control/clip") == {at: max_norm}
    assert fake.acks_of(cid)[0]["status"] == "applied"


def test_adaptive_clip_cuts_a_spike_after_its_warm_up(fake: FakeCollector, spool_dir: Path) -> None:
    steps, spike, lr = 34, 31, 0.01
    run = start(fake, spool_dir)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    run.watch(model, optimizer, layer_every=0, activation_every=0)
    fake.issue("clip", {"mode": "adaptive"}, at_step=0)  # z 2.5, alpha 0.97, warm-up 25
    deliver(run)
    applied = {}
    for step in range(steps):
        optimizer.zero_grad()
        backward(model, step, scale=50.0 if step == spike else 1.0)
        before = params(model)
        optimizer.step()
        change = [b - p.detach() for b, p in zip(before, model.parameters(), strict=True)]
        applied[step] = math.sqrt(sum(float(d.square().sum()) for d in change)) / lr
    assert run.flush(10)
    run.finish()

    # ZClip by hand from the recorded (pre-clip) norms.
    norms = fake.series("train/grad_norm")
    warm = [norms[s] for s in range(25)]
    mean = sum(warm) / 25
    var = sum((n - mean) ** 2 for n in warm) / 25
    thresholds = {}
    for step in range(25, steps):
        thresholds[step] = mean + 2.5 * math.sqrt(var)
        clipped = min(norms[step], thresholds[step])
        mean = 0.97 * mean + 0.03 * clipped
        var = 0.97 * var + 0.03 * (clipped - mean) ** 2
    recorded = fake.series("control/clip_threshold")
    assert recorded.keys() == thresholds.keys()
    for step, threshold in thresholds.items():
        assert recorded[step] == pytest.approx(threshold, rel=1e-4)
    coefs = fake.series("control/clip_coef")
    assert coefs[spike] < 0.1
    assert applied[spike] == pytest.approx(thresholds[spike], rel=1e-3)
    assert all(applied[s] == pytest.approx(norms[s], rel=1e-3) for s in range(25))  # warm-up
    assert fake.series("control/clip") == {0: 2.5}


# -- skipping -----------------------------------------------------------------------------------


def adam_steps(optimizer: torch.optim.Optimizer) -> list[float]:
    return [float(state["step"]) for state in optimizer.state.values()]


def test_skip_step_leaves_parameters_and_adam_state_untouched(
    fake: FakeCollector, spool_dir: Path
) -> None:
    run = start(fake, spool_dir)
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    run.watch(model, optimizer, layer_every=1, activation_every=0)
    cid = fake.issue("skip_step", at_step=3)
    deliver(run)
    for step in range(6):
        optimizer.zero_grad()
        backward(model, step)
        before, state_before = params(model), adam_steps(optimizer)
        exp_avg = [s["exp_avg"].clone() for s in optimizer.state.values()]
        optimizer.step()
        assert moved(before, model) == (step != 3), step
        if step == 3:
            assert adam_steps(optimizer) == state_before == [3.0] * 4
            assert all(
                torch.equal(a, s["exp_avg"])
                for a, s in zip(exp_avg, optimizer.state.values(), strict=True)
            )
    assert adam_steps(optimizer) == [5.0] * 4
    assert run.flush(10)
    run.finish()
    assert fake.series("control/skipped_step") == {3: 1.0}
    assert fake.series("update_ratio/0")[3] == 0.0 < fake.series("update_ratio/0")[4]
    assert [(a["status"], a["step"]) for a in fake.acks_of(cid)] == [("applied", 3)]


def test_non_finite_gradients_skip_the_step_locally(fake: FakeCollector, spool_dir: Path) -> None:
    run = start(fake, spool_dir)
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    run.watch(model, optimizer, layer_every=0, activation_every=0)
    for step in range(5):
        optimizer.zero_grad()
        backward(model, step)
        if step == 2:
            next(model.parameters()).grad[0, 0] = math.nan  # one bad element
        before, state_before = params(model), adam_steps(optimizer)
        optimizer.step()
        assert all(torch.isfinite(p).all() for p in model.parameters())
        assert moved(before, model) == (step != 2), step
        if step == 2:
            assert adam_steps(optimizer) == state_before
    assert run.flush(10)
    assert run.stats.steps_skipped == 1
    run.finish()
    assert fake.series("control/skipped_step") == {2: 1.0}
    assert math.isnan(fake.series("train/grad_norm")[2])
    assert fake.acks == []  # local: nothing to acknowledge

    # Without the guard the NaN reaches the parameters.
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    watcher = Watcher(model, optimizer, PointBuffer(), skip_nonfinite=False)
    backward(model, 0)
    next(model.parameters()).grad[0, 0] = math.nan
    optimizer.step()
    watcher.remove()
    assert not torch.isfinite(next(model.parameters())).all()


@pytest.mark.parametrize("fused", [True, False], ids=["fused-found-inf", "zeroed"])
def test_the_no_sync_guard_for_accelerators(fused: bool) -> None:
    """The path taken when the norm lives on an accelerator, exercised on the CPU: a fused
    optimizer gets GradScaler's ``found_inf`` flag (an exact skip); others get zeroed
    gradients (an exact skip for plain SGD only)."""
    model = mlp()
    if fused:
        optimizer: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=0.01, fused=True)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    buffer, control = PointBuffer(), Control()
    plist = list(model.parameters())
    guard = Interventions(optimizer, buffer, control)
    for step in range(3):
        optimizer.zero_grad()
        backward(model, step)
        if step == 1:
            plist[0].grad[0, 0] = math.inf
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in plist]))
        before = params(model)
        guard._guard_on_device(step, norm, lambda: [[p.grad for p in plist]])
        optimizer.step()
        guard.after_step(step)
        assert moved(before, model) == (step != 1), step
        assert not hasattr(optimizer, "found_inf")
    assert control.steps_skipped() == 1
    if fused:
        assert adam_steps(optimizer) == [2.0] * 4
    skipped = [
        v for r in buffer.drain() for k, v in r.values.items() if k == "control/skipped_step"
    ]
    assert [float(v) for v in skipped] == [0.0, 1.0, 0.0]


# -- stop ---------------------------------------------------------------------------------------


def test_stop_sets_should_stop_at_its_step(fake: FakeCollector, spool_dir: Path) -> None:
    run = start(fake, spool_dir)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    run.watch(model, optimizer, layer_every=0, activation_every=0)
    cid = fake.issue("stop", {"reason": "loss diverged"}, at_step=2)
    deliver(run)
    done = 0
    for step in range(10):
        assert not run.should_stop
        optimizer.zero_grad()
        backward(model, step)
        optimizer.step()
        done += 1
        if run.should_stop:
            break
    assert done == 3
    control = TrainerControl()
    HfCallback(run=run).on_step_end(None, None, control)  # type: ignore[arg-type]
    assert control.should_training_stop
    assert run.flush(10)
    run.finish()
    (ack,) = fake.acks_of(cid)
    saved = spool_dir.parent / "checkpoints" / "control" / "step-000000002.pt"
    assert (ack["status"], ack["step"], ack["detail"]) == (
        "applied",
        2,
        f"stop requested: loss diverged; checkpoint of step 2 saved to {saved}",
    )
    assert saved.is_file()
    with pytest.raises(AttributeError):
        run.should_stop = False  # type: ignore[misc]


class Regression(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_lightning_stops_at_the_step_of_a_stop_command(
    fake: FakeCollector, spool_dir: Path
) -> None:
    run = start(fake, spool_dir)
    fake.issue("stop", {"reason": "operator"}, at_step=4)
    deliver(run)
    x, _ = batch(0)
    loader = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=2)
    trainer = pl.Trainer(
        max_steps=50,
        max_epochs=10,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[LightningCallback(run=run, activation_every=0, layer_every=0)],
    )
    trainer.fit(Regression(), loader)
    run.finish()
    assert trainer.global_step == 5  # optimizer steps 0..4: the command's step was the last


# -- two ranks ----------------------------------------------------------------------------------

WORLD = 2
DDP_STEPS = 8


def _ddp_rank(rank: int, port: int, server: str, spool: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        for watched in (True, False):
            model = nn.parallel.DistributedDataParallel(mlp())
            optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
            run = None
            if watched:
                run = runwatch.init(
                    project="ddp-control",
                    name="ddp-control",
                    server=server,
                    spool_dir=spool,
                    system_interval=0,
                    flush_interval=0.05,
                )
                run.watch(model, optimizer, layer_every=0, activation_every=0)
            generator = torch.Generator().manual_seed(rank)
            for step in range(DDP_STEPS):
                x = torch.randn(16, 4, generator=generator)
                optimizer.zero_grad()
                F.mse_loss(model(x), x.sum(1, keepdim=True)).backward()
                optimizer.step()
                if run is not None and step == 0:
                    assert run.flush(10)  # this rank's timings went out; the reply had the command
            if run is not None:
                assert run.flush(10)
                dist.barrier()
                run.finish()
            name = "commanded" if watched else "plain"
            torch.save(model.module.state_dict(), f"{out}/{name}-{rank}.pt")
        dist.barrier()  # no rank tears the group down while the other still talks through it
    finally:
        dist.destroy_process_group()


def test_two_ranks_apply_an_lr_scale_at_the_same_step(
    fake: FakeCollector, spool_dir: Path, tmp_path: Path
) -> None:
    cid = fake.issue("lr_scale", {"factor": 4.0, "steps": 3}, at_step=3)
    args = (free_port(), fake.url, str(spool_dir), str(tmp_path))
    mp.start_processes(_ddp_rank, args=args, nprocs=WORLD, start_method="spawn", join=True)
    states = {
        (name, rank): torch.load(tmp_path / f"{name}-{rank}.pt")
        for name in ("commanded", "plain")
        for rank in range(WORLD)
    }
    for key, value in states["commanded", 0].items():
        assert torch.equal(value, states["commanded", 1][key]), key
        assert torch.equal(states["plain", 0][key], states["plain", 1][key]), key
    assert any(not torch.equal(v, states["plain", 0][k]) for k, v in states["commanded", 0].items())
    acks = fake.acks_of(cid)
    assert sorted((a["rank"], a["status"], a["step"]) for a in acks) == [
        (0, "applied", 3),
        (1, "applied", 3),
    ]
