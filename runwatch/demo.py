"""``make demo``: a real training run on the CPU, watched by the agent, against the embedded
collector, hit by a real fault that runwatch repairs on its own.

A collector on SQLite (``.demo/runwatch.db``) runs in this process on a loopback
port with the default policy; a tiny byte-level transformer (:mod:`runwatch.tinylm`)
learns from the source of a few standard-library modules while ``runwatch.init`` /
``run.watch`` / ``run.log`` stream its signals over HTTP, exactly as in a user's
script, and the agent saves a checkpoint every 25 steps. From batch ``--fault-at``
(150) the data turn to garbage for 20 batches (a corrupted shard: random byte ids).
The detectors see the loss jump and stay up, the policy rolls the run back to the
last good checkpoint with the next 200 batches skipped, and the run finishes
healthy. At the end the demo prints a timeline of anomalies, commands and
checkpoints, and what the query API recorded.

A checkpoint is called good here once the run went 50 steps past it without a
training-signal anomaly (``checkpoint_verify_steps``; 100 by default), so that a
300-step run has one to go back to.

Then a second trainer hangs: it stops making steps while its agent stays alive. The
hang detector (on a clock compressed 50 times: 6 s instead of 5 min) raises a critical
alert, which the demo's escalation policy sends to console channels standing in for
Slack, a text, a call to the on-call and a call to the manager, seconds apart instead
of minutes. The demo acknowledges it with ``runwatch alerts ack`` once the on-call's
phone "rang", and the manager is never called.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import runwatch
from runwatch.cli import bucket_table, format_number
from runwatch.client import Client
from runwatch.collector.policy.model import default_policy_text
from runwatch.collector.server import ServerThread
from runwatch.settings import Settings
from runwatch.tinylm import (
    TinyConfig,
    TinyLM,
    batches,
    corpus,
    corrupt_batches,
    loss_of,
    warmup_cosine,
)

STEPS = 300
BATCH = 16
VALIDATE_EVERY = 50
CHECKPOINT_EVERY = 25
FAULT_AT = 150
FAULT_LENGTH = 20
VERIFY_STEPS = 50
TIME_SCALE = 0.02
"""Hang timeouts x 0.02: a trainer without a step for 6 s (not 5 min) is hung."""
DEMO_ALERTING: dict[str, Any] = {
    "group_wait": "1s",
    "resolve_after": "never",
    "channels": {
        "team-chat": {"type": "console", "label": "#train-alerts (Slack)"},
        "oncall-sms": {"type": "console", "label": "text to the on-call"},
        "oncall-call": {"type": "console", "label": "call to the on-call"},
        "manager-call": {"type": "console", "label": "call to the manager"},
        "log": {"type": "console", "label": "log"},
    },
    "escalations": {
        "page-oncall": {
            "steps": [
                {"notify": ["team-chat"]},
                {"after": "4s", "notify": ["oncall-sms"]},
                {"after": "8s", "notify": ["oncall-call"]},
                {"after": "16s", "notify": ["manager-call"]},
            ],
            "then": "stop",
        },
        "log": {"steps": [{"notify": ["log"]}], "then": "stop"},
    },
    "routes": [
        {"kinds": ["hang"], "escalation": "page-oncall"},
        {"severities": ["critical"], "escalation": "log"},
        {"escalation": "none"},
    ],
}
"""The default policy's alerting, with minutes turned into seconds and consoles for phones."""
console = Console(highlight=False)


def train(server: str, steps: int, workdir: Path, fault_at: int | None) -> int:
    """Train the tiny model for ``steps`` optimizer steps under the agent (more iterations
    when it rolls back), with garbage batches from ``fault_at``; returns the run id."""
    torch.manual_seed(0)
    config = TinyConfig()
    data = corpus()
    split = len(data) * 9 // 10
    train_data = batches(data[:split], batch_size=BATCH, context=config.context)
    val_data = batches(data[split:], batch_size=BATCH, context=config.context, seed=1)
    model = TinyLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    scheduler = warmup_cosine(optimizer, warmup=min(30, steps // 5 + 1), total=steps)
    hyper = {"steps": steps, "batch": BATCH, "lr": 3e-3, **dataclasses.asdict(config)}

    with runwatch.init(
        project="demo",
        name=time.strftime("tiny-lm-%Y%m%d-%H%M%S"),
        server=server,
        config=hyper,
        tags=["demo", "cpu"],
        spool_dir=workdir / "spool",
        checkpoint_dir=workdir / "checkpoints",
        system_interval=1.0,
    ) as run:
        run.watch(model, optimizer, scheduler, checkpoint_every=CHECKPOINT_EVERY)
        stream = (
            train_data
            if fault_at is None
            else corrupt_batches(train_data, fault_at, FAULT_LENGTH, seed=7)
        )
        columns = (
            TextColumn("[bold]training"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("train", total=steps, loss="-")
            # run.data: the batch boundary where a rollback restores a checkpoint and skips
            # batches of the stream beneath it.
            for iteration, (inputs, targets) in enumerate(run.data(stream)):
                loss = loss_of(model, inputs, targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                run.log({"train/loss": loss})
                step = run.step  # this update's step: after a rollback, counted from its step
                if step % VALIDATE_EVERY == VALIDATE_EVERY - 1 or step == steps - 1:
                    run.log({"val/loss": validate(model, val_data)})
                progress.update(task, completed=step + 1, loss=f"{loss.item():.3f}")
                if step + 1 >= steps or run.should_stop or iteration >= 3 * steps:
                    break
        run.flush(10)
        assert run.id is not None, "the collector did not answer"
        return run.id


def validate(model: TinyLM, data: object, batches_: int = 4) -> float:
    model.eval()
    with torch.no_grad():
        total = sum(loss_of(model, *next(data)).item() for _ in range(batches_))  # type: ignore[call-overload]
    model.train()
    return total / batches_


def timeline(client: Client, run_id: int) -> None:
    """Anomalies, commands and checkpoints of the run, in the order they happened."""
    events: list[tuple[float, str, str, str]] = []
    for a in client.anomalies(run_id):
        what = f"[yellow]{a['kind']}[/] ({a['severity']})"
        events.append((a["wall_time"], str(a["step"]), what, a["message"]))
    for c in client.commands(run_id):
        ack = next((k for k in c["acks"] if k["rank"] == 0), None)
        outcome = f"{ack['status']} at step {ack['step']}: {ack['detail']}" if ack else c["state"]
        what = f"[cyan]{c['type']}[/] by {c['source']}"
        events.append((c["created_at"], str(c["at_step"]), what, outcome))
    for k in client.checkpoints(run_id, include_deleted=True):
        label = f"{k['label']}" + (", deleted" if k["deleted_at"] is not None else "")
        what = f"checkpoint {k['id']} [dim]({label})[/]"
        events.append((k["wall_time"], str(k["step"]), what, k["label_detail"]))
    if not events:
        return
    start = min(e[0] for e in events)
    table = Table("t (s)", "step", "event", "detail", title="what happened")
    for when, step, what, detail in sorted(events):
        table.add_row(f"{when - start:.1f}", step, what, detail)
    console.print(table)


def show(client: Client, run_id: int) -> None:
    """What the collector recorded, through the query API a dashboard would use."""
    run = client.run(run_id)
    series = client.series(run_id)
    console.print(
        f"\nrun {run['id']} [bold]{run['project']}/{run['name']}[/] is {run['state']}: "
        f"{len(series)} series, {sum(s['n_points'] for s in series):,} points"
    )
    groups: dict[str, list[dict[str, object]]] = {}
    for s in series:
        groups.setdefault(str(s["key"]).split("/")[0], []).append(s)
    table = Table("group", "series", "points", "examples (latest value)", title="GET .../series")
    for group, members in sorted(groups.items()):
        examples = ", ".join(
            f"{s['key']}={format_number(s['last_value'])}"  # type: ignore[arg-type]
            for s in members[:3]
        )
        points = sum(int(s["n_points"]) for s in members)  # type: ignore[call-overload]
        table.add_row(group, str(len(members)), f"{points:,}", examples)
    console.print(table)
    loss = client.metrics(run_id, "train/loss", max_points=10)
    console.print(bucket_table(loss["buckets"], title="train/loss, downsampled to 10 buckets"))
    latest = client.latest(run_id, keys=["train/loss", "val/loss", "train/grad_norm"])
    console.print(
        "latest: "
        + ", ".join(
            f"{k}={format_number(v['value'])} @ step {v['step']}" for k, v in latest.items()
        )
    )


def demo_policy(workdir: Path) -> Path:
    """The default policy's rules with :data:`DEMO_ALERTING`, written to ``workdir``."""
    policy = yaml.safe_load(default_policy_text())
    policy["alerting"] = DEMO_ALERTING
    path = workdir / "policy.yaml"
    path.write_text(yaml.safe_dump(policy, sort_keys=False), encoding="utf-8")
    return path


def cli(server: str, *args: str) -> str:
    """Run ``runwatch ARGS --server SERVER`` as a user would, show and return its output."""
    shown = " ".join(("runwatch", *args))
    console.print(f"[bold]$ {shown}[/]")
    done = subprocess.run(
        [sys.executable, "-m", "runwatch", *args, "--server", server],
        capture_output=True,
        text=True,
        check=True,
    )
    console.print(done.stdout.rstrip())
    return done.stdout


def hang(server: str, workdir: Path) -> int:
    """A second trainer stops making steps; the demo acknowledges the page from the CLI.
    Returns the alert's id."""
    console.rule("[bold]a trainer that hangs")
    with runwatch.init(
        project="demo",
        name=time.strftime("hung-%Y%m%d-%H%M%S"),
        server=server,
        spool_dir=workdir / "spool-hung",
        system_interval=1.0,
    ) as run:
        for step in range(20):
            run.log({"train/loss": 2.0 - step / 100}, step=step)
            time.sleep(0.05)
        run.flush(10)
        console.print(
            f"run {run.id} made 20 steps and stopped (a stuck collective, a dead data "
            "loader); its agent is alive and sends heartbeats"
        )
        with Client(server, api_key="") as client:
            alert = wait_for(lambda: _hang_alert(client, run.id), 60, "the hang alert")
            wait_for(
                lambda: _notified(client, alert["id"], "oncall-call"), 60, "the on-call's call"
            )
            console.print("[bold]The on-call picks it up:[/]")
            cli(server, "alerts", "ack", str(alert["id"]))
            time.sleep(10)  # past the manager's step: nobody calls the manager
            cli(server, "alerts", "show", str(alert["id"]))
            calls = [
                d for d in client.alert_deliveries(alert["id"]) if d["channel"] == "manager-call"
            ]
            console.print(f"messages to the manager: {len(calls)}")
    return int(alert["id"])


def _hang_alert(client: Client, run_id: int | None) -> dict[str, Any] | None:
    found = client.alerts(run=run_id, kind="hang")
    return found[0] if found else None


def _notified(client: Client, alert_id: int, channel: str) -> bool:
    return any(d["channel"] == channel for d in client.alert_deliveries(alert_id))


def wait_for(probe: Any, seconds: float, what: str) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(0.5)
    raise SystemExit(f"demo: no sign of {what} after {seconds:.0f} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m runwatch.demo", description=__doc__)
    parser.add_argument("--steps", type=int, default=STEPS, help="training steps (default 300)")
    parser.add_argument("--workdir", type=Path, default=Path(".demo"))
    parser.add_argument(
        "--fault-at",
        type=int,
        default=FAULT_AT,
        help=f"first of {FAULT_LENGTH} garbage batches (default {FAULT_AT}; -1: no fault)",
    )
    parser.add_argument(
        "--no-hang", action="store_true", help="skip the second act (a hung trainer is paged)"
    )
    args = parser.parse_args(argv)
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    db = f"sqlite:///{args.workdir / 'runwatch.db'}"
    settings = Settings(
        db=db,
        host="127.0.0.1",
        port=0,
        detector_check_seconds=1.0,
        detector_time_scale=TIME_SCALE,
        checkpoint_verify_steps=VERIFY_STEPS,
        policy=str(demo_policy(args.workdir)),
        alert_tick_seconds=0.2,
    )
    fault_at = args.fault_at if args.fault_at >= 0 else None
    with ServerThread(settings) as server:
        console.print(f"[bold]runwatch collector[/] on {server.url}, database {db}")
        if fault_at is not None:
            console.print(
                f"batches {fault_at}-{fault_at + FAULT_LENGTH - 1} will be garbage "
                "(random byte ids): watch runwatch roll the run back"
            )
        run_id = train(server.url, args.steps, args.workdir, fault_at)
        with Client(server.url, api_key="") as client:
            time.sleep(2.0)  # the last anomalies and acknowledgements
            timeline(client, run_id)
            show(client, run_id)
            name = f"demo/{client.run(run_id)['name']}"
        alert_id = None if args.no_hang else hang(server.url, args.workdir)
    console.print(
        f"\nThe data stay in {args.workdir}/runwatch.db. Explore them with:\n"
        f"  .venv/bin/runwatch server --db {db} &\n"
        f"  .venv/bin/runwatch runs show {name}\n"
        f"  .venv/bin/runwatch metrics get {name} train/loss --max-points 20\n"
        "  .venv/bin/runwatch alerts list"
        + ("" if alert_id is None else f"\n  .venv/bin/runwatch alerts show {alert_id}")
    )


if __name__ == "__main__":
    main()
