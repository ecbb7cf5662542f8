"""The FLUX.1-family toy model (``--model toy-flux``): the shipped folder (small, in the wheel, sampled as it was
trained, following prompts, erased, generated and judged through the CLI), and its parts and training
(``python -m erasekit.toyworld.train --family flux``) on random weights: the parts fit together, the saved FluxPipeline
folder is small and conditions as training did and as diffusers does, and measure samples it as it is trained
(docs/toyworld-flux.md).

The one test that trains (a smoke run of the flux family, a few minutes) only runs with ERASEKIT_SLOW_TESTS=1.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from erasekit.toyworld import builtin_model_path

SD_ROOT = builtin_model_path("toy-sd")
XL_ROOT = builtin_model_path("toy-sdxl")
ROOT = builtin_model_path("toy-flux")
PROMPTS = ["a red striped circle", "an image of a purple solid object", ""]


def _toy(p_tokens_empty: float = 0.3):  # type: ignore[no-untyped-def]
    import torch

    from erasekit.toyworld.train import Settings, T5Ids, TokenIds, make_text_encoder
    from erasekit.toyworld.train_flux import FluxSettings, FluxToy

    x = FluxSettings(p_tokens_empty=p_tokens_empty)
    torch.manual_seed(0)
    t5_ids = T5Ids(x.max_sequence_length, "cpu")
    clip_ids = TokenIds(SD_ROOT / "tokenizer", "cpu")
    return FluxToy(make_text_encoder(Settings()), clip_ids, t5_ids, len(t5_ids.tok), x, 9, "cpu")


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A toy FLUX folder as training saves it, on random weights."""
    from diffusers import AutoencoderKL

    toy = _toy()
    out = tmp_path_factory.mktemp("flux") / "model"
    vae = AutoencoderKL.from_pretrained(str(SD_ROOT / "vae"))
    toy.save(vae, SD_ROOT / "tokenizer", None, out, SD_ROOT / "vae")
    return out


@pytest.fixture(scope="module")
def pipe(saved: Path):  # type: ignore[no-untyped-def]
    from erasekit.checkpoints.pipeline import load_pipeline

    return load_pipeline(saved)[0]


def test_the_parts_fit_together() -> None:
    import torch

    from erasekit.toyworld.t5_tokenizer import t5_tokenizer

    toy = _toy()
    t5, tr, clip = toy.t5.config, toy.transformer.config, toy.te.config
    assert (t5.feed_forward_proj, t5.d_model, t5.d_ff, t5.num_layers, t5.num_heads) == ("gated-gelu", 64, 160, 3, 4)
    assert t5.vocab_size == len(t5_tokenizer()) and t5.num_heads * t5.d_kv == t5.d_model
    assert (tr.joint_attention_dim, tr.pooled_projection_dim) == (t5.d_model, clip.hidden_size) == (64, 64)
    assert tr.in_channels == 16 and tr.guidance_embeds is False
    assert sum(tr.axes_dims_rope) == tr.attention_head_dim
    tokens, added = toy.condition(PROMPTS)
    assert tokens.shape == (3, 16, 64) and added["text_embeds"].shape == (3, 64)
    z0 = torch.randn(3, 4, 8, 8)
    loss = toy.loss(z0, torch.randn_like(z0), torch.tensor([0, 500, 999]), PROMPTS)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in toy.t5.parameters())
    assert toy.te.get_input_embeddings().weight.grad is not None  # the pooled path trains CLIP


def test_the_longest_training_caption_fits_the_t5_length() -> None:
    import random

    from erasekit.toyworld import captions as cap
    from erasekit.toyworld import render as rd
    from erasekit.toyworld.t5_tokenizer import t5_tokenizer
    from erasekit.toyworld.train_flux import FluxSettings

    tok, rng = t5_tokenizer(), random.Random(0)
    captions = {cap.caption({k: rng.choice(rd.ATTRIBUTES[k]) for k in rd.ATTRIBUTES}, rng) for _ in range(5000)}
    longest = max(len(tok(c).input_ids) for c in captions)  # </s> included
    assert longest == 14 <= FluxSettings().max_sequence_length


def test_a_row_without_its_t5_tokens_keeps_its_pooled_vector() -> None:
    import torch

    toy = _toy(p_tokens_empty=1.0)
    with torch.no_grad():
        dropped, added = toy.condition(PROMPTS[:2])
        toy.x.p_tokens_empty = 0.0
        kept, both = toy.condition(PROMPTS)
    assert torch.equal(dropped, kept[2:].repeat(2, 1, 1)) and not torch.equal(dropped, kept[:2])
    assert torch.equal(added["text_embeds"], both["text_embeds"][:2])


def test_the_folder_is_a_small_flux_pipeline(saved: Path) -> None:
    index = json.loads((saved / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
    assert index["text_encoder_2"] == ["transformers", "T5EncoderModel"]
    sched = json.loads((saved / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert (sched["shift"], sched["use_dynamic_shifting"]) == (1.0, False)
    sizes = {p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in saved.iterdir() if p.is_dir()}
    assert sum(sizes.values()) <= 30 * 1024 * 1024, sizes
    # the shipped toy VAE's weights byte for byte, with the shift_factor FluxPipeline adds to every decoded latent
    weights = "diffusion_pytorch_model.safetensors"
    assert (saved / "vae" / weights).read_bytes() == (SD_ROOT / "vae" / weights).read_bytes()
    vae = json.loads((saved / "vae" / "config.json").read_text())
    assert vae["shift_factor"] == 0.0 and vae["scaling_factor"] == 0.53021
    for encoder in ("text_encoder", "text_encoder_2"):  # stored in float16, computed in float32
        cfg = json.loads((saved / encoder / "config.json").read_text())
        assert cfg.get("dtype", cfg.get("torch_dtype")) == "float32"
        raw = (saved / encoder / "model.safetensors").read_bytes()
        header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
        assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F16"}
    tok2 = json.loads((saved / "tokenizer_2" / "tokenizer_config.json").read_text())
    assert tok2["model_max_length"] == 16
    assert {p.name: p.read_bytes() for p in (saved / "tokenizer").iterdir()} == {
        p.name: p.read_bytes() for p in (SD_ROOT / "tokenizer").iterdir()
    }


def test_training_conditions_as_diffusers_does(pipe) -> None:
    import torch
    from diffusers import FluxPipeline

    from erasekit.toyworld.train_flux import encode

    assert isinstance(pipe, FluxPipeline)
    assert pipe.text_encoder.dtype == pipe.text_encoder_2.dtype == torch.float32
    toy = _toy(p_tokens_empty=0.0)
    toy.te, toy.t5 = pipe.text_encoder, pipe.text_encoder_2  # the saved weights, as the loop trains them
    with torch.no_grad():
        tokens, added = toy.condition(PROMPTS)
        theirs, pooled, text_ids = pipe.encode_prompt(PROMPTS, None, max_sequence_length=16)
        clip_ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
        t5_ids = pipe.tokenizer_2(PROMPTS, padding="max_length", max_length=16, return_tensors="pt").input_ids
        ours = encode(pipe.text_encoder, pipe.text_encoder_2, clip_ids, t5_ids)
    assert theirs.shape == (3, 16, 64) and pooled.shape == (3, 64) and text_ids.shape == (16, 3)
    assert torch.equal(tokens, theirs) and torch.equal(added["text_embeds"], pooled)
    assert torch.equal(ours[0], theirs) and torch.equal(ours[1], pooled)
    with torch.no_grad():  # FluxPipeline's default, 512 T5 tokens, is not what the model is trained on
        padded, _, _ = pipe.encode_prompt(PROMPTS, None)
    assert padded.shape[1] == 512 and not torch.allclose(padded[:, :16], theirs)


def test_measure_samples_it_as_it_is_trained(pipe) -> None:
    import torch

    from erasekit.toyworld.measure import ablated_embeddings, generate

    images = generate(pipe, PROMPTS[:2], seed=7, steps=2, guidance=5.0)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    generators = [torch.Generator().manual_seed(7 + i) for i in range(2)]
    kwargs = {"num_inference_steps": 2, "height": 32, "width": 32, "output_type": "np"}
    by_hand = pipe(
        PROMPTS[:2], negative_prompt=["", ""], true_cfg_scale=5.0, max_sequence_length=16, generator=generators,
        **kwargs,
    ).images  # fmt: skip
    assert np.array_equal(images, (by_hand * 255).round().astype(np.uint8))
    plain = pipe(PROMPTS[:2], generator=[torch.Generator().manual_seed(7 + i) for i in range(2)], **kwargs).images
    assert not np.array_equal(images, (plain * 255).round().astype(np.uint8))  # no guidance, 512 tokens
    with torch.no_grad():
        tokens, pooled, _ = pipe.encode_prompt(["a red circle", ""], None, max_sequence_length=16)
    no_pooled = ablated_embeddings(pipe, ["a red circle"], "pooled")
    no_tokens = ablated_embeddings(pipe, ["a red circle"], "tokens")
    assert torch.equal(no_pooled["prompt_embeds"], tokens[:1])
    assert torch.equal(no_pooled["pooled_prompt_embeds"], pooled[1:])
    assert torch.equal(no_tokens["prompt_embeds"], tokens[1:])
    assert torch.equal(no_tokens["pooled_prompt_embeds"], pooled[:1])
    ablated = generate(pipe, ["a red circle"], seed=7, steps=1, guidance=5.0, ablate="tokens")
    assert ablated.shape == (1, 32, 32, 3)


@pytest.mark.skipif(
    not os.environ.get("ERASEKIT_SLOW_TESTS"),
    reason="trains the flux family at toy settings (a few minutes); set ERASEKIT_SLOW_TESTS=1",
)
def test_training_smoke_run(tmp_path: Path) -> None:
    from diffusers import FluxPipeline

    from erasekit.toyworld.train import main

    report = main(["--out", str(tmp_path), "--seed", "1", "--smoke", "--family", "flux", "--p-tokens-empty", "0.2"])
    assert report["family"] == "flux" and report["vae"]["scaling_factor"] == 0.53021
    assert (report["flux"]["p_tokens_empty"], report["flux"]["max_sequence_length"]) == (0.2, 16)
    assert not (tmp_path / "judge.safetensors").exists()  # the shipped judge and VAE are reused
    pipe = FluxPipeline.from_pretrained(str(tmp_path / "model"), local_files_only=True)
    assert pipe.transformer.config.guidance_embeds is False
    assert json.loads((tmp_path / "model" / "erasekit.json").read_text()) == json.loads(
        (XL_ROOT / "erasekit.json").read_text()
    )
    assert np.isfinite(report["generation"]["shape"])


# ------------------------------------------------------------------------ the shipped model


def test_the_shipped_folder_is_small_and_complete() -> None:
    """(tests/test_toyworld_sdxl.py checks that the wheel ships it.)"""
    assert {p.name for p in ROOT.iterdir()} >= {
        "model_index.json", "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "transformer",
        "vae", "erasekit.json",
    }  # fmt: skip
    assert sum(p.stat().st_size for p in ROOT.rglob("*") if p.is_file()) <= 30 * 1024 * 1024
    assert json.loads((ROOT / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
    settings = json.loads((ROOT / "erasekit.json").read_text())
    assert settings["toyworld"] is True and settings["erase"]["resolution"] == 32
    assert settings["sample"] == {
        "steps": 25, "guidance": 7.5, "guidance_kind": "cfg", "max_sequence_length": 16, "title": "toy-flux"
    }  # fmt: skip


@pytest.fixture(scope="module")
def shipped():  # type: ignore[no-untyped-def]
    from erasekit.checkpoints.pipeline import load_pipeline

    return load_pipeline("toy-flux")[0]  # local files only


def test_the_shipped_model_is_sampled_and_erased_as_it_was_trained(shipped) -> None:
    """Real classifier-free guidance at 7.5 on 16 T5 tokens, by its erasekit.json: FLUX.1 schnell's defaults (4
    steps, no guidance, 256 tokens) would draw noise from it; an erase conditions on the same 16 tokens."""
    import torch

    from erasekit.erasing.conditioning import Conditioner
    from erasekit.judging.sampling import sampling_of

    s = sampling_of(shipped)
    assert (s.steps, s.guidance, s.guidance_kind, s.max_sequence_length, s.title) == (25, 7.5, "cfg", 16, "toy-flux")
    with torch.no_grad():
        hidden, added = Conditioner(shipped, 32, None)(["a red circle"], "cpu")
        theirs, pooled, _ = shipped.encode_prompt(["a red circle"], None, max_sequence_length=16)
    assert torch.equal(hidden, theirs) and torch.equal(added["text_embeds"], pooled)


def test_the_shipped_model_follows_prompts(shipped) -> None:
    from erasekit.checkpoints.pipeline import model_threads
    from erasekit.judging.sampling import render_batch
    from erasekit.toyworld import captions as cap
    from erasekit.toyworld.judge import judge, load_judge

    specs = [("circle", "red", "solid"), ("square", "blue", "striped"), ("star", "yellow", "hollow")]
    prompts = [cap.prompt_for(*s) for s in specs for _ in range(4)]
    with model_threads("toy-flux"):
        images = render_batch(shipped, prompts, [4242 + i for i in range(12)], resolution=32)
    labels = judge(images, model=load_judge())
    for key, pos in (("shape", 0), ("colour", 1), ("pattern", 2)):
        hits = sum(lab[key] == specs[i // 4][pos] for i, lab in enumerate(labels))
        assert hits >= 10, (key, hits, labels)


def test_erase_generate_and_eval_on_toy_flux(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from erasekit.cli import app
    from erasekit.format.patchfile import load_patch

    def run(*args: object):  # type: ignore[no-untyped-def]
        return CliRunner().invoke(app, [str(a) for a in args])

    patch = tmp_path / "circle.erasepatch"
    r = run("erase", "--model", "toy-flux", "--concept", "circle", "--steps", "2", "-o", patch)
    assert r.exit_code == 0, r.output
    base = load_patch(patch).manifest.base
    assert base.architecture == "flux" and set(base.encoders) == {"te1", "te3"}
    r = run("generate", "--model", "toy-flux", "-p", patch, "-n", "1", "-o", tmp_path / "g", "a red circle")
    assert r.exit_code == 0, r.output
    assert "25 steps, CFG scale 7.5 (toy-flux's default steps and guidance)" in r.stdout
    r = run("eval", "--model", "toy-flux", "-p", patch, "-c", "circle", "-n", "1", "--steps", "2", "--record")
    assert r.exit_code == 0, r.output
    (ev,) = load_patch(patch).manifest.evaluations
    assert (ev.judge.kind, ev.model.name) == ("toyworld-cnn", "built-in toy world (toy-flux)")
