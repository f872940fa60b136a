"""Where this process sits in a ``torch.distributed`` job, read without importing torch.

The agent must not import torch just to learn that there is no process group,
so it looks at ``sys.modules`` first and falls back on the variables that
``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``).
"""

from __future__ import annotations

import os
import sys
from typing import NamedTuple

from runwatch import wire


class Placement(NamedTuple):
    rank: int
    world_size: int
    local_rank: int


def placement() -> Placement:
    """This process's rank, world size and local rank; ``(0, 1, 0)`` outside a job."""
    dist = _initialized_dist()
    if dist is not None:
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        return Placement(dist.get_rank(), dist.get_world_size(), local)
    env = os.environ
    return Placement(
        int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))
    )


def agreed_name(name: str | None) -> str:
    """The run name every rank uses: the given one, else one rank 0 makes and broadcasts.

    With no process group yet, ranks started by torchrun share ``TORCHELASTIC_RUN_ID``.
    The broadcast is a collective: every rank calls ``init`` at the same point of the
    script, as it does for ``init_process_group``.
    """
    if name:
        return name
    made = wire.generated_run_name()
    dist = _initialized_dist()
    if dist is not None and dist.get_world_size() > 1:
        box = [made]
        dist.broadcast_object_list(box, src=0)
        return str(box[0])
    elastic = os.environ.get("TORCHELASTIC_RUN_ID")
    if elastic and elastic != "none" and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        return f"run-{elastic}"
    return made


def local_gpu(local_rank: int, world_size: int) -> list[int] | None:
    """NVML indices this rank should sample: its own GPU in a job, every GPU alone."""
    if world_size <= 1:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    if ids and local_rank < len(ids):
        return [int(ids[local_rank])] if ids[local_rank].isdigit() else None
    return [local_rank]


def _initialized_dist():  # type: ignore[no-untyped-def]
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist
    return None
