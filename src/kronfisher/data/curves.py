"""CURVES: a seeded *reconstruction* of the synthetic curves of Hinton & Salakhutdinov (2006).

The original CURVES images are not distributed by any package, so we generate them. Each 28x28
image shows one smooth curve through three random points:

1. three points uniform in ``[MARGIN, 28 - MARGIN]^2`` (pixel units, pixel ``(i, j)`` covers
   ``[j, j+1] x [i, i+1]``, rows ``i`` top to bottom);
2. the two points farthest apart are the ends, the third is passed through at the chord-length
   parameter ``t1 = |P1 - P0| / (|P1 - P0| + |P2 - P1|)`` of a quadratic Bezier curve;
3. the curve is sampled at ``SEGMENTS + 1`` parameter values ``k / SEGMENTS`` and treated as a
   polyline;
4. a pixel's intensity is ``clip(WIDTH / 2 + 0.5 - d, 0, 1)`` where ``d`` is the distance of its
   centre to the polyline: an anti-aliased stroke of width ``WIDTH`` px with round caps.

Portability: everything is NumPy float64 *elementwise* ``+ - * /``, ``sqrt``, ``floor``,
``minimum``/``maximum`` and comparisons on numbers drawn by ``np.random.default_rng`` (PCG64,
whose doubles are defined bit by bit). IEEE 754 rounds each of these operations correctly, so
SIMD width (SSE/AVX2/AVX-512), operation order inside a vector loop and the thread count cannot
change a single bit; there are no sums over axes, no matrix products, no transcendental
functions and no torch kernels. The only reductions are maxima, which are exact in any order.
The float64 intensities are rounded once to float32 at the end.

Rendering uses the identity ``clip(c - sqrt(min_k d_k^2)) = max_k clip(c - sqrt(d_k^2))``
(every step is monotone, and correctly rounded monotone maps commute with min/max exactly):
each segment only paints a small patch of pixels around it, and the image is the pixelwise
maximum of the patches. :func:`render_dense` evaluates the left-hand side over all pixels and
segments; the two agree bit for bit (tested).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ._common import cached_splits, generated_mismatch_hint

SIDE = 28
MARGIN = 2.5
WIDTH = 1.5
SEGMENTS = 24
REACH = WIDTH / 2.0 + 0.5
"""Pixels whose centre is at least this far from the curve are exactly 0."""

TRAIN_SEED = 20060728
TEST_SEED = 20060729
SIZES = {"train": 20_000, "test": 10_000}
SEEDS = {"train": TRAIN_SEED, "test": TEST_SEED}
CACHE_FILE = "curves-v2.npz"
VALUE_RANGE = (0.0, 1.0)
"""Every pixel lies in this closed interval; anything else (or NaN/Inf) is refused."""

SHA256 = {
    "train": "f80bb964249ce30d9432921d0aae96f66ae16c721b03e528dfd538157857a686",
    "test": "c5c620860217ce41a1ba4022e42186425cc0615820cc35dfbabeec9d56475fd3",
}
"""Pinned SHA-256 of the float32 bytes of each split (see :func:`kronfisher.data.verify`)."""


def _dist2(ax, ay, bx, by):
    """Squared distance |a - b|^2 of float64 arrays, as two products and one sum."""
    dx = bx - ax
    dy = by - ay
    return dx * dx + dy * dy


def bezier_polylines(n: int, seed: int) -> np.ndarray:
    """Polyline vertices of ``n`` random curves, float64 of shape (n, SEGMENTS + 1, 2) as (x, y).

    Deterministic in ``seed``; the first ``m`` curves do not depend on ``n``.
    """
    rng = np.random.default_rng(seed)
    pts = MARGIN + (SIDE - 2.0 * MARGIN) * rng.random((n, 3, 2))
    x, y = pts[..., 0], pts[..., 1]
    # Squared length of the side opposite each vertex; that vertex is the middle point when
    # its side is the longest (first index on ties, as argmax).
    sides = np.stack(
        [_dist2(x[:, 1], y[:, 1], x[:, 2], y[:, 2]),
         _dist2(x[:, 2], y[:, 2], x[:, 0], y[:, 0]),
         _dist2(x[:, 0], y[:, 0], x[:, 1], y[:, 1])],
        axis=1,
    )
    mid = np.argmax(sides, axis=1)
    rows = np.arange(n)
    p1 = pts[rows, mid]
    p0 = pts[rows, (mid + 1) % 3]
    p2 = pts[rows, (mid + 2) % 3]
    a = np.sqrt(_dist2(p0[:, 0], p0[:, 1], p1[:, 0], p1[:, 1]))
    b = np.sqrt(_dist2(p1[:, 0], p1[:, 1], p2[:, 0], p2[:, 1]))
    total = a + b
    t1 = np.where(total > 0.0, a / np.where(total > 0.0, total, 1.0), 0.5)
    t1 = np.minimum(np.maximum(t1, 0.02), 0.98)[:, None]
    s1 = 1.0 - t1
    ctrl = (p1 - s1 * s1 * p0 - t1 * t1 * p2) / (2.0 * t1 * s1)
    t = (np.arange(SEGMENTS + 1, dtype=np.float64) / SEGMENTS)[None, :, None]
    s = 1.0 - t
    return (s * s) * p0[:, None] + (2.0 * t * s) * ctrl[:, None] + (t * t) * p2[:, None]


def _segment_dist2(px, py, ax, ay, dx, dy, inv_len2):
    """Squared distance of points (px, py) to segments a + t d, t in [0, 1] (broadcasting)."""
    wx = px - ax
    wy = py - ay
    t = (wx * dx + wy * dy) * inv_len2
    t = np.minimum(np.maximum(t, 0.0), 1.0)
    ex = wx - t * dx
    ey = wy - t * dy
    return ex * ex + ey * ey


def _intensity(d2: np.ndarray) -> np.ndarray:
    return np.minimum(np.maximum(REACH - np.sqrt(d2), 0.0), 1.0)


def _segments(poly: np.ndarray):
    ax, ay = poly[:, :-1, 0], poly[:, :-1, 1]
    dx = poly[:, 1:, 0] - ax
    dy = poly[:, 1:, 1] - ay
    inv_len2 = 1.0 / np.maximum(dx * dx + dy * dy, 1e-12)
    return ax, ay, dx, dy, inv_len2


def render_dense(poly: np.ndarray) -> np.ndarray:
    """Reference rasteriser: polylines float64 (B, K+1, 2) -> float64 (B, SIDE*SIDE) in [0, 1].

    Distance of every pixel centre to every segment, minimum over segments; memory
    ``B * SIDE^2 * K`` doubles, so for tests and small ``B`` only.
    """
    centres = np.arange(SIDE, dtype=np.float64) + 0.5
    px = np.tile(centres, SIDE)[None, :, None]  # column index -> x
    py = np.repeat(centres, SIDE)[None, :, None]  # row index -> y
    ax, ay, dx, dy, inv = (v[:, None, :] for v in _segments(poly))
    d2 = _segment_dist2(px, py, ax, ay, dx, dy, inv)  # (B, SIDE^2, K)
    return _intensity(d2.min(axis=2))


def render(poly: np.ndarray) -> np.ndarray:
    """Rasterise polylines float64 (B, K+1, 2) into float64 images (B, SIDE*SIDE) in [0, 1].

    Bit-identical to :func:`render_dense` but touches only a ``P x P`` patch of pixels around
    each segment (``P`` covers the longest segment plus the stroke's reach), on a canvas
    large enough for curves that leave the frame; the image is the frame cropped from it.
    """
    b = poly.shape[0]
    ax, ay, dx, dy, inv = _segments(poly)
    if b == 0:
        return np.zeros((0, SIDE * SIDE))
    lo_x = np.floor(np.minimum(ax, ax + dx) - REACH - 0.5)  # first pixel column that can be lit
    lo_y = np.floor(np.minimum(ay, ay + dy) - REACH - 0.5)
    extent = max(float(np.abs(dx).max()), float(np.abs(dy).max()))
    p = int(np.ceil(extent + 2.0 * REACH)) + 2
    # Canvas of pixels [c0, c1)^2 in image coordinates, holding every patch.
    c0 = int(min(lo_x.min(), lo_y.min(), 0.0))
    c1 = int(max(lo_x.max(), lo_y.max(), SIDE - p)) + p
    side = c1 - c0
    canvas = np.zeros(b * side * side)
    offs = np.arange(p, dtype=np.float64)
    first = (np.arange(b) * (side * side))[:, None, None]  # flat offset of each image's canvas
    for k in range(ax.shape[1]):
        cols = lo_x[:, k, None, None] + offs[None, None, :]  # (B, 1, P) pixel column
        rows = lo_y[:, k, None, None] + offs[None, :, None]  # (B, P, 1) pixel row
        d2 = _segment_dist2(
            cols + 0.5, rows + 0.5,
            ax[:, k, None, None], ay[:, k, None, None],
            dx[:, k, None, None], dy[:, k, None, None], inv[:, k, None, None],
        )
        # Exact small integers; pixels inside one patch are distinct, so take/put below is a
        # read-modify-write without collisions.
        flat = first + ((rows - c0) * side + (cols - c0)).astype(np.int64)
        canvas.put(flat, np.maximum(canvas.take(flat), _intensity(d2)))
    canvas = canvas.reshape(b, side, side)[:, -c0 : -c0 + SIDE, -c0 : -c0 + SIDE]
    return canvas.reshape(b, SIDE * SIDE)


def make_curves(n: int, seed: int, *, chunk: int = 256) -> torch.Tensor:
    """``n`` CURVES images as float32 of shape (n, 784), values in [0, 1].

    Deterministic in ``seed`` and the same bytes on every IEEE 754 machine and thread count
    (see the module docstring); ``make_curves(m, s)`` is the first ``m`` rows of
    ``make_curves(n, s)`` for ``m <= n``. ``chunk`` only bounds memory.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    poly = bezier_polylines(n, seed)
    out = np.empty((n, SIDE * SIDE), dtype=np.float32)
    for start in range(0, n, chunk):
        out[start : start + chunk] = render(poly[start : start + chunk])
    return torch.from_numpy(out)


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
        value_range=VALUE_RANGE,
        build_hint=generated_mismatch_hint("curves", "curves.SHA256"),
    )
