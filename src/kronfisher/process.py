"""Process helpers shared by the data cache and the result-folder lock."""

from __future__ import annotations

import os

__all__ = ["pid_alive"]


def pid_alive(pid: int) -> bool:
    """Whether a process with id ``pid`` may still be running on this machine.

    Conservative: a process that exists but belongs to another user, or whose state cannot
    be read, counts as alive, so its temporary files and locks are left alone. Ids ≤ 0 are
    never a single process (``kill(0, 0)`` would signal the whole process group) and count
    as not running.
    """
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: exists, owned by someone else; other: cannot tell
        return True
    return True
