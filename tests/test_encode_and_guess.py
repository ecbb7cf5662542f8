"""The VAE encodes training images in float32 whatever dtype it was loaded in; an SD2.x prediction type guessed
from a weight statistic close to its threshold is said to be a guess."""

from __future__ import annotations

import copy
import hashlib
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from erasekit.checkpoints.layouts import detect
from erasekit.checkpoints.model_configs import _SPREAD_KEY, V_PREDICTION_SPREAD, sd2_prediction
from erasekit.checkpoints.pipeline import load_pipeline
from erasekit.cli import app
from erasekit.erasing.training_images import cache_dir, encode_images, training_image, vae_id
from erasekit.errors import ErasekitWarning
from erasekit.format import _st
from erasekit.format.erase_config import EraseConfig
from erasekit.testing import make_checkpoint, make_tiny_pipeline

# -- the VAE encodes in float32 -------------------------------------------------------------------


@pytest.fixture(scope="module")
def bf16_pipe(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The tiny SD1 pipeline with its VAE in bfloat16, as a half-precision load leaves it."""
    pipe, _ = load_pipeline(make_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny"))
    pipe.vae.to(torch.bfloat16)
    return pipe


def _images(n: int = 2) -> list[tuple[Image.Image, bytes]]:
    rng = np.random.default_rng(0)
    images = [training_image(Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)), 32) for _ in range(n)]
    return [(img, img.tobytes()) for img in images]


def _latent_dist(vae: torch.nn.Module, images: list[tuple[Image.Image, bytes]]):  # type: ignore[no-untyped-def]
    """The images' latent distribution through ``vae`` in the dtype it is in."""
    arr = np.stack([np.asarray(img, dtype=np.float32) / 127.5 - 1.0 for img, _ in images])
    with torch.no_grad():
        return vae.encode(torch.from_numpy(arr).permute(0, 3, 1, 2).to(vae.dtype)).latent_dist


def _encoded_directly(vae: torch.nn.Module, images: list[tuple[Image.Image, bytes]]) -> torch.Tensor:
    return _latent_dist(vae, images).mean.float()


def test_a_half_precision_vae_encodes_in_float32_and_is_given_back_as_found(
    bf16_pipe,
    tmp_path: Path,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ERASEKIT_CACHE_DIR", str(tmp_path / "cache"))
    vae = bf16_pipe.vae
    vae.train()  # a mode and flags it must be given back in
    vae.encoder.conv_in.weight.requires_grad_(False)
    images = _images()
    in_fp32 = _encoded_directly(copy.deepcopy(vae).float(), images)
    in_bf16 = _encoded_directly(copy.deepcopy(vae), images)
    assert (in_fp32 - in_bf16).abs().max() > 1e-3  # the test can tell the two apart

    mean, std = encode_images(bf16_pipe, images, EraseConfig(cache=False), [False, False])
    torch.testing.assert_close(mean, in_fp32, rtol=1e-5, atol=1e-6)
    assert mean.dtype == std.dtype == torch.float32 and bool((std > 0).all())
    assert {p.dtype for p in vae.parameters()} == {torch.bfloat16}
    assert vae.training and all(m.training for m in vae.modules())
    assert not vae.encoder.conv_in.weight.requires_grad and vae.decoder.conv_out.weight.requires_grad
    assert vae.device == torch.device("cpu")
    assert not (tmp_path / "cache").exists()  # cache=False writes nothing
    vae.eval()


def test_the_vae_is_given_back_as_found_when_encoding_fails(bf16_pipe, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    vae = bf16_pipe.vae

    def broken(x: torch.Tensor) -> None:
        assert x.dtype == torch.float32 and vae.encoder.conv_in.weight.dtype == torch.float32
        raise RuntimeError("out of memory")

    monkeypatch.setattr(vae, "encode", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        encode_images(bf16_pipe, _images(1), EraseConfig(cache=False), [False])
    assert {p.dtype for p in vae.parameters()} == {torch.bfloat16}
    assert {b.dtype for b in vae.buffers() if b.is_floating_point()} <= {torch.bfloat16}


def _old_key(data: bytes, resolution: int, flip: bool, vid: str) -> str:
    """The latents cache key of erasekit before the VAE encoded in float32 (it encoded in the VAE's dtype)."""
    return hashlib.sha256(data + f"|{resolution}|{int(flip)}|{vid}".encode()).hexdigest()


def test_latents_cached_by_a_half_precision_encode_are_not_reused(
    bf16_pipe,
    tmp_path: Path,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A float32 VAE whose weights are bfloat16 values has the same vae_id as the bfloat16 one: an entry an
    earlier erasekit wrote from the bfloat16 encode must not stand in for the float32 encode."""
    monkeypatch.setenv("ERASEKIT_CACHE_DIR", str(tmp_path / "cache"))
    cache = cache_dir()
    images = _images(1)
    fp32_pipe = copy.copy(bf16_pipe)
    fp32_pipe.vae = copy.deepcopy(bf16_pipe.vae).float()
    vid = vae_id(fp32_pipe.vae)
    assert vid == vae_id(bf16_pipe.vae)
    dist = _latent_dist(bf16_pipe.vae, images)
    cache.mkdir(parents=True)
    config = EraseConfig(cache=True, resolution=32)
    old = cache / f"{_old_key(images[0][1], config.resolution, False, vid)}.safetensors"
    _st.write_safetensors(
        old,
        {
            name: ("F32", tuple(t.shape[1:]), t[0].float().numpy().tobytes())
            for name, t in (("mean", dist.mean), ("std", dist.std))
        },
        {"vae": vid},
    )

    mean, _ = encode_images(fp32_pipe, images, config, [False])
    torch.testing.assert_close(mean, _encoded_directly(fp32_pipe.vae, images), rtol=1e-5, atol=1e-6)
    assert len(list(cache.glob("*.safetensors"))) == 2  # the float32 encode was cached beside the old entry
    again, _ = encode_images(fp32_pipe, images, config, [False])
    assert torch.equal(again, mean)


# -- an SD2.x prediction type guessed close to the threshold --------------------------------------

GUESSED = "was guessed from a weight statistic close to its threshold"


def _sd2_file(path: Path, spread: float, metadata: dict[str, str] | None = None) -> Path:
    """A tiny SD2.x single file whose UNet norm bias (the statistic's tensor, at its reference size) has exactly
    standard deviation ``spread``."""
    make_checkpoint(path, "single-sd2")
    sd = load_file(str(path))
    sd["model.diffusion_model.input_blocks.0.0.weight"] = np.zeros((320, 4, 3, 3), np.float32)
    z = np.random.default_rng(0).normal(size=1280)
    sd[_SPREAD_KEY] = ((z - z.mean()) / z.std() * spread).astype(np.float32)
    save_file(sd, str(path), metadata={"format": "pt", **(metadata or {})})
    return path


@pytest.mark.parametrize(("spread", "expected"), [(0.08, "epsilon"), (0.1, "v_prediction")])
def test_a_guess_close_to_the_threshold_warns_once_and_stands(tmp_path: Path, spread: float, expected: str) -> None:
    path = _sd2_file(tmp_path / "near.safetensors", spread)
    with pytest.warns(ErasekitWarning) as caught:
        pred, reason = sd2_prediction(detect(path))
    assert (pred, reason.split()[-2:]) == (expected, [">" if expected == "v_prediction" else "<=", "0.09"])
    assert len(caught) == 1
    message = str(caught[0].message)
    assert message.startswith(
        f"near.safetensors: the prediction type {expected} {GUESSED} (UNet norm-bias spread "
        f"{spread:.3f}, threshold {V_PREDICTION_SPREAD}"
    )
    assert "v_prediction for a 768-v model, epsilon for a 512 one" in message
    assert caught[0].message.option == "prediction_type"


@pytest.mark.parametrize(
    ("spread", "metadata", "expected"),
    [
        (0.01, None, "epsilon"),
        (0.213, None, "v_prediction"),
        (0.0666, None, "epsilon"),
        (0.1134, None, "v_prediction"),  # just outside the band (0.0675-0.1125)
        (0.09, {"modelspec.prediction_type": "v"}, "v_prediction"),  # the metadata says: nothing is guessed
    ],
)
def test_a_clear_or_told_prediction_type_does_not_warn(
    tmp_path: Path, spread: float, metadata: dict[str, str] | None, expected: str
) -> None:
    ckpt = detect(_sd2_file(tmp_path / "far.safetensors", spread, metadata))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sd2_prediction(ckpt)[0] == expected


def test_inspect_shows_the_guess_as_one_warning_line_naming_the_commands_that_take_the_option(tmp_path: Path) -> None:
    runner = CliRunner()
    near = runner.invoke(app, ["inspect", str(_sd2_file(tmp_path / "near.safetensors", 0.08))])
    assert near.exit_code == 0 and "sd2-512 (epsilon; UNet norm-bias spread 0.080 <= 0.09)" in near.stdout
    lines = near.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"warning: near.safetensors: the prediction type epsilon {GUESSED}")
    assert lines[0].endswith("epsilon for a 512 one (--prediction-type of erase, eval, generate)"), "inspect has none"
    far = runner.invoke(app, ["inspect", str(_sd2_file(tmp_path / "far.safetensors", 0.213))])
    assert far.exit_code == 0 and "sd2-768-v" in far.stdout and far.stderr == ""


def test_the_cli_shows_a_warning_given_twice_once(capsys: pytest.CaptureFixture[str]) -> None:
    """erase reads a single file's configs twice (its native size, then the pipeline): one line, not two."""
    from erasekit.cli._common import errors

    with errors():
        for _ in range(2):
            warnings.warn(
                ErasekitWarning("the prediction type epsilon was guessed", option="prediction_type"), stacklevel=1
            )
        warnings.warn(ErasekitWarning("another"), stacklevel=1)
    assert capsys.readouterr().err.splitlines() == [
        "warning: the prediction type epsilon was guessed (--prediction-type of erase, eval, generate)",
        "warning: another",
    ]


@pytest.mark.parametrize("layout", ["folder", "single file"])
def test_an_erase_loads_the_vae_in_float32_beside_a_bf16_unet(tmp_path: Path, layout: str) -> None:
    """The VAE's weights are not rounded to the UNet's compute dtype on load: the fp32 encode then sees the file's
    own values (a bf16 VAE cast up would give bf16-rounded latents)."""
    from erasekit.erasing.erase_job import load_for, prepare_erase
    from erasekit.erasing.unlearn import Clock
    from erasekit.testing import save_single_file

    folder = make_tiny_pipeline(tmp_path / "tiny")
    model = folder if layout == "folder" else save_single_file(folder, tmp_path / "tiny.safetensors")
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(images / "0.png")
    job = prepare_erase(
        model,
        ["circle"],
        [images],
        tmp_path / "p.erasepatch",
        {"dtype": "bf16"},
        config_dir=None if layout == "folder" else folder,
    )
    pipe, _ = load_for(job, Clock())
    assert pipe.unet.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.float32
    assert pipe.vae.dtype == torch.float32
    reference, _ = load_pipeline(folder)
    for (name, got), want in zip(pipe.vae.state_dict().items(), reference.vae.state_dict().values()):
        assert torch.equal(got, want), name
