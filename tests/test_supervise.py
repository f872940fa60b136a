"""``runwatch supervise``: real trainer processes restarted on crashes and hangs, resumed from
the last good checkpoint a real collector on loopback knows of."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from runwatch.cli import main
from runwatch.supervise import Supervisor
from tests.conftest import Collector, start_collector
from tests.test_cli import free_port

TRAINER = textwrap.dedent(
    '''
    """A stand-in trainer: what it does depends on the scenario and on the attempt."""
    import json
    import os
    import sys
    import time
    from pathlib import Path

    import runwatch
    from runwatch.client import Client

    scenario, out = sys.argv[1], Path(sys.argv[2])
    attempt = int(os.environ.get("RUNWATCH_RESTART_COUNT", "-1"))
    seen = {k: v for k, v in os.environ.items() if k.startswith("RUNWATCH_")}
    (out / f"attempt-{attempt}.json").write_text(json.dumps({"pid": os.getpid(), "env": seen}))

    def steps(run, first, last, pause=0.0):
        for step in range(first, last + 1):
            run.log({"train/loss": 2.0 - step / 1000}, step=step)
            time.sleep(pause)

    def run_id(run):
        deadline = time.monotonic() + 20
        while run.id is None and time.monotonic() < deadline:
            time.sleep(0.02)
        return run.id

    if scenario == "fail":
        sys.exit(2)
    run = runwatch.init(flush_interval=0.05, heartbeat_interval=0.1, system_interval=0)
    if scenario == "crashloop":
        steps(run, 0, 3)
        run.flush()
        sys.exit(3)
    if attempt > 0:
        steps(run, 0, 3)
        run.finish()
        sys.exit(0)
    if scenario == "crash":
        path = out / "step-000000010.pt"
        path.write_bytes(b"weights")
        steps(run, 0, 130)
        with Client() as client:  # RUNWATCH_SERVER, set by the supervisor
            client.register_checkpoint(run_id(run), step=10, path=str(path), size_bytes=7,
                                       wall_time=time.time(), reason="routine")
        run.flush()
        sys.exit(1)
    if scenario == "kill":
        steps(run, 0, 10**6, pause=0.05)  # until the test kills it
    if scenario == "hang":
        steps(run, 0, 40, pause=0.02)
        run.flush()
        (out / "hung").write_text("")
        time.sleep(600)  # the agent's heartbeats go on
    '''
)

QUICK = 30  # seconds a supervised scenario may take


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[Collector]:
    """A collector on SQLite that finds hangs after ~3 s (and checks for them every 0.2 s)."""
    yield from start_collector(
        f"sqlite:///{tmp_path / 'rw.db'}",
        detector_time_scale=0.01,
        detector_check_seconds=0.2,
    )


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNWATCH_")}
    env |= {"PYTHONUNBUFFERED": "1", "RUNWATCH_SPOOL_DIR": str(tmp_path / "spool")}
    return env


def _supervise(tmp_path: Path, server: str, scenario: str, *flags: str) -> subprocess.Popen[str]:
    trainer = tmp_path / "trainer.py"
    trainer.write_text(TRAINER)
    command = [sys.executable, "-m", "runwatch", "supervise", "--server", server]
    command += ["--project", "sup", "--name", "r1", "--poll", "0.2", "--backoff", "0", *flags]
    command += ["--", sys.executable, str(trainer), scenario, str(tmp_path)]
    return subprocess.Popen(
        command, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(proc: subprocess.Popen[str], timeout: float = QUICK) -> tuple[int, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the supervisor did not finish in {timeout} s:\n{out}\n{err}")
    return proc.returncode, out + err


def _attempt(tmp_path: Path, n: int, timeout: float = QUICK) -> dict[str, object]:
    path = tmp_path / f"attempt-{n}.json"
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"attempt {n} did not start"
        time.sleep(0.05)
    time.sleep(0.05)  # written in one go, but give it a moment
    return json.loads(path.read_text())


def test_a_crashed_trainer_restarts_from_the_last_good_checkpoint(
    tmp_path: Path, collector: Collector
) -> None:
    code, output = _finish(_supervise(tmp_path, collector.url, "crash"))
    assert code == 0, output
    first, second = _attempt(tmp_path, 0)["env"], _attempt(tmp_path, 1)["env"]
    assert not (tmp_path / "attempt-2.json").exists()
    assert first["RUNWATCH_RUN_NAME"] == second["RUNWATCH_RUN_NAME"] == "r1"
    assert first["RUNWATCH_PROJECT"] == second["RUNWATCH_PROJECT"] == "sup"
    assert first["RUNWATCH_SERVER"] == collector.url
    assert "RUNWATCH_RESUME_FROM" not in first
    assert second["RUNWATCH_RESUME_FROM"] == str(tmp_path / "step-000000010.pt")
    assert (first["RUNWATCH_RESTART_COUNT"], second["RUNWATCH_RESTART_COUNT"]) == ("0", "1")
    assert "trainer exited with status 1" in output
    assert f"starting attempt 2/4 from checkpoint {tmp_path}/step-000000010.pt (step 10)" in output
    assert "trainer finished (status 0)" in output
    with collector.client() as client:
        runs = client.runs(project="sup")
    assert [r["name"] for r in runs] == ["r1"]  # both attempts are one run


def test_a_killed_trainer_is_restarted(tmp_path: Path, collector: Collector) -> None:
    proc = _supervise(tmp_path, collector.url, "kill")
    pid = _attempt(tmp_path, 0)["pid"]
    time.sleep(0.5)  # a few steps in
    os.kill(int(pid), signal.SIGKILL)  # type: ignore[call-overload]
    code, output = _finish(proc)
    assert code == 0, output
    assert "trainer exited with signal SIGKILL" in output
    assert "the run has no good checkpoint: the trainer starts from scratch" in output
    assert "starting attempt 2/4 from scratch" in output
    assert "RUNWATCH_RESUME_FROM" not in _attempt(tmp_path, 1)["env"]


def test_a_run_the_collector_finds_hung_is_killed_and_restarted(
    tmp_path: Path, collector: Collector
) -> None:
    code, output = _finish(_supervise(tmp_path, collector.url, "hang", "--grace", "5"))
    assert code == 0, output
    assert (tmp_path / "hung").exists()
    assert "found by the collector): stopping it" in output
    assert "trainer stopped with signal SIGTERM" in output  # killed, not exited
    assert "trainer finished (status 0)" in output
    with collector.client() as client:
        run_id = client.find_run("sup", "r1")["id"]
        assert [a["kind"] for a in client.anomalies(run_id, kind="hang")] == ["hang"]


def test_hang_timeout_finds_a_hang_without_the_collectors_detectors(tmp_path: Path) -> None:
    for collector in start_collector(f"sqlite:///{tmp_path / 'rw.db'}", detection=False):
        proc = _supervise(tmp_path, collector.url, "hang", "--hang-timeout", "1.5")
        code, output = _finish(proc)
    assert code == 0, output
    assert re.search(r"run hung \(no step for \d+ s\): stopping it", output), output
    assert "trainer stopped with signal SIGTERM" in output
    assert _attempt(tmp_path, 1)["env"]["RUNWATCH_RESTART_COUNT"] == "1"


def test_gives_up_after_max_restarts_and_warns_once_of_an_unreachable_collector(
    tmp_path: Path,
) -> None:
    server = f"http://127.0.0.1:{free_port()}"
    code, output = _finish(_supervise(tmp_path, server, "fail", "--max-restarts", "2"))
    assert code == 2, output
    assert output.count("trainer exited with status 2") == 3
    assert "starting attempt 3/3 from scratch" in output
    assert "giving up on run sup/r1 after 2 restart(s) in a row" in output
    assert output.count("cannot use the collector") == 1
    assert _attempt(tmp_path, 2)["env"]["RUNWATCH_RESTART_COUNT"] == "2"


def test_giving_up_raises_a_critical_alert_on_the_run(tmp_path: Path, collector: Collector) -> None:
    proc = _supervise(tmp_path, collector.url, "crashloop", "--max-restarts", "1")
    code, output = _finish(proc)
    assert code == 3, output
    with collector.client() as client:
        run_id = client.find_run("sup", "r1")["id"]
        (alert,) = client.alerts(run=run_id)
    assert (alert["kind"], alert["severity"], alert["state"]) == (
        "supervisor_gave_up",
        "critical",
        "firing",
    )
    assert alert["summary"] == (
        "gave up after 1 restart(s) in a row: the last attempt ended with status 3"
    )
    assert f"raised alert {alert['id']} on the collector" in output


def test_sigterm_is_forwarded_and_nothing_is_restarted(tmp_path: Path) -> None:
    proc = _supervise(tmp_path, f"http://127.0.0.1:{free_port()}", "kill")
    _attempt(tmp_path, 0)
    proc.send_signal(signal.SIGTERM)
    code, output = _finish(proc)
    assert code == 128 + signal.SIGTERM, output
    assert "trainer stopped with signal SIGTERM" in output
    assert not (tmp_path / "attempt-1.json").exists()


@pytest.fixture
def said() -> Iterator[list[str]]:
    """What the supervisor logs (the CLI stops its records from reaching the root logger)."""
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("runwatch.supervise")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_a_healthy_attempt_resets_the_restart_count(tmp_path: Path, said: list[str]) -> None:
    """Each attempt fails, but only after running longer than reset_after: never gives up."""
    counter = tmp_path / "attempts"
    script = f"echo x >> {counter}; sleep 0.3; [ $(wc -l < {counter}) -ge 4 ]"
    supervisor = Supervisor(
        ["sh", "-c", script], project=None, max_restarts=1, backoff=0, reset_after=0.2
    )
    assert supervisor.run() == 0
    assert counter.read_text().count("x") == 4
    text = "\n".join(said)
    assert text.count("restart count reset") == 2  # after attempts 2 and 3
    assert "starting attempt 2/2" in text and "giving up" not in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give the training command after --"),
        (["--"], "give the training command after --"),
        (["--max-restarts", "-1", "--", "true"], "-1 is not in the range x>=0"),
        (["--poll", "0", "--", "true"], "0.0 is not in the range x>0"),
        (["--hang-timeout", "soon", "--", "true"], "'soon' is not a valid float"),
        (["--bogus", "--", "true"], "No such option '--bogus'"),
    ],
)
def test_bad_usage_is_refused_with_a_message(args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["supervise", *args])
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.output


def test_a_command_that_cannot_start_is_an_error_not_a_restart_loop(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["supervise", "--", str(tmp_path / "missing")])
    assert result.exit_code == 1
    assert f"cannot start '{tmp_path / 'missing'}'" in result.stderr
    assert "Traceback" not in result.output


DDP_TRAINER = textwrap.dedent(
    '''
    """Two gloo ranks under torchrun: attempt 0 hangs, attempt 1 crashes on rank 1, 2 succeeds."""
    import json
    import os
    import sys
    import time
    from pathlib import Path

    import torch
    import torch.distributed as dist

    import runwatch

    out = Path(sys.argv[1])
    attempt, rank = int(os.environ["RUNWATCH_RESTART_COUNT"]), int(os.environ["RANK"])
    (out / f"ddp-{attempt}-{rank}.json").write_text(json.dumps({"pid": os.getpid()}))
    dist.init_process_group("gloo")
    run = runwatch.init(flush_interval=0.05, heartbeat_interval=0.1, system_interval=0)
    for step in range(20):
        if attempt == 1 and rank == 1 and step == 10:
            os._exit(1)  # a crash: no clean-up, rank 0 is left in a collective
        x = torch.ones(1)
        dist.all_reduce(x)
        run.log({"train/loss": 1.0 / (step + 1)}, step=step)
        time.sleep(0.02)
    if attempt == 0:
        time.sleep(600)  # a hang: every rank stuck
    dist.barrier()
    run.finish()
    dist.destroy_process_group()
    '''
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_torchrun_workers_are_stopped_together_and_restarted(tmp_path: Path) -> None:
    pytest.importorskip("torch.distributed.run")
    trainer = tmp_path / "ddp.py"
    trainer.write_text(DDP_TRAINER)
    for collector in start_collector(f"sqlite:///{tmp_path / 'rw.db'}", detection=False):
        command = [sys.executable, "-m", "runwatch", "supervise", "--server", collector.url]
        command += ["--project", "sup", "--poll", "0.3", "--backoff", "0", "--grace", "5"]
        command += ["--hang-timeout", "3", "--", sys.executable, "-m", "torch.distributed.run"]
        command += ["--standalone", "--nproc-per-node", "2", str(trainer), str(tmp_path)]
        proc = subprocess.Popen(
            command, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        code, output = _finish(proc, timeout=90)
    assert code == 0, output
    assert "run hung (no step for" in output
    assert "trainer exited with status 1" in output
    assert "starting attempt 3/4" in output and "trainer finished (status 0)" in output
    for attempt in (0, 1, 2):
        for rank in (0, 1):
            pid = json.loads((tmp_path / f"ddp-{attempt}-{rank}.json").read_text())["pid"]
            assert not _alive(pid), f"rank {rank} of attempt {attempt} outlived it"
