"""AdaptiveNG: natural gradient with adaptive damping and α, μ from the quadratic model.

It sits above any :class:`~kronfisher.Preconditioner` (which writes Δ into ``.grad``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict

import torch
from torch import Tensor

from ..preconditioner import Preconditioner
from ..preconditioner.written import WrittenGrads
from .config import StepConfig
from .damping import reduction_ratio
from .evaluation import LossFn, StepBatch, check_approx_available, linear_terms
from .quadratic import SINGULAR_RTOL_EPS, OutputHessianFn, QuadraticModel, inner, solve_model
from .state import StepRecord, check_loadable

__all__ = ["AdaptiveNG", "StepRecord"]


def _all_finite(tensors: list[Tensor]) -> bool:
    """Whether every entry is finite.

    One sum per tensor; entrywise only when a sum is not finite (it may just overflow).
    """
    sums = torch.stack([t.sum() for t in tensors])
    if bool(torch.isfinite(sums).all()):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)


class AdaptiveNG(torch.optim.Optimizer):
    """Natural gradient whose damping, step size and momentum adapt (kfac-jax's rules).

    Each :meth:`step` runs the closure (∇ = its gradient + ηθ), sets the
    preconditioner's damping to λ + η, lets it write Δ = M⁻¹∇ into ``.grad`` and then
    moves the parameters by δ = −α Δ + μ δ_prev (δ_prev: the previous step):

    * ``lr=None, momentum=None``: (−α, μ) = −(VᵀCV + (λ+η)VᵀV)⁻¹ Vᵀ∇ over V = [Δ, δ_prev]
      (1×1 at the first step), C the exact GGN of ``loss_fn`` at ``model(inputs)``;
    * ``lr=None, momentum=None, momentum_range=(lo, hi)``: the same model's minimiser
      with lo ≤ μ ≤ hi (μ at the nearer bound, α re-solved, when the free μ is outside);
    * ``lr=None, momentum=μ``: α from the same model with μ fixed;
    * ``lr=float``: α = lr·ν, μ = ``momentum`` or 0, ν = min(1, √(κ / (lr²|Δᵀ∇|))) with
      ``kl_clip`` = κ (else ν = 1).

    Sign convention: Δ points uphill (it is the preconditioned gradient), so α > 0 is a
    descent step; the model's α can come out ≤ 0 or μ < 0 (it is a minimiser, not a
    constraint). With ``adapt_damping``, on the last step of every period of
    ``damping_update_freq`` steps (step i with (i + 1) % T = 0), ρ = (L(θ+δ) − L(θ)) / q(δ)
    on ``inputs`` (L includes η/2‖θ‖²; q(δ) = ∇ᵀδ + ½δᵀ(C + (λ+η)I)δ, C the exact GGN
    (``quad_model="ggn"``) or the preconditioner's own damped curvature (``"approx"``))
    drives λ ← ω·λ (ρ > ¾), λ/ω (ρ < ¼, ρ not finite, q ≥ 0, or a skipped update).
    A changed λ makes the preconditioner refactorise: keep ``damping_update_freq`` equal
    to (or a multiple of) its ``inv_update_freq``.

    Args:
        preconditioner: any :class:`~kronfisher.Preconditioner`; its damping is set by
            this optimizer every step (its own ``kl_clip`` must be None when ``kl_clip``
            is set here).
        params: the parameters to optimise (one group); default: the trainable
            parameters of ``preconditioner.model``. All must belong to that model.
        lr, momentum, momentum_range, kl_clip: the step rule above.
        damping: the initial λ (at the scale of the objective: λ₀ = 150 is kfac-jax's
            for a loss summed over pixels).
        adapt_damping, damping_update_freq, damping_decay, min_damping, max_damping:
            the Levenberg–Marquardt rule (ω = ``damping_decay`` per update).
        weight_decay: η; the closure must not add it itself.
        quad_model: "ggn" or "approx", the curvature of q in ρ (above).
        model_grad: the ∇ in the exact model's linear term Vᵀ∇ (automatic α, μ and the
            "ggn" q): "closure" (default: the closure's gradient) or "inputs" (the gradient
            of ``loss_fn`` on ``inputs`` + ηθ, free from the JVPs: the model is then the
            exact quadratic model of the very loss ρ measures, which matters when
            ``inputs`` is a sub-batch; docs/design.md). Identical when ``inputs`` is the
            closure's batch and ``loss_fn`` its loss.
        loss_lower_bound: None (default) or a value the loss (with η/2‖θ‖²) cannot go
            below, e.g. 0 for a negative log-likelihood of discrete targets: an automatic
            step whose model predicts L(θ) + q(δ) below it is skipped (λ raised), since
            the model is then being trusted far beyond its range (docs/design.md).

    Data parallel (a preconditioner on several processes, docs/distributed.md): every rank
    passes its own shard as ``inputs`` (equal shards, ``loss_fn`` averaged over the
    shard) and its closure its shard's loss; the quadratic model's curvature and gradient
    products, L(θ), L(θ+δ) and the closure's loss are averaged over the ranks, so every
    rank takes the α, μ, λ one process takes on the concatenated batch. Δ, ∇ and δ_prev
    are the same on every rank already (DistributedDataParallel's averaged gradient).

    Every hyper-parameter is in ``param_groups[0]`` (λ as ``"damping"``), so
    ``torch.optim.lr_scheduler`` works on a fixed lr. :attr:`last_step` is a
    :class:`StepRecord` (None before the first step).

    Raises:
        TypeError: ``preconditioner`` is not a Preconditioner.
        ValueError: a hyper-parameter out of range, several param groups, a parameter
            that is not the model's, ``kl_clip`` set on both, or ``quad_model="approx"``
            with a data-parallel preconditioner that preconditions each layer on one owner
            rank (its curvature product exists on the owner only).
    """

    def __init__(self, preconditioner: Preconditioner, *,
                 params: Iterable[Tensor] | None = None, lr: float | None = None,
                 momentum: float | None = None,
                 momentum_range: tuple[float, float] | None = None, damping: float = 150.0,
                 adapt_damping: bool = True, damping_update_freq: int = 5,
                 damping_decay: float = 0.95**5, min_damping: float = 1e-8,
                 max_damping: float = 1e8, weight_decay: float = 0.0,
                 quad_model: str = "ggn", kl_clip: float | None = None,
                 model_grad: str = "closure", loss_lower_bound: float | None = None):
        if not isinstance(preconditioner, Preconditioner):
            raise TypeError(f"preconditioner must be a kronfisher Preconditioner, got"
                            f" {type(preconditioner).__name__}")
        model = preconditioner.model
        plist = [p for p in model.parameters() if p.requires_grad] if params is None \
            else list(params)
        if any(not isinstance(p, Tensor) for p in plist):
            raise ValueError("params must be an iterable of tensors (AdaptiveNG takes one"
                             " parameter group: α, μ and λ are shared by all parameters)")
        names = {id(p): n for n, p in model.named_parameters()}
        outside = [i for i, p in enumerate(plist) if id(p) not in names]
        if outside:
            raise ValueError(f"params {outside} are not parameters of preconditioner.model"
                             " (the quadratic model evaluates that model)")
        defaults = dict(lr=lr, momentum=momentum, momentum_range=momentum_range,
                        damping=damping, adapt_damping=adapt_damping,
                        damping_update_freq=damping_update_freq, damping_decay=damping_decay,
                        min_damping=min_damping, max_damping=max_damping,
                        weight_decay=weight_decay, quad_model=quad_model, kl_clip=kl_clip,
                        model_grad=model_grad, loss_lower_bound=loss_lower_bound)
        StepConfig.from_group(defaults)
        if kl_clip is not None and preconditioner.kl_clip is not None:
            raise ValueError("kl_clip is set on both the preconditioner and AdaptiveNG: set it"
                             " on one (the optimizer's scales only Δ's part of the step)")
        super().__init__(plist, defaults)
        self.preconditioner = preconditioner
        check_approx_available(preconditioner, quad_model)
        self._names = names
        self.steps = 0
        self.last_step: StepRecord | None = None
        self._written = WrittenGrads()

    def add_param_group(self, param_group: dict) -> None:
        """Add the (only) parameter group; a second one raises ValueError."""
        if self.param_groups:
            raise ValueError("AdaptiveNG has one parameter group (α, μ and λ are shared)")
        super().add_param_group(param_group)

    # ------------------------------------------------------------------ step
    def step(self, closure: Callable[[], Tensor] | None = None, *,  # type: ignore[override]
             inputs: Tensor | tuple | None = None, loss_fn: LossFn | None = None,
             output_hessian: OutputHessianFn | None = None) -> Tensor:
        """One step (see the class docstring); returns the closure's loss.

        Args:
            closure: zeroes the gradients, computes the loss, runs its backward and
                returns the loss (as ``torch.optim.LBFGS`` takes); called once.
            inputs: the model's input for the quadratic model and ρ (a tuple: positional
                arguments); may be a sub-batch of the closure's batch (then C, L and ρ
                are that sub-batch's while ∇ is the full batch's).
            loss_fn: outputs of ``model(inputs)`` → the loss on that batch, without the
                weight-decay term; differentiable by ``torch.func``.
            output_hessian: optional closed-form Hessian of ``loss_fn`` with respect to the
                outputs (:class:`~kronfisher.losses.OutputHessian`), for the exact model's
                products: faster than differentiating ``loss_fn`` twice, same values.

        Raises:
            ValueError: no closure; ``inputs``/``loss_fn`` missing while α is automatic or
                the damping adapts; a hyper-parameter out of range.
            RuntimeError: called inside ``preconditioner.collect()``, or on gradients this
                optimizer already used (the closure ran no backward).
        """
        if closure is None:
            raise ValueError("AdaptiveNG.step needs a closure (zero grads, forward, backward,"
                             " return the loss)")
        group = self.param_groups[0]
        cfg = StepConfig.from_group(group)
        if (cfg.automatic or cfg.adapt_damping) and (inputs is None or loss_fn is None):
            raise ValueError("step() needs inputs= and loss_fn= when lr is None (α from the"
                             " quadratic model) or adapt_damping is True (ρ needs L(θ+δ))")
        if self.preconditioner.collecting:
            raise RuntimeError("AdaptiveNG.step() inside preconditioner.collect(): its extra"
                               " forward passes would be recorded as curvature")
        params: list[Tensor] = group["params"]
        with torch.enable_grad():
            loss = closure()
        stale = [self._names[id(p)] for p in params if self._written.unchanged(p)]
        if stale:
            raise RuntimeError(f"step() on gradients it already used ({stale[:3]}…): the"
                               " closure must zero the gradients and run a backward")
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError("the closure must return the loss as a scalar tensor")
        batch = None if inputs is None or loss_fn is None else StepBatch(
            self.preconditioner, self._names, inputs if isinstance(inputs, tuple) else (inputs,),
            loss_fn, output_hessian)
        with torch.no_grad():
            return self._step(cfg, params, loss, batch)

    def _step(self, cfg: StepConfig, params: list[Tensor], loss: Tensor,
              batch: StepBatch | None) -> Tensor:
        eta, lam = cfg.weight_decay, cfg.damping
        named = {self._names[id(p)]: p for p in params}
        for p in params:
            g = torch.zeros_like(p) if p.grad is None else p.grad
            p.grad = g.add(p, alpha=eta) if eta else g
        # the last step of each period: with damping_update_freq = inv_update_freq the new λ
        # reaches the preconditioner when it refactorises anyway (a changed damping forces a
        # refactorisation, so an update out of phase would cost one more per period)
        due = cfg.adapt_damping and (self.steps + 1) % cfg.damping_update_freq == 0
        # ∇ is kept for the model, ρ's q and the norm constraint (the preconditioner
        # replaces registered layers' .grad; a copy guards against in-place changes)
        need_grads = cfg.automatic or due or cfg.kl_clip is not None
        grads = {n: p.grad.clone() for n, p in named.items()
                 if p.grad is not None} if need_grads else {}
        self.preconditioner.damping = lam + eta
        # data parallel: the mean of the ranks' losses, so that every rank decides alike
        closure_loss = float(self.preconditioner.sync.mean_over_ranks(
            loss.detach().double().reshape(1), "closure_loss")[0])
        if not self.preconditioner.step():  # it warned and cleared the gradients
            return self._skipped(cfg, loss, closure_loss, "non-finite gradient",
                                 raise_damping=False)
        if not math.isfinite(closure_loss):
            return self._skipped(cfg, loss, closure_loss, "the closure's loss is not finite")
        Delta = {n: p.grad for n, p in named.items() if p.grad is not None}
        prev = {n: self.state[p]["delta_prev"] for n, p in named.items()
                if "delta_prev" in self.state[p]}
        has_prev = len(prev) == len(named)
        l2 = (lambda: 0.5 * eta * float(inner(named, named))) if eta else (lambda: 0.0)
        loss_before, q, fallback = None, None, False
        if cfg.automatic:
            V = [Delta, prev] if has_prev else [Delta]
            assert batch is not None  # step() checked
            gram = batch.gram(named, V)
            loss_before = gram.loss + l2()
            qmodel = QuadraticModel(
                curvature=gram.curvature,
                gram=torch.stack([torch.stack([inner(u, v) for v in V]) for u in V]).cpu(),
                grad=linear_terms(cfg, V, grads, named, gram))
            rtol = SINGULAR_RTOL_EPS * max(torch.finfo(p.dtype).eps for p in params)
            sol = solve_model(qmodel, lam + eta, momentum=cfg.momentum,
                              momentum_range=cfg.momentum_range, rtol=rtol)
            if sol is None or not math.isfinite(loss_before):
                return self._skipped(cfg, loss, closure_loss, "the quadratic model has no finite"
                                     " minimiser (non-finite loss_fn or curvature)")
            alpha, mu, q, fallback = sol.alpha, sol.momentum, sol.q, sol.fallback
            bound = cfg.loss_lower_bound
            if bound is not None and loss_before + q < bound:
                return self._skipped(cfg, loss, closure_loss, f"the quadratic model predicts"
                                     f" L(θ) + q = {loss_before + q:.4g}, below"
                                     f" loss_lower_bound={bound:g} (a step it cannot be"
                                     " trusted with)")
            if fallback:
                warnings.warn("AdaptiveNG: the 2×2 quadratic model is singular (Δ and δ_prev"
                              f" nearly parallel, or not finite): this step uses μ = {mu:g}",
                              RuntimeWarning, stacklevel=3)
        else:
            assert cfg.lr is not None  # not automatic
            nu = 1.0
            if cfg.kl_clip is not None:
                vg = abs(float(inner(Delta, grads))) * cfg.lr**2
                nu = min(1.0, math.sqrt(cfg.kl_clip / vg)) if vg > 0 else 1.0
            alpha, mu = cfg.lr * nu, (cfg.momentum or 0.0) if has_prev else 0.0
        delta = {n: (d * -alpha + prev[n] * mu) if mu else d * -alpha for n, d in Delta.items()}
        if due and (cfg.quad_model == "approx" or not cfg.automatic):
            assert batch is not None  # step() checked
            q, jvp_loss = batch.model_change(cfg, named, grads, delta)
            if loss_before is None:  # fixed lr: L(θ) from the JVP, else one forward
                loss_before = (batch.loss() if jvp_loss is None else jvp_loss
                               ) + l2()
            if not math.isfinite(loss_before):
                return self._skipped(cfg, loss, closure_loss, "loss_fn is not finite at θ")
        if not _all_finite(list(delta.values())):
            return self._skipped(cfg, loss, closure_loss, "the step δ is not finite")
        for n, p in named.items():
            if n in delta:
                p.add_(delta[n])
        rho, next_lam = None, lam
        if due:
            assert loss_before is not None and q is not None  # computed above when due
            assert batch is not None  # step() checked
            loss_after = batch.loss() + l2()
            rho = reduction_ratio(loss_before, loss_after, q)
            next_lam = cfg.rule.update(lam, rho, q)
        self.param_groups[0]["damping"] = next_lam
        for n, p in named.items():
            self.state[p]["delta_prev"] = delta[n]
        self._record(StepRecord(step=self.steps, loss=closure_loss, damping=lam,
                                next_damping=next_lam, alpha=alpha, momentum=mu, q=q, rho=rho,
                                applied=True, fallback=fallback))
        return loss

    def _skipped(self, cfg: StepConfig, loss: Tensor, closure_loss: float, reason: str, *,
                 raise_damping: bool = True) -> Tensor:
        """Leave the parameters unchanged, forget δ_prev, raise λ (when adapting), warn."""
        lam = cfg.damping
        next_lam = cfg.rule.increase(lam) if raise_damping and cfg.adapt_damping else lam
        self.param_groups[0]["damping"] = next_lam
        for p in self.param_groups[0]["params"]:
            self.state[p].pop("delta_prev", None)
        if raise_damping:
            warnings.warn(f"AdaptiveNG step {self.steps}: {reason}; update skipped (parameters"
                          f" unchanged), damping {lam:g} → {next_lam:g}", RuntimeWarning,
                          stacklevel=4)
        self._record(StepRecord(step=self.steps, loss=closure_loss, damping=lam,
                                next_damping=next_lam, alpha=0.0, momentum=0.0, q=None,
                                rho=None, applied=False, reason=reason))
        return loss

    def _record(self, record: StepRecord) -> None:
        self.last_step = record
        self.steps += 1
        self._written.clear()
        for p in self.param_groups[0]["params"]:
            self._written.record(p)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """torch.optim's state_dict plus the step count and the last :class:`StepRecord`.

        ``"state"`` holds δ_prev per parameter, ``"param_groups"`` the hyper-parameters
        with the current λ, ``"adaptive"`` the step count and the last record (α, μ, ρ, q).
        """
        sd = super().state_dict()
        last = None if self.last_step is None else asdict(self.last_step)
        sd["adaptive"] = {"steps": self.steps, "last_step": last}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore :meth:`state_dict`'s output; every check runs before anything changes.

        Raises:
            ValueError: not an AdaptiveNG state_dict, other parameter shapes, a
                non-finite δ_prev, or a hyper-parameter out of range.
        """
        check_loadable(state_dict, self.param_groups[0]["params"], self._names)
        extra = state_dict["adaptive"]
        last = extra["last_step"]
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "adaptive"})
        self.steps = extra["steps"]
        self.last_step = None if last is None else StepRecord(**last)
        self._written.clear()
