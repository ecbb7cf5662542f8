"""Opt-in: erasekit end to end on a full-size SD1.x single file (random weights, F16, ~2 GB) with no --config.

Runs bench/real_size.py's sequence (build, inspect, erase, generate, apply --in-place, revert) through the real
CLI. Several minutes and ~8 GB of RAM on a 2-core CPU, 2 GB of disk, so it only runs with ERASEKIT_REAL_SIZE=1.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    os.environ.get("ERASEKIT_REAL_SIZE") != "1",
    reason="builds a full-size SD1.x checkpoint and erases at real size (minutes, "
    "~8 GB RAM, 2 GB disk); set ERASEKIT_REAL_SIZE=1",
)

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "real_size.py"


def _bench_module():
    spec = importlib.util.spec_from_file_location("erasekit_bench_real_size", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclass needs the module registered
    spec.loader.exec_module(mod)
    return mod


def test_full_size_sd1_single_file_without_config(tmp_path: Path) -> None:
    bench = _bench_module()
    work = tmp_path / "work"
    try:
        steps, facts = bench.run_all(work)
        print("\n" + bench.table(steps))
        by_name = {s.name: s for s in steps}
        assert [s.name for s in steps] == [
            "build (this process)",
            "inspect",
            "erase",
            "generate",
            "apply --in-place",
            "inspect (applied)",
            "apply --revert",
        ]
        assert all(s.code == 0 for s in steps), [(s.name, s.code) for s in steps]
        assert 1.9e9 < facts["model_bytes"] < 2.3e9  # F16: ~1.07 B params at 2 bytes each
        assert facts["config"].startswith("sd1 ("), facts["config"]  # picked the bundled config from the keys
        assert facts["base_config"].startswith("sd1 ("), facts["base_config"]  # and the patch records it
        assert len([p for p in (work / "gen").glob("*.png") if p.name != "grid.png"]) == 1  # the one image
        assert facts["sha_applied"] != facts["sha_before"]
        assert by_name["inspect (applied)"].ok, by_name["inspect (applied)"].result  # lists the applied patch
        assert facts.get("sha_reverted") == facts["sha_before"]  # bit-exact revert
        assert all(s.ok for s in steps), [(s.name, s.result) for s in steps if not s.ok]
    finally:
        shutil.rmtree(work, ignore_errors=True)  # pytest keeps old tmp dirs; don't leave 2 GB behind
