"""The ``runwatch`` command: key management, the server verb and the query verbs."""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from runwatch.cli import main
from runwatch.client import Client
from tests.conftest import Collector

SECRET = re.compile(r"^rw_[A-Za-z0-9_-]{40,}$")


def invoke(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), env=env)
    return result.exit_code, result.stdout, result.stderr


def test_keys_create_prints_the_secret_once_and_list_never_shows_it(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'k.db'}"
    code, out, err = invoke(
        "keys", "create", "--project", "llm", "--scope", "ingest,read", "--db", db
    )
    assert code == 0, err
    secret = out.strip()
    assert SECRET.match(secret)
    assert "not shown again" in err
    code, out, _ = invoke("keys", "list", "--db", db)
    assert code == 0 and "llm" in out and "ingest,read" in out
    assert secret not in out and secret[:11] in out
    code, out, _ = invoke("keys", "revoke", "1", "--db", db)
    assert code == 0 and "revoked" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # unknown scope
        (["keys", "create", "--project", "p", "--scope", "root"], "unknown scope(s) root"),
        # project names are identifiers
        (["keys", "create", "--project", "a b", "--scope", "read"], "invalid project name"),
        # scope is required
        (["keys", "create", "--project", "p"], "Missing option '--scope'"),
        # revoke needs an existing id
        (["keys", "revoke", "42"], "unknown key 42"),
        (["keys", "revoke", "x"], "'x' is not a valid integer"),
    ],
)
def test_key_verbs_reject_bad_input_with_a_message(
    tmp_path: Path, args: list[str], message: str
) -> None:
    code, out, err = invoke(*args, "--db", f"sqlite:///{tmp_path / 'k.db'}")
    assert code != 0
    assert message in err
    assert "Traceback" not in out + err


def test_bad_settings_are_refused_before_starting(tmp_path: Path) -> None:
    code, _, err = invoke("server", "--db", "mysql://nope")
    assert code != 0 and "unsupported database 'mysql'" in err
    code, _, err = invoke("server", "--port", "70000")
    assert code != 0 and "port" in err
    code, _, err = invoke("db", "upgrade", env={"RUNWATCH_DB": "not a url"})
    assert code != 0 and "not a database URL" in err


def test_server_refuses_a_public_address_without_keys(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 's.db'}"
    code, _, err = invoke("server", "--host", "0.0.0.0", "--port", "0", "--db", db)
    assert code != 0
    assert "refusing to bind 0.0.0.0" in err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_verb_serves_and_says_it_is_open(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "runwatch",
            "server",
            "--port",
            str(port),
            "--db",
            f"sqlite:///{tmp_path / 'srv.db'}",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)
        with Client(f"http://127.0.0.1:{port}", api_key="") as client:
            assert client.create_run("p", "r")["id"] == 1
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert "no API keys configured" in err and "unless it is a loopback address" in err


def test_query_verbs_show_runs_and_metrics(collector: Collector, client: Client) -> None:
    run = client.create_run("llm", "nightly", tags=["v1"], config={"lr": 0.1})["id"]
    client.ingest(
        run, [(s, 1e9 + s, "loss", math.nan if s == 3 else 10.0 - s) for s in range(50)], seq=0
    )
    env = {"RUNWATCH_SERVER": collector.url, "RUNWATCH_API_KEY": ""}

    code, out, err = invoke("runs", "list", env=env)
    assert code == 0, err
    assert "nightly" in out and "running" in out

    code, out, err = invoke("runs", "show", "llm/nightly", env=env)
    assert code == 0, err
    assert "llm/nightly" in out and "loss" in out and "50" in out

    code, out, err = invoke(
        "metrics", "get", str(run), "loss", "--max-points", "5", "--json", env=env
    )
    assert code == 0, err
    got = json.loads(out)
    assert got["downsampled"] and len(got["buckets"]) == 5
    assert sum(b["nan_count"] for b in got["buckets"]) == 1

    code, out, err = invoke(
        "metrics", "get", str(run), "loss", "--start", "2", "--end", "4", "--json", env=env
    )
    assert code == 0, err
    assert [p[2] for p in json.loads(out)["points"]] == [8.0, "NaN", 6.0]

    code, _, err = invoke("runs", "show", "llm/missing", env=env)
    assert code != 0 and "unknown run llm/missing" in err
    code, _, err = invoke("runs", "show", "not-a-run", env=env)
    assert code != 0 and "PROJECT/NAME" in err
    code, _, err = invoke("metrics", "get", str(run), "nope", env=env)
    assert code != 0 and "404" in err


def test_query_verbs_explain_an_unreachable_server() -> None:
    code, _, err = invoke("runs", "list", "--server", f"http://127.0.0.1:{free_port()}")
    assert code != 0 and "cannot reach" in err
