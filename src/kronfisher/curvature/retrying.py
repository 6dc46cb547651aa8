"""A damped factorisation retried with more damping where the damped matrix is singular."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

from ..linalg import SingularFactorError
from .block import Reporter


class _Damped(Protocol):
    damping: float  # the damping a factorisation was actually built with


F = TypeVar("F", bound=_Damped)

__all__ = ["factorize_retrying", "SINGULAR_RETRIES", "RETRY_MIN_DAMPING"]

SINGULAR_RETRIES = 3
"""Retries with 10× the damping after a SingularFactorError (λ, 10λ, 100λ, 1000λ)."""
RETRY_MIN_DAMPING = 1e-8
"""Damping of the first retry when the damping was 0."""


def factorize_retrying(name: str, build: Callable[[float], F], damping: float, log: Reporter
                       ) -> F:
    """``build(damping)``, retried with more damping where the damped matrix is singular.

    For every block whose factorisation raises :class:`SingularFactorError` on a singular
    damped matrix (the Kronecker sums, an embedding's diagonal-A sum, the scale-and-shift
    2×2 blocks). Retried with 10× the damping (at least 1e-8), up to three times; the
    factorisation records the damping it was actually built with. Retries, and clamped
    two-term eigenvalues of a result that counts them (``clamped``), are reported to
    ``log`` under layer ``name``.

    Raises:
        SingularFactorError: still singular after the retries (naming the layer).
    """
    lam = damping
    fac: F | None = None
    for attempt in range(SINGULAR_RETRIES + 1):
        try:
            fac = build(lam)
            break
        except SingularFactorError as e:
            if attempt == SINGULAR_RETRIES:
                raise SingularFactorError(
                    f"layer {name!r}: cannot factorise the damped curvature even with"
                    f" damping {lam:g}: {e}"
                ) from e
            lam = max(lam * 10.0, RETRY_MIN_DAMPING)
            log.report(name, "singular_retry",
                       f"layer {name!r}: {e}; retrying with damping {lam:g}",
                       stacklevel=7)
    if fac is None:  # the loop either breaks with one or raises
        raise RuntimeError(f"layer {name!r}: no factorisation")
    clamped = getattr(fac, "clamped", 0)
    if clamped:
        log.report(name, "clamped", f"layer {name!r}: the two-term Kronecker"
                   f" approximation is not positive definite in {clamped} direction(s)"
                   f" at damping {fac.damping:g}: 1 + s_g s_a raised to the floor there",
                   stacklevel=7)
    return fac
