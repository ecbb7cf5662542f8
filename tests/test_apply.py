"""apply / revert behaviour on files: stacking, fingerprints, refusals that change nothing, crash safety."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import snapshot

from erasekit.checkpoints.apply import apply_to_checkpoint, revert_from_checkpoint
from erasekit.checkpoints.diff import diff_checkpoints
from erasekit.checkpoints.inspect import inspect_path
from erasekit.checkpoints.journal import journal_dir
from erasekit.checkpoints.layouts import detect
from erasekit.errors import (
    ErasekitError,
    FingerprintMismatchError,
    IncompatiblePatchError,
    NonFiniteError,
    NotAppliedError,
    RevertOrderError,
    TargetLockedError,
    TargetNotWritableError,
    UndoRecordError,
)
from erasekit.format import _st
from erasekit.testing import make_checkpoint

FC1_W1 = "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc1.weight"


def patch_for(tmp_path: Path, base: Path, layers: list[int], name: str, edit_seed: int = 0) -> Path:
    dtype = detect(base).files[0].tensor_info()[FC1_W1][0]
    edited = make_checkpoint(
        tmp_path / f"{name}-edited.safetensors", "single-sd1", dtype, edit_layers=layers, edit_seed=edit_seed
    )
    out = tmp_path / f"{name}.erasepatch"
    diff_checkpoints(base, edited, output=out, title=name)
    return out


def read(path: Path, key: str = FC1_W1) -> np.ndarray:
    return detect(path).files[0].read_numpy(key)


def test_strength_scales_the_delta(tmp_path: Path, sd1: tuple[Path, Path], sd1_patch: Path) -> None:
    base, edited = sd1
    w0, w1 = read(base), read(edited)
    apply_to_checkpoint([sd1_patch], base, in_place=True, strength=0.5)
    np.testing.assert_allclose(read(base), w0 + 0.5 * (w1 - w0), atol=1e-4)


def test_stacking_and_revert_order(tmp_path: Path, sd1: tuple[Path, Path], sd1_patch: Path) -> None:
    base, _ = sd1
    original = snapshot(base)
    other = patch_for(tmp_path, base, [0], "layer-0 edit")
    again = patch_for(tmp_path, base, [1], "layer-1 again", edit_seed=1)
    rep = apply_to_checkpoint([sd1_patch, other], base, in_place=True)
    assert [a.title for a in rep.applied] == ["layer-1 edit", "layer-0 edit"]
    assert [a["title"] for a in inspect_path(base).applied] == ["layer-1 edit", "layer-0 edit"]
    # disjoint tensors: the older patch can be reverted first
    revert_from_checkpoint(sd1_patch, base)
    apply_to_checkpoint([sd1_patch], base, in_place=True, strength=0.5)
    # a patch on the same tensors stacks; its fingerprint is checked against the original bytes
    rep = apply_to_checkpoint([again], base, in_place=True)
    assert rep.applied[0].fingerprint == "exact"
    with pytest.raises(RevertOrderError, match="revert those first"):
        revert_from_checkpoint(sd1_patch, base)
    for p in (again, sd1_patch, other):
        revert_from_checkpoint(p, base)
    assert snapshot(base) == original
    assert not inspect_path(base).applied


def test_fingerprint_mismatch_refused_then_forced(tmp_path: Path, sd1_patch: Path) -> None:
    stranger = make_checkpoint(tmp_path / "other.safetensors", "single-sd1", "F16", seed=5)
    before = snapshot(stranger)
    with pytest.raises(FingerprintMismatchError, match=r"4 of 4 tensors .* differ .*force it to apply anyway") as e:
        apply_to_checkpoint([sd1_patch], stranger, in_place=True)
    assert (e.value.differing, e.value.total) == (4, 4)
    assert snapshot(stranger) == before and not journal_dir(stranger).joinpath("journal.json").exists()
    rep = apply_to_checkpoint([sd1_patch], stranger, in_place=True, force=True)
    assert (rep.applied[0].fingerprint, rep.applied[0].differing) == ("forced", 4)


def test_other_precision_is_recognised(tmp_path: Path) -> None:
    base32 = make_checkpoint(tmp_path / "b32.safetensors", "single-sd1", "F32")
    edited = make_checkpoint(tmp_path / "e32.safetensors", "single-sd1", "F32", edit_layers=[1])
    patch = tmp_path / "p.erasepatch"
    diff_checkpoints(base32, edited, output=patch)
    for dtype in ("F16", "BF16"):
        target = make_checkpoint(tmp_path / f"b{dtype}.safetensors", "single-sd1", dtype)
        assert apply_to_checkpoint([patch], target, in_place=True).applied[0].fingerprint == "approx"


def test_wrong_architecture_changes_nothing(tmp_path: Path, sd1_patch: Path) -> None:
    xl = make_checkpoint(tmp_path / "xl.safetensors", "single-sdxl", "F16")
    before = snapshot(xl)
    with pytest.raises(IncompatiblePatchError, match="is for sd1, but .* is sdxl"):
        apply_to_checkpoint([sd1_patch], xl, in_place=True)
    with pytest.raises(IncompatiblePatchError):
        apply_to_checkpoint([sd1_patch], xl, output=tmp_path / "o.safetensors")
    assert snapshot(xl) == before and not (tmp_path / "o.safetensors").exists()
    assert not any(p.name.endswith(".incomplete") for p in tmp_path.iterdir())


def test_read_only_target(
    tmp_path: Path, sd1: tuple[Path, Path], sd1_patch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, _ = sd1
    before = snapshot(base)
    os.chmod(base, 0o444)
    if os.access(base, os.W_OK):  # root may write anything: act as an ordinary user would be treated
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if mode == os.W_OK else real(p, mode, **kw))
    with pytest.raises(TargetNotWritableError, match="read-only"):
        apply_to_checkpoint([sd1_patch], base, in_place=True)
    assert snapshot(base) == before


def test_output_must_be_new_and_safetensors(tmp_path: Path, sd1: tuple[Path, Path], sd1_patch: Path) -> None:
    base, edited = sd1
    with pytest.raises(TargetNotWritableError, match="already exists"):
        apply_to_checkpoint([sd1_patch], base, output=edited)
    with pytest.raises(TargetNotWritableError, match="must end in .safetensors"):
        apply_to_checkpoint([sd1_patch], base, output=tmp_path / "x.ckpt")
    with pytest.raises(ErasekitError, match="give an output, or apply in place"):
        apply_to_checkpoint([sd1_patch], base)


def test_output_inherits_applied_patches(tmp_path: Path, sd1: tuple[Path, Path], sd1_patch: Path) -> None:
    base, _ = sd1
    original = snapshot(base)
    other = patch_for(tmp_path, base, [0], "layer-0 edit")
    apply_to_checkpoint([sd1_patch], base, in_place=True)
    out = tmp_path / "copy.safetensors"
    apply_to_checkpoint([other], base, output=out)
    assert [a["title"] for a in inspect_path(out).applied] == ["layer-1 edit", "layer-0 edit"]
    revert_from_checkpoint(other, out)
    revert_from_checkpoint(sd1_patch, out)
    assert snapshot(out)["copy.safetensors"] == original["base.safetensors"]


def test_revert_refusals(tmp_path: Path, sd1: tuple[Path, Path], sd1_patch: Path) -> None:
    base, _ = sd1
    with pytest.raises(NotAppliedError, match="no erasekit patch is applied"):
        revert_from_checkpoint(sd1_patch, base)
    other = patch_for(tmp_path, base, [0], "layer-0 edit")
    apply_to_checkpoint([other], base, in_place=True)
    with pytest.raises(NotAppliedError, match="'layer-1 edit' is not applied .*applied: 'layer-0 edit'"):
        revert_from_checkpoint(sd1_patch, base)


def test_revert_after_foreign_edit_needs_force(tmp_path: Path, sd1: tuple[Path, Path], sd1_patch: Path) -> None:
    base, _ = sd1
    original = snapshot(base)
    apply_to_checkpoint([sd1_patch], base, in_place=True)
    ent = detect(base).files[0].header.entries[FC1_W1]
    with open(base, "r+b") as f:  # another program edits a patched tensor
        f.seek(ent.begin)
        f.write(b"\x00\x3c")
    edited_state = snapshot(base)
    with pytest.raises(UndoRecordError, match="changed after .* force it to restore"):
        revert_from_checkpoint(sd1_patch, base)
    assert snapshot(base) == edited_state
    revert_from_checkpoint(sd1_patch, base, force=True)
    assert snapshot(base) == original


def test_corrupt_undo_record_is_refused(tmp_path: Path, sd1: tuple[Path, Path], sd1_patch: Path) -> None:
    base, _ = sd1
    apply_to_checkpoint([sd1_patch], base, in_place=True)
    undo = journal_dir(base) / "0001.undo"
    raw = bytearray(undo.read_bytes())
    first = min(
        (e for n, e in _st.read_header(undo).entries.items() if not n.endswith("::page_crc32")), key=lambda e: e.begin
    )
    raw[first.begin] ^= 0xFF  # a byte of an original tensor
    undo.write_bytes(bytes(raw))
    state = snapshot(base)
    with pytest.raises(UndoRecordError, match="corrupt"):
        revert_from_checkpoint(sd1_patch, base)
    assert snapshot(base) == state


def test_non_finite_result_writes_nothing(sd1: tuple[Path, Path], sd1_patch: Path) -> None:
    base, _ = sd1
    before = snapshot(base)
    with pytest.raises(NonFiniteError, match="non-finite"):
        apply_to_checkpoint([sd1_patch], base, in_place=True, strength=1e30)
    assert snapshot(base) == before


def test_second_writer_is_locked_out(sd1: tuple[Path, Path], sd1_patch: Path) -> None:
    from filelock import FileLock

    base, _ = sd1
    before = snapshot(base)
    jdir = journal_dir(base)
    jdir.mkdir(parents=True)
    with FileLock(str(jdir / "lock")):
        # filelock is re-entrant within a process; another process is what a user would run
        code = (
            "import sys; from erasekit.checkpoints.apply import apply_to_checkpoint; from erasekit.errors import TargetLockedError\n"
            f"try: apply_to_checkpoint([{str(sd1_patch)!r}], {str(base)!r}, in_place=True)\n"
            "except TargetLockedError as e: print(e); sys.exit(9)\n"
        )
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 9, r.stderr
    assert "another erasekit process is writing" in r.stdout
    assert snapshot(base) == before
    assert TargetLockedError.exit_code == 9


KILL_MID_WRITE = """
import os, signal, sys
from erasekit.checkpoints import journal
from erasekit.checkpoints.apply import apply_to_checkpoint, revert_from_checkpoint

real = journal.Journal.write_tensors
def dying(self, updates, offsets):
    items = sorted(updates.items())
    half = dict(items[: len(items) // 2])
    real(self, half, offsets)              # some tensors rewritten, others not
    os.kill(os.getpid(), signal.SIGKILL)   # kill -9 in the middle of the operation
journal.Journal.write_tensors = dying
{call}
"""


@pytest.mark.parametrize("op", ["apply", "revert"])
def test_kill_9_mid_write_is_rolled_back_or_finished(
    tmp_path: Path, sd1: tuple[Path, Path], sd1_patch: Path, op: str
) -> None:
    base, edited = sd1
    original = snapshot(base)
    if op == "apply":
        call = f"apply_to_checkpoint([{str(sd1_patch)!r}], {str(base)!r}, in_place=True)"
    else:
        apply_to_checkpoint([sd1_patch], base, in_place=True)
        call = f"revert_from_checkpoint({str(sd1_patch)!r}, {str(base)!r})"
    before_kill = snapshot(base)
    r = subprocess.run([sys.executable, "-c", KILL_MID_WRITE.format(call=call)], capture_output=True, timeout=120)
    assert r.returncode == -9, r.stderr
    assert snapshot(base) != before_kill, "half of the tensors were rewritten before the kill"
    if op == "revert":
        assert snapshot(base) != original, "and the other half not"
    assert len(inspect_path(base).interrupted) == 1
    if op == "apply":
        # the next write rolls the half-applied patch back first, then does its own work
        apply_to_checkpoint([sd1_patch], base, in_place=True)
        assert np.array_equal(read(base), read(edited))
        revert_from_checkpoint(sd1_patch, base)
    else:
        # the next command finishes the interrupted revert; nothing is applied any more
        with pytest.raises(NotAppliedError):
            revert_from_checkpoint(sd1_patch, base)
        apply_to_checkpoint([sd1_patch], base, in_place=True)
        revert_from_checkpoint(sd1_patch, base)
    assert snapshot(base) == original
    assert not inspect_path(base).interrupted


def test_applying_the_same_patch_twice_needs_force(sd1: tuple[Path, Path], sd1_patch: Path) -> None:
    base, _ = sd1
    apply_to_checkpoint([sd1_patch], base, in_place=True)
    state = snapshot(base)
    with pytest.raises(ErasekitError, match="already applied .*entry 0001.*force it"):
        apply_to_checkpoint([sd1_patch], base, in_place=True)
    assert snapshot(base) == state
    assert len(apply_to_checkpoint([sd1_patch], base, in_place=True, force=True).applied) == 1
