"""Shared constructions of the tests: column-stacking vec, random SPD/symmetric matrices,
realistic layer statistics."""

import math

import torch

D = torch.float64


def vec(V: torch.Tensor) -> torch.Tensor:
    """Column-stacking vec of a (d_g, d_a) matrix: (A ⊗ G) vec(V) = vec(G V Aᵀ)."""
    return V.mT.reshape(-1)


def vec_batch(V: torch.Tensor) -> torch.Tensor:
    """vec of each matrix of a (b, d_g, d_a) batch, as the columns of a (d_a·d_g, b) matrix."""
    return V.mT.reshape(V.shape[0], -1).T


def spd(n: int, seed: int, cond: float = 10.0) -> torch.Tensor:
    """A random symmetric positive definite n × n matrix with eigenvalues 1 … cond."""
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=D))
    e = torch.logspace(0, math.log10(cond), n, dtype=D)
    return (Q * e) @ Q.T


def sym(n: int, seed: int) -> torch.Tensor:
    """A random symmetric (indefinite) n × n matrix."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, n, generator=gen, dtype=D)
    return X + X.T


def eye(n: int) -> torch.Tensor:
    return torch.eye(n, dtype=D)


def realistic_stats(m: int, d_in: int, d_out: int, *, bias: bool = True, seed: int = 0):
    """Per-example (a, g) with non-trivial spectra: correlated inputs, heavy-tailed gradients."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=gen, dtype=D) / d_in**0.5
    x = torch.tanh(torch.randn(m, d_in, generator=gen, dtype=D) @ mix + 0.3)
    a = torch.cat([x, torch.ones(m, 1, dtype=D)], 1) if bias else x
    scale = torch.exp(torch.randn(m, 1, generator=gen, dtype=D))
    gmix = torch.randn(d_out, d_out, generator=gen, dtype=D) / d_out**0.5
    g = scale * (torch.randn(m, d_out, generator=gen, dtype=D) @ gmix)
    return a, g


def nearly_kronecker_stats(m: int, d_a: int, d_g: int, eps: float, seed: int = 0):
    """Float64 (a, g) whose Fisher block is Kronecker-factored up to O(eps): every output
    gradient is ±h plus eps-sized noise, so F − A_K ⊗ G_K is ~eps relative to F."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_a - 1, d_a - 1, generator=gen, dtype=D) / 6
    x = torch.randn(m, d_a - 1, generator=gen, dtype=D) @ mix + 0.5
    a = torch.cat([x, torch.ones(m, 1, dtype=D)], 1)
    h = torch.randn(d_g, generator=gen, dtype=D)
    sign = torch.where(torch.rand(m, 1, generator=gen, dtype=D) < 0.5, -1.0, 1.0)
    noise = torch.randn(m, d_g, generator=gen, dtype=D) * (1 + a[:, :1].abs())
    return a, sign * h + eps * noise


class Affine(torch.nn.Module):
    """y = w ⊙ x + b: a trainable layer of a type no adapter handles (always skipped)."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(width) + 0.1 * torch.randn(width))
        self.bias = torch.nn.Parameter(0.1 * torch.randn(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x + self.bias
