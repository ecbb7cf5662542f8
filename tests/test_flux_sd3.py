"""FLUX.1 and SD3.x as families, for every file operation (inspect, diff, apply and revert, merge, export): their
diffusers folders (SD3.x with and without its T5), their all-in-one single files, a model id's cache, the encoder files
ComfyUI users keep beside them (a patch of several encoders applies its one fitting part there), and the files and
commands that are refused in one line (a transformer alone; erase, generate and eval of a single file whose
transformer the bundled configs do not describe; tests/test_flux_sd3_erase.py and tests/test_flux_sd3_configs.py run
them on tiny real pipelines).

The folders are tiny and random (:func:`erasekit.testing.make_checkpoint`): real key names and configs for the text
encoders, placeholder tensors for the transformer and the VAE, which no file operation reads."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import snapshot
from safetensors.numpy import load_file
from typer.testing import CliRunner

from erasekit.cli import app
from erasekit.families import family
from erasekit.format.patchfile import load_patch
from erasekit.testing import add_to_hub_cache, make_checkpoint

runner = CliRunner()
CLIP_L = "lora_te1_text_model_encoder_layers_1_mlp_{}"
CLIP_G = "lora_te2_text_model_encoder_layers_1_mlp_{}"
T5 = "lora_te3_encoder_block_1_layer_1_DenseReluDense_{}"
MODULES = {
    "te1": [CLIP_L.format(p) for p in ("fc1", "fc2")],
    "te2": [CLIP_G.format(p) for p in ("fc1", "fc2")],
    "te3": [T5.format(p) for p in ("wi_0", "wi_1", "wo")],
}
# layout -> (architecture, encoder slots, inspect's layout)
MODELS = {
    "diffusers-flux": ("flux", ["te1", "te3"], "diffusers"),
    "diffusers-sd3": ("sd3", ["te1", "te2", "te3"], "diffusers"),
    "diffusers-sd3-no-t5": ("sd3", ["te1", "te2"], "diffusers"),
    "single-flux": ("flux", ["te1", "te3"], "single-file-flux"),
    "single-sd3": ("sd3", ["te1", "te2", "te3"], "single-file-sd3"),
    "single-sd3-no-t5": ("sd3", ["te1", "te2"], "single-file-sd3"),
}


def run(*args: object):  # type: ignore[no-untyped-def]
    return runner.invoke(app, [str(a) for a in args])


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def model(root: Path, layout: str, name: str = "base", **edit: object) -> Path:
    """A model of ``layout`` (an edited one with ``edit_layers``), as a folder or a .safetensors file."""
    path = root / name if layout.startswith("diffusers") else root / f"{name}.safetensors"
    return make_checkpoint(path, layout, "F16", **edit)  # type: ignore[arg-type]


def patch_of(root: Path, layout: str, name: str = "p", *rank: object) -> Path:
    """The patch that turns a base model of ``layout`` into one with layer 1 of every encoder edited."""
    base = root / layout / "base"
    if not (base.exists() or base.with_suffix(".safetensors").exists()):
        model(root / layout, layout)
        model(root / layout, layout, "edited", edit_layers=[1])
    suffix = "" if layout.startswith("diffusers") else ".safetensors"
    out = root / f"{name}.erasepatch"
    r = run("diff", root / layout / f"base{suffix}", root / layout / f"edited{suffix}", "-o", out, *rank)
    assert r.exit_code == 0, r.output
    return out


@pytest.mark.parametrize("layout", list(MODELS))
def test_inspect_shows_the_family_and_its_encoder_slots(tmp_path: Path, layout: str) -> None:
    arch, slots, shown = MODELS[layout]
    path = model(tmp_path, layout)
    r = run("inspect", path, "--json")
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert (got["architecture"], got["layout"], [e["slot"] for e in got["encoders"]]) == (arch, shown, slots)
    if layout.startswith("diffusers"):
        assert got["config"] is None  # a folder has its own
    else:  # the placeholder transformer is not FLUX.1's or SD3.x's (tests/test_flux_sd3_configs.py has real ones)
        assert got["config"].startswith("none (base.safetensors is a transformer of other sizes")
    r = run("inspect", path)
    assert f"architecture  {arch}" in r.stdout and all(f"\n{s} " in r.stdout for s in slots)


@pytest.mark.parametrize("layout", list(MODELS))
def test_a_patch_applies_in_place_and_reverts_bit_for_bit(tmp_path: Path, layout: str) -> None:
    arch, slots, _ = MODELS[layout]
    patch = patch_of(tmp_path, layout)
    shown = load_patch(patch)
    assert shown.manifest.base.architecture == arch and sorted(shown.manifest.base.encoders) == slots
    assert set(shown.manifest.deltas) == {m for s in slots for m in MODULES[s]}
    assert "prediction_type" not in shown.manifest.method.hyperparameters  # flow matching: neither epsilon nor v
    target = next((tmp_path / layout).glob("base*"))
    before = snapshot(target)
    tensors = sum({"te1": 4, "te2": 4, "te3": 3}[s] for s in slots)  # CLIP: fc1, fc2 and their biases; T5: no bias
    r = run("apply", patch, "--to", target, "--in-place")
    assert r.exit_code == 0 and f"{tensors} tensors, base fingerprint exact" in r.stdout, r.output
    assert r.stderr == "" and snapshot(target) != before
    r = run("diff", tmp_path / layout / target.name.replace("base", "edited"), target, "--json")
    assert r.exit_code == 0 and max(c["relative"] for c in json.loads(r.stdout)["changes"]) < 1e-3, r.output
    r = run("apply", "--revert", patch, "--to", target)
    assert r.exit_code == 0 and "sha256 verified" in r.stdout, r.output
    assert snapshot(target) == before


@pytest.mark.parametrize("layout", ["diffusers-flux", "single-sd3"])
def test_apply_to_a_copy_leaves_the_model_as_it_was(tmp_path: Path, layout: str) -> None:
    patch = patch_of(tmp_path, layout, "p", "--rank", "2")
    source = next((tmp_path / layout).glob("base*"))
    before = snapshot(source)
    out = tmp_path / ("out" if source.is_dir() else "out.safetensors")
    r = run("apply", patch, "--to", source, "-o", out)
    assert r.exit_code == 0, r.output
    assert snapshot(source) == before
    changed = {name for name, digest in snapshot(out).items() if before.get(name) != digest}
    assert changed == (
        {"text_encoder/model.safetensors", "text_encoder_2/model.safetensors"}
        if source.is_dir()
        else {"out.safetensors"}
    )
    r = run("inspect", out, "--json")
    assert [a["title"] for a in json.loads(r.stdout)["applied"]] == ["edited minus base"]


def test_merge_and_comfyui_export_name_every_encoder_as_comfyui_does(tmp_path: Path) -> None:
    for layout in ("diffusers-flux", "diffusers-sd3"):
        dense, ranked = (
            patch_of(tmp_path, layout, f"{layout}-d"),
            patch_of(tmp_path, layout, f"{layout}-r", "--rank", "1"),
        )
        merged = tmp_path / f"{layout}-merged.erasepatch"
        r = run("merge", dense, ranked, "-o", merged)
        assert r.exit_code == 0, r.output
        summed, arch = load_patch(merged), MODELS[layout][0]
        assert summed.manifest.base.architecture == arch
        m = T5.format("wo")
        np.testing.assert_allclose(
            summed.weight_delta(m), load_patch(dense).weight_delta(m) + load_patch(ranked).weight_delta(m), atol=1e-6
        )
        out = tmp_path / f"{layout}-comfy.safetensors"
        r = run("export", merged, "--ui", "comfyui", "-o", out)
        assert r.exit_code == 0, r.output
        slots = MODELS[layout][1]
        want = {f"{m}.diff" for s in slots for m in MODULES[s]} | {
            f"{m}.diff_b" for s in slots if s != "te3" for m in MODULES[s]
        }
        assert set(load_file(str(out))) == want
        for ui, name in (("a1111", "AUTOMATIC1111"), ("diffusers", "diffusers")):
            r = run("export", merged, "--ui", ui, "-o", tmp_path / f"{ui}.safetensors")
            assert r.exit_code == 5 and r.stderr == (
                f"error: erasekit has no {name} export for {family(arch).title} patches yet; load the patch in "
                "ComfyUI as it is, or apply it to the model's files (erasekit apply)\n"
            )
            assert not (tmp_path / f"{ui}.safetensors").exists()


def test_a_flux_patch_applies_its_one_fitting_part_to_each_encoder_file(tmp_path: Path) -> None:
    """ComfyUI users keep FLUX.1's encoders as clip_l.safetensors and t5xxl_fp16.safetensors: a FLUX.1 patch applies
    its CLIP-L part to the one and its T5 part to the other, saying which part is left for which file, and each
    reverts bit for bit."""
    patch = patch_of(tmp_path, "diffusers-flux")
    clip_l = make_checkpoint(tmp_path / "clip_l.safetensors", "clip-l-file", "F16")
    t5 = make_checkpoint(tmp_path / "t5xxl_fp16.safetensors", "t5-file", "F16")
    before = {p: sha(p) for p in (clip_l, t5)}
    for target, tensors, left in (
        (clip_l, 4, "its te3 (T5 v1.1 XXL) part is left for t5xxl_fp16.safetensors: apply the patch to that too"),
        (t5, 3, "its te1 (CLIP ViT-L/14) part is left for clip_l.safetensors: apply the patch to that too"),
    ):
        r = run("apply", patch, "--to", target, "--in-place")
        assert r.exit_code == 0 and f"{tensors} tensors, base fingerprint exact" in r.stdout, r.output
        assert r.stderr.count("\n") == 1 and r.stderr.rstrip().endswith(left), r.stderr
        assert sha(target) != before[target]
        r = run("inspect", patch, "--against", target)
        assert r.exit_code == 0 and "exact; note: patches already applied to it: edited minus base" in r.stdout
    for target in (clip_l, t5):
        r = run("apply", "--revert", patch, "--to", target)
        assert r.exit_code == 0 and "sha256 verified" in r.stdout, r.output
        assert sha(target) == before[target]
    out = tmp_path / "t5-copy.safetensors"
    r = run("apply", patch, "--to", t5, "-o", out)
    assert r.exit_code == 0 and sha(t5) == before[t5], r.output
    assert load_file(str(out))["encoder.block.0.layer.1.DenseReluDense.wo.weight"].dtype == np.float32


def test_an_sd3_patch_goes_to_clip_g_by_its_shapes_and_a_patch_fitting_no_part_is_refused(tmp_path: Path) -> None:
    patch = patch_of(tmp_path, "diffusers-sd3")
    clip_g = make_checkpoint(tmp_path / "clip_g.safetensors", "clip-g-file", "F16")
    r = run("apply", patch, "--to", clip_g, "--in-place")
    assert r.exit_code == 0 and "4 tensors, base fingerprint exact" in r.stdout, r.output
    assert (
        "(encoder te2 -> te); its te1 (CLIP ViT-L/14) and te3 (T5 v1.1 XXL) parts are left for clip_l.safetensors "
        "and t5xxl_fp16.safetensors: apply the patch to those too" in r.stderr
    )
    sd2 = make_checkpoint(tmp_path / "sd2", "diffusers-sd2", "F16")  # an OpenCLIP-H encoder: none of its parts fit
    lone = tmp_path / "sd2" / "text_encoder"
    before = snapshot(tmp_path / "sd2")
    r = run("apply", patch, "--to", lone, "-o", tmp_path / "none")
    assert r.exit_code == 5 and r.stderr.count("\n") == 1, r.output
    assert r.stderr.startswith(
        "error: patch 'edited minus base' changes the te1 (CLIP ViT-L/14), te2 (OpenCLIP ViT-bigG/14) and te3 (T5 "
        "v1.1 XXL) of an sd3 model, and none of them fit "
    )
    assert snapshot(sd2) == before and not (tmp_path / "none").exists()


def _clip_1280_wide(path: Path) -> Path:
    """A CLIP encoder file as wide as OpenCLIP ViT-bigG/14 (1280), one layer with a narrow FFN: what its width is
    read from, and nothing more."""
    from safetensors.numpy import save_file

    layer = "text_model.encoder.layers.0.mlp."
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"{layer}fc1.weight": (8, 1280), f"{layer}fc1.bias": (8,), f"{layer}fc2.weight": (1280, 8)}
    save_file({k: np.zeros(v, np.float16) for k, v in (tensors | {f"{layer}fc2.bias": (1280,)}).items()}, str(path))
    return path


def test_a_patch_fitting_no_encoder_file_names_both_widths_and_each_parts_file(tmp_path: Path) -> None:
    """A FLUX.1 patch on clip_l.safetensors that holds a CLIP-G, on an SD2.x CLIP-H, on a T5 of another width: none of
    its parts fits, and the line says the file's width (with the encoder of that width, where it is a real one), its
    parts' widths, and which file each part goes to."""
    from safetensors.numpy import save_file

    patch = patch_of(tmp_path, "diffusers-flux")
    sd2 = make_checkpoint(tmp_path / "sd2", "diffusers-sd2", "F16")
    t5 = tmp_path / "t5_base.safetensors"
    ffn = "encoder.block.{}.layer.1.DenseReluDense.{}.weight"
    shapes = {"wi_0": (16, 8), "wi_1": (16, 8), "wo": (8, 16)}
    save_file({ffn.format(i, p): np.zeros(s, np.float16) for i in range(2) for p, s in shapes.items()}, str(t5))
    targets = {
        make_checkpoint(
            tmp_path / "clip_l.safetensors", "clip-g-file", "F16"
        ): "its CLIP is 40 wide, the patch's te1 32 wide",
        sd2 / "text_encoder": "its CLIP is 48 wide, the patch's te1 32 wide",
        _clip_1280_wide(tmp_path / "big" / "clip_l.safetensors"): (
            "its CLIP is 1280 wide (OpenCLIP ViT-bigG/14's width), the patch's te1 32 wide"
        ),
        t5: "its T5 is 8 wide, the patch's te3 32 wide",
    }
    before = snapshot(tmp_path)
    for target, widths in targets.items():
        for args in (
            ("apply", patch, "--to", target, "--in-place"),
            ("apply", patch, "--to", target, "-o", tmp_path / "o"),
        ):
            r = run(*args)
            assert r.exit_code == 5 and r.stderr.count("\n") == 1, (args, r.output)
            assert r.stderr.startswith(
                "error: patch 'edited minus base' changes the te1 (CLIP ViT-L/14) and te3 (T5 v1.1 XXL) of a flux model, "
                f"and none of them fit {target} "
            ), r.stderr
            assert r.stderr.endswith(
                f"]: {widths}; apply it to a flux checkpoint, or each part to its own encoder's file: te1 to CLIP "
                "ViT-L/14's (clip_l.safetensors), te3 to T5 v1.1 XXL's (t5xxl_fp16.safetensors)\n"
            ), r.stderr
    assert snapshot(tmp_path) == before and not (tmp_path / "o").exists()


def test_an_sdxl_patch_on_a_clip_file_takes_the_same_road(tmp_path: Path) -> None:
    """The partial apply is the rule for every patch of several encoders on one encoder's file: SDXL's too."""
    base = make_checkpoint(tmp_path / "sdxl", "diffusers-sdxl", "F16")
    edited = make_checkpoint(tmp_path / "sdxl-edited", "diffusers-sdxl", "F16", edit_layers=[1])
    assert run("diff", base, edited, "-o", tmp_path / "xl.erasepatch").exit_code == 0
    clip = make_checkpoint(tmp_path / "clip", "transformers-clip", "F16")
    before = snapshot(clip)
    r = run("apply", tmp_path / "xl.erasepatch", "--to", clip, "--in-place")
    assert r.exit_code == 0 and "4 tensors, base fingerprint exact" in r.stdout, r.output
    assert "its te2 (OpenCLIP ViT-bigG/14) part is left for clip_g.safetensors" in r.stderr
    assert run("apply", "--revert", tmp_path / "xl.erasepatch", "--to", clip).exit_code == 0
    assert snapshot(clip) == before


def test_patches_cross_between_flux_and_sd3_slot_for_slot_as_their_fingerprints_allow(tmp_path: Path) -> None:
    flux = patch_of(tmp_path, "diffusers-flux", "flux")
    sd3 = model(tmp_path, "diffusers-sd3", "sd3")
    before = snapshot(sd3)
    r = run("apply", flux, "--to", sd3, "--in-place")  # the same CLIP-L and T5 (the toy models draw them alike)
    assert r.exit_code == 0 and "7 tensors, base fingerprint exact" in r.stdout, r.output
    assert "was made for flux and goes to an sd3 model slot for slot (te1, te3); its base fingerprints tell" in r.stderr
    assert run("apply", "--revert", flux, "--to", sd3).exit_code == 0 and snapshot(sd3) == before
    sd3_patch = patch_of(tmp_path, "diffusers-sd3", "sd3p")
    target = tmp_path / "diffusers-flux" / "base"
    before = snapshot(target)
    r = run("apply", sd3_patch, "--to", target, "--in-place")
    assert r.exit_code == 5 and r.stderr.startswith("error: patch 'edited minus base' changes text encoder te2, which ")
    assert snapshot(target) == before
    r = run("diff", sd3_patch, flux)  # the FLUX.1 patch onto the SD3.x one's slots
    assert r.exit_code == 0 and "slot for slot (te1, te3)" in r.stderr, r.output
    rows = [line.split() for line in r.stdout.splitlines() if line.startswith("te")]
    assert {row[0]: row[5] for row in rows} == {"te1": "+1.000", "te2": "-", "te3": "+1.000"}  # the same edit


def test_a_loaded_flux_pipeline_and_t5_take_a_patch_in_memory(tmp_path: Path) -> None:
    import torch
    from diffusers import FluxPipeline
    from transformers import CLIPTextModel, T5EncoderModel

    import erasekit

    patch = patch_of(tmp_path, "diffusers-flux")
    folder = tmp_path / "diffusers-flux" / "base"
    te1 = CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=torch.float16)
    te3 = T5EncoderModel.from_pretrained(folder / "text_encoder_2", dtype=torch.float16)
    before = {k: v.clone() for k, v in [*te1.state_dict().items(), *te3.state_dict().items()]}
    pipe = FluxPipeline(
        scheduler=None,
        vae=None,
        text_encoder=te1,
        tokenizer=None,
        text_encoder_2=te3,
        tokenizer_2=None,
        transformer=None,
    )
    report = erasekit.apply_patch(pipe, patch)
    assert (report.architecture, report.applied[0].tensors, report.applied[0].fingerprint) == ("flux", 7, "exact")
    erasekit.revert_patch(pipe, patch)
    report = erasekit.apply_patch(te3, patch)  # the T5 alone: its part
    assert (report.architecture, report.applied[0].tensors, report.applied[0].fingerprint) == ("t5-text", 3, "exact")
    assert "its te1 (CLIP ViT-L/14) part is left for clip_l.safetensors" in report.warnings[0]
    erasekit.revert_patch(te3, patch)
    after = [*te1.state_dict().items(), *te3.state_dict().items()]
    assert all(torch.equal(before[k], v) for k, v in after)


def test_a_model_id_of_the_cache_is_inspected_diffed_and_patched_to_a_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    patch = patch_of(tmp_path, "diffusers-sd3-no-t5")
    hub = tmp_path / "hub"
    add_to_hub_cache(hub, "org/sd3", tmp_path / "diffusers-sd3-no-t5" / "base", commit="3" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    r = run("inspect", "org/sd3", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["architecture"] == "sd3", r.output
    r = run("diff", "org/sd3", tmp_path / "diffusers-sd3-no-t5" / "edited", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["architecture"] == "sd3", r.output
    cached = snapshot(hub)
    r = run("apply", patch, "--to", "org/sd3", "--in-place")
    assert r.exit_code == 7 and "shared file of the Hugging Face cache" in r.stderr
    r = run("apply", patch, "--to", "org/sd3", "-o", tmp_path / "copy")
    assert r.exit_code == 0 and (tmp_path / "copy" / "transformer" / "config.json").is_file(), r.output
    assert snapshot(hub) == cached


@pytest.mark.parametrize(
    "layout, files, run_with",
    [
        (
            "flux-transformer",
            "clip_l.safetensors and t5xxl_fp16.safetensors",
            "--text-encoders clip_l.safetensors,t5xxl_fp16.safetensors --vae ae.safetensors",
        ),
        (
            "sd3-transformer",
            "clip_l.safetensors, clip_g.safetensors and t5xxl_fp16.safetensors",
            "--text-encoders clip_l.safetensors,clip_g.safetensors,t5xxl_fp16.safetensors --vae FILE",
        ),
    ],
)
def test_a_transformer_file_without_encoders_names_the_encoder_files_to_patch(
    tmp_path: Path, layout: str, files: str, run_with: str
) -> None:
    """Black Forest Labs' flux1-dev.safetensors holds the transformer alone; ComfyUI users keep the encoders in files
    of their own, which is what to patch, and what erase, generate and eval run it with."""
    bfl = make_checkpoint(tmp_path / "flux1-dev.safetensors", layout, "BF16")
    patch = patch_of(tmp_path, "diffusers-flux")
    before = snapshot(tmp_path)
    title = "a FLUX.1" if layout.startswith("flux") else "an SD3.x"
    for args in (
        ("inspect", bfl),
        ("apply", patch, "--to", bfl, "--in-place"),
        ("diff", bfl, bfl),
    ):
        r = run(*args)
        assert r.exit_code == 4 and r.stderr == (
            f"error: flux1-dev.safetensors holds {title} transformer but no text encoders; patch the text-encoder "
            f"files it is used with instead ({files}), or a model folder\n"
        ), (args, r.output)
    r = run("generate", "--model", bfl, "-o", tmp_path / "gen", "a cat")
    assert r.exit_code == 4 and r.stderr == (
        f"error: flux1-dev.safetensors holds {title} transformer but no text encoders; give its encoder files and "
        f"VAE: {run_with} (--text-encoders)\n"
    ), r.output
    assert snapshot(tmp_path) == before


DIFFUSERS_TRANSFORMERS = {  # the keys of a diffusers transformer/diffusion_pytorch_model.safetensors -> what it is
    "FLUX.1": (
        "transformer_blocks.0.attn.to_q.weight",
        "single_transformer_blocks.0.attn.to_q.weight",
        "x_embedder.weight",
    ),
    "SD3.x": ("transformer_blocks.0.attn.to_q.weight", "context_embedder.weight", "pos_embed.proj.weight"),
    "HunyuanVideo": (  # FLUX.1's blocks and more: a line not patched yet, never taken for FLUX.1
        "transformer_blocks.0.attn.to_q.weight",
        "single_transformer_blocks.0.attn.to_q.weight",
        "x_embedder.proj.weight",
        "context_embedder.token_refiner.refiner_blocks.0.attn.to_q.weight",
    ),
}


@pytest.mark.parametrize("line", list(DIFFUSERS_TRANSFORMERS))
def test_a_diffusers_transformer_file_is_refused_as_a_transformer_of_its_line(tmp_path: Path, line: str) -> None:
    """Naming the transformer's own file in a diffusers folder gets the line a BFL transformer file gets."""
    from safetensors.numpy import save_file

    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({k: np.zeros((2, 2), np.float16) for k in DIFFUSERS_TRANSFORMERS[line]}, str(path))
    r = run("inspect", path)
    files = {"FLUX.1": "clip_l.safetensors and t5xxl_fp16.safetensors"}.get(
        line, "clip_l.safetensors, clip_g.safetensors and t5xxl_fp16.safetensors"
    )
    expected = (
        "error: diffusion_pytorch_model.safetensors holds a HunyuanVideo transformer (a token refiner), which "
        "erasekit does not patch yet: HunyuanVideo encodes prompts with LLaVA-Llama 3 8B and CLIP ViT-L/14; "
        "erasekit patches CLIP and T5 v1.1 text encoders, those of SD1.x, SD2.x, SDXL, FLUX.1 and SD3.x, or such an "
        "encoder's own file or folder\n"
        if line == "HunyuanVideo"
        else f"error: diffusion_pytorch_model.safetensors holds {'an' if line == 'SD3.x' else 'a'} {line} transformer "
        "but no text encoders; patch the "
        f"text-encoder files it is used with instead ({files}), or a model folder\n"
    )
    assert r.exit_code == 4 and r.stderr == expected, r.output


@pytest.mark.parametrize(("layout", "name"), [("single-flux", "flux-schnell"), ("single-sd3", "sd3-medium")])
def test_erase_generate_and_eval_of_a_single_file_the_bundled_configs_do_not_describe_ask_for_a_config(
    tmp_path: Path, layout: str, name: str
) -> None:
    path = model(tmp_path, layout)
    patch = patch_of(tmp_path, layout)
    images = tmp_path / "images"
    images.mkdir()
    before = snapshot(tmp_path)
    sizes = "width 8, 4 input channels, depth 1+1" if name.startswith("flux") else "width 8, 4 input channels, depth 1"
    for args in (
        ("erase", "--model", path, "--concept", "cat", "--images", images, "-o", tmp_path / "o.erasepatch"),
        ("generate", "--model", path, "-o", tmp_path / "gen", "a cat"),
        ("eval", "--model", path, "--patch", patch, "--concept", "cat"),
    ):
        r = run(*args)
        assert r.exit_code == 4 and r.stderr.startswith(
            f"error: base.safetensors is a transformer of other sizes ({sizes}); erasekit's bundled {name} config "
        ), (args, r.output)
        assert r.stderr.endswith("; give a config: a local diffusers folder of this model (--config)\n")
    assert snapshot(tmp_path) == before


def test_what_the_denoisers_read_reaches_every_layer_it_should() -> None:
    """FLUX.1 reads CLIP-L's pooled output only: every layer reaches the transformer, each only through that vector.
    SD3.x reads its CLIPs' penultimate states and pooled embeddings, and T5's last state."""
    flux, sd3 = family("flux").conditioning, family("sd3").conditioning
    assert flux is not None and sd3 is not None
    assert flux.layers_read("te1", 12) == list(range(12)) and flux.layers_read("te3", 24) == list(range(24))
    assert all(flux.pooled_only("te1", i, 12) for i in range(12)) and not flux.pooled_only("te3", 23, 24)
    assert sd3.layers_read("te2", 32) == list(range(32)) and sd3.layers_read("te3", 24) == list(range(24))
    assert [i for i in range(12) if sd3.pooled_only("te1", i, 12)] == [11]
    assert sd3.slots_read == ("te1", "te2", "te3")
