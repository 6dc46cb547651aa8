"""Collectives of torch.distributed with a timeout on every one and a byte ledger.

Every collective is issued with ``async_op=True`` and waited on with the communicator's
timeout, so a peer that never arrives (it raised, it runs another number of steps, it
died) turns into :class:`CollectiveTimeout` naming the collective instead of a hang.

The ledger counts, per *purpose* (what the bytes are for: "kfac_factors",
"krylov_products", "gather_stats", ...), the calls, the payload this rank hands to the
collective and the bytes it puts on the wire under the usual ring algorithms (see
:func:`wire_bytes`), so that docs/distributed.md can report bytes per step per method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Communicator", "CollectiveTimeout", "ByteLedger", "LedgerEntry", "wire_bytes"]


class CollectiveTimeout(RuntimeError):
    """A collective did not complete within the communicator's timeout."""


def wire_bytes(kind: str, payload: int, world: int) -> float:
    """Bytes one rank sends for a collective of ``payload`` bytes (its own share).

    Ring all-reduce: 2(W − 1)/W · n; ring all-gather of n per rank: (W − 1) · n;
    broadcast (pipelined ring/tree): n for the root, at most n for every other rank (we
    count n); gather to one rank: n for every rank but the root, 0 for it (counted n on
    average: (W − 1)/W · n).
    """
    if world <= 1:
        return 0.0
    if kind == "all_reduce":
        return 2.0 * (world - 1) / world * payload
    if kind == "all_gather":
        return float(world - 1) * payload
    if kind == "gather":
        return (world - 1) / world * payload
    if kind == "broadcast":
        return float(payload)
    raise ValueError(f"unknown collective kind {kind!r}")


@dataclass
class LedgerEntry:
    """What one purpose cost so far on this rank.

    Attributes:
        calls: collectives issued.
        payload: bytes of the tensors this rank handed to them.
        wire: bytes this rank sent under :func:`wire_bytes`.
    """

    calls: int = 0
    payload: int = 0
    wire: float = 0.0


@dataclass
class ByteLedger:
    """Per-purpose :class:`LedgerEntry` records (reset with :meth:`clear`)."""

    entries: dict[str, LedgerEntry] = field(default_factory=dict)

    def add(self, purpose: str, kind: str, payload: int, world: int) -> None:
        """Record one collective of ``kind`` carrying ``payload`` bytes for ``purpose``."""
        e = self.entries.setdefault(purpose, LedgerEntry())
        e.calls += 1
        e.payload += payload
        e.wire += wire_bytes(kind, payload, world)

    def total_wire(self) -> float:
        """Wire bytes of every purpose."""
        return sum(e.wire for e in self.entries.values())

    def snapshot(self) -> dict[str, LedgerEntry]:
        """A copy of the entries."""
        return {k: LedgerEntry(e.calls, e.payload, e.wire) for k, e in self.entries.items()}

    def clear(self) -> None:
        """Forget every record."""
        self.entries = {}


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


class Communicator:
    """One process group, this rank's place in it, a timeout and the byte ledger.

    Args:
        group: a ``torch.distributed`` process group, or None for the default group.
        timeout: seconds any single collective may take.

    Raises:
        RuntimeError: torch.distributed is not initialised.
    """

    def __init__(self, group: dist.ProcessGroup | None, timeout: float):
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: call"
                               " torch.distributed.init_process_group first (or use torchrun)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.timeout = float(timeout)
        self.ledger = ByteLedger()
        backend = dist.get_backend(group)
        # NCCL needs tensors on the GPU; gloo on the CPU
        self.device = (torch.device("cuda", torch.cuda.current_device())
                       if backend == "nccl" else torch.device("cpu"))

    def _global(self, rank: int) -> int:
        """The global rank of ``rank`` in this group (collectives take global ranks)."""
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def _wait(self, work, what: str) -> None:
        try:
            ok = work.wait(timedelta(seconds=self.timeout))
        except RuntimeError as e:  # gloo raises on timeout; a dead peer raises too
            raise CollectiveTimeout(
                f"{what} did not complete within {self.timeout:g} s on rank {self.rank} of"
                f" {self.world} (a peer raised, died, or runs another sequence of steps):"
                f" {e}") from e
        if ok is False:
            raise CollectiveTimeout(f"{what} did not complete within {self.timeout:g} s on"
                                    f" rank {self.rank} of {self.world}")

    def _out(self, t: Tensor) -> Tensor:
        return t.to(self.device) if t.device != self.device else t

    def all_reduce(self, t: Tensor, purpose: str, op: str = "sum") -> Tensor:
        """Σ (or max, with ``op="max"``) of ``t`` over the ranks, as a new tensor."""
        buf = self._out(t).clone().contiguous()
        reduce_op = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
        self._wait(dist.all_reduce(buf, op=reduce_op, group=self.group, async_op=True),
                   f"all_reduce({purpose})")
        self.ledger.add(purpose, "all_reduce", _nbytes(buf), self.world)
        return buf.to(t.device)

    def all_gather(self, t: Tensor, purpose: str) -> list[Tensor]:
        """Every rank's ``t`` (same shape on every rank), in rank order."""
        buf = self._out(t).contiguous()
        out = [torch.empty_like(buf) for _ in range(self.world)]
        self._wait(dist.all_gather(out, buf, group=self.group, async_op=True),
                   f"all_gather({purpose})")
        self.ledger.add(purpose, "all_gather", _nbytes(buf), self.world)
        return [o.to(t.device) for o in out]

    def gather(self, t: Tensor, dst: int, purpose: str) -> list[Tensor] | None:
        """Every rank's ``t`` (same shape) on rank ``dst``, in rank order; None elsewhere."""
        buf = self._out(t).contiguous()
        out = [torch.empty_like(buf) for _ in range(self.world)] if self.rank == dst else None
        self._wait(dist.gather(buf, out, dst=self._global(dst), group=self.group,
                               async_op=True), f"gather({purpose})")
        self.ledger.add(purpose, "gather", _nbytes(buf), self.world)
        return None if out is None else [o.to(t.device) for o in out]

    def broadcast(self, t: Tensor, src: int, purpose: str) -> Tensor:
        """Rank ``src``'s ``t`` on every rank (``t`` gives the shape and dtype elsewhere)."""
        buf = self._out(t).clone().contiguous()
        self._wait(dist.broadcast(buf, src=self._global(src), group=self.group,
                                  async_op=True), f"broadcast({purpose})")
        self.ledger.add(purpose, "broadcast", _nbytes(buf), self.world)
        return buf.to(t.device)

    def all_gather_rows(self, t: Tensor, counts: list[int], purpose: str) -> list[Tensor]:
        """Every rank's ``t`` of ``counts[rank]`` rows (other dims equal), in rank order.

        Rows are padded to the largest count for the collective and trimmed after.
        """
        top = max(counts)
        pad = t.new_zeros((top - t.shape[0], *t.shape[1:]))
        full = torch.cat([t, pad]) if top > t.shape[0] else t
        return [x[:n] for x, n in zip(self.all_gather(full, purpose), counts)]

    def gather_rows(self, t: Tensor, counts: list[int], dst: int, purpose: str
                    ) -> list[Tensor] | None:
        """Like :meth:`all_gather_rows`, onto rank ``dst`` only (None elsewhere)."""
        top = max(counts)
        pad = t.new_zeros((top - t.shape[0], *t.shape[1:]))
        full = torch.cat([t, pad]) if top > t.shape[0] else t
        out = self.gather(full, dst, purpose)
        return None if out is None else [x[:n] for x, n in zip(out, counts)]

    def all_gather_text(self, text: str, purpose: str) -> list[str]:
        """Every rank's string (messages on a failure), with the same timeout as the rest."""
        data = torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)
        n = torch.tensor([data.numel()], dtype=torch.int64)
        counts = [int(c) for c in self.all_gather(n, purpose)]
        parts = self.all_gather_rows(data, counts, purpose)
        return [bytes(p.tolist()).decode("utf-8", "replace") for p in parts]
