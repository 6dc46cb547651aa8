"""Repeated warnings summarised: the first one per layer and kind is shown, all are counted.

A condition that holds at every refactorisation (a two-term approximation that is not
positive definite in some directions, a damping retried because a factor is singular, a
solver that fell back to another) would otherwise print the same warning dozens of times
per run. :class:`WarningLog` shows it once per (layer, kind) and counts every occurrence;
a preconditioner exposes the counts as ``precond.warning_counts``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

__all__ = ["WarningLog", "WARNING_KINDS"]

WARNING_KINDS = ("clamped", "singular_retry", "solver_fallback", "curvature_kept",
                 "only_padding")
"""clamped: 1 + s_g s_a raised to the floor (two terms not positive definite);
singular_retry: a damped factor was singular, retried with 10× the damping;
solver_fallback: the nearest-Kronecker solver failed (LAPACK) and another one was used;
curvature_kept: every solver failed, the layer kept its previous curvature (or, with none
yet, KFAC's factors); only_padding: an embedding's curvature batch held padding tokens
only and was dropped for that layer."""


@dataclass
class WarningLog:
    """Counts of summarised warnings, by (layer name, kind).

    Attributes:
        counts: occurrences so far of each (layer, kind); kinds from :data:`WARNING_KINDS`.
    """

    counts: dict[tuple[str, str], int] = field(default_factory=dict)

    def report(self, layer: str, kind: str, message: str, stacklevel: int = 2) -> None:
        """Count one occurrence; warn (RuntimeWarning) only the first time for (layer, kind).

        Raises:
            ValueError: ``kind`` not in :data:`WARNING_KINDS`.
        """
        if kind not in WARNING_KINDS:
            raise ValueError(f"unknown warning kind {kind!r}; choose from {WARNING_KINDS}")
        key = (layer, kind)
        n = self.counts.get(key, 0) + 1
        self.counts[key] = n
        if n == 1:
            warnings.warn(
                f"{message} (shown once for this layer; later occurrences are counted in"
                f" precond.warning_counts[({layer!r}, {kind!r})])",
                RuntimeWarning,
                stacklevel=stacklevel + 1,
            )

    def count(self, layer: str, kind: str) -> int:
        """Occurrences of (layer, kind) so far (0 if none)."""
        return self.counts.get((layer, kind), 0)
