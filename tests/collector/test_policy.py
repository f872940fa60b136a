"""The policy engine: the file format and its errors, the decisions, and the wiring.

Decisions are tested on :class:`PolicyEngine` over a real database and a real
:class:`ControlChannel` (anomalies stored as the pipeline stores them, then handed over);
the last tests go through a running collector.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError
from sqlalchemy import text

from runwatch.alerting.config import AlertingConfig
from runwatch.cli import main as cli
from runwatch.client import Client
from runwatch.collector.alerts import Alerter
from runwatch.collector.batch import Batch
from runwatch.collector.control import ControlChannel
from runwatch.collector.pipeline import DetectionPipeline
from runwatch.collector.policy.engine import PolicyEngine
from runwatch.collector.policy.model import (
    KNOWN_KINDS,
    PolicyError,
    default_policy_text,
    parse_policy,
    policy_from_setting,
)
from runwatch.collector.storage.alerts import AlertFilter, list_alerts
from runwatch.collector.storage.anomalies import Found, insert_anomalies
from runwatch.collector.storage.checkpoints import DEFAULT_WINDOW, last_good, register_checkpoint
from runwatch.collector.storage.commands import CommandFilter, CommandRecord
from runwatch.collector.storage.points import write_batches
from runwatch.collector.storage.runs import create_or_resume, finish_run
from runwatch.collector.storage.store import Store
from runwatch.collector.telemetry import Telemetry
from runwatch.detectors.base import Anomaly
from runwatch.detectors.defaults import RULES
from runwatch.detectors.engine import Engine, Rule
from runwatch.detectors.nonfinite import NonFinite
from runwatch.detectors.spike import Spike
from runwatch.settings import Settings
from tests.conftest import start_collector

LOSS = "train/loss"
POLICY_LOG = "runwatch.collector.policy"
running_collector = contextmanager(start_collector)


# -- the format -----------------------------------------------------------------------
def rule(**fields: Any) -> str:
    """A one-rule policy in YAML (flow style), ``fields`` over a valid rule."""
    base: dict[str, Any] = {"name": "r", "kinds": "loss_spike", "actions": ["skip_step"]}
    base.update(fields)
    body = ", ".join(f"{k}: {v}" for k, v in base.items())
    return f"rules: [{{{body}}}]"


BAD = [
    ("", "the file is empty"),
    ("rules: [\n", "line 2, column 1: not valid YAML"),
    ("- 1\n- 2\n", "a policy is a mapping, not a list"),
    ("rules: []\nrules: []\n", "line 2, column 1: not valid YAML: key 'rules' given twice"),
    ("? [a, b]\n: 1\n", "line 1, column 3: not valid YAML: a list or a mapping cannot be a key"),
    ("version: 2\n", "version: Input should be 1"),
    ("rule: []\n", "rule: unknown field"),
    ("rules: 3\n", "rules: Input should be a valid list"),
    ("rules: [{kinds: hang, actions: [skip_step]}]", "rules[0].name: required field missing"),
    (rule(name="'a b'"), "rules[0].name: a rule name is 1 to 64 letters"),
    (rule(name="rollback_limit"), "'rollback_limit' is reserved"),
    (rule(kinds="lossspike"), "rules[0].kinds: no anomaly kind matches 'lossspike' (known: "),
    (rule(kinds="[]"), "rules[0].kinds: List should have at least 1 item"),
    (rule(severities="fatal"), "rules[0].severities[0]: Input should be 'info', 'warning' or"),
    (rule(cooldown_steps=-1), "rules[0].cooldown_steps: Input should be greater than or equal"),
    (rule(actions="[]"), "rules[0].actions: List should have at least 1 item"),
    (rule(actions="[explode]"), "rules[0].actions[0]: unknown action 'explode' (known: lr_scale"),
    (rule(actions="[{a: 1, b: 2}]"), "rules[0].actions[0]: an action is a mapping with one key"),
    (rule(actions="[[1]]"), "rules[0].actions[0]: an action is a mapping with one key"),
    (
        rule(actions="[skip_step, {lr_scale: {factor: 0, steps: 10}}]"),
        "rules[0].actions[1].lr_scale.factor: Input should be greater than 0",
    ),
    (rule(actions="[{lr_scale: {factor: 0.5}}]"), "actions[0].lr_scale.steps: required field"),
    (rule(actions="[{lr_scale: 0.5}]"), "actions[0].lr_scale: Input should be a valid dictionary"),
    (rule(actions="[{clip: {max_norm: 1, z: 2}}]"), "actions[0].clip: z and alpha apply only"),
    (rule(actions="[{clip: {}}]"), "actions[0].clip: clip takes either max_norm"),
    (rule(actions="[{rollback: {checkpoint: 7}}]"), "rollback.checkpoint: a policy rolls back to"),
    (rule(actions="[{rollback: {lr_factor: 2}}]"), "rollback.lr_factor: Input should be less"),
    (rule(actions="[{stop: {why: x}}]"), "rules[0].actions[0].stop.why: unknown field"),
    (rule(actions="[{alert: {severity: page}}]"), "actions[0].alert.severity: Input should be"),
    (rule(otherwise="[rollback]"), "rules[0].otherwise: otherwise cannot roll back"),
    (
        "limits: {rollbacks: {max: 0, on_limit: [rollback]}}",
        "limits.rollbacks.max: Input should be greater than or equal to 1",
    ),
    ("limits: {rollbacks: {on_limit: [rollback]}}", "on_limit: on_limit cannot roll back"),
    (
        "rules: [{name: a, kinds: hang, actions: [skip_step]}, "
        "{name: a, kinds: hang, actions: [skip_step]}]",
        "policy: two rules are named 'a'",
    ),
]


@pytest.mark.parametrize(("text", "message"), BAD)
def test_bad_policies_are_refused_with_the_place_and_the_reason(text: str, message: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, "p.yaml")
    assert any(message in p for p in caught.value.problems), caught.value.problems
    assert str(caught.value).startswith("policy p.yaml: ")


def test_every_problem_is_reported_at_once() -> None:
    text = rule(kinds="nope", actions="[{lr_scale: {factor: -1, steps: 0}}]")
    with pytest.raises(PolicyError) as caught:
        parse_policy(text)
    assert len(caught.value.problems) == 3


def test_a_valid_policy_keeps_what_it_says() -> None:
    policy = parse_policy(
        """
        rules:
          - name: spikes
            kinds: [loss_spike*, grad_norm_spike]
            severities: warning
            keys: "train/*"
            projects: [llm-*]
            cooldown_steps: 50
            actions:
              - skip_step
              - clip: {mode: adaptive}
              - alert: {message: spike}
        """
    )
    (r,) = policy.rules
    assert [(a.type, a.args) for a in r.actions] == [
        ("skip_step", {}),
        ("clip", {"mode": "adaptive", "z": 2.5, "alpha": 0.97}),
        ("alert", {"severity": "warning", "message": "spike"}),
    ]
    assert r.matches("loss_spike_sustained", "warning", LOSS, "llm-7b")
    assert not r.matches("loss_spike", "critical", LOSS, "llm-7b")
    assert not r.matches("loss_spike", "warning", "val/loss", "llm-7b")
    assert not r.matches("loss_spike", "warning", LOSS, "vision")
    limit = policy.limits.rollbacks  # the default limit: 3 in 5000 steps, then stop and page
    assert (limit.max, limit.within_steps) == (3, 5000)
    assert [a.type for a in limit.on_limit] == ["stop", "alert"]


def test_the_default_policy_loads_and_says_what_the_readme_says() -> None:
    policy = policy_from_setting("default")
    assert policy is not None and policy == parse_policy(default_policy_text())
    actions = {r.name: [(a.type, a.args) for a in r.actions] for r in policy.rules}
    assert actions == {
        "rollback-on-divergence": [
            (
                "rollback",
                {"checkpoint": "last_good", "skip_batches": 200, "lr_factor": 0.5, "lr_steps": 200},
            )
        ],
        "lr-cut-on-loss-spike": [("lr_scale", {"factor": 0.5, "steps": 200})],
        "clip-on-grad-spike": [("clip", {"mode": "adaptive", "z": 2.5, "alpha": 0.97})],
        "alert-on-hang": [
            (
                "alert",
                {"severity": "critical", "message": "training hung; the supervisor restarts it"},
            )
        ],
        "checkpoint-on-hardware-errors": [
            ("checkpoint", {"reason": "hardware errors"}),
            (
                "alert",
                {
                    "severity": "critical",
                    "message": "GPU hardware errors; checkpoint requested",
                },
            ),
        ],
    }
    assert [a.type for a in policy.rules[0].otherwise] == ["alert"]
    limit = policy.limits.rollbacks
    assert (limit.max, limit.within_steps, [a.type for a in limit.on_limit]) == (
        3,
        5000,
        ["stop", "alert"],
    )
    assert policy_from_setting("off") is None


def test_known_kinds_are_the_kinds_the_detectors_report() -> None:
    series_kinds = set()
    for r in RULES:
        detector = r.make()
        series_kinds.add(detector.kind)  # type: ignore[attr-defined]
        if isinstance(detector, Spike):
            series_kinds.add(f"{detector.kind}_sustained")
    run_kinds = {
        "generalization_gap",
        "lr_loss_jump",
        "hang",
        "agent_silent",
        "straggler",
        "system_outlier",
        "update_ratio_high",
    }
    assert series_kinds | run_kinds == set(KNOWN_KINDS)


def test_a_bad_policy_setting_refuses_to_start(tmp_path: Path) -> None:
    bad = tmp_path / "p.yaml"
    bad.write_text(rule(actions="[{lr_scale: {factor: 0, steps: 1}}]"))
    with pytest.raises(ValidationError, match=r"rules\[0\]\.actions\[0\]\.lr_scale\.factor"):
        Settings(policy=str(bad))
    with pytest.raises(ValidationError, match="cannot read it"):
        Settings(policy=str(tmp_path / "missing.yaml"))
    good = tmp_path / "good.yaml"
    good.write_text(default_policy_text())
    assert Settings(policy=str(good)).policy == str(good)


def test_cli_checks_a_policy_and_shows_the_default(tmp_path: Path) -> None:
    runner = CliRunner()
    good = tmp_path / "good.yaml"
    good.write_text(default_policy_text())
    result = runner.invoke(cli, ["policy", "check", str(good)])
    assert (result.exit_code, result.stdout) == (0, "ok: 5 rules\n")
    for body, message in [
        ("rules: [\n", "not valid YAML"),
        ("rules: [{name: a, kinds: hang, actions: [fly]}]", "unknown action 'fly'"),
        (rule(cooldown_steps="soon"), "cooldown_steps: Input should be a valid integer"),
    ]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(body)
        result = runner.invoke(cli, ["policy", "check", str(bad)])
        assert result.exit_code == 1
        assert f"{bad}: " in result.stderr and message in result.stderr
        assert "Traceback" not in result.output
    result = runner.invoke(cli, ["policy", "check", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 1 and "cannot read it" in result.stderr
    result = runner.invoke(cli, ["policy", "show-default"])
    assert result.exit_code == 0 and result.stdout == default_policy_text()


# -- decisions ----------------------------------------------------------------------------
class Harness:
    """A run, its database and channel, and a policy engine deciding on its anomalies."""

    def __init__(self, store: Store, policy_text: str | None = None) -> None:
        self.store = store
        self.telemetry = Telemetry()
        self.control = ControlChannel(store)
        self.control.load()
        policy = (
            policy_from_setting("default") if policy_text is None else parse_policy(policy_text)
        )
        assert policy is not None
        self.engine = PolicyEngine(policy, self.control, self.telemetry)
        with store.write() as conn:
            self.run = create_or_resume(conn, "llm", "r")[0].id
        self._seq = 0

    def restart(self) -> None:
        """A new channel and engine over the same database, as after a collector restart."""
        self.control = ControlChannel(self.store)
        self.control.load()
        self.engine = PolicyEngine(self.engine.policy, self.control, self.telemetry)

    def progress(self, *steps: int) -> None:
        """Rank 0 reports these steps (the run's progress decides ``at_step``)."""
        self._seq += 1
        batch = Batch(
            run=self.run,
            rank=0,
            seq=self._seq,
            steps=list(steps),
            wall_times=[time.time()] * len(steps),
            keys=[LOSS] * len(steps),
            values=[2.0] * len(steps),
        )
        write_batches(self.store, [batch])

    def checkpoint(self, step: int) -> None:
        """A checkpoint saved (on the trainer's clock) before the progress reported since."""
        with self.store.write() as conn:
            register_checkpoint(
                conn,
                self.run,
                step=step,
                path=f"/ckpt/step-{step}.pt",
                size_bytes=1,
                wall_time=time.time() - 60,
                reason="",
                command_id=None,
                keep=None,
                window=DEFAULT_WINDOW,
                now=time.time(),
            )

    def anomalies(self, *found: tuple[str, int] | tuple[str, int, str]) -> list[CommandRecord]:
        """Store (kind, step[, severity]) anomalies as the pipeline does and let the engine
        decide; the commands it issued."""
        before = self._ids()
        items = [
            Found(
                self.run,
                time.time(),
                Anomaly(f[0], f[2] if len(f) > 2 else "critical", LOSS, 0, f[1], 1.0, "d", "m"),
            )
            for f in found
        ]
        with self.store.write() as conn:
            insert_anomalies(conn, items, time.time())
        self.engine.on_anomalies(items)
        return [c for c in self.commands() if c.id not in before]

    def _ids(self) -> set[int]:
        with self.store.read() as conn:
            return set(conn.execute(text("SELECT id FROM commands")).scalars())

    def commands(self) -> list[CommandRecord]:
        return self.control.commands(self.run, CommandFilter(limit=1000))

    def ack(self, command: CommandRecord, status: str = "applied") -> None:
        self.control.ack(
            command.id,
            run_id=self.run,
            rank=0,
            status=status,
            detail="",
            step=None,
            project_id=None,
        )

    def count(self, rule: str, action: str, outcome: str) -> float:
        for family in text_string_to_metric_families(self._exposition()):
            for s in family.samples:
                if s.name == "runwatch_policy_actions_total" and s.labels == {
                    "rule": rule,
                    "action": action,
                    "outcome": outcome,
                }:
                    return s.value
        return 0.0

    def _exposition(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.telemetry.registry).decode()


@pytest.fixture
def h(store: Store) -> Harness:
    """The default policy over a run at step 1000 with a good checkpoint at step 100."""
    harness = Harness(store)
    harness.progress(*range(0, 1001, 50))
    harness.checkpoint(100)
    return harness


def kinds(commands: list[CommandRecord]) -> list[tuple[str, str]]:
    return [(c.type, c.source) for c in commands]


ROLLBACK = "policy:rollback-on-divergence"


def test_a_burst_of_findings_gives_one_rollback(h: Harness) -> None:
    issued = h.anomalies(
        ("loss_spike", 1000, "warning"),
        ("nonfinite_loss", 1000),
        ("divergence", 1000),
        ("grad_norm_spike", 1000, "warning"),
        ("nonfinite_grad_norm", 1000),
        ("loss_spike_sustained", 1000, "warning"),
    )
    assert kinds(issued) == [("rollback", ROLLBACK)]
    (rollback,) = issued
    assert rollback.args["step"] == 100 and rollback.args["path"] == "/ckpt/step-100.pt"
    assert (rollback.args["skip_batches"], rollback.args["lr_factor"]) == (200, 0.5)
    assert rollback.at_step is not None and rollback.at_step > 1000
    assert h.count("rollback-on-divergence", "rollback", "issued") == 1


def test_findings_a_pending_rollback_undoes_cause_nothing_more(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    (rollback,) = h.anomalies(("divergence", 1000))
    assert rollback.at_step is not None
    # Late findings of the same fault, before the rollback's step: it cures them.
    assert h.anomalies(("nonfinite_loss", rollback.at_step - 1)) == []
    assert h.anomalies(("loss_spike", 1000, "warning"), ("grad_norm_spike", 999)) == []
    # A hang is no training-signal fault: its alert goes out meanwhile.
    with caplog.at_level(logging.WARNING, logger=POLICY_LOG):
        assert h.anomalies(("hang", 1000)) == []
    assert "alert [critical]" in caplog.text and "rule alert-on-hang" in caplog.text
    # Rank 0 applies it: the run is back at step 100, on a new timeline.
    h.ack(rollback)
    h.progress(100, 150, 300)
    again = h.anomalies(("nonfinite_loss", 300))
    assert kinds(again) == [("rollback", ROLLBACK)]


def test_a_rollback_past_its_expiry_no_longer_holds_the_policy_back(h: Harness) -> None:
    """Expiry is marked lazily (when the run's commands are next read): the engine must not
    wait for that to count an undelivered rollback as gone."""
    (rollback,) = h.anomalies(("divergence", 1000))
    h.control.clock = lambda: rollback.expires_at + 1.0
    (again,) = h.anomalies(("nonfinite_loss", 1010))
    assert again.type == "rollback" and again.id != rollback.id
    assert {c.id: c.state for c in h.commands()}[rollback.id] == "expired"


def test_late_findings_from_the_steps_a_rollback_discarded_are_ignored(h: Harness) -> None:
    (rollback,) = h.anomalies(("divergence", 1000))
    assert rollback.at_step is not None
    observed_before = time.time()
    time.sleep(0.01)
    h.ack(rollback)
    # Observed before the rollback was applied, at a step it undid: the old timeline.
    stale = Found(
        h.run,
        observed_before,
        Anomaly("nonfinite_loss", "critical", LOSS, 0, rollback.at_step - 1, 1.0, "d", "m"),
    )
    h.engine.on_anomalies([stale])
    assert [c.id for c in h.commands()] == [rollback.id]


def test_cooldown_in_steps_and_across_a_restart(h: Harness) -> None:
    (cut,) = h.anomalies(("loss_spike", 1000, "warning"))
    assert (cut.type, cut.source, cut.args) == (
        "lr_scale",
        "policy:lr-cut-on-loss-spike",
        {"factor": 0.5, "steps": 200},
    )
    assert cut.at_step is not None
    assert h.anomalies(("loss_spike", cut.at_step + 100, "warning")) == []
    h.restart()  # the cooldown is in the commands table, not in memory
    assert h.anomalies(("loss_spike", cut.at_step + 199, "warning")) == []
    h.progress(cut.at_step + 200)
    (second,) = h.anomalies(("loss_spike", cut.at_step + 200, "warning"))
    assert second.type == "lr_scale"


def test_an_applied_rollback_ends_every_cooldown(h: Harness) -> None:
    (cut,) = h.anomalies(("loss_spike", 1000, "warning"))
    (rollback,) = h.anomalies(("divergence", 1010))
    h.ack(cut)
    h.ack(rollback)
    h.progress(100, 200)
    # Step 200 is long before the cut's at_step + 200, but on the replayed timeline.
    (again,) = h.anomalies(("loss_spike", 200, "warning"))
    assert again.source == "policy:lr-cut-on-loss-spike"


def test_commands_of_different_types_are_issued_together_one_per_type(store: Store) -> None:
    h = Harness(
        store,
        """
        rules:
          - {name: cut, kinds: loss_spike, actions: [{lr_scale: {factor: 0.5, steps: 10}}]}
          - {name: cut-more, kinds: loss_spike, actions: [{lr_scale: {factor: 0.1, steps: 10}}]}
          - {name: clip, kinds: grad_norm_spike, actions: [{clip: {max_norm: 1.0}}, skip_step]}
        """,
    )
    h.progress(10)
    issued = h.anomalies(("loss_spike", 10, "warning"), ("grad_norm_spike", 10, "warning"))
    assert [(c.type, c.source, c.args) for c in issued] == [
        ("lr_scale", "policy:cut", {"factor": 0.5, "steps": 10}),
        ("clip", "policy:clip", {"max_norm": 1.0}),
        ("skip_step", "policy:clip", {}),
    ]


def test_stop_wins_over_a_rollback(store: Store) -> None:
    h = Harness(
        store,
        """
        rules:
          - {name: back, kinds: divergence, actions: [rollback]}
          - {name: halt, kinds: hardware_errors, actions: [{stop: {reason: gpu}}]}
        """,
    )
    h.checkpoint(10)
    h.progress(200)
    with store.read() as conn:  # the rollback was possible: it lost to the stop
        assert last_good(conn, h.run, DEFAULT_WINDOW) is not None
    issued = h.anomalies(("divergence", 200), ("hardware_errors", 200))
    assert kinds(issued) == [("stop", "policy:halt")]
    # While it is on its way, no other command goes out.
    assert h.anomalies(("hardware_errors", 210), ("divergence", 210)) == []


def test_the_fourth_rollback_stops_the_run_and_pages(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    step = 1000
    for _ in range(3):
        (rollback,) = h.anomalies(("divergence", step))
        assert rollback.type == "rollback"
        h.ack(rollback)
        step = 300 + len(h.commands())  # replayed steps, within 5000 of the rollbacks
        h.progress(step)
    with caplog.at_level(logging.WARNING, logger=POLICY_LOG):
        issued = h.anomalies(("divergence", step))
    assert [(c.type, c.source) for c in issued] == [("stop", "policy:rollback_limit")]
    assert "rollback limit" in issued[0].args["reason"]
    assert "alert [critical]" in caplog.text and "rule rollback_limit" in caplog.text
    assert h.count("rollback-on-divergence", "rollback", "limited") == 1
    # Still over the limit, and stopping: no second stop.
    assert h.anomalies(("divergence", step + 1)) == []


def test_the_limit_forgets_rollbacks_older_than_its_window(h: Harness) -> None:
    step = 1000
    for _ in range(3):
        (rollback,) = h.anomalies(("divergence", step))
        h.ack(rollback)
        step += 5000  # each one far beyond the last: recovered runs, not a loop
        h.progress(step)
    (fourth,) = h.anomalies(("divergence", step))
    assert fourth.type == "rollback"


def test_failed_rollbacks_count_towards_the_limit(h: Harness) -> None:
    for _ in range(3):
        (rollback,) = h.anomalies(("divergence", 1000 + len(h.commands()) * 10))
        h.ack(rollback, "failed")  # e.g. a loop without run.data()
        h.progress(1000 + len(h.commands()) * 10)
    issued = h.anomalies(("divergence", 1100))
    assert kinds(issued) == [("stop", "policy:rollback_limit")]


def test_no_good_checkpoint_takes_the_otherwise_branch(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    h = Harness(store)
    h.progress(1000)
    with caplog.at_level(logging.INFO, logger=POLICY_LOG):
        assert h.anomalies(("nonfinite_loss", 1000), ("loss_spike", 1000, "warning")) == []
    assert "has no good checkpoint" in caplog.text
    assert "alert [critical]" in caplog.text and "no good checkpoint to roll back to" in caplog.text
    assert h.count("rollback-on-divergence", "rollback", "refused") == 1
    assert h.count("rollback-on-divergence", "alert", "logged") == 1


def test_a_hang_only_alerts_and_unmatched_kinds_do_nothing(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger=POLICY_LOG):
        assert h.anomalies(("hang", 1000)) == []
        assert h.anomalies(("hang", 1000)) == []  # the same episode: alerted once
    assert caplog.text.count("rule alert-on-hang") == 1
    assert "llm/r" in caplog.text and "hang at step 1000" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger=POLICY_LOG):
        quiet = h.anomalies(
            ("dead_units", 1000, "warning"),
            ("throughput_drop", 1000, "warning"),
            ("hardware_errors", 1000, "warning"),  # the default rule wants critical ones
        )
    assert quiet == [] and caplog.text == ""


def test_policy_alerts_become_routed_alerts_with_their_cause(h: Harness) -> None:
    alerter = Alerter(
        h.store, AlertingConfig(), {}, h.telemetry, secret="s", clock=time.time, workers=1
    )
    h.engine.alerter = alerter
    h.anomalies(("hang", 1000))
    h.anomalies(("hardware_errors", 1001))
    with h.store.read() as conn:
        raised = {a.kind: a for a in list_alerts(conn, AlertFilter())}
    hang = raised["policy:alert-on-hang"]
    assert (hang.key, hang.severity, hang.source, hang.last_step) == (
        LOSS,
        "critical",
        "policy:alert-on-hang",
        1000,
    )
    assert hang.summary == "training hung; the supervisor restarts it (hang at step 1000: m)"
    assert raised["policy:checkpoint-on-hardware-errors"].escalation == "log"
    assert h.count("alert-on-hang", "alert", "raised") == 1
    alerter.close()


def test_hardware_errors_checkpoint_and_page(h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=POLICY_LOG):
        issued = h.anomalies(("hardware_errors", 1000))
    assert kinds(issued) == [("checkpoint", "policy:checkpoint-on-hardware-errors")]
    assert "GPU hardware errors" in caplog.text


def test_runs_that_are_not_running_get_nothing(h: Harness) -> None:
    with h.store.write() as conn:
        finish_run(conn, h.run, "crashed")
    assert h.anomalies(("divergence", 1000), ("hang", 1000)) == []


def test_a_failing_decision_is_logged_and_counted_never_raised(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    with h.store.write() as conn:
        conn.execute(text("ALTER TABLE commands RENAME TO commands_away"))
    try:
        bad = Found(h.run, time.time(), Anomaly("divergence", "critical", LOSS, 0, 9, 1, "d", "m"))
        with caplog.at_level(logging.ERROR, logger=POLICY_LOG):
            h.engine.on_anomalies([bad])
    finally:
        with h.store.write() as conn:
            conn.execute(text("ALTER TABLE commands_away RENAME TO commands"))
    assert "the policy could not decide on 1 anomalies of run" in caplog.text
    assert h.telemetry.detection_failures.labels("policy")._value.get() == 1


# -- wiring -----------------------------------------------------------------------------
def test_the_pipeline_hands_stored_anomalies_over_and_survives_a_failing_consumer(
    store: Store,
) -> None:
    calls: list[list[Found]] = []

    def consume(found: list[Found]) -> None:
        calls.append(found)
        raise RuntimeError("consumer bug")

    telemetry = Telemetry()
    pipeline = DetectionPipeline(
        store,
        telemetry,
        engine_factory=lambda: Engine([Rule(LOSS, NonFinite, {"kind": "nonfinite_loss"})]),
        on_anomalies=consume,
    )
    with store.write() as conn:
        run = create_or_resume(conn, "p", "r")[0].id
    try:
        for seq, steps, values in [(0, [0], [None]), (1, [1, 2], [1.0, None])]:
            pipeline.submit(
                Batch(run, 0, seq, steps, [1.7e9] * len(steps), [LOSS] * len(steps), values)
            )
            assert pipeline.wait_idle(10)
    finally:
        pipeline.close()
    assert [[(f.anomaly.kind, f.anomaly.step) for f in c] for c in calls] == [
        [("nonfinite_loss", 0)],
        [("nonfinite_loss", 2)],
    ]
    failures = telemetry.detection_failures.labels("on_anomalies")._value.get()
    assert failures == 2


def test_a_nan_loss_in_a_real_collector_rolls_back(db_url: str) -> None:
    with running_collector(db_url) as collector, collector.client() as client:
        run = client.create_run("llm", "r")["id"]
        client.register_checkpoint(
            run, step=10, path="/ckpt/10.pt", size_bytes=1, wall_time=time.time()
        )
        smooth = [(s, time.time(), LOSS, 3.0 - 0.001 * s) for s in range(200)]
        client.ingest(run, smooth, seq=0)
        client.ingest(run, [(200, time.time(), LOSS, math.nan)], seq=1)
        (command,) = wait_for_commands(client, run)
        assert (command["type"], command["source"]) == ("rollback", ROLLBACK)
        assert command["args"]["path"] == "/ckpt/10.pt" and command["args"]["skip_batches"] == 200
        metrics = collector.http.get("/metrics").text
        assert (
            'runwatch_policy_actions_total{action="rollback",outcome="issued",'
            'rule="rollback-on-divergence"} 1.0' in metrics
        )


def test_policy_off_detects_without_acting(db_url: str) -> None:
    with running_collector(db_url, policy="off") as collector, collector.client() as client:
        run = client.create_run("llm", "r")["id"]
        client.register_checkpoint(run, step=0, path="/c.pt", size_bytes=1, wall_time=time.time())
        client.ingest(run, [(s, time.time(), LOSS, 2.0) for s in range(200)], seq=0)
        client.ingest(run, [(200, time.time(), LOSS, math.nan)], seq=1)
        assert collector.thread.app.state.pipeline.wait_idle(10)
        assert [a["kind"] for a in client.anomalies(run)] == ["nonfinite_loss"]
        assert client.commands(run) == []


def wait_for_commands(client: Client, run: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while not (found := client.commands(run)):
        assert time.monotonic() < deadline, "no policy command arrived"
        time.sleep(0.02)
    return found
