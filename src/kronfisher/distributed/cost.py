"""The cost model: the cheaper way to the SVD methods' global optimum, and who owns what.

Two ways give, on W ranks, the best Kronecker approximation of the Fisher of the
*concatenated* batch (averaging the ranks' optima is not it):

- **gather**: the layer's tokens (a, g) (N = m·T rows of d_a + d_g numbers over all
  ranks) go to the owner, which runs the single-process solver (the exact Gram solver
  when it applies) and broadcasts the k new terms (k(d_a² + d_g²) numbers);
- **krylov**: every rank keeps its tokens; the solver's products R(F) vec(V) and
  R(F)ᵀ vec(U) are all-reduced (d_a² and d_g² numbers, one collective per product,
  ``pairs`` pairs per solve), the work of each product split W ways.

Time of each = collectives × ``latency`` + wire bytes / ``bandwidth`` + multiply-adds /
``flops`` (the owner's for gather, 1/W of the total for krylov). The constants are
inputs, not measurements of any machine: :class:`CostModel`'s defaults describe a
10 Gbit/s-class network and ~10 GFLOP/s per rank; docs/distributed.md projects with them.
"""

from __future__ import annotations

from dataclasses import dataclass

from .comm import wire_bytes

__all__ = ["CostModel", "LayerShape", "choose_strategy", "assign_owners", "StrategyCost",
           "estimate_flops"]

GRAM_MAX_TOKENS = 4096
"""Above this many tokens the single-process solver uses direct products (nearest.py)."""


@dataclass(frozen=True)
class CostModel:
    """Machine constants of the cost model.

    Attributes:
        bandwidth: bytes per second one rank sends.
        latency: seconds per collective, whatever its size.
        flops: multiply-adds per second of one rank.
        pairs: pairs of products (R, Rᵀ) a Krylov solve is assumed to take (Lanczos with
            warm starts needs ~10–30 for two terms; 20 is the default).
    """

    bandwidth: float = 1.25e9
    latency: float = 5e-5
    flops: float = 1e10
    pairs: int = 20


@dataclass(frozen=True)
class LayerShape:
    """What the cost of one layer's curvature work depends on.

    Attributes:
        d_a, d_g: factor sizes.
        tokens: N = m·T rows over all ranks.
        locations: T (1 for a Linear layer).
        flat: only (t, t) location pairs (Linear, or conv radius 0).
        terms: Kronecker terms the method keeps.
        itemsize: bytes per number.
    """

    d_a: int
    d_g: int
    tokens: int
    locations: int = 1
    flat: bool = True
    terms: int = 1
    itemsize: int = 8


@dataclass(frozen=True)
class StrategyCost:
    """Predicted seconds and wire bytes per rank of one strategy for one layer."""

    seconds: float
    wire_bytes: float
    collectives: int


def _product_flops(s: LayerShape) -> float:
    """Multiply-adds of one product with R(F) over all N tokens."""
    d2 = s.d_a * s.d_a + s.d_g * s.d_g
    if s.flat:
        return float(s.tokens) * d2 / 2
    m = s.tokens // max(s.locations, 1)
    return float(m) * s.locations * (d2 / 2 + s.locations * (s.d_a + s.d_g) / 2)


def estimate_flops(s: LayerShape, pairs: int) -> float:
    """Multiply-adds of the single-process estimate on all N tokens.

    Gram solver (flat, N ≤ 4096): N²(d_a + d_g) for the Gram matrices and ~N³ for the two
    eigendecompositions; otherwise ``pairs`` pairs of direct products. Plus forming the k
    factors (N(d_a² + d_g²) each).
    """
    form = s.terms * float(s.tokens) * (s.d_a ** 2 + s.d_g ** 2)
    if s.flat and s.tokens <= GRAM_MAX_TOKENS:
        return float(s.tokens) ** 2 * (s.d_a + s.d_g) + 2.0 * float(s.tokens) ** 3 + form
    return 2.0 * pairs * _product_flops(s) + form


def gather_cost(s: LayerShape, world: int, model: CostModel, owner: bool) -> StrategyCost:
    """Gather the tokens to the owner (``owner``) or to every rank, estimate there."""
    rows = s.tokens * (s.d_a + s.d_g) * s.itemsize / world  # one rank's share
    if owner:
        terms = s.terms * (s.d_a ** 2 + s.d_g ** 2) * s.itemsize
        wire = wire_bytes("gather", int(rows), world) + wire_bytes("broadcast", terms, world)
        calls = 2
    else:
        wire, calls = wire_bytes("all_gather", int(rows), world), 1
    flops = estimate_flops(s, model.pairs)
    return StrategyCost(calls * model.latency + wire / model.bandwidth + flops / model.flops,
                        wire, calls)


def krylov_cost(s: LayerShape, world: int, model: CostModel) -> StrategyCost:
    """All-reduce every product of a Krylov solve (plus KFAC's factors once)."""
    per_pair = (s.d_a ** 2 + s.d_g ** 2) * s.itemsize
    wire = model.pairs * wire_bytes("all_reduce", per_pair, world) + wire_bytes(
        "all_reduce", per_pair, world)  # KFAC's factors: the start (and the centring)
    calls = 2 * model.pairs + 1
    flops = (2.0 * model.pairs * _product_flops(s)
             + s.terms * float(s.tokens) * (s.d_a ** 2 + s.d_g ** 2)) / world
    return StrategyCost(calls * model.latency + wire / model.bandwidth + flops / model.flops,
                        wire, calls)


def choose_strategy(s: LayerShape, world: int, model: CostModel, owner: bool) -> str:
    """"gather" or "krylov", whichever :func:`gather_cost` / :func:`krylov_cost` finds faster."""
    g = gather_cost(s, world, model, owner)
    k = krylov_cost(s, world, model)
    return "gather" if g.seconds <= k.seconds else "krylov"


def assign_owners(costs: dict[str, float], world: int) -> dict[str, int]:
    """Each layer to a rank, longest job first onto the least loaded rank (ties: lowest rank).

    Deterministic: the same costs give the same assignment on every rank.
    """
    load = [0.0] * world
    owners: dict[str, int] = {}
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        r = min(range(world), key=lambda i: (load[i], i))
        owners[name] = r
        load[r] += costs[name]
    return owners
