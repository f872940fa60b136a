"""Which detectors watch which series by default: the keys the agent sends (README).

Time-valued options are for a real run (steps of seconds, system samples every 5 s,
heartbeats every 5 s); ``time_scale`` shrinks the hang timeouts for runs on a compressed
clock (the scenario benchmark's runs last seconds, not days).
"""

from __future__ import annotations

from runwatch.detectors.dead_units import DeadUnits, Saturation
from runwatch.detectors.divergence import Divergence
from runwatch.detectors.drift import ActivationDrift
from runwatch.detectors.engine import Engine, Rule, RunRule
from runwatch.detectors.generalization import GeneralizationGap
from runwatch.detectors.liveness import Liveness
from runwatch.detectors.lr_coupling import LrLossCoupling
from runwatch.detectors.multivariate import SystemOutlier
from runwatch.detectors.nonfinite import NonFinite, Positive
from runwatch.detectors.spike import Spike
from runwatch.detectors.straggler import Straggler
from runwatch.detectors.system import CounterIncrease, Drop, MemoryGrowth, Regression
from runwatch.detectors.update_ratio import UpdateRatio

MEMORY = {"window": 36, "every": 3, "sustained": 2, "min_points": 12}
"""Memory growth over the last 12 to 36 samples (1 to 3 min at the agent's 5 s), confirmed by
two fits in a row: a leak that fills a host in an hour is reported within minutes, not after
a 10-minute window."""

RULES: tuple[Rule, ...] = (
    Rule("train/loss", NonFinite, {"kind": "nonfinite_loss"}),
    Rule("train/loss", Spike, {"kind": "loss_spike"}),
    Rule("train/loss", Divergence),
    Rule("train/grad_norm", NonFinite, {"kind": "nonfinite_grad_norm"}),
    Rule("train/grad_norm", Spike, {"kind": "grad_norm_spike"}),
    Rule("act/*/nonfinite_frac", Positive, {"kind": "nonfinite_activations"}),
    Rule("act/*/std", ActivationDrift),
    Rule("act/*/abs_max", ActivationDrift),
    Rule("act/*/mean", ActivationDrift, {"min_ratio": 4, "recent": 15}),
    Rule("act/*/zero_frac", DeadUnits),
    Rule("act/*/abs_max", Saturation),
    Rule("train/samples_per_s", Drop, {"kind": "throughput_drop"}),
    Rule("sys/gpu*/util_percent", Drop, {"kind": "gpu_util_collapse", "duration_s": 300}),
    Rule("train/step_time", Regression),
    Rule("train/data_wait", Regression, {"kind": "data_stall", "factor": 2, "min_value": 0.05}),
    Rule("sys/proc_rss_gb", MemoryGrowth, MEMORY),
    Rule("sys/gpu*/mem_used_gb", MemoryGrowth, MEMORY),
    Rule("sys/gpu*/ecc_uncorrected", CounterIncrease),
    Rule("sys/gpu*/xid_errors", CounterIncrease),
    Rule("sys/gpu*/ecc_corrected", CounterIncrease, {"severity": "warning"}),
)


def run_rules(time_scale: float = 1.0) -> tuple[RunRule, ...]:
    liveness = {"min_timeout": 300.0 * time_scale, "startup_timeout": 1800.0 * time_scale}
    return (
        RunRule(GeneralizationGap),
        RunRule(LrLossCoupling),
        RunRule(Liveness, liveness),
        RunRule(Straggler),
        RunRule(SystemOutlier),
        RunRule(UpdateRatio),
    )


def default_engine(time_scale: float = 1.0) -> Engine:
    """A fresh engine with the default rules, for one run."""
    return Engine(RULES, run_rules(time_scale))
