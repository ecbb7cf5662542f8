"""The erasekit CLI (``python exit_threads.py erase ...`` runs what ``python -m erasekit erase ...`` runs), which
reports on stderr, at interpreter exit, the threads the process still runs: ``threads at exit: ["python3", ...]``
(the names in /proc/self/task; none on a system without it). A distributed process group left alive there keeps
its threads (gloo's are ``pt_gloo_runloop`` and ``gloo_tcp_loop``), which can abort the process as it exits.
"""

from __future__ import annotations

import atexit
import json
import os
import sys

from erasekit.cli import main


def report_threads() -> None:
    tasks = "/proc/self/task"
    names = sorted(open(f"{tasks}/{t}/comm").read().strip() for t in os.listdir(tasks)) if os.path.isdir(tasks) else []
    sys.stderr.write(f"threads at exit: {json.dumps(names)}\n")  # one write: the other process writes beside it


if __name__ == "__main__":
    atexit.register(report_threads)
    sys.argv[0] = "erasekit"
    main()
