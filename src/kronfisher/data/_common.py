"""Shared helpers of :mod:`kronfisher.data`: cache location, checksums, atomic ``.npz`` I/O.

Conventions: every data set is a float32 array of shape ``(n, features)`` in C order; its
checksum is the SHA-256 of those float32 bytes (little-endian, row-major; the shape is checked
separately). Caches are ``.npz`` files holding one array per split.
"""

from __future__ import annotations

import hashlib
import os
import warnings
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np

ENV_CACHE = "KRONFISHER_DATA"
"""Environment variable that overrides the default cache directory."""

ENV_UNPINNED = "KRONFISHER_DATA_UNPINNED"
"""Set to ``1`` to turn checksum mismatches of *derived* arrays into warnings (not raw files)."""


class DatasetError(RuntimeError):
    """A data set could not be fetched, built or verified; the message says what to do."""


def cache_dir() -> Path:
    """Default cache directory: ``$KRONFISHER_DATA`` if set, else ``~/.cache/kronfisher``."""
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "kronfisher"


def resolve_cache_dir(path: str | os.PathLike[str] | None) -> Path:
    """``path`` (or :func:`cache_dir` when ``None``) as a created directory."""
    root = Path(path).expanduser() if path is not None else cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatasetError(
            f"cannot create the data cache directory {root}: {exc}. Pass cache_dir=... or set "
            f"${ENV_CACHE} to a writable directory."
        ) from exc
    return root


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_array(array: np.ndarray) -> str:
    """Hex SHA-256 of ``array`` as little-endian float32 bytes in C order."""
    arr = np.ascontiguousarray(array, dtype="<f4")
    return hashlib.sha256(memoryview(arr).cast("B")).hexdigest()


def unpinned_allowed() -> bool:
    """Whether ``$KRONFISHER_DATA_UNPINNED`` asks to accept unpinned derived arrays."""
    return os.environ.get(ENV_UNPINNED, "").strip().lower() in {"1", "true", "yes"}


def check_arrays(
    arrays: Mapping[str, np.ndarray],
    pins: Mapping[str, str],
    shapes: Mapping[str, tuple[int, ...]],
    *,
    what: str,
    hint: str,
    strict: bool = False,
) -> dict[str, str]:
    """Check dtype, shape and pinned SHA-256 of each named array; raise :class:`DatasetError`.

    ``hint`` is appended to the message and should say what to do. Unless ``strict``,
    ``$KRONFISHER_DATA_UNPINNED=1`` turns a checksum mismatch (not a shape mismatch) into a
    warning. Returns the computed checksums.
    """
    sums = {}
    for split, pin in pins.items():
        if split not in arrays:
            raise DatasetError(f"{what}: split {split!r} is missing. {hint}")
        arr = arrays[split]
        if arr.dtype != np.float32 or arr.shape != tuple(shapes[split]):
            raise DatasetError(
                f"{what}: split {split!r} has dtype {arr.dtype} and shape {arr.shape}, expected "
                f"float32 {tuple(shapes[split])}. {hint}"
            )
        got = sums[split] = sha256_array(arr)
        if got != pin:
            msg = f"{what}: split {split!r} has sha256 {got}, expected {pin}. {hint}"
            if not strict and unpinned_allowed():
                warnings.warn(f"{msg} (accepted because ${ENV_UNPINNED} is set)", stacklevel=3)
            else:
                raise DatasetError(f"{msg} (Set ${ENV_UNPINNED}=1 to accept it at your own risk.)")
    return sums


def save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``arrays`` to the uncompressed ``.npz`` file ``path`` atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **{k: np.ascontiguousarray(v) for k, v in arrays.items()})
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DatasetError(f"cannot write the data cache {path}: {exc}") from exc


def load_npz(path: Path, keys: Iterable[str]) -> dict[str, np.ndarray]:
    """Read the arrays ``keys`` from the ``.npz`` file ``path`` (no pickles)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in keys}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise DatasetError(
            f"the cached data file {path} is unreadable ({type(exc).__name__}: {exc}). Delete it "
            "and call load_dataset again to rebuild it."
        ) from exc


def cached_splits(
    path: Path,
    wanted: Iterable[str],
    build: Callable[[], dict[str, np.ndarray]],
    pins: Mapping[str, str],
    shapes: Mapping[str, tuple[int, ...]],
    *,
    what: str,
    build_hint: str,
) -> dict[str, np.ndarray]:
    """Return the splits ``wanted`` from the cache ``path``, building and caching it if missing.

    Every split read from the cache is checked against ``pins``; a fresh build is checked in full
    before it is written (``build_hint`` explains a mismatch there).
    """
    wanted = list(wanted)
    if path.exists():
        arrays = load_npz(path, wanted)
        check_arrays(
            arrays,
            {s: pins[s] for s in wanted},
            shapes,
            what=f"{what} (cache {path})",
            hint=f"The cache file is corrupt or stale: delete {path} and call load_dataset "
            "again to rebuild it.",
        )
        return arrays
    arrays = build()
    check_arrays(arrays, pins, shapes, what=f"{what} (fresh build)", hint=build_hint)
    save_npz(path, arrays)
    return {s: arrays[s] for s in wanted}
