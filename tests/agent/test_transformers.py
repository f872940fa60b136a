"""Hugging Face integration: a real ``Trainer.train`` of a tiny GPT-2 built from its config (no
download), recorded through a real collector on loopback (SQLite and PostgreSQL)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import runwatch
from runwatch.agent.integrations.transformers import RunwatchCallback
from runwatch.client import Client
from tests.conftest import Collector

MAX_STEPS = 20
LOGGING_STEPS = 5
EVAL_STEPS = 10
VOCAB = 64
SEQ = 16


class RandomTokens(Dataset[dict[str, torch.Tensor]]):
    """Seeded random token ids; the labels are the inputs (the model shifts them)."""

    def __init__(self, n: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, n_positions=32)
    return GPT2LMHeadModel(config)


def train(tmp_path: Path, callback: RunwatchCallback) -> Trainer:
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=MAX_STEPS,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=1e-3,
        logging_steps=LOGGING_STEPS,
        eval_strategy="steps",
        eval_steps=EVAL_STEPS,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(
        model=tiny_gpt2(),
        args=args,
        train_dataset=RandomTokens(MAX_STEPS * 4, seed=1),
        eval_dataset=RandomTokens(16, seed=2),
        callbacks=[callback],
    )
    trainer.train()
    return trainer


def points(client: Client, run_id: int, key: str) -> dict[int, float]:
    found = client.metrics(run_id, key)
    assert not found["buckets"], "downsampled: raise max_points"
    return {int(step): value for step, _, value in found["points"]}


def history(trainer: Trainer, key: str) -> dict[int, float]:
    """HF's own record of ``key``, by 0-based optimizer step (``global_step - 1``)."""
    return {e["step"] - 1: e[key] for e in trainer.state.log_history if key in e}


def test_training_is_recorded_under_runwatch_keys(
    collector: Collector, spool_dir: Path, tmp_path: Path
) -> None:
    callback = RunwatchCallback(
        project="hf", name="gpt2", server=collector.url, spool_dir=spool_dir, system_interval=0
    )
    trainer = train(tmp_path, callback)

    run = callback.run
    assert run is not None and run.id is not None
    with collector.client() as client:
        assert client.run(run.id)["state"] == "finished"
        keys = {s["key"] for s in client.series(run.id)}
        got: dict[str, dict[int, float]] = {
            key: points(client, run.id, key)
            for key in (
                "train/loss",
                "val/loss",
                "train/grad_norm",
                "train/lr",
                "train/epoch",
                "train/grad_norm_unclipped",
            )
        }
    assert {k for k in keys if k.startswith("val/")} == {
        "val/loss",
        "val/runtime",
        "val/samples_per_second",
        "val/steps_per_second",
    }
    # HF's grad_norm and learning_rate are the watcher's while watching; eval keys are val/.
    assert "train/learning_rate" not in keys and not any("eval" in k for k in keys)
    assert {"train/step_time", "train/tokens_per_s", "train/total_flos"} <= keys
    assert any(k.startswith("grad_norm/transformer.h.") for k in keys)
    assert any(k.startswith("act/transformer.h.1/") for k in keys)

    assert got["train/loss"] == history(trainer, "loss")
    assert sorted(got["train/loss"]) == list(range(LOGGING_STEPS - 1, MAX_STEPS, LOGGING_STEPS))
    assert got["val/loss"] == history(trainer, "eval_loss")
    assert sorted(got["val/loss"]) == [EVAL_STEPS - 1, 2 * EVAL_STEPS - 1]
    assert got["train/epoch"] == {
        step: value
        for step, value in history(trainer, "epoch").items()
        if step in got["train/loss"]
    }
    # The watcher's, every step. The Trainer clips before optimizer.step() (max_grad_norm=1.0),
    # so the watcher sees the clipped norm; HF logs the norm before clipping.
    assert sorted(got["train/grad_norm"]) == list(range(MAX_STEPS))
    max_norm = trainer.args.max_grad_norm
    assert {s: got["train/grad_norm"][s] for s in got["train/loss"]} == pytest.approx(
        {s: min(norm, max_norm) for s, norm in history(trainer, "grad_norm").items()}, rel=1e-4
    )
    assert got["train/grad_norm_unclipped"] == pytest.approx(history(trainer, "grad_norm"))
    assert {s: got["train/lr"][s] for s in got["train/loss"]} == pytest.approx(
        history(trainer, "learning_rate"), rel=1e-6
    )


def test_given_run_without_watching_gets_hf_grad_norm_and_lr_and_stays_open(
    collector: Collector, spool_dir: Path, tmp_path: Path
) -> None:
    run = runwatch.init(
        project="hf", name="own", server=collector.url, spool_dir=spool_dir, system_interval=0
    )
    trainer = train(tmp_path, RunwatchCallback(run=run, watch=False))
    assert run.flush(10)
    with collector.client() as client:
        assert client.run(run.id)["state"] == "running"
        keys = {s["key"] for s in client.series(run.id)}
        grad_norm = points(client, run.id, "train/grad_norm")
        lr = points(client, run.id, "train/lr")
        loss = points(client, run.id, "train/loss")
    run.finish()
    assert not any(k.startswith(("grad_norm/", "act/")) or k == "train/step_time" for k in keys)
    assert grad_norm == history(trainer, "grad_norm")
    assert lr == history(trainer, "learning_rate")
    assert loss == history(trainer, "loss")


def test_bad_options_fail_at_construction() -> None:
    with pytest.raises(ValueError, match="project"):
        RunwatchCallback(server="http://127.0.0.1:1")
    with pytest.raises(ValueError, match="not both"):
        RunwatchCallback(run=runwatch.init(project="p", disabled=True), project="p")
    with pytest.raises(ValueError, match="activation_every"):
        RunwatchCallback(project="p", activation_every=-1)
