"""Dense references for embeddings: the one-hot nn.Linear(V, d, bias=False) model they equal.

Everything here forms one-hot matrices, V × V factors and (d·V)² Fisher blocks on purpose:
it is the construction the library's embedding code must reproduce without them.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from kronfisher.linalg import rearrange

D = torch.float64


def token_batch(B: int, S: int, V: int, seed: int = 0, *, absent: int = 2) -> torch.Tensor:
    """(B, S) token ids in [0, V − absent) with a token repeated inside sequence 0 and one
    repeated across sequences 0 and 1 (the last ``absent`` ids never occur)."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.randint(0, V - absent, (B, S), generator=gen)
    t[0, 2] = t[0, 0]  # repeated within one sequence
    t[1, 1] = t[0, 1]  # repeated across sequences
    return t


class Readout(nn.Module):
    """A per-position linear read-out that no adapter knows (its parameters are skipped):
    the preconditioned layer under test is the embedding alone."""

    def __init__(self, d: int, C: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(C, d, dtype=D) / d**0.5)
        self.bias = nn.Parameter(torch.randn(C, dtype=D) / 4)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.weight, self.bias)


class OneHotModel(nn.Module):
    """s = one_hot(t) Wᵀ (a Linear on one-hot inputs), then tanh and a read-out."""

    def __init__(self, V: int, d: int, C: int, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.V = V
        self.lin = nn.Linear(V, d, bias=False).double()
        self.head = Readout(d, C)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.lin(F.one_hot(t, self.V).to(D))))


class EmbeddingModel(nn.Module):
    """The same function with nn.Embedding(V, d), weight = the one-hot model's lin.weightᵀ."""

    def __init__(self, onehot: OneHotModel, padding_idx: int | None = None):
        super().__init__()
        V, d = onehot.lin.in_features, onehot.lin.out_features
        self.emb = nn.Embedding(V, d, padding_idx=padding_idx).double()
        self.head = Readout(d, onehot.head.weight.shape[0])
        with torch.no_grad():
            self.emb.weight.copy_(onehot.lin.weight.T)
            self.head.load_state_dict(onehot.head.state_dict())

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(t)))


def per_position_grads(model: OneHotModel, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """g_bs = ∂ℓ_b/∂s_bs (B, S, d) by torch.func, ℓ_b = Σ_s CE(model output, y_bs)."""
    s = model.lin(F.one_hot(t, model.V).to(D)).detach()
    params = {k: v.detach() for k, v in model.head.named_parameters()}

    def loss_b(s_b, y_b):
        out = functional_call(model.head, params, (torch.tanh(s_b),))
        return F.cross_entropy(out, y_b, reduction="sum")

    return vmap(grad(loss_b))(s, y)


def expand_block(t: torch.Tensor, g: torch.Tensor, V: int) -> torch.Tensor:
    """Dense F = (1/B) Σ_{b,s} kron(a aᵀ, g gᵀ), a = one_hot(t_bs): (d·V)², vec column-major."""
    B, d = t.shape[0], g.shape[-1]
    a = F.one_hot(t.reshape(-1), V).to(D)
    gf = g.reshape(-1, d)
    J = torch.einsum("na,ng->nag", a, gf).reshape(a.shape[0], -1)  # vec(g aᵀ) = a ⊗ g
    return J.mT @ J / B


def exact_block(t: torch.Tensor, g: torch.Tensor, V: int) -> torch.Tensor:
    """Dense (1/B) Σ_b vec(∇_b) vec(∇_b)ᵀ, ∇_b = Σ_s g_bs a_bsᵀ (all position pairs)."""
    B = t.shape[0]
    a = F.one_hot(t, V).to(D)
    J = torch.einsum("bsa,bsg->bag", a, g).reshape(B, -1)
    return J.mT @ J / B


def kfac_of(t: torch.Tensor, g: torch.Tensor, V: int) -> torch.Tensor:
    """kron(A, G), A = (1/(B·S)) Σ a aᵀ, G = (1/B) Σ g gᵀ (the Linear "expand" KFAC)."""
    B, d = t.shape[0], g.shape[-1]
    a = F.one_hot(t.reshape(-1), V).to(D)
    gf = g.reshape(-1, d)
    return torch.kron(a.mT @ a / a.shape[0], gf.mT @ gf / B)


def best_rank(F_: torch.Tensor, V: int, d: int, k: int) -> torch.Tensor:
    """The best rank-k Kronecker approximation of a dense F (dense SVD of R(F))."""
    U, S, Wt = torch.linalg.svd(rearrange(F_, V, d))
    out = torch.zeros_like(F_)
    for i in range(k):
        out = out + S[i] * torch.kron(U[:, i].reshape(V, V).T, Wt[i].reshape(d, d).T)
    return out


def method_optimum(method: str, t: torch.Tensor, g: torch.Tensor, V: int,
                   rank: int = 1) -> torch.Tensor:
    """Each method's optimum for the expand block, by dense construction."""
    F_ = expand_block(t, g, V)
    d = g.shape[-1]
    if method == "kfac":
        return kfac_of(t, g, V)
    if method == "kpsvd":
        return best_rank(F_, V, d, rank)
    if method in ("deflation", "lanczos"):
        return best_rank(F_, V, d, 2)
    if method == "kfac_corrected":
        K = kfac_of(t, g, V)
        return K + best_rank(F_ - K, V, d, 1)
    raise ValueError(method)


def vec(X: torch.Tensor) -> torch.Tensor:
    """Column-stacking vec of a (d, V) matrix."""
    return X.mT.reshape(-1)


def unvec(x: torch.Tensor, d: int, V: int) -> torch.Tensor:
    """The inverse of :func:`vec`."""
    return x.reshape(V, d).mT
