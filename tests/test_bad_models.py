"""Models erasekit does not erase: one line naming what the file looks like and what is supported, a non-zero
exit, nothing written. Also the Hub's answers for ids that cannot be had (the Hub is simulated: no network)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file
from typer.testing import CliRunner

from erasekit.cli import app
from erasekit.errors import ErasekitError
from erasekit.testing import make_checkpoint

runner = CliRunner()
Z = np.zeros((2, 2), np.float32)
KINDS = {  # FLUX.1 and SD3.x transformers without their encoders: tests/test_flux_sd3.py
    "lora": (
        {
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": Z,
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": Z,
        },
        "a LoRA/LyCORIS network",
    ),
    "unet": (
        {"model.diffusion_model.input_blocks.0.0.weight": Z, "model.diffusion_model.out.2.weight": Z},
        "a UNet on its own",
    ),
    "vae": ({"encoder.conv_in.weight": Z, "decoder.conv_out.weight": Z}, "a VAE on its own"),
}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("imgs")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "a.png")
    return folder


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_other_model_kinds_get_one_line_naming_what_they_look_like(kind: str, tmp_path: Path, images: Path) -> None:
    tensors, looks = KINDS[kind]
    model = tmp_path / f"{kind}.safetensors"
    save_file(tensors, str(model))
    before = model.read_bytes()
    for args in (
        [
            "erase",
            "--model",
            str(model),
            "--concept",
            "x",
            "--images",
            str(images),
            "-o",
            str(tmp_path / "o.erasepatch"),
        ],
        ["generate", "--model", str(model), "-o", str(tmp_path / "gen"), "a cat"],
        ["inspect", str(model)],
    ):
        r = runner.invoke(app, args)
        assert r.exit_code == 4, (args, r.output)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0] == (
            f"error: {model.name} looks like {looks}"
            + (", not a whole model" if kind == "lora" else "")
            + ", which erasekit does not erase or patch; erasekit supports SD1.x, SD2.x, SDXL, FLUX.1 and SD3.x "
            "checkpoints: one .safetensors/.ckpt file, a diffusers folder or a model id"
        ), r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [model.name] and model.read_bytes() == before


def test_a_patch_given_as_a_model_points_to_apply(tmp_path: Path, images: Path, sd1: tuple[Path, Path]) -> None:
    from erasekit.checkpoints.diff import diff_checkpoints

    patch = tmp_path / "edit.safetensors"  # as written for a UI's LoRA folder
    diff_checkpoints(*sd1, output=patch)
    r = runner.invoke(
        app,
        [
            "erase",
            "--model",
            str(patch),
            "--concept",
            "x",
            "--images",
            str(images),
            "-o",
            str(tmp_path / "o.erasepatch"),
        ],
    )
    assert r.exit_code == 4 and "looks like an erasekit patch (apply it to a checkpoint: erasekit apply" in r.stderr


def test_a_text_encoder_on_its_own_cannot_be_erased_but_can_be_patched(tmp_path: Path, images: Path) -> None:
    te = make_checkpoint(tmp_path / "te", "transformers-clip")
    r = runner.invoke(
        app,
        ["erase", "--model", str(te), "--concept", "x", "--images", str(images), "-o", str(tmp_path / "o.erasepatch")],
    )
    assert r.exit_code == 4 and r.stderr.startswith(f"error: {te} is a CLIP text encoder on its own (no UNet or VAE)")
    assert "erasekit apply" in r.stderr and not (tmp_path / "o.erasepatch").exists()


def _http_error(cls: type, status: int) -> Exception:
    import httpx2

    response = httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/org/x"))
    return cls("the Hub says no", response=response)


@pytest.mark.parametrize(
    "error, message",
    [
        (
            "RepositoryNotFoundError",
            "org/x is neither a local path nor a model on the Hugging Face Hub (or it is private); "
            "check the id; for a private repo log in with `hf auth login`",
        ),
        (
            "GatedRepoError",
            "model org/x is gated: its licence must be accepted on its Hub page first; accept it there, then "
            "log in with `hf auth login` (or set HF_TOKEN)",
        ),
    ],
)
def test_unknown_or_gated_repos_online_are_one_line(
    error: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub
    from huggingface_hub import constants, errors

    from erasekit.checkpoints.hub import resolve_model

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    def refuse(self: object, repo_id: str, **kw: object) -> list[str]:
        raise _http_error(getattr(errors, error), 404 if error == "RepositoryNotFoundError" else 403)

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", refuse)
    with pytest.raises(ErasekitError) as e:
        resolve_model("org/x")
    assert str(e.value) == message
    assert not (tmp_path / "hub").exists() or not any((tmp_path / "hub").rglob("*.safetensors"))


@pytest.mark.parametrize("name", ["model_index.json", "text_encoder/config.json"])
def test_a_model_json_nested_200000_deep_is_a_layout_error(tmp_path: Path, name: str) -> None:
    folder = make_checkpoint(tmp_path / "m", "diffusers-sd1")
    (folder / name).write_text("[" * 200_000 + "]" * 200_000)
    r = CliRunner().invoke(app, ["inspect", str(folder)])
    assert r.exit_code == 4 and r.stderr.count("\n") == 1 and "is not readable JSON (RecursionError)" in r.stderr, (
        r.output
    )
