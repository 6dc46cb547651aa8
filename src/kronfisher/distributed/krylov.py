"""The SVD methods' global optimum with every product of the solver all-reduced.

:class:`AllReducedStats` is a :class:`~kronfisher.linalg.LayerStats` over this rank's
tokens whose R(F) products and KFAC factors are sums over all ranks: the local product
is divided by the *global* m and all-reduced, so the Krylov solvers of
:mod:`kronfisher.linalg` (power, Lanczos in direct space) run unchanged and solve the
concatenated batch's problem. Every rank sees bitwise the same reduced vectors (gloo and
NCCL finish each element on one rank and copy it), so every rank takes the same
iterations and calls the same collectives. One collective per product: d_a² numbers for
R vec(V), d_g² for Rᵀ vec(U).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..curvature.estimator import LINALG_ERRORS, CurvatureSolveError
from ..curvature.methods import method_rank
from ..linalg import KroneckerSum, LayerStats, as_stats, nearest_kronecker
from .comm import Communicator

__all__ = ["AllReducedStats", "krylov_estimate"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class AllReducedStats(LayerStats):
    """This rank's statistics, with products and factors summed over the ranks.

    Args:
        local: this rank's validated statistics.
        comm: the communicator.
        m: examples over all ranks (the 1/m of R(F)).
    """

    def __init__(self, local: LayerStats, comm: Communicator, m: int):
        super().__init__(local.a, local.g, local.pair_mask)
        self.comm = comm
        self.m = m  # global: n_tokens = m·T and the 1/m of every product are global too
        self._kfac: tuple[Tensor, Tensor] | None = None

    def kfac_factors(self) -> tuple[Tensor, Tensor]:
        """A_K, G_K of the concatenated batch (one all-reduce, cached)."""
        if self._kfac is None:
            A, G = super().kfac_factors()
            both = self.comm.all_reduce(torch.cat([A.reshape(-1), G.reshape(-1)]),
                                        "kfac_factors")
            n = A.numel()
            self._kfac = both[:n].view_as(A), both[n:].view_as(G)
        return self._kfac

    def r_matvec(self, V: Tensor) -> Tensor:
        """R(F) vec(V) of the concatenated batch (one all-reduce of d_a² numbers)."""
        return self.comm.all_reduce(super().r_matvec(V), "krylov_products")

    def rt_matvec(self, U: Tensor) -> Tensor:
        """R(F)ᵀ vec(U) of the concatenated batch (one all-reduce of d_g² numbers)."""
        return self.comm.all_reduce(super().rt_matvec(U), "krylov_products")


def krylov_estimate(comm: Communicator, estimator, a: Tensor, g: Tensor,
                    mask: Tensor | None, previous: KroneckerSum | None, m: int,
                    scales: tuple[float, float]) -> KroneckerSum:
    """The estimator's approximation of the concatenated batch by all-reduced products.

    What :meth:`KroneckerEstimator.estimate` computes on one process, with the
    power-of-two scales of the whole batch (``scales``, agreed beforehand) and direct
    products (Gram space needs every token on one rank; ``solver="gram"`` runs Lanczos).

    Raises:
        CurvatureSolveError: the solver raised a LAPACK error (on every rank alike: they
            all hold the same reduced vectors).
    """
    if a.dtype in _LOW_PRECISION:
        a, g = a.float(), g.float()
    sa, sg = scales
    split = sa * sg
    init = previous
    if previous is not None and split != 1.0:
        init = KroneckerSum([(A / split, G / split) for A, G in previous.terms])
    stats = AllReducedStats(as_stats(a / sa, g / sg, mask), comm, m)
    method = estimator.method
    solver = "lanczos" if estimator.solver in ("auto", "gram") else estimator.solver
    init_terms = init.terms if init is not None else None
    try:
        if method == "kfac_corrected":
            res = nearest_kronecker(stats, 1, solver=solver, center=True,
                                    init=init_terms[1:] if init_terms else None,
                                    tol=estimator.tol, max_iter=estimator.max_iter,
                                    products="direct")
            terms = [stats.kfac_factors(), *res.terms]
        else:
            res = nearest_kronecker(stats, method_rank(method, estimator.rank), solver=solver,
                                    init=init_terms, tol=estimator.tol,
                                    max_iter=estimator.max_iter, products="direct")
            terms = res.terms
    except LINALG_ERRORS as e:
        raise CurvatureSolveError(f"the all-reduced {solver} solve failed: {e}") from e
    kfac_first = method == "kfac_corrected"
    terms = [(A * (sa * sa), G * (sg * sg)) if (k == 0 and kfac_first) else
             (A * split, G * split) for k, (A, G) in enumerate(terms)]
    out = KroneckerSum(terms)
    out.info = {"method": method, "solver": res.solver, "products": "all-reduced",
                "iterations": res.iterations, "converged": res.converged,
                "sigmas": res.sigmas}
    return out
