"""Run every fault in every mode, score against the healthy run, print the report."""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.recovery.faults import FAULTS, ONSET
from benchmarks.recovery.train import MODES, STEPS, Trace, train
from benchmarks.scenarios.collector import collector, fetch_anomalies
from benchmarks.scenarios.runner import machine_line
from runwatch.client import Client

BAND = 0.10
"""Recovered: the final validation loss within 10 % of the healthy run's."""
WINDOW = 10
"""Iterations averaged when asking whether the train loss is back near the healthy run's."""


@dataclass
class Result:
    fault: str
    mode: str
    iterations: int
    final_val: float
    val_ratio: float
    """Final validation loss / the healthy run's (mode ``none``) - 1."""
    nonfinite_at_end: bool
    stopped: bool
    commands: list[str]
    """``type:state`` of every command the run received."""
    anomalies: int
    recovery_iterations: int | None
    recovery_s: float | None
    redone_iterations: int
    redone_s: float
    wall_s: float


@contextmanager
def collectors(workdir: Path) -> Iterator[dict[str, str]]:
    """A collector per agent mode: policy off (``detect``), the default policy (``policy``)."""
    with ExitStack() as stack:
        yield {
            mode: stack.enter_context(collector(workdir, policy=policy, name=mode))
            for mode, policy in (("detect", "off"), ("policy", "default"))
        }


def recovery(trace: Trace, healthy: Trace) -> tuple[int | None, float | None]:
    """Iterations and seconds from the onset until the mean train loss of the last
    :data:`WINDOW` iterations is within :data:`BAND` of the healthy run's at the same steps.

    The window must lie after the onset, so a fault without effect scores :data:`WINDOW`.
    """
    by_step = dict(zip(healthy.steps, healthy.losses, strict=False))
    for end in range(ONSET + WINDOW, trace.iterations + 1):
        window = range(end - WINDOW, end)
        losses = [trace.losses[i] for i in window]
        reference = [by_step.get(trace.steps[i], math.nan) for i in window]
        if not all(math.isfinite(x) for x in losses + reference):
            continue
        if statistics.fmean(losses) <= (1 + BAND) * statistics.fmean(reference):
            return end - ONSET, trace.starts[end - 1] - trace.starts[ONSET]
    return None, None


def run_commands(url: str, run_id: int) -> list[dict[str, Any]]:
    with Client(url, api_key="") as client:
        return client.commands(run_id, limit=1000)


def measure(fault: str, mode: str, trace: Trace, healthy: Trace, url: str | None, wall: float):
    commands: list[dict[str, Any]] = []
    anomalies = 0
    if url is not None and trace.run_id is not None:
        time.sleep(2.0)  # the last batches' anomalies and acknowledgements
        commands = run_commands(url, trace.run_id)
        anomalies = len(fetch_anomalies(url, trace.run_id))
    steps_made = trace.steps[-1] + 1 if trace.steps else 0
    redone = max(0, trace.iterations - steps_made)
    rec_iterations, rec_s = (
        recovery(trace, healthy)
        if FAULTS[fault].onset is not None
        else (
            None,
            None,
        )
    )
    return Result(
        fault=fault,
        mode=mode,
        iterations=trace.iterations,
        final_val=trace.final_val,
        val_ratio=trace.final_val / healthy.final_val - 1,
        nonfinite_at_end=trace.nonfinite_at_end(),
        stopped=trace.stopped,
        commands=[f"{c['type']}:{c['state']}" for c in commands],
        anomalies=anomalies,
        recovery_iterations=rec_iterations,
        recovery_s=rec_s,
        redone_iterations=redone,
        redone_s=redone * trace.iteration_s(),
        wall_s=wall,
    )


def _num(value: float | int | None, digits: int = 2) -> str:
    if value is None:
        return "never"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def print_report(results: list[Result]) -> None:
    header = (
        f"{'fault':<18}{'mode':<8}{'val loss':>9}{'vs healthy':>11}{'NaN end':>8}"
        f"{'recovery it':>12}{'recovery s':>11}{'redone it':>10}{'redone s':>9}  commands"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.fault:<18}{r.mode:<8}{_num(r.final_val, 3):>9}{r.val_ratio:>+10.1%} "
            f"{'yes' if r.nonfinite_at_end else 'no':>8}{_num(r.recovery_iterations):>12}"
            f"{_num(r.recovery_s, 1):>11}{r.redone_iterations:>10}{r.redone_s:>9.1f}  "
            f"{', '.join(r.commands) or '-'}{' (stopped)' if r.stopped else ''}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.recovery",
        description="Faults run three ways: no agent, detection only, the default policy.",
    )
    parser.add_argument("--only", nargs="+", choices=list(FAULTS), metavar="FAULT")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    faults = ["healthy", *[f for f in (args.only or FAULTS) if f != "healthy"]]
    print(f"runwatch recovery benchmark: {machine_line()}", flush=True)
    results: list[Result] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="runwatch-recovery-") as tmp:
        workdir = Path(tmp)
        with collectors(workdir) as urls:
            healthy: Trace | None = None
            for fault in faults:
                for mode in ["none", *[m for m in args.modes if m != "none"]]:
                    began = time.perf_counter()
                    url = urls.get(mode)
                    trace = train(
                        mode, FAULTS[fault], args.seed, server=url, workdir=workdir / mode
                    )
                    if healthy is None:
                        healthy = trace  # healthy, mode none: the baseline
                    result = measure(fault, mode, trace, healthy, url, time.perf_counter() - began)
                    results.append(result)
                    print(
                        f"  {fault:<18}{mode:<7} val {_num(result.final_val, 3)} "
                        f"({result.val_ratio:+.1%}), {result.iterations} iterations, "
                        f"commands: {', '.join(result.commands) or '-'}",
                        flush=True,
                    )
    print(f"\n== results ({machine_line()}, {STEPS} steps, onset {ONSET})")
    print_report(results)
    print(f"total wall time {time.perf_counter() - start:.0f} s")
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2, default=str))
    return 0
