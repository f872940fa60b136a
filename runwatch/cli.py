"""The ``runwatch`` command.

Server-side verbs (``server``, ``db``, ``keys``) talk to the database directly
and need ``runwatch[server]``; the query verbs (``runs``, ``metrics``,
``anomalies``, ``commands``, ``checkpoints``, ``alerts``, ``silences``) and ``command`` go
through the HTTP API with ``--server``/``RUNWATCH_SERVER`` and
``--api-key``/``RUNWATCH_API_KEY``.
"""

from __future__ import annotations

import datetime as dt
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import click
import orjson
from rich.console import Console
from rich.table import Table

from runwatch.alerting.silence import FIELDS as SILENCE_FIELDS
from runwatch.client import Client, ClientError
from runwatch.wire import COMMAND_TYPES

if TYPE_CHECKING:
    from runwatch.settings import Settings

out = Console(highlight=False)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="runwatch")
def main() -> None:
    """runwatch: watch long training runs, catch trouble early, act on it."""


# -- server side ----------------------------------------------------------------
def _settings(**flags: Any) -> Settings:
    """Settings from flags over the environment (callers run under :func:`_domain_errors`)."""
    from pydantic import ValidationError

    from runwatch.settings import Settings

    try:
        return Settings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors()
        )
        raise click.ClickException(f"bad settings: {problems}") from None


@contextmanager
def _store(db: str | None) -> Iterator[Any]:
    from runwatch.collector.storage import migrate
    from runwatch.collector.storage.store import Store
    from runwatch.db import make_engine

    settings = _settings(db=db)
    store = Store(make_engine(settings.db))
    try:
        migrate.upgrade(store.engine)
        yield store
    finally:
        store.dispose()


def _domain_errors(fn: Callable[..., None]) -> Callable[..., None]:
    """Show domain errors and unreachable databases as one line, not a traceback."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            from sqlalchemy.exc import OperationalError

            from runwatch.collector.errors import RunwatchError
        except ImportError:
            raise click.ClickException(
                "this command needs the server extras: pip install 'runwatch[server]'"
            ) from None
        try:
            fn(*args, **kwargs)
        except RunwatchError as exc:
            raise click.ClickException(exc.message) from None
        except OperationalError as exc:
            raise click.ClickException(f"cannot use the database: {exc.orig}") from None

    return wrapper


db_option = click.option(
    "--db", help="Database URL [env RUNWATCH_DB; default sqlite:///./runwatch.db]"
)


@main.command()
@db_option
@click.option("--host", help="Address to bind [env RUNWATCH_HOST; default 127.0.0.1].")
@click.option("--port", type=int, help="Port [env RUNWATCH_PORT; default 8000].")
@click.option("--log-level", help="critical|error|warning|info|debug [env RUNWATCH_LOG_LEVEL].")
@_domain_errors
def server(db: str | None, host: str | None, port: int | None, log_level: str | None) -> None:
    """Run the collector and query API (migrates the database first)."""
    from runwatch.collector.server import RefusedToStart, safe_url, serve

    settings = _settings(db=db, host=host, port=port, log_level=log_level)
    click.echo(f"runwatch {_version()}: database {safe_url(settings.db)}", err=True)
    try:
        serve(settings)
    except RefusedToStart as exc:
        raise click.ClickException(str(exc)) from None


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@db_option
@_domain_errors
def db_upgrade(db: str | None) -> None:
    """Apply every pending migration."""
    from runwatch.collector.server import safe_url

    with _store(db) as store:
        click.echo(f"{safe_url(str(store.engine.url))} is at the newest schema")


@main.group()
def keys() -> None:
    """API keys (stored hashed; the secret is shown once)."""


@keys.command("create")
@click.option("--project", required=True, help="Project the key is bound to.")
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    required=True,
    help="ingest, read, operate or admin; repeat or separate with commas.",
)
@click.option("--name", default="", help="A label to recognise the key by.")
@db_option
@_domain_errors
def keys_create(project: str, scopes: tuple[str, ...], name: str, db: str | None) -> None:
    """Create a key and print its secret once."""
    from runwatch.collector.storage.keys import create_key

    wanted = [s.strip() for chunk in scopes for s in chunk.split(",") if s.strip()]
    with _store(db) as store, store.write() as conn:
        secret, info = create_key(conn, project, wanted, name)
    click.echo(
        f"key {info.id} for project {info.project} with scope(s) "
        f"{', '.join(sorted(info.scopes))}; store it now, it is not shown again:",
        err=True,
    )
    click.echo(secret)


@keys.command("list")
@click.option("--project", help="Only keys of this project.")
@db_option
@_domain_errors
def keys_list(project: str | None, db: str | None) -> None:
    """List keys (never their secrets)."""
    from runwatch.collector.storage.keys import list_keys

    with _store(db) as store, store.read() as conn:
        found = list_keys(conn, project)
    table = Table("id", "project", "name", "prefix", "scopes", "created", "revoked")
    for k in found:
        table.add_row(
            str(k.id),
            k.project,
            k.name,
            k.prefix + "…",
            ",".join(sorted(k.scopes)),
            _when(k.created_at),
            _when(k.revoked_at),
        )
    out.print(table)


@keys.command("revoke")
@click.argument("key_id", type=int)
@db_option
@_domain_errors
def keys_revoke(key_id: int, db: str | None) -> None:
    """Revoke a key by id; requests with it fail from now on."""
    from runwatch.collector.storage.keys import revoke_key

    with _store(db) as store, store.write() as conn:
        info = revoke_key(conn, key_id)
    click.echo(f"key {info.id} ({info.prefix}…) of project {info.project} is revoked")


# -- query side -----------------------------------------------------------------
server_option = click.option(
    "--server", envvar="RUNWATCH_SERVER", help="Collector URL [env RUNWATCH_SERVER]."
)
key_option = click.option(
    "--api-key", envvar="RUNWATCH_API_KEY", help="API key with read scope [env RUNWATCH_API_KEY]."
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


@contextmanager
def _client(server_url: str | None, api_key: str | None) -> Iterator[Client]:
    import httpx

    client = Client(server_url, api_key)
    try:
        yield client
    except ClientError as exc:
        raise click.ClickException(f"the server refused: {exc}") from None
    except httpx.HTTPError as exc:
        raise click.ClickException(f"cannot reach {client.server}: {exc}") from None
    finally:
        client.close()


def _resolve_run(client: Client, run: str) -> dict[str, Any]:
    if run.isdigit():
        return client.run(int(run))
    project, sep, name = run.partition("/")
    if not sep or not project or not name:
        raise click.BadParameter("give a run id or PROJECT/NAME", param_hint="RUN")
    return client.find_run(project, name)


@main.group()
def runs() -> None:
    """Query runs."""


@runs.command("list")
@click.option("--project")
@click.option("--state", type=click.Choice(["running", "finished", "failed", "crashed"]))
@click.option("--tag")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@server_option
@key_option
@json_option
def runs_list(
    project: str | None,
    state: str | None,
    tag: str | None,
    limit: int,
    server: str | None,
    api_key: str | None,
    as_json: bool,
) -> None:
    """List runs, newest first."""
    with _client(server, api_key) as client:
        found = client.runs(project=project, state=state, tag=tag, limit=limit)
    if as_json:
        _print_json(found)
        return
    table = Table("id", "project", "name", "state", "tags", "created", "last heartbeat")
    for r in found:
        table.add_row(
            str(r["id"]),
            r["project"],
            r["name"],
            r["state"],
            ",".join(r["tags"]),
            _when(r["created_at"]),
            _when(r["heartbeat_at"]),
        )
    out.print(table)


@runs.command("show")
@click.argument("run")
@server_option
@key_option
@json_option
def runs_show(run: str, server: str | None, api_key: str | None, as_json: bool) -> None:
    """One run (id or PROJECT/NAME) with the latest value of each series."""
    with _client(server, api_key) as client:
        found = _resolve_run(client, run)
        series = client.series(found["id"])
    if as_json:
        _print_json({**found, "series": series})
        return
    out.print(f"[bold]{found['project']}/{found['name']}[/] (run {found['id']}): {found['state']}")
    out.print(
        f"created {_when(found['created_at'])}, last heartbeat {_when(found['heartbeat_at'])}"
    )
    if found["tags"]:
        out.print("tags: " + ", ".join(found["tags"]))
    if found["config"]:
        out.print("config: " + orjson.dumps(found["config"]).decode())
    table = Table("key", "rank", "points", "last step", "last value")
    for s in series:
        table.add_row(
            s["key"],
            str(s["rank"]),
            str(s["n_points"]),
            str(s["last_step"]),
            format_number(s["last_value"]),
        )
    out.print(table)


@main.group()
def metrics() -> None:
    """Query metric series."""


@metrics.command("get")
@click.argument("run")
@click.argument("key")
@click.option("--rank", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--x", type=click.Choice(["step", "time"]), default="step", show_default=True)
@click.option("--start", type=float, help="First step (or Unix time with --x time).")
@click.option("--end", type=float, help="Last step (or Unix time with --x time).")
@click.option("--max-points", type=click.IntRange(1, 100_000), default=1000, show_default=True)
@server_option
@key_option
@json_option
def metrics_get(
    run: str,
    key: str,
    rank: int,
    x: str,
    start: float | None,
    end: float | None,
    max_points: int,
    server: str | None,
    api_key: str | None,
    as_json: bool,
) -> None:
    """Points of KEY in RUN, downsampled to at most --max-points buckets."""
    with _client(server, api_key) as client:
        run_id = _resolve_run(client, run)["id"]
        found = client.metrics(
            run_id, key, rank=rank, x=x, start=start, end=end, max_points=max_points
        )
    if as_json:
        _print_json(found)
        return
    if found["downsampled"]:
        table = bucket_table(found["buckets"])
    else:
        table = Table("step", "time", "value")
        for step, wall_time, value in found["points"]:
            table.add_row(str(step), _when(wall_time), format_number(value))
    out.print(table)
    out.print(f"{found['total']} point(s) of {key!r} (rank {rank}) in range")


@main.group()
def anomalies() -> None:
    """Query what the detectors found."""


@anomalies.command("list")
@click.argument("run")
@click.option("--kind", help="Only this kind, e.g. loss_spike.")
@click.option("--severity", type=click.Choice(["info", "warning", "critical"]))
@click.option("--rank", type=click.IntRange(min=0), help="Only this rank.")
@click.option("--after", type=click.IntRange(min=0), help="Only anomalies with a larger id.")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@server_option
@key_option
@json_option
def anomalies_list(
    run: str,
    kind: str | None,
    severity: str | None,
    rank: int | None,
    after: int | None,
    limit: int,
    server: str | None,
    api_key: str | None,
    as_json: bool,
) -> None:
    """Anomalies of RUN (id or PROJECT/NAME), oldest first."""
    with _client(server, api_key) as client:
        run_id = _resolve_run(client, run)["id"]
        found = client.anomalies(
            run_id, kind=kind, severity=severity, rank=rank, after=after, limit=limit
        )
    if as_json:
        _print_json(found)
        return
    table = Table("id", "step", "rank", "kind", "severity", "message")
    for a in found:
        table.add_row(
            str(a["id"]), str(a["step"]), str(a["rank"]), a["kind"], a["severity"], a["message"]
        )
    out.print(table)
    out.print(f"{len(found)} anomal{'y' if len(found) == 1 else 'ies'} of run {run_id}")


# -- control channel --------------------------------------------------------------
COMMAND_STATES = ("pending", "delivered", "applied", "failed", "expired", "cancelled")
COMMAND_FLAGS: dict[str, tuple[str, ...]] = {
    "lr_scale": ("factor", "steps"),
    "clip": ("max_norm", "adaptive", "z", "alpha"),
    "skip_step": (),
    "checkpoint": ("reason",),
    "rollback": ("checkpoint", "skip_batches", "lr_factor", "lr_steps"),
    "stop": ("reason",),
}
"""The options of ``runwatch command`` that each command type takes."""
MAX_ACKS_LISTED = 8
"""Beyond this many reports, ``commands list`` counts outcomes instead of listing them."""

operate_key_option = click.option(
    "--api-key",
    envvar="RUNWATCH_API_KEY",
    help="API key with operate scope [env RUNWATCH_API_KEY].",
)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def command_args(type_: str, given: dict[str, Any]) -> dict[str, Any]:
    """The ``args`` of a ``type_`` command from the CLI options; :class:`click.UsageError` if
    an option does not apply to the type or a required one is missing."""
    given = {k: v for k, v in given.items() if v is not None and v is not False}
    allowed = COMMAND_FLAGS[type_]
    stray = [_flag(k) for k in given if k not in allowed]
    if stray:
        takes = ", ".join(_flag(k) for k in allowed) if allowed else "no options"
        raise click.UsageError(f"{', '.join(stray)} does not apply to {type_} (it takes {takes})")
    for name, value in given.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise click.UsageError(f"{_flag(name)} must be a finite number, not {value}")
    if type_ == "lr_scale":
        missing = [_flag(k) for k in ("factor", "steps") if k not in given]
        if missing:
            raise click.UsageError(f"lr_scale needs {' and '.join(missing)}")
    elif type_ == "clip":
        if ("max_norm" in given) == ("adaptive" in given):
            raise click.UsageError("clip takes either --max-norm X or --adaptive, exactly one")
        if "max_norm" in given and ({"z", "alpha"} & set(given)):
            raise click.UsageError("--z and --alpha apply only to clip --adaptive")
        if given.pop("adaptive", False):
            given["mode"] = "adaptive"
    elif type_ == "rollback" and "checkpoint" in given:
        checkpoint = given["checkpoint"]
        if checkpoint != "last_good" and not (checkpoint.isdigit() and int(checkpoint) >= 1):
            raise click.UsageError(
                f"--checkpoint must be last_good or a checkpoint id, not {checkpoint!r}"
            )
        given["checkpoint"] = checkpoint if checkpoint == "last_good" else int(checkpoint)
    return given


@main.command("command")
@click.argument("run")
@click.argument("type_", metavar="TYPE", type=click.Choice(COMMAND_TYPES))
@click.option(
    "--factor",
    type=click.FloatRange(0, 100, min_open=True),
    help="lr_scale: multiply the learning rate by F (0 < F <= 100).",
)
@click.option("--steps", type=click.IntRange(1, 10**7), help="lr_scale: for N steps.")
@click.option(
    "--max-norm", type=click.FloatRange(0, min_open=True), help="clip: fixed gradient-norm clip."
)
@click.option("--adaptive", is_flag=True, help="clip: adaptive clipping (ZClip).")
@click.option(
    "--z", type=click.FloatRange(0, min_open=True), help="clip --adaptive: z threshold [2.5]."
)
@click.option(
    "--alpha",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    help="clip --adaptive: EMA factor [0.97].",
)
@click.option("--reason", help="checkpoint, stop: why (kept in the audit log).")
@click.option("--checkpoint", help="rollback: last_good or a checkpoint id [last_good].")
@click.option(
    "--skip-batches",
    type=click.IntRange(0, 10**7),
    help="rollback: batches to skip after restoring [0].",
)
@click.option(
    "--lr-factor",
    type=click.FloatRange(0, 1, min_open=True),
    help="rollback: then scale the learning rate by F (0 < F <= 1) [1].",
)
@click.option(
    "--lr-steps",
    type=click.IntRange(1, 10**7),
    help="rollback: for N steps (with --lr-factor) [200].",
)
@click.option(
    "--at-step",
    type=click.IntRange(min=0),
    help="Step at which every rank applies it [the run's latest step + ~5 s of steps].",
)
@server_option
@operate_key_option
@json_option
def issue_command(
    run: str,
    type_: str,
    at_step: int | None,
    server: str | None,
    api_key: str | None,
    as_json: bool,
    **options: Any,
) -> None:
    """Issue a command to every rank of RUN (id or PROJECT/NAME); needs an operate key.

    \b
    TYPE and its options:
      lr_scale    --factor F --steps N
      clip        --max-norm X | --adaptive [--z Z] [--alpha A]
      skip_step
      checkpoint  [--reason TEXT]
      rollback    [--checkpoint last_good|ID] [--skip-batches N]
                  [--lr-factor F] [--lr-steps N]
      stop        [--reason TEXT]
    """
    args = command_args(type_, options)
    with _client(server, api_key) as client:
        run_id = _resolve_run(client, run)["id"]
        found = client.issue_command(run_id, type_, at_step=at_step, **args)
    if as_json:
        _print_json(found)
        return
    out.print(
        f"command {found['id']} issued to run {run_id}: {found['type']} "
        f"{format_args(found['args'])} at step {found['at_step']} ({found['state']}, "
        f"source {found['source']}, expires {_when(found['expires_at'])})"
    )


@main.group("commands")
def commands_group() -> None:
    """The control channel: commands issued to a run and what each rank did."""


@commands_group.command("list")
@click.argument("run")
@click.option("--state", type=click.Choice(COMMAND_STATES), help="Only commands in this state.")
@click.option("--after", type=click.IntRange(min=0), help="Only commands with a larger id.")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@server_option
@key_option
@json_option
def commands_list(
    run: str,
    state: str | None,
    after: int | None,
    limit: int,
    server: str | None,
    api_key: str | None,
    as_json: bool,
) -> None:
    """Commands of RUN (id or PROJECT/NAME), oldest first, with every rank's outcome."""
    with _client(server, api_key) as client:
        run_id = _resolve_run(client, run)["id"]
        found = client.commands(run_id, state=state, after=after, limit=limit)
    if as_json:
        _print_json(found)
        return
    # One block per command rather than a table: nine columns do not fit a terminal.
    for c in found:
        ended = f", ended {_when(c['finished_at'])}" if c["finished_at"] else ""
        cancelled = f", cancelled by {c['cancelled_by']}" if c["cancelled_by"] else ""
        lines = [
            f"{c['id']} {c['type']} {format_args(c['args'])} at step {c['at_step']}: {c['state']}",
            f"    issued {_when(c['created_at'])} by {c['source']}, delivered "
            f"{_when(c['delivered_at'])}{ended}{cancelled}",
            f"    {format_outcomes(c['acks'])}",
        ]
        out.print("\n".join(lines), markup=False, soft_wrap=True)
    out.print(f"{len(found)} command(s) of run {run_id}")


@commands_group.command("cancel")
@click.argument("command_id", type=click.IntRange(min=1))
@server_option
@operate_key_option
def commands_cancel(command_id: int, server: str | None, api_key: str | None) -> None:
    """Stop delivering a pending or delivered command; needs an operate key."""
    with _client(server, api_key) as client:
        found = client.cancel_command(command_id)
    out.print(f"command {found['id']} of run {found['run_id']} is {found['state']}")


# -- alerts -----------------------------------------------------------------------
ALERT_STATES = ("firing", "acknowledged", "resolved")
SEVERITIES = ("info", "warning", "critical")


class BadInput(click.ClickException):
    """Input this command or the server (422) refused: one line, exit status 2 like a usage
    error, without the usage text."""

    exit_code = 2


@contextmanager
def _checked_client(server_url: str | None, api_key: str | None) -> Iterator[Client]:
    """:func:`_client`, with the server's 422 shown as :class:`BadInput`."""
    with _client(server_url, api_key) as client:
        try:
            yield client
        except ClientError as exc:
            if exc.status == 422:
                raise BadInput(f"the server refused: {exc.detail}") from None
            raise


@main.group("alerts")
def alerts_group() -> None:
    """Alerts: what fired, who was told, and acknowledging or resolving it."""


@alerts_group.command("list")
@click.option("--state", type=click.Choice(ALERT_STATES), help="Only alerts in this state.")
@click.option("--run", help="Only alerts of this run (id or PROJECT/NAME).")
@click.option("--severity", type=click.Choice(SEVERITIES))
@click.option("--kind", help="Only this kind, e.g. loss_spike.")
@click.option("--before", type=click.IntRange(min=1), help="Only alerts with a smaller id.")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@server_option
@key_option
@json_option
def alerts_list(
    state: str | None,
    run: str | None,
    severity: str | None,
    kind: str | None,
    before: int | None,
    limit: int,
    server: str | None,
    api_key: str | None,
    as_json: bool,
) -> None:
    """Alerts of the key's project, newest first."""
    with _checked_client(server, api_key) as client:
        run_id = None if run is None else _resolve_run(client, run)["id"]
        found = client.alerts(
            state=state, run=run_id, severity=severity, kind=kind, before=before, limit=limit
        )
    if as_json:
        _print_json(found)
        return
    # One block per alert, as in ``commands list``: run names and summaries overflow a table.
    for a in found:
        where = f" on {a['key']}" if a["key"] else ""
        step = f" at step {a['last_step']}" if a["last_step"] is not None else ""
        summary = f": {a['summary']}" if a["summary"] else ""
        lines = [
            f"{a['id']} {a['severity']} {a['kind']}{where}: {a['state']} (x{a['count']})",
            f"    {a['project']}/{a['run_name']} (run {a['run_id']}), last seen "
            f"{_when(a['last_seen_at'])}{step}{summary}",
        ]
        out.print("\n".join(lines), markup=False, soft_wrap=True)
    out.print(f"{len(found)} alert(s)")


@alerts_group.command("show")
@click.argument("alert_id", type=click.IntRange(min=1), metavar="ID")
@server_option
@key_option
@json_option
def alerts_show(alert_id: int, server: str | None, api_key: str | None, as_json: bool) -> None:
    """One alert: its history and every message sent about it."""
    with _checked_client(server, api_key) as client:
        found = client.alert(alert_id)
        deliveries = client.alert_deliveries(alert_id)
    if as_json:
        _print_json({**found, "deliveries": deliveries})
        return
    out.print("\n".join(format_alert(found, deliveries)), markup=False, soft_wrap=True)


def format_alert(alert: dict[str, Any], deliveries: list[dict[str, Any]]) -> list[str]:
    """``alerts show`` as lines: the alert, its events, its deliveries with their attempts."""
    where = f" on {alert['key']}" if alert["key"] else ""
    lines = [
        f"alert {alert['id']}: {alert['severity']} {alert['kind']}{where}: {alert['state']}",
        f"    run {alert['project']}/{alert['run_name']} (run {alert['run_id']}), "
        f"raised by {alert['source']}, fired {alert['count']} time(s){_steps(alert)}",
        f"    first seen {_when(alert['first_seen_at'])}, last seen {_when(alert['last_seen_at'])}",
    ]
    if alert["summary"]:
        lines.append(f"    {alert['summary']}")
    if alert["escalation"] is None:
        lines.append(f"    route {alert['route']}: recorded only, nobody is notified")
    else:
        upcoming = (
            f", next step {_when(alert['next_escalation_at'])}"
            if alert["next_escalation_at"]
            else ""
        )
        lines.append(
            f"    route {alert['route']}, escalation {alert['escalation']}: "
            f"{alert['escalation_step']} step(s) taken{upcoming}"
        )
    if alert["silenced_by"] is not None:
        lines.append(f"    held back by silence {alert['silenced_by']}")
    lines.append("events:")
    lines += [
        f"    {_when(e['at'])} {e['type']} by {e['by']}"
        + (f": {e['detail']}" if e["detail"] else "")
        for e in alert["events"]
    ]
    lines.append("deliveries:" if deliveries else "deliveries: none")
    for d in deliveries:
        step = f" step {d['step']}" if d["step"] is not None else ""
        sent = f" at {_when(d['sent_at'])}" if d["sent_at"] else ""
        lines.append(
            f"    {d['id']} {d['event']}{step} via {d['channel']} ({d['type']}) to {d['target']}: "
            f"{d['state']}{sent}, {d['attempts']} attempt(s)"
        )
        for a in d["log"]:
            error = f": {a['error']}" if a["error"] else ""
            lines.append(
                f"        attempt {a['attempt']} {_when(a['at'])} {a['status']} "
                f"({a['duration']:.2f} s){error}"
            )
    return lines


def _steps(alert: dict[str, Any]) -> str:
    """`` at step 7``, `` at steps 7-40`` or nothing."""
    first, last = alert["first_step"], alert["last_step"]
    if last is None:
        return ""
    if first is None or first == last:
        return f" at step {last}"
    return f" at steps {first}-{last}"


def _change_alerts(
    ids: tuple[int, ...], server: str | None, api_key: str | None, verb: str
) -> None:
    """Acknowledge or resolve each alert; the others still go when one is refused."""
    failed = 0
    with _checked_client(server, api_key) as client:
        change = client.ack_alert if verb == "acknowledged" else client.resolve_alert
        for alert_id in ids:
            try:
                found = change(alert_id)
            except ClientError as exc:
                if exc.status not in (404, 409):
                    raise  # a bad key or scope: every other id would fail the same way
                click.echo(f"Error: alert {alert_id}: {exc.detail}", err=True)
                failed += 1
                continue
            by = found["acknowledged_by" if verb == "acknowledged" else "resolved_by"]
            out.print(f"alert {found['id']} {verb} by {by}", markup=False)
    if failed:
        sys.exit(1)


@alerts_group.command("ack")
@click.argument("ids", nargs=-1, required=True, type=click.IntRange(min=1), metavar="ID...")
@server_option
@operate_key_option
def alerts_ack(ids: tuple[int, ...], server: str | None, api_key: str | None) -> None:
    """Acknowledge alerts: someone is on it, stop paging. Needs an operate key."""
    _change_alerts(ids, server, api_key, "acknowledged")


@alerts_group.command("resolve")
@click.argument("ids", nargs=-1, required=True, type=click.IntRange(min=1), metavar="ID...")
@server_option
@operate_key_option
def alerts_resolve(ids: tuple[int, ...], server: str | None, api_key: str | None) -> None:
    """Resolve alerts: the trouble is over. Needs an operate key."""
    _change_alerts(ids, server, api_key, "resolved")


@main.group("silences")
def silences_group() -> None:
    """Silences: hold back notifications about matching alerts for a while."""


def parse_matchers(matches: tuple[str, ...]) -> dict[str, str | int]:
    """``--match k=v`` options as a silence's matchers; :class:`BadInput` when malformed.

    >>> parse_matchers(("run=sweep-*", "run_id=7"))
    {'run': 'sweep-*', 'run_id': 7}
    """
    found: dict[str, str | int] = {}
    for match in matches:
        name, sep, value = match.partition("=")
        name = name.strip()
        if not sep or not value:
            raise BadInput(f"--match takes FIELD=VALUE, not {match!r}")
        if name not in SILENCE_FIELDS:
            raise BadInput(f"--match: unknown field {name!r} (use {', '.join(SILENCE_FIELDS)})")
        if name in found:
            raise BadInput(f"--match: {name} is given twice")
        if name == "run_id":
            if not (value.isascii() and value.isdigit()) or int(value) < 1:
                raise BadInput(f"--match run_id takes a run id, not {value!r}")
            found[name] = int(value)
        else:
            found[name] = value
    return found


def _duration(text: str) -> float | str:
    """A number of seconds as a number; text such as ``2h`` as is (the server reads it)."""
    try:
        seconds = float(text)
    except ValueError:
        return text
    if not math.isfinite(seconds):
        raise BadInput(f"--duration takes a length of time such as 30m or 2h, not {text!r}")
    return seconds


@silences_group.command("create")
@click.option(
    "--match",
    "matches",
    multiple=True,
    required=True,
    help="FIELD=VALUE, FIELD one of run (name glob), run_id, kind, key, severity; repeat to "
    "narrow. Example: --match run='sweep-*' --match kind=hang.",
)
@click.option("--duration", required=True, help="How long, e.g. 30m, 2h, 1d (at most 90d).")
@click.option("--comment", default="", help="Why, for the others.")
@click.option(
    "--project",
    help="Project of the silence, on a server without keys [the run of --match run_id=]; "
    "with a key, always the key's.",
)
@server_option
@operate_key_option
@json_option
def silences_create(
    matches: tuple[str, ...],
    duration: str,
    comment: str,
    project: str | None,
    server: str | None,
    api_key: str | None,
    as_json: bool,
) -> None:
    """Hold back notifications about alerts matching every --match; needs an operate key."""
    matchers = parse_matchers(matches)
    with _checked_client(server, api_key) as client:
        found = client.create_silence(
            matchers, duration=_duration(duration), comment=comment, project=project
        )
    if as_json:
        _print_json(found)
        return
    out.print(
        f"silence {found['id']} ({format_args(found['matchers'])}) {found['state']} from "
        f"{_when(found['starts_at'])} until {_when(found['ends_at'])}",
        markup=False,
    )


@silences_group.command("list")
@click.option("--active", is_flag=True, help="Only those in force now.")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@server_option
@key_option
@json_option
def silences_list(
    active: bool, limit: int, server: str | None, api_key: str | None, as_json: bool
) -> None:
    """Silences of the key's project, newest first."""
    with _checked_client(server, api_key) as client:
        found = client.silences(active=True if active else None, limit=limit)
    if as_json:
        _print_json(found)
        return
    for x in found:
        comment = f": {x['comment']}" if x["comment"] else ""
        expired = f", expired by {x['expired_by']}" if x["expired_by"] else ""
        lines = [
            f"{x['id']} {format_args(x['matchers'])}: {x['state']} from "
            f"{_when(x['starts_at'])} until {_when(x['ends_at'])}{expired}",
            f"    by {x['created_by']} at {_when(x['created_at'])}{comment}",
        ]
        out.print("\n".join(lines), markup=False, soft_wrap=True)
    out.print(f"{len(found)} silence(s)")


@silences_group.command("expire")
@click.argument("silence_id", type=click.IntRange(min=1), metavar="ID")
@server_option
@operate_key_option
def silences_expire(silence_id: int, server: str | None, api_key: str | None) -> None:
    """End a silence now; held messages about alerts still firing go out."""
    with _checked_client(server, api_key) as client:
        found = client.expire_silence(silence_id)
    out.print(f"silence {found['id']} expired by {found['expired_by']}", markup=False)


# -- supervisor -------------------------------------------------------------------
@main.command(context_settings={"allow_interspersed_args": False})
@click.option(
    "--max-restarts",
    type=click.IntRange(min=0),
    default=3,
    show_default=True,
    help="Restarts in a row before giving up.",
)
@click.option(
    "--hang-timeout",
    type=click.FloatRange(0, min_open=True),
    help="Also restart when no step completes for this many seconds once the attempt made "
    "its first [off: only the collector's hang finding counts].",
)
@click.option(
    "--poll",
    type=click.FloatRange(0, min_open=True),
    default=5.0,
    show_default=True,
    help="Seconds between looks at the collector.",
)
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="Seconds between SIGTERM and SIGKILL when the trainer is stopped.",
)
@click.option(
    "--backoff",
    type=click.FloatRange(min=0),
    default=2.0,
    show_default=True,
    help="Seconds before a restart, doubling with each restart in a row (at most 60).",
)
@click.option(
    "--reset-after",
    type=click.FloatRange(0, min_open=True),
    default=1800.0,
    show_default=True,
    help="An attempt that ran this long before failing resets the restart count.",
)
@click.option("--project", envvar="RUNWATCH_PROJECT", help="Project [env RUNWATCH_PROJECT].")
@click.option(
    "--name", envvar="RUNWATCH_RUN_NAME", help="Run name [env RUNWATCH_RUN_NAME; generated]."
)
@server_option
@click.option(
    "--api-key",
    envvar="RUNWATCH_API_KEY",
    help="Key with read scope, passed to the trainer too [env RUNWATCH_API_KEY].",
)
@click.argument("command", nargs=-1, type=click.UNPROCESSED, metavar="-- COMMAND...")
def supervise(command: tuple[str, ...], **options: Any) -> None:
    """Run a training COMMAND (after --), restarting it when it crashes or hangs.

    \b
    Every attempt is the same run (RUNWATCH_PROJECT, RUNWATCH_RUN_NAME); a restart gets the
    run's last good checkpoint in RUNWATCH_RESUME_FROM and the restarts so far in
    RUNWATCH_RESTART_COUNT. Example:
      runwatch supervise --project llm --name big -- torchrun --nproc-per-node 8 train.py
    """
    import logging

    from runwatch.supervise import CannotStart, EchoHandler, Supervisor

    if not command:
        raise click.UsageError("give the training command after --: runwatch supervise -- CMD")
    logger = logging.getLogger("runwatch.supervise")
    if not any(isinstance(h, EchoHandler) for h in logger.handlers):
        logger.addHandler(EchoHandler())
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        status = Supervisor(command, **options).run()
    except CannotStart as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(status)


@main.group("checkpoints")
def checkpoints_group() -> None:
    """The checkpoint registry: what a run saved and whether it can be trusted."""


@checkpoints_group.command("list")
@click.argument("run")
@click.option(
    "--label", type=click.Choice(["good", "suspect", "unverified"]), help="Only this label."
)
@click.option("--include-deleted", is_flag=True, help="Also those retention dropped.")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@server_option
@key_option
@json_option
def checkpoints_list(
    run: str,
    label: str | None,
    include_deleted: bool,
    limit: int,
    server: str | None,
    api_key: str | None,
    as_json: bool,
) -> None:
    """Checkpoints of RUN (id or PROJECT/NAME), newest first, with their labels."""
    with _client(server, api_key) as client:
        run_id = _resolve_run(client, run)["id"]
        found = client.checkpoints(
            run_id, label=label, include_deleted=include_deleted, limit=limit
        )
    if as_json:
        _print_json(found)
        return
    # One block per checkpoint, as in ``commands list``: paths and reasons overflow a table.
    for c in found:
        deleted = f", deleted {_when(c['deleted_at'])}" if c["deleted_at"] else ""
        reason = f" ({c['reason']})" if c["reason"] else ""
        lines = [
            f"{c['id']} step {c['step']}: {c['label']}, {c['label_detail']}",
            f"    saved {_when(c['wall_time'])}{reason}, {format_size(c['size_bytes'])}{deleted}",
            f"    {c['path']}",
        ]
        out.print("\n".join(lines), markup=False, soft_wrap=True)
    out.print(f"{len(found)} checkpoint(s) of run {run_id}")


def format_size(n: int) -> str:
    """``512 B``, ``1.5 MB``: decimal units, 3 significant digits.

    >>> [format_size(n) for n in (999, 1000, 999_499, 999_500, 1_234_567_890)]
    ['999 B', '1 kB', '999 kB', '1 MB', '1.23 GB']
    """
    if n < 1000:
        return f"{n} B"
    size = n / 1000
    for unit in ("kB", "MB", "GB", "TB"):
        shown = f"{size:.3g}"
        if float(shown) < 1000:  # 999.5 rounds to 1e+03: the next unit says it better
            return f"{shown} {unit}"
        size /= 1000
    return f"{size:.3g} PB"


# -- policies -------------------------------------------------------------------
@main.group("policy")
def policy_group() -> None:
    """Policies: what the collector does about anomalies (RUNWATCH_POLICY)."""


def _policy_model() -> Any:
    try:
        from runwatch.collector.policy import model
    except ImportError:
        raise click.ClickException(
            "this command needs the server extras: pip install 'runwatch[server]'"
        ) from None
    return model


@policy_group.command("check")
@click.argument("file", type=click.Path(dir_okay=False))
def policy_check(file: str) -> None:
    """Validate the policy FILE: 'ok: N rules', or every problem with its location."""
    model = _policy_model()
    try:
        policy = model.load_policy(file)
    except model.PolicyError as exc:
        for problem in exc.problems:
            click.echo(f"{file}: {problem}", err=True)
        raise SystemExit(1) from None
    click.echo(f"ok: {len(policy.rules)} rules")


@policy_group.command("show-default")
def policy_show_default() -> None:
    """Print the shipped default policy, with its comments (a start for your own)."""
    click.echo(_policy_model().default_policy_text(), nl=False)


def format_args(args: dict[str, Any]) -> str:
    """``factor=0.5 steps=100``; ``-`` for none."""
    return " ".join(f"{k}={v}" for k, v in args.items()) or "-"


def format_outcomes(acks: list[dict[str, Any]]) -> str:
    """What each rank reported, or counts per status (and the ranks that did not apply it)."""
    if not acks:
        return "no rank has reported"
    if len(acks) > MAX_ACKS_LISTED:
        counts: dict[str, int] = {}
        for a in acks:
            counts[a["status"]] = counts.get(a["status"], 0) + 1
        others = [str(a["rank"]) for a in acks if a["status"] != "applied"]
        summary = ", ".join(f"{n} ranks {status}" for status, n in sorted(counts.items()))
        if others:
            shown = ", ".join(others[:MAX_ACKS_LISTED]) + (
                ", ..." if len(others) > MAX_ACKS_LISTED else ""
            )
            summary += f" (not applied: ranks {shown})"
        return summary
    parts = []
    for a in acks:
        part = f"rank {a['rank']}: {a['status']}"
        if a["step"] is not None:
            part += f" at step {a['step']}"
        if a["detail"]:
            part += f" ({a['detail']})"
        parts.append(part)
    return "; ".join(parts)


def bucket_table(buckets: list[dict[str, Any]], *, title: str | None = None) -> Table:
    """Downsampled buckets as a table: step span, count, NaN count, min, mean, max."""
    table = Table("steps", "count", "NaN", "min", "mean", "max", title=title)
    for b in buckets:
        table.add_row(
            f"{b['step_min']}-{b['step_max']}",
            str(b["count"]),
            str(b["nan_count"]),
            format_number(b["min"]),
            format_number(b["mean"]),
            format_number(b["max"]),
        )
    return table


def _print_json(value: Any) -> None:
    from runwatch.wire import encode_float

    def clean(obj: Any) -> Any:
        if isinstance(obj, float):
            return encode_float(obj)
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [clean(v) for v in obj]
        return obj

    sys.stdout.write(orjson.dumps(clean(value), option=orjson.OPT_INDENT_2).decode() + "\n")


def format_number(value: float | None) -> str:
    """A value for a table: 6 significant digits, nan/inf as words, - for none."""
    if value is None:
        return "-"
    return f"{value:.6g}" if math.isfinite(value) else str(value)


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _version() -> str:
    import runwatch

    return runwatch.__version__
