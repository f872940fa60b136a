"""Which detectors watch which series by default: the keys the agent sends (README)."""

from __future__ import annotations

from runwatch.detectors.engine import Engine, Rule, RunRule
from runwatch.detectors.nonfinite import NonFinite, Positive
from runwatch.detectors.spike import Spike

RULES: tuple[Rule, ...] = (
    Rule("train/loss", NonFinite, {"kind": "nonfinite_loss"}),
    Rule("train/loss", Spike, {"kind": "loss_spike"}),
    Rule("train/grad_norm", NonFinite, {"kind": "nonfinite_grad_norm"}),
    Rule("train/grad_norm", Spike, {"kind": "grad_norm_spike"}),
    Rule("act/*/nonfinite_frac", Positive, {"kind": "nonfinite_activations"}),
)
RUN_RULES: tuple[RunRule, ...] = ()


def default_engine() -> Engine:
    """A fresh engine with the default rules, for one run."""
    return Engine(RULES, RUN_RULES)
