"""`erasekit merge`: several patches for one base into one; the merged patch does what applying them in order does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import snapshot
from safetensors.numpy import load_file
from typer.testing import CliRunner

from erasekit.checkpoints.apply import apply_to_checkpoint, revert_from_checkpoint
from erasekit.checkpoints.diff import diff_checkpoints
from erasekit.checkpoints.merge import merge_patches
from erasekit.cli import app
from erasekit.errors import IncompatiblePatchError, TargetNotWritableError
from erasekit.format.patchfile import Concept, Patch, load_patch, save_patch
from erasekit.testing import make_checkpoint

runner = CliRunner()
GOLDEN = Path(__file__).parent / "golden"
M = "lora_te_text_model_encoder_layers_"
SHARED, ONLY_A = f"{M}1_mlp_fc1", f"{M}0_mlp_fc2"  # layer 1 is in both patches, layer 0 in A only


def make_patch(
    tmp_path: Path,
    base: Path,
    name: str,
    layers: list[int],
    edit_seed: int,
    concepts: list[str],
    rank: int | None = None,
    dtype: str = "F32",
    seed: int = 0,
) -> Path:
    edited = make_checkpoint(
        tmp_path / f"{name}-edited.safetensors", "single-sd1", dtype, seed, edit_layers=layers, edit_seed=edit_seed
    )
    out = tmp_path / f"{name}.erasepatch"
    diff_checkpoints(base, edited, output=tmp_path / "tmp.erasepatch", title=name, rank=rank, dtype=dtype)
    p = load_patch(tmp_path / "tmp.erasepatch")
    (tmp_path / "tmp.erasepatch").unlink()
    manifest = p.manifest.model_copy(update={"concepts": [Concept(name=c) for c in concepts]})
    save_patch(Patch(manifest, p.tensors, p.dtypes), out)
    return out


@pytest.fixture()
def base(tmp_path: Path) -> Path:
    return make_checkpoint(tmp_path / "base.safetensors", "single-sd1")


@pytest.fixture()
def ab(tmp_path: Path, base: Path) -> tuple[Path, Path]:
    return (
        make_patch(tmp_path, base, "circle", [0, 1], 1, ["circle"]),
        make_patch(tmp_path, base, "red", [1], 2, ["red", "circle"]),
    )


def ffn(path: Path) -> dict[str, np.ndarray]:
    return {k: v for k, v in load_file(str(path)).items() if ".mlp." in k}


def assert_same_weights(x: Path, y: Path) -> None:
    a, b = ffn(x), ffn(y)
    assert a.keys() == b.keys()
    for k in a:  # (W + dA) + dB against W + (dA + dB): float32 rounding of each sum only
        np.testing.assert_allclose(
            a[k], b[k], rtol=0, atol=4 * np.finfo(np.float32).eps * float(np.abs(a[k]).max()), err_msg=k
        )


def test_merged_patch_does_what_a_then_b_does(tmp_path: Path, base: Path, ab: tuple[Path, Path]) -> None:
    report = merge_patches(ab, tmp_path / "m.erasepatch")
    m, a, b = load_patch(tmp_path / "m.erasepatch"), load_patch(ab[0]), load_patch(ab[1])
    # the sum, in float32, exactly; a module only A changes is A's
    assert np.array_equal(m.weight_delta(SHARED), a.weight_delta(SHARED) + b.weight_delta(SHARED))
    assert np.array_equal(m.bias_delta(SHARED), a.bias_delta(SHARED) + b.bias_delta(SHARED))
    assert np.array_equal(m.weight_delta(ONLY_A), a.weight_delta(ONLY_A))
    assert {r.module: r.how for r in report.modules}[SHARED] == "summed" and report.dtype == "F32"
    apply_to_checkpoint([tmp_path / "m.erasepatch"], base, output=tmp_path / "merged.safetensors")
    apply_to_checkpoint(list(ab), base, output=tmp_path / "ab.safetensors")
    assert_same_weights(tmp_path / "merged.safetensors", tmp_path / "ab.safetensors")
    assert not np.array_equal(
        ffn(tmp_path / "merged.safetensors")["cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc1.weight"],
        ffn(base)["cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc1.weight"],
    )


def test_revert_of_the_merged_patch_is_bit_exact(tmp_path: Path, base: Path, ab: tuple[Path, Path]) -> None:
    merge_patches(ab, tmp_path / "m.erasepatch")
    target = shutil.copy(base, tmp_path / "target.safetensors")
    before = snapshot(Path(target))
    apply_to_checkpoint([tmp_path / "m.erasepatch"], target, in_place=True)
    assert snapshot(Path(target)) != before
    assert revert_from_checkpoint(tmp_path / "m.erasepatch", target).verified
    assert snapshot(Path(target)) == before


def test_manifest_and_inspect_list_every_concept(tmp_path: Path, ab: tuple[Path, Path]) -> None:
    inputs = [load_patch(p) for p in ab]
    r = runner.invoke(app, ["merge", str(ab[0]), str(ab[1]), "-o", str(tmp_path / "m.erasepatch")])
    assert r.exit_code == 0, r.output
    assert "concepts: circle, red" in r.stdout
    m = load_patch(tmp_path / "m.erasepatch").manifest
    assert [(c.name, c.kind) for c in m.concepts] == [("circle", "object"), ("red", "object")]  # in order, once each
    assert m.title == "circle + red"
    assert m.method.name == "merge"
    assert m.method.hyperparameters["patches"] == [
        {"patch_id": p.patch_id, "title": p.title, "strength": 1.0} for p in inputs
    ]
    assert m.base.tensors == inputs[0].manifest.base.tensors | inputs[1].manifest.base.tensors
    assert set(m.deltas) == set(inputs[0].manifest.deltas)
    shown = runner.invoke(app, ["inspect", str(tmp_path / "m.erasepatch")])
    assert shown.exit_code == 0 and "concepts   circle (object), red (object)" in shown.stdout
    merged = ", ".join(f"{p.title} ({p.patch_id[:12]}) x1.0" for p in inputs)
    assert f"patches [{merged}]" in " ".join(shown.stdout.split()), "the inputs by title, short id and strength"
    js = json.loads(runner.invoke(app, ["inspect", str(tmp_path / "m.erasepatch"), "--json"]).stdout)
    assert [c["name"] for c in js["concepts"]] == ["circle", "red"]


def test_different_bases_are_refused_and_nothing_is_written(tmp_path: Path, ab: tuple[Path, Path]) -> None:
    other = make_checkpoint(tmp_path / "other.safetensors", "single-sd1", seed=5)
    stranger = make_patch(tmp_path, other, "stranger", [1], 3, ["square"], seed=5)
    before = snapshot(tmp_path)
    out = tmp_path / "m.erasepatch"
    with pytest.raises(IncompatiblePatchError) as e:
        merge_patches([ab[0], stranger], out)
    assert str(e.value) == (
        f"circle.erasepatch and stranger.erasepatch were made from different base models (base "
        f"tensor {M}1_mlp_fc1.bias differs); merge only patches made from the same base model "
        "(`erasekit inspect PATCH` shows each one's base)"
    )
    r = runner.invoke(app, ["merge", str(ab[0]), str(ab[1]), str(stranger), "-o", str(out)])
    assert r.exit_code == 5 and len(r.stderr.strip().splitlines()) == 1
    assert "circle.erasepatch and stranger.erasepatch were made from different base models" in r.stderr
    assert not out.exists() and snapshot(tmp_path) == before


def test_other_architecture_is_refused(tmp_path: Path, ab: tuple[Path, Path]) -> None:
    te = make_checkpoint(tmp_path / "te", "transformers-clip")
    te_edit = make_checkpoint(tmp_path / "te-edit", "transformers-clip", edit_layers=[1])
    diff_checkpoints(te, te_edit, output=tmp_path / "clip.erasepatch")
    r = runner.invoke(
        app, ["merge", str(ab[0]), str(tmp_path / "clip.erasepatch"), "-o", str(tmp_path / "m.erasepatch")]
    )
    assert r.exit_code == 5 and r.stderr.strip() == (
        "error: circle.erasepatch is for sd1 but clip.erasepatch is for clip-text; merge only patches made from the "
        "same base model (`erasekit inspect PATCH` shows each one's base)"
    )
    assert not (tmp_path / "m.erasepatch").exists()


def test_one_patch_and_an_existing_output_are_refused(tmp_path: Path, ab: tuple[Path, Path]) -> None:
    out = tmp_path / "m.erasepatch"
    r = runner.invoke(app, ["merge", str(ab[0]), "-o", str(out)])
    assert r.exit_code == 1 and r.stderr.startswith("error: merging needs at least two patches, got 1; ")
    assert not out.exists()
    out.write_bytes(b"mine")
    before = snapshot(tmp_path)
    with pytest.raises(TargetNotWritableError, match="already exists"):
        merge_patches(ab, out)
    r = runner.invoke(app, ["merge", str(ab[0]), str(ab[1]), "-o", str(out)])
    assert r.exit_code == 7 and len(r.stderr.strip().splitlines()) == 1
    r = runner.invoke(app, ["merge", str(ab[0]), str(ab[1]), "-o", str(ab[1])])  # onto an input
    assert r.exit_code == 7
    r = runner.invoke(app, ["merge", str(ab[0]), str(ab[1]), "-o", str(tmp_path / "m.txt")])
    assert r.exit_code == 7 and "must end in .erasepatch or .safetensors" in r.stderr
    assert snapshot(tmp_path) == before and not (tmp_path / "m.txt").exists()


def test_low_rank_inputs_are_concatenated_exactly(tmp_path: Path, base: Path) -> None:
    a = make_patch(tmp_path, base, "a", [0, 1], 1, ["circle"], rank=2)
    b = make_patch(tmp_path, base, "b", [1], 2, ["red"], rank=3)
    report = merge_patches([a, b], tmp_path / "m.erasepatch")
    pa, pb, m = load_patch(a), load_patch(b), load_patch(tmp_path / "m.erasepatch")
    assert m.manifest.deltas[SHARED].storage == "lowrank" and m.manifest.deltas[SHARED].rank == 5
    assert {r.module: r.how for r in report.modules}[SHARED] == "concatenated"
    want = pa.weight_delta(SHARED).astype(np.float64) + pb.weight_delta(SHARED)
    np.testing.assert_allclose(m.weight_delta(SHARED), want, rtol=0, atol=1e-6 * np.abs(want).max())
    # a module only A changes keeps A's factors, bytes and all
    for part in ("lora_up.weight", "lora_down.weight", "alpha"):
        assert np.array_equal(m.tensors[f"{ONLY_A}.{part}"], pa.tensors[f"{ONLY_A}.{part}"])
    assert m.manifest.deltas[ONLY_A] == pa.manifest.deltas[ONLY_A]
    apply_to_checkpoint([tmp_path / "m.erasepatch"], base, output=tmp_path / "merged.safetensors")
    apply_to_checkpoint([a, b], base, output=tmp_path / "ab.safetensors")
    assert_same_weights(tmp_path / "merged.safetensors", tmp_path / "ab.safetensors")
    # strengths are folded into the up factors
    merge_patches([a, b], tmp_path / "scaled.erasepatch", strengths=[0.5, -2])
    apply_to_checkpoint([tmp_path / "scaled.erasepatch"], base, output=tmp_path / "scaled.safetensors")
    apply_to_checkpoint([a, b], base, output=tmp_path / "ab-scaled.safetensors", strength=[0.5, -2])
    assert_same_weights(tmp_path / "scaled.safetensors", tmp_path / "ab-scaled.safetensors")

    # dense on request; rank N projects the sum (what it lost is recorded); dense and low-rank inputs sum dense
    merge_patches([a, b], tmp_path / "dense.erasepatch", rank="dense")
    dense = load_patch(tmp_path / "dense.erasepatch")
    assert {d.storage for d in dense.manifest.deltas.values()} == {"dense"}
    np.testing.assert_allclose(dense.weight_delta(SHARED), want, rtol=0, atol=1e-6 * np.abs(want).max())
    r = runner.invoke(app, ["merge", str(a), str(b), "-o", str(tmp_path / "r1.erasepatch"), "--rank", "1", "--json"])
    assert r.exit_code == 0, r.output
    rows = {row["module"]: row for row in json.loads(r.stdout)["modules"]}
    assert rows[SHARED]["how"] == "projected" and 0 < rows[SHARED]["stored_error"] < 1
    assert load_patch(tmp_path / "r1.erasepatch").manifest.deltas[SHARED].rank == 1
    c = make_patch(tmp_path, base, "c", [1], 3, ["square"])
    merge_patches([a, c], tmp_path / "mixed.erasepatch")
    mixed, pc = load_patch(tmp_path / "mixed.erasepatch"), load_patch(c)
    assert mixed.manifest.deltas[SHARED].storage == "dense"
    assert np.array_equal(mixed.weight_delta(SHARED), pa.weight_delta(SHARED) + pc.weight_delta(SHARED))
    r = runner.invoke(app, ["merge", str(a), str(b), "-o", str(tmp_path / "bad.erasepatch"), "--rank", "0"])
    assert r.exit_code == 1 and "(--rank)" in r.stderr and not (tmp_path / "bad.erasepatch").exists()


def test_strengths_scale_each_patch(tmp_path: Path, base: Path, ab: tuple[Path, Path]) -> None:
    r = runner.invoke(
        app,
        ["merge", str(ab[0]), str(ab[1]), "-o", str(tmp_path / "m.erasepatch"), "--strength", "0.5", "--strength", "2"],
    )
    assert r.exit_code == 0, r.output
    m, a, b = load_patch(tmp_path / "m.erasepatch"), load_patch(ab[0]), load_patch(ab[1])
    assert np.array_equal(
        m.weight_delta(SHARED), np.float32(0.5) * a.weight_delta(SHARED) + np.float32(2) * b.weight_delta(SHARED)
    )
    assert [p["strength"] for p in m.manifest.method.hyperparameters["patches"]] == [0.5, 2.0]
    apply_to_checkpoint([tmp_path / "m.erasepatch"], base, output=tmp_path / "merged.safetensors")
    apply_to_checkpoint(list(ab), base, output=tmp_path / "ab.safetensors", strength=[0.5, 2])
    assert_same_weights(tmp_path / "merged.safetensors", tmp_path / "ab.safetensors")
    for bad, message in (
        (["--strength", "1", "--strength", "1", "--strength", "1"], "3 strengths for 2 patches"),
        (["--strength", "0"], "strength 0 cannot be merged"),
    ):
        r = runner.invoke(app, ["merge", str(ab[0]), str(ab[1]), "-o", str(tmp_path / "x.erasepatch"), *bad])
        assert r.exit_code == 1 and message in r.stderr and "(--strength)" in r.stderr
    assert not (tmp_path / "x.erasepatch").exists()


def test_recorded_evaluations_are_not_carried_over(tmp_path: Path) -> None:
    report = merge_patches([GOLDEN / "v1-evaluated.erasepatch", GOLDEN / "v1.erasepatch"], tmp_path / "m.erasepatch")
    m = load_patch(tmp_path / "m.erasepatch")
    assert load_patch(GOLDEN / "v1-evaluated.erasepatch").manifest.evaluations
    assert m.manifest.evaluations == [] and [c.name for c in m.manifest.concepts] == ["circle"]
    assert any("evaluation(s) of the inputs are not carried over" in n for n in report.notes)
    assert any("are the same patch" in n for n in report.notes)
    # the golden file mixes F16, BF16 and F32 storage: the merge stores F32; its dense module is twice the input's
    assert report.dtype == "F32"
    golden = load_patch(GOLDEN / "v1.erasepatch")
    d = f"{M}0_mlp_fc1"
    assert np.array_equal(m.weight_delta(d), golden.weight_delta(d) * 2)


def test_the_same_base_at_another_precision_merges(tmp_path: Path, base: Path, ab: tuple[Path, Path]) -> None:
    base16 = make_checkpoint(tmp_path / "base16.safetensors", "single-sd1", "F16")
    half = make_patch(tmp_path, base16, "half", [1], 4, ["square"], dtype="F16")
    before = snapshot(tmp_path)
    report = merge_patches([ab[0], half], tmp_path / "m.erasepatch")
    assert any("same base at different precisions (F32, F16)" in n for n in report.notes)
    m = load_patch(tmp_path / "m.erasepatch")
    assert m.manifest.base.tensors[f"{SHARED}.weight"] == load_patch(ab[0]).manifest.base.tensors[f"{SHARED}.weight"]
    assert report.dtype == "F32" and [c.name for c in m.manifest.concepts] == ["circle", "square"]
    assert snapshot(tmp_path) == {**before, "m.erasepatch": snapshot(tmp_path / "m.erasepatch")["m.erasepatch"]}
