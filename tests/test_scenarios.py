"""The scenario benchmark end to end, once and short: a real TinyLM run whose gradients turn
NaN at a known step, watched by the agent, reported by the collector's detectors through
``GET /api/v1/runs/{id}/anomalies`` at that very step."""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks.scenarios import nan_gradients
from benchmarks.scenarios.base import AgentSetup
from benchmarks.scenarios.collector import fetch_anomalies
from benchmarks.scenarios.scoring import score_run
from runwatch.agent.safety import FAULTS
from tests.conftest import Collector

STEPS = 40
ONSET = 25
DEADLINE = 10.0


def test_nan_gradients_reported_at_the_faulty_step(collector: Collector, tmp_path: Path) -> None:
    scenario = nan_gradients.scenario(steps=STEPS, onset=ONSET, pace_s=0.0)
    assert scenario.train is not None
    faults = FAULTS.counts()
    setup = AgentSetup(server=collector.url, name="nan_gradients-test", spool_dir=str(tmp_path))
    run = setup.init()
    try:
        outcome = scenario.train(run, 0)
    finally:
        run.finish()
    assert FAULTS.counts() == faults, f"agent parts failed: {FAULTS.counts()}"
    assert run.id is not None and outcome.steps == STEPS and outcome.onset == ONSET
    assert outcome.notes["first_nan_loss"] == ONSET + 1  # the fault really happened

    deadline = time.monotonic() + DEADLINE
    while True:
        anomalies = fetch_anomalies(collector.url, run.id)
        hits = [a for a in anomalies if a["kind"].startswith("nonfinite_") and a["step"] == ONSET]
        if hits or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert hits, f"no nonfinite_* anomaly at step {ONSET}; got {anomalies}"
    assert hits[0]["run_id"] == run.id and hits[0]["severity"] == "critical"
    score = score_run(outcome, scenario.fault, anomalies)
    assert score.detected and score.delay_steps == 0 and score.false_alarms == 0
