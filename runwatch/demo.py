"""``make demo``: a real training run on the CPU, watched by the agent, against the embedded
collector.

A collector on SQLite (``.demo/runwatch.db``) runs in this process on a loopback
port; a tiny byte-level transformer (:mod:`runwatch.tinylm`) learns from the
source of a few standard-library modules while ``runwatch.init`` / ``run.watch``
/ ``run.log`` stream its signals over HTTP, exactly as in a user's script. At
the end the demo asks the collector's query API what it recorded.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import runwatch
from runwatch.cli import bucket_table, format_number
from runwatch.client import Client
from runwatch.collector.server import ServerThread
from runwatch.settings import Settings
from runwatch.tinylm import TinyConfig, TinyLM, batches, corpus, loss_of, warmup_cosine

STEPS = 300
BATCH = 16
VALIDATE_EVERY = 50
console = Console(highlight=False)


def train(server: str, steps: int, spool: Path) -> int:
    """Train the tiny model for ``steps`` steps under the agent; returns the run id."""
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
        spool_dir=spool,
        system_interval=1.0,
    ) as run:
        run.watch(model, optimizer, scheduler)
        columns = (
            TextColumn("[bold]training"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("train", total=steps, loss="-")
            for step in range(steps):
                inputs, targets = next(train_data)
                loss = loss_of(model, inputs, targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                run.log({"train/loss": loss})
                if step % VALIDATE_EVERY == VALIDATE_EVERY - 1 or step == steps - 1:
                    run.log({"val/loss": validate(model, val_data)})
                progress.update(task, advance=1, loss=f"{loss.item():.3f}")
        run.flush(10)
        assert run.id is not None, "the collector did not answer"
        return run.id


def validate(model: TinyLM, data: object, batches_: int = 4) -> float:
    model.eval()
    with torch.no_grad():
        total = sum(loss_of(model, *next(data)).item() for _ in range(batches_))  # type: ignore[call-overload]
    model.train()
    return total / batches_


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m runwatch.demo", description=__doc__)
    parser.add_argument("--steps", type=int, default=STEPS, help="training steps (default 300)")
    parser.add_argument("--workdir", type=Path, default=Path(".demo"))
    args = parser.parse_args(argv)
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    db = f"sqlite:///{args.workdir / 'runwatch.db'}"
    with ServerThread(Settings(db=db, host="127.0.0.1", port=0)) as server:
        console.print(f"[bold]runwatch collector[/] on {server.url}, database {db}")
        run_id = train(server.url, args.steps, args.workdir / "spool")
        with Client(server.url, api_key="") as client:
            show(client, run_id)
            name = f"demo/{client.run(run_id)['name']}"
    console.print(
        f"\nThe data stay in {args.workdir}/runwatch.db. Explore them with:\n"
        f"  .venv/bin/runwatch server --db {db} &\n"
        f"  .venv/bin/runwatch runs show {name}\n"
        f"  .venv/bin/runwatch metrics get {name} train/loss --max-points 20"
    )


if __name__ == "__main__":
    main()
