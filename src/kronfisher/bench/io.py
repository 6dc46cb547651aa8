"""Result files: atomic writes, early writability checks, and a rescue path for failed writes.

A killed process never leaves a half-written result behind (temporary file + os.replace);
result files get the permissions of any file the user creates (0o666 & ~umask, like the
plots), not tempfile's private 0600.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

__all__ = [
    "OutputError",
    "atomic_write_text",
    "write_json",
    "read_json",
    "write_csv",
    "csv_text",
    "check_writable_dir",
    "save_text",
    "save_json",
    "move_aside",
]


class OutputError(OSError):
    """An output folder or file cannot be written (the message says which and why)."""


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; restore at once
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically, with mode 0o666 & ~umask.

    The text goes to a temporary file in the same folder, then ``os.replace`` moves it
    over ``path``: a killed process never leaves a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _json_text(obj) -> str:
    return json.dumps(obj, indent=1, sort_keys=True) + "\n"


def write_json(path: str | Path, obj) -> None:
    """Write ``obj`` as indented, key-sorted JSON with :func:`atomic_write_text`."""
    atomic_write_text(path, _json_text(obj))


def read_json(path: str | Path):
    """The parsed JSON content of ``path`` (UTF-8)."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def csv_text(rows: list[dict]) -> str:
    """CSV with a header from the first row's keys (empty string for no rows)."""
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return buf.getvalue()


def write_csv(path: str | Path, rows: list[dict]) -> None:
    """Write ``rows`` as CSV (see :func:`csv_text`) with :func:`atomic_write_text`."""
    atomic_write_text(path, csv_text(rows))


def _why(e: OSError) -> str:
    return e.strerror or str(e)


def check_writable_dir(path: str | Path) -> Path:
    """Create the folder ``path`` if needed and prove that a file can be written in it.

    Run before a long computation, so that a bad ``--out`` fails in a second instead of
    after the training. A probe file of 4 KiB is written, fsynced and removed (a full
    disk fails here; a disk that fills up later is handled by :func:`save_text`).

    Raises:
        OutputError: ``path`` is an existing file, cannot be created, or is not writable.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"output folder {path} exists and is not a folder (give a folder"
                          " path; the result files are created inside it)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create output folder {path}: {_why(e)}") from e
    try:
        fd, tmp = tempfile.mkstemp(prefix=".kronfisher-write-test.", dir=path)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(b"\0" * 4096)
                f.flush()
                os.fsync(f.fileno())
        finally:
            os.unlink(tmp)
    except OSError as e:
        raise OutputError(f"cannot write in output folder {path}: {_why(e)}") from e
    return path


def save_text(path: str | Path, text: str, *, echo=None) -> Path | None:
    """Write ``text`` to ``path``; if that fails, keep it somewhere else and say where.

    The fallback is ``<tempdir>/kronfisher-rescue-<pid>/<name>``; if that fails too, the
    text is printed to stdout between marker lines. ``echo`` (default: print to stderr)
    receives the message.

    Returns:
        The path written (``path`` itself or the rescue file), or None if printed.
    """
    say = echo or (lambda msg: print(msg, file=sys.stderr, flush=True))
    path = Path(path)
    try:
        atomic_write_text(path, text)
        return path
    except OSError as e:
        first = _why(e)
    rescue = Path(tempfile.gettempdir()) / f"kronfisher-rescue-{os.getpid()}" / path.name
    try:
        atomic_write_text(rescue, text)
    except OSError as e:
        say(f"kronfisher: could not write {path} ({first}) nor {rescue} ({_why(e)});"
            " printing it instead")
        print(f"----- begin {path.name} -----\n{text}----- end {path.name} -----", flush=True)
        return None
    say(f"kronfisher: could not write {path} ({first}); saved it to {rescue} instead")
    return rescue


def save_json(path: str | Path, obj, *, echo=None) -> Path | None:
    """:func:`save_text` of the JSON :func:`write_json` would write."""
    return save_text(path, _json_text(obj), echo=echo)


def move_aside(path: str | Path, reason: str) -> Path:
    """Rename ``path`` (a file or folder) to a free ``<name>.<reason>-<time>`` beside it.

    Used instead of overwriting or deleting a result; returns the new path.
    """
    path = Path(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = path.with_name(f"{path.name}.{reason}-{stamp}")
    n = 1
    while aside.exists():
        aside = path.with_name(f"{path.name}.{reason}-{stamp}-{n}")
        n += 1
    os.replace(path, aside)
    return aside
