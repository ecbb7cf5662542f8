"""Single-file checkpoints (original LDM/A1111/ComfyUI key layout) with --config: loading, erase, apply, CLI.

The single file is written by :func:`erasekit.testing.save_single_file` from a tiny diffusers folder, so
that the folder is the ground truth the file must load back to.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from erasekit.checkpoints.layouts import detect
from erasekit.checkpoints.pipeline import load_pipeline
from erasekit.cli import app
from erasekit.errors import InputFileError, LayoutError
from erasekit.testing import make_tiny_pipeline, save_single_file

runner = CliRunner()
COMPONENTS = ("unet", "vae", "text_encoder")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("single")
    folder = make_tiny_pipeline(root / "tiny", "sd1")
    configs = root / "configs"  # the folder without weights: configs are all --config needs
    shutil.copytree(folder, configs, ignore=shutil.ignore_patterns("*.safetensors"))
    images = root / "circles"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(images / f"c{i}.png")
    return {
        "folder": folder,
        "configs": configs,
        "file": save_single_file(folder, root / "tiny.safetensors"),
        "ckpt": save_single_file(folder, root / "tiny.ckpt", "ckpt"),
        "images": images,
        "root": root,
    }


@pytest.fixture(scope="module")
def reference(world: dict[str, Path]) -> dict[str, dict[str, torch.Tensor]]:
    pipe, _ = load_pipeline(world["folder"])
    return {c: getattr(pipe, c).state_dict() for c in COMPONENTS} | {"scheduler": dict(pipe.scheduler.config)}


def assert_same_weights(pipe: Any, reference: dict[str, dict[str, torch.Tensor]]) -> None:
    for comp in COMPONENTS:
        got, want = getattr(pipe, comp).state_dict(), reference[comp]
        assert set(got) == set(want), f"{comp}: {sorted(set(got) ^ set(want))[:5]}"
        differ = [k for k in want if not torch.equal(got[k], want[k])]
        assert not differ, f"{comp} tensors differ from the folder's: {differ[:5]}"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_written_file_has_the_original_layout(world: dict[str, Path]) -> None:
    ckpt = detect(world["file"])
    assert (ckpt.layout, ckpt.architecture) == ("single-file-sd1", "sd1")
    assert ckpt.encoders["te"].dims == (32, 64, 2)
    keys = list(ckpt.files[0].tensor_info())
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    assert all(k.startswith(prefixes) for k in keys)
    for key in (
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.output_blocks.1.1.conv.weight",
        "first_stage_model.decoder.up.2.block.1.conv1.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    ):
        assert key in keys, key
    # the VAE attention projections are 1x1 convs in LDM files
    assert ckpt.files[0].tensor_info()["first_stage_model.encoder.mid.attn_1.q.weight"][1] == (32, 32, 1, 1)
    assert detect(world["ckpt"]).layout == "single-file-sd1 (pickle)"


def test_single_file_loads_offline_to_the_folders_weights(
    world: dict[str, Path], reference: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("single-file loading tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    for config in (world["folder"], world["configs"]):
        pipe, ckpt = load_pipeline(world["file"], config=config)
        assert ckpt.architecture == "sd1" and type(pipe).__name__ == "StableDiffusionPipeline"
        assert_same_weights(pipe, reference)
        assert dict(pipe.scheduler.config) == reference["scheduler"]
        assert pipe.tokenizer("a circle").input_ids == load_pipeline(world["folder"])[0].tokenizer("a circle").input_ids


def test_ckpt_loads_with_weights_only(world: dict[str, Path], reference: dict[str, Any]) -> None:
    pipe, ckpt = load_pipeline(world["ckpt"], config=world["configs"])
    assert ckpt.layout == "single-file-sd1 (pickle)"
    assert_same_weights(pipe, reference)


def test_a_pickle_that_runs_code_is_never_unpickled(tmp_path: Path, world: dict[str, Path]) -> None:
    """diffusers reads .ckpt with torch.load(weights_only=True), and so does erasekit's detect() before it."""
    from diffusers.loaders.single_file_utils import load_single_file_checkpoint

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self) -> tuple[Any, tuple[str, str]]:
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.ckpt"
    state = torch.load(world["ckpt"], weights_only=True)["state_dict"]
    torch.save({"state_dict": state, "payload": Payload()}, evil)
    with pytest.raises(OSError) as info:
        load_single_file_checkpoint(str(evil), local_files_only=True)
    chain, e = [], info.value
    while e is not None:
        chain.append(f"{type(e).__name__}: {e}")
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    assert any(c.startswith("UnpicklingError: Weights only load failed") for c in chain), chain
    with pytest.raises(LayoutError, match="weights-only torch pickle"):
        load_pipeline(evil, config=world["configs"])
    assert not marker.exists()


def test_missing_or_wrong_config_is_refused_before_loading(tmp_path: Path, world: dict[str, Path]) -> None:
    # no --config: the bundled SD1.x config is full size, and says so before loading the tiny file
    with pytest.raises(
        LayoutError,
        match=r"tiny.safetensors is a UNet of other sizes \(UNet input 4 channels, width "
        r"32\); erasekit's bundled sd1 config has 4 channels, width 320; give a config",
    ):
        load_pipeline(world["file"])
    with pytest.raises(InputFileError, match="is not a folder"):
        load_pipeline(world["file"], config=world["file"])
    with pytest.raises(LayoutError, match="has no model_index.json"):
        load_pipeline(world["file"], config=world["configs"] / "unet")

    def variant(name: str, **text_encoder: object) -> Path:
        folder = shutil.copytree(world["configs"], tmp_path / name)
        cfg = folder / "text_encoder" / "config.json"
        cfg.write_text(json.dumps(json.loads(cfg.read_text()) | text_encoder))
        return folder

    with pytest.raises(
        LayoutError,
        match=r"is a pipeline for sd2 but tiny.safetensors is sd1; give as config a "
        r"diffusers folder of the sd1 family",
    ):
        load_pipeline(world["file"], config=variant("sd2", hidden_act="gelu"))
    with pytest.raises(
        LayoutError,
        match=r"text encoder of 32x64x3 \(hidden x FFN x layers\) but tiny.safetensors "
        r"holds 32x64x2",
    ):
        load_pipeline(world["file"], config=variant("deeper", num_hidden_layers=3))


def test_partial_loads_are_refused(tmp_path: Path, world: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """diffusers loads single files with strict=False: what its key conversion misses keeps random values."""
    import diffusers.loaders.single_file_utils as sfu
    from safetensors.torch import load_file, save_file

    state = load_file(str(world["file"]))
    partial = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in state.items() if k != "model.diffusion_model.out.2.weight"}, str(partial))
    with pytest.raises(
        LayoutError, match=r"has [0-9,]+ unet weights \(model.diffusion_model.\*\) but the unet of its config \(config "
    ):
        load_pipeline(partial, config=world["configs"])

    convert = sfu.convert_ldm_clip_checkpoint
    monkeypatch.setattr(
        sfu,
        "convert_ldm_clip_checkpoint",
        lambda *a, **k: {key: v for key, v in convert(*a, **k).items() if not key.endswith("layers.1.mlp.fc2.weight")},
    )
    with pytest.raises(
        LayoutError,
        match=r"did not load tiny.safetensors's text encoder as it is stored "
        r"\(cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.weight",
    ):
        load_pipeline(world["file"], config=world["configs"])


def test_erase_a_single_file_then_apply_and_revert_in_place(tmp_path: Path, world: dict[str, Path]) -> None:
    from erasekit.checkpoints.apply import apply_to_checkpoint, revert_from_checkpoint
    from erasekit.erasing.erase_job import erase_model

    model = shutil.copy(world["file"], tmp_path / "model.safetensors")
    patch = tmp_path / "circle.erasepatch"
    report = erase_model(
        model,
        ["circle"],
        [world["images"]],
        patch,
        {"steps": 2, "resolution": 32, "batch_size": 2},
        config_dir=world["configs"],
    )
    assert report.steps == 2 and patch.exists()
    before = sha256(model)
    ffn = "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc1.weight"
    base_ffn = detect(model).files[0].read_numpy(ffn)
    apply_to_checkpoint([patch], model, in_place=True)  # no --force: the base fingerprints are the file's
    assert sha256(model) != before
    assert not np.array_equal(detect(model).files[0].read_numpy(ffn), base_ffn), "the patch changes the file's FFN"
    revert_from_checkpoint(patch, model)
    assert sha256(model) == before, "revert restores the exact bytes"


def test_cli_generate_and_erase_take_config(tmp_path: Path, world: dict[str, Path]) -> None:
    r = runner.invoke(
        app,
        [
            "generate",
            "--model",
            str(world["file"]),
            "--config",
            str(world["configs"]),
            "a circle",
            "-n",
            "2",
            "--steps",
            "2",
            "--device",
            "cpu",
            "-o",
            str(tmp_path / "out"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a-circle_0.png", "a-circle_1.png", "grid.png"]
    assert Image.open(tmp_path / "out" / "a-circle_0.png").size == (32, 32)

    r = runner.invoke(
        app,
        [
            "erase",
            "--model",
            str(world["file"]),
            "--config",
            str(world["configs"]),
            "--concept",
            "circle",
            "--images",
            str(world["images"]),
            "--steps",
            "1",
            "--resolution",
            "32",
            "-o",
            str(tmp_path / "c.erasepatch"),
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["steps"] == 1


@pytest.mark.parametrize(
    "command",
    [
        ["generate", "a circle", "-n", "1", "--steps", "1", "-o", "{tmp}/out"],
        ["erase", "--concept", "circle", "--images", "{images}", "--steps", "1", "-o", "{tmp}/x.erasepatch"],
    ],
)
def test_cli_file_the_bundled_configs_do_not_fit_is_one_line_naming_config(
    tmp_path: Path, world: dict[str, Path], command: list[str]
) -> None:
    args = [a.format(images=world["images"], tmp=tmp_path) for a in command]
    r = runner.invoke(app, [*args, "--model", str(world["file"])])  # a tiny SD1 file: not the bundled SD1 sizes
    assert r.exit_code == 4, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0].endswith("(--config)"), r.stderr
    assert list(tmp_path.iterdir()) == [], "nothing is written"


def test_cli_eval_takes_config(tmp_path: Path, world: dict[str, Path]) -> None:
    """A model other than the built-in one is judged by a local CLIP (--judge); without one it is refused."""
    from test_clip_judge import make_colour_clip

    patch = tmp_path / "c.erasepatch"
    r = runner.invoke(
        app,
        [
            "erase",
            "--model",
            str(world["file"]),
            "--config",
            str(world["configs"]),
            "--concept",
            "circle",
            "--images",
            str(world["images"]),
            "--steps",
            "1",
            "--resolution",
            "32",
            "-o",
            str(patch),
        ],
    )
    assert r.exit_code == 0, r.output
    clip = ["--judge", str(make_colour_clip(tmp_path / "clip")), "--keep", "square"]
    r = runner.invoke(
        app,
        [
            "eval",
            "--model",
            str(world["file"]),
            "--config",
            str(world["configs"]),
            "--patch",
            str(patch),
            "--concept",
            "circle",
            *clip,
            "-n",
            "1",
            "--steps",
            "1",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["labels"] == ["circle", "square"] and report["prompts"] == 4 and 0 <= report["target"]["after"] <= 1
    r = runner.invoke(app, ["eval", "--model", str(world["file"]), "--patch", str(patch), "--concept", "circle", *clip])
    assert r.exit_code == 4 and r.stderr.strip().endswith(
        "width 320; give a config: a local diffusers folder of this model (--config)"
    )
    r = runner.invoke(app, ["eval", "--model", str(world["file"]), "--patch", str(patch), "--concept", "circle"])
    assert r.exit_code == 1 and r.stderr.strip().endswith("(--judge)"), r.stderr
