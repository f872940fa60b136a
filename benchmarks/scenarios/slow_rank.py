"""``slow_rank``: two DDP ranks (gloo, CPU); from the onset rank 1 takes twice as long a step.

Two processes (``torch.multiprocessing``, spawn, a free ``MASTER_PORT`` on loopback) train
the healthy TinyLM under ``DistributedDataParallel``, each on its own data order, each
calling ``setup.init()`` after ``init_process_group`` (one run, two ranks; rank 0 sends the
training scalars). From step ``onset`` rank 1 sleeps an extra step time (25 ms, +100 %)
before each batch reaches its model, as a rank on a slow host or behind a slow input
pipeline would. Gradient all-reduce makes rank 0 wait for it inside ``backward()``, so both
ranks' ``train/step_time`` doubles, while ``train/data_wait`` rises on rank 1 only: the rank
to blame is visible per rank. (A rank slowed inside its own forward/backward would double
every rank's step time in the same way, but nothing the agent records per rank would name
it.) Rank 0 reports the outcome through a file.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from benchmarks.collector_process import free_port
from benchmarks.scenarios.base import PACE_S, AgentSetup, Outcome, Scenario
from benchmarks.scenarios.loop import Stream, lm_model, lm_stream, lm_val_batch, train_loop

STEPS = 300
ONSET = 150
WORLD = 2
SLOW_RANK = 1
LAUNCH_TIMEOUT = 240.0


def slowed(stream: Stream, onset: int, extra_s: float) -> Stream:
    """``stream``, sleeping ``extra_s`` before yielding each batch from ``onset`` on."""
    for index, batch in enumerate(stream):
        if index >= onset:
            time.sleep(extra_s)
        yield batch


def _rank(
    rank: int,
    port: int,
    setup: AgentSetup,
    seed: int,
    steps: int,
    onset: int,
    pace_s: float,
    threads: int,
    result: str,
) -> None:
    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        run = setup.init()
        try:
            model, optimizer, scheduler = lm_model(seed, total=steps)
            stream = lm_stream(seed * WORLD + rank)
            if rank == SLOW_RANK:
                stream = slowed(stream, onset, extra_s=pace_s)
            trace = train_loop(
                run,
                model=nn.parallel.DistributedDataParallel(model),
                optimizer=optimizer,
                scheduler=scheduler,
                stream=stream,
                val_batch=lm_val_batch(),
                steps=steps,
                pace_s=pace_s,
            )
            run.flush(30)
            dist.barrier()  # rank 0 ends the run only after every rank delivered
        finally:
            run.finish()
        if rank == 0:
            effect = (
                f"step {trace.step_ms(onset - 50, onset):.0f}->"
                f"{trace.step_ms(onset + 10, steps):.0f} ms (rank 0)"
            )
            outcome = trace.outcome(onset, effect)
            Path(result).write_text(json.dumps(outcome.to_json()))
    finally:
        dist.destroy_process_group()


def scenario(
    *, steps: int = STEPS, onset: int = ONSET, pace_s: float = PACE_S, threads: int = 1
) -> Scenario:
    def launch(setup: AgentSetup, seed: int) -> Outcome:
        with tempfile.TemporaryDirectory(prefix="runwatch-slow-rank-") as tmp:
            result = Path(tmp) / "outcome.json"
            args = (free_port(), setup, seed, steps, onset, pace_s, threads, str(result))
            context = mp.start_processes(
                _rank, args=args, nprocs=WORLD, start_method="spawn", join=False
            )
            deadline = time.monotonic() + LAUNCH_TIMEOUT
            try:
                while not context.join(timeout=1.0):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"ranks still running after {LAUNCH_TIMEOUT:.0f} s")
            finally:
                for process in context.processes:
                    if process.is_alive():
                        process.terminate()
                        process.join(5)
            return Outcome.from_json(json.loads(result.read_text()))

    return Scenario(
        "slow_rank",
        f"rank 1 of {WORLD} (DDP) +100 % step time",
        steps,
        onset,
        launch=launch,
    )
