"""Model ids (ORG/NAME[@REVISION]) through huggingface_hub's cache. Nothing here touches the network: the cache is
laid out as huggingface_hub lays out a download (blobs, snapshot symlinks, refs), and downloads are off."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from erasekit.checkpoints.hub import PIPELINE, TEXT_ENCODERS, allow_patterns, parse_model_id, resolve_model
from erasekit.cli import app
from erasekit.errors import ErasekitError, InputFileError
from erasekit.format.patchfile import load_patch
from erasekit.testing import add_to_hub_cache, make_tiny_pipeline

runner = CliRunner()
COMMIT = "3" * 40


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hub")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(images / f"c{i}.png")
    return {"folder": make_tiny_pipeline(root / "tiny", "sd1"), "images": images}


@pytest.fixture()
def cache(tmp_path: Path, tiny: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> Path:
    """An offline Hugging Face cache holding org/tiny (complete) and org/half (text encoder only)."""
    from huggingface_hub import constants

    hub = tmp_path / "hub"
    add_to_hub_cache(hub, "org/tiny", tiny["folder"], commit=COMMIT)
    add_to_hub_cache(hub, "org/half", tiny["folder"], commit=COMMIT, only=("model_index.json", "text_encoder"))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def test_model_ids_are_told_from_paths() -> None:
    assert parse_model_id("stable-diffusion-v1-5/stable-diffusion-v1-5") == (
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        None,
    )
    assert parse_model_id("org/name@fp16") == ("org/name", "fp16")
    assert parse_model_id("org/name@" + COMMIT) == ("org/name", COMMIT)
    for path in ("out/snoopy.erasepatch", "models/v1-5.safetensors", "/abs/org/name", "./org/name", "name", "a/b/c"):
        assert parse_model_id(path) is None, path


def test_an_id_resolves_to_its_cached_snapshot_offline(cache: Path) -> None:
    from huggingface_hub import scan_cache_dir

    snap = cache / "models--org--tiny" / "snapshots" / COMMIT
    assert resolve_model("org/tiny") == snap
    assert resolve_model(f"org/tiny@{COMMIT}") == snap
    assert resolve_model("org/half", TEXT_ENCODERS) == cache / "models--org--half" / "snapshots" / COMMIT
    # the layout is the library's own: its cache scanner sees both repos and their size
    repos = {r.repo_id: r for r in scan_cache_dir(cache).repos}
    assert set(repos) == {"org/tiny", "org/half"} and set(repos["org/tiny"].refs) == {"main"}


def test_a_missing_or_partial_id_offline_names_the_download_command(cache: Path) -> None:
    with pytest.raises(ErasekitError) as e:
        resolve_model("org/missing@v2")
    assert str(e.value) == (
        "org/missing@v2 is neither a local path nor in the Hugging Face cache, and downloads are off "
        "(HF_HUB_OFFLINE); download it once online: hf download org/missing --revision v2 "
        '--include "model_index.json" --include "erasekit.json" --include "scheduler/*" '
        '--include "tokenizer/*" --include "tokenizer_2/*" --include "tokenizer_3/*" --include "unet/*" '
        '--include "vae/*" --include "transformer/*" --include "text_encoder/*" --include "text_encoder_2/*" '
        '--include "text_encoder_3/*"'
    )
    with pytest.raises(
        ErasekitError, match=r"org/half lacks unet, vae, scheduler, tokenizer in the Hugging Face cache"
    ):
        resolve_model("org/half")
    with pytest.raises(InputFileError, match=r"does not exist; check the path \(or name a model id"):
        resolve_model("/no/such/model.safetensors")


def test_erase_generate_inspect_and_diff_take_a_model_id(cache: Path, tiny: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "circle.erasepatch"
    r = runner.invoke(
        app,
        [
            "erase",
            "--model",
            "org/tiny",
            "--concept",
            "circle",
            "--images",
            str(tiny["images"]),
            "--steps",
            "1",
            "--resolution",
            "32",
            "--device",
            "cpu",
            "-o",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    assert load_patch(out).manifest.base.architecture == "sd1"
    r = runner.invoke(
        app,
        [
            "generate",
            "--model",
            "org/tiny",
            "--patch",
            str(out),
            "-n",
            "1",
            "--steps",
            "1",
            "-o",
            str(tmp_path / "gen"),
            "a circle",
        ],
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["inspect", "org/half", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["architecture"] == "sd1"
    r = runner.invoke(app, ["inspect", str(out), "--against", "org/half"])
    assert r.exit_code == 0 and "exact" in r.stdout, r.output
    r = runner.invoke(app, ["diff", "org/tiny", "org/half", "--json"])
    assert r.exit_code == 0, r.output


def test_apply_in_place_to_the_cache_is_refused_and_a_copy_works(
    cache: Path, tiny: dict[str, Path], tmp_path: Path
) -> None:
    patch = tmp_path / "p.erasepatch"
    r = runner.invoke(
        app,
        [
            "erase",
            "--model",
            "org/tiny",
            "--concept",
            "circle",
            "--images",
            str(tiny["images"]),
            "--steps",
            "1",
            "--resolution",
            "32",
            "-o",
            str(patch),
        ],
    )
    assert r.exit_code == 0, r.output
    before = tree_digest(cache)
    r = runner.invoke(app, ["apply", str(patch), "--to", "org/tiny", "--in-place"])
    assert r.exit_code == 7, r.output
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    assert "shared file of the Hugging Face cache" in r.stderr and r.stderr.strip().endswith(
        "write a patched copy to an output instead of in place (-o)"
    )
    assert tree_digest(cache) == before, "no blob changed"
    copy = tmp_path / "patched"
    r = runner.invoke(app, ["apply", str(patch), "--to", "org/tiny", "-o", str(copy)])
    assert r.exit_code == 0, r.output
    assert not any(p.is_symlink() for p in copy.rglob("*")), "the copy holds real files, not links into the cache"
    assert tree_digest(cache) == before


def test_downloads_fetch_only_what_erasekit_needs() -> None:
    listing = [
        "model_index.json",
        "erasekit.json",
        "v1-5-pruned.safetensors",
        "scheduler/scheduler_config.json",
        "safety_checker/model.safetensors",
        "feature_extractor/preprocessor_config.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.non_ema.safetensors",
        "unet/diffusion_pytorch_model.bin",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.bin",
        "text_encoder/config.json",
        "text_encoder/model.fp16.safetensors",
        "text_encoder/model.safetensors",
        "text_encoder/pytorch_model.bin",
    ]
    assert allow_patterns(listing, PIPELINE) == [
        "erasekit.json",
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.fp16.safetensors",
        "tokenizer/merges.txt",
        "tokenizer/vocab.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    assert allow_patterns(listing, TEXT_ENCODERS) == [
        "erasekit.json",
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.fp16.safetensors",
        "tokenizer/merges.txt",
        "tokenizer/vocab.json",
    ]
    assert allow_patterns(["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.bin"], ("unet",)) == [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.bin",
    ]


def test_a_model_id_reads_the_settings_of_its_snapshot(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model id's erasekit.json is its snapshot's, as its weights are: eval knows the built-in world's model
    under an id (its judge needs the file's "toyworld"), and the settings are the snapshot's, with or without a
    revision."""
    from erasekit.checkpoints.diff import diff_checkpoints
    from erasekit.checkpoints.pipeline import model_settings
    from erasekit.toyworld import builtin_model_path

    add_to_hub_cache(cache, "org/toy", builtin_model_path(), commit=COMMIT)
    snapshot_settings = json.loads((builtin_model_path() / "erasekit.json").read_text())
    monkeypatch.chdir(tmp_path)
    assert model_settings("org/toy") == model_settings(f"org/toy@{COMMIT}") == snapshot_settings
    edited = shutil.copytree(builtin_model_path() / "text_encoder", tmp_path / "edited")
    weights = load_file(edited / "model.safetensors")
    key = next(k for k in weights if k.endswith("layers.1.mlp.fc2.weight"))
    save_file({**weights, key: weights[key] + 0.01}, edited / "model.safetensors", metadata={"format": "pt"})
    patch = diff_checkpoints(builtin_model_path() / "text_encoder", edited, output=tmp_path / "p.erasepatch").output
    r = runner.invoke(
        app,
        [
            "eval",
            "--model",
            "org/toy",
            "--patch",
            str(patch),
            "--concept",
            "circle",
            "-n",
            "1",
            "--steps",
            "1",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["judge"] == "toyworld"


def test_an_fp16_only_snapshot_loads(tiny: dict[str, Path], tmp_path: Path) -> None:
    """A download of the fp16 variant alone: diffusers must be told the variant."""
    import shutil

    from erasekit.checkpoints.pipeline import load_pipeline

    folder = shutil.copytree(tiny["folder"], tmp_path / "fp16")
    for f in folder.rglob("*.safetensors"):
        f.rename(f.with_name(f.name.replace(".safetensors", ".fp16.safetensors")))
    pipe, ckpt = load_pipeline(folder)
    assert ckpt.architecture == "sd1" and pipe.unet is not None
