"""Is the curvature at the objective's scale? vᵀF̂v against the exact GGN vᵀJᵀHJv.

For each registered layer and a few random directions v supported on that layer's
parameters only (unit Frobenius norm as (d_g, d_a) matrices [W b]):

* vᵀF̂v: the preconditioner's current curvature, undamped (:meth:`KroneckerSum.matvec`;
  ExactNG's dense block);
* vᵀJᵀHJv: the exact GGN of ``loss_fn`` at the current parameters: Jv by one
  forward-mode JVP of the model along v (``torch.func.functional_call`` +
  ``torch.func.jvp``), then H(Jv) by differentiating ``torch.func.grad(loss_fn)`` at the
  outputs (the loss's Hessian with respect to the outputs, for any loss written in torch
  ops). That second product is a VJP (H is symmetric), not a JVP: forward mode through
  ``mse_loss``'s backward fails in torch 2.13 ("ZeroTensors are immutable"), and on the
  outputs alone the reverse pass is as cheap;
* their ratio, and λ / λ_max(F̂) (λ: the preconditioner's damping; λ_max: the
  largest-magnitude eigenvalue of F̂, exact for one Kronecker term as a product of the
  factors' extreme eigenvalues, by a few Lanczos steps on the matvec for two or more).

A ratio near 1 says the curvature is the objective's Fisher (up to the Kronecker
approximation and the curvature batch's sampling noise); a curvature batch scaled by c
where √c was due (DESIGN.md §2) shows up as a ratio c, e.g. 1/784 on CURVES under the
``paper`` preset.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp

from .curvature import ScaleShiftCurvature
from .layers import LayerAdapter
from .linalg import KroneckerSum
from .linalg.diagonal_kronecker import DiagonalKroneckerSum
from .preconditioner import Preconditioner

__all__ = ["LayerScaleRow", "curvature_scale", "format_table", "random_directions",
           "curvature_quadratic_form", "ggn_quadratic_form", "top_eigenvalue",
           "LANCZOS_STEPS", "LANCZOS_RTOL"]

LANCZOS_STEPS = 40
"""Cap of Lanczos steps (one matvec each) for λ_max of a sum of two or more Kronecker
products; the extreme Ritz value of a Fisher-like spectrum settles in ~10–20."""
LANCZOS_RTOL = 1e-8
"""Lanczos stops when the extreme Ritz value changes by less than this, relative (it
converges from below, faster than the Rayleigh quotient of power iteration)."""


@dataclass(frozen=True)
class LayerScaleRow:
    """One layer's comparison (see the module docstring).

    Attributes:
        layer: the layer's module name.
        n_params: d_g·d_a, the size of its parameter matrix [W b].
        curvature_quad: vᵀF̂v for each direction v.
        ggn_quad: vᵀJᵀHJv for the same directions.
        damping: the preconditioner's damping λ.
        curvature_top: λ_max(F̂), the largest-magnitude eigenvalue of the undamped curvature.
    """

    layer: str
    n_params: int
    curvature_quad: tuple[float, ...]
    ggn_quad: tuple[float, ...]
    damping: float
    curvature_top: float

    @property
    def ratios(self) -> tuple[float, ...]:
        """vᵀF̂v / vᵀJᵀHJv per direction (inf where the GGN form is 0)."""
        return tuple(c / g if g else math.inf for c, g in zip(self.curvature_quad,
                                                               self.ggn_quad))

    @property
    def ratio(self) -> float:
        """Σ vᵀF̂v / Σ vᵀJᵀHJv over the directions."""
        g = sum(self.ggn_quad)
        return sum(self.curvature_quad) / g if g else math.inf

    @property
    def damping_ratio(self) -> float:
        """λ / λ_max(F̂) (inf for a zero curvature)."""
        return self.damping / self.curvature_top if self.curvature_top else math.inf


def random_directions(shape: tuple[int, int], n: int, *, generator: torch.Generator | None,
                      dtype: torch.dtype, device: torch.device | str = "cpu") -> Tensor:
    """Random directions: n Gaussian (d_g, d_a) matrices of unit Frobenius norm, (n, d_g, d_a).

    Drawn in float64 on the CPU (so a generator gives the same directions everywhere),
    then cast to ``dtype`` and moved to ``device``.
    """
    V = torch.randn((n, *shape), generator=generator, dtype=torch.float64)
    V = V / V.flatten(1).norm(dim=1)[:, None, None]
    return V.to(dtype=dtype, device=device)


def curvature_quadratic_form(
        curvature: KroneckerSum | DiagonalKroneckerSum | ScaleShiftCurvature | Tensor,
        V: Tensor) -> Tensor:
    """vec(V)ᵀ F̂ vec(V) for each V in (n, d_g, d_a), in float64.

    ``curvature``: a :class:`KroneckerSum` (Σ ⟨V, G_k V A_kᵀ⟩), an embedding's
    :class:`DiagonalKroneckerSum`, a scale-and-shift layer's per-feature blocks, or a dense
    block in the column-stacking vec convention (ExactNG).
    """
    V = V.double()
    if isinstance(curvature, ScaleShiftCurvature):  # Σ_j V_jᵀ F_j V_j, V_j = row j of V
        return torch.einsum("ncp,cpq,ncq->n", V, curvature.blocks.double(), V)
    if isinstance(curvature, KroneckerSum | DiagonalKroneckerSum):
        ks = type(curvature)([(A.double(), G.double()) for A, G in curvature.terms])
        return (V * ks.matvec(V)).flatten(1).sum(1)
    v = V.mT.flatten(1)  # vec(V) = V.T.reshape(-1)
    return ((v @ curvature.double()) * v).sum(1)


def top_eigenvalue(curvature: KroneckerSum | DiagonalKroneckerSum | ScaleShiftCurvature
                   | Tensor, *,
                   generator: torch.Generator | None = None,
                   steps: int = LANCZOS_STEPS) -> float:
    """The largest-magnitude eigenvalue of the undamped curvature (float64).

    One Kronecker term: the extreme eigenvalues of A and G give it exactly (the spectrum
    of A ⊗ G is their products); a dense block: ``eigvalsh``; two or more terms: symmetric
    Lanczos on :meth:`KroneckerSum.matvec` from a random start (``generator``), with full
    reorthogonalisation, stopped when the extreme Ritz value changes by < LANCZOS_RTOL.
    """
    if isinstance(curvature, ScaleShiftCurvature):  # the blocks' eigenvalues are F̂'s
        return float(torch.linalg.eigvalsh(curvature.blocks.double()).abs().max())
    if not isinstance(curvature, KroneckerSum | DiagonalKroneckerSum):
        return float(torch.linalg.eigvalsh(curvature.double()).abs().max())
    terms = [(A.double(), G.double()) for A, G in curvature.terms]
    if len(terms) == 1:
        A0 = terms[0][0]  # an embedding's A is the vector of its diagonal
        ea = A0.sort().values if A0.ndim == 1 else torch.linalg.eigvalsh(A0)
        eg = torch.linalg.eigvalsh(terms[0][1])
        products = torch.stack([ea[0] * eg[0], ea[0] * eg[-1], ea[-1] * eg[0], ea[-1] * eg[-1]])
        return float(products.abs().max())
    ks = type(curvature)(terms)
    d_g, d_a = ks.shape
    steps = min(steps, d_g * d_a)
    basis = torch.empty((steps, d_g * d_a), dtype=torch.float64, device=terms[0][0].device)
    basis[0] = random_directions(ks.shape, 1, generator=generator, dtype=torch.float64,
                                 device=basis.device)[0].reshape(-1)
    T = torch.zeros(steps, steps, dtype=torch.float64)
    top = 0.0
    for j in range(steps):
        w = ks.matvec(basis[j].reshape(d_g, d_a)).reshape(-1)
        Q = basis[: j + 1]
        coef = Q @ w
        T[j, j] = coef[j]  # α_j; the other coefficients are β_{j-1} and rounding
        w = w - Q.mT @ coef
        w = w - Q.mT @ (Q @ w)  # full reorthogonalisation, a second pass
        new = float(torch.linalg.eigvalsh(T[: j + 1, : j + 1]).abs().max())
        beta = float(w.norm())
        if beta <= 1e-14 * max(new, 1e-300) or (j and abs(new - top) <= LANCZOS_RTOL * new):
            return new
        top = new
        if j + 1 < steps:
            T[j, j + 1] = T[j + 1, j] = beta
            basis[j + 1] = w / beta
    return top


def ggn_quadratic_form(model: nn.Module, inputs: Tensor, loss_fn: Callable[[Tensor], Tensor],
                       module: nn.Module, adapter: LayerAdapter, V: Tensor) -> Tensor:
    """vᵀJᵀHJv for each V in (n, d_g, d_a), v supported on ``module``'s parameters.

    Args:
        model: the network (called as ``model(inputs)``).
        inputs: the batch.
        loss_fn: the training objective as a function of the model's outputs on
            ``inputs`` (targets closed over), a scalar; H is its Hessian.
        module: a registered layer of ``model``.
        adapter: its adapter (the [W b] layout).
        V: directions as (n, d_g, d_a) matrices [W b].

    Returns:
        (n,) float64: ⟨Jv, H Jv⟩ with Jv by ``torch.func.jvp`` of the model and H Jv by a
        VJP of ``torch.func.grad(loss_fn)`` (module docstring).

    Raises:
        ValueError: ``module``'s parameters are not parameters of ``model``.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    params = adapter.params()
    if not all(id(p) in names for p in params):
        raise ValueError(f"{type(module).__name__}'s parameters are not in the model")
    keys = [names[id(p)] for p in params]
    primals = tuple(p.detach() for p in params)

    def outputs(*ps: Tensor) -> Tensor:
        return functional_call(model, dict(zip(keys, ps)), (inputs,))

    out = []
    with torch.no_grad():
        for Vi in V:
            tangents = tuple(t.to(p.dtype) for t, p in
                             zip(adapter.split_matrix(Vi), primals))
            forward = jvp(outputs, primals, tangents)  # (outputs, J v)
            y, Jv = forward[0], forward[1]
            HJv = vjp(grad(loss_fn), y)[1](Jv)[0]  # H symmetric: vjp = H (J v)
            out.append((Jv.double() * HJv.double()).sum())
    return torch.stack(out)


def curvature_scale(preconditioner: Preconditioner, model: nn.Module, inputs: Tensor,
                    loss_fn: Callable[[Tensor], Tensor], n_vectors: int = 4,
                    generator: torch.Generator | None = None) -> list[LayerScaleRow]:
    """Per registered layer: vᵀF̂v against vᵀJᵀHJv for ``n_vectors`` random v, and λ/λ_max(F̂).

    Args:
        preconditioner: any preconditioner with a current curvature for every layer
            (after a ``collect()`` and a ``step()``).
        model: its model, at the parameters to measure at.
        inputs: the batch the GGN is computed on (use the curvature batch's inputs).
        loss_fn: the training objective as a function of ``model(inputs)``, e.g.
            ``lambda out: F.binary_cross_entropy_with_logits(out, x)``.
        n_vectors: directions per layer.
        generator: for the directions (and the Lanczos start).

    Returns:
        One :class:`LayerScaleRow` per registered layer, in registration order.

    Raises:
        ValueError: ``n_vectors`` < 1, or a layer has no curvature yet.
    """
    if not (isinstance(n_vectors, int) and n_vectors >= 1):
        raise ValueError(f"n_vectors must be an integer >= 1, got {n_vectors!r}")
    rows = []
    for name, s in preconditioner.layers.items():
        curvature = s.curvature
        if curvature is None:
            raise ValueError(f"layer {name!r} has no curvature yet: backward a curvature loss"
                             " inside collect() and call step() first")
        params = s.adapter.params()
        w = params[0]
        shape = s.adapter.layout.shape  # (d_g, d_a) of Θ
        V = random_directions(shape, n_vectors, generator=generator, dtype=w.dtype,
                              device=w.device)
        rows.append(LayerScaleRow(
            layer=name, n_params=shape[0] * shape[1],
            curvature_quad=tuple(curvature_quadratic_form(curvature, V).tolist()),
            ggn_quad=tuple(ggn_quadratic_form(model, inputs, loss_fn, s.module, s.adapter,
                                              V).tolist()),
            damping=float(preconditioner.damping),
            curvature_top=top_eigenvalue(curvature, generator=generator)))
    return rows


def format_table(rows: list[LayerScaleRow]) -> str:
    """A plain-text table of ``rows``: means over the directions, the ratio's range, λ/λ_max."""
    head = (f"{'layer':>8s} {'params':>8s} {'vᵀF̂v':>11s} {'vᵀJᵀHJv':>11s} {'ratio':>10s}"
            f" {'ratio range':>21s} {'λ':>9s} {'λ/λmax(F̂)':>11s}")
    lines = [head]
    for r in rows:
        lo, hi = min(r.ratios), max(r.ratios)
        n = len(r.ggn_quad)
        lines.append(
            f"{r.layer:>8s} {r.n_params:8d} {sum(r.curvature_quad) / n:11.4g}"
            f" {sum(r.ggn_quad) / n:11.4g} {r.ratio:10.4g} {f'{lo:.3g} … {hi:.3g}':>21s}"
            f" {r.damping:9.3g} {r.damping_ratio:11.4g}")
    return "\n".join(lines)
