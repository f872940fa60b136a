"""The control channel: issue, deliver in ingest replies and the long poll, ack, expire, cancel.

Every test runs a real collector on SQLite and on PostgreSQL. Time passing (expiry) is the
control channel's injected clock moved forward, not a sleep. Scopes and project isolation
of these routes are checked with every other endpoint in tests/api/test_auth.py.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator
from typing import Any, get_args

import httpx
import pytest
from click.testing import CliRunner
from sqlalchemy import event

from runwatch.api.schemas import IssueCommand
from runwatch.cli import main as cli
from runwatch.client import Client, ClientError
from runwatch.collector.control import ControlChannel
from runwatch.collector.storage.keys import create_key
from runwatch.wire import COMMAND_TYPES, Command
from tests.conftest import Collector, start_collector

T0 = 1.7e9
LR_SCALE = {"factor": 0.5, "steps": 100}


@pytest.fixture
def run(client: Client) -> int:
    """A running run whose ranks 0 and 1 reached step 40 at 0.5 s per step."""
    run_id = client.create_run("llm", "r")["id"]
    for rank in (0, 1):
        points = [(s, T0 + s, "train/step_time", 0.5) for s in range(0, 41, 10)]
        client.ingest(run_id, points, seq=0, rank=rank)
    return run_id


class Rank:
    """One rank's agent, as far as the control channel sees it: ingest and ack."""

    def __init__(self, client: Client, run: int, rank: int) -> None:
        self.client, self.run, self.rank = client, run, rank
        self._seq = 100

    def ingest(self, *, seq: int | None = None) -> list[dict[str, Any]]:
        """Send one batch; the ids of the commands in the reply."""
        if seq is None:
            self._seq += 1
            seq = self._seq
        reply = self.client.ingest(self.run, [(41, T0 + 41, "loss", 1.0)], seq=seq, rank=self.rank)
        return reply["commands"]

    def ids(self) -> list[int]:
        return [c["id"] for c in self.ingest()]

    def ack(self, command: int, status: str = "applied", **fields: Any) -> dict[str, Any]:
        return self.client.ack_command(
            command, run=self.run, rank=self.rank, status=status, **fields
        )


def save_checkpoint(client: Client, run: int, step: int) -> int:
    """Register a checkpoint at ``step`` (a rollback needs one); its id."""
    body = {"step": step, "path": f"/ckpt/step-{step}.pt", "size_bytes": 1, "wall_time": T0 + step}
    return client.register_checkpoint(run, **body)["checkpoint"]["id"]


def control_of(collector: Collector) -> ControlChannel:
    return collector.thread.app.state.control


def state_of(client: Client, run: int, command: int) -> dict[str, Any]:
    return next(c for c in client.commands(run) if c["id"] == command)


# -- delivery ----------------------------------------------------------------------------
def test_a_command_reaches_every_rank_in_ingest_replies_and_the_poll(
    client: Client, run: int
) -> None:
    issued = client.issue_command(run, "lr_scale", **LR_SCALE)
    # 0.5 s per step: ~5 s of delivery is 10 steps beyond the latest step, 40.
    assert issued["at_step"] == 50
    assert (issued["state"], issued["source"], issued["acks"]) == ("pending", "api:open", [])
    assert issued["delivered_at"] is None
    assert issued["expires_at"] == pytest.approx(issued["created_at"] + 600)
    wire = {"id": issued["id"], "type": "lr_scale", "args": LR_SCALE, "at_step": 50}
    wire["source"] = "api:open"
    assert list(wire) == list(Command._fields)

    rank0, rank1 = Rank(client, run, 0), Rank(client, run, 1)
    assert rank0.ingest() == [wire]
    delivered = state_of(client, run, issued["id"])
    assert delivered["state"] == "delivered" and delivered["delivered_at"] >= issued["created_at"]
    assert rank1.ingest() == [wire]
    assert client.pending_commands(run, rank=1) == [wire]
    # A replayed batch is answered with the commands too.
    assert rank0.ingest(seq=0) == [wire]
    # The first delivery is the one recorded.
    assert state_of(client, run, issued["id"])["delivered_at"] == delivered["delivered_at"]


def test_commands_come_oldest_first_until_each_rank_acks_them(client: Client, run: int) -> None:
    first = client.issue_command(run, "clip", max_norm=1.0)["id"]
    second = client.issue_command(run, "skip_step")["id"]
    rank0, rank1 = Rank(client, run, 0), Rank(client, run, 1)
    for _ in range(2):  # redelivered, in order, while nobody acks
        assert rank0.ids() == [first, second]
        assert rank1.ids() == [first, second]
    assert rank0.ack(first, step=50) == {"id": first, "state": "applied"}
    assert rank0.ids() == [second]
    assert rank1.ids() == [first, second]  # rank 0's ack ends nothing for rank 1
    rank1.ack(first)
    rank1.ack(second)
    assert rank1.ids() == []
    assert client.pending_commands(run, rank=1) == []
    assert rank0.ids() == [second]
    assert client.pending_commands(run, rank=0)[0]["id"] == second
    # A rank that was never heard of gets both.
    assert [c["id"] for c in client.pending_commands(run, rank=7)] == [first, second]


def test_a_repeated_ack_keeps_the_first(client: Client, run: int) -> None:
    command = client.issue_command(run, "checkpoint", reason="before eval")["id"]
    rank0 = Rank(client, run, 0)
    assert rank0.ack(command, "failed", detail="disk full", step=50)["state"] == "failed"
    assert rank0.ack(command, "applied", step=51) == {"id": command, "state": "failed"}
    got = state_of(client, run, command)
    assert [(a["rank"], a["status"], a["detail"], a["step"]) for a in got["acks"]] == [
        (0, "failed", "disk full", 50)
    ]
    assert got["finished_at"] == got["acks"][0]["acked_at"]


def test_rank_0_decides_the_state_and_every_rank_is_on_record(client: Client, run: int) -> None:
    applied = client.issue_command(run, "stop", reason="enough")["id"]
    late = client.issue_command(run, "skip_step")["id"]
    Rank(client, run, 1).ack(applied, "failed", detail="no optimizer")
    assert state_of(client, run, applied)["state"] == "delivered"  # an ack is a delivery
    Rank(client, run, 0).ack(applied, step=50)
    Rank(client, run, 0).ack(late, "expired", detail="arrived at step 60")
    got = {c["id"]: c for c in client.commands(run)}
    assert got[applied]["state"] == "applied"
    assert [(a["rank"], a["status"]) for a in got[applied]["acks"]] == [
        (0, "applied"),
        (1, "failed"),
    ]
    assert got[late]["state"] == "expired" and got[late]["acks"][0]["detail"].startswith("arr")
    assert [c["id"] for c in client.commands(run, state="applied")] == [applied]
    assert [c["id"] for c in client.commands(run, after=applied)] == [late]


def test_an_unacknowledged_command_expires(collector: Collector, client: Client, run: int) -> None:
    short = client.issue_command(run, "skip_step", expires_in=60)["id"]
    long = client.issue_command(run, "skip_step")["id"]  # the default: 600 s
    rank0 = Rank(client, run, 0)
    assert rank0.ids() == [short, long]
    control = control_of(collector)
    control.clock = lambda: time.time() + 120
    assert rank0.ids() == [long]
    got = state_of(client, run, short)
    assert got["state"] == "expired" and got["finished_at"] == got["expires_at"]
    control.clock = lambda: time.time() + 700
    assert rank0.ids() == []
    assert client.pending_commands(run, rank=1) == []
    assert [c["state"] for c in client.commands(run)] == ["expired", "expired"]
    assert not control.has_live(run)
    # Rank 0's word on what the trainer did still counts after the collector gave up.
    assert rank0.ack(long, step=12)["state"] == "applied"


def test_cancel_stops_delivery(collector: Collector, client: Client, run: int) -> None:
    checkpoint = save_checkpoint(client, run, 20)
    command = client.issue_command(run, "rollback", checkpoint=checkpoint, skip_batches=200)["id"]
    assert state_of(client, run, command)["args"] == {
        "checkpoint": checkpoint,
        "path": "/ckpt/step-20.pt",
        "step": 20,
        "skip_batches": 200,
        "lr_factor": 1.0,
        "lr_steps": 200,
    }
    rank0, rank1 = Rank(client, run, 0), Rank(client, run, 1)
    assert rank0.ids() == [command]
    cancelled = client.cancel_command(command)
    assert (cancelled["state"], cancelled["cancelled_by"]) == ("cancelled", "api:open")
    assert rank0.ids() == [] and rank1.ids() == []
    with pytest.raises(ClientError) as err:
        client.cancel_command(command)
    assert err.value.status == 409
    assert err.value.detail == (
        f"command {command} is cancelled; only a pending or delivered command can be cancelled"
    )
    # Rank 0 had it already and applied it: the log says so, and who cancelled it.
    assert rank0.ack(command, step=50)["state"] == "applied"
    assert state_of(client, run, command)["cancelled_by"] == "api:open"
    with pytest.raises(ClientError) as err:
        client.cancel_command(command)
    assert err.value.status == 409 and "is applied" in err.value.detail


# -- at_step -----------------------------------------------------------------------------
def test_at_step_follows_the_runs_pace(client: Client) -> None:
    slow = client.create_run("llm", "slow")["id"]
    client.ingest(slow, [(s, T0 + s, "train/step_time", 2.0) for s in range(100, 111)], seq=0)
    client.ingest(slow, [(112, T0 + 112, "loss", 1.0)], seq=0, rank=3)  # the latest point
    assert client.issue_command(slow, "skip_step")["at_step"] == 112 + 3  # ceil(5 / 2.0)
    fast = client.create_run("llm", "fast")["id"]
    client.ingest(fast, [(s, T0 + s, "train/step_time", 0.001) for s in range(0, 500)], seq=0)
    assert client.issue_command(fast, "skip_step")["at_step"] == 499 + 5000
    unpaced = client.create_run("llm", "unpaced")["id"]
    assert client.issue_command(unpaced, "skip_step")["at_step"] == 1  # no steps yet
    client.ingest(unpaced, [(7, T0, "loss", 1.0), (7, T0, "train/step_time", math.nan)], seq=0)
    assert client.issue_command(unpaced, "skip_step")["at_step"] == 8
    assert client.issue_command(unpaced, "skip_step", at_step=3)["at_step"] == 3


def test_a_single_process_run_takes_commands_at_its_next_step(client: Client) -> None:
    """No ranks to keep in step: no 5 s lead (its agent applies a late command at once)."""
    single = client.create_run("llm", "single", world_size=1)
    assert single["world_size"] == 1
    client.ingest(single["id"], [(s, T0 + s, "train/step_time", 0.025) for s in range(50)], seq=0)
    assert client.issue_command(single["id"], "skip_step")["at_step"] == 50
    ddp = client.create_run("llm", "ddp", world_size=2)["id"]
    client.ingest(ddp, [(s, T0 + s, "train/step_time", 0.025) for s in range(50)], seq=0)
    assert client.issue_command(ddp, "skip_step")["at_step"] == 49 + 200
    # Resumed on 4 processes: the lead is back.
    assert client.create_run("llm", "single", world_size=4)["world_size"] == 4
    assert client.issue_command(single["id"], "skip_step")["at_step"] == 49 + 200
    # Not said (an older agent): the lead, as for several ranks.
    assert client.create_run("llm", "single")["world_size"] == 4


def test_at_step_follows_the_run_back_after_a_rollback(client: Client) -> None:
    run = client.create_run("llm", "rolled-back")["id"]
    client.ingest(run, [(s, T0 + s, "train/step_time", 1.0) for s in range(0, 413)], seq=0)
    client.ingest(run, [(400, T0 + 400, "eval/loss", 2.0)], seq=1)  # logged every 400 steps
    assert client.issue_command(run, "skip_step")["at_step"] == 412 + 5
    # Rolled back to step 300 at T0 + 1000: the run repeats steps; eval/loss still says 400.
    client.ingest(run, [(s, T0 + 700 + s, "train/step_time", 1.0) for s in range(300, 311)], seq=2)
    assert client.issue_command(run, "skip_step")["at_step"] == 310 + 5


# -- the long poll -----------------------------------------------------------------------
def test_the_long_poll_answers_as_soon_as_a_command_is_issued(
    collector: Collector, client: Client, run: int
) -> None:
    def issue_later() -> None:
        time.sleep(0.3)
        with collector.client() as other:
            other.issue_command(run, "stop", reason="operator")

    thread = threading.Thread(target=issue_later)
    started = time.monotonic()
    thread.start()
    found = client.pending_commands(run, rank=1, wait=10)
    elapsed = time.monotonic() - started
    thread.join()
    assert [c["type"] for c in found] == ["stop"]
    assert 0.25 < elapsed < 2.0, elapsed
    # What is already pending comes back without waiting.
    started = time.monotonic()
    assert client.pending_commands(run, rank=1, wait=10) == found
    assert time.monotonic() - started < 1.0


def test_the_long_poll_returns_empty_after_wait(
    collector: Collector, client: Client, run: int
) -> None:
    started = time.monotonic()
    assert client.pending_commands(run, rank=0, wait=0.5) == []
    assert 0.45 < time.monotonic() - started < 2.0
    # A command for another run does not wake it.
    other = client.create_run("llm", "other")["id"]

    def issue_elsewhere() -> None:
        with collector.client() as operator:
            operator.issue_command(other, "skip_step")

    timer = threading.Timer(0.1, issue_elsewhere)
    timer.start()
    started = time.monotonic()
    assert client.pending_commands(run, rank=0, wait=0.5) == []
    assert time.monotonic() - started > 0.45
    timer.join()
    assert client.commands(other)[0]["type"] == "skip_step"


# -- the database --------------------------------------------------------------------------
def test_ingest_queries_nothing_for_runs_without_deliverable_commands(
    collector: Collector, client: Client, run: int
) -> None:
    quiet = client.create_run("llm", "quiet")["id"]
    command = client.issue_command(run, "skip_step")["id"]
    statements: list[str] = []

    def record(_conn: object, _cursor: object, sql: str, *_: object) -> None:
        if "command" in sql:
            statements.append(sql)

    engine = collector.store.engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        for seq in range(1, 4):
            assert client.ingest(quiet, [(seq, T0, "loss", 1.0)], seq=seq)["commands"] == []
        assert statements == []
        rank1 = Rank(client, run, 1)
        rank1.ack(command)
        rank1.ingest()  # one look finds nothing left for rank 1 ...
        statements.clear()
        for _ in range(3):
            assert rank1.ingest() == []  # ... and is remembered until the run's next command
        assert statements == []
        new = client.issue_command(run, "skip_step")["id"]
        assert rank1.ids() == [new]
    finally:
        event.remove(engine, "before_cursor_execute", record)


def test_commands_survive_a_restart(db_url: str) -> None:
    for collector in start_collector(db_url):
        with collector.client() as client:
            run = client.create_run("llm", "r")["id"]
            command = client.issue_command(run, "checkpoint", reason="nightly")["id"]
    for collector in start_collector(db_url):
        assert control_of(collector).has_live(run)
        with collector.client() as client:
            assert Rank(client, run, 0).ids() == [command]


# -- refusals ------------------------------------------------------------------------------
# (body of POST /api/v1/runs/{id}/commands, what the 422 says); one server for all of them
BAD_COMMANDS: list[tuple[dict[str, Any], str]] = [
    # no type, an unknown type
    ({"args": {}}, "Unable to extract tag using discriminator 'type'"),
    (
        {"type": "reboot", "args": {}},
        "Input tag 'reboot' found using 'type' does not match any of the expected tags: "
        "'lr_scale', 'clip', 'skip_step', 'checkpoint', 'rollback', 'stop'",
    ),
    # lr_scale: factor 0, above 100, infinite, a string; steps 0, above 10^7, fractional, absent
    (
        {"type": "lr_scale", "args": {"factor": 0, "steps": 5}},
        "args.factor: Input should be greater than 0",
    ),
    (
        {"type": "lr_scale", "args": {"factor": 101, "steps": 5}},
        "args.factor: Input should be less than or equal to 100",
    ),
    (
        {"type": "lr_scale", "args": {"factor": "Infinity", "steps": 5}},
        "args.factor: Input should be a finite number",
    ),
    (
        {"type": "lr_scale", "args": {"factor": "half", "steps": 5}},
        "args.factor: Input should be a valid number",
    ),
    (
        {"type": "lr_scale", "args": {"factor": 0.5, "steps": 0}},
        "args.steps: Input should be greater than or equal to 1",
    ),
    (
        {"type": "lr_scale", "args": {"factor": 0.5, "steps": 10**7 + 1}},
        "args.steps: Input should be less than or equal to 10000000",
    ),
    (
        {"type": "lr_scale", "args": {"factor": 0.5, "steps": 1.5}},
        "args.steps: Input should be a valid integer",
    ),
    ({"type": "lr_scale", "args": {"factor": 0.5}}, "body.lr_scale.args.steps: Field required"),
    ({"type": "lr_scale"}, "body.lr_scale.args: Field required"),
    # clip: neither or both modes, max_norm 0, z and alpha without adaptive, alpha 1, z 0
    ({"type": "clip", "args": {}}, "clip takes either max_norm (a fixed clip) or mode 'adaptive'"),
    ({"type": "clip", "args": {"max_norm": 1, "mode": "adaptive"}}, "exactly one of them"),
    ({"type": "clip", "args": {"max_norm": 0}}, "args.max_norm: Input should be greater than 0"),
    (
        {"type": "clip", "args": {"max_norm": 1, "z": 3}},
        "z and alpha apply only to mode 'adaptive'",
    ),
    (
        {"type": "clip", "args": {"mode": "adaptive", "alpha": 1}},
        "args.alpha: Input should be less than 1",
    ),
    (
        {"type": "clip", "args": {"mode": "adaptive", "z": 0}},
        "args.z: Input should be greater than 0",
    ),
    ({"type": "clip", "args": {"mode": "fixed"}}, "args.mode: Input should be 'adaptive'"),
    # skip_step takes nothing
    (
        {"type": "skip_step", "args": {"n": 2}},
        "body.skip_step.args.n: Extra inputs are not permitted",
    ),
    # checkpoint and stop: a reason over 500 characters, an unknown argument
    (
        {"type": "checkpoint", "args": {"reason": "x" * 501}},
        "args.reason: String should have at most 500 characters",
    ),
    ({"type": "stop", "args": {"why": "x"}}, "body.stop.args.why: Extra inputs are not permitted"),
    # rollback: a checkpoint that is neither last_good nor an id; skip_batches out of range
    (
        {"type": "rollback", "args": {"checkpoint": "latest"}},
        "checkpoint must be 'last_good' or a checkpoint id",
    ),
    (
        {"type": "rollback", "args": {"checkpoint": 0}},
        "checkpoint must be 'last_good' or a checkpoint id",
    ),
    (
        {"type": "rollback", "args": {"skip_batches": -1}},
        "args.skip_batches: Input should be greater than or equal to 0",
    ),
    (
        {"type": "rollback", "args": {"skip_batches": 10**8}},
        "args.skip_batches: Input should be less than or equal to 10000000",
    ),
    # rollback: lr_factor 0, above 1 (a rollback only lowers it), lr_steps 0
    (
        {"type": "rollback", "args": {"lr_factor": 0}},
        "args.lr_factor: Input should be greater than 0",
    ),
    (
        {"type": "rollback", "args": {"lr_factor": 1.5}},
        "args.lr_factor: Input should be less than or equal to 1",
    ),
    (
        {"type": "rollback", "args": {"lr_steps": 0}},
        "args.lr_steps: Input should be greater than or equal to 1",
    ),
    # at_step negative or beyond int64, expires_in below 1 s, an unknown field
    (
        {"type": "stop", "at_step": -1},
        "body.stop.at_step: Input should be greater than or equal to 0",
    ),
    (
        {"type": "stop", "at_step": 2**63},
        "body.stop.at_step: Input should be less than or equal to",
    ),
    (
        {"type": "stop", "expires_in": 0.5},
        "body.stop.expires_in: Input should be greater than or equal to 1",
    ),
    ({"type": "stop", "when": "now"}, "body.stop.when: Extra inputs are not permitted"),
    # not an object at all
    ([], "body: Input should be a valid dictionary or object"),
]


def test_bad_commands_are_422_and_store_nothing(collector: Collector, run: int) -> None:
    for body, message in BAD_COMMANDS:
        reply = collector.http.post(f"/api/v1/runs/{run}/commands", json=body)
        assert reply.status_code == 422, (body, reply.text)
        got = reply.json()
        assert got["error"] == "invalid" and message in got["detail"], (body, got)
    assert collector.http.get(f"/api/v1/runs/{run}/commands").json() == []
    spec = collector.http.get("/openapi.json").json()
    body = spec["paths"]["/api/v1/runs/{run_id}/commands"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"]["discriminator"]["propertyName"] == "type"


def test_every_wire_command_type_has_a_model() -> None:
    (union, _) = get_args(IssueCommand)
    types = [get_args(m.model_fields["type"].annotation)[0] for m in get_args(union)]
    assert tuple(types) == COMMAND_TYPES


# (body of POST /api/v1/commands/{id}/ack, status, what the reply says)
BAD_ACKS: list[tuple[dict[str, Any], int, str]] = [
    # an unknown status, a missing rank, a detail over 2000 characters, a negative step
    ({"status": "done"}, 422, "body.status: Input should be 'applied', 'failed' or 'expired'"),
    ({"rank": None}, 422, "body.rank: Input should be a valid integer"),
    ({"detail": "x" * 2001}, 422, "body.detail: String should have at most 2000 characters"),
    ({"step": -1}, 422, "body.step: Input should be greater than or equal to 0"),
    # the run is not the command's
    ({"run": 999}, 422, "belongs to run"),
]


def test_bad_acks_are_refused(collector: Collector, client: Client, run: int) -> None:
    command = client.issue_command(run, "skip_step")["id"]
    for change, status, message in BAD_ACKS:
        body = {"run": run, "rank": 0, "status": "applied", "detail": "", "step": 3} | change
        reply = collector.http.post(f"/api/v1/commands/{command}/ack", json=body)
        assert reply.status_code == status, (change, reply.text)
        assert message in reply.json()["detail"], (change, reply.json())
    reply = collector.http.post(f"/api/v1/commands/{command}/ack", json=body | {"run": 999})
    assert reply.json()["detail"] == f"command {command} belongs to run {run}, not run 999"
    reply = collector.http.post("/api/v1/commands/4242/ack", json=body | {"run": run})
    assert (reply.status_code, reply.json()["detail"]) == (404, "unknown command 4242")
    assert state_of(client, run, command)["acks"] == []


def test_refusals_of_runs_and_polls(collector: Collector, client: Client, run: int) -> None:
    with pytest.raises(ClientError) as err:
        client.issue_command(999, "skip_step")
    assert (err.value.status, err.value.detail) == (404, "unknown run 999")
    client.finish_run(run)
    with pytest.raises(ClientError) as err:
        client.issue_command(run, "skip_step")
    assert err.value.status == 409
    assert err.value.detail == f"run {run} is finished; commands go to running runs only"
    http = collector.http
    for params, message in [
        ({"wait": 31}, "query.wait: Input should be less than or equal to 30"),
        ({"wait": -1}, "query.wait: Input should be greater than or equal to 0"),
        ({"rank": -1}, "query.rank: Input should be greater than or equal to 0"),
    ]:
        reply = http.get(f"/api/v1/runs/{run}/commands/pending", params=params)
        assert reply.status_code == 422 and message in reply.json()["detail"], reply.text
    reply = http.get(f"/api/v1/runs/{run}/commands", params={"state": "done"})
    assert reply.status_code == 422 and "query.state: Input should be 'pending'" in reply.text


def test_the_audit_log_names_the_key(collector: Collector, run: int) -> None:
    with collector.store.write() as conn:
        secret, info = create_key(conn, "llm", ["operate", "read"], name="on-call")
    with Client(collector.url, api_key=secret) as operator:
        command = operator.issue_command(run, "lr_scale", factor=0.9, steps=50)
        assert command["source"] == f"api:{info.prefix}" and len(info.prefix) == 11
        cancelled = operator.cancel_command(command["id"])
        assert cancelled["cancelled_by"] == f"api:{info.prefix}"
        assert operator.commands(run)[0]["source"] == f"api:{info.prefix}"
        assert secret[11:] not in json.dumps(operator.commands(run))


# -- the CLI -------------------------------------------------------------------------------
@pytest.fixture
def env(collector: Collector) -> Iterator[dict[str, str]]:
    yield {"RUNWATCH_SERVER": collector.url, "RUNWATCH_API_KEY": ""}


def invoke(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), env=env)
    return result.exit_code, result.stdout, result.stderr


def test_cli_issues_and_lists_commands(client: Client, run: int, env: dict[str, str]) -> None:
    checkpoint = save_checkpoint(client, run, 20)
    code, out, err = invoke(
        env, "command", "llm/r", "lr_scale", "--factor", "0.5", "--steps", "100"
    )
    assert code == 0, err
    assert "command 1 issued to run" in out and "factor=0.5 steps=100 at step 50" in out
    code, out, err = invoke(env, "command", str(run), "clip", "--adaptive", "--z", "3", "--json")
    assert code == 0, err
    assert json.loads(out)["args"] == {"mode": "adaptive", "z": 3.0, "alpha": 0.97}
    code, _, err = invoke(
        env, "command", str(run), "rollback", "--checkpoint", str(checkpoint), "--skip-batches",
        "300", "--lr-factor", "0.5", "--lr-steps", "50", "--at-step", "99",
    )  # fmt: skip
    assert code == 0, err
    code, _, err = invoke(env, "command", str(run), "stop", "--reason", "diverged")
    assert code == 0, err
    Rank(client, run, 0).ack(1, step=50)
    Rank(client, run, 1).ack(1, "failed", detail="no scheduler", step=50)
    code, _, err = invoke(env, "commands", "cancel", "4")
    assert code == 0, err

    code, out, err = invoke(env, "commands", "list", "llm/r")
    assert code == 0, err
    for text in (
        "1 lr_scale factor=0.5 steps=100 at step 50: applied",
        "rank 0: applied at step 50; rank 1: failed at step 50 (no scheduler)",
        "2 clip mode=adaptive z=3.0 alpha=0.97 at step 50: pending",
        "3 rollback checkpoint=1 path=/ckpt/step-20.pt step=20 skip_batches=300 lr_factor=0.5 "
        "lr_steps=50 at step 99: pending",
        "no rank has reported",
        "4 stop reason=diverged at step 50: cancelled",
        "by api:open, delivered -, ended",
        "cancelled by api:open",
        "4 command(s) of run",
    ):
        assert text in out, (text, out)
    code, out, err = invoke(env, "commands", "list", str(run), "--json", "--state", "delivered")
    assert code == 0, err
    assert json.loads(out) == []
    listed = json.loads(invoke(env, "commands", "list", str(run), "--json")[1])
    assert [(c["type"], c["state"], c["at_step"]) for c in listed] == [
        ("lr_scale", "applied", 50),
        ("clip", "pending", 50),
        ("rollback", "pending", 99),
        ("stop", "cancelled", 50),
    ]
    assert listed[2]["args"] == {
        "checkpoint": checkpoint,
        "path": "/ckpt/step-20.pt",
        "step": 20,
        "skip_batches": 300,
        "lr_factor": 0.5,
        "lr_steps": 50,
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # a flag of another type
        (["clip", "--factor", "0.5"], "--factor does not apply to clip (it takes --max-norm"),
        (
            ["skip_step", "--reason", "x"],
            "--reason does not apply to skip_step (it takes no options)",
        ),
        # required flags missing
        (["lr_scale", "--factor", "0.5"], "lr_scale needs --steps"),
        (["clip"], "clip takes either --max-norm X or --adaptive, exactly one"),
        (["clip", "--max-norm", "1", "--adaptive"], "exactly one"),
        (["clip", "--max-norm", "1", "--z", "2"], "--z and --alpha apply only to clip --adaptive"),
        # values out of range or not numbers
        (["lr_scale", "--factor", "0", "--steps", "5"], "0<x<=100"),
        (["lr_scale", "--factor", "nan", "--steps", "5"], "--factor must be a finite number"),
        (
            ["rollback", "--checkpoint", "newest"],
            "--checkpoint must be last_good or a checkpoint id",
        ),
        (["rollback", "--lr-factor", "1.5"], "0<x<=1"),
        (["lr_scale", "--factor", "0.5", "--steps", "5", "--lr-steps", "9"], "--lr-steps does not"),
        # an unknown type
        (["reboot"], "'reboot' is not one of 'lr_scale', 'clip'"),
    ],
)
def test_cli_refuses_bad_flags_with_exit_2(args: list[str], message: str) -> None:
    # Refused before any request: the server named here does not exist.
    code, out, err = invoke({"RUNWATCH_SERVER": "http://127.0.0.1:9"}, "command", "1", *args)
    assert code == 2, (out, err)
    assert message in err and "Traceback" not in out + err


def test_cli_shows_the_servers_refusal(collector: Collector, run: int, env: dict[str, str]) -> None:
    long = "x" * 501
    code, _, err = invoke(env, "command", str(run), "stop", "--reason", long)
    assert code == 1 and "422 invalid: body.stop.args.reason: String should have at most" in err
    with collector.store.write() as conn:
        secret, _ = create_key(conn, "llm", ["read"])
    code, _, err = invoke(env | {"RUNWATCH_API_KEY": secret}, "command", str(run), "skip_step")
    assert code == 1 and "the request needs 'operate'" in err
    code, out, err = invoke(env | {"RUNWATCH_API_KEY": secret}, "commands", "list", str(run))
    assert code == 0 and "0 command(s)" in out, err


def test_client_uses_the_wait_for_its_timeout(collector: Collector, run: int) -> None:
    with Client(collector.url, api_key="", timeout=0.3) as client:
        assert client.pending_commands(run, wait=0.6) == []
    with httpx.Client(base_url=collector.url) as http:
        assert http.get(f"/api/v1/runs/{run}/commands/pending").json() == {"commands": []}
