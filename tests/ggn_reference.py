"""Dense GGN references built with torch.func only (independent of kronfisher's losses).

The objective at each reduction is written with torch's own losses; its Hessian with
respect to the outputs (torch.func.hessian) is H, the Jacobian of the outputs with respect
to the layer's [W b] (torch.func.jacrev, column-stacking vec) is J, and the GGN block is
Jᵀ H J. For a layer's pre-activations s, Σᵢ Jₛ,ᵢᵀ Hᵢᵢ Jₛ,ᵢ is the G that KFAC's captured
g's estimate (g = batch size × ∂L/∂s).
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev

D = torch.float64
LIKELIHOODS = ("gaussian", "bernoulli", "categorical")
REDUCTIONS = ("batchmean", "mean", "sum")


def tiny_net(likelihood: str, seed: int = 0) -> nn.Sequential:
    """3 → 4 (tanh) → outputs; categorical: logits (m, 3 classes, 2 positions)."""
    torch.manual_seed(seed)
    if likelihood == "categorical":
        net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 6), nn.Unflatten(1, (3, 2)))
    else:
        net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    return net.double()


def some_targets(out: torch.Tensor, likelihood: str) -> torch.Tensor:
    """Targets of the right kind (the output Hessian of these NLLs does not depend on them)."""
    gen = torch.Generator().manual_seed(123)
    if likelihood == "categorical":
        return torch.randint(0, out.shape[1], (out.shape[0], *out.shape[2:]), generator=gen)
    if likelihood == "bernoulli":
        return torch.rand(out.shape, generator=gen, dtype=D).round()
    return torch.randn(out.shape, generator=gen, dtype=D)


def objective(likelihood: str, reduction: str, y: torch.Tensor):
    """The training objective as a function of the outputs, written with torch's losses."""
    torch_red = "mean" if reduction == "mean" else "sum"

    def f(out):
        if likelihood == "gaussian":
            loss = 0.5 * F.mse_loss(out, y, reduction=torch_red)  # unit-variance NLL
        elif likelihood == "bernoulli":
            loss = F.binary_cross_entropy_with_logits(out, y, reduction=torch_red)
        else:
            loss = F.cross_entropy(out, y, reduction=torch_red)
        return loss / out.shape[0] if reduction == "batchmean" else loss

    return f


def output_hessian(model: nn.Module, x: torch.Tensor, likelihood: str, reduction: str):
    """H: the objective's Hessian w.r.t. the outputs, (N·D, N·D)."""
    with torch.no_grad():
        out = model(x)
    H = hessian(objective(likelihood, reduction, some_targets(out, likelihood)))(out)
    n = out.numel()
    return H.reshape(n, n)


def layer_jacobian(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """∂ vec(outputs) / ∂ vec([W b]) of one Linear or Conv2d layer, (N·D, d_g·d_a)."""
    prefix = next(n for n, mod in model.named_modules() if mod is layer)

    def f(w, b):
        return functional_call(model, {f"{prefix}.weight": w, f"{prefix}.bias": b}, (x,))

    w = layer.weight.detach()
    Jw, Jb = jacrev(f, argnums=(0, 1))(w, layer.bias.detach())
    d_g = w.shape[0]
    n_out = Jb.numel() // d_g
    J = torch.cat([Jw.reshape(n_out, d_g, -1), Jb.reshape(n_out, d_g, 1)], -1)
    return J.mT.reshape(n_out, -1).detach()  # vec(V) = V.T.reshape(-1), V = [W b]


def layer_ggn_of(model: nn.Module, layer: nn.Module, x: torch.Tensor, loss_fn) -> torch.Tensor:
    """Jᵀ H J of one layer for any loss of the outputs (H = torch.func.hessian(loss_fn))."""
    with torch.no_grad():
        out = model(x)
    H = hessian(loss_fn)(out).reshape(out.numel(), out.numel())
    J = layer_jacobian(model, layer, x)
    return (J.T @ H @ J).detach()


def layer_ggn(model: nn.Module, layer: nn.Linear, x: torch.Tensor, likelihood: str,
              reduction: str) -> torch.Tensor:
    """The exact GGN block Jᵀ H J of one Linear layer, in the column-stacking vec of [W b]."""
    J = layer_jacobian(model, layer, x)
    return (J.T @ output_hessian(model, x, likelihood, reduction) @ J).detach()


def layer_g(model: nn.Sequential, index: int, x: torch.Tensor, likelihood: str,
            reduction: str) -> torch.Tensor:
    """Σᵢ Jₛ,ᵢᵀ Hᵢᵢ Jₛ,ᵢ for the pre-activations s of ``model[index]`` (a Linear layer)."""
    head, tail = model[: index + 1], model[index + 1:]
    with torch.no_grad():
        s = head(x)
    J = jacrev(tail)(s)  # (N, *out, N, d_g): block diagonal over examples
    n, d_g = s.shape
    J = J.reshape(-1, n * d_g)
    M = J.T @ output_hessian(model, x, likelihood, reduction) @ J
    return M.reshape(n, d_g, n, d_g).diagonal(dim1=0, dim2=2).sum(-1).detach()


def check_monte_carlo(samples: torch.Tensor, target: torch.Tensor, *, precision: float = 0.05,
                      sigmas: float = 3.0) -> float:
    """Assert that the mean of K independent estimates is within ``sigmas`` standard errors.

    With K estimates Fₖ, SE² = Σ_entries var(Fₖ)/K is E‖F̄ − E F‖²_F; F̄ must satisfy
    ‖F̄ − target‖_F ≤ sigmas·SE. The check is only meaningful if SE is small, so also
    SE ≤ precision·‖target‖_F: a scale error above (sigmas + 1)·precision (20 % by
    default) cannot pass. Returns ‖F̄ − target‖_F / SE.
    """
    k = samples.shape[0]
    mean = samples.mean(0)
    se = float((samples.var(0) / k).sum().sqrt())
    err = float((mean - target).norm())
    assert se <= precision * float(target.norm()), (se, float(target.norm()))
    assert err <= sigmas * se, (err, se)
    return err / se


def fold_in(pc, loss_fn):
    """One curvature batch: backward inside collect(), then step() folds it in."""
    with pc.collect():
        loss_fn().backward()
    assert pc.step()
    pc.model.zero_grad(set_to_none=True)
