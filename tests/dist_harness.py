"""Run a function on W gloo processes (forked) with a FileStore and a hard deadline.

Used by tests/test_distributed*.py: every worker writes a JSON file of what it measured;
the test process reads them back and asserts. Nothing here can hang a test run: the
collectives carry the preconditioner's timeout and the processes are killed at the deadline.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

COLLECTIVE_TIMEOUT = 20.0
"""Seconds: the process group's own timeout (the preconditioners' is shorter in fault tests)."""


def _entry(fn, rank: int, world: int, tmp: str, args: tuple) -> None:
    torch.set_num_threads(1)
    out: dict = {}
    try:
        store = dist.FileStore(os.path.join(tmp, "store"), world)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                timeout=timedelta(seconds=COLLECTIVE_TIMEOUT))
        out = fn(rank, world, *args)
    except BaseException:  # report, never hang: the parent asserts on "error"
        out = {"error": traceback.format_exc()}
    Path(tmp, f"rank{rank}.json").write_text(json.dumps(out))
    os._exit(0)  # skip destroy_process_group: a peer may be gone after a fault test


def run_ranks(fn, world: int, tmp: Path, *args, deadline: float = 90.0) -> list[dict]:
    """fn(rank, world, *args) -> dict on ``world`` forked processes; their dicts in rank order."""
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_entry, args=(fn, r, world, str(tmp), args))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(deadline)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    results = []
    for r in range(world):
        f = tmp / f"rank{r}.json"
        results.append(json.loads(f.read_text()) if f.exists()
                       else {"error": f"rank {r} wrote nothing (killed at the deadline?)"})
    return results
