"""Single files with no --config: erasekit's bundled reference configs, how one is chosen, and loading with them.

The bundled configs are full size; the end-to-end tests point erasekit at a tiny "bundled" sd1 config (the tiny
pipeline's own JSON files, with the real CLIP vocabulary) so that a whole erase runs in seconds. The real configs
are checked by building each model on the meta device and counting parameters against the published models.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from erasekit.checkpoints import model_configs
from erasekit.checkpoints.layouts import detect
from erasekit.checkpoints.model_configs import CONFIGS_DIR, bundled_choice, choose_config
from erasekit.checkpoints.pipeline import load_pipeline
from erasekit.cli import app
from erasekit.errors import LayoutError
from erasekit.format.patchfile import load_patch
from erasekit.testing import make_checkpoint, make_tiny_pipeline, save_single_file

runner = CliRunner()

# Parameter counts of the public reference models (UNet, VAE, text encoders as diffusers builds them).
PUBLISHED = {
    "sd1": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sd2-512": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    "sd2-768-v": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840},
    "sdxl-refiner": {"vae": 83_653_863, "text_encoder_2": 694_659_840},
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_bundled_configs_build_the_published_models(name: str) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = CONFIGS_DIR / name
    index = json.loads((folder / "model_index.json").read_text())
    with torch.device("meta"):
        for comp, want in PUBLISHED[name].items():
            cfg = json.loads((folder / comp / "config.json").read_text())
            if comp == "unet":
                model = UNet2DConditionModel.from_config(cfg)
            elif comp == "vae":
                model = AutoencoderKL.from_config(cfg)
            else:
                cls = CLIPTextModelWithProjection if index[comp][1] == "CLIPTextModelWithProjection" else CLIPTextModel
                model = cls(CLIPTextConfig(**cfg))
            assert sum(p.numel() for p in model.parameters()) == want, (name, comp)
    pred = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["prediction_type"]
    assert pred == ("v_prediction" if name == "sd2-768-v" else "epsilon")


def test_bundled_tokenizers_share_the_shipped_vocabulary() -> None:
    sd1 = bundled_choice_named("sd1").tokenizers()
    sdxl = bundled_choice_named("sdxl").tokenizers()
    assert set(sd1) == {"tokenizer"} and set(sdxl) == {"tokenizer", "tokenizer_2"}
    assert len(sd1["tokenizer"]) == 49408
    assert sd1["tokenizer"]("a photo of snoopy").input_ids == [49406, 320, 1125, 539, 41967, 49407]
    assert sd1["tokenizer"].pad_token_id == 49407 and sdxl["tokenizer_2"].pad_token_id == 0  # OpenCLIP pads with "!"
    assert bundled_choice_named("sd2-512").tokenizers()["tokenizer"].pad_token_id == 0


def bundled_choice_named(name: str) -> model_configs.ConfigChoice:
    return model_configs.ConfigChoice(name, CONFIGS_DIR / name, "epsilon", "test", bundled=True)


def _sd2_file(path: Path, spread: float | None, metadata: dict[str, str] | None = None) -> Path:
    """A tiny SD2.x single file plus the two UNet tensors the choice reads, at the reference sizes."""
    make_checkpoint(path, "single-sd2")
    sd = load_file(str(path))
    sd["model.diffusion_model.input_blocks.0.0.weight"] = np.zeros((320, 4, 3, 3), np.float32)
    if spread is not None:
        sd[model_configs._SPREAD_KEY] = np.random.default_rng(0).normal(0, spread, 1280).astype(np.float32)
    save_file(sd, str(path), metadata={"format": "pt", **(metadata or {})})
    return path


def test_sd2_768_v_and_512_are_told_apart(tmp_path: Path) -> None:
    eps = bundled_choice(detect(_sd2_file(tmp_path / "a.safetensors", spread=0.01)))
    v = bundled_choice(detect(_sd2_file(tmp_path / "b.safetensors", spread=0.3)))
    assert (eps.name, eps.prediction_type) == ("sd2-512", "epsilon")
    assert (v.name, v.prediction_type) == ("sd2-768-v", "v_prediction")
    assert "UNet norm-bias spread" in v.describe() and "> 0.09" in v.describe()
    tagged = detect(
        _sd2_file(
            tmp_path / "c.safetensors", spread=0.3, metadata={"modelspec.architecture": "stable-diffusion-v2-512"}
        )
    )
    assert bundled_choice(tagged).name == "sd2-512"  # metadata wins over the weights
    assert "ModelSpec metadata" in bundled_choice(tagged).reason
    forced = choose_config(tagged, prediction_type="v_prediction")
    assert (forced.name, forced.reason) == ("sd2-768-v", "as given")  # the user wins over both
    with pytest.raises(Exception, match="unknown prediction type 'x'; use epsilon or v_prediction"):
        choose_config(tagged, prediction_type="x")


def test_files_the_bundled_configs_do_not_describe_are_refused_clearly(tmp_path: Path) -> None:
    path = _sd2_file(tmp_path / "inpaint.safetensors", spread=0.01)
    sd = load_file(str(path))
    sd["model.diffusion_model.input_blocks.0.0.weight"] = np.zeros((320, 9, 3, 3), np.float32)
    save_file(sd, str(path))
    with pytest.raises(
        LayoutError, match=r"is an inpainting model \(UNet input 9 channels.*give a config: a local diffusers folder"
    ):
        bundled_choice(detect(path))
    te_only = make_checkpoint(tmp_path / "te.safetensors", "single-sd1")
    sd = {k: v for k, v in load_file(str(te_only)).items() if k.startswith("cond_stage_model.")}
    save_file(sd, str(te_only))
    with pytest.raises(LayoutError, match="has sd1 text encoders but no UNet"):
        bundled_choice(detect(te_only))


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny SD1 pipeline with the real CLIP vocabulary, as one file, and its configs as a 'bundled' sd1."""
    root = tmp_path_factory.mktemp("bundled")
    folder = make_tiny_pipeline(root / "tiny", "sd1", clip_vocab=True)
    configs = root / "configs"
    shutil.copytree(folder, configs / "sd1", ignore=shutil.ignore_patterns("*.safetensors", "tokenizer"))
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(images / f"c{i}.png")
    return {
        "folder": folder,
        "configs": configs,
        "images": images,
        "root": root,
        "file": save_single_file(folder, root / "model.safetensors"),
    }


@pytest.fixture()
def tiny_bundled(tiny_world: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    monkeypatch.setattr(model_configs, "CONFIGS_DIR", tiny_world["configs"])
    return tiny_world


def test_a_single_file_loads_with_no_config(tiny_bundled: dict[str, Path]) -> None:
    reference, _ = load_pipeline(tiny_bundled["folder"])
    pipe, ckpt = load_pipeline(tiny_bundled["file"])
    assert ckpt.config == "sd1 (epsilon; from its text-encoder keys)"
    for comp in ("unet", "vae", "text_encoder"):
        got, want = getattr(pipe, comp).state_dict(), getattr(reference, comp).state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want), comp
    assert pipe.tokenizer("a red circle").input_ids == reference.tokenizer("a red circle").input_ids
    v, _ = load_pipeline(tiny_bundled["file"], prediction_type="v_prediction")
    assert v.scheduler.config.prediction_type == "v_prediction"


def test_erase_generate_and_inspect_a_single_file_with_nothing_beside_it(tiny_bundled: dict[str, Path]) -> None:
    root, file = tiny_bundled["root"], tiny_bundled["file"]
    out = root / "circle.erasepatch"
    r = runner.invoke(
        app,
        [
            "erase",
            "--model",
            str(file),
            "--concept",
            "circle",
            "--images",
            str(tiny_bundled["images"]),
            "--steps",
            "2",
            "--resolution",
            "32",
            "--device",
            "cpu",
            "-o",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    assert load_patch(out).manifest.base.config == "sd1 (epsilon; from its text-encoder keys)"
    r = runner.invoke(
        app,
        [
            "generate",
            "--model",
            str(file),
            "--patch",
            str(out),
            "--steps",
            "2",
            "-n",
            "1",
            "-o",
            str(root / "gen"),
            "a circle",
        ],
    )
    assert r.exit_code == 0, r.output
    assert (root / "gen" / "grid.png").is_file()
    r = runner.invoke(app, ["inspect", str(file), "--json"])
    assert json.loads(r.stdout)["config"] == "sd1 (epsilon; from its text-encoder keys)"
    r = runner.invoke(app, ["inspect", str(out)])
    assert "configs    sd1 (epsilon; from its text-encoder keys)" in r.stdout


@pytest.fixture(scope="module")
def tiny_families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny SD2.x and SDXL pipelines as single files, and their configs laid out as erasekit's bundled ones."""
    root = tmp_path_factory.mktemp("families")
    configs = root / "configs"
    out: dict[str, Path] = {"configs": configs}
    for arch, names in (("sd2", ("sd2-512", "sd2-768-v")), ("sdxl", ("sdxl",))):
        folder = make_tiny_pipeline(root / arch, arch)
        out[arch], out[f"{arch}-file"] = folder, save_single_file(folder, root / f"{arch}.safetensors")
        for name in names:
            shutil.copytree(folder, configs / name, ignore=shutil.ignore_patterns("*.safetensors", "tokenizer*"))
            if name == "sd2-768-v":
                sched = configs / name / "scheduler" / "scheduler_config.json"
                sched.write_text(json.dumps(json.loads(sched.read_text()) | {"prediction_type": "v_prediction"}))
    return out


@pytest.mark.parametrize("arch, name", [("sd2", "sd2-512"), ("sdxl", "sdxl")])
def test_sd2_and_sdxl_single_files_load_with_no_config(
    arch: str, name: str, tiny_families: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model_configs, "CONFIGS_DIR", tiny_families["configs"])
    reference, _ = load_pipeline(tiny_families[arch])
    pipe, ckpt = load_pipeline(tiny_families[f"{arch}-file"])
    assert ckpt.config.startswith(f"{name} (epsilon; ")
    for comp in ("unet", "vae", "text_encoder") + (("text_encoder_2",) if arch == "sdxl" else ()):
        got, want = getattr(pipe, comp).state_dict(), getattr(reference, comp).state_dict()
        assert set(got) == set(want), comp
        assert all(torch.equal(got[k], want[k]) for k in want), f"{comp} differs from the folder's"
    assert pipe.tokenizer.pad_token == ("!" if arch == "sd2" else "<|endoftext|>")


def test_a_v_prediction_sd2_file_loads_as_768_v(
    tiny_families: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model_configs, "CONFIGS_DIR", tiny_families["configs"])
    tagged = tmp_path / "v.safetensors"
    sd = load_file(str(tiny_families["sd2-file"]))
    save_file(sd, str(tagged), metadata={"format": "pt", "modelspec.architecture": "stable-diffusion-v2-768-v"})
    pipe, ckpt = load_pipeline(tagged)
    assert ckpt.config == "sd2-768-v (v_prediction; from the file's ModelSpec metadata)"
    assert pipe.scheduler.config.prediction_type == "v_prediction"
