"""The built-in toy world: renderer, captions, tokenizer, shipped model and judge.

Everything here runs on CPU in well under a minute. The one test that retrains (a smoke run of
every training stage, a few minutes) only runs with ERASEKIT_SLOW_TESTS=1.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from erasekit.toyworld import builtin_judge_path, builtin_model_path
from erasekit.toyworld import captions as cap
from erasekit.toyworld import render as rd

HELDOUT_SEED = 987_654  # not a seed the training script renders from


# ---------------------------------------------------------------------------------- renderer


def test_render_is_deterministic() -> None:
    a = rd.render("star", "purple", "striped", np.random.default_rng(5))
    b = rd.render("star", "purple", "striped", np.random.default_rng(5))
    c = rd.render("star", "purple", "striped", np.random.default_rng(6))
    assert a.size == (32, 32) and a.mode == "RGB"
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != c.tobytes()
    x1, y1 = rd.dataset(20, seed=3)
    x2, y2 = rd.dataset(20, seed=3)
    assert np.array_equal(x1, x2) and all(np.array_equal(y1[k], y2[k]) for k in y1)


def test_sample_covers_every_attribute_value() -> None:
    rng = np.random.default_rng(0)
    seen: dict[str, set[str]] = {k: set() for k in rd.ATTRIBUTES}
    for _ in range(300):
        img, attrs = rd.sample(rng)
        assert img.size == (32, 32)
        for k, v in attrs.items():
            seen[k].add(v)
    assert seen == {k: set(v) for k, v in rd.ATTRIBUTES.items()}
    assert len(rd.SHAPES) == 5 and len(rd.COLOURS) == 5 and len(rd.PATTERNS) == 3


def test_render_draws_the_colour_on_a_light_background() -> None:
    for seed, (colour, rgb) in enumerate(rd.COLOURS.items()):
        arr = np.asarray(rd.render("circle", colour, "solid", seed)).astype(int)
        # a circle always fits inside the image, so the corner is background: light grey (215-255, +-8 tint)
        assert (arr[0, 0] >= 205).all(), arr[0, 0]
        # the most saturated pixel is close to the nominal colour (jitter is +-25 per channel)
        flat = arr.reshape(-1, 3)
        sat = flat.max(1) - flat.min(1)
        assert np.abs(flat[sat.argmax()] - np.array(rgb)).max() <= 26, (colour, flat[sat.argmax()])


def test_render_rejects_unknown_attributes() -> None:
    with pytest.raises(ValueError):
        rd.render("hexagon", "red", "solid", 0)
    with pytest.raises(ValueError):
        rd.render("circle", "orange", "solid", 0)
    with pytest.raises(ValueError):
        rd.render("circle", "red", "dotted", 0)


# ---------------------------------------------------------------------------------- captions


def test_prompt_for() -> None:
    assert cap.prompt_for("circle", "red", "striped") == "a red striped circle"
    assert cap.prompt_for(shape="circle") == "a circle"
    assert cap.prompt_for(colour="red") == "a red object"
    assert cap.prompt_for(pattern="hollow") == "a hollow object"
    assert cap.prompt_for() == ""
    assert len(cap.full_prompts()) == 75


def test_caption_mix() -> None:
    rng = random.Random(0)
    attrs = {"shape": "circle", "colour": "red", "pattern": "striped"}
    caps = [cap.caption(attrs, rng) for _ in range(4000)]
    assert 0.08 < caps.count("") / len(caps) < 0.12
    assert 0.40 < caps.count("a red striped circle") / len(caps) < 0.55
    assert {"a circle", "a red object", "a striped shape", "a red circle"} <= set(caps)
    for c in caps:
        assert all(
            w
            in {
                "a",
                "an",
                "of",
                "photo",
                "picture",
                "drawing",
                "image",
                "rendering",
                "object",
                "shape",
                "red",
                "striped",
                "circle",
            }
            for w in c.split()
        )


def test_importing_the_package_does_not_import_torch() -> None:
    code = (
        "import sys, erasekit.toyworld, erasekit.toyworld.render, erasekit.toyworld.captions; "
        "erasekit.toyworld.builtin_model_path(); assert 'torch' not in sys.modules, 'torch imported'"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


# --------------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(builtin_model_path() / "tokenizer"), local_files_only=True)


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        ("a photo of a cat", [49406, 320, 1125, 539, 320, 2368, 49407]),
        ("hello world", [49406, 3306, 1002, 49407]),
        ("a red striped circle", [49406, 320, 736, 22192, 7117, 49407]),
        ("a blue hollow square", [49406, 320, 1746, 16691, 3999, 49407]),
        ("", [49406, 49407]),
    ],
)
def test_tokenizer_ids_are_clip_ids(tokenizer, text: str, ids: list[int]) -> None:
    assert tokenizer(text)["input_ids"] == ids


def test_tokenizer_is_the_full_clip_vocabulary(tokenizer) -> None:
    folder = builtin_model_path() / "tokenizer"
    assert len(tokenizer) == 49408
    assert tokenizer.convert_tokens_to_ids("<|startoftext|>") == 49406
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") == 49407
    assert (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    assert "Copyright (c) 2021 OpenAI" in (folder / "LICENSE-CLIP.txt").read_text()
    # an unknown word falls back to byte pieces, never to an unknown token
    ids = tokenizer("a zxqvjk circle")["input_ids"]
    assert len(ids) > 5 and tokenizer.unk_token_id not in ids[1:-1]


# ------------------------------------------------------------------------ shipped artefacts


def test_shipped_files_are_small_and_complete() -> None:
    root = builtin_model_path()
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert total <= 20 * 1024 * 1024, total
    assert builtin_judge_path().stat().st_size <= 2 * 1024 * 1024
    index = json.loads((root / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    assert index["scheduler"][1] == "DDIMScheduler"
    sched = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    assert sched["beta_schedule"] == "scaled_linear" and sched["prediction_type"] == "epsilon"
    assert (root / "README.md").is_file()
    assert json.loads((root / "erasekit.json").read_text())["toyworld"] is True


@pytest.fixture(scope="module")
def pipe():
    from erasekit.checkpoints.pipeline import load_pipeline
    from erasekit.toyworld import builtin_model_path

    return load_pipeline(builtin_model_path())[0]  # local files only


@pytest.fixture(scope="module")
def judge_model():
    from erasekit.toyworld.judge import load_judge

    return load_judge()


def test_shipped_model_loads_offline_in_float32(pipe) -> None:
    import torch

    assert pipe.text_encoder.dtype == torch.float32 and pipe.unet.dtype == torch.float32
    assert pipe.text_encoder.config.vocab_size == 49408 and pipe.text_encoder.config.hidden_size == 64
    assert pipe.vae.config.latent_channels == 4 and pipe.unet.config.sample_size == 8


def test_shipped_model_follows_prompts(pipe, judge_model) -> None:
    from erasekit.toyworld.judge import judge
    from erasekit.toyworld.measure import generate

    specs = [("circle", "red", "solid"), ("square", "blue", "striped"), ("star", "yellow", "hollow")]
    prompts = [cap.prompt_for(*s) for s in specs for _ in range(4)]
    images = generate(pipe, prompts, seed=4242)
    assert images.shape == (12, 32, 32, 3)
    labels = judge(images, model=judge_model)
    for key, pos in (("shape", 0), ("colour", 1), ("pattern", 2)):
        hits = sum(lab[key] == specs[i // 4][pos] for i, lab in enumerate(labels))
        assert hits >= 10, (key, hits, labels)


def test_judge_accuracy_on_fresh_renders(judge_model) -> None:
    from erasekit.toyworld.judge import HEADS, judge

    images, labels = rd.dataset(200, seed=HELDOUT_SEED)
    got = judge(images, model=judge_model)
    for k in HEADS:
        acc = np.mean([g[k] == rd.ATTRIBUTES[k][labels[k][i]] for i, g in enumerate(got)])
        assert acc >= 0.98, (k, acc)


def test_judge_accuracy_on_vae_reconstructions(pipe, judge_model) -> None:
    import torch

    from erasekit.toyworld.judge import HEADS, judge

    images, labels = rd.dataset(200, seed=HELDOUT_SEED + 1)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        z = pipe.vae.encode(x).latent_dist.mean
        rec = ((pipe.vae.decode(z).sample + 1) / 2).clamp(0, 1)
    got = judge(rec, model=judge_model)
    for k in HEADS:
        acc = np.mean([g[k] == rd.ATTRIBUTES[k][labels[k][i]] for i, g in enumerate(got)])
        assert acc >= 0.98, (k, acc)


def test_judge_api_accepts_pil_and_returns_probabilities(judge_model) -> None:
    from erasekit.toyworld.judge import judge

    img = rd.render("cross", "green", "striped", 11)
    labels, probs = judge([img], model=judge_model, return_probs=True)
    assert labels == [{"shape": "cross", "colour": "green", "pattern": "striped"}]
    assert probs["shape"].shape == (1, 5) and abs(float(probs["pattern"].sum()) - 1) < 1e-5


# ------------------------------------------------------------------------------- retraining


@pytest.mark.skipif(
    not os.environ.get("ERASEKIT_SLOW_TESTS"),
    reason="retrains every stage at toy settings (minutes); set ERASEKIT_SLOW_TESTS=1",
)
def test_training_smoke_run(tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    from erasekit.toyworld.train import main

    report = main(["--out", str(tmp_path), "--seed", "1", "--smoke"])
    assert set(report["times_s"]) >= {"vae", "judge", "diffusion", "total"}
    assert (tmp_path / "judge.safetensors").is_file()
    StableDiffusionPipeline.from_pretrained(str(tmp_path / "model"), local_files_only=True)
