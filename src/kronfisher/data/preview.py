"""Statistics and a PNG contact sheet of a data set (`python -m kronfisher.data stats|samples`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class ImageStats:
    """Summary of a split with values in [0, 1].

    Attributes:
        mean_image_bce: per-pixel Bernoulli NLL (nats) of predicting every image by the mean
            image of the split: ``mean_j H(p_j)`` with ``p_j`` pixel ``j``'s mean and ``H``
            the binary entropy; the loss an auto-encoder plateaus at before it learns anything
            image-specific.
        mean_intensity: mean pixel value.
        nonzero_fraction: fraction of pixels that are not exactly 0.
    """

    mean_image_bce: float
    mean_intensity: float
    nonzero_fraction: float


def image_stats(x: np.ndarray) -> ImageStats:
    """:class:`ImageStats` of images ``x`` (n, features) with values in [0, 1] (float64 maths).

    The binary cross-entropy of targets ``x`` against the prediction ``p`` is linear in ``x``,
    so its mean over the split equals ``mean_j H(p_j)`` exactly; ``0 log 0 = 0``.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"expected a non-empty (n, features) array, got shape {x.shape}")
    p = x.mean(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(np.where(p > 0, p * np.log(p), 0.0) + np.where(p < 1, (1 - p) * np.log1p(-p), 0.0))
    return ImageStats(float(h.mean()), float(x.mean()), float((x != 0).mean()))


def save_contact_sheet(
    images: np.ndarray, side: int, path: Path, title: str, *, cols: int = 8
) -> Path:
    """Write the flattened images (n, side*side) as a grid PNG to ``path`` (needs matplotlib).

    Each image is shown with its own grey scale (min black, max white).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError("samples needs matplotlib: pip install -e '.[bench]'") from exc
    n = images.shape[0]
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.9, rows * 0.9 + 0.4), squeeze=False)
    for k, ax in enumerate(axes.ravel()):
        ax.set_axis_off()
        if k < n:
            ax.imshow(images[k].reshape(side, side), cmap="gray", interpolation="nearest")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
