"""T5 as an encoder kind, on a standalone ``t5xxl_fp16.safetensors`` as ComfyUI users keep it: its FFN
(``wi_0``, ``wi_1``, ``wo``) has no biases, its patches name modules ``lora_te3_encoder_block_{i}_layer_1_...``,
``wo`` stays float32 where the file keeps it so, and 8-bit float files are refused, never approximated."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import snapshot
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from erasekit.checkpoints.layouts import detect
from erasekit.cli import app
from erasekit.errors import PatchFormatError
from erasekit.format import _st
from erasekit.format.patchfile import load_patch, save_patch
from erasekit.testing import make_checkpoint

runner = CliRunner()
PROJECTIONS = ("wi_0", "wi_1", "wo")
MODULE = "lora_te3_encoder_block_1_layer_1_DenseReluDense_{}"
KEY = "encoder.block.1.layer.1.DenseReluDense.{}.weight"


def run(*args: object):  # type: ignore[no-untyped-def]
    return runner.invoke(app, [str(a) for a in args])


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def dtypes(path: Path) -> dict[str, str]:
    return {k: e.dtype for k, e in _st.read_header(path).entries.items()}


@pytest.fixture
def t5(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny T5 v1.1 encoder file (F16, ``wo`` F32 as transformers keeps it) and a copy with block 1's FFN
    changed."""
    base = make_checkpoint(tmp_path / "t5xxl_fp16.safetensors", "t5-file", "F16")
    edited = make_checkpoint(tmp_path / "edited" / "t5xxl_fp16.safetensors", "t5-file", "F16", edit_layers=[1])
    return base, edited


def diff(t5: tuple[Path, Path], out: Path, *rank: object) -> Path:
    r = run("diff", *t5, "-o", out, *rank)
    assert r.exit_code == 0, r.output
    return out


@pytest.mark.parametrize("dtype", ["F16", "BF16", "F32"])
def test_a_standalone_t5_file_is_detected_in_every_precision(tmp_path: Path, dtype: str) -> None:
    path = make_checkpoint(tmp_path / "t5xxl.safetensors", "t5-file", dtype)
    ckpt = detect(path)
    assert (ckpt.layout, ckpt.architecture) == ("t5-encoder-file", "t5-text")
    assert {s: (e.dims, e.prefix) for s, e in ckpt.encoders.items()} == {"te3": ((32, 64, 2), "")}
    assert dtypes(path)[KEY.format("wo")] == "F32" and dtypes(path)[KEY.format("wi_0")] == dtype
    r = run("inspect", path)
    assert r.exit_code == 0 and "t5-encoder-file" in r.stdout
    shown = "F32" if dtype == "F32" else f"{dtype}/F32"  # wi_0 and wi_1 as the file keeps them, then wo
    assert r.stdout.splitlines()[4].split()[-1] == shown


def test_diff_of_two_t5_files_writes_a_patch_without_biases_named_as_comfyui_names_t5(
    tmp_path: Path, t5: tuple[Path, Path]
) -> None:
    r = run("diff", *t5, "-o", tmp_path / "dense.erasepatch")
    assert r.exit_code == 0, r.output
    assert "AUTOMATIC1111: loads no network into a T5 text encoder" in r.stdout
    dense = load_patch(tmp_path / "dense.erasepatch")
    assert set(dense.tensors) == {MODULE.format(p) + ".diff" for p in PROJECTIONS}
    assert dense.manifest.base.architecture == "t5-text" and set(dense.manifest.base.encoders) == {"te3"}
    assert all(not d.bias for d in dense.manifest.deltas.values())
    assert set(dense.manifest.base.tensors) == {MODULE.format(p) + ".weight" for p in PROJECTIONS}
    assert dense.manifest.base.tensors[MODULE.format("wo") + ".weight"].dtype == "F32"
    base, edited = (load_file(str(p)) for p in t5)
    for p in PROJECTIONS:
        want = edited[KEY.format(p)].double() - base[KEY.format(p)].double()
        np.testing.assert_allclose(dense.weight_delta(MODULE.format(p)), want.numpy(), rtol=0, atol=1e-7)
    ranked = load_patch(diff(t5, tmp_path / "r2.erasepatch", "--rank", "2"))
    assert set(ranked.tensors) == {
        MODULE.format(p) + s for p in PROJECTIONS for s in (".lora_up.weight", ".lora_down.weight", ".alpha")
    }
    shown = json.loads(run("inspect", tmp_path / "r2.erasepatch", "--json").stdout)
    assert [(row["proj"], row["storage"], row["bias_delta_norm"]) for row in shown["rows"]] == [
        (p, "rank 2", None) for p in PROJECTIONS
    ]


def test_apply_in_place_keeps_each_tensors_dtype_and_revert_is_bit_for_bit(
    tmp_path: Path, t5: tuple[Path, Path]
) -> None:
    patch = diff(t5, tmp_path / "p.erasepatch")
    target, before, stored = t5[0], sha(t5[0]), dtypes(t5[0])
    original = {k: v.clone() for k, v in load_file(str(target)).items()}  # not the file's memory map
    r = run("apply", patch, "--to", target, "--in-place")
    assert r.exit_code == 0 and "3 tensors, base fingerprint exact" in r.stdout, r.output
    assert dtypes(target) == stored
    applied, delta = load_file(str(target)), load_patch(patch)
    for p in PROJECTIONS:
        w = original[KEY.format(p)]
        want = (w.float() + torch.from_numpy(delta.weight_delta(MODULE.format(p)))).to(w.dtype)
        assert applied[KEY.format(p)].dtype == (torch.float32 if p == "wo" else torch.float16)
        assert torch.equal(applied[KEY.format(p)], want), p
    assert "t5xxl_fp16 minus t5xxl_fp16" in run("inspect", target).stdout
    r = run("apply", "--revert", patch, "--to", target)
    assert r.exit_code == 0 and "sha256 verified" in r.stdout, r.output
    assert sha(target) == before


def test_apply_to_a_copy_merge_and_comfyui_export(tmp_path: Path, t5: tuple[Path, Path]) -> None:
    dense, r1, r2 = (
        diff(t5, tmp_path / f"{n}.erasepatch", *rank)
        for n, rank in [("d", ()), ("r1", ("--rank", "1")), ("r2", ("--rank", "2"))]
    )
    before = snapshot(t5[0])
    r = run("apply", r2, "--to", t5[0], "-o", tmp_path / "out.safetensors")
    assert r.exit_code == 0, r.output
    assert snapshot(t5[0]) == before and dtypes(tmp_path / "out.safetensors") == dtypes(t5[0])
    r = run("merge", r1, r2, "-o", tmp_path / "lowrank.erasepatch")
    assert r.exit_code == 0, r.output
    lowrank = load_patch(tmp_path / "lowrank.erasepatch")
    assert {(d.storage, d.rank, d.bias) for d in lowrank.manifest.deltas.values()} == {("lowrank", 3, False)}
    assert not any(n.endswith(".diff_b") for n in lowrank.tensors)
    r = run("merge", dense, r2, "-o", tmp_path / "summed.erasepatch")
    assert r.exit_code == 0, r.output
    summed = load_patch(tmp_path / "summed.erasepatch")
    assert set(summed.tensors) == {MODULE.format(p) + ".diff" for p in PROJECTIONS}
    m = MODULE.format("wo")
    np.testing.assert_allclose(
        summed.weight_delta(m), load_patch(dense).weight_delta(m) + load_patch(r2).weight_delta(m), atol=1e-6
    )
    out = tmp_path / "comfy.safetensors"
    r = run("export", tmp_path / "summed.erasepatch", "--ui", "comfyui", "-o", out)
    assert r.exit_code == 0, r.output
    assert set(load_file(str(out))) == {MODULE.format(p) + ".diff" for p in PROJECTIONS}
    for ui, name in (("a1111", "AUTOMATIC1111"), ("diffusers", "diffusers")):
        r = run("export", tmp_path / "summed.erasepatch", "--ui", ui, "-o", tmp_path / f"{ui}.safetensors")
        assert r.exit_code == 5 and r.stderr == (
            f"error: {name} loads no network into a T5 text encoder; load the patch in ComfyUI, or apply it to the "
            "encoder itself (erasekit apply)\n"
        )
        assert not (tmp_path / f"{ui}.safetensors").exists()


def test_an_fp8_t5_file_is_refused_and_left_as_it_was(tmp_path: Path, t5: tuple[Path, Path]) -> None:
    patch = diff(t5, tmp_path / "p.erasepatch")
    fp8 = tmp_path / "t5xxl_fp8_e4m3fn.safetensors"
    state = load_file(str(t5[0]))
    save_file({k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in state.items()}, str(fp8))
    before = snapshot(tmp_path)
    for args in (
        ("apply", patch, "--to", fp8, "--in-place"),
        ("apply", patch, "--to", fp8, "-o", tmp_path / "out.safetensors"),
        ("diff", t5[0], fp8),
        ("inspect", patch, "--against", fp8),
    ):
        r = run(*args)
        assert r.exit_code == 5, (args, r.output)
        assert r.stderr.count("\n") == 1  # one line, naming the file (never a temporary copy) and a tensor
        assert r.stderr.startswith("error: t5xxl_fp8_e4m3fn.safetensors: tensor encoder.block.")
        assert (
            "is stored as F8_E4M3 (8-bit float), too coarse to add a patch's change to exactly; patch an fp16 or "
            in r.stderr
        )
        assert snapshot(tmp_path) == before
    r = run("inspect", fp8)
    assert r.exit_code == 0 and "F8_E4M3" in r.stdout


def test_a_t5_patch_never_goes_to_a_clip_encoder_of_the_same_shapes(tmp_path: Path, t5: tuple[Path, Path]) -> None:
    patch = diff(t5, tmp_path / "p.erasepatch")
    clip = make_checkpoint(tmp_path / "clip", "transformers-clip", "F16")  # CLIP-L's toy FFN is T5's: 32 x 64
    clip_edited = make_checkpoint(tmp_path / "clip-edited", "transformers-clip", "F16", edit_layers=[1])
    sd1 = make_checkpoint(tmp_path / "sd1.safetensors", "single-sd1", "F16")
    clip_patch = tmp_path / "clip.erasepatch"
    assert run("diff", clip, clip_edited, "-o", clip_patch).exit_code == 0
    before = snapshot(tmp_path)
    for target in (clip, sd1):
        r = run("apply", patch, "--to", target, "--in-place")
        assert r.exit_code == 5, r.output
        assert r.stderr.startswith("error: patch 't5xxl_fp16 minus t5xxl_fp16' changes a T5 text encoder, and ")
        assert r.stderr.endswith("has none; apply it to a model with a T5 text encoder\n")
    r = run("apply", clip_patch, "--to", t5[0], "--in-place")
    assert r.exit_code == 5 and "changes a CLIP text encoder, and " in r.stderr
    assert snapshot(tmp_path) == before


def test_a_t5_module_with_a_bias_delta_is_refused(tmp_path: Path, t5: tuple[Path, Path]) -> None:
    patch = load_patch(diff(t5, tmp_path / "p.erasepatch"))
    m = MODULE.format("wo")
    fingerprint = patch.manifest.base.tensors[m + ".weight"]
    base = patch.manifest.base.model_copy(update={"tensors": {**patch.manifest.base.tensors, m + ".bias": fingerprint}})
    deltas = {**patch.manifest.deltas, m: patch.manifest.deltas[m].model_copy(update={"bias": True})}
    patch.manifest = patch.manifest.model_copy(update={"base": base, "deltas": deltas})
    patch.tensors[m + ".diff_b"], patch.dtypes[m + ".diff_b"] = np.zeros(32, np.float32), "F32"
    save_patch(patch, tmp_path / "biased.erasepatch")
    with pytest.raises(PatchFormatError, match=f"module {m} records a bias delta, but T5 projections have no bias"):
        load_patch(tmp_path / "biased.erasepatch")


def test_a_t5_patch_applies_to_a_t5_encoder_model_in_memory_and_reverts_exactly(
    tmp_path: Path, t5: tuple[Path, Path]
) -> None:
    from transformers import T5EncoderModel

    import erasekit

    patch = diff(t5, tmp_path / "p.erasepatch")
    model = T5EncoderModel.from_pretrained(
        make_checkpoint(tmp_path / "folder", "transformers-t5", "F16"), dtype=torch.float16
    )
    assert detect(tmp_path / "folder").layout == "transformers-t5"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = erasekit.apply_patch(model, patch)
    assert (report.architecture, report.applied[0].fingerprint, report.applied[0].tensors) == ("t5-text", "exact", 3)
    wo = model.get_parameter(KEY.format("wo"))
    assert wo.dtype == torch.float32 and not torch.equal(wo, before[KEY.format("wo")])
    erasekit.revert_patch(model, patch)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_clip_patch_that_leaves_the_biases_shows_zero_not_none(tmp_path: Path) -> None:
    """None in `inspect --json` means the projection has no bias (T5); a CLIP patch stored without bias deltas
    leaves its biases as they are: 0.0, as before T5 came."""
    base = make_checkpoint(tmp_path / "sd1.safetensors", "single-sd1", "F16")
    edited = make_checkpoint(tmp_path / "ed" / "sd1.safetensors", "single-sd1", "F16", edit_layers=[1])
    patch = load_patch(diff((base, edited), tmp_path / "p.erasepatch"))
    patch.manifest = patch.manifest.model_copy(
        update={
            "deltas": {m: d.model_copy(update={"bias": False}) for m, d in patch.manifest.deltas.items()},
            "base": patch.manifest.base.model_copy(
                update={"tensors": {k: v for k, v in patch.manifest.base.tensors.items() if not k.endswith(".bias")}}
            ),
        }
    )
    for key in [k for k in patch.tensors if k.endswith(".diff_b")]:
        del patch.tensors[key], patch.dtypes[key]
    patch.__dict__.pop("patch_id", None)
    save_patch(patch, tmp_path / "nobias.erasepatch")
    shown = json.loads(run("inspect", tmp_path / "nobias.erasepatch", "--json").stdout)
    assert shown["rows"] and {row["bias_delta_norm"] for row in shown["rows"]} == {0.0}


def _other_t5(vocab: int = 64, gated: bool = True, bias_in_every_block: bool = False) -> dict[str, torch.Tensor]:
    """A tiny T5 encoder's tensors (8 wide, FFN 16, 2 blocks), with what tells the T5s apart: the vocabulary of
    ``shared`` (T5 v1.1's 32128, mT5's 250112, byT5's 384), a gated-GELU FFN (``wi_0``, ``wi_1``) or T5 v1.0's ReLU
    one (``wi``), relative attention bias in block 0 only or, as umT5 has it, in every block."""
    zeros = lambda *shape: torch.zeros(shape, dtype=torch.float16)  # noqa: E731
    sd = {"shared.weight": zeros(vocab, 8), "encoder.final_layer_norm.weight": zeros(8)}
    for i in range(2):
        block = f"encoder.block.{i}.layer."
        sd |= {f"{block}0.SelfAttention.{p}.weight": zeros(8, 8) for p in "qkvo"}
        if i == 0 or bias_in_every_block:
            sd[f"{block}0.SelfAttention.relative_attention_bias.weight"] = zeros(32, 2)
        sd |= {f"{block}1.DenseReluDense.{p}.weight": zeros(16, 8) for p in (("wi_0", "wi_1") if gated else ("wi",))}
        sd[f"{block}1.DenseReluDense.wo.weight"] = zeros(8, 16)
    return sd


SUPPORTED = (
    "erasekit patches CLIP and T5 v1.1 text encoders, those of SD1.x, SD2.x, SDXL, FLUX.1 and SD3.x; FLUX.1's and "
    "SD3.x's T5 is t5xxl_fp16.safetensors"
)
OTHER_T5S = {  # file -> (how it is built, what erasekit says it is)
    "umt5_xxl_fp16.safetensors": (
        {"bias_in_every_block": True},
        "a umT5 text encoder, as Wan uses (relative attention bias in every block), which erasekit does not patch",
    ),
    "t5_base.safetensors": (
        {"gated": False},
        "a T5 v1.0 text encoder, whose FFN is ReLU (DenseReluDense.wi, where T5 v1.1 has wi_0 and wi_1), which "
        "erasekit does not patch",
    ),
    "mt5_xl.safetensors": (
        {"vocab": 250112},
        "a multilingual mT5 text encoder, as HunyuanDiT uses (a vocabulary of 250112 tokens), which erasekit does "
        "not patch",
    ),
    "byt5_small.safetensors": (
        {"vocab": 384},
        "a byte-level byT5 text encoder (a vocabulary of 384 tokens), which erasekit does not patch",
    ),
}


@pytest.mark.parametrize("name", list(OTHER_T5S))
def test_a_t5_that_is_not_t5_v1_1_is_refused_in_one_line_by_every_command(
    tmp_path: Path, t5: tuple[Path, Path], name: str
) -> None:
    """umT5, mT5 and byT5 name their keys as T5 v1.1 does (mT5 and umT5 XXL have its FFN shapes too), and T5 v1.0
    its attention and ``wo``: each is told apart by its header and refused, never patched, diffed or read as
    having no text encoder."""
    from PIL import Image

    kwargs, what = OTHER_T5S[name]
    other = tmp_path / "other" / name
    other.parent.mkdir()
    save_file(_other_t5(**kwargs), str(other))  # type: ignore[arg-type]
    patch = diff(t5, tmp_path / "t5.erasepatch")
    (tmp_path / "images").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "images" / "a.png")
    before = snapshot(tmp_path)
    for args in (
        ("inspect", other),
        ("apply", patch, "--to", other, "--in-place"),
        ("apply", patch, "--to", other, "-o", tmp_path / "copy.safetensors"),
        ("inspect", patch, "--against", other),
        ("diff", t5[0], other, "-o", tmp_path / "d.erasepatch"),
        ("erase", "--model", other, "--concept", "x", "--images", tmp_path / "images", "-o", tmp_path / "e.erasepatch"),
    ):
        r = run(*args)
        assert r.exit_code == 4 and r.stderr == f"error: {name} is {what}; {SUPPORTED}\n", (args, r.output)
    assert snapshot(tmp_path) == before and not list(tmp_path.rglob(".erasekit"))


def test_a_umt5_in_a_pipeline_folder_or_a_folder_of_its_own_is_refused(tmp_path: Path, t5: tuple[Path, Path]) -> None:
    """A FLUX.1 folder whose text_encoder_2 holds a umT5 is refused at that file; a transformers folder of a umT5
    by its config's class."""
    flux = make_checkpoint(tmp_path / "flux", "diffusers-flux", "F16")
    save_file(_other_t5(bias_in_every_block=True), str(flux / "text_encoder_2" / "model.safetensors"))
    umt5 = tmp_path / "umt5"
    umt5.mkdir()
    (umt5 / "config.json").write_text(json.dumps({"architectures": ["UMT5EncoderModel"], "model_type": "umt5"}))
    save_file(_other_t5(bias_in_every_block=True), str(umt5 / "model.safetensors"))
    patch = diff(t5, tmp_path / "t5.erasepatch")
    before = snapshot(tmp_path)
    umt5_is = OTHER_T5S["umt5_xxl_fp16.safetensors"][1]
    by_class = umt5_is.replace("relative attention bias in every block", "its config.json names UMT5EncoderModel")
    for target, message in (
        (flux, f"{flux / 'text_encoder_2' / 'model.safetensors'} is {umt5_is}"),
        (umt5, f"{umt5} is {by_class}"),
    ):
        for args in (("inspect", target), ("apply", patch, "--to", target, "--in-place")):
            r = run(*args)
            assert r.exit_code == 4 and r.stderr == f"error: {message}; {SUPPORTED}\n", (args, r.output)
    assert snapshot(tmp_path) == before and not list(tmp_path.rglob(".erasekit"))
