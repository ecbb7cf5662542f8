"""FLUX.1 and SD3.x run: tiny local pipelines of both, generate with them, the conditioning and the flow-matching
objective an erase trains with, and erase through the CLI (issue 21)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from erasekit.testing import make_tiny_pipeline
from erasekit.toyworld.t5_tokenizer import t5_tokenizer, unigram_vocab


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flow")
    return {arch: make_tiny_pipeline(root / arch, arch) for arch in ("flux", "sd3")}


def test_the_t5_tokenizer_is_the_same_each_time_and_reads_back(tmp_path: Path) -> None:
    assert unigram_vocab() == unigram_vocab()
    made = t5_tokenizer(tmp_path / "t5")
    from transformers import T5Tokenizer

    read = T5Tokenizer.from_pretrained(tmp_path / "t5")
    ids = read("a photo of a Zebra").input_ids
    assert ids == made("a photo of a Zebra").input_ids and ids[-1] == 1  # </s>
    assert read.unk_token_id not in ids, "any ASCII word tokenizes"
    assert (read.pad_token_id, read.eos_token_id, read.unk_token_id, read.model_max_length) == (0, 1, 2, 512)


@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_a_tiny_pipeline_runs_offline(tiny: dict[str, Path], arch: str) -> None:
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    cls = FluxPipeline if arch == "flux" else StableDiffusion3Pipeline
    pipe = cls.from_pretrained(tiny[arch], local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a photo of a cat", num_inference_steps=2, height=32, width=32, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert image.size == (32, 32)
    assert np.asarray(image).std() > 0


def run(*args: object):  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from erasekit.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def edited_patch(root: Path, folder: Path, components: tuple[str, ...]) -> Path:
    """The patch (``erasekit diff``) to a copy of ``folder`` whose encoders in ``components`` have every FFN tensor
    moved."""
    import shutil

    from safetensors.torch import load_file, save_file

    edited = root / f"{folder.name}-edited"
    shutil.copytree(folder, edited)
    g = torch.Generator().manual_seed(1)
    for component in components:
        path = edited / component / "model.safetensors"
        sd = load_file(path)
        for key in sorted(k for k in sd if ".mlp." in k or ".DenseReluDense." in k):
            sd[key] = sd[key] + torch.randn(sd[key].shape, generator=g) * 0.05
        save_file(sd, path, metadata={"format": "pt"})
    out = root / f"{folder.name}.erasepatch"
    assert run("diff", folder, edited, "-o", out).exit_code == 0
    return out


def pixels(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path)).astype(int)


@pytest.mark.parametrize(
    ("arch", "edited"),
    [("flux", ("text_encoder_2",)), ("sd3", ("text_encoder", "text_encoder_2", "text_encoder_3"))],
)
def test_generate_compares_a_patch_in_memory(
    tmp_path: Path, tiny: dict[str, Path], arch: str, edited: tuple[str, ...]
) -> None:
    """FLUX.1's patch moves its T5 alone (``text_encoder_2``): the picture changes all the same."""
    patch = edited_patch(tmp_path, tiny[arch], edited)
    out = tmp_path / "out"
    r = run("generate", "--model", tiny[arch], "-p", patch, "--compare", "a cat", "-n", "1", "--steps", "2", "-o", out)
    assert r.exit_code == 0, r.output
    before, after = pixels(out / "a-cat_0_before.png"), pixels(out / "a-cat_0_after.png")
    assert before.shape == (32, 32, 3), "the model's own size: the VAE's sample_size (FLUX), SD3's transformer's"
    assert np.abs(before - after).max() > 0


def test_an_sd3_folder_without_its_t5_generates(tmp_path: Path, tiny: dict[str, Path]) -> None:
    import json
    import shutil

    folder = tmp_path / "no-t5"
    shutil.copytree(tiny["sd3"], folder, ignore=shutil.ignore_patterns("text_encoder_3", "tokenizer_3"))
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(
        json.dumps(index | {"text_encoder_3": [None, None], "tokenizer_3": [None, None]})
    )
    r = run("generate", "--model", folder, "a cat", "-n", "1", "--steps", "2", "-o", tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert pixels(tmp_path / "out" / "a-cat_0.png").shape == (32, 32, 3)


def loaded(folder: Path, **kw: object):  # type: ignore[no-untyped-def]
    from erasekit.checkpoints.pipeline import load_pipeline

    return load_pipeline(folder, **kw)[0]  # type: ignore[arg-type]


@pytest.mark.parametrize("arch", ["flux", "sd3", "sd3-no-t5"])
def test_erasekit_conditions_as_the_pipelines_do(tmp_path: Path, tiny: dict[str, Path], arch: str) -> None:
    """What the erase feeds the transformer is what the pipeline's own ``encode_prompt`` gives it: FLUX.1's T5 tokens
    (512 of them) and CLIP-L's pooled output; SD3.x's joined CLIP tokens padded to T5's width and followed by T5's
    256 (as many zero rows without T5), and both CLIPs' projected pooled embeddings."""
    from erasekit.erasing.conditioning import Conditioner, encoder_outputs

    pipe = loaded(tiny[arch.removesuffix("-no-t5")])
    if arch == "sd3-no-t5":
        pipe.text_encoder_3 = pipe.tokenizer_3 = None
    prompts = ["a photo of a cat", "a red striped circle", ""]
    with torch.no_grad():
        conditioning = Conditioner(pipe, 32, None)(prompts, "cpu")
        if arch == "flux":
            tokens, pooled, _ = pipe.encode_prompt(prompts, None, device="cpu")
        else:
            tokens, _, pooled, _ = pipe.encode_prompt(
                prompts, None, None, device="cpu", do_classifier_free_guidance=False
            )
    outputs = encoder_outputs(conditioning)
    want = {
        "flux": ((3, 512, 80), (3, 32)),
        "sd3": ((3, 77 + 256, 80), (3, 64)),
        "sd3-no-t5": ((3, 77 + 256, 80), (3, 64)),
    }
    assert (outputs["hidden"].shape, outputs["pooled"].shape) == want[arch]
    assert torch.equal(outputs["hidden"], tokens) and torch.equal(outputs["pooled"], pooled)


def test_a_clip_only_erase_measures_its_stored_form_with_t5_run_once(tiny: dict[str, Path]) -> None:
    """A FLUX.1 erase that trains CLIP-L alone stores its change at ``--rank auto``, which measures the encoders'
    outputs before and after compressing, up to six passes over the same prompts: T5, which the erase leaves alone
    (and which costs most at full size), runs once for them, and gives the same outputs as when run each time."""
    from erasekit.erasing.compress import Compaction
    from erasekit.erasing.conditioning import Conditioner, trainable
    from erasekit.format.erase_config import EraseConfig

    pipe = loaded(tiny["flux"])
    cond_of = Conditioner(pipe, 32, ["te1"])
    t5_calls: list[int] = []
    handle = pipe.text_encoder_2.register_forward_hook(lambda *_: t5_calls.append(1))
    try:
        config = EraseConfig(rank="auto", rank_tol=1e-6)  # every tightening runs: the most passes
        params = trainable("te1", pipe.text_encoder, None)
        originals = {(m, k): p.detach().clone() for m, k, p in params}
        with torch.no_grad():
            for _, _, p in params:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
        compaction = Compaction(config, ["cat"], [None], cond_of, "cpu")
        compaction.factors(params, originals)
    finally:
        handle.remove()
        with torch.no_grad():
            for m, k, p in params:
                p.copy_(originals[(m, k)])
    assert len(t5_calls) == 1
    with torch.no_grad():
        again = cond_of(compaction.judged, "cpu")[0]
    assert torch.equal(compaction.base["hidden"], again.float())


@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_the_denoiser_trains_the_rectified_flow(tiny: dict[str, Path], arch: str) -> None:
    """noisy = (1 - sigma) x0 + sigma noise, target noise - x0, sigma from the scheduler's training table (SD3's
    shift 3; FLUX-dev's dynamic shift is not applied in training), x0 = noisy - sigma * velocity; the transformer
    gets SD3's timestep in 0-1000, FLUX's over 1000 with 2x2-packed latents, their ids and a guidance of 3.5."""
    from erasekit.erasing.conditioning import Conditioner
    from erasekit.erasing.denoising import Prediction, make_denoiser

    pipe = loaded(tiny[arch])
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    denoiser = make_denoiser(pipe, x0, None)
    t = torch.tensor([0, 700])
    seen: dict[str, object] = {}
    pipe.transformer.register_forward_pre_hook(lambda _m, _a, kw: seen.update(kw), with_kwargs=True)
    with torch.no_grad():
        prediction = denoiser.predict([0, 1], t, noise, Conditioner(pipe, 32, None)(["a cat", "a dog"], "cpu"))
    s = 1 - t.double() / 1000  # the unshifted table: 1 at index 0, 0.3 at index 700
    sigma = (3 * s / (1 + 2 * s) if arch == "sd3" else s).float().view(-1, 1, 1, 1)
    assert torch.allclose(prediction.noisy, (1 - sigma) * x0 + sigma * noise, atol=1e-6)
    assert torch.equal(prediction.target, noise - x0) and prediction.out.shape == x0.shape
    perfect = Prediction(denoiser, prediction.noisy, t, prediction.target, prediction.target)
    assert torch.allclose(perfect.clean(), x0, atol=1e-5)
    timestep = seen["timestep"]
    assert isinstance(timestep, torch.Tensor)
    if arch == "sd3":
        assert torch.allclose(timestep, sigma.flatten() * 1000) and seen["hidden_states"].shape == (2, 4, 8, 8)  # type: ignore[union-attr]
    else:
        assert torch.allclose(timestep, sigma.flatten()) and seen["hidden_states"].shape == (2, 16, 16)  # type: ignore[union-attr]
        assert seen["img_ids"].shape == (16, 3) and seen["txt_ids"].shape == (512, 3)  # type: ignore[union-attr]
        assert seen["guidance"].tolist() == [3.5, 3.5]  # type: ignore[union-attr]


def test_flux_schnell_has_no_guidance_to_feed(tmp_path: Path) -> None:
    from erasekit.erasing.denoising import make_denoiser

    pipe = loaded(make_tiny_pipeline(tmp_path / "schnell", "flux-schnell"))
    seen: dict[str, object] = {}
    pipe.transformer.register_forward_pre_hook(lambda _m, _a, kw: seen.update(kw), with_kwargs=True)
    denoiser = make_denoiser(pipe, torch.zeros(1, 4, 8, 8), None)
    cond = (torch.zeros(1, 7, 80), {"text_embeds": torch.zeros(1, 32)})
    with torch.no_grad():
        denoiser.run(torch.zeros(1, 4, 8, 8), torch.tensor([5]), cond)
    assert "guidance" in seen and seen["guidance"] is None and seen["txt_ids"].shape == (7, 3)  # type: ignore[union-attr]


def training_images(folder: Path) -> Path:
    from PIL import Image

    folder.mkdir()
    for i in range(2):
        pixels = np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"cat{i}.png")
    return folder


@pytest.fixture(scope="module")
def erased(tmp_path_factory: pytest.TempPathFactory, tiny: dict[str, Path]) -> dict[str, Path]:
    """A 2-step erase of "cat" from each tiny model, through the CLI."""
    root = tmp_path_factory.mktemp("erased")
    images = training_images(root / "cats")
    patches = {}
    for arch, folder in tiny.items():
        patches[arch] = out = root / f"{arch}.erasepatch"
        r = run("erase", "--model", folder, "--concept", "cat", "--images", images, "--steps", "2", "-o", out)
        assert r.exit_code == 0, r.output
    return patches


@pytest.mark.parametrize(("arch", "slots"), [("flux", ["te1", "te3"]), ("sd3", ["te1", "te2", "te3"])])
def test_erase_patches_every_encoder_the_transformer_reads_and_applies_in_place(
    tmp_path: Path, tiny: dict[str, Path], erased: dict[str, Path], arch: str, slots: list[str]
) -> None:
    """Low-rank (``--rank auto``, the default) on T5's tensors as on CLIP's; in place and back, bit for bit."""
    import shutil

    from conftest import snapshot

    from erasekit.format.patchfile import load_patch

    patch = load_patch(erased[arch])
    assert (patch.manifest.base.architecture, sorted(patch.manifest.base.encoders)) == (arch, slots)
    assert sorted({m.split("_")[1] for m in patch.manifest.deltas}) == slots
    assert patch.manifest.method.hyperparameters["prediction_type"] == "flow_matching"
    t5 = [m for m in patch.manifest.deltas if m.startswith("lora_te3_")]
    assert len(t5) == 6 and all(f"{m}.lora_down.weight" in patch.tensors for m in t5)
    target = shutil.copytree(tiny[arch], tmp_path / arch)
    before = snapshot(target)
    r = run("apply", erased[arch], "--to", target, "--in-place")
    assert r.exit_code == 0 and "base fingerprint exact" in r.stdout and snapshot(target) != before, r.output
    r = run("apply", "--revert", erased[arch], "--to", target)
    assert r.exit_code == 0 and snapshot(target) == before, r.output


def test_erase_trains_t5_alone_when_asked(tmp_path: Path, tiny: dict[str, Path]) -> None:
    from erasekit.format.patchfile import load_patch

    out = tmp_path / "t5.erasepatch"
    images = training_images(tmp_path / "cats")
    args = ("erase", "--model", tiny["flux"], "--concept", "cat", "--images", images, "--steps", "2", "-o", out)
    r = run(*args, "--encoders", "te3", "--rank", "dense")
    assert r.exit_code == 0, r.output
    assert {m.split("_")[1] for m in load_patch(out).manifest.deltas} == {"te3"}


def test_eval_judges_a_flux_erase_with_a_clip_judge(
    tmp_path: Path, tiny: dict[str, Path], erased: dict[str, Path]
) -> None:
    import json

    from test_clip_judge import make_colour_clip

    judge = make_colour_clip(tmp_path / "clip")
    args = ("eval", "--model", tiny["flux"], "-p", erased["flux"], "--concept", "red", "--judge", judge)
    r = run(*args, "--keep", "green", "-n", "1", "--steps", "2", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["labels"] == ["red", "green"] and report["images_per_prompt"] == 1
    assert 0 <= report["target"]["after"] <= 1
