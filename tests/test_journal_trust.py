"""Nothing lost, nothing doubled: a journal writes only into the file it describes, one apply of several patches
is all or nothing, and the write path is portable."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from erasekit.checkpoints.apply import RevertReport, apply_to_checkpoint, revert_from_checkpoint
from erasekit.checkpoints.diff import diff_checkpoints
from erasekit.checkpoints.inspect import inspect_path
from erasekit.checkpoints.journal import Journal, journal_dir
from erasekit.cli import app
from erasekit.errors import ErasekitWarning, TargetNotWritableError
from erasekit.format import _st
from erasekit.testing import make_checkpoint

runner = CliRunner()


def run(*args: object):  # type: ignore[no-untyped-def]
    return runner.invoke(app, [str(a) for a in args])


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def die_after_writing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The next in-place apply dies (no cleanup runs) after writing its tensors, before committing them."""
    real = Journal.write_tensors

    def write_then_die(self: Journal, updates: dict, offsets: dict) -> None:
        real(self, updates, offsets)
        raise KeyboardInterrupt

    monkeypatch.setattr(Journal, "write_tensors", write_then_die)


def another_model(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """A model of the same layout, size and header as the ``sd1`` fixture's (another seed), and a patch for it."""
    other = make_checkpoint(tmp_path / f"{name}.safetensors", "single-sd1", "F16", seed=1)
    edited = make_checkpoint(tmp_path / f"{name}-edited.safetensors", "single-sd1", "F16", seed=1, edit_layers=[0])
    patch = tmp_path / f"{name}.erasepatch"
    diff_checkpoints(other, edited, output=patch)
    return other, patch


@pytest.mark.parametrize("command", ["inspect", "inspect --against", "diff", "apply"])
def test_a_pending_journal_never_writes_into_the_file_that_replaced_its_own(
    tmp_path: Path, sd1: tuple[Path, Path], sd1_patch: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    base, edited = sd1
    with monkeypatch.context() as m:
        die_after_writing(m)
        with pytest.raises(KeyboardInterrupt):
            apply_to_checkpoint([sd1_patch], base, in_place=True)
    assert [e.state for e in Journal(base, {}).entries] == ["pending"]
    other, other_patch = another_model(tmp_path, "other")
    assert _st.read_header(other).header_len == _st.read_header(base).header_len
    shutil.copyfile(other, base)  # the user puts another model of the same layout under the same name
    replaced = digest(base)
    args = {
        "inspect": ["inspect", base],
        "inspect --against": ["inspect", other_patch, "--against", base],
        "diff": ["diff", base, edited],
        "apply": ["apply", other_patch, "--to", base, "--in-place"],
    }[command]
    r = run(*args)
    assert r.exit_code == 0, r.output
    warned = [line for line in r.stderr.splitlines() if line.startswith("warning:") and "undo journal" in line]
    assert len(warned) == 1 and "does not describe the file there" in warned[0] and "nothing was written" in warned[0]
    if command != "apply":
        assert digest(base) == replaced  # not one byte of the old model's tensors
    [aside] = journal_dir(base).glob("set-aside-*")
    assert sorted(p.name for p in aside.iterdir()) == ["0001.undo", "journal.json"]  # kept, for the user to find
    assert str(aside) in warned[0]
    if command == "inspect --against":
        assert "exact" in r.stdout  # the new file's own patch fits it
    assert [a["title"] for a in inspect_path(base).applied] == (
        ["other-edited minus other"] if command == "apply" else []
    )


def test_committed_patches_of_a_replaced_file_are_not_listed(
    tmp_path: Path, sd1: tuple[Path, Path], sd1_patch: Path
) -> None:
    base, _ = sd1
    apply_to_checkpoint([sd1_patch], base, in_place=True)
    other, other_patch = another_model(tmp_path, "other")
    shutil.copyfile(other, base)
    with pytest.warns(ErasekitWarning, match="no tensor that patch 'layer-1 edit' changed is as it left it"):
        assert inspect_path(base).applied == []
    apply_to_checkpoint([other_patch], base, in_place=True)  # a patch made for the new file is not refused
    assert digest(base) != digest(other)


def test_a_file_copied_back_with_its_journal_still_reverts(
    tmp_path: Path, sd1: tuple[Path, Path], sd1_patch: Path
) -> None:
    """A copy (new inode and time) is not a replacement: its tensors are as the journal says, so it is stamped anew."""
    base, _ = sd1
    original = digest(base)
    apply_to_checkpoint([sd1_patch], base, in_place=True)
    shutil.copyfile(base, tmp_path / "backup")
    os.replace(tmp_path / "backup", base)
    revert_from_checkpoint(sd1_patch, base)
    assert digest(base) == original


def test_a_second_patch_that_cannot_be_written_takes_the_first_back(
    tmp_path: Path, sd1: tuple[Path, Path], sd1_patch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, _ = sd1
    other = make_checkpoint(tmp_path / "e0.safetensors", "single-sd1", "F16", edit_layers=[0])
    second = tmp_path / "second.erasepatch"
    diff_checkpoints(base, other, output=second)
    original = digest(base)
    real, calls = Journal.write_tensors, []

    def disk_full_on_the_second(self: Journal, updates: dict, offsets: dict) -> None:
        calls.append(len(updates))
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(base))
        real(self, updates, offsets)

    monkeypatch.setattr(Journal, "write_tensors", disk_full_on_the_second)
    r = run("apply", sd1_patch, second, "--to", base, "--in-place")
    assert r.exit_code == 1 and r.stderr.count("\n") == 1 and "No space left on device" in r.stderr
    assert (
        len(calls) == 4 and digest(base) == original
    )  # two writes, then both entries rolled back  # the first patch's tensors written back
    assert json.loads((journal_dir(base) / "journal.json").read_text())["entries"] == []
    assert not list(journal_dir(base).glob("*.undo"))


@pytest.mark.parametrize("entry_id", ["../../../evil", "0001/../../x", "1e3"])
def test_a_journal_entry_id_is_never_a_path(
    tmp_path: Path, sd1: tuple[Path, Path], sd1_patch: Path, entry_id: str
) -> None:
    base, _ = sd1
    apply_to_checkpoint([sd1_patch], base, in_place=True)
    path = journal_dir(base) / "journal.json"
    data = json.loads(path.read_text())
    data["entries"][0]["id"] = entry_id
    path.write_text(json.dumps(data))
    outside = tmp_path / "evil.undo"
    shutil.copyfile(journal_dir(base) / "0001.undo", outside)
    state = digest(base)
    r = run("apply", "--revert", sd1_patch, "--to", base)
    assert r.exit_code == 6 and "undo journal" in r.stderr and "is unreadable or corrupt" in r.stderr
    assert r.stderr.count("\n") == 1 and digest(base) == state and outside.exists()


def test_revert_reports_the_hash_check_it_made(
    sd1: tuple[Path, Path], sd1_patch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, _ = sd1
    apply_to_checkpoint([sd1_patch], base, in_place=True)
    real = Journal.revert
    monkeypatch.setattr(Journal, "revert", lambda self, *a, **k: real(self, *a, **k) and False)
    report = revert_from_checkpoint(sd1_patch, base)
    assert isinstance(report, RevertReport) and report.verified is False


def test_a_refused_apply_leaves_no_journal_folder(tmp_path: Path, sd1: tuple[Path, Path]) -> None:
    base, _ = sd1
    other, other_patch = another_model(tmp_path, "other")  # made for another model: its fingerprints differ
    r = run("apply", other_patch, "--to", base, "--in-place")
    assert r.exit_code != 0 and not (tmp_path / ".erasekit").exists()


def test_the_write_path_needs_no_posix_only_calls(
    sd1: tuple[Path, Path], sd1_patch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Windows has no os.pwrite/os.pread: apply, recovery and revert run without them."""
    base, _ = sd1
    original = digest(base)
    for name in ("pwrite", "pread", "pwritev", "preadv"):
        monkeypatch.delattr(os, name, raising=False)
    apply_to_checkpoint([sd1_patch], base, in_place=True)
    assert digest(base) != original
    revert_from_checkpoint(sd1_patch, base)
    assert digest(base) == original


def test_a_file_held_by_another_program_is_named_in_one_line(
    sd1: tuple[Path, Path], sd1_patch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As Windows answers a write to a file a UI has open (a sharing violation is a PermissionError there)."""
    base, _ = sd1
    original = digest(base)
    from erasekit.checkpoints import journal

    def held(path: object, mode: str = "rb", buffering: int = -1):  # type: ignore[no-untyped-def]
        if "+" in mode:
            raise PermissionError(
                13, "The process cannot access the file because it is being used by another process", str(path)
            )
        return open(path, mode, buffering)  # type: ignore[call-overload]

    monkeypatch.setattr(journal, "open", held, raising=False)
    with pytest.raises(TargetNotWritableError, match=r"cannot write .*base.safetensors .*another program holds it"):
        apply_to_checkpoint([sd1_patch], base, in_place=True)
    monkeypatch.undo()
    assert digest(base) == original
    r = run("inspect", sd1_patch, "--against", base)  # the next reader rolls back what the failed one could not
    assert r.exit_code == 0 and not Journal(base, {}).entries and digest(base) == original


# -- readers of a checkpoint with patches applied in place ------------------------------------------------------


@pytest.fixture
def toy_with_a_patch_in_place(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A copy of the built-in model with a patch (its layer-0 FFN nudged) applied in place, and a second patch."""
    from safetensors.numpy import load_file, save_file

    from erasekit.toyworld import builtin_model_path

    model = shutil.copytree(builtin_model_path(), tmp_path / "model")
    patches = []
    for i, layer in enumerate((0, 1)):
        edited = shutil.copytree(model, tmp_path / f"edited{i}")
        te = edited / "text_encoder" / "model.safetensors"
        sd = load_file(str(te))
        key = next(k for k in sd if k.endswith(f"layers.{layer}.mlp.fc1.weight"))
        sd[key] = sd[key] + 0.01
        save_file(sd, str(te))
        patches.append(tmp_path / f"p{i}.erasepatch")
        diff_checkpoints(model, edited, output=patches[-1])
    apply_to_checkpoint([patches[0]], model, in_place=True)
    return model, patches[0], patches[1]


@pytest.mark.parametrize("command", ["generate", "generate --compare", "eval", "eval --record"])
def test_a_patch_applied_in_place_is_never_applied_again_in_memory(
    tmp_path: Path, toy_with_a_patch_in_place: tuple[Path, Path, Path], command: str
) -> None:
    model, in_place, _ = toy_with_a_patch_in_place
    before = digest(in_place)
    args = {
        "generate": [
            "generate",
            "a red circle",
            "-m",
            model,
            "-p",
            in_place,
            "-o",
            tmp_path / "out",
            "-n",
            "1",
            "--steps",
            "2",
        ],
        "eval": ["eval", "-c", "circle", "-m", model, "-p", in_place, "-n", "1", "--steps", "2"],
    }[command.split()[0]]
    r = run(*args, *command.split()[1:])
    assert r.exit_code == 1 and r.stderr.count("\n") == 1, r.output
    assert f"patch '{load_title(in_place)}' is already applied to {model} in place" in r.stderr
    assert "revert it first (erasekit apply --revert" in r.stderr
    assert not (tmp_path / "out").exists() and digest(in_place) == before  # no images, nothing recorded


def test_eval_records_no_rates_measured_on_other_patches_in_place(
    toy_with_a_patch_in_place: tuple[Path, Path, Path],
) -> None:
    model, in_place, other = toy_with_a_patch_in_place
    before = digest(other)
    r = run("eval", "-c", "circle", "-m", model, "-p", other, "-n", "1", "--steps", "2", "--record")
    assert r.exit_code == 1 and r.stderr.count("\n") == 1, r.output
    assert (
        f"has patches applied in place ('{load_title(in_place)}') that '{load_title(other)}' was not made after"
        in r.stderr
    )
    assert digest(other) == before


def load_title(path: Path) -> str:
    from erasekit.format.patchfile import load_patch

    return load_patch(path).title


def test_diff_of_a_checkpoint_with_patches_in_place_gives_a_patch_that_applies_there(
    tmp_path: Path, toy_with_a_patch_in_place: tuple[Path, Path, Path]
) -> None:
    """One rule for diff, erase, apply and inspect --against: base fingerprints of the tensors below the journal."""
    from safetensors.numpy import load_file, save_file

    model, in_place, _ = toy_with_a_patch_in_place
    edited = shutil.copytree(model, tmp_path / "edited-after", ignore=shutil.ignore_patterns(".erasekit"))
    te = edited / "text_encoder" / "model.safetensors"
    sd = load_file(str(te))
    key = next(k for k in sd if k.endswith("layers.0.mlp.fc2.weight"))
    sd[key] = sd[key] - 0.01
    save_file(sd, str(te))
    out = tmp_path / "d.erasepatch"
    assert run("diff", model, edited, "-o", out).exit_code == 0
    from erasekit.format.patchfile import load_patch

    after = load_patch(out).manifest.method.hyperparameters["after"]
    assert [a["patch_id"] for a in after] == [load_patch(in_place).patch_id]
    r = run("apply", out, "--to", model, "--in-place")
    assert r.exit_code == 0 and "warning" not in r.stderr and "exact" in r.stdout, r.output  # before: 'differ', exit 5
    assert run("apply", "--revert", out, "--to", model).exit_code == 0
    assert run("apply", "--revert", in_place, "--to", model).exit_code == 0


def test_apply_to_an_output_copies_one_state_of_a_checkpoint_being_written(
    tmp_path: Path, sd1: tuple[Path, Path], sd1_patch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An in-place apply to the source commits between the copy of its bytes and of its journal: the copy is made
    again, and the output's journal lists exactly the patches its bytes hold."""
    from erasekit.checkpoints import apply as apply_module

    base, _ = sd1
    other = make_checkpoint(tmp_path / "e0.safetensors", "single-sd1", "F16", edit_layers=[0])
    second = tmp_path / "second.erasepatch"
    diff_checkpoints(base, other, output=second)
    real, fired = apply_module.copy_journal, []

    def another_writer_between(src: Path, dst: Path) -> None:
        if not fired:
            fired.append(apply_to_checkpoint([sd1_patch], base, in_place=True))
        real(src, dst)

    monkeypatch.setattr(apply_module, "copy_journal", another_writer_between)
    out = tmp_path / "out.safetensors"
    apply_to_checkpoint([second], base, output=out)
    assert fired and [a["title"] for a in inspect_path(out).applied] == ["layer-1 edit", "e0 minus base"]
    revert_from_checkpoint(second, out)
    revert_from_checkpoint(sd1_patch, out)  # before: "not as the applied patches left it" (its bytes lacked it)
    revert_from_checkpoint(sd1_patch, base)
    assert digest(out) == digest(base)


# -- found by review: patches of one apply on the same tensors, old records, readers side by side ------------------


def two_patches_of_one_layer(tmp_path: Path, base: Path) -> list[Path]:
    out = []
    for name, seed in (("a", 0), ("b", 1)):
        edited = make_checkpoint(
            tmp_path / f"{name}-ed.safetensors", "single-sd1", "F16", edit_layers=[1], edit_seed=seed
        )
        out.append(tmp_path / f"{name}.erasepatch")
        diff_checkpoints(base, edited, output=out[-1], title=name, rank=2 if name == "b" else None)
    return out


@pytest.mark.parametrize("written", [0, 0.5, 1])
def test_patches_of_one_apply_on_the_same_tensors_roll_back_when_it_dies(
    tmp_path: Path, sd1: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, written: float
) -> None:
    """The second patch's 'before' is the first's 'after': a tensor still holding the original bytes (or a mix) is
    left for the first patch's entry to restore, not taken for another file."""
    base, _ = sd1
    patches = two_patches_of_one_layer(tmp_path, base)
    original = digest(base)
    real = Journal.write_tensors

    def die_in_the_first(self: Journal, updates: dict, offsets: dict) -> None:
        items = sorted(updates.items(), key=lambda kv: offsets[kv[0]])
        real(self, dict(items[: int(len(items) * written)]), offsets)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(Journal, "write_tensors", die_in_the_first)
        with pytest.raises(KeyboardInterrupt):
            apply_to_checkpoint(patches, base, in_place=True)
    assert [e.state for e in Journal(base, {}).entries] == ["pending", "pending"]
    r = run("inspect", patches[0], "--against", base)
    assert r.exit_code == 0 and "warning" not in r.stderr, r.output
    assert digest(base) == original and not Journal(base, {}).entries
    assert not list(journal_dir(base).glob("set-aside-*"))


def test_an_error_in_the_first_of_two_patches_on_the_same_tensors_is_rolled_back(
    tmp_path: Path, sd1: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    base, _ = sd1
    patches = two_patches_of_one_layer(tmp_path, base)
    original, real, calls = digest(base), Journal.write_tensors, []

    def eio_in_the_first(self: Journal, updates: dict, offsets: dict) -> None:
        calls.append(1)
        if len(calls) == 1:
            real(self, dict(list(updates.items())[:1]), offsets)
            raise OSError(errno.EIO, "Input/output error", str(base))
        real(self, updates, offsets)

    monkeypatch.setattr(Journal, "write_tensors", eio_in_the_first)
    r = run("apply", *patches, "--to", base, "--in-place")
    assert r.exit_code == 1 and r.stderr.count("\n") == 1 and "Input/output error" in r.stderr
    assert digest(base) == original and not Journal(base, {}).entries


def test_a_revert_cut_short_under_an_undo_record_without_page_checksums_is_finished(
    tmp_path: Path, sd1: tuple[Path, Path], sd1_patch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records written before page checksums: a revert writes the original bytes from the start of a tensor."""
    import numpy as np

    from erasekit.checkpoints import undo_record
    from erasekit.checkpoints.journal import _write_all

    base, _ = sd1
    original = digest(base)
    with monkeypatch.context() as m:
        m.setattr(undo_record, "page_crcs", lambda data, begin: np.zeros(0, "<u4"))
        apply_to_checkpoint([sd1_patch], base, in_place=True)

    def cut(self: Journal, updates: dict, offsets: dict) -> None:
        key, data = max(updates.items(), key=lambda kv: len(kv[1]))
        with open(self.files[key[0]], "r+b", buffering=0) as f:
            _write_all(f, data[: (offsets[key] // 4096 + 1) * 4096 - offsets[key]], offsets[key])  # to a page end
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(Journal, "write_tensors", cut)
        with pytest.raises(KeyboardInterrupt):
            revert_from_checkpoint(sd1_patch, base)
    assert [e.state for e in Journal(base, {}).entries] == ["reverting"]
    r = run("inspect", sd1_patch, "--against", base)
    assert r.exit_code == 0 and "warning" not in r.stderr, r.output
    assert digest(base) == original and not Journal(base, {}).entries


def test_a_reader_does_not_fail_while_another_holds_the_lock(
    tmp_path: Path, sd1: tuple[Path, Path], sd1_patch: Path
) -> None:
    """A journal of an older erasekit (no stamps) is stamped by the first reader that can; the others read it as it
    is (two processes of a batch loading one model)."""
    import subprocess
    import sys

    base, _ = sd1
    apply_to_checkpoint([sd1_patch], base, in_place=True)
    path = journal_dir(base) / "journal.json"
    data = json.loads(path.read_text())
    del data["files"], data["generation"]
    path.write_text(json.dumps(data))
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path\n"
            "from erasekit.checkpoints.journal import Journal\n"
            "with Journal(Path(sys.argv[1]), {}).locked():\n"
            "    print('held', flush=True); time.sleep(30)\n",
            str(base),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        assert [a["title"] for a in inspect_path(base).applied] == ["layer-1 edit"]
        r = run("inspect", sd1_patch, "--against", base)
        assert r.exit_code == 0 and "exact" in r.stdout, r.output  # before: another erasekit process is writing
    finally:
        holder.kill()
        holder.wait()


def test_a_journal_naming_a_weight_file_that_is_gone_is_set_aside(tmp_path: Path) -> None:
    folder = make_checkpoint(tmp_path / "f", "diffusers-sd1-fp16-variant")
    edited = make_checkpoint(tmp_path / "e", "diffusers-sd1-fp16-variant", edit_layers=[1])
    patch = tmp_path / "p.erasepatch"
    diff_checkpoints(folder, edited, output=patch)
    apply_to_checkpoint([patch], folder, in_place=True)
    (folder / "text_encoder" / "model.safetensors").unlink()  # the user keeps only the fp16 variant
    with pytest.warns(ErasekitWarning, match="it names the weight file text_encoder/model.safetensors, which is not"):
        assert inspect_path(folder).applied == []


def test_a_refused_apply_to_an_output_leaves_no_journal_folder_there(
    tmp_path: Path, sd1: tuple[Path, Path], sd1_patch: Path
) -> None:
    base, _ = sd1
    apply_to_checkpoint([sd1_patch], base, in_place=True)
    (tmp_path / "out").mkdir()
    r = run("apply", sd1_patch, "--to", base, "-o", tmp_path / "out" / "x.safetensors")  # already applied: refused
    assert r.exit_code == 1 and list((tmp_path / "out").iterdir()) == []


def test_an_interrupted_apply_whose_undo_record_was_deleted_says_so(
    tmp_path: Path, sd1: tuple[Path, Path], sd1_patch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, _ = sd1
    with monkeypatch.context() as m:
        die_after_writing(m)
        with pytest.raises(KeyboardInterrupt):
            apply_to_checkpoint([sd1_patch], base, in_place=True)
    (journal_dir(base) / "0001.undo").unlink()
    r = run("inspect", sd1_patch, "--against", base)
    assert r.exit_code == 6 and "an interrupted apply in" in r.stderr and "lost its undo record 0001.undo" in r.stderr


def test_a_loaded_pipeline_does_not_change_when_its_file_is_written_later(tmp_path: Path) -> None:
    """Text encoders loaded in their stored dtype are not views of the mapped file: an in-place apply by another
    process after the (checked) read does not reach a running generate or eval."""
    import torch

    from erasekit.checkpoints.journal import _write_all
    from erasekit.checkpoints.pipeline import load_pipeline
    from erasekit.toyworld import builtin_model_path

    model = shutil.copytree(builtin_model_path(), tmp_path / "model")
    pipe, ckpt = load_pipeline(model, torch_dtype=torch.float16)  # the built-in model's stored dtype
    wf = ckpt.files[0]
    key = next(iter(wf.encoders.values())).key(0, "fc1", "weight")
    name = next(n for n in pipe.text_encoder.state_dict() if n.endswith("layers.0.mlp.fc1.weight"))
    loaded = pipe.text_encoder.state_dict()[name].clone()
    with open(wf.path, "r+b", buffering=0) as f:
        _write_all(f, b"\x00" * wf.header.entries[key].nbytes, wf.header.entries[key].begin)
    assert torch.equal(pipe.text_encoder.state_dict()[name], loaded)


@pytest.mark.parametrize("between", ["revert", "apply"])
def test_patches_in_place_are_read_as_the_pipeline_was_loaded(
    tmp_path: Path, toy_with_a_patch_in_place: tuple[Path, Path, Path], between: str
) -> None:
    """A revert (or an apply) by another process between loading a model and reading which patches it holds: the
    loaded weights and the journal disagree, so generate/eval must not add patches on the journal's word (a revert
    of P then made P be applied a second time)."""
    from erasekit.checkpoints.in_place import in_place_stack
    from erasekit.checkpoints.pipeline import load_pipeline
    from erasekit.errors import TargetLockedError
    from erasekit.format.patchfile import load_patch

    model, in_place, other = toy_with_a_patch_in_place
    pipe, ckpt = load_pipeline(model)
    if between == "revert":
        revert_from_checkpoint(in_place, model)
    else:
        apply_to_checkpoint([other], model, in_place=True)
    with pytest.raises(TargetLockedError, match="in place while it was loaded"):
        in_place_stack([load_patch(in_place)], ckpt)
    if between == "revert":  # loaded again, the patch is added once
        assert (
            run(
                "generate", "a red circle", "-m", model, "-p", in_place, "-o", tmp_path / "o", "-n", "1", "--steps", "1"
            ).exit_code
            == 0
        )
