"""The undo journal under faults: one journal per weight file, readers never see a half-applied checkpoint, copies
are on disk before they appear, and the fingerprint status across weight variants is the least favourable."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from erasekit.checkpoints.apply import apply_to_checkpoint, revert_from_checkpoint
from erasekit.checkpoints.diff import diff_checkpoints
from erasekit.checkpoints.inspect import inspect_path
from erasekit.checkpoints.journal import Journal, journal_dir
from erasekit.checkpoints.layouts import detect
from erasekit.checkpoints.pipeline import load_pipeline
from erasekit.cli import app
from erasekit.errors import TargetLockedError, TargetNotWritableError
from erasekit.testing import make_checkpoint, make_tiny_pipeline


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pipeline_and_patch(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny diffusers pipeline and a patch of its layer 0."""
    base = make_checkpoint(tmp_path / "p", "diffusers-sd1")
    edited = make_checkpoint(tmp_path / "e", "diffusers-sd1", edit_layers=[0])
    patch = tmp_path / "x.erasepatch"
    diff_checkpoints(base, edited, output=patch)
    return base, patch


def test_a_pipeline_component_is_not_given_a_journal_of_its_own(tmp_path: Path) -> None:
    base, patch = pipeline_and_patch(tmp_path)
    weights = base / "text_encoder" / "model.safetensors"
    before = digest(weights)
    with pytest.raises(
        TargetNotWritableError,
        match=r"is the text_encoder of the diffusers pipeline .*apply to \(or "
        r"revert from\) .* instead",
    ):
        apply_to_checkpoint([patch], base / "text_encoder", in_place=True)
    assert digest(weights) == before and not (base / "text_encoder" / ".erasekit").exists()
    apply_to_checkpoint([patch], base, in_place=True)  # the pipeline itself: one journal
    with pytest.raises(TargetNotWritableError, match="is the text_encoder of the diffusers pipeline"):
        revert_from_checkpoint(patch, base / "text_encoder")
    revert_from_checkpoint(patch, base)
    assert digest(weights) == before


def test_a_weight_file_inside_a_model_folder_gets_no_journal_of_its_own(tmp_path: Path) -> None:
    folder, patch = pipeline_and_patch(tmp_path)
    r = CliRunner().invoke(
        app, ["apply", str(patch), "--to", str(folder / "text_encoder" / "model.safetensors"), "--in-place"]
    )
    assert r.exit_code == 7 and f"is a weight file of the model folder {folder.resolve()}" in r.stderr
    assert not list(folder.rglob(".erasekit"))


def test_two_spellings_of_one_file_share_one_journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = make_checkpoint(tmp_path / "models" / "m.safetensors", "single-sd1")
    edited = make_checkpoint(tmp_path / "e.safetensors", "single-sd1", edit_layers=[1])
    patch = tmp_path / "x.erasepatch"
    diff_checkpoints(real, edited, output=patch)
    link = tmp_path / "link.safetensors"
    link.symlink_to(real)
    before = digest(real)
    apply_to_checkpoint([patch], link, in_place=True)
    assert journal_dir(link) == journal_dir(real)
    monkeypatch.chdir(tmp_path / "models")
    assert len(inspect_path("m.safetensors").applied) == 1  # the journal written through the link
    revert_from_checkpoint(patch, real)  # reverted through the other spelling
    assert digest(real) == before


@pytest.fixture()
def half_applied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """A tiny pipeline whose in-place apply died after writing its tensors, before committing ('pending')."""
    folder = make_tiny_pipeline(tmp_path / "tiny", "sd1")
    edited = shutil.copytree(folder, tmp_path / "edited")
    from safetensors.torch import load_file, save_file

    te = edited / "text_encoder" / "model.safetensors"
    sd = load_file(str(te))
    for k in sd:
        if "mlp.fc1.weight" in k:
            sd[k] = sd[k] + 0.05
    save_file(sd, str(te))
    patch = tmp_path / "x.erasepatch"
    diff_checkpoints(folder, edited, output=patch)
    weights = folder / "text_encoder" / "model.safetensors"
    pristine = digest(weights)
    original_write = Journal.write_tensors

    def write_then_die(self: Journal, updates: dict, offsets: dict) -> None:
        original_write(self, updates, offsets)
        raise KeyboardInterrupt  # the process dies between writing the tensors and committing

    monkeypatch.setattr(Journal, "write_tensors", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        apply_to_checkpoint([patch], folder, in_place=True)
    monkeypatch.undo()
    assert digest(weights) != pristine and Journal(folder, {}).interrupted()
    return {"folder": folder, "weights": weights, "pristine": pristine, "edited": edited}


def test_loading_a_half_applied_checkpoint_rolls_it_back_first(half_applied: dict) -> None:
    pipe, _ = load_pipeline(half_applied["folder"])
    assert digest(half_applied["weights"]) == half_applied["pristine"]
    assert not Journal(half_applied["folder"], {}).entries
    reference = detect(half_applied["folder"]).files[0]
    key = next(k for k in reference.tensor_info() if k.endswith("layers.0.mlp.fc1.weight"))
    name = key.removeprefix("text_model.")
    assert torch.equal(pipe.text_encoder.state_dict()[name], torch.from_numpy(reference.read_numpy(key).copy()))


def test_diff_rolls_a_half_applied_checkpoint_back_first(half_applied: dict, tmp_path: Path) -> None:
    report = diff_checkpoints(half_applied["folder"], half_applied["edited"])
    assert digest(half_applied["weights"]) == half_applied["pristine"]
    assert any(c.delta_norm > 0 for c in report.changes)


def test_a_reader_refuses_while_another_process_writes(half_applied: dict) -> None:
    from filelock import FileLock

    lock = FileLock(str(journal_dir(half_applied["folder"]) / "lock"))
    with lock:  # another erasekit process holds the writer lock mid-apply
        with pytest.raises(TargetLockedError, match="another erasekit process is writing"):
            load_pipeline(half_applied["folder"])
    assert digest(half_applied["weights"]) != half_applied["pristine"], "nothing was touched while locked"


def test_a_copied_folder_is_synced_to_disk_before_it_appears(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = make_checkpoint(tmp_path / "p", "diffusers-sdxl")
    edited = make_checkpoint(tmp_path / "e", "diffusers-sdxl", edit_layers=[0])
    patch = tmp_path / "x.erasepatch"
    diff_checkpoints(base, edited, output=patch)
    synced: list[str] = []
    real_fsync = os.fsync

    def record(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", record)
    apply_to_checkpoint([patch], base, output=tmp_path / "out")
    copied = {str(p.relative_to(base)) for p in base.rglob("*") if p.is_file() and ".erasekit" not in p.parts}
    synced_rel = {s.split(".incomplete/", 1)[1] for s in synced if ".incomplete/" in s}
    missing = copied - synced_rel
    assert not missing, f"not synced before the rename: {sorted(missing)}"


def test_an_approximate_variant_makes_the_apply_approx(tmp_path: Path) -> None:
    """Folder with model.safetensors (F32, the patch's base: exact) and model.fp16.safetensors (approx)."""
    base = make_checkpoint(tmp_path / "p", "diffusers-sd1-fp16-variant", "F32")
    edited = make_checkpoint(tmp_path / "e", "diffusers-sd1-fp16-variant", "F32", edit_layers=[1])
    patch = tmp_path / "x.erasepatch"
    diff_checkpoints(base, edited, output=patch)
    assert {f.path.name for f in detect(base).files} == {"model.safetensors", "model.fp16.safetensors"}
    report = apply_to_checkpoint([patch], base, output=tmp_path / "out")
    assert report.applied[0].fingerprint == "approx"
    plain = make_checkpoint(tmp_path / "q", "diffusers-sd1", "F32")
    edited_plain = make_checkpoint(tmp_path / "f", "diffusers-sd1", "F32", edit_layers=[1])
    diff_checkpoints(plain, edited_plain, output=tmp_path / "y.erasepatch")
    assert (
        apply_to_checkpoint([tmp_path / "y.erasepatch"], plain, output=tmp_path / "out2").applied[0].fingerprint
        == "exact"
    )
