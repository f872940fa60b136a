"""Lightning integration: a real ``Trainer.fit`` of a tiny regression MLP, recorded through a
real collector on loopback (SQLite and PostgreSQL)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import runwatch
from runwatch.agent.integrations import lightning as integration
from runwatch.agent.integrations.lightning import RunwatchCallback, _loop_metrics, _val_key
from runwatch.client import Client
from tests.conftest import Collector

MAX_STEPS = 30
LOG_EVERY = 5
VAL_EVERY = 10
BATCH = 8
LR = 0.05


class Boom(RuntimeError):
    """The trainer's own failure, raised from ``training_step``."""


class Regression(pl.LightningModule):
    """A 2-layer MLP on a seeded linear problem; it keeps what it computed, for comparison."""

    def __init__(self, fail_at: int | None = None, log_mae: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        self.fail_at = fail_at
        self.log_mae = log_mae
        self.maes: dict[int, list[float]] = {}
        """Training mean absolute error of every batch, by epoch (with ``log_mae``)."""
        self.raised: Boom | None = None
        self.losses: dict[int, float] = {}
        """Training loss by optimizer step (``global_step`` while the step runs)."""
        self.grad_norms: dict[int, float] = {}
        """Global gradient norm the optimizer applies, by optimizer step."""
        self.val_losses: dict[int, float] = {}
        """Mean validation loss by the last optimizer step before the validation."""
        self._val_batches: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.global_step == self.fail_at:
            self.raised = Boom(f"bad batch at step {self.global_step}")
            raise self.raised
        x, y = batch
        prediction = self(x)
        loss = F.mse_loss(prediction, y)
        self.losses[self.global_step] = loss.item()
        self.log("loss", loss)
        if self.log_mae:
            mae = (prediction - y).abs().mean()
            self.maes.setdefault(self.current_epoch, []).append(mae.item())
            self.log("train_mae", mae, on_step=False, on_epoch=True)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad.flatten() for p in self.parameters() if p.grad is not None]
        self.grad_norms[self.global_step] = torch.cat(grads).norm().item()

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self._val_batches.append(loss.item())
        self.log("val_loss", loss)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            mean = sum(self._val_batches) / len(self._val_batches)
            self.val_losses[self.global_step - 1] = mean
        self._val_batches = []

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=VAL_EVERY, gamma=0.5)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def loaders(seed: int = 0) -> tuple[DataLoader[Any], DataLoader[Any]]:
    """One epoch of exactly ``MAX_STEPS`` training batches, and a few validation batches."""
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 1, generator=generator)
    x = torch.randn(MAX_STEPS * BATCH + 4 * BATCH, 8, generator=generator)
    y = x @ w + 0.1 * torch.randn(len(x), 1, generator=generator)
    n = MAX_STEPS * BATCH
    train = TensorDataset(x[:n], y[:n])
    val = TensorDataset(x[n:], y[n:])
    return DataLoader(train, batch_size=BATCH), DataLoader(val, batch_size=BATCH)


def trainer(callback: RunwatchCallback, **options: Any) -> pl.Trainer:
    settings: dict[str, Any] = {
        "max_steps": MAX_STEPS,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "log_every_n_steps": LOG_EVERY,
        "val_check_interval": VAL_EVERY,
        "limit_val_batches": 2,
        "num_sanity_val_steps": 1,
    }
    return pl.Trainer(**{**settings, **options}, callbacks=[callback])


def points(client: Client, run_id: int, key: str) -> dict[int, float]:
    found = client.metrics(run_id, key)
    assert not found["buckets"], "downsampled: raise max_points"
    return {int(step): value for step, _, value in found["points"]}


def test_fit_is_recorded_under_runwatch_keys(collector: Collector, spool_dir: Path) -> None:
    module = Regression()
    callback = RunwatchCallback(
        project="lightning",
        name="fit",
        server=collector.url,
        spool_dir=spool_dir,
        system_interval=0,
        layer_every=10,
    )
    train, val = loaders()
    trainer(callback).fit(module, train, val)

    run = callback.run
    assert run is not None and run.id is not None
    with collector.client() as client:
        assert client.run(run.id)["state"] == "finished"
        keys = {s["key"] for s in client.series(run.id)}
        # Lightning's and the watcher's, once each; the stale val_loss in callback_metrics
        # never comes back as a training metric.
        assert {k for k in keys if k.startswith(("train/", "val/"))} == {
            "train/loss",
            "train/epoch",
            "train/grad_norm",
            "train/lr",
            "train/step_time",
            "train/data_wait",
            "train/samples_per_s",
            "val/loss",
        }
        assert {"grad_norm/net.0", "grad_norm/net.2", "update_ratio/net.0"} <= keys
        loss = points(client, run.id, "train/loss")
        val_loss = points(client, run.id, "val/loss")
        lr = points(client, run.id, "train/lr")
        epoch = points(client, run.id, "train/epoch")
        every_step = {s["key"]: points(client, run.id, s["key"]) for s in client.series(run.id)}
    # Log cadence: optimizer steps 5, 10, ... are steps 4, 9, ... (0-based, the watcher's).
    assert sorted(loss) == list(range(LOG_EVERY - 1, MAX_STEPS, LOG_EVERY))
    assert loss == {step: module.losses[step] for step in loss}
    assert sorted(val_loss) == [VAL_EVERY - 1, 2 * VAL_EVERY - 1, 3 * VAL_EVERY - 1]
    assert val_loss == pytest.approx(module.val_losses, rel=1e-6)
    assert set(epoch.values()) == {0.0}
    # Read after the optimizer step, before the scheduler halves it every VAL_EVERY steps.
    assert lr == pytest.approx({s: LR * 0.5 ** (s // VAL_EVERY) for s in range(MAX_STEPS)})
    for key, series in every_step.items():
        assert all(0 <= step < MAX_STEPS for step in series), key


def test_accumulation_logs_once_per_optimizer_step_and_epoch_metrics_at_epoch_end(
    collector: Collector, spool_dir: Path
) -> None:
    module = Regression(log_mae=True)
    callback = RunwatchCallback(
        project="lightning", name="accumulate", server=collector.url, spool_dir=spool_dir
    )
    train, val = loaders()
    # 30 batches an epoch, 2 per optimizer step: 15 optimizer steps an epoch, two epochs.
    trainer(callback, accumulate_grad_batches=2, limit_val_batches=0).fit(module, train, val)
    assert callback.run is not None and callback.run.id is not None
    with collector.client() as client:
        loss = points(client, callback.run.id, "train/loss")
        epoch = points(client, callback.run.id, "train/epoch")
        mae = points(client, callback.run.id, "train/mae")
        lr = points(client, callback.run.id, "train/lr")
    # The watcher counted optimizer steps too: the last micro-batch's loss sits at its step.
    assert loss == {step: module.losses[step] for step in range(4, MAX_STEPS, LOG_EVERY)}
    assert epoch == {step: float(step >= 15) for step in loss}
    expected = {14: module.maes[0], 29: module.maes[1]}
    assert mae == pytest.approx({s: sum(v) / len(v) for s, v in expected.items()}, rel=1e-6)
    assert sorted(lr) == list(range(MAX_STEPS))


def test_watched_grad_norm_is_the_one_lightning_applies(
    collector: Collector, spool_dir: Path
) -> None:
    module = Regression()
    callback = RunwatchCallback(
        project="lightning", name="grad-norm", server=collector.url, spool_dir=spool_dir
    )
    train, val = loaders()
    trainer(callback).fit(module, train, val)
    assert callback.run is not None and callback.run.id is not None
    with collector.client() as client:
        grad_norm = points(client, callback.run.id, "train/grad_norm")
    assert grad_norm == pytest.approx(module.grad_norms, rel=1e-5)


def test_exception_in_training_step_propagates_and_fails_the_run(
    collector: Collector, spool_dir: Path
) -> None:
    module = Regression(fail_at=3)
    callback = RunwatchCallback(
        project="lightning", name="boom", server=collector.url, spool_dir=spool_dir
    )
    train, val = loaders()
    with pytest.raises(Boom, match="bad batch at step 3") as raised:
        trainer(callback).fit(module, train, val)
    assert raised.value is module.raised
    assert callback.run is not None and callback.run.id is not None
    with collector.client() as client:
        assert client.run(callback.run.id)["state"] == "failed"
    assert not module._forward_pre_hooks, "finish() left the watcher's hooks on the model"


def test_given_run_is_left_open_and_steps_follow_global_step_without_watching(
    collector: Collector, spool_dir: Path
) -> None:
    run = runwatch.init(project="lightning", name="own", server=collector.url, spool_dir=spool_dir)
    module = Regression()
    callback = RunwatchCallback(run=run, watch=False)
    train, val = loaders()
    trainer(callback).fit(module, train, val)
    assert run.flush(10)
    with collector.client() as client:
        assert client.run(run.id)["state"] == "running"
        keys = {s["key"] for s in client.series(run.id)}
        loss = points(client, run.id, "train/loss")
        val_loss = points(client, run.id, "val/loss")
    run.finish()
    assert not any(k.startswith(("grad_norm/", "act/")) or k == "train/grad_norm" for k in keys)
    assert loss == {step: module.losses[step] for step in range(4, MAX_STEPS, LOG_EVERY)}
    assert sorted(val_loss) == [VAL_EVERY - 1, 2 * VAL_EVERY - 1, 3 * VAL_EVERY - 1]


def test_without_lightning_the_callback_is_a_pytorch_lightning_one(
    collector: Collector, spool_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ptl = pytest.importorskip("pytorch_lightning")
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)  # import fails: not installed
    spec = importlib.util.spec_from_file_location("runwatch_ptl_fallback", integration.__file__)
    assert spec is not None and spec.loader is not None
    fallback = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fallback)
    assert issubclass(fallback.RunwatchCallback, ptl.Callback)
    assert not issubclass(fallback.RunwatchCallback, pl.Callback)

    class Module(ptl.LightningModule):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))

        def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
            loss = F.mse_loss(self.net(batch[0]), batch[1])
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=LR)

    callback = fallback.RunwatchCallback(
        project="lightning", name="ptl", server=collector.url, spool_dir=spool_dir
    )
    settings = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
    ptl_trainer = ptl.Trainer(
        max_steps=10, log_every_n_steps=LOG_EVERY, callbacks=[callback], **settings
    )
    ptl_trainer.fit(Module(), loaders()[0])
    assert callback.run is not None and callback.run.id is not None
    with collector.client() as client:
        assert client.run(callback.run.id)["state"] == "finished"
        assert sorted(points(client, callback.run.id, "train/loss")) == [4, 9]
        assert sorted(points(client, callback.run.id, "train/lr")) == list(range(10))


def test_without_per_loop_results_the_phase_is_told_by_name() -> None:
    # A Lightning without ``trainer._results``: validation metrics are the val_/val/ ones.
    metrics = {
        "loss": torch.tensor(1.0),
        "val_loss": torch.tensor(2.0),
        "val/acc": torch.tensor(3.0),
    }
    trainer = SimpleNamespace(callback_metrics=metrics)
    assert _loop_metrics(trainer, "step") == {"loss": metrics["loss"]}  # type: ignore[arg-type]
    validation = _loop_metrics(trainer, "validation")  # type: ignore[arg-type]
    assert {_val_key(name) for name in validation} == {"val/loss", "val/acc"}


def test_bad_options_fail_at_construction() -> None:
    with pytest.raises(ValueError, match="project"):
        RunwatchCallback(server="http://127.0.0.1:1")
    with pytest.raises(ValueError, match="not both"):
        RunwatchCallback(run=runwatch.init(project="p", disabled=True), project="p")
    with pytest.raises(ValueError, match="layer_every"):
        RunwatchCallback(project="p", layer_every=-1)
