"""Data-parallel preconditioning on torch.distributed (gloo on CPU, NCCL on GPU).

Every preconditioner takes ``process_group=`` (:mod:`.config`); by default it is the
default group when ``torch.distributed.is_initialized()``, so ``kf.KPSVD(ddp_model,
damping=...)`` under ``torchrun`` gives on every rank the preconditioned gradients one
process computes on the concatenated batch. Files: :mod:`.comm` (collectives with
timeouts, byte ledger), :mod:`.agreement` (the per-step collective decision),
:mod:`.parallel` (the strategies), :mod:`.krylov` (all-reduced Krylov products),
:mod:`.cost` (the cost model, owner assignment), :mod:`.sync` (the seam and its
single-process default), :mod:`.seeding` (per-rank generators). See docs/distributed.md.
"""

from __future__ import annotations

from .agreement import CollectiveSkip
from .comm import ByteLedger, CollectiveTimeout, Communicator, LedgerEntry, wire_bytes
from .config import DistributedConfig, resolve_config, unwrap_model
from .cost import CostModel, LayerShape, assign_owners, choose_strategy
from .parallel import DataParallelSync
from .seeding import shard_generator
from .sync import LocalSync, RemoteFactorization

__all__ = ["DistributedConfig", "CostModel", "LayerShape", "DataParallelSync", "LocalSync",
           "Communicator", "CollectiveTimeout", "CollectiveSkip", "ByteLedger", "LedgerEntry",
           "RemoteFactorization", "wire_bytes", "choose_strategy", "assign_owners",
           "shard_generator", "make_sync", "unwrap_model"]


def make_sync(process_group: object, ddp_group, layers: dict, per_layer: bool, kind: str
              ) -> LocalSync | DataParallelSync:
    """The sync object of a preconditioner (collective model check when distributed).

    Args:
        process_group: the preconditioner's ``process_group=`` (see :mod:`.config`).
        ddp_group: the group of the ``DistributedDataParallel`` model, or None.
        layers: the registered layers.
        per_layer: whether layers can be preconditioned on different ranks.
        kind: the preconditioner's class and method settings (must agree across ranks).

    Raises:
        ValueError: the ranks registered different models (on every rank).
    """
    config = resolve_config(process_group, ddp_group)
    if config is None:
        return LocalSync()
    sync = DataParallelSync(config, layers, per_layer)
    sync.check_model(kind)
    return sync
