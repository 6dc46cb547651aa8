"""Numerical helpers shared by the linear algebra: symmetrising, finiteness, a robust eigh.

Nothing here knows about Kronecker products; every function is a small, exact building
block with its failure mode stated.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

__all__ = ["sym", "symmetrize_", "check_square", "all_finite", "eigh", "warn_once"]

EIGH_RETRY_JITTER = 1e-12
"""Relative diagonal shift of the last float64 eigh retry: far below float64 resolution of
any eigenvalue that matters, large enough to split the exactly repeated zeros on which
LAPACK's divide and conquer occasionally fails to converge."""

SYMMETRIZE_BLOCK = 256
"""Block size of :func:`symmetrize_`: large enough for BLAS-speed copies, small enough that
the transposed block stays in cache."""

_warned: set[str] = set()


def warn_once(key: str, message: str, stacklevel: int = 3) -> None:
    """Issue ``message`` as a RuntimeWarning the first time ``key`` is seen in this process."""
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)


def sym(x: Tensor) -> Tensor:
    """(x + xᵀ)/2 as a new tensor (x: (..., n, n))."""
    return 0.5 * (x + x.mT)


def symmetrize_(w: Tensor, block: int = SYMMETRIZE_BLOCK) -> Tensor:
    """W ← w + wᵀ in place (exactly symmetric), by blocks: no second d × d buffer.

    Fresh d × d buffers cost page faults on their first touch, about as much as the
    addition itself, so for large d the in-place form is markedly faster.

    Args:
        w: a square (d, d) matrix, overwritten.
        block: the block size (see :data:`SYMMETRIZE_BLOCK`).

    Returns:
        ``w`` itself.
    """
    d = w.shape[-1]
    for i in range(0, d, block):
        rows = slice(i, i + block)
        diag = w[rows, rows]
        diag.add_(diag.mT.clone())
        for j in range(i + block, d, block):
            cols = slice(j, j + block)
            upper, lower = w[rows, cols], w[cols, rows]
            upper.add_(lower.mT)
            lower.copy_(upper.mT)
    return w


def check_square(name: str, x: Tensor) -> None:
    """Raise ValueError unless ``x`` is a square matrix."""
    if x.ndim != 2 or x.shape[0] != x.shape[1]:
        raise ValueError(f"{name} must be a square matrix, got shape {tuple(x.shape)}")


def all_finite(x: Tensor) -> bool:
    """Whether every entry of ``x`` is finite, usually in one pass.

    A sum with a NaN or ±Inf term is never finite, so a finite sum proves every entry
    finite; otherwise check entrywise (the sum of finite entries may overflow).
    """
    if bool(torch.isfinite(x.sum())):
        return True
    return bool(torch.isfinite(x).all())


def eigh(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric eigendecomposition (ascending), retried in float64 if LAPACK fails.

    float32 ``syevd`` can fail to converge, or return NaN, on low-rank factors with many
    repeated zero eigenvalues (e.g. curvature from a batch smaller than the layer width).
    Such a failure (``torch.linalg.LinAlgError`` or a non-finite result) is retried in
    float64, then in float64 with a tiny diagonal jitter (removed from the eigenvalues);
    the first fallback in a process warns once. Other errors (out of memory, bad input)
    propagate.

    Args:
        x: a symmetric (n, n) matrix; only its lower triangle is read.

    Returns:
        (eigenvalues, eigenvectors) in ``x``'s dtype.

    Raises:
        ValueError: ``x`` has NaN or Inf entries (found after a failure).
        torch.linalg.LinAlgError: if even the jittered float64 retry fails or returns
            NaN/Inf.
    """
    try:
        vals, vecs = torch.linalg.eigh(x)
        if all_finite(vals) and all_finite(vecs):
            return vals, vecs
    except torch.linalg.LinAlgError:
        pass
    if not all_finite(x):
        raise ValueError(f"eigh of a {tuple(x.shape)} matrix with NaN or Inf entries")
    warn_once(
        "eigh-float64",
        f"{x.dtype} eigh failed or returned NaN on a {tuple(x.shape)} matrix; retrying in"
        " float64 (warned once per process)",
    )
    xd = x.double()
    try:
        vals, vecs = torch.linalg.eigh(xd)
        ok = all_finite(vals) and all_finite(vecs)
    except torch.linalg.LinAlgError:
        ok = False
    if not ok:
        jitter = EIGH_RETRY_JITTER * float(xd.diagonal().abs().max().clamp_min(1e-300))
        eye = torch.eye(x.shape[0], dtype=xd.dtype, device=x.device)
        vals, vecs = torch.linalg.eigh(xd + jitter * eye)
        if not (all_finite(vals) and all_finite(vecs)):
            raise torch.linalg.LinAlgError(
                f"eigh of a {tuple(x.shape)} matrix returned NaN/Inf even in float64 with"
                f" jitter {jitter:.3g}"
            )
        vals = vals - jitter
    return vals.to(x.dtype), vecs.to(x.dtype)
