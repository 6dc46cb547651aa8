"""How a preconditioner runs data parallel: the ``process_group=`` argument, resolved.

``process_group`` may be

- ``None`` (default): the default group when ``torch.distributed.is_initialized()`` and
  it has more than one rank (or the group of a ``DistributedDataParallel`` model);
  single-process otherwise;
- ``"local"``: single-process even when torch.distributed is initialised (each rank
  keeps its own curvature; nothing is communicated);
- a ``torch.distributed.ProcessGroup``;
- a :class:`DistributedConfig`, for the options below.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist
from torch import nn

from .cost import CostModel

__all__ = ["DistributedConfig", "resolve_config", "unwrap_model", "ASSIGNMENTS", "STRATEGIES",
           "DEFAULT_TIMEOUT"]

ASSIGNMENTS = ("owner", "replicated")
STRATEGIES = ("auto", "gather", "krylov")
DEFAULT_TIMEOUT = 300.0
"""Seconds a single collective may take before :class:`CollectiveTimeout` (a first
curvature update of a large layer on a slow owner must fit in it)."""


@dataclass(frozen=True)
class DistributedConfig:
    """Options of data-parallel preconditioning.

    Attributes:
        group: the process group (None: the default group).
        assignment: "owner" (default): each layer's factorisation and preconditioned
            gradient are computed by one owner rank (balanced by a cost estimate) and
            broadcast (KAISA's idea); SVD layers gathered to an owner are estimated there.
            "replicated": every rank computes everything (the statistics are all-gathered
            or all-reduced), no broadcast of results.
        strategy: how the SVD-based methods reach the global optimum: "gather" ((a, g) to
            the owner, or to all ranks when replicated), "krylov" (the solver's products
            with R(F) all-reduced, one collective per product) or "auto" (per layer and
            curvature batch, the cheaper of the two under ``cost``).
        timeout: seconds each collective may take.
        cost: the machine constants of the cost model.
    """

    group: dist.ProcessGroup | None = None
    assignment: str = "owner"
    strategy: str = "auto"
    timeout: float = DEFAULT_TIMEOUT
    cost: CostModel = field(default_factory=CostModel)

    def __post_init__(self):
        if self.assignment not in ASSIGNMENTS:
            raise ValueError(f"assignment must be one of {ASSIGNMENTS}, got {self.assignment!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if not (isinstance(self.timeout, int | float) and self.timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds, got {self.timeout!r}")


def unwrap_model(model: nn.Module) -> tuple[nn.Module, dist.ProcessGroup | None]:
    """(the module a ``DistributedDataParallel`` wraps, its group) or (model, None)."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        return model.module, model.process_group
    return model, None


def resolve_config(process_group: object, ddp_group: dist.ProcessGroup | None
                   ) -> DistributedConfig | None:
    """The configuration ``process_group`` asks for, or None for single-process.

    Raises:
        TypeError: ``process_group`` is none of the accepted kinds.
        RuntimeError: a group or a configuration is given but torch.distributed is not
            initialised.
    """
    if isinstance(process_group, str):
        if process_group != "local":
            raise ValueError(f"process_group as a string must be 'local', got {process_group!r}")
        return None
    if process_group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        config = DistributedConfig(group=ddp_group)
    elif isinstance(process_group, DistributedConfig):
        config = process_group
        if config.group is None and ddp_group is not None:
            config = DistributedConfig(ddp_group, config.assignment, config.strategy,
                                       config.timeout, config.cost)
    elif dist.is_available() and isinstance(process_group, dist.ProcessGroup):
        config = DistributedConfig(group=process_group)
    else:
        raise TypeError("process_group must be None, 'local', a torch.distributed"
                        f" ProcessGroup or a DistributedConfig, got {type(process_group).__name__}")
    if not dist.is_initialized():
        raise RuntimeError("process_group given but torch.distributed is not initialised")
    if dist.get_world_size(config.group) == 1:
        return None
    return config
