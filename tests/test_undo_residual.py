"""Residual undo records: the delta as the patch stores it, the exceptions and the page checksums of the after bytes
rebuild a tensor's original bytes bit for bit, also when a crash left it half rewritten; damage is refused."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import snapshot

from erasekit.checkpoints.apply import apply_to_checkpoint, revert_from_checkpoint
from erasekit.checkpoints.diff import diff_checkpoints
from erasekit.checkpoints.in_place import recover_interrupted
from erasekit.checkpoints.journal import Entry, Journal, journal_dir
from erasekit.checkpoints.layouts import detect
from erasekit.checkpoints.undo_record import (
    PAGE,
    TensorRecord,
    _pages,
    add_term,
    added,
    delta_of,
    residual_fits,
    scaled,
    sha256,
    undo_record,
)
from erasekit.errors import ErasekitWarning, NonFiniteError, NotAppliedError, UndoRecordError
from erasekit.format import _st
from erasekit.format.patchfile import load_patch
from erasekit.testing import make_checkpoint

FC1_W0 = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"


def lowrank(
    tmp_path: Path, dtype: str, name: str = "lr", edit_seed: int = 0, patch_dtype: str = "F32"
) -> tuple[Path, Path]:
    """A tiny single-file SD1 checkpoint and a rank-2 patch of an edit of its FFN layers 0 and 1."""
    base = tmp_path / f"base-{dtype}.safetensors"
    if not base.exists():
        make_checkpoint(base, "single-sd1", dtype)
    edited = make_checkpoint(
        tmp_path / f"{name}-edited.safetensors", "single-sd1", dtype, edit_layers=[0, 1], edit_seed=edit_seed
    )
    patch = tmp_path / f"{name}.erasepatch"
    diff_checkpoints(base, edited, output=patch, title=name, rank=2, dtype=patch_dtype)
    return base, patch


def undo_names(base: Path, entry_id: str = "0001") -> list[str]:
    return sorted(_st.read_header(journal_dir(base) / f"{entry_id}.undo").entries)


def journal_json(base: Path) -> dict:
    return json.loads((journal_dir(base) / "journal.json").read_text())


@pytest.mark.parametrize("dtype", ["F16", "BF16", "F32"])
@pytest.mark.parametrize("strength", [1.0, 0.7, -1.5])
def test_revert_after_a_residual_apply_is_bit_exact(tmp_path: Path, dtype: str, strength: float) -> None:
    base, patch = lowrank(tmp_path, dtype)
    original = snapshot(base)
    rep = apply_to_checkpoint([patch], base, in_place=True, strength=strength)
    assert snapshot(base) != original
    names = undo_names(base)
    residual = [n for n in names if n.endswith("::exc_index")]
    assert len(residual) == 4, names  # the four weights; the biases (dense diff bigger than them) are stored whole
    assert journal_json(base)["erasekit_journal"] == 2 and journal_json(base)["entries"][0]["undo"] == "residual"
    undo_bytes = (journal_dir(base) / "0001.undo").stat().st_size
    assert undo_bytes < rep.bytes_written  # smaller than the whole originals
    revert_from_checkpoint(patch, base)
    assert snapshot(base) == original
    assert not (journal_dir(base) / "0001.undo").exists() and journal_json(base)["erasekit_journal"] == 1


def test_the_inverse_uses_the_delta_the_patch_applies(tmp_path: Path) -> None:
    """The record rebuilds the low-rank delta with the arithmetic of Patch.weight_delta, bit for bit."""
    _, patch_path = lowrank(tmp_path, "F16", patch_dtype="BF16")
    patch = load_patch(patch_path)
    for module, info in patch.manifest.deltas.items():
        parts = {
            p: (patch.dtypes[f"{module}.{n}"], patch.tensors[f"{module}.{n}"])
            for p, n in (("lora_up", "lora_up.weight"), ("lora_down", "lora_down.weight"), ("alpha", "alpha"))
        }
        assert info.storage == "lowrank"
        assert delta_of(parts).tobytes() == patch.weight_delta(module).tobytes()


# -- a tensor half rewritten when the process died -------------------------------------------------------


def one_tensor_file(tmp_path: Path, dtype: str, strength: float) -> dict:
    """A file whose tensor ``w`` (48 KB at F16, starting inside a page) has a pending residual apply recorded."""
    path = tmp_path / "m.safetensors"
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((96, 256)) * 0.02).astype(np.float32)
    _st.write_safetensors(path, {"a": ("F32", (3,), bytes(12)), "w": (dtype, w.shape, _st.encode(w, dtype))}, {})
    ent = _st.read_header(path).entries["w"]
    assert ent.begin % PAGE  # not page-aligned
    parts = {
        "lora_up": ("F32", (rng.standard_normal((96, 4)) * 0.01).astype(np.float32)),
        "lora_down": ("F32", (rng.standard_normal((4, 256)) * 0.01).astype(np.float32)),
        "alpha": ("F32", np.array(4, np.float32)),
    }
    before = path.read_bytes()[ent.begin : ent.end]
    term = scaled(delta_of(parts), strength)
    assert residual_fits(ent, parts)
    after, misses = added(before, ent, term, inverted=True)
    assert after == add_term(before, dtype, ent.shape, term)
    record = undo_record(before, after, ent, parts, misses)
    assert not record.full and 0 < record.exc_index.size < ent.numel
    journal = Journal(path, {"": path})
    entry = Entry(
        id="0001",
        state="pending",
        patch_id="0" * 64,
        patch_title="t",
        strength=strength,
        fingerprint="exact",
        applied_at="2026-01-01T00:00:00Z",
        undo="residual",
        tensors=[TensorRecord(file="", key="w", before_sha256=sha256(before), after_sha256=sha256(after))],
    )
    with journal.locked():
        journal.write_undo(entry.id, {("", "w"): record})
        journal.entries.append(entry)
        journal.save()
    return {"path": path, "ent": ent, "before": before, "after": after, "journal": journal}


def overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def recover(path: Path) -> list:
    journal = Journal(path, {"": path})
    with journal.locked():
        return journal.reconcile(lambda label, key: _st.read_header(path).entries[key])


@pytest.mark.parametrize("dtype", ["F16", "F32"])
@pytest.mark.parametrize("pages", [0, 1, 5, "all"])
def test_a_torn_apply_is_rolled_back_page_by_page(tmp_path: Path, dtype: str, pages: int | str) -> None:
    t = one_tensor_file(tmp_path, dtype, 0.5)
    bounds = _pages(t["ent"].begin, t["ent"].nbytes)
    cut = len(t["after"]) if pages == "all" else bounds[pages - 1][1] if pages else 0
    overwrite(t["path"], t["ent"].begin, t["after"][:cut])  # the first pages rewritten, then kill -9
    assert len(recover(t["path"])) == 1
    assert t["path"].read_bytes()[t["ent"].begin : t["ent"].end] == t["before"]
    assert not Journal(t["path"], {}).entries and not list(journal_dir(t["path"]).glob("*.undo"))


@pytest.mark.parametrize("direction", ["apply", "revert"])
def test_a_page_cut_inside_is_undone_too(tmp_path: Path, direction: str) -> None:
    """A write that stopped inside a page, between two elements (an apply, or a revert under way)."""
    t = one_tensor_file(tmp_path, "F16", 1.0)
    ent, before, after = t["ent"], t["before"], t["after"]
    cut = _pages(ent.begin, ent.nbytes)[3][0] + 1000  # 1000 bytes into the 4th page
    if direction == "apply":
        overwrite(t["path"], ent.begin, after[:cut])
    else:
        overwrite(t["path"], ent.begin, after)
        overwrite(t["path"], ent.begin, before[:cut])
        entries = journal_json(t["path"])
        entries["entries"][0]["state"] = "reverting"
        (journal_dir(t["path"]) / "journal.json").write_text(json.dumps(entries))
    recover(t["path"])
    assert t["path"].read_bytes()[ent.begin : ent.end] == before


def test_a_tensor_in_neither_state_is_refused_and_left_alone(tmp_path: Path) -> None:
    t = one_tensor_file(tmp_path, "F16", 1.0)
    ent = t["ent"]
    mangled = bytearray(t["after"])
    for page in (2, 7):  # two pages that are neither before nor after: no crash does that
        a = _pages(ent.begin, ent.nbytes)[page][0]
        mangled[a : a + 2] = b"\x00\x3c"
    overwrite(t["path"], ent.begin, bytes(mangled))
    state = t["path"].read_bytes()
    with pytest.warns(
        ErasekitWarning,
        match=r"does not describe the file there \(w is neither as patched nor as "
        r"before.*\): it was set aside in .*set-aside-.* nothing was written",
    ):
        assert recover(t["path"]) == []
    assert t["path"].read_bytes() == state and not Journal(t["path"], {}).entries
    [aside] = journal_dir(t["path"]).glob("set-aside-*")
    assert sorted(p.name for p in aside.iterdir()) == ["0001.undo", "journal.json"]


KILL_INSIDE_A_TENSOR = """
import os, signal
from erasekit.checkpoints import journal
from erasekit.checkpoints.apply import apply_to_checkpoint

real = journal._write_all
calls = []
def dying(f, data, offset):
    calls.append(len(data))
    if sum(n >= 8192 for n in calls) == 2 and len(data) >= 8192:  # the 2nd weight: a page and a half, then kill -9
        n = (-offset) % 4096 + 6000
        real(f, bytes(data)[:n], offset)
        os.kill(os.getpid(), signal.SIGKILL)
    real(f, data, offset)
journal._write_all = dying
apply_to_checkpoint([{patch!r}], {base!r}, in_place=True, strength=0.5)
"""


def test_kill_9_inside_a_tensor_is_rolled_back(tmp_path: Path) -> None:
    base, patch = lowrank(tmp_path, "F32")
    original = snapshot(base)
    code = KILL_INSIDE_A_TENSOR.format(patch=str(patch), base=str(base))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert r.returncode == -9, r.stderr
    assert snapshot(base) != original
    assert [(e.state, e.undo) for e in Journal(base, {}).entries] == [("pending", "residual")]
    assert len(recover_interrupted(detect(base))) == 1
    assert snapshot(base) == original


# -- damage, foreign edits, stacks, old journals -----------------------------------------------------------


def test_a_damaged_residual_record_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    base, patch = lowrank(tmp_path, "F16")
    apply_to_checkpoint([patch], base, in_place=True)
    undo = journal_dir(base) / "0001.undo"
    ent = _st.read_header(undo).entries[f"::{FC1_W0}::lora_up"]
    raw = bytearray(undo.read_bytes())
    raw[ent.begin + 5] ^= 0x40  # one factor value
    undo.write_bytes(bytes(raw))
    state = snapshot(base)
    with pytest.raises(UndoRecordError, match="corrupt .*does not match its hash"):
        revert_from_checkpoint(patch, base)
    assert snapshot(base) == state and [e.state for e in Journal(base, {}).entries] == ["committed"]
    ent = _st.read_header(undo).entries[f"::{FC1_W0}::exc_index"]
    raw[ent.begin : ent.begin + 4] = (10**6).to_bytes(4, "little")  # an index past the tensor's end
    undo.write_bytes(bytes(raw))
    with pytest.raises(UndoRecordError, match="corrupt .*do not fit the tensor"):
        revert_from_checkpoint(patch, base)
    assert snapshot(base) == state


def test_a_forced_revert_cannot_rebuild_a_tensor_changed_since(tmp_path: Path) -> None:
    base, patch = lowrank(tmp_path, "F16")
    apply_to_checkpoint([patch], base, in_place=True)
    ent = detect(base).files[0].header.entries[FC1_W0]
    overwrite(base, ent.begin + 4096, b"\x00\x3c" * 100)  # another program edits two pages of a patched tensor
    overwrite(base, ent.begin + 10, b"\x00\x3c")
    state = snapshot(base)
    with pytest.raises(UndoRecordError, match="changed after"):
        revert_from_checkpoint(patch, base)
    with pytest.raises(UndoRecordError, match="neither as patched nor as before"):
        revert_from_checkpoint(patch, base, force=True)
    assert snapshot(base) == state


def test_stacked_residual_patches_fingerprint_and_revert(tmp_path: Path) -> None:
    base, first = lowrank(tmp_path, "F16", "first")
    _, second = lowrank(tmp_path, "F16", "second", edit_seed=1)
    original = snapshot(base)
    apply_to_checkpoint([first], base, in_place=True, strength=0.5)
    # the second patch's fingerprint is checked against the original, rebuilt through the first's residual record
    assert apply_to_checkpoint([second], base, in_place=True).applied[0].fingerprint == "exact"
    revert_from_checkpoint(second, base)
    rep = apply_to_checkpoint([second, first], base, in_place=True, strength=[1.0, 2.0], force=True)
    assert [a.fingerprint for a in rep.applied] == ["exact", "exact"]
    assert len(Journal(base, {}).committed) == 3
    for p in (first, second, first):
        revert_from_checkpoint(p, base)
    assert snapshot(base) == original


def test_a_foreign_edit_under_a_residual_record_refuses_a_stacked_apply(tmp_path: Path) -> None:
    """As under a full record (tests/test_trust_stacking.py), forced or not: the patch below could not be reverted."""
    base, first = lowrank(tmp_path, "F16", "first")
    _, second = lowrank(tmp_path, "F16", "second", edit_seed=1)
    apply_to_checkpoint([first], base, in_place=True)
    overwrite(base, detect(base).files[0].header.entries[FC1_W0].begin, b"\x00\x3c")
    state = snapshot(base)
    for force in (False, True):
        with pytest.raises(UndoRecordError, match=f"^1 tensors of .* changed since 'first' was applied \\({FC1_W0}\\)"):
            apply_to_checkpoint([second], base, in_place=True, force=force)
    assert snapshot(base) == state


def test_an_old_full_undo_record_still_reverts(tmp_path: Path, sd1: tuple[Path, Path], sd1_patch: Path) -> None:
    """A journal as erasekit wrote it before residual records: version 1, no "undo" field, whole originals."""
    base, _ = sd1
    original = snapshot(base)
    apply_to_checkpoint([sd1_patch], base, in_place=True, strength=0.5)  # a dense F32 patch on F16: stored whole
    data = journal_json(base)
    assert data["erasekit_journal"] == 1 and data["entries"][0]["undo"] == "full"
    del data["entries"][0]["undo"], data["files"], data["generation"]  # neither stamps nor page checksums then
    (journal_dir(base) / "journal.json").write_text(json.dumps(data, indent=1))
    undo = journal_dir(base) / "0001.undo"
    header = _st.read_header(undo)
    with open(undo, "rb") as f:
        whole = {n: (e.dtype, e.shape, _st.read_raw(f, e)) for n, e in header.entries.items() if n.count("::") == 1}
    _st.write_safetensors(undo, whole, header.metadata)
    assert undo_names(base) == sorted(whole)
    _, lr = lowrank(tmp_path, "F16", "on top")
    apply_to_checkpoint([lr], base, in_place=True, force=True)  # a residual record above the old one
    assert [e.undo for e in Journal(base, {}).entries] == ["full", "residual"]
    revert_from_checkpoint(lr, base)
    revert_from_checkpoint(sd1_patch, base)
    assert snapshot(base) == original
    with pytest.raises(NotAppliedError):
        revert_from_checkpoint(sd1_patch, base)


def test_a_folder_and_its_output_copy_revert_from_residual_records(tmp_path: Path) -> None:
    """An SDXL pipeline (two weight files): the records are per file label, and an output copy inherits them."""
    base = make_checkpoint(tmp_path / "p", "diffusers-sdxl", "F16")
    edited = make_checkpoint(tmp_path / "e", "diffusers-sdxl", "F16", edit_layers=[0])
    patch = tmp_path / "xl.erasepatch"
    diff_checkpoints(base, edited, output=patch, rank=2)
    original = snapshot(base)
    apply_to_checkpoint([patch], base, in_place=True, strength=0.5)
    names = undo_names(base)
    assert {n.split("::")[0] for n in names if n.endswith("::exc_index")} == {
        "text_encoder/model.safetensors",
        "text_encoder_2/model.safetensors",
    }
    other, twin = tmp_path / "xl1.erasepatch", make_checkpoint(tmp_path / "p1", "diffusers-sdxl", "F16")
    assert snapshot(twin) == original  # the same base, unpatched
    diff_checkpoints(
        twin, make_checkpoint(tmp_path / "e1", "diffusers-sdxl", "F16", edit_layers=[1]), output=other, rank=2
    )
    out = tmp_path / "out"
    apply_to_checkpoint([other], base, output=out)  # the output inherits the journal, then gets its own entry
    assert [e.undo for e in Journal(out, {}).entries] == ["residual", "residual"]
    for p in (other, patch):
        revert_from_checkpoint(p, out)
    revert_from_checkpoint(patch, base)
    assert snapshot(base) == original and snapshot(out) == original


def test_a_journal_from_a_newer_erasekit_is_refused(tmp_path: Path) -> None:
    base, patch = lowrank(tmp_path, "F16")
    apply_to_checkpoint([patch], base, in_place=True)
    data = journal_json(base)
    data["erasekit_journal"] = 3
    (journal_dir(base) / "journal.json").write_text(json.dumps(data))
    with pytest.raises(UndoRecordError, match="newer erasekit"):
        revert_from_checkpoint(patch, base)


@pytest.mark.parametrize("dtype", ["BF16", "F32"])
def test_a_non_finite_result_writes_nothing(tmp_path: Path, dtype: str) -> None:
    base, patch = lowrank(tmp_path, dtype)
    before = snapshot(base)
    with pytest.raises(NonFiniteError, match="non-finite"):
        apply_to_checkpoint([patch], base, in_place=True, strength=1e39)
    assert snapshot(base) == before and not (journal_dir(base) / "journal.json").exists()


def test_writes_end_on_page_boundaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tensors are written in pieces that end on multiples of WRITE_CHUNK (1 MiB; 4 KiB here) of the file, whatever
    their offset."""
    from erasekit.checkpoints import journal

    monkeypatch.setattr(journal, "WRITE_CHUNK", 4096)
    seen: list[tuple[int, int]] = []

    class Recording(io.FileIO):
        def write(self, data: bytes) -> int:  # type: ignore[override]
            seen.append((self.tell(), len(data)))
            return super().write(data)

    t = one_tensor_file(tmp_path, "F16", 1.0)
    monkeypatch.setattr(
        journal,
        "open",
        lambda path, mode="rb", buffering=-1: Recording(path, "r+" if "+" in mode else "r"),
        raising=False,
    )
    t["journal"].write_tensors({("", "w"): t["after"]}, {("", "w"): t["ent"].begin})
    assert t["path"].read_bytes()[t["ent"].begin : t["ent"].end] == t["after"]
    assert seen[0][0] == t["ent"].begin and all((o + n) % 4096 == 0 for o, n in seen[:-1])
    assert sum(n for _, n in seen) == len(t["after"])
