"""generate and eval sample each model as its makers recommend unless told otherwise: FLUX.1 schnell 4 steps without
guidance (256 T5 tokens), FLUX.1 dev 28 at a distilled guidance of 3.5, SD3.x by its model card; SD1.x, SD2.x and
SDXL 25 steps at CFG scale 7.5 as before. The PNG metadata, the printed line and eval's record say what was used
(issue 21)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from erasekit.cli import app
from erasekit.families import family
from erasekit.testing import make_tiny_pipeline

SLOW = os.environ.get("ERASEKIT_SLOW_TESTS", "") not in ("", "0")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flow")
    return {arch: make_tiny_pipeline(root / arch, arch) for arch in ("flux", "flux-schnell", "sd3")}


def run(*args: object):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(app, [str(a) for a in args])


def generated(out: Path, *args: object) -> tuple[str, str, dict[str, object]]:
    """``erasekit generate ... "a cat" -n 1 -o out``: its printed line, and the image's A1111 parameters and
    erasekit metadata."""
    r = run("generate", *args, "a cat", "-n", "1", "-o", out)
    assert r.exit_code == 0, r.output
    img = Image.open(out / "a-cat_0.png")
    return r.stdout, img.text["parameters"], json.loads(img.text["erasekit"])


def test_flux_schnell_samples_4_steps_without_guidance(tmp_path: Path, tiny: dict[str, Path]) -> None:
    line, params, meta = generated(tmp_path / "out", "--model", tiny["flux-schnell"])
    assert "in " in line and line.rstrip().endswith(
        ": 4 steps, no guidance (FLUX.1 schnell's default steps and guidance)"
    )
    assert params.splitlines()[1].startswith(
        "Steps: 4, Sampler: FlowMatchEulerDiscreteScheduler, CFG scale: 1, Seed: 0"
    )
    assert "Distilled" not in params
    assert (meta["steps"], meta["guidance"], meta["guidance_kind"]) == (4, 0.0, "none")


def test_a_guidance_flux_schnell_cannot_read_is_said_to_have_no_effect(tmp_path: Path, tiny: dict[str, Path]) -> None:
    r = run("generate", "--model", tiny["flux-schnell"], "a cat", "-n", "1", "--guidance", "5", "-o", tmp_path / "o")
    assert r.exit_code == 0, r.output
    assert "the guidance 5 has no effect: this model reads none" in r.output
    assert "4 steps, no guidance (FLUX.1 schnell's default steps)" in r.stdout


def test_flux_dev_reads_a_distilled_guidance_of_3_5_and_explicit_settings_win(
    tmp_path: Path, tiny: dict[str, Path]
) -> None:
    """Forge's keys: real CFG off (1), the distilled guidance as "Distilled CFG Scale"."""
    line, params, meta = generated(tmp_path / "a", "--model", tiny["flux"], "--steps", "2")
    assert line.rstrip().endswith(": 2 steps, distilled guidance 3.5 (FLUX.1 dev's default guidance)")
    assert (
        "Steps: 2, Sampler: FlowMatchEulerDiscreteScheduler, CFG scale: 1, Distilled CFG Scale: 3.5, Seed: 0" in params
    )
    assert (meta["steps"], meta["guidance"], meta["guidance_kind"]) == (2, 3.5, "distilled")
    line, params, meta = generated(tmp_path / "b", "--model", tiny["flux"], "--steps", "2", "--guidance", "2.5")
    assert line.rstrip().endswith(": 2 steps, distilled guidance 2.5")
    assert "CFG scale: 1, Distilled CFG Scale: 2.5," in params and meta["guidance"] == 2.5


def test_sd3_samples_with_its_cfg_scale_and_an_explicit_one_wins(tmp_path: Path, tiny: dict[str, Path]) -> None:
    line, params, meta = generated(tmp_path / "a", "--model", tiny["sd3"], "--steps", "2")
    assert line.rstrip().endswith(": 2 steps, CFG scale 7 (SD3 medium's default guidance)")
    assert "Steps: 2, Sampler: FlowMatchEulerDiscreteScheduler, CFG scale: 7.0, Seed: 0" in params
    assert (meta["steps"], meta["guidance"], meta["guidance_kind"]) == (2, 7.0, "cfg")
    _, params, meta = generated(tmp_path / "b", "--model", tiny["sd3"], "--steps", "2", "--guidance", "4.5")
    assert "CFG scale: 4.5," in params and "Distilled" not in params and meta["guidance"] == 4.5


def test_the_built_in_sd_model_samples_as_before(tmp_path: Path) -> None:
    line, params, meta = generated(tmp_path / "out")
    assert line.rstrip().endswith(" s: 25 steps, CFG scale 7.5")
    assert params == "a cat\nSteps: 25, Sampler: DDIMScheduler, CFG scale: 7.5, Seed: 0, Size: 32x32, Model: model"
    assert (meta["steps"], meta["guidance"], meta["guidance_kind"]) == (25, 7.5, "cfg")


@pytest.fixture(scope="module")
def pipes(tiny: dict[str, Path]) -> dict[str, Any]:
    from erasekit.checkpoints.pipeline import load_pipeline

    return {arch: load_pipeline(folder)[0] for arch, folder in tiny.items()}


def test_each_pipeline_gets_its_family_variants_defaults(pipes: dict[str, Any]) -> None:
    from erasekit.judging.sampling import sampling_of

    def defaults(arch: str) -> tuple[object, ...]:
        s = sampling_of(pipes[arch])
        return s.steps, s.guidance, s.guidance_kind, s.max_sequence_length, s.title

    assert defaults("flux") == (28, 3.5, "distilled", None, "FLUX.1 dev")
    assert defaults("flux-schnell") == (4, 0.0, "none", 256, "FLUX.1 schnell")
    assert defaults("sd3") == (28, 7.0, "cfg", None, "SD3 medium")


@pytest.mark.parametrize(
    ("config", "want"),
    [
        ({"num_layers": 38, "qk_norm": "rms_norm"}, (28, 3.5, "SD3.5 large")),
        ({"num_layers": 24, "qk_norm": "rms_norm", "dual_attention_layers": [0, 1]}, (40, 4.5, "SD3.5 medium")),
        ({"num_layers": 24, "qk_norm": None}, (28, 7.0, "SD3 medium")),
    ],
)
def test_sd3_variants_are_told_by_their_transformer_config(config: dict[str, object], want: tuple[object, ...]) -> None:
    s = family("sd3").sampling_of(lambda component, key: config.get(key) if component == "transformer" else None)
    assert (s.steps, s.guidance, s.title) == want


def test_flux_schnell_prompts_are_256_t5_tokens_and_dev_prompts_512(pipes: dict[str, Any]) -> None:
    from erasekit.judging.sampling import render_batch

    lengths: dict[str, list[int]] = {"flux": [], "flux-schnell": []}
    for arch, seen in lengths.items():
        hook = pipes[arch].text_encoder_2.register_forward_pre_hook(
            lambda _m, args, seen=seen: seen.append(args[0].shape[1])
        )
        with torch.no_grad():
            render_batch(pipes[arch], ["a cat"], [0], steps=1)
        hook.remove()
    assert lengths == {"flux": [512], "flux-schnell": [256]}


def diffed_patch(root: Path, folder: Path) -> Path:
    """A patch (``erasekit diff``) that moves the T5's FFN of a copy of ``folder``."""
    import shutil

    from safetensors.torch import load_file, save_file

    edited = shutil.copytree(folder, root / f"{folder.name}-edited")
    path = edited / "text_encoder_2" / "model.safetensors"
    sd = load_file(path)
    g = torch.Generator().manual_seed(1)
    for key in sorted(k for k in sd if ".DenseReluDense." in k):
        sd[key] = sd[key] + torch.randn(sd[key].shape, generator=g) * 0.05
    save_file(sd, path, metadata={"format": "pt"})
    out = root / f"{folder.name}.erasepatch"
    assert run("diff", folder, edited, "-o", out).exit_code == 0
    return out


def test_eval_of_flux_samples_and_records_the_models_defaults(tmp_path: Path, tiny: dict[str, Path]) -> None:
    """eval --judge CLIP_FOLDER on FLUX.1: schnell's 4 steps without guidance by default, in its JSON and in the
    evaluation it records; dev's distilled 3.5 with --steps given."""
    from test_clip_judge import make_colour_clip

    from erasekit.format.patchfile import load_patch

    judge = make_colour_clip(tmp_path / "clip")
    for arch, extra, want in (
        ("flux-schnell", (), (4, 0.0, "none", "4 steps, no guidance (FLUX.1 schnell's default steps and guidance)")),
        (
            "flux",
            ("--steps", "2"),
            (2, 3.5, "distilled", "2 steps, distilled guidance 3.5 (FLUX.1 dev's default guidance)"),
        ),
    ):
        patch = diffed_patch(tmp_path, tiny[arch])
        args = ("eval", "--model", tiny[arch], "-p", patch, "--concept", "red", "--judge", judge, "--keep", "green")
        r = run(*args, "-n", "1", *extra, "--record", "--json")
        assert r.exit_code == 0, r.output
        report = json.loads(r.stdout)
        assert (report["steps"], report["guidance"], report["guidance_kind"], report["settings"]) == want
        (evaluation,) = load_patch(patch).manifest.evaluations
        assert (evaluation.steps, evaluation.guidance) == want[:2]
    r = run(*args, "-n", "1", *extra)
    assert r.exit_code == 0 and f"seeds 1000-1000, {want[3]}, " in " ".join(r.stdout.split()), r.output


@pytest.mark.skipif(not SLOW, reason="28 sampling steps each: set ERASEKIT_SLOW_TESTS=1")
def test_flux_dev_and_sd3_sample_28_steps_by_default(tmp_path: Path, tiny: dict[str, Path]) -> None:
    _, params, meta = generated(tmp_path / "flux", "--model", tiny["flux"])
    assert "Steps: 28, Sampler: FlowMatchEulerDiscreteScheduler, CFG scale: 1, Distilled CFG Scale: 3.5," in params
    _, params, meta = generated(tmp_path / "sd3", "--model", tiny["sd3"])
    assert "Steps: 28, Sampler: FlowMatchEulerDiscreteScheduler, CFG scale: 7.0," in params


def test_an_erase_conditions_flux_prompts_at_the_length_they_are_sampled_at(pipes: dict[str, Any]) -> None:
    """Schnell is sampled at 256 T5 tokens: an erase that conditioned at FluxPipeline's 512 would train on token
    states the sampler never makes (FluxPipeline runs T5 without an attention mask, so padding changes them)."""
    from erasekit.erasing.conditioning import Conditioner

    shapes = {
        arch: Conditioner(pipes[arch], 32, None)(["a cat"], "cpu")[0].shape[1] for arch in ("flux", "flux-schnell")
    }
    assert shapes == {"flux": 512, "flux-schnell": 256}


def with_sample_entry(root: Path, folder: Path, entry: object) -> Path:
    """A copy of ``folder`` whose erasekit.json recommends ``entry`` as its sampling."""
    import shutil

    copy = shutil.copytree(folder, root / f"{folder.name}-own")
    (copy / "erasekit.json").write_text(json.dumps({"sample": entry}))
    return copy


def test_a_models_own_sample_entry_wins_and_cfg_is_real_on_a_flux_without_guidance_embedding(
    tmp_path: Path, tiny: dict[str, Path]
) -> None:
    """The FLUX.1-family toy model has no guidance embedding but was trained for classifier-free guidance on 16 T5
    tokens: its erasekit.json says so, and generate samples with FluxPipeline's true_cfg_scale against the empty
    prompt, as a hand-written diffusers call would."""
    from diffusers import FluxPipeline

    entry = {"steps": 2, "guidance": 4.0, "guidance_kind": "cfg", "max_sequence_length": 16, "title": "toy-flux"}
    folder = with_sample_entry(tmp_path, tiny["flux-schnell"], entry)
    line, params, meta = generated(tmp_path / "out", "--model", folder, "--resolution", "32")
    assert line.rstrip().endswith(": 2 steps, CFG scale 4 (toy-flux's default steps and guidance)")
    assert "Steps: 2, Sampler: FlowMatchEulerDiscreteScheduler, CFG scale: 4.0, Seed: 0" in params
    assert (meta["steps"], meta["guidance"], meta["guidance_kind"]) == (2, 4.0, "cfg")

    pipe = FluxPipeline.from_pretrained(folder)
    common = {"height": 32, "width": 32, "num_inference_steps": 2, "max_sequence_length": 16, "output_type": "np"}
    by_hand = pipe(
        "a cat", generator=torch.Generator().manual_seed(0), true_cfg_scale=4.0, negative_prompt="", **common
    ).images[0]
    unguided = pipe("a cat", generator=torch.Generator().manual_seed(0), **common).images[0]
    got = np.asarray(Image.open(tmp_path / "out" / "a-cat_0.png"), dtype=np.float64) / 255
    assert np.abs(got - by_hand).max() <= 1 / 255 + 1e-6
    assert np.abs(got - unguided).max() > 4 / 255


@pytest.mark.parametrize(
    ("entry", "says"),
    [
        ({"steps": 2, "guidance": 4.0, "cfg": 2}, "cfg: Extra inputs are not permitted"),
        ({"guidance": 4.0}, "steps: Field required"),
        ({"steps": 2, "guidance": 4.0, "guidance_kind": "true"}, "guidance_kind: Input should be 'cfg'"),
    ],
)
def test_a_bad_sample_entry_is_one_line_naming_the_file(
    tmp_path: Path, tiny: dict[str, Path], entry: object, says: str
) -> None:
    folder = with_sample_entry(tmp_path, tiny["flux-schnell"], entry)
    r = run("generate", "--model", folder, "a cat", "-n", "1", "-o", tmp_path / "out")
    assert r.exit_code != 0 and not (tmp_path / "out").exists()
    line = r.stderr.strip()
    assert "\n" not in line and line.startswith(f'error: {folder / "erasekit.json"}: its "sample" entry: '), line
    assert says in line, line
