"""Temporary folders of local reward servers (port files, log, result cache), one per client.

A folder is named flowgrpo-rewards-<pid>-<random> after the process that made it, so that a
client starting later can remove the folders of processes that died without cleaning up
(kill -9 of a trainer skips RewardClient.close).
"""

import os
import pathlib
import shutil
import tempfile

PREFIX = "flowgrpo-rewards-"


def create(root=None) -> pathlib.Path:
    """A new folder for this process, after removing stale ones of dead processes."""
    remove_stale(root)
    return pathlib.Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=root))


def remove_stale(root=None) -> list:
    """Removes this user's folders whose process is gone; returns their paths."""
    removed = []
    for path in pathlib.Path(root or tempfile.gettempdir()).glob(PREFIX + "*"):
        pid = _owner_pid(path.name)
        if pid is None or _alive(pid) or path.is_symlink() or not path.is_dir():
            continue
        if path.stat().st_uid != os.getuid():
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _owner_pid(name: str):
    pid, sep, _ = name[len(PREFIX):].partition("-")
    return int(pid) if sep and pid.isascii() and pid.isdigit() and len(pid) <= 10 else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
