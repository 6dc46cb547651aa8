"""One writer per output folder: a lock file naming the process that holds it.

Two ``compare`` processes on one folder would train the same runs twice and overwrite
each other's summary. The lock is a file ``.kronfisher.lock`` with the holder's PID, host
and start time, created atomically (a complete file hard-linked into place, so a reader
never sees it half-written). A lock whose PID no longer runs on this host is stale and
taken over, with a message.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from ..process import pid_alive

__all__ = ["FolderLockedError", "folder_lock", "LOCK_NAME"]

LOCK_NAME = ".kronfisher.lock"


class FolderLockedError(RuntimeError):
    """Another live process holds the folder's lock."""


def _read(path: Path) -> dict | None:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _create(path: Path, info: dict) -> bool:
    """Atomically create ``path`` holding ``info``; False if it already exists."""
    fd, tmp = tempfile.mkstemp(prefix=".kronfisher-lock.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(info, f)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # no hard links on this file system: exclusive create instead
            try:
                fd2 = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd2, "w", encoding="utf-8") as f:
                json.dump(info, f)
        return True
    finally:
        os.unlink(tmp)


@contextlib.contextmanager
def folder_lock(folder: str | Path, *, what: str = "kronfisher", echo=print) -> Iterator[Path]:
    """Hold ``folder/.kronfisher.lock`` for the duration of the ``with`` block.

    Raises:
        FolderLockedError: a running process (this host) holds the lock, or a process on
            another host does (its liveness cannot be checked: the message says how to
            remove the lock by hand).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
          "what": what}
    for _ in range(5):
        if _create(path, me):
            break
        held = _read(path)
        if held is None:  # unreadable: a writer without hard links is mid-write, or junk
            if time.time() - _mtime(path) < 5.0:
                time.sleep(0.2)
                continue
        else:
            pid, host = held.get("pid"), held.get("host")
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held.get("started", 0)))
            if host != me["host"]:
                raise FolderLockedError(
                    f"{folder} is locked by {held.get('what', 'a process')} PID {pid} on host"
                    f" {host!r} (since {since}); if that run is over, delete {path}"
                )
            if isinstance(pid, int) and pid != me["pid"] and pid_alive(pid):
                raise FolderLockedError(
                    f"{folder} is in use by another {held.get('what', 'kronfisher')} process"
                    f" (PID {pid}, since {since}); wait for it to finish or choose another"
                    " output folder"
                )
        echo(f"kronfisher: taking over the stale lock {path}"
             + (f" of PID {held.get('pid')} (no longer running)" if held else " (unreadable)"))
        _take_over(path, held)
    else:
        raise FolderLockedError(f"could not acquire {path}; another process keeps taking it")
    try:
        yield path
    finally:
        if _read(path) == me:
            with contextlib.suppress(OSError):
                path.unlink()


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _take_over(path: Path, held: dict | None) -> None:
    """Remove a stale lock, unless another process replaced it meanwhile."""
    aside = path.with_name(f"{path.name}.stale-{os.getpid()}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return  # someone else removed it: just retry
    if _read(aside) != held:  # a live holder's fresh lock: put it back, retry
        with contextlib.suppress(OSError):
            os.link(aside, path)
    with contextlib.suppress(OSError):
        aside.unlink()
