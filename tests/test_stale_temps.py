"""A writer killed mid-write leaves its hidden temporary beside the output; the next write to that output removes
it, and nothing else (a live writer's, another machine's, another output's)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from erasekit import _temps
from erasekit.checkpoints.apply import apply_to_checkpoint
from erasekit.checkpoints.journal import journal_dir
from erasekit.format import _st

pytestmark = pytest.mark.skipif(os.name == "nt", reason="Windows keeps stale temporaries (see erasekit._temps)")


def killed_mid_write(out: Path, data: bytes = b"half a patch") -> Path:
    """The temporary an erasekit process leaves when it dies inside an atomic write (no cleanup runs)."""
    code = (
        "import os, sys; from pathlib import Path; from erasekit.format import _st\n"
        "with _st.atomic_write(Path(sys.argv[1])) as f:\n"
        f"    f.write({data!r}); f.flush(); os._exit(9)\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True)
    assert r.returncode == 9, r.stderr
    (left,) = out.parent.glob(f".{out.name}.*.incomplete")
    return left


def test_the_next_write_removes_what_a_killed_writer_left(tmp_path: Path) -> None:
    out = tmp_path / "p.erasepatch"
    left = killed_mid_write(out)
    assert left.read_bytes() == b"half a patch" and not out.exists()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = _temps._host()
        kept = [
            tmp_path / f".p.erasepatch.{host}_{live.pid}.x1.incomplete",  # a writer still at work
            tmp_path / f".p.erasepatch.elsewhere_{os.getpid() + 1}.x2.incomplete",  # another machine's
            # another output's (p.erasepatch.old), left by the same dead writer: its name matches p's pattern
            tmp_path / f".p.erasepatch.old.{left.name.split('.')[3]}.x3.incomplete",
            tmp_path / ".p.erasepatch.notes.incomplete",
        ]  # not named by erasekit
        for k in kept:
            k.write_bytes(b"keep")
        with _st.atomic_write(out) as f:
            f.write(b"whole")
        assert out.read_bytes() == b"whole" and not left.exists()
        assert all(k.read_bytes() == b"keep" for k in kept)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, *(k.name for k in kept)])
    finally:
        live.kill()
        live.wait()


def test_apply_to_an_output_removes_a_killed_copy_and_its_journal(
    tmp_path: Path, sd1: tuple[Path, Path], sd1_patch: Path
) -> None:
    """``apply -o`` stages a copy of the checkpoint (gigabytes, for real models) and its journal; a run killed while
    copying leaves both, and the next apply to the same output removes them."""
    out = tmp_path / "patched.safetensors"
    left = killed_mid_write(out, b"part of a checkpoint")
    (journal_dir(left)).mkdir(parents=True)
    (journal_dir(left) / "journal.json").write_text("{}")
    apply_to_checkpoint([sd1_patch], sd1[0], output=out)
    assert out.is_file() and not left.exists() and not journal_dir(left).exists()
    assert not list(tmp_path.glob(".*.incomplete"))
