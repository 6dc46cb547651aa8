"""CURVES: a seeded *reconstruction* of the synthetic curves of Hinton & Salakhutdinov (2006).

The original CURVES images are not distributed by any package, so we generate them. Each 28x28
image shows one smooth curve through three random points:

1. three points uniform in ``[MARGIN, 28 - MARGIN]^2`` (pixel units, pixel ``(i, j)`` covers
   ``[j, j+1] x [i, i+1]``, rows ``i`` top to bottom);
2. the two points farthest apart are the ends, the third is passed through at the chord-length
   parameter ``t1 = |P1 - P0| / (|P1 - P0| + |P2 - P1|)`` of a quadratic Bezier curve;
3. the curve is sampled at ``SEGMENTS + 1`` parameter values and treated as a polyline;
4. a pixel's intensity is ``clip(WIDTH / 2 + 0.5 - d, 0, 1)`` where ``d`` is the distance of its
   centre to the polyline: an anti-aliased stroke of width ``WIDTH`` px with round caps.

Values lie in ``[0, 1]``; images are flattened row-major to 784 features. The generator uses
only ``+ - * /``, ``sqrt`` and ``min`` (no transcendental functions, no BLAS), so the result is
bit-for-bit reproducible across machines and thread counts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ._common import cached_splits

SIDE = 28
MARGIN = 2.0
WIDTH = 1.75
SEGMENTS = 24

TRAIN_SEED = 20060728
TEST_SEED = 20060729
SIZES = {"train": 20_000, "test": 10_000}
SEEDS = {"train": TRAIN_SEED, "test": TEST_SEED}
CACHE_FILE = "curves-v1.npz"

SHA256 = {
    "train": "ac2930d6d4972997662f5198a00a77f73c4b0bd83b093e48a8a11ad93d778645",
    "test": "3a6c6d4cbae44a1293e756fcad043739fe8fc4ec117c9e615cffd810432957a8",
}
"""Pinned SHA-256 of the float32 bytes of each split (see :func:`kronfisher.data.verify`)."""


def _bezier_polylines(n: int, seed: int) -> np.ndarray:
    """Polyline vertices of ``n`` random curves, float64 of shape (n, SEGMENTS + 1, 2) as (x, y)."""
    rng = np.random.default_rng(seed)
    pts = MARGIN + (SIDE - 2.0 * MARGIN) * rng.random((n, 3, 2))
    # The vertex opposite the longest side of the triangle becomes the middle point.
    d12 = pts[:, 2] - pts[:, 1]
    d20 = pts[:, 0] - pts[:, 2]
    d01 = pts[:, 1] - pts[:, 0]
    sides = np.stack([(d * d).sum(axis=1) for d in (d12, d20, d01)], axis=1)
    mid = np.argmax(sides, axis=1)
    rows = np.arange(n)
    p1 = pts[rows, mid]
    p0 = pts[rows, (mid + 1) % 3]
    p2 = pts[rows, (mid + 2) % 3]
    a = np.sqrt(((p1 - p0) ** 2).sum(axis=1))
    b = np.sqrt(((p2 - p1) ** 2).sum(axis=1))
    total = a + b
    t1 = np.where(total > 0.0, a / np.where(total > 0.0, total, 1.0), 0.5)
    t1 = np.clip(t1, 0.02, 0.98)[:, None]
    s1 = 1.0 - t1
    ctrl = (p1 - s1 * s1 * p0 - t1 * t1 * p2) / (2.0 * t1 * s1)
    t = np.linspace(0.0, 1.0, SEGMENTS + 1)[None, :, None]
    s = 1.0 - t
    return s * s * p0[:, None] + 2.0 * t * s * ctrl[:, None] + t * t * p2[:, None]


def _render(poly: torch.Tensor) -> torch.Tensor:
    """Rasterise polylines (B, K+1, 2) float32 into images (B, SIDE*SIDE) in [0, 1]."""
    centres = torch.arange(SIDE, dtype=torch.float32) + 0.5
    py = centres.repeat_interleave(SIDE).view(1, -1, 1)  # row index -> y
    px = centres.repeat(SIDE).view(1, -1, 1)  # column index -> x
    ax = poly[:, :-1, 0].unsqueeze(1)
    ay = poly[:, :-1, 1].unsqueeze(1)
    dx = (poly[:, 1:, 0] - poly[:, :-1, 0]).unsqueeze(1)
    dy = (poly[:, 1:, 1] - poly[:, :-1, 1]).unsqueeze(1)
    inv_len2 = 1.0 / torch.clamp(dx * dx + dy * dy, min=1e-12)
    # Closest point on each segment: t = clip(<w, d> / |d|^2, 0, 1); in-place to stay in cache.
    wx = px - ax  # (B, 784, K)
    wy = py - ay
    t = wx * dx
    t.add_(wy * dy).mul_(inv_len2).clamp_(0.0, 1.0)
    ex = wx.sub_(t * dx)
    ey = wy.sub_(t.mul_(dy))
    dist = ex.mul_(ex).add_(ey.mul_(ey)).amin(dim=2).sqrt_()
    return torch.clamp(WIDTH / 2.0 + 0.5 - dist, 0.0, 1.0)


def make_curves(n: int, seed: int, *, chunk: int = 128) -> torch.Tensor:
    """``n`` CURVES images as float32 of shape (n, 784), values in [0, 1].

    Deterministic in ``seed``; ``make_curves(m, s)`` is the first ``m`` rows of
    ``make_curves(n, s)`` for ``m <= n``. ``chunk`` only bounds memory (about
    ``chunk * 784 * SEGMENTS * 4`` bytes per temporary).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    poly = torch.from_numpy(_bezier_polylines(n, seed).astype(np.float32))
    out = torch.empty(n, SIDE * SIDE, dtype=torch.float32)
    for start in range(0, n, chunk):
        out[start : start + chunk] = _render(poly[start : start + chunk])
    return out


def build_curves() -> dict[str, np.ndarray]:
    """All CURVES splits: ``{"train": (20000, 784), "test": (10000, 784)}`` float32 arrays."""
    return {split: make_curves(SIZES[split], SEEDS[split]).numpy() for split in SIZES}


def shapes() -> dict[str, tuple[int, int]]:
    """Shape of each CURVES split."""
    return {split: (n, SIDE * SIDE) for split, n in SIZES.items()}


def curves_splits(root: Path, wanted: list[str]) -> dict[str, np.ndarray]:
    """The CURVES splits ``wanted`` from the cache in ``root``, generated on first use."""
    return cached_splits(
        root / CACHE_FILE,
        wanted,
        build_curves,
        SHA256,
        shapes(),
        what="CURVES",
        build_hint="The generated images differ from the pinned ones: either the generator code "
        "changed (then re-pin curves.SHA256 and bump CACHE_FILE) or this platform computes it "
        "differently (please report it).",
    )
