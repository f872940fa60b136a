"""Activation statistics and which modules to take them from; pure tensor code, no hooks.

:class:`~runwatch.agent.hooks.Watcher` calls :func:`activation_moments` in the forward hook of
each watched module (the reductions over the output, on its device) and
:func:`finish_activation_stats` once per sampled step for all modules together.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

MAX_AUTO_ACTIVATIONS = 32
"""``activations="auto"`` watches at most this many modules, spread evenly over the model."""
ACTIVATION_STATS = ("mean", "std", "abs_max", "zero_frac", "nonfinite_frac")


def activation_stats(output: torch.Tensor) -> torch.Tensor:
    """``mean, std, abs_max, zero_frac, nonfinite_frac`` of ``output`` as a float32 vector.

    ``mean``, ``std`` (population, no Bessel correction) and ``abs_max`` are taken over the
    finite elements only, so one NaN does not hide the scale of the rest; ``zero_frac`` (exactly
    0) and ``nonfinite_frac`` (NaN or +-Inf) are fractions of all elements. An output with no
    finite element has mean, std and abs_max 0. Computed on the output's device, in float32,
    without a host sync. The watcher splits the work in two: the reductions over the output in
    the forward hook, the few scalar operations once per step for all modules together.
    """
    return finish_activation_stats(activation_moments(output).unsqueeze(0))[0]


def activation_moments(output: torch.Tensor) -> torch.Tensor:
    """Reductions over a non-empty output, as float32: mean and standard deviation with the
    non-finite values read as 0, min and max of the same, the fraction of non-zero values and
    the fraction of non-finite ones. A dozen operations: the forward hook's whole cost."""
    x = output.detach().float()
    n = x.numel()
    finite_or_zero = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    mean = finite_or_zero.mean()
    # Two passes (the mean, then the norm of the deviations): var_mean is 2-6x slower on CPU.
    std = torch.linalg.vector_norm(finite_or_zero - mean) / math.sqrt(n)
    low, high = torch.aminmax(finite_or_zero)
    # Counted in int64 before dividing: a float32 count of a 100M-element output cannot tell
    # one NaN from none. x - finite_or_zero is exactly 0 where x is finite, and Inf/NaN elsewhere.
    nonzero = torch.count_nonzero(x)
    nonfinite = torch.count_nonzero(x - finite_or_zero)
    return torch.stack((mean, std, low, high, nonzero / n, nonfinite / n))


def finish_activation_stats(moments: torch.Tensor) -> torch.Tensor:
    """Rows of :func:`activation_moments` -> rows of :data:`ACTIVATION_STATS`."""
    mean0, std0, low, high, nonzero_frac, nonfinite_frac = moments.unbind(-1)
    # The zeros standing in for non-finite values are taken out again: with r = n / n_finite,
    # mean = r * mean0 and var = r * var0 + r * (1 - r) * mean0^2. When every value is finite,
    # r is exactly 1 and both are exact.
    finite_frac = 1.0 - nonfinite_frac
    r = torch.where(finite_frac > 0, finite_frac.reciprocal(), 0.0)
    mean = r * mean0
    var = (r * std0.square() + r * (1.0 - r) * mean0.square()).clamp_min(0.0)
    abs_max = torch.maximum(high, -low)
    return torch.stack((mean, var.sqrt(), abs_max, 1.0 - nonzero_frac, nonfinite_frac), dim=-1)


def first_output(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for value in output:
            if isinstance(value, torch.Tensor):
                return value
    return None


def auto_activation_modules(model: nn.Module, cap: int = MAX_AUTO_ACTIVATIONS) -> list[str]:
    """Names of the modules ``activations="auto"`` watches.

    The children of the largest ``nn.ModuleList`` or ``nn.Sequential`` (the blocks of a
    transformer: their outputs are the residual stream, where drift shows first); a model
    without one gets its leaf modules that hold parameters. At most ``cap``, spread evenly
    from the first to the last so that both ends of the network stay in view.
    """
    best: tuple[str, nn.Module] | None = None
    best_size = (0, 0)
    for name, module in model.named_modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) >= 2:
            # Largest by parameters, then by length: the blocks, not a block's inner MLP.
            size = (sum(p.numel() for p in module.parameters()), len(module))
            if best is None or size > best_size:
                best, best_size = (name, module), size
    if best is not None:
        prefix = f"{best[0]}." if best[0] else ""
        names = [f"{prefix}{child}" for child, _ in best[1].named_children()]
    else:
        names = [
            name
            for name, module in model.named_modules()
            if not any(True for _ in module.children())
            and any(True for _ in module.parameters(recurse=False))
        ]
    if len(names) > cap:
        step = (len(names) - 1) / max(cap - 1, 1)
        names = [names[round(i * step)] for i in range(cap)]
    return names
