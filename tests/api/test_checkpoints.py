"""The checkpoint registry: registration, labels, last-good, retention, rollback resolution.

Every test runs a real collector on SQLite and on PostgreSQL. The run's progress is real
ingest of rank 0 points; anomalies are stored through the storage layer (detection is off,
so that the detectors add none of their own).
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner

from runwatch.cli import main as cli
from runwatch.client import Client, ClientError
from runwatch.collector.control import ControlChannel
from runwatch.collector.errors import Conflict
from runwatch.collector.storage.anomalies import Found, insert_anomalies
from runwatch.collector.storage.checkpoints import MAX_STEP
from runwatch.collector.storage.commands import insert_command
from runwatch.collector.storage.keys import create_key
from runwatch.detectors.base import Anomaly
from tests.conftest import Collector, start_collector

T0 = 1.7e9
FIELDS = [
    "id",
    "run_id",
    "step",
    "path",
    "size_bytes",
    "wall_time",
    "reason",
    "command",
    "label",
    "label_detail",
    "created_at",
    "deleted_at",
]

_seqs = itertools.count(1)


@pytest.fixture
def collector(db_url: str) -> Iterator[Collector]:
    """Detection off (anomalies come from the tests only); keys checked on every request."""
    yield from start_collector(db_url, detection=False, key_cache_seconds=0)


@pytest.fixture
def run(client: Client) -> int:
    return client.create_run("llm", "r")["id"]


def progress(client: Client, run: int, steps: range, *, t0: float = T0) -> None:
    """Rank 0 makes ``steps``, step s at wall time ``t0 + s``."""
    points = [(s, t0 + s, "train/tokens", 1.0) for s in steps]
    client.ingest(run, points, seq=next(_seqs))


def save(client: Client, run: int, step: int, *, wall: float | None = None, **body: Any) -> Any:
    """Register a checkpoint at ``step`` saved at ``wall`` (default ``T0 + step``)."""
    body = {
        "step": step,
        "path": f"/ckpt/r/step-{step:09d}.pt",
        "size_bytes": 1_000_000 + step,
        "wall_time": T0 + step if wall is None else wall,
    } | body
    return client.register_checkpoint(run, **body)


def spike(
    collector: Collector, run: int, step: int, *, wall: float | None = None, **kw: Any
) -> int:
    """Store an anomaly (a loss spike unless ``kind`` says otherwise) at ``step``; its id."""
    fields: dict[str, Any] = {"kind": "loss_spike", "severity": "warning", "rank": 0} | kw
    anomaly = Anomaly(
        key="train/loss",
        step=step,
        score=9.0,
        detector="spike",
        message="loss jumped",
        evidence={},
        **fields,
    )
    with collector.store.write() as conn:
        insert_anomalies(conn, [Found(run, T0 + step if wall is None else wall, anomaly)], 0.0)
    found = collector.http.get(f"/api/v1/runs/{run}/anomalies", params={"limit": 1000}).json()
    return found[-1]["id"]


def labels(client: Client, run: int, **query: Any) -> dict[int, tuple[str, str]]:
    """Step -> (label, label_detail) of the run's live checkpoints."""
    return {c["step"]: (c["label"], c["label_detail"]) for c in client.checkpoints(run, **query)}


# -- registration --------------------------------------------------------------------------
def test_registration_answers_the_checkpoint_and_repeats_are_idempotent(
    client: Client, run: int
) -> None:
    command = client.issue_command(run, "checkpoint", reason="before eval")["id"]
    first = save(client, run, 100, reason="before eval", command=command)
    got = first["checkpoint"]
    assert list(got) == FIELDS and first["prune"] == []
    assert got | {"created_at": 0} == {
        "id": 1,
        "run_id": run,
        "step": 100,
        "path": "/ckpt/r/step-000000100.pt",
        "size_bytes": 1_000_100,
        "wall_time": T0 + 100,
        "reason": "before eval",
        "command": command,
        "label": "unverified",
        "label_detail": "the run has not reached step 200 since this checkpoint was saved",
        "created_at": 0,
        "deleted_at": None,
    }
    # The sender retries: same path, step and save time -> the same record, nothing new.
    again = save(client, run, 100, reason="before eval", command=command)
    assert again == first
    assert [c["id"] for c in client.checkpoints(run)] == [1]
    # The same file saved again (the run repeats step 100 after a rollback): a new checkpoint,
    # and the old record is dropped without asking the agent to delete the (new) file.
    resaved = save(client, run, 100, wall=T0 + 900)
    assert resaved["checkpoint"]["id"] == 2 and resaved["prune"] == []
    assert [c["id"] for c in client.checkpoints(run)] == [2]
    listed = client.checkpoints(run, include_deleted=True)
    assert [(c["id"], c["deleted_at"] is not None) for c in listed] == [(2, False), (1, True)]
    # A 4096-character path fits the unique key on both databases.
    long = save(client, run, 300, path="/" + "p" * 4095)["checkpoint"]
    assert len(long["path"]) == 4096


# (body change, what the 422 says); one server for all of them
BAD_BODIES: list[tuple[dict[str, Any], str]] = [
    # step missing, negative, so large that step + the verify window overflows int64
    ({"step": None}, "body.step: Field required"),
    ({"step": -1}, "body.step: Input should be greater than or equal to 0"),
    ({"step": MAX_STEP + 1}, "body.step: Input should be less than or equal to"),
    # path empty, too long, with a NUL character, with a lone surrogate
    ({"path": ""}, "body.path: String should have at least 1 character"),
    ({"path": "/" + "p" * 4096}, "body.path: String should have at most 4096 characters"),
    ({"path": "/ck\x00pt"}, "body.path: Value error, must not contain NUL characters"),
    ({"path": "/ck\ud800pt"}, "body.path: Input should be a valid string"),
    # size negative; wall time not finite, negative, a string
    ({"size_bytes": -1}, "body.size_bytes: Input should be greater than or equal to 0"),
    ({"wall_time": "NaN"}, "body.wall_time: Input should be a finite number"),
    ({"wall_time": -5}, "body.wall_time: Input should be greater than or equal to 0"),
    ({"wall_time": "noon"}, "body.wall_time: Input should be a valid number"),
    # reason too long; command 0; keep 0; an unknown field
    ({"reason": "x" * 501}, "body.reason: String should have at most 500 characters"),
    ({"command": 0}, "body.command: Input should be greater than or equal to 1"),
    ({"keep": 0}, "body.keep: Input should be greater than or equal to 1"),
    ({"label": "good"}, "body.label: Extra inputs are not permitted"),
    # a command that does not exist, or is another run's
    ({"command": 4242}, "command 4242 is not a command of run"),
]


def test_bad_registrations_are_422_and_store_nothing(collector: Collector, run: int) -> None:
    good = {"step": 5, "path": "/ck/a.pt", "size_bytes": 10, "wall_time": T0, "keep": 1}
    for change, message in BAD_BODIES:
        body = {k: v for k, v in (good | change).items() if v is not None}
        # A lone surrogate cannot be encoded by httpx's json=; send the escaped text.
        content = json.dumps(body).encode()
        reply = collector.http.post(
            f"/api/v1/runs/{run}/checkpoints",
            content=content,
            headers={"Content-Type": "application/json"},
        )
        assert reply.status_code == 422, (change, reply.text)
        got = reply.json()
        assert got["error"] == "invalid" and message in got["detail"], (change, got)
    for body in ([], "x"):
        reply = collector.http.post(f"/api/v1/runs/{run}/checkpoints", json=body)
        assert reply.status_code == 422, reply.text
    reply = collector.http.post("/api/v1/runs/999/checkpoints", json=good)
    assert (reply.status_code, reply.json()["detail"]) == (404, "unknown run 999")
    listed = collector.http.get(f"/api/v1/runs/{run}/checkpoints?include_deleted=true")
    assert listed.json() == {"checkpoints": []}
    for query, message in [
        ({"label": "bad"}, "query.label: Input should be 'good', 'suspect' or 'unverified'"),
        ({"limit": 0}, "query.limit: Input should be greater than or equal to 1"),
        ({"limit": 1001}, "query.limit: Input should be less than or equal to 1000"),
    ]:
        reply = collector.http.get(f"/api/v1/runs/{run}/checkpoints", params=query)
        assert reply.status_code == 422 and message in reply.json()["detail"], reply.text


def test_a_command_of_another_run_is_refused(client: Client, run: int) -> None:
    other = client.create_run("llm", "other")["id"]
    command = client.issue_command(other, "checkpoint")["id"]
    with pytest.raises(ClientError) as err:
        save(client, run, 10, command=command)
    assert (err.value.status, err.value.detail) == (
        422,
        f"command {command} is not a command of run {run}",
    )
    assert client.checkpoints(run) == []


# -- labels --------------------------------------------------------------------------------
def test_labels_come_from_anomalies_around_the_step_and_the_runs_progress(
    collector: Collector, client: Client, run: int
) -> None:
    for step in (100, 200, 300):
        save(client, run, step)
    progress(client, run, range(0, 251, 10))
    assert labels(client, run) == {
        300: ("unverified", "the run has not reached step 400 since this checkpoint was saved"),
        200: ("unverified", "the run has not reached step 300 since this checkpoint was saved"),
        100: ("good", "no training-signal anomaly in steps 50-200"),
    }
    # A spike at 240 lies within [200 - 50, 200 + 100], not within [100 - 50, 100 + 100]
    # nor [300 - 50, 300 + 100]. Any rank's counts; a hang is not about the training signal.
    anomaly = spike(collector, run, 240, rank=1)
    spike(collector, run, 299, kind="hang", severity="critical")
    spike(collector, run, 260, kind="straggler")
    got = labels(client, run)
    assert got[200] == ("suspect", f"loss_spike at step 240 (anomaly {anomaly})")
    assert got[100][0] == "good" and got[300][0] == "unverified"
    # The run goes on: 300 is verified once a point at step >= 400 arrives.
    progress(client, run, range(260, 401, 10))
    assert labels(client, run)[300] == ("good", "no training-signal anomaly in steps 250-400")
    assert [c["step"] for c in client.checkpoints(run, label="good")] == [300, 100]
    assert [c["step"] for c in client.checkpoints(run, label="suspect")] == [200]
    assert client.checkpoints(run, label="unverified") == []
    # An anomaly found late (at the edge of the window) still changes the label.
    late = spike(collector, run, 250, kind="nonfinite_grad_norm", severity="critical")
    assert labels(client, run)[300] == (
        "suspect",
        f"nonfinite_grad_norm at step 250 (anomaly {late})",
    )
    # Once the run ends, nothing is waiting to be verified any more.
    save(client, run, 390)
    assert labels(client, run)[390][0] == "unverified"
    client.finish_run(run, "crashed")
    assert labels(client, run)[390] == (
        "good",
        "no training-signal anomaly in steps 340-490 (the run is crashed)",
    )


def test_labels_survive_a_rollback(collector: Collector, client: Client, run: int) -> None:
    """Steps go back after a rollback: the first pass's anomalies and progress stay apart."""
    save(client, run, 300)
    progress(client, run, range(290, 413))
    old = spike(collector, run, 412)
    save(client, run, 400)  # saved at T0 + 400, before the spike: suspect
    assert labels(client, run) == {
        400: ("suspect", f"loss_spike at step 412 (anomaly {old})"),
        300: ("good", "no training-signal anomaly in steps 250-400"),
    }
    # Rolled back to 300 at T0 + 1000; the run repeats steps 300-410 and saves 400 again.
    t1 = T0 + 1000 - 300
    progress(client, run, range(300, 411), t0=t1)
    resaved = save(client, run, 400, wall=t1 + 400)["checkpoint"]
    got = labels(client, run)
    # The spike at 412 was seen before this save, at a later step: another branch.
    assert got[400] == (
        "unverified",
        "the run has not reached step 500 since this checkpoint was saved",
    )
    # 300 was verified on the first pass and stays good although the run is back at 410.
    assert got[300][0] == "good"
    progress(client, run, range(411, 501), t0=t1)
    assert labels(client, run)[400][0] == "good"
    # A spike on the new branch counts.
    new = spike(collector, run, 420, wall=t1 + 420)
    assert labels(client, run)[400] == ("suspect", f"loss_spike at step 420 (anomaly {new})")
    assert client.checkpoints(run)[0]["id"] == resaved["id"]


# -- last good -----------------------------------------------------------------------------
def test_last_good_is_the_newest_registered_good_checkpoint(
    collector: Collector, client: Client, run: int
) -> None:
    reply = collector.http.get(f"/api/v1/runs/{run}/checkpoints/last-good")
    assert (reply.status_code, reply.json()) == (
        404,
        {"error": "not_found", "detail": f"run {run} has no good checkpoint"},
    )
    assert client.last_good_checkpoint(run) is None
    with pytest.raises(ClientError) as err:
        client.last_good_checkpoint(999)
    assert (err.value.status, err.value.detail) == (404, "unknown run 999")
    first = save(client, run, 200)["checkpoint"]
    second = save(client, run, 100, path="/ckpt/r/manual.pt")["checkpoint"]  # a lower step
    save(client, run, 600)  # unverified
    progress(client, run, range(0, 501, 50))
    # The most recently registered good one, not the one with the highest step.
    assert client.last_good_checkpoint(run) == client.checkpoints(run)[1]
    assert client.last_good_checkpoint(run)["id"] == second["id"]
    spike(collector, run, 120)
    assert client.last_good_checkpoint(run)["id"] == first["id"]


# -- retention -----------------------------------------------------------------------------
def test_retention_keeps_k_good_the_newest_the_unverified_and_rollback_targets(
    collector: Collector, client: Client, run: int
) -> None:
    ids: dict[int, int] = {}
    pruned: dict[int, list[int]] = {}

    def step_to(step: int, **body: Any) -> dict[str, Any]:
        progress(client, run, range(step - 99, step + 1))
        reply = save(client, run, step, keep=2, **body)
        ids[step] = reply["checkpoint"]["id"]
        pruned[step] = [c["step"] for c in reply["prune"]]
        assert all(c["deleted_at"] is not None for c in reply["prune"])
        return reply

    for step in (100, 200, 300):
        step_to(step)
    assert pruned == {100: [], 200: [], 300: []}  # 100 and 200 good, 300 the newest
    spike(collector, run, 330)  # makes 300 suspect
    step_to(400)
    # good: 200, 100 (both kept, K = 2); suspect 300 is newer than the newest good one
    assert pruned[400] == []
    first = step_to(500)
    # good: 400, 200, 100 -> 100 goes; suspect 300 is older than the newest good (400)
    assert pruned[500] == [300, 100]
    # A rollback to 200 waits for delivery: 200 is pinned.
    rollback = client.issue_command(run, "rollback", checkpoint=ids[200])["id"]
    step_to(600)
    assert pruned[600] == []  # good: 500, 400, 200 (pinned)
    assert labels(client, run).keys() == {600, 500, 400, 200}
    # Unverified ones stay: two saves without progress in between.
    reply = save(client, run, 605, keep=1)
    assert [c["step"] for c in reply["prune"]] == [400]  # 500 kept (K = 1), 200 pinned
    assert save(client, run, 610, keep=1)["prune"] == []  # 605 and 600 are unverified
    assert labels(client, run).keys() == {610, 605, 600, 500, 200}
    # The sender retries an old registration: the same prune list comes back.
    retried = save(client, run, 500, keep=2)
    assert retried["checkpoint"]["id"] == first["checkpoint"]["id"]
    assert retried["prune"] == first["prune"]  # (the label of 500 itself is good by now)
    # Once the rollback is no longer pending or delivered, its target may go.
    client.cancel_command(rollback)
    reply = step_to(700)
    assert pruned[700] == [200]
    assert labels(client, run).keys() == {700, 610, 605, 600, 500}
    # keep=null keeps everything.
    progress(client, run, range(701, 1001))
    assert save(client, run, 1000)["prune"] == []


def test_a_rollback_past_its_expiry_pins_nothing(
    collector: Collector, client: Client, run: int
) -> None:
    """Expiry is marked lazily, when the run's commands are next read; retention must not
    wait for that. The rollback is stored directly, so no read has marked it."""
    ids = {}
    for step in (100, 200, 300):
        progress(client, run, range(step - 99, step + 1))
        ids[step] = save(client, run, step)["checkpoint"]["id"]
    with collector.store.write() as conn:
        for expires_at in (time.time() - 1, time.time() + 600):
            insert_command(
                conn,
                run_id=run,
                type="rollback",
                args={"checkpoint": ids[100] if expires_at < time.time() else ids[200]},
                at_step=400,
                source="api:test",
                now=time.time() - 10,
                expires_at=expires_at,
            )
    progress(client, run, range(301, 501))
    reply = save(client, run, 500, keep=1)
    # good: 300 (kept, K = 1), 200 (pinned by the live rollback), 100 (its rollback expired)
    assert [c["id"] for c in reply["prune"]] == [ids[100]]


def test_prune_never_names_the_path_of_a_live_checkpoint(client: Client, run: int) -> None:
    save(client, run, 100, path="/ck/latest.pt")
    save(client, run, 200, path="/ck/b.pt")
    progress(client, run, range(0, 351, 50))
    first = save(client, run, 300, path="/ck/c.pt", keep=1)
    assert [c["path"] for c in first["prune"]] == ["/ck/latest.pt"]
    # A trainer that always saves to latest.pt overwrites the pruned file with a new one;
    # then the first registration's retry arrives: deleting latest.pt would lose the new one.
    save(client, run, 400, path="/ck/latest.pt", wall=T0 + 450)
    assert save(client, run, 300, path="/ck/c.pt", keep=1)["prune"] == []


# -- rollback resolution -------------------------------------------------------------------
def test_rollback_targets_are_resolved_when_issued(
    collector: Collector, client: Client, run: int
) -> None:
    with pytest.raises(ClientError) as err:
        client.issue_command(run, "rollback", skip_batches=200)
    assert (err.value.status, err.value.detail) == (
        409,
        f"run {run} has no good checkpoint to roll back to",
    )
    assert client.commands(run) == []
    good = save(client, run, 100)["checkpoint"]
    progress(client, run, range(0, 201, 10))
    unverified = save(client, run, 200)["checkpoint"]
    issued = client.issue_command(run, "rollback", skip_batches=200, lr_factor=0.5, lr_steps=50)
    resolved = {
        "checkpoint": good["id"],
        "path": "/ckpt/r/step-000000100.pt",
        "step": 100,
        "skip_batches": 200,
        "lr_factor": 0.5,
        "lr_steps": 50,
    }
    assert issued["args"] == resolved
    # The agent receives the resolved arguments.
    assert client.pending_commands(run)[0]["args"] == resolved
    # By id, whatever its label; defaults for the rest.
    by_id = client.issue_command(run, "rollback", checkpoint=unverified["id"])
    assert by_id["args"] == {
        "checkpoint": unverified["id"],
        "path": "/ckpt/r/step-000000200.pt",
        "step": 200,
        "skip_batches": 0,
        "lr_factor": 1.0,
        "lr_steps": 200,
    }
    # Another run's checkpoint, an unknown one, a deleted one.
    other = client.create_run("llm", "other")["id"]
    foreign = save(client, other, 100)["checkpoint"]["id"]
    resaved = save(client, run, 100, wall=T0 + 300)["checkpoint"]  # overwrites `good`'s file
    for target, message in [
        (foreign, f"checkpoint {foreign} is not a checkpoint of run {run}"),
        (4242, f"checkpoint 4242 is not a checkpoint of run {run}"),
        (good["id"], f"checkpoint {good['id']} of run {run} was deleted"),
    ]:
        with pytest.raises(ClientError) as err:
            client.issue_command(run, "rollback", checkpoint=target)
        assert err.value.status == 409 and message in err.value.detail
    assert len(client.commands(run)) == 2
    # The policy engine calls the channel directly, with what its rule says.
    progress(client, run, range(210, 401, 10))
    control: ControlChannel = collector.thread.app.state.control
    record = control.issue(
        run, "rollback", {"checkpoint": "last_good", "skip_batches": 7}, source="policy:test"
    )
    assert record.args["checkpoint"] == resaved["id"] and record.args["lr_steps"] == 200
    client.finish_run(run)
    with pytest.raises(Conflict):
        control.issue(run, "rollback", {"checkpoint": "last_good"}, source="policy:test")


# -- scopes --------------------------------------------------------------------------------
def test_scopes_and_projects(collector: Collector, client: Client, run: int) -> None:
    save(client, run, 100)
    progress(client, run, range(0, 201, 50))
    elsewhere = client.create_run("other", "x")["id"]
    with collector.store.write() as conn:
        ingest, _ = create_key(conn, "llm", ["ingest"])
        read, _ = create_key(conn, "llm", ["read"])
        stranger, _ = create_key(conn, "other", ["ingest", "read"])
    body = {"step": 150, "path": "/ck/x.pt", "size_bytes": 1, "wall_time": T0 + 150}
    base = f"/api/v1/runs/{run}/checkpoints"
    with Client(collector.url, api_key=ingest) as agent:
        assert agent.register_checkpoint(run, **body)["checkpoint"]["step"] == 150
        with pytest.raises(ClientError) as err:
            agent.checkpoints(run)
        assert err.value.status == 403 and "the request needs 'read'" in err.value.detail
        with pytest.raises(ClientError) as err:
            agent.last_good_checkpoint(run)
        assert err.value.status == 403
    with Client(collector.url, api_key=read) as reader:
        assert [c["step"] for c in reader.checkpoints(run)] == [150, 100]
        assert reader.last_good_checkpoint(run)["step"] == 100
        with pytest.raises(ClientError) as err:
            reader.register_checkpoint(run, **body)
        assert err.value.status == 403 and "the request needs 'ingest'" in err.value.detail
    headers = {"Authorization": f"Bearer {stranger}"}
    for method, path in [("POST", base), ("GET", base), ("GET", f"{base}/last-good")]:
        reply = collector.http.request(method, path, json=body, headers=headers)
        assert (reply.status_code, reply.json()["detail"]) == (404, f"unknown run {run}")
    reply = collector.http.get(f"/api/v1/runs/{elsewhere}/checkpoints", headers=headers)
    assert reply.json() == {"checkpoints": []}
    with Client(collector.url, api_key=read) as reader:
        assert len(reader.checkpoints(run)) == 2


# -- the CLI -------------------------------------------------------------------------------
def test_cli_lists_checkpoints(collector: Collector, client: Client, run: int) -> None:
    save(client, run, 100, reason="routine")
    save(client, run, 200, size_bytes=1_500_000_000)
    progress(client, run, range(0, 251, 50))
    spike(collector, run, 180)
    env = {"RUNWATCH_SERVER": collector.url, "RUNWATCH_API_KEY": ""}
    result = CliRunner().invoke(cli, ["checkpoints", "list", "llm/r"], env=env)
    assert result.exit_code == 0, result.output
    for text in (
        "2 step 200: suspect, loss_spike at step 180 (anomaly 1)",
        "1.5 GB",
        "(routine), 1 MB",
        "    /ckpt/r/step-000000100.pt",
        "2 checkpoint(s) of run",
    ):
        assert text in result.output, (text, result.output)
    result = CliRunner().invoke(
        cli, ["checkpoints", "list", str(run), "--label", "suspect", "--json"], env=env
    )
    assert result.exit_code == 0, result.output
    assert [c["step"] for c in json.loads(result.output)] == [200, 100]
    result = CliRunner().invoke(cli, ["checkpoints", "list", str(run), "--label", "x"], env=env)
    assert result.exit_code == 2 and "'x' is not one of 'good', 'suspect'" in result.output
