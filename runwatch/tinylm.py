"""A tiny byte-level transformer language model and text that ships with Python.

Used by ``make demo``, the agent benchmark and the scenario runs: a real
training run (attention, layer norms, AdamW, warm-up and cosine decay) small
enough for two CPU cores, with no download. The text is the source of a few
standard-library modules, read from the running interpreter's own files.
Needs torch (``runwatch[torch]``).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

TEXT_MODULES = ("textwrap", "string", "shlex", "difflib", "argparse")


def corpus() -> bytes:
    """About 200 kB of English prose and Python from the standard library."""
    import importlib

    return b"\n".join(
        inspect.getsource(importlib.import_module(name)).encode() for name in TEXT_MODULES
    )


@dataclass(frozen=True, slots=True)
class TinyConfig:
    vocab: int = 256
    context: int = 64
    width: int = 64
    heads: int = 4
    layers: int = 2
    dropout: float = 0.0


class TinyLM(nn.Module):
    """Decoder-only transformer over bytes; ``blocks`` is the ModuleList the agent samples.

    >>> model = TinyLM(TinyConfig())
    >>> model(torch.zeros(2, 8, dtype=torch.long)).shape
    torch.Size([2, 8, 256])
    """

    def __init__(self, config: TinyConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab, config.width)
        self.position = nn.Embedding(config.context, config.width)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                config.width,
                config.heads,
                dim_feedforward=4 * config.width,
                dropout=config.dropout,
                batch_first=True,
                norm_first=True,
            )
            for _ in range(config.layers)
        )
        self.norm = nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, config.vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        positions = torch.arange(length, device=tokens.device)
        x = self.embed(tokens) + self.position(positions)
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=tokens.device)
        for block in self.blocks:
            x = block(x, src_mask=mask, is_causal=True)
        return self.head(self.norm(x))


def batches(
    data: bytes, *, batch_size: int, context: int, seed: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless random windows of ``data``: (inputs, next-byte targets)."""
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    generator = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(tokens) - context - 1, (batch_size,), generator=generator)
        window = torch.stack([tokens[s : s + context + 1] for s in starts.tolist()])
        yield window[:, :-1], window[:, 1:]


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup: int, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up for ``warmup`` steps, then cosine decay to 10 % at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def loss_of(model: TinyLM, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(inputs)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def corrupt_batches(
    stream: Iterator[tuple[torch.Tensor, torch.Tensor]], start: int, length: int, *, seed: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``stream`` with batches ``[start, start + length)`` replaced by uniformly random byte
    ids, inputs and targets alike: a corrupted shard, for the demo and the benchmarks."""
    generator = torch.Generator().manual_seed(seed)
    for index, (inputs, targets) in enumerate(stream):
        if start <= index < start + length:
            inputs = torch.randint(0, 256, inputs.shape, generator=generator)
            targets = torch.randint(0, 256, targets.shape, generator=generator)
        yield inputs, targets
