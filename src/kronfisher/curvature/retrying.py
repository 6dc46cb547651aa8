"""A damped factorisation retried with more damping where the damped matrix is singular."""

from __future__ import annotations

from typing import Any

from ..linalg import KroneckerFactorization, SingularFactorError
from .block import Reporter

__all__ = ["factorize_retrying", "SINGULAR_RETRIES", "RETRY_MIN_DAMPING"]

SINGULAR_RETRIES = 3
"""Retries with 10× the damping after a SingularFactorError (λ, 10λ, 100λ, 1000λ)."""
RETRY_MIN_DAMPING = 1e-8
"""Damping of the first retry when the damping was 0."""


def factorize_retrying(name: str, source: Any, damping: float, scheme: str, log: Reporter
                       ) -> KroneckerFactorization:
    """``source.factorize(damping, scheme, warn=False)``, retried on a singular matrix.

    For every curvature whose ``factorize`` returns a :class:`KroneckerFactorization`
    (a :class:`KroneckerSum`, an embedding's diagonal-A sum). A singular damped matrix is
    retried with 10× the damping (at least 1e-8), up to three times; the factorisation
    records the damping it was actually built with. Retries and clamped two-term
    eigenvalues are reported to ``log`` under layer ``name``.

    Raises:
        SingularFactorError: still singular after the retries (naming the layer).
    """
    lam = damping
    fac: KroneckerFactorization | None = None
    for attempt in range(SINGULAR_RETRIES + 1):
        try:
            fac = source.factorize(lam, scheme, warn=False)
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
    if fac.clamped:
        log.report(name, "clamped", f"layer {name!r}: the two-term Kronecker"
                   f" approximation is not positive definite in {fac.clamped} direction(s)"
                   f" at damping {fac.damping:g}: 1 + s_g s_a raised to the floor there",
                   stacklevel=7)
    return fac
