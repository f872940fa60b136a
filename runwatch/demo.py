"""``make demo``: a collector on SQLite, a synthetic two-rank run streamed into it, queried back.

Everything travels over HTTP on 127.0.0.1, exactly as an agent and a user
would use it; the database is left in ``.demo/runwatch.db`` for the CLI.
"""

from __future__ import annotations

import math
import random
import shutil
import time
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from runwatch import wire
from runwatch.cli import bucket_table, format_number
from runwatch.client import Client
from runwatch.collector.server import ServerThread
from runwatch.settings import Settings

STEPS = 600
RANKS = 2
FLUSH_EVERY = 25
NAN_STEP = 412
console = Console(highlight=False)


def synthetic_step(step: int, rank: int, rng: random.Random, now: float) -> list[wire.Point]:
    """What a trainer would log at ``step``: training signals on rank 0, system metrics on all."""
    points = [
        wire.Point(step, now, "step_time", 0.25 + 0.02 * rng.random() + 0.05 * rank),
        wire.Point(step, now, "sys/cpu_percent", 60 + 20 * rng.random()),
    ]
    if rank == 0:
        warmup = min(1.0, step / 50)
        lr = 3e-4 * warmup * 0.5 * (1 + math.cos(math.pi * step / STEPS))
        loss = 4.0 * math.exp(-step / 150) + 0.3 + 0.05 * rng.gauss(0, 1)
        points += [
            wire.Point(step, now, "loss", math.nan if step == NAN_STEP else loss),
            wire.Point(step, now, "lr", lr),
            wire.Point(step, now, "grad_norm", abs(rng.gauss(1.0, 0.2))),
        ]
    return points


def stream(client: Client, run_id: int) -> int:
    rng = random.Random(0)
    pending: dict[int, list[wire.Point]] = {rank: [] for rank in range(RANKS)}
    seq = dict.fromkeys(range(RANKS), 0)
    sent = 0
    start = time.time() - STEPS * 0.3
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("streaming a synthetic run", total=STEPS)
        for step in range(STEPS):
            for rank in range(RANKS):
                pending[rank] += synthetic_step(step, rank, rng, start + step * 0.3)
                if step % FLUSH_EVERY == FLUSH_EVERY - 1 or step == STEPS - 1:
                    reply = client.ingest(run_id, pending[rank], seq=seq[rank], rank=rank)
                    sent += reply["accepted"]
                    seq[rank] += 1
                    pending[rank] = []
            progress.advance(task)
    # An agent that lost its connection replays a batch: acknowledged, not stored twice.
    replay = client.ingest(run_id, synthetic_step(0, 0, rng, start), seq=0)
    console.print(f"replayed batch 0 of rank 0 -> duplicate={replay['duplicate']}")
    return sent


def show(client: Client, run_id: int) -> None:
    runs = Table("id", "project", "name", "state", "tags", title="GET /api/v1/runs")
    for r in client.runs():
        runs.add_row(str(r["id"]), r["project"], r["name"], r["state"], ",".join(r["tags"]))
    console.print(runs)

    series = Table("key", "rank", "points", "last step", "last value", title="GET .../series")
    for s in client.series(run_id):
        series.add_row(
            s["key"],
            str(s["rank"]),
            str(s["n_points"]),
            str(s["last_step"]),
            format_number(s["last_value"]),
        )
    console.print(series)

    loss = client.metrics(run_id, "loss", max_points=12)
    console.print(bucket_table(loss["buckets"], title="GET .../metrics?key=loss&max_points=12"))

    around = client.metrics(run_id, "loss", start=NAN_STEP - 2, end=NAN_STEP + 2)
    raw = Table("step", "loss", title=f"loss around step {NAN_STEP}")
    for step, _, value in around["points"]:
        raw.add_row(str(step), format_number(value))
    console.print(raw)

    latest = client.latest(run_id)
    console.print(
        "GET .../latest: "
        + ", ".join(
            f"{k}={format_number(v['value'])} @ {v['step']}" for k, v in sorted(latest.items())
        )
    )


def main() -> None:
    workdir = Path(".demo")
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir()
    db = f"sqlite:///{workdir / 'runwatch.db'}"
    with ServerThread(Settings(db=db, host="127.0.0.1", port=0)) as server:
        console.print(f"[bold]runwatch collector[/] on {server.url}")
        console.print(f"database {db}")
        with Client(server.url, api_key="") as client:
            run = client.create_run(
                "demo", "synthetic", config={"lr": 3e-4, "ranks": RANKS}, tags=["demo"]
            )
            sent = stream(client, run["id"])
            client.finish_run(run["id"], "finished")
            console.print(f"streamed {sent} points from {RANKS} ranks into run {run['id']}\n")
            show(client, run["id"])
    console.print(
        "\nThe data stay in .demo/runwatch.db. Explore them with:\n"
        "  .venv/bin/runwatch server --db sqlite:///.demo/runwatch.db &\n"
        "  .venv/bin/runwatch runs show demo/synthetic\n"
        "  .venv/bin/runwatch metrics get demo/synthetic loss --max-points 20"
    )


if __name__ == "__main__":
    main()
