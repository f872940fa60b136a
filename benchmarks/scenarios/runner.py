"""``python -m benchmarks.scenarios``: run the scenarios against one collector, score, report.

See the package docstring for what is measured and how.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.scenarios import SCENARIOS
from benchmarks.scenarios.base import AgentSetup, Outcome, Scenario
from benchmarks.scenarios.collector import (
    SETTLE_TIMEOUT,
    Anomaly,
    NoPipeline,
    collector,
    find_run,
    settled_anomalies,
)
from benchmarks.scenarios.scoring import Score, Summary, score_run, summarize

NO_PIPELINE_NOTE = (
    "NOTE: the collector answered 404 on GET /api/v1/runs/{id}/anomalies: it has no "
    "detection pipeline yet. Every run counts 0 anomalies; recall and false alarms below "
    "say nothing about detectors."
)


class AgentLog(logging.Handler):
    """Keeps what the ``runwatch.agent`` logger says at WARNING and above (this process)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.levelname} {record.getMessage()}")


@dataclass
class RunResult:
    scenario: str
    seed: int
    name: str
    run_id: int | None = None
    outcome: Outcome | None = None
    anomalies: list[Anomaly] = field(default_factory=list)
    settled: bool = True
    score: Score | None = None
    train_s: float = 0.0
    wall_s: float = 0.0
    error: str | None = None
    agent_problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["outcome"] = self.outcome.to_json() if self.outcome is not None else None
        return out


def _json_safe(value: Any) -> Any:
    """Non-finite floats as the API writes them (``"NaN"``, ``"Infinity"``): strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def machine_line() -> str:
    return (
        f"nproc {os.cpu_count()}, python {platform.python_version()}, torch {torch.__version__}, "
        f"torch threads {torch.get_num_threads()}"
    )


def _agent_faults() -> dict[str, int]:
    from runwatch.agent.safety import FAULTS

    return FAULTS.counts()


def run_scenario(
    url: str,
    spool: Path,
    scenario: Scenario,
    seed: int,
    agent_log: AgentLog,
    pipeline: list[bool],
    settle: float,
) -> RunResult:
    """Train one run under the agent, finish it, wait for its anomalies and score them.

    ``pipeline``: one flag shared by the runs, cleared at the first 404 of the anomalies
    endpoint (later runs do not ask again).
    """
    name = f"{scenario.name}-{seed}"
    result = RunResult(scenario.name, seed, name)
    setup = AgentSetup(server=url, name=name, spool_dir=str(spool))
    faults_before = _agent_faults()
    warned_before = len(agent_log.messages)
    start = time.perf_counter()
    try:
        if scenario.launch is not None:
            result.outcome = scenario.launch(setup, seed)
        else:
            assert scenario.train is not None
            run = setup.init()
            try:
                result.outcome = scenario.train(run, seed)
            except BaseException:
                run.finish("failed")
                raise
            run.finish()
            result.run_id = run.id
    except Exception:
        result.error = traceback.format_exc()
    result.train_s = time.perf_counter() - start
    gc.collect()
    if result.run_id is None:
        result.run_id = find_run(url, name)
    if result.run_id is not None and pipeline[0]:
        try:
            result.anomalies, result.settled = settled_anomalies(url, result.run_id, timeout=settle)
        except NoPipeline:
            pipeline[0] = False
            print(NO_PIPELINE_NOTE, flush=True)
    if result.outcome is not None:
        result.score = score_run(result.outcome, scenario.fault, result.anomalies)
    faults_after = _agent_faults()
    result.agent_problems = [
        f"agent part {part!r} switched off after an internal error ({n}x)"
        for part, n in faults_after.items()
        if n > faults_before.get(part, 0)
    ] + agent_log.messages[warned_before:]
    result.wall_s = time.perf_counter() - start
    return result


# -- report ---------------------------------------------------------------------------------------
def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def print_table(results: list[RunResult]) -> None:
    header = (
        f"{'run':<22}{'steps':>6}{'onset':>6}  {'detected':<9}{'delay':>6}{'delay s':>8}"
        f"{'alarm s':>8}  {'kinds':<44}{'false al.':>9}{'wall s':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        o, s = r.outcome, r.score
        if r.error is not None or o is None or s is None:
            print(f"{r.name:<22}  ERROR: {(r.error or 'no outcome').strip().splitlines()[-1]}")
            continue
        detected = "-" if s.detected is None else ("yes" if s.detected else "NO")
        kinds = ",".join(s.kinds)
        if len(kinds) > 43:
            kinds = kinds[:40] + "..."
        print(
            f"{r.name:<22}{o.steps:>6}{_cell(o.onset):>6}  {detected:<9}{_cell(s.delay_steps):>6}"
            f"{_cell(s.delay_s):>8}{_cell(s.alarm_s):>8}  {kinds:<44}{s.false_alarms:>9}"
            f"{r.wall_s:>7.1f}"
        )


def print_details(results: list[RunResult]) -> None:
    print("\nwhat each fault did, and what fired:")
    for r in results:
        if r.outcome is None:
            continue
        line = f"  {r.name:<22}{r.outcome.effect}"
        if r.score is not None and r.score.first is not None:
            a = r.score.first
            line += (
                f"\n  {'':<22}first: {a.get('kind')} ({a.get('severity')}, {a.get('detector')}) "
                f"at step {a.get('step')}: {a.get('message')}"
            )
        if r.score is not None and r.score.false_alarm_kinds:
            line += f"\n  {'':<22}false alarms: {r.score.false_alarm_kinds}"
        if not r.settled:
            line += f"\n  {'':<22}(anomalies still changing after the settle timeout)"
        print(line)


def print_summary(summary: Summary, total_s: float, pipeline: bool) -> None:
    recall = (
        f"{summary.detected_runs}/{summary.fault_runs} = {summary.recall:.0%}"
        if summary.recall is not None
        else "- (no fault runs)"
    )
    per_1k = summary.false_alarms_per_1k_steps
    print(f"\nrecall over fault runs           {recall}")
    print(
        f"false alarms per 1,000 healthy steps  "
        f"{'-' if per_1k is None else f'{per_1k:.2f}'} "
        f"({summary.false_alarms} in {summary.healthy_steps:,} steps)"
    )
    print(
        f"median detection delay           {_cell(summary.median_delay_steps)} steps, "
        f"{_cell(summary.median_delay_s)} s (alarm raised after {_cell(summary.median_alarm_s)} s)"
    )
    print(f"total wall time                  {total_s:.1f} s")
    if not pipeline:
        print(NO_PIPELINE_NOTE)


# -- entry point ----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.scenarios",
        description="Fault-injection scenarios: real training runs against a real collector.",
    )
    parser.add_argument(
        "--only", nargs="+", choices=list(SCENARIOS), metavar="NAME", help="run only these"
    )
    parser.add_argument(
        "--seeds", type=int, help="seeds per scenario (default: 3 for healthy, 1 for the others)"
    )
    parser.add_argument("--json", type=Path, help="write every run and the summary here")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    parser.add_argument(
        "--settle",
        type=float,
        default=SETTLE_TIMEOUT,
        help=f"longest wait for a run's anomalies to stop changing ({SETTLE_TIMEOUT:g} s)",
    )
    args = parser.parse_args(argv)
    if args.seeds is not None and args.seeds < 1:
        parser.error("--seeds must be >= 1")
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    torch.set_num_threads(args.threads)
    chosen = [SCENARIOS[name] for name in (args.only or SCENARIOS)]
    plan = [(s, seed) for s in chosen for seed in range(args.seeds or s.seeds)]

    print(f"runwatch scenario benchmark: {machine_line()}", flush=True)
    agent_log = AgentLog()
    logging.getLogger("runwatch.agent").addHandler(agent_log)
    pipeline = [True]
    results: list[RunResult] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="runwatch-scenarios-") as tmp:
        workdir = Path(tmp)
        with collector(workdir) as url:
            print(f"collector: {url}, SQLite in {workdir}, detectors checked every 1 s", flush=True)
            for index, (scenario, seed) in enumerate(plan, 1):
                print(
                    f"[{index}/{len(plan)}] {scenario.name}-{seed}: {scenario.summary} ...",
                    flush=True,
                )
                result = run_scenario(
                    url, workdir / "spool", scenario, seed, agent_log, pipeline, args.settle
                )
                results.append(result)
                if result.error is not None:
                    print(result.error, file=sys.stderr, flush=True)
                for problem in result.agent_problems:
                    print(f"  agent problem: {problem}", flush=True)
                if result.outcome is not None:
                    print(
                        f"  {result.outcome.steps} steps, trained in {result.train_s:.1f} s, "
                        f"{len(result.anomalies)} anomalies, {result.wall_s:.1f} s in all; "
                        f"{result.outcome.effect}",
                        flush=True,
                    )
    total_s = time.perf_counter() - start

    print(f"\n== results ({machine_line()})")
    print_table(results)
    print_details(results)
    scored = [r.score for r in results if r.score is not None and r.error is None]
    summary = summarize(scored)
    print_summary(summary, total_s, pipeline[0])
    errors = [r.name for r in results if r.error is not None]
    if errors:
        print(f"runs that failed (not scored): {', '.join(errors)}")
    problems = sum(len(r.agent_problems) for r in results)
    if problems:
        print(f"agent problems: {problems} (see above)")
    if args.json is not None:
        report = {
            "machine": machine_line(),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "pipeline": pipeline[0],
            "total_s": total_s,
            "summary": asdict(summary),
            "runs": [r.to_json() for r in results],
        }
        args.json.write_text(json.dumps(_json_safe(report), indent=2, default=str))
        print(f"wrote {args.json}")
    return 0
