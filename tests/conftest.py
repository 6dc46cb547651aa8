import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


def realistic_stats(m: int, d_in: int, d_out: int, *, bias: bool = True, seed: int = 0):
    """Per-example (a, g) with non-trivial spectra: correlated inputs, heavy-tailed gradients."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=gen, dtype=torch.float64) / d_in**0.5
    x = torch.tanh(torch.randn(m, d_in, generator=gen, dtype=torch.float64) @ mix + 0.3)
    a = torch.cat([x, torch.ones(m, 1, dtype=torch.float64)], 1) if bias else x
    scale = torch.exp(torch.randn(m, 1, generator=gen, dtype=torch.float64))
    gmix = torch.randn(d_out, d_out, generator=gen, dtype=torch.float64) / d_out**0.5
    g = scale * (torch.randn(m, d_out, generator=gen, dtype=torch.float64) @ gmix)
    return a, g
