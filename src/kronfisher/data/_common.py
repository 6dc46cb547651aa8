"""Shared helpers of :mod:`kronfisher.data`: cache location, checksums, atomic ``.npz`` I/O.

Conventions: every data set is a float32 array of shape ``(n, features)`` in C order; its
checksum is the SHA-256 of those float32 bytes (little-endian, row-major; the shape is checked
separately). Caches are ``.npz`` files holding one array per split.
"""

from __future__ import annotations

import hashlib
import os
import time
import warnings
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..process import pid_alive

ENV_CACHE = "KRONFISHER_DATA"
"""Environment variable that overrides the default cache directory."""

ENV_UNPINNED = "KRONFISHER_DATA_UNPINNED"
"""Set to ``1`` to turn checksum mismatches of *derived* arrays into warnings (not raw files)."""


STALE_TMP_SECONDS = 3600.0
"""A cache temporary older than this is removed even if its writer's PID is alive."""

REPORT_COMMAND = "python -m kronfisher.data report"
"""Prints the platform facts and checksums to attach to a report of a generated-data mismatch."""


class DatasetError(RuntimeError):
    """A data set could not be fetched, built or verified; the message says what to do."""


@dataclass(frozen=True)
class SplitCheck:
    """Outcome of checking one split against its pin.

    Attributes:
        split: split name.
        sha256: checksum of the array's float32 bytes.
        pinned: the pinned checksum.
    """

    split: str
    sha256: str
    pinned: str

    @property
    def ok(self) -> bool:
        """Whether the checksum equals the pin."""
        return self.sha256 == self.pinned


def generated_mismatch_hint(name: str, pin_name: str) -> str:
    """What to say when a freshly *generated* set (no download involved) misses its pin."""
    return (
        f"This set is generated on this machine, so the likely causes are (a) the generator code "
        f"changed (if you edited kronfisher/data/{name}.py: re-pin {pin_name} and bump "
        f"CACHE_FILE) or (b) this platform computes it differently, which is a bug: please "
        f"report it with the output of `{REPORT_COMMAND} {name}`. Nothing was written to the "
        f"cache."
    )


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
    return hashlib.sha256(arr.tobytes()).hexdigest()


def unpinned_allowed() -> bool:
    """Whether ``$KRONFISHER_DATA_UNPINNED`` asks to accept unpinned derived arrays."""
    return os.environ.get(ENV_UNPINNED, "").strip().lower() in {"1", "true", "yes"}


def check_values(
    array: np.ndarray, value_range: tuple[float, float] | None, *, what: str, split: str
) -> None:
    """Refuse NaN/Inf and values outside ``value_range`` (inclusive) with a DatasetError.

    Never relaxed by ``$KRONFISHER_DATA_UNPINNED``: such data would train to garbage.
    """
    count, first = 0, None
    for start in range(0, array.shape[0], 8192):
        block = array[start : start + 8192]
        bad = ~np.isfinite(block)
        if value_range is not None:
            with np.errstate(invalid="ignore"):
                bad |= (block < value_range[0]) | (block > value_range[1])
        n_bad = int(np.count_nonzero(bad))
        if n_bad and first is None:
            row, col = (int(v[0]) for v in np.nonzero(bad))
            first = (float(block[row, col]), start + row, col)
        count += n_bad
    if first is not None:
        allowed = "finite values" if value_range is None else f"values in {list(value_range)}"
        raise DatasetError(
            f"{what}: split {split!r} holds {count} invalid values (first: {first[0]!r} at row "
            f"{first[1]}, column {first[2]}); expected {allowed}. Such data is refused even "
            f"with ${ENV_UNPINNED} set."
        )


def check_arrays(
    arrays: Mapping[str, np.ndarray],
    pins: Mapping[str, str],
    shapes: Mapping[str, tuple[int, ...]],
    *,
    what: str,
    hint: str,
    mismatch: str = "env",
    value_range: tuple[float, float] | None = None,
) -> dict[str, SplitCheck]:
    """Check dtype, shape, values and pinned SHA-256 of each named array.

    Raises :class:`DatasetError` (``hint`` appended; it should say what to do) for a missing
    split, a wrong dtype/shape, non-finite values or values outside ``value_range``. A checksum
    mismatch raises too when ``mismatch="raise"``; with ``"env"`` (default) it only warns if
    ``$KRONFISHER_DATA_UNPINNED=1``; with ``"report"`` it is only recorded. Returns one
    :class:`SplitCheck` per pinned split (``ok`` False where a mismatch was let through).
    """
    if mismatch not in ("raise", "env", "report"):
        raise ValueError(f"mismatch must be 'raise', 'env' or 'report', got {mismatch!r}")
    checks = {}
    for split, pin in pins.items():
        if split not in arrays:
            raise DatasetError(f"{what}: split {split!r} is missing. {hint}")
        arr = arrays[split]
        if arr.dtype != np.float32 or arr.shape != tuple(shapes[split]):
            raise DatasetError(
                f"{what}: split {split!r} has dtype {arr.dtype} and shape {arr.shape}, expected "
                f"float32 {tuple(shapes[split])}. {hint}"
            )
        check_values(arr, value_range, what=what, split=split)
        check = checks[split] = SplitCheck(split, sha256_array(arr), pin)
        if not check.ok and mismatch != "report":
            msg = f"{what}: split {split!r} has sha256 {check.sha256}, expected {pin}. {hint}"
            if mismatch == "env" and unpinned_allowed():
                warnings.warn(
                    f"{msg} (UNVERIFIED data accepted because ${ENV_UNPINNED} is set)",
                    stacklevel=3,
                )
            else:
                raise DatasetError(f"{msg} (Set ${ENV_UNPINNED}=1 to accept it at your own risk.)")
    return checks


def remove_stale_temporaries(path: Path, *, max_age: float = STALE_TMP_SECONDS) -> list[Path]:
    """Delete ``.{path.name}.PID.tmp`` files left by killed writers; return what was removed.

    A temporary is stale when no process ``PID`` is alive or when it is older than
    ``max_age`` seconds (PIDs get reused). Each removal is announced with a warning.
    """
    removed = []
    now = time.time()
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        pid_text = tmp.name[len(path.name) + 2 : -len(".tmp")]
        try:
            age = now - tmp.stat().st_mtime
        except OSError:
            continue
        dead = not pid_text.isdigit() or not pid_alive(int(pid_text))
        if dead or age > max_age:
            try:
                size = tmp.stat().st_size
                tmp.unlink()
            except OSError:
                continue
            removed.append(tmp)
            why = "its writer is gone" if dead else f"it is {age / 3600:.1f} h old"
            warnings.warn(
                f"removed the stale temporary {tmp} ({size / 1e6:.1f} MB; {why}: an earlier "
                "build was killed while writing)",
                stacklevel=2,
            )
    return removed


def _discard(tmp: Path) -> None:
    """Remove a temporary if it exists; a failure here must not hide the error being raised.

    (On a read-only file system even unlinking a missing file fails, with EROFS.)
    """
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass


def check_cache_writable(path: Path) -> None:
    """Raise DatasetError now, before a build, if the cache file ``path`` cannot be written.

    A probe file is created and removed in ``path``'s folder.
    """
    probe = path.with_name(f".{path.name}.{os.getpid()}.probe")
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
    except OSError as exc:
        raise DatasetError(
            f"cannot write the data cache directory {path.parent} ({exc.strerror or exc}), so"
            f" {path.name} could not be cached: nothing was built. Set ${ENV_CACHE} to a"
            " writable directory (or pass cache_dir=...)."
        ) from exc
    _discard(probe)


def save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``arrays`` to the uncompressed ``.npz`` file ``path`` atomically.

    Raises:
        DatasetError: the file cannot be written (the temporary is removed if it can be).
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            contiguous: dict[str, Any] = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
            np.savez(f, **contiguous)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        _discard(tmp)
        raise DatasetError(f"cannot write the data cache {path}: {exc}") from exc
    except BaseException:  # e.g. KeyboardInterrupt: never leave the temporary behind
        _discard(tmp)
        raise


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
    value_range: tuple[float, float] | None = None,
) -> dict[str, np.ndarray]:
    """Return the splits ``wanted`` from the cache ``path``, building and caching it if missing.

    Every split read from the cache is checked against ``pins`` and for NaN/Inf and values
    outside ``value_range``; a fresh build is checked in full before it is written
    (``build_hint`` explains a mismatch there), so a failed check writes nothing. Stale
    temporaries of killed earlier builds are removed before a build.
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
            value_range=value_range,
        )
        return arrays
    remove_stale_temporaries(path)
    check_cache_writable(path)  # before the build, which may take minutes
    arrays = build()
    check_arrays(
        arrays,
        pins,
        shapes,
        what=f"{what} (fresh build)",
        hint=build_hint,
        value_range=value_range,
    )
    save_npz(path, arrays)
    return {s: arrays[s] for s in wanted}
