"""Per-rank random generators that one process can reproduce.

Rank w of a data-parallel run draws its sampled targets (and anything else random per
shard) from ``shard_generator(seed, w)``: a CPU ``torch.Generator`` seeded with
``seed * SHARD_STRIDE + w``. A single process reproduces the run on the concatenated
batch by drawing shard w's samples from ``shard_generator(seed, w)`` in rank order.
"""

from __future__ import annotations

import torch

__all__ = ["shard_generator", "SHARD_STRIDE"]

SHARD_STRIDE = 1_000_003
"""A prime larger than any world size: (seed, rank) pairs never share a stream seed."""


def shard_generator(seed: int, rank: int, device: str | torch.device = "cpu"
                    ) -> torch.Generator:
    """The generator of shard ``rank`` under ``seed`` (see the module docstring).

    Raises:
        ValueError: a negative seed or rank, or a rank ≥ :data:`SHARD_STRIDE`.
    """
    if seed < 0 or not 0 <= rank < SHARD_STRIDE:
        raise ValueError(f"seed must be >= 0 and 0 <= rank < {SHARD_STRIDE}, got {seed}, {rank}")
    return torch.Generator(device=device).manual_seed(seed * SHARD_STRIDE + rank)
