"""The temporaries erasekit writes beside an output before renaming them over it, and the removal of those a
killed writer left behind.

A temporary is named ``.<output name>.<host>_<pid>.<random>.incomplete``: the machine and process that write it.
Before writing a new one, a writer removes the temporaries of the same output whose process is gone on this
machine (a SIGKILL, a power cut: no ``finally`` ran). Those of a live process, of another machine (a shared
folder), of another user (a shared sticky folder such as /tmp, where removing them is not ours to do) or named
otherwise are left alone, and one that cannot be removed (permission denied) is skipped. Windows keeps them:
there, probing a process id with ``os.kill`` would end it.

The machine is told by its host name and the process by its id. Two containers that share a folder, a host name
and not a PID namespace can see each other's live writers as gone: give them different host names (docker run
--hostname), or distinct output folders.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import socket
from pathlib import Path

SUFFIX = ".incomplete"


def prefix(output: Path) -> str:
    """The start of a new temporary's name for ``output``, up to its random part."""
    return f".{output.name}.{_host()}_{os.getpid()}."


def remove_stale(output: Path) -> list[Path]:
    """Remove the temporaries beside ``output`` left by an erasekit process of this machine that is gone; returns
    them."""
    if os.name == "nt":
        return []
    start = f".{output.name}."
    removed = []
    for path in output.parent.glob(glob.escape(start) + "*" + SUFFIX):
        writer = path.name[len(start) : -len(SUFFIX)].rpartition(".")[0]  # "<host>_<pid>"
        host, _, pid = writer.rpartition("_")
        if host != _host() or not pid.isdigit() or not _mine(path) or _alive(int(pid)):
            continue
        try:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        except FileNotFoundError:
            pass
        except PermissionError:
            continue
        removed.append(path)
    return removed


def _mine(path: Path) -> bool:
    try:
        return path.lstat().st_uid == os.getuid()
    except FileNotFoundError:
        return False


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "-", socket.gethostname()) or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process (or an id no process can have)
        return True
    return True
