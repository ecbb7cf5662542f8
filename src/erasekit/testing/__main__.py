"""``python -m erasekit.testing LAYOUT PATH`` writes a tiny random checkpoint; ``python -m erasekit.testing fuzz
--n 10000`` runs a fuzz campaign over the patch and checkpoint readers."""

from __future__ import annotations

import sys


def run(argv: list[str]) -> int:
    if argv[:1] == ["fuzz"]:
        from .fuzz import main as fuzz_main

        return fuzz_main(argv[1:])
    from . import main

    return main(argv)


sys.exit(run(sys.argv[1:]))
