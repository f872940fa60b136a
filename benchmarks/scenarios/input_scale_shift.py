"""``input_scale_shift``: a regression MLP whose inputs arrive unnormalised from the onset.

A teacher network (fixed random weights, 16 -> 32 tanh -> 1) labels standard-normal feature
vectors, plus a little noise; the student MLP (16 -> 64 -> 64 -> 1, GELU, its hidden layers
in a ``ModuleList`` so the agent samples their activations) learns it with AdamW 1e-3,
warm-up and cosine decay, batch 64, MSE. From step ``onset`` the training pipeline skips
the normalisation: the same features arrive as ``x * 100 + 50``, as the raw column values
would. The validation set (held-out, normalised; the validation pipeline is not the broken
one) is checked every 20 steps. Loss, gradient norm and activations jump by orders of
magnitude at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from benchmarks.scenarios.base import PACE_S, Outcome, Scenario
from benchmarks.scenarios.loop import Batch, Stream, fmt, train_loop
from runwatch.tinylm import warmup_cosine

if TYPE_CHECKING:
    from runwatch.agent import Run

STEPS = 400
ONSET = 200
FEATURES = 16
HIDDEN = 64
BATCH = 64
LR = 1e-3
WARMUP = 20
SCALE = 100.0
OFFSET = 50.0
NOISE = 0.05
VAL_SIZE = 256


class MLP(nn.Module):
    def __init__(self, features: int = FEATURES, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [
                nn.Sequential(nn.Linear(features, hidden), nn.GELU()),
                nn.Sequential(nn.Linear(hidden, hidden), nn.GELU()),
            ]
        )
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def mse(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (model(inputs) - targets).pow(2).mean()


class Task:
    """The teacher and a sampler of labelled, standardised feature batches."""

    def __init__(self, seed: int) -> None:
        generator = torch.Generator().manual_seed(30_000 + seed)
        self.w1 = torch.randn(FEATURES, 32, generator=generator) / FEATURES**0.5
        self.w2 = torch.randn(32, 1, generator=generator) / 32**0.5
        self.generator = generator

    def sample(self, size: int) -> Batch:
        x = torch.randn(size, FEATURES, generator=self.generator)
        y = torch.tanh(x @ self.w1) @ self.w2
        return x, y + NOISE * torch.randn(size, 1, generator=self.generator)

    def stream(self, onset: int | None) -> Stream:
        """Standardised batches; from batch ``onset`` on, the same without normalisation."""
        index = 0
        while True:
            x, y = self.sample(BATCH)
            if onset is not None and index >= onset:
                x = x * SCALE + OFFSET
            yield x, y
            index += 1


def scenario(*, steps: int = STEPS, onset: int = ONSET, pace_s: float = PACE_S) -> Scenario:
    def train(run: Run, seed: int) -> Outcome:
        task = Task(seed)
        val_batch = task.sample(VAL_SIZE)
        torch.manual_seed(seed)
        model = MLP()
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
        scheduler = warmup_cosine(optimizer, warmup=WARMUP, total=steps)
        trace = train_loop(
            run,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            stream=task.stream(onset),
            val_batch=val_batch,
            steps=steps,
            pace_s=pace_s,
            loss_fn=mse,
        )
        effect = (
            f"loss {trace.mean_loss(onset - 20, onset):.3g}->max "
            f"{fmt(trace.max_loss(onset, steps))}"
        )
        return trace.outcome(onset, effect)

    return Scenario(
        "input_scale_shift",
        f"MLP inputs x{SCALE:g}+{OFFSET:g} (no normalisation)",
        steps,
        onset,
        train=train,
    )
