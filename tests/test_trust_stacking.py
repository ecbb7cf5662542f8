"""Trust in a stack of patches applied in place: no patch is applied twice through a merged patch, an output is
never written inside its own source, a stacked apply checks the bytes there, and a refused command changes no
file (not even the journal)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import transformers
from typer.testing import CliRunner

import erasekit
from erasekit.checkpoints.diff import diff_checkpoints
from erasekit.checkpoints.in_place import in_place_stack
from erasekit.checkpoints.layouts import detect
from erasekit.checkpoints.merge import merge_patches
from erasekit.cli import app
from erasekit.errors import ErasekitError
from erasekit.format import _st
from erasekit.testing import make_checkpoint

runner = CliRunner()


def run(*args: object):  # type: ignore[no-untyped-def]
    return runner.invoke(app, [str(a) for a in args])


def every_file(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, the undo journal included."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def one_line(result) -> str:  # type: ignore[no-untyped-def]
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.fixture
def stack(tmp_path: Path) -> dict[str, Path]:
    """A tiny SD1.x file ``base`` (with a copy to patch, ``t``) and patches made from it: A (layer 1), B (layer 0),
    C (layer 1, another edit), M = merge(A, B)."""
    base = make_checkpoint(tmp_path / "base.safetensors", "single-sd1", "F16")
    out = {"base": base}
    for name, layers, seed in (("A", [1], 0), ("B", [0], 0), ("C", [1], 1)):
        edited = make_checkpoint(
            tmp_path / f"ed{name}.safetensors", "single-sd1", "F16", edit_layers=layers, edit_seed=seed
        )
        out[name] = tmp_path / f"{name}.erasepatch"
        diff_checkpoints(base, edited, output=out[name], title=f"{name}-title")
    merge_patches([out["A"], out["B"]], tmp_path / "M.erasepatch")
    out["M"] = tmp_path / "M.erasepatch"
    work = tmp_path / "work"
    work.mkdir()
    out["t"] = work / "t.safetensors"
    out["t"].write_bytes(base.read_bytes())
    return out


@pytest.mark.parametrize("first,then", [("A", "M"), ("M", "A")])
def test_a_merged_patch_never_applies_an_applied_patch_twice(stack: dict[str, Path], first: str, then: str) -> None:
    t = stack["t"]
    assert run("apply", stack[first], "--to", t, "--in-place").exit_code == 0
    before = every_file(t.parent)
    result = run("apply", stack[then], "--to", t, "--in-place")
    assert result.exit_code == 1
    line = one_line(result)
    if first == "A":
        assert line.startswith(f"error: 'A-title + B-title' contains 'A-title', which is already applied to {t}")
        assert line.endswith("revert it first, merge without it, or force it to apply it twice (--force)")
    else:
        assert line.startswith(f"error: 'A-title' is already applied to {t}")
        assert "as part of 'A-title + B-title'; revert 'A-title + B-title' first, leave 'A-title' out" in line
    assert every_file(t.parent) == before
    out = t.parent.parent / "out.safetensors"  # a copy inherits the journal, and the refusal
    assert run("apply", stack[then], "--to", t, "-o", out).exit_code == 1
    assert not out.exists() and every_file(t.parent) == before


def test_several_patches_of_one_command_that_hold_one_patch_twice_are_refused(stack: dict[str, Path]) -> None:
    t = stack["t"]
    before = every_file(t.parent)
    result = run("apply", stack["A"], stack["M"], "--to", t, "--in-place")
    assert result.exit_code == 1
    assert one_line(result).startswith(
        f"error: 'A-title + B-title' contains 'A-title', which is applied to {t} [single-file-sd1 (sd1)] by this "
        "command; apply only one of them, or force it to apply it twice (--force)"
    )
    assert every_file(t.parent) == before


def test_the_same_patch_given_twice_is_refused_in_a_file_and_in_memory(stack: dict[str, Path], tmp_path: Path) -> None:
    """``apply A A`` used to apply A twice (exit 0); in memory, applying A on top of A did too."""
    t = stack["t"]
    before = every_file(t.parent)
    result = run("apply", stack["A"], stack["A"], "--to", t, "--in-place")
    assert result.exit_code == 1
    assert one_line(result) == (
        f"error: patch 'A-title' is given twice to apply to {t} [single-file-sd1 (sd1)]; give it once (its strength "
        "sets how much it changes), or force it to apply it twice (--force)"
    )
    assert every_file(t.parent) == before
    base = make_checkpoint(tmp_path / "clip", "transformers-clip", "F32")
    diff_checkpoints(
        base,
        make_checkpoint(tmp_path / "clip1", "transformers-clip", "F32", edit_layers=[1]),
        output=tmp_path / "clip1.erasepatch",
    )
    model = transformers.CLIPTextModel.from_pretrained(base)
    patch = erasekit.load_patch(tmp_path / "clip1.erasepatch")
    erasekit.apply_patch(model, patch)
    held = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ErasekitError, match=r"is already applied to the in-memory CLIPTextModel \(clip-text\); revert it first"
    ):
        erasekit.apply_patch(model, patch, force=True)
    assert all(torch.equal(v, held[k]) for k, v in model.state_dict().items())


def test_a_merge_of_merges_names_every_patch_it_holds(stack: dict[str, Path], tmp_path: Path) -> None:
    t = stack["t"]
    merge_patches([stack["M"], stack["C"]], tmp_path / "MC.erasepatch", title="MC")
    assert run("apply", stack["A"], "--to", t, "--in-place").exit_code == 0
    before = every_file(t.parent)
    result = run("apply", tmp_path / "MC.erasepatch", "--to", t, "--in-place")
    assert result.exit_code == 1
    assert "'MC' contains 'A-title', which is already applied to" in one_line(result)
    assert every_file(t.parent) == before


def test_in_memory_a_merged_patch_never_applies_an_applied_patch_twice(stack: dict[str, Path], tmp_path: Path) -> None:
    t = stack["t"]
    assert run("apply", stack["A"], "--to", t, "--in-place").exit_code == 0
    with pytest.raises(ErasekitError, match="'A-title \\+ B-title' contains 'A-title', which is already applied"):
        in_place_stack([erasekit.load_patch(stack["M"])], detect(t))

    base = make_checkpoint(tmp_path / "clip", "transformers-clip", "F32")
    edits = [make_checkpoint(tmp_path / f"clip{i}", "transformers-clip", "F32", edit_layers=[i]) for i in (0, 1)]
    for i, edited in enumerate(edits):
        diff_checkpoints(base, edited, output=tmp_path / f"clip{i}.erasepatch")
    merge_patches([tmp_path / "clip0.erasepatch", tmp_path / "clip1.erasepatch"], tmp_path / "clipM.erasepatch")
    model = transformers.CLIPTextModel.from_pretrained(base)
    erasekit.apply_patch(model, erasekit.load_patch(tmp_path / "clip0.erasepatch"))
    held = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ErasekitError, match="contains '.*', which is already applied to the in-memory CLIPTextModel"):
        erasekit.apply_patch(model, erasekit.load_patch(tmp_path / "clipM.erasepatch"))
    assert all(torch.equal(v, held[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("inside", ["S3/text_encoder/out", "S3/out", "S3/text_encoder/../out", "link/out"])
def test_an_output_inside_the_source_folder_is_refused_before_copying(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, inside: str
) -> None:
    base = make_checkpoint(tmp_path / "S3", "diffusers-sd1", "F16")
    edited = make_checkpoint(tmp_path / "edited", "diffusers-sd1", "F16", edit_layers=[1])
    diff_checkpoints(base, edited, output=tmp_path / "A.erasepatch")
    (tmp_path / "link").symlink_to(base / "text_encoder")
    monkeypatch.chdir(tmp_path)
    before = every_file(tmp_path)
    result = run("apply", "A.erasepatch", "--to", "S3", "-o", inside)
    assert result.exit_code == 7
    assert one_line(result) == f"error: output {inside} is inside the checkpoint S3; choose an output outside it (-o)"
    assert every_file(tmp_path) == before


def change_behind_erasekits_back(t: Path, key: str, tmp_path: Path) -> None:
    """Put another model's bytes of the tensor ``key`` into ``t`` (same size and header: only the bytes differ)."""
    other = make_checkpoint(tmp_path / "other.safetensors", "single-sd1", "F16", seed=1)
    ent = _st.read_header(t).entries[key]
    data = other.read_bytes()[ent.begin : ent.end]
    with open(t, "r+b") as f:
        f.seek(ent.begin)
        f.write(data)


def fc1_of_layer_1(t: Path) -> str:
    return next(k for k in _st.read_header(t).entries if "layers.1.mlp.fc1.weight" in k)


def test_a_stacked_apply_checks_the_bytes_there_not_the_undo_record(stack: dict[str, Path], tmp_path: Path) -> None:
    t = stack["t"]
    assert run("apply", stack["A"], "--to", t, "--in-place").exit_code == 0
    change_behind_erasekits_back(t, fc1_of_layer_1(t), tmp_path)
    before = every_file(t.parent)
    result = run("apply", stack["C"], "--to", t, "--in-place")
    assert result.exit_code == 6
    assert one_line(result) == (
        f"error: 1 tensors of {t} [single-file-sd1 (sd1)] changed since 'A-title' was applied "
        f"({fc1_of_layer_1(t)}); nothing was written; revert 'A-title' forcing it (it restores the bytes from "
        "before it), or restore the file"
    )
    assert every_file(t.parent) == before


@pytest.mark.parametrize("command", ["revert", "apply C", "apply C -o"])
def test_a_refused_command_leaves_the_journal_as_it_was(stack: dict[str, Path], tmp_path: Path, command: str) -> None:
    t = stack["t"]
    assert run("apply", stack["A"], "--to", t, "--in-place").exit_code == 0
    change_behind_erasekits_back(t, fc1_of_layer_1(t), tmp_path)
    before = every_file(t.parent)
    args = {
        "revert": ["apply", "--revert", stack["A"], "--to", t],
        "apply C": ["apply", stack["C"], "--to", t, "--in-place"],
        "apply C -o": ["apply", stack["C"], "--to", t, "-o", tmp_path / "out.safetensors"],
    }[command]
    result = run(*args)
    assert result.exit_code == 6
    assert "1 tensors of " in one_line(result)
    assert every_file(t.parent) == before


def warnings_of(result) -> list[str]:  # type: ignore[no-untyped-def]
    return [line for line in result.stderr.splitlines() if line.startswith("warning:")]


def test_readers_say_that_a_patch_in_place_is_no_longer_there_whole(stack: dict[str, Path], tmp_path: Path) -> None:
    """Another program rewrites a tensor patch A wrote in place: every reader says the file no longer holds A whole
    (which tensor, and that a forced revert restores it: A's undo record holds the bytes), also after another patch
    was stacked on other tensors, until A is reverted; none reports it applied as if its bytes were there."""
    t, key = stack["t"], fc1_of_layer_1(stack["t"])
    assert run("apply", stack["A"], "--to", t, "--in-place").exit_code == 0
    change_behind_erasekits_back(t, key, tmp_path)
    warning = (
        f"warning: {t} no longer holds patch 'A-title' whole, though its undo journal lists it: 1 of the 4 tensors "
        f"it wrote in place hold other bytes now ({key} in t.safetensors; changed by another program since?); "
        f"erasekit apply --revert {stack['A']} --to {t} --force restores every tensor's bytes from before it "
        "(apply it anew after, to have it)"
    )
    for _ in range(2):  # the first reader stamps the file anew: the second still knows
        result = run("inspect", t)
        assert result.exit_code == 0 and warnings_of(result) == [warning], result.output
        assert "0001  A-title  1         exact        4 (1 changed since)" in result.stdout
    result = run("inspect", stack["A"], "--against", t)
    assert warnings_of(result) == [warning]
    assert (
        "exact; note: patches already applied to it: A-title (1 of its 4 tensors changed since by another program)"
        in " ".join(result.stdout.split())
    )
    result = run("inspect", stack["C"], "--against", t)
    assert (
        "apply refuses it: a tensor it changes was changed by another program since 'A-title' was applied in place "
        f"({key}); revert 'A-title' forcing it first, or restore the file" in " ".join(result.stdout.split())
    )
    result = run("diff", t, stack["base"])
    assert result.exit_code == 0 and warnings_of(result) == [warning]
    assert run("apply", stack["B"], "--to", t, "--in-place").exit_code == 0  # its save still knows A's tensor
    assert warnings_of(run("inspect", t)) == [warning]
    assert run("apply", "--revert", stack["A"], "--to", t, "--force").exit_code == 0
    result = run("inspect", t)
    assert warnings_of(result) == [] and "changed since" not in result.stdout


def test_a_reader_says_when_no_revert_can_restore_a_changed_tensor(stack: dict[str, Path], tmp_path: Path) -> None:
    """A low-rank patch's undo record holds the change, not the bytes: a tensor another program rewrote cannot be
    reverted, and the warning says so (and what to do) instead of offering a revert that fails."""
    t, key = stack["t"], fc1_of_layer_1(stack["t"])
    low_rank = tmp_path / "L.erasepatch"
    edited = make_checkpoint(tmp_path / "edL.safetensors", "single-sd1", "F16", edit_layers=[1])
    assert run("diff", stack["base"], edited, "--rank", "2", "-o", low_rank, "--title", "L-title").exit_code == 0
    assert run("apply", low_rank, "--to", t, "--in-place").exit_code == 0
    change_behind_erasekits_back(t, key, tmp_path)
    [warning] = warnings_of(run("inspect", t))
    assert warning.endswith(
        f"changed by another program since?); revert is impossible for {key} (its undo record holds the change, not "
        "the bytes from before it): restore the file from a backup or download it again (its undo journal is then "
        "set aside), and apply the patch anew"
    )
    before = every_file(t.parent)
    result = run("apply", "--revert", low_rank, "--to", t, "--force")
    assert result.exit_code != 0 and every_file(t.parent) == before  # as the warning said
