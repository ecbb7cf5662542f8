"""diffusers itself loads patches: ``pipe.load_lora_weights`` on the file ``erasekit export --ui diffusers`` writes
gives erasekit's weights.

The real client (diffusers with peft) on tiny SD1, SDXL and SDXL-refiner pipelines: patches dense, rank 2 and
rank auto (mixed ranks), exported, loaded, fused at strength 1.0 and 0.5 (``fuse_lora(lora_scale=)`` or
``set_adapters``) and compared with ``erasekit.apply_patch`` on a fresh copy of the pipeline: every text-encoder
tensor within float32 rounding. The patch file itself is refused by diffusers, as ``erase`` and ``diff -o`` tell
their users, naming the export.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.numpy import load_file
from typer.testing import CliRunner

pytest.importorskip("peft")

from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline  # noqa: E402
from transformers import CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

from erasekit.checkpoints.diff import diff_checkpoints  # noqa: E402
from erasekit.checkpoints.memory import apply_patch  # noqa: E402
from erasekit.cli import app  # noqa: E402
from erasekit.erasing.unlearn import erase  # noqa: E402
from erasekit.format.erase_config import EraseConfig  # noqa: E402
from erasekit.format.patchfile import load_patch, save_patch  # noqa: E402
from erasekit.format.ui_export import export_patch  # noqa: E402
from erasekit.testing import make_checkpoint, make_tiny_pipeline  # noqa: E402

runner = CliRunner()
ENCODERS = ("text_encoder", "text_encoder_2")
# strength, and how a diffusers user sets it
STRENGTHS = [(1.0, "fuse_lora"), (0.5, "fuse_lora"), (0.5, "set_adapters")]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("diffusers-client")


@pytest.fixture(scope="module")
def images(root: Path) -> Path:
    folder = root / "circles"
    folder.mkdir()
    for i in range(2):
        img = Image.new("RGB", (32, 32), (235, 235, 235))
        ImageDraw.Draw(img).ellipse((4 + i, 5, 28, 26 + i), fill=(200, 30, 30))
        img.save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def folders(root: Path) -> dict[str, Path]:
    return {arch: make_tiny_pipeline(root / f"tiny-{arch}", arch=arch) for arch in ("sd1", "sdxl")}


@pytest.fixture(scope="module")
def pipes(folders: dict[str, Path]) -> dict[str, Any]:
    return {arch: DiffusionPipeline.from_pretrained(folder) for arch, folder in folders.items()}


@pytest.fixture(scope="module")
def erased(root: Path, pipes: dict[str, Any], images: Path) -> dict[tuple[str, str], Path]:
    """(arch, rank) -> a patch from a short erase, F32: dense, rank 2, and auto (ranks differ between modules)."""
    out = {}
    for arch, pipe in pipes.items():
        for rank in ("dense", "2", "auto"):
            config = EraseConfig(resolution=32, lr=1e-2, steps=1, rank=rank, patch_dtype="F32", cache=False)
            report = erase(pipe, ["circle"], [sorted(images.iterdir())], config)
            out[arch, rank] = save_patch(report.patch, root / f"{arch}-{rank}.erasepatch")
    return out


def loaded_in_diffusers(pipe: Any, lora_file: Path, strength: float, how: str) -> Any:
    """A copy of ``pipe`` with the file loaded and fused at ``strength`` as a diffusers user does it, LoRA layers
    unloaded after fusing (their weights kept)."""
    pipe = copy.deepcopy(pipe)
    pipe.load_lora_weights(str(lora_file), adapter_name="erased")
    if how == "set_adapters":
        pipe.set_adapters(["erased"], adapter_weights=[strength])
        pipe.fuse_lora()
    else:
        pipe.fuse_lora(lora_scale=strength)
    pipe.unload_lora_weights()
    return pipe


def applied_by_erasekit(pipe: Any, patch_file: Path, strength: float) -> Any:
    pipe = copy.deepcopy(pipe)
    apply_patch(pipe, load_patch(patch_file), strength=strength)
    return pipe


def encoder_tensors(pipe: Any) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{k}": v
        for name in ENCODERS
        if getattr(pipe, name, None) is not None
        for k, v in getattr(pipe, name).state_dict().items()
    }


def assert_same_weights(pipe: Any, patch_file: Path, lora_file: Path, strength: float, how: str) -> None:
    """diffusers' weights = erasekit's within float32 rounding of the weights' scale, and the patch moved them by
    far more than that (a wrong strength or a dropped bias delta fails)."""
    before = encoder_tensors(pipe)
    got = encoder_tensors(loaded_in_diffusers(pipe, lora_file, strength, how))
    want = encoder_tensors(applied_by_erasekit(pipe, patch_file, strength))
    assert got.keys() == want.keys() == before.keys()
    scale = max(float(v.abs().max()) for v in want.values())
    worst = max(float((got[k] - want[k]).abs().max()) for k in want)
    moved = {k: float((want[k] - before[k]).abs().max()) for k in want}
    assert worst <= 1e-6 * scale, (worst, scale)
    assert max(v for k, v in moved.items() if k.endswith("mlp.fc1.bias")) > 1e3 * worst + 1e-5
    assert max(v for k, v in moved.items() if k.endswith("mlp.fc2.weight")) > 1e3 * worst + 1e-5


@pytest.mark.parametrize(("strength", "how"), STRENGTHS)
@pytest.mark.parametrize("rank", ["dense", "2", "auto"])
@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_diffusers_loads_the_export_with_erasekits_weights(
    arch: str,
    rank: str,
    strength: float,
    how: str,
    pipes: dict[str, Any],
    erased: dict[tuple[str, str], Path],
    tmp_path: Path,
) -> None:
    patch_file = erased[arch, rank]
    lora_file = Path(export_patch(patch_file, "diffusers", tmp_path / "erased.safetensors").output)
    assert_same_weights(pipes[arch], patch_file, lora_file, strength, how)


def test_one_rank_per_encoder_where_the_patch_mixes_ranks(erased: dict[tuple[str, str], Path], tmp_path: Path) -> None:
    """Rank auto gives modules different ranks; the export pads them to one rank per encoder (zeros), so that no
    diffusers version needs a per-module rank or alpha (before 0.40 it scaled such modules by the wrong alpha)."""
    for arch in ("sd1", "sdxl"):
        patch_file = erased[arch, "auto"]
        assert len({d.rank for d in load_patch(patch_file).manifest.deltas.values()}) > 1
        tensors = load_file(export_patch(patch_file, "diffusers", tmp_path / f"{arch}.safetensors").output)
        for encoder in ENCODERS:
            ranks = {
                v.shape[0] for k, v in tensors.items() if k.startswith(f"{encoder}.") and k.endswith(".down.weight")
            }
            assert len(ranks) == (1 if encoder == "text_encoder" or arch == "sdxl" else 0), (arch, encoder, ranks)


def test_a_default_erase_names_the_export_diffusers_needs(
    folders: dict[str, Path], pipes: dict[str, Any], images: Path, tmp_path: Path
) -> None:
    """The patch ``erase`` writes by default (low-rank, BF16, bias deltas beside the factors) is refused by
    load_lora_weights; the export command erase prints makes a file diffusers loads with erasekit's weights."""
    patch_file = tmp_path / "circle.erasepatch"
    r = runner.invoke(
        app,
        [
            "erase",
            "--model",
            str(folders["sd1"]),
            "--concept",
            "circle",
            "--images",
            str(images),
            "--resolution",
            "32",
            "--steps",
            "1",
            "--lr",
            "1e-2",
            "-o",
            str(patch_file),
        ],
    )
    assert r.exit_code == 0, r.output
    lora_file = tmp_path / "circle-diffusers.safetensors"
    command = f"erasekit export {patch_file} --ui diffusers -o {lora_file}"
    assert f"diffusers: {command} " in " ".join(r.stdout.split()) + " ", r.stdout  # rich wraps long lines

    as_is = Path(shutil.copy(patch_file, tmp_path / "circle.safetensors"))
    with pytest.raises(ValueError, match=r"lora_te_text_model_encoder_layers_0_mlp_fc1\.diff_b"):
        copy.deepcopy(pipes["sd1"]).load_lora_weights(str(as_is))

    r = runner.invoke(app, command.split()[1:])
    assert r.exit_code == 0, r.output
    said = " ".join(r.stdout.split())
    assert f"Exported {patch_file} for diffusers -> {lora_file} (" in said
    assert f'load it with pipe.load_lora_weights("{lora_file}"); strength S: pipe.fuse_lora(lora_scale=S)' in said
    with safe_open(lora_file, "np") as f:
        meta = f.metadata()
    assert json.loads(meta["erasekit_export"])["ui"] == "diffusers"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert not [k for k in meta if k.startswith("ss_") or k == "lora_adapter_metadata"]  # no kohya dim/alpha to misread
    assert_same_weights(pipes["sd1"], patch_file, lora_file, 0.5, "fuse_lora")


def test_a_dense_patch_is_refused_as_it_is_and_loads_through_the_export(
    pipes: dict[str, Any], erased: dict[tuple[str, str], Path], tmp_path: Path
) -> None:
    patch_file = erased["sdxl", "dense"]
    as_is = Path(shutil.copy(patch_file, tmp_path / "dense.safetensors"))
    with pytest.raises(ValueError, match=r"lora_te1_text_model_encoder_layers_0_mlp_fc1\.diff\b"):
        copy.deepcopy(pipes["sdxl"]).load_lora_weights(str(as_is))
    report = export_patch(patch_file, "diffusers", tmp_path / "dense-diffusers.safetensors")
    # the factors' size: (out + in) x min(out, in) for out x in; the tiny encoders' FFNs are 2h x h, so 1.5x
    assert any(
        "6 dense modules are stored as exact factors" in note and "1.50x the size" in note for note in report.notes
    )
    assert report.bytes < 1.5 * patch_file.stat().st_size
    assert_same_weights(pipes["sdxl"], patch_file, Path(report.output), 1.0, "fuse_lora")


@pytest.fixture(scope="module")
def refiner(root: Path, pipes: dict[str, Any]) -> tuple[Any, Path, Path]:
    """A tiny SDXL refiner as diffusers builds one (no text_encoder, bigG as text_encoder_2) and the two encoder
    folders a refiner patch is diffed from."""
    base = make_checkpoint(root / "refiner-base", "diffusers-sdxl-refiner")
    edited = make_checkpoint(root / "refiner-edited", "diffusers-sdxl-refiner", edit_layers=[0, 1])
    sdxl = pipes["sdxl"]
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=sdxl.vae,
        text_encoder=None,
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(base / "text_encoder_2"),
        tokenizer=None,
        tokenizer_2=sdxl.tokenizer_2,
        unet=sdxl.unet,
        scheduler=sdxl.scheduler,
        requires_aesthetics_score=True,
    )
    return pipe, base, edited


@pytest.mark.parametrize("rank", [None, "2"])
def test_the_refiner_loads_through_text_encoder_2(
    refiner: tuple[Any, Path, Path], rank: str | None, tmp_path: Path
) -> None:
    """diff -o names the export; diffusers' refiner keeps its only encoder as text_encoder_2, under that prefix."""
    pipe, base, edited = refiner
    patch_file = tmp_path / "refiner.erasepatch"
    r = runner.invoke(app, ["diff", str(base), str(edited), "-o", str(patch_file), *(["--rank", rank] if rank else [])])
    assert r.exit_code == 0, r.output
    lora_file = tmp_path / "refiner-diffusers.safetensors"
    assert f"diffusers: erasekit export {patch_file} --ui diffusers -o {lora_file}" in " ".join(r.stdout.split())
    export_patch(patch_file, "diffusers", lora_file)
    assert_same_weights(pipe, patch_file, lora_file, 0.5, "fuse_lora")


def test_a_bare_text_encoders_patch_goes_to_text_encoder(root: Path, pipes: dict[str, Any], tmp_path: Path) -> None:
    """A patch of a transformers CLIP folder (architecture clip-text) loads into an SD1 pipeline built on that
    encoder, as apply_patch maps it there."""
    base = make_checkpoint(root / "clip-base", "transformers-clip")
    edited = make_checkpoint(root / "clip-edited", "transformers-clip", edit_layers=[1])
    patch_file = diff_checkpoints(base, edited, output=tmp_path / "clip.erasepatch", rank=2).output
    assert load_patch(patch_file).manifest.base.architecture == "clip-text"
    sd1 = pipes["sd1"]
    pipe = StableDiffusionPipeline(
        vae=sd1.vae,
        text_encoder=CLIPTextModel.from_pretrained(base),
        tokenizer=sd1.tokenizer,
        unet=sd1.unet,
        scheduler=sd1.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    report = export_patch(patch_file, "diffusers", tmp_path / "clip-diffusers.safetensors")
    assert "written for the pipeline's text_encoder" in " ".join(report.notes)
    assert_same_weights(pipe, Path(patch_file), Path(report.output), 1.0, "fuse_lora")


def test_export_for_diffusers_refuses_other_names_and_writes_nothing(
    erased: dict[tuple[str, str], Path], tmp_path: Path
) -> None:
    patch_file = Path(shutil.copy(erased["sd1", "2"], tmp_path / "p.erasepatch"))
    r = runner.invoke(app, ["export", str(patch_file), "--ui", "diffusers", "-o", str(tmp_path / "x.bin")])
    assert r.exit_code == 7, r.output
    assert r.stderr == (
        f"error: output {tmp_path / 'x.bin'} must end in .safetensors; name it NAME.safetensors: "
        "diffusers' load_lora_weights reads other names as torch pickles\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.erasepatch"]
