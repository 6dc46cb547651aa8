"""The quadratic model of one step: exact GGN products by forward-mode JVPs, its solve, q.

Notation (docs/design.md, "The adaptive optimizer"): ∇ the gradient (weight decay
included), V = [v₁ … v_k] a few directions in parameter space (k ≤ 2: the preconditioned
gradient Δ and the previous step δ_prev), C the generalised Gauss–Newton matrix
Jᵀ H J of ``loss_fn`` at ``model(inputs)`` (J the Jacobian of the outputs with respect to
the parameters, H the Hessian of ``loss_fn`` with respect to the outputs), d = λ + η the
damping plus the weight decay. For a step δ = V c the model change is

    q(c) = cᵀ Vᵀ∇ + ½ cᵀ (VᵀCV + d VᵀV) c,

minimised by c = −(VᵀCV + d VᵀV)⁻¹ Vᵀ∇ where that matrix is positive definite.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from ..preconditioner import Preconditioner

__all__ = ["CurvatureGram", "QuadraticModel", "ModelSolution", "ggn_gram", "mean_gram",
           "inner", "OutputHessianFn", "solve_model", "approx_curvature_form", "layer_matrix",
           "SINGULAR_RTOL_EPS"]

SINGULAR_RTOL_EPS = 100.0
"""The 2×2, scaled to a unit diagonal, is treated as singular when its smallest eigenvalue
is ≤ this many machine epsilons (of the parameters' dtype) times its largest: its entries
are inner products computed in that dtype, so beyond that condition number the solve has
no correct digit left to trust."""

Params = Mapping[str, Tensor]


def inner(u: Params, v: Params) -> Tensor:
    """Σ_p ⟨u_p, v_p⟩ over the keys of ``u``: a 0-d float64 tensor.

    Each parameter's dot product is computed in the tensors' dtype (one BLAS dot, no
    copy: casting every parameter to float64 cost more than the JVPs on the MNIST
    auto-encoder), the sum over parameters in float64.
    """
    terms = [torch.dot(u[n].reshape(-1), v[n].reshape(-1).to(u[n].dtype)).double()
             for n in u]
    return torch.stack(terms).sum() if terms else torch.zeros((), dtype=torch.float64)


@dataclass(frozen=True)
class CurvatureGram:
    """The exact GGN between a few directions, and the loss, from one batch.

    Attributes:
        curvature: (k, k) float64 on the CPU, entry (i, j) = vᵢᵀ C vⱼ (symmetrised).
        grad: (k,) float64 on the CPU, vᵢᵀ∇L on ``inputs`` = ⟨∂L/∂outputs, J vᵢ⟩ (free:
            the output gradient is a by-product of the Hessian products).
        loss: L(θ) = ``loss_fn(model(inputs))`` (no weight-decay term), from the primal
            outputs of the JVPs.
    """

    curvature: Tensor
    grad: Tensor
    loss: float


OutputHessianFn = Callable[[Tensor, Tensor], Tensor]
"""(outputs, U) → H U for U of shape (k, *outputs.shape), e.g. a
:class:`kronfisher.losses.OutputHessian`."""


def ggn_gram(model: nn.Module, params: Params, inputs: Tensor | tuple,
             loss_fn: Callable[[Tensor], Tensor], vectors: Sequence[Params], *,
             output_hessian: OutputHessianFn | None = None) -> CurvatureGram:
    """VᵀCV for the exact GGN C of ``loss_fn`` at ``model(inputs)``, by forward mode.

    One forward pass of the model carries all k tangents at once (``torch.func.vmap`` of
    ``torch.func.jvp`` over the directions: the primal activations are computed once), so
    Jvᵢ costs about two matrix products per layer and direction. H (Jvᵢ) is the product
    of the derivative of ``torch.func.grad(loss_fn)`` at the outputs with Jvᵢ, so any
    loss works and its scale (mean or sum reduction) is the one the user wrote. Then
    (VᵀCV)ᵢⱼ = ⟨Jvᵢ, H Jvⱼ⟩.

    Args:
        model: the network; parameters not in ``params`` (and buffers) are held fixed.
        params: name → parameter (names as in ``model.named_parameters()``), the
            coordinates of the directions.
        inputs: the batch the curvature is evaluated on: the model's argument, or a tuple
            of its positional arguments.
        loss_fn: outputs → scalar loss, written with functions ``torch.func`` can
            differentiate (no ``.item()``, no in-place changes of captured tensors).
        vectors: k ≥ 1 directions, each a mapping with the keys of ``params`` and the
            parameters' shapes.
        output_hessian: None (H from ``loss_fn`` by autodiff), or the Hessian of
            ``loss_fn`` with respect to the outputs in closed form (a
            :class:`~kronfisher.losses.OutputHessian` matching ``loss_fn``): one elementwise
            pass instead of the second derivative, which on the auto-encoders costs about
            as much as the JVP's tangent pass. It must be the Hessian of ``loss_fn``: it is
            not checked against it.

    Returns:
        The (k, k) products and L(θ) on ``inputs``.

    Raises:
        ValueError: no direction, a direction with other keys or shapes, or a model whose
            output is not a single tensor, or a ``loss_fn`` that does not return a scalar,
            or an ``output_hessian`` whose result has another shape than its input.
    """
    if not vectors:
        raise ValueError("ggn_gram needs at least one direction")
    names = list(params)
    for i, v in enumerate(vectors):
        if set(v) != set(names):
            raise ValueError(f"direction {i} has keys {sorted(v)}, the parameters are"
                             f" {sorted(names)}")
        for n in names:
            if v[n].shape != params[n].shape:
                raise ValueError(f"direction {i}, parameter {n!r}: shape {tuple(v[n].shape)},"
                                 f" the parameter has {tuple(params[n].shape)}")
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    primals = {n: params[n].detach() for n in names}
    tangents = {n: torch.stack([v[n].detach().to(primals[n].dtype) for v in vectors])
                for n in names}

    def forward(p: dict[str, Tensor]) -> Tensor:
        out = functional_call(model, p, args, strict=False)
        if not isinstance(out, Tensor):
            raise ValueError(f"the model must return one tensor, got {type(out).__name__}")
        return out

    def push(t: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        pair = jvp(forward, (primals,), (t,))  # (outputs, J t); no auxiliary output
        return pair[0], pair[1]

    # randomness="same": a dropout mask is shared by all directions, as in one forward
    outputs, Jv = vmap(push, out_dims=(None, 0), randomness="same")(tangents)  # type: ignore[arg-type]
    outputs = outputs.detach()
    loss = loss_fn(outputs)
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError("loss_fn must return a scalar tensor")

    def loss_grad(o: Tensor) -> Tensor:
        return grad(lambda u: loss_fn(u).reshape(()))(o)

    if output_hessian is not None:
        output_grad = loss_grad(outputs)
        HJv = output_hessian(outputs, Jv)
        if HJv.shape != Jv.shape:
            raise ValueError(f"output_hessian returned shape {tuple(HJv.shape)} for"
                             f" directions of shape {tuple(Jv.shape)}")
    else:
        # H u as the VJP of grad(loss_fn) (H is symmetric), one backward graph for all k
        # directions. Forward-over-reverse (a JVP of the gradient) would be the same product
        # but fails in torch 2.13 for F.mse_loss ("ZeroTensors are immutable").
        pair = vjp(loss_grad, outputs)  # (∂L/∂outputs, u ↦ H u); no auxiliary output
        output_grad, hessian_product = pair[0], pair[1]
        HJv = vmap(hessian_product)(Jv)[0]
    k = len(vectors)
    flat_Jv = Jv.reshape(k, -1).double()
    gram = flat_Jv @ HJv.reshape(k, -1).double().mT
    gram = 0.5 * (gram + gram.mT)
    dots = flat_Jv @ output_grad.reshape(-1).double()
    return CurvatureGram(curvature=gram.cpu(), grad=dots.cpu(), loss=float(loss))


def mean_gram(gram: CurvatureGram, mean: Callable[[Tensor, str], Tensor]) -> CurvatureGram:
    """``gram`` with its curvature, gradient products and loss averaged by ``mean``.

    Data parallel, ``mean`` is the preconditioner's ``sync.mean_over_ranks`` (one
    all-reduce of k² + k + 1 numbers): each rank's gram is its shard's, and with equal
    shards of a loss averaged over the shard their mean is the concatenated batch's.
    """
    k = gram.grad.shape[0]
    packed = torch.cat([gram.curvature.reshape(-1), gram.grad,
                        torch.tensor([gram.loss], dtype=torch.float64)])
    out = mean(packed, "quadratic_model")
    return CurvatureGram(curvature=out[:k * k].reshape(k, k), grad=out[k * k:k * k + k],
                         loss=float(out[-1]))


@dataclass(frozen=True)
class QuadraticModel:
    """q(c) = cᵀb + ½ cᵀ(VᵀCV + d VᵀV)c over the coefficients c of δ = V c.

    Attributes:
        curvature: (k, k) float64, VᵀCV (the exact GGN, or any symmetric curvature).
        gram: (k, k) float64, VᵀV.
        grad: (k,) float64, b = Vᵀ∇.
    """

    curvature: Tensor
    gram: Tensor
    grad: Tensor

    def matrix(self, damping: float) -> Tensor:
        """VᵀCV + d·VᵀV, d = ``damping`` (λ + η)."""
        return self.curvature + damping * self.gram

    def value(self, coefficients: Sequence[float], damping: float) -> float:
        """q(c) for the coefficients c (length k) and the damping d."""
        c = torch.tensor(list(coefficients), dtype=torch.float64)
        return float(c @ self.grad + 0.5 * (c @ self.matrix(damping) @ c))


@dataclass(frozen=True)
class ModelSolution:
    """The step δ = −α Δ + μ δ_prev chosen from the quadratic model.

    Attributes:
        alpha: the learning rate α (coefficient of Δ is −α; α > 0 is a descent step).
        momentum: μ, the coefficient of δ_prev (0 without a previous step).
        q: the model change q(δ) (≤ 0 at a minimiser).
        fallback: the 2×2 was singular or not finite and the 1×1 was used (μ = 0, or the
            bound of ``momentum_range`` nearest 0).
    """

    alpha: float
    momentum: float
    q: float
    fallback: bool = False


def _one_by_one(model: QuadraticModel, damping: float, shift: float = 0.0) -> float | None:
    """c₀ = −(b₀ + shift)/A₀₀, or None if A₀₀ is not a positive finite number."""
    a = float(model.matrix(damping)[0, 0])
    b = float(model.grad[0]) + shift
    if not math.isfinite(b):
        return None
    if a == 0.0 and b == 0.0:  # zero gradient: the model's minimiser is no step
        return 0.0
    if not (math.isfinite(a) and a > 0.0):
        return None
    return -b / a


def solve_model(model: QuadraticModel, damping: float, *, momentum: float | None = None,
                momentum_range: tuple[float, float] | None = None,
                rtol: float = SINGULAR_RTOL_EPS * torch.finfo(torch.float32).eps
                ) -> ModelSolution | None:
    """Minimise q over the coefficients of δ = c₀Δ + c₁δ_prev (α = −c₀, μ = c₁).

    Args:
        model: a 1-direction ([Δ]) or 2-direction ([Δ, δ_prev]) model.
        damping: d = λ + η added as d·VᵀV.
        momentum: None: μ from the model too (the 2×2 solve); a number: μ fixed and only
            α from the model, c₀ = −(b₀ + A₀₁μ)/A₀₀. Ignored with one direction (μ = 0).
        momentum_range: (lo, hi) or None; with ``momentum`` None and two directions, the
            minimiser of q subject to lo ≤ μ ≤ hi: q minimised over α is a convex function
            of μ, so when the free μ (or the singular fallback's 0) lies outside, the
            constrained minimiser has μ at the nearer bound and α solved with it fixed.
        rtol: the 2×2 is singular when, scaled to a unit diagonal (so that the lengths of
            Δ and δ_prev do not matter), its eigenvalues satisfy λ_min ≤ rtol·λ_max, i.e.
            when Δ and δ_prev are parallel in the A-metric to within about rtol/2.

    Returns:
        The solution, or None when even the 1×1 fails (A₀₀ not positive or a non-finite
        entry): the caller skips the update. A singular or non-finite 2×2 falls back to the
        1×1 (``fallback=True``).
    """
    k = model.grad.shape[0]
    if k not in (1, 2):
        raise ValueError(f"the model has {k} directions; 1 or 2 are supported")
    if momentum_range is not None and not momentum_range[0] <= momentum_range[1]:
        raise ValueError(f"momentum_range must be (lo, hi) with lo <= hi, got {momentum_range!r}")
    if k == 2 and momentum is None and momentum_range is not None:
        free = solve_model(model, damping, rtol=rtol)
        lo, hi = momentum_range
        if free is None or lo <= free.momentum <= hi:
            return free
        bound = solve_model(model, damping, momentum=min(max(free.momentum, lo), hi), rtol=rtol)
        return None if bound is None else replace(bound, fallback=free.fallback)
    if k == 2 and momentum is not None:
        c0 = _one_by_one(model, damping, shift=float(model.matrix(damping)[0, 1]) * momentum)
        if c0 is None:
            return None
        return ModelSolution(alpha=-c0, momentum=momentum, q=model.value([c0, momentum], damping))
    if k == 2:
        A = model.matrix(damping)
        scale = A.diagonal().clamp_min(0.0).sqrt()
        ok = bool(torch.isfinite(A).all()) and bool(torch.isfinite(model.grad).all()) and bool(
            (scale > 0).all())
        if ok:
            # judge and solve the 2×2 scaled to a unit diagonal: [[1, r], [r, 1]] with r the
            # cosine of Δ and δ_prev in the A-metric, so that directions of very different
            # lengths (Δ ~ 1/λ at a small λ) are not mistaken for a singular model
            A_unit = A / (scale[:, None] * scale[None, :])
            e = torch.linalg.eigvalsh(A_unit)
            if float(e[0]) > rtol * float(e[1]):
                c = -torch.linalg.solve(A_unit, model.grad / scale) / scale
                if bool(torch.isfinite(c).all()):
                    c0, c1 = float(c[0]), float(c[1])
                    return ModelSolution(alpha=-c0, momentum=c1,
                                         q=model.value([c0, c1], damping))
    c0 = _one_by_one(model, damping)
    if c0 is None:
        return None
    q = model.value([c0] + [0.0] * (k - 1), damping)
    return ModelSolution(alpha=-c0, momentum=0.0, q=q, fallback=k == 2)


def layer_matrix(tensors: Sequence[Tensor]) -> Tensor:
    """[W b] of shape (d_g, d_a) from a layer's tensors in the adapter's order (weight, bias).

    The layout of ``LayerAdapter.grad_matrix``: the weight reshaped to (d_g, ·), then the
    bias (if any) as the last column.
    """
    w = tensors[0].reshape(tensors[0].shape[0], -1)
    return torch.cat([w] + [b.reshape(-1, 1) for b in tensors[1:]], 1) if len(tensors) > 1 else w


def approx_curvature_form(preconditioner: Preconditioner, names: Mapping[int, str],
                          delta: Params, damping: float) -> float:
    """δᵀ M δ with M the preconditioner's own damped curvature (its ``curvature_product``).

    Registered layers use the matrix their factorisation inverts (damped as the method
    damps, with the damping it was built with); every other parameter in ``delta`` uses
    ``damping``·I (the preconditioner leaves those gradients as they are).

    Args:
        preconditioner: after a :meth:`~kronfisher.Preconditioner.step`.
        names: ``id(parameter)`` → its key in ``delta``.
        delta: parameter name → δ_p.
        damping: the damping d = λ + η of the parameters outside registered layers.
    """
    mats: dict[str, Tensor] = {}
    covered: set[str] = set()
    for s in preconditioner.layers.values():
        ps = s.adapter.params()
        keys = [names.get(id(p)) for p in ps]
        if not any(k in delta for k in keys if k is not None):
            continue  # no optimised parameter in this layer: δ is 0 there
        parts = [delta[k] if k is not None and k in delta else torch.zeros_like(p)
                 for k, p in zip(keys, ps)]
        mats[s.name] = s.adapter.to_matrix(parts)
        covered.update(k for k in keys if k is not None)
    products = preconditioner.curvature_product(mats) if mats else {}
    total = inner(mats, products) if mats else torch.zeros((), dtype=torch.float64)
    rest = {n: v for n, v in delta.items() if n not in covered}
    if rest:
        total = total + damping * inner(rest, rest)
    return float(total)
