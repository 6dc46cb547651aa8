"""Per-layer probe of a Kronecker preconditioner during `kronfisher train`.

Wraps the CLI and prints, for every factorisation, each layer's factor eigenvalue ranges,
the second term's eigenvalues s_a, s_g relative to the damped first term (the authors'
two-term scheme inverts 1 + |s_g||s_a| in that basis) and, for every step, the KL-clip
factor ν with Σ|⟨Δ, ∇⟩| and the layer with the largest ‖Δ‖. Measurement only: nothing in
the library is changed. ``PROBE_NOCENTER=1`` takes the second term from R(F) instead of
the residual R(F) − vec(A)vec(G)ᵀ (what the authors' `kfac_cor.py` does, since it calls
its power SVD with method "kpsvd").

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/kfac_corrected_probe.py train \
        --problem curves --optimizer kfac_corrected --iterations 20 --threads 1 \
        --no-progress --out /tmp/probe
"""

from __future__ import annotations

import os
import sys

import torch

import kronfisher.curvature.methods as methods
from kronfisher import cli
from kronfisher.preconditioner import base, kronecker

STEPS: list[str] = []

if os.environ.get("PROBE_NOCENTER"):
    _nearest = methods.nearest_kronecker

    def _uncentred(stats, k, **kw):
        kw["center"] = False
        return _nearest(stats, k, **kw)

    methods.nearest_kronecker = _uncentred


def _relative_eigs(X1: torch.Tensor, X2: torch.Tensor, lam: float) -> torch.Tensor:
    e, U = torch.linalg.eigh(X1 + lam * torch.eye(X1.shape[0], dtype=X1.dtype))
    W = U / e.sqrt()
    return torch.linalg.eigvalsh(W.T @ X2 @ W)


_factorize = kronecker.KroneckerPreconditioner._factorize


def _probe_factorize(self, state, source, damping):
    (A, G), *rest = [(a.double(), g.double()) for a, g in source.terms]
    ea, eg = torch.linalg.eigvalsh(A), torch.linalg.eigvalsh(G)
    line = (f"layer {state.name:>3} d_a={A.shape[0]} d_g={G.shape[0]} λ={damping:g}"
            f" eig(A)∈[{ea.min():.1e},{ea.max():.2e}] eig(G)∈[{eg.min():.1e},{eg.max():.2e}]")
    if rest:
        C, D = rest[0]
        sa, sg = _relative_eigs(A, C, damping), _relative_eigs(G, D, damping)
        top = (sg.abs()[:, None] * sa.abs()[None, :]).max()
        line += (f" s_a∈[{sa.min():.2e},{sa.max():.2e}] s_g∈[{sg.min():.2e},{sg.max():.2e}]"
                 f" max|s_g||s_a|={top:.3g}")
    print(line, flush=True)
    return _factorize(self, state, source, damping)


_kl_scale = base.Preconditioner._kl_scale


def _probe_kl_scale(self, out, grads):
    nu = _kl_scale(self, out, grads)
    dots = {s.name: float((X * grads[s.name]).sum()) for s, X in out.items()}
    big = max(out, key=lambda s: float(out[s].norm()))
    STEPS.append(f"step {len(STEPS) + 1:>3} ν={nu:.3g} Σ|<Δ,∇>|={sum(map(abs, dots.values())):.3g}"
                 f" largest ‖Δ‖: layer {big.name} ‖Δ‖={float(out[big].norm()):.3g}"
                 f" ‖∇‖={float(grads[big.name].norm()):.3g}")
    return nu


kronecker.KroneckerPreconditioner._factorize = _probe_factorize
base.Preconditioner._kl_scale = _probe_kl_scale

if __name__ == "__main__":
    rc = cli.main(sys.argv[1:])
    print("\n".join(STEPS))
    sys.exit(rc)
