"""Tiny random checkpoints in every layout erasekit reads, for tests, examples and benchmarks.

Nothing here downloads anything: each builder writes a small, deterministic (seeded) checkpoint
whose text encoder has the real key names and tensor roles of its layout, at toy sizes.

    python -m erasekit.testing single-sd1 /tmp/base.safetensors [--dtype F16] [--edit-layers 1]
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # transformers is imported where a tokenizer is made
    from transformers import CLIPTokenizer

# FLUX.1 and SD3.x as their users keep them, and the encoder files beside them (ComfyUI's clip_l.safetensors,
# clip_g.safetensors; t5xxl_fp16.safetensors is "t5-file"); each encoder holds the tensors its own file does
FLUX_SD3_LAYOUTS = (
    "diffusers-flux",
    "diffusers-sd3",
    "diffusers-sd3-no-t5",
    "single-flux",
    "single-sd3",
    "single-sd3-no-t5",
    "clip-l-file",
    "clip-g-file",
    "flux-transformer",  # Black Forest Labs' flux1-dev.safetensors: the transformer alone
    "sd3-transformer",  # an SD3.x file without its text encoders
)
LAYOUTS = (
    "diffusers-sd1",
    "diffusers-sd1-prefixed",
    "diffusers-sd1-fp16-variant",
    "diffusers-sd2",
    "diffusers-sdxl",
    "diffusers-sdxl-refiner",
    "transformers-clip",
    "transformers-t5",
    "t5-file",
    "single-sd1",
    "single-sd1-old",
    "single-sd2",
    "single-sdxl",
    "single-sdxl-refiner",
    "ckpt-sd1",
    *FLUX_SD3_LAYOUTS,
)
# layouts that hold no text encoder: every command refuses them, naming the encoder files to patch instead
NO_ENCODER_LAYOUTS = ("flux-transformer", "sd3-transformer")
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

# toy sizes: (hidden, intermediate, layers) per encoder role
CLIP_L = (32, 64, 2)
OPENCLIP_H = (48, 96, 3)
BIGG = (40, 80, 2)
T5 = (32, 64, 2)  # CLIP-L's toy sizes: a T5 patch and a CLIP file meet by kind, not by shape


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * 0.02


def hf_text_encoder(dims: tuple[int, int, int], g: torch.Generator, vocab: int = 64) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel state dict (no ``text_model.`` prefix), random values."""
    h, inter, n = dims
    sd = {
        "embeddings.token_embedding.weight": _rand(g, vocab, h),
        "embeddings.position_embedding.weight": _rand(g, 77, h),
        "final_layer_norm.weight": torch.ones(h),
        "final_layer_norm.bias": torch.zeros(h),
    }
    for i in range(n):
        p = f"encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[p + f"self_attn.{proj}.weight"] = _rand(g, h, h)
            sd[p + f"self_attn.{proj}.bias"] = _rand(g, h)
        for ln in ("layer_norm1", "layer_norm2"):
            sd[p + f"{ln}.weight"], sd[p + f"{ln}.bias"] = torch.ones(h), torch.zeros(h)
        sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = _rand(g, inter, h), _rand(g, inter)
        sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = _rand(g, h, inter), _rand(g, h)
    return sd


def openclip_text_encoder(dims: tuple[int, int, int], g: torch.Generator, vocab: int = 64) -> dict[str, torch.Tensor]:
    """An OpenCLIP text tower state dict (``transformer.resblocks.{i}``), random values."""
    h, inter, n = dims
    sd = {
        "token_embedding.weight": _rand(g, vocab, h),
        "positional_embedding": _rand(g, 77, h),
        "ln_final.weight": torch.ones(h),
        "ln_final.bias": torch.zeros(h),
        "text_projection": _rand(g, h, h),
    }
    for i in range(n):
        p = f"transformer.resblocks.{i}."
        sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"] = _rand(g, 3 * h, h), _rand(g, 3 * h)
        sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"] = _rand(g, h, h), _rand(g, h)
        for ln in ("ln_1", "ln_2"):
            sd[p + f"{ln}.weight"], sd[p + f"{ln}.bias"] = torch.ones(h), torch.zeros(h)
        sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"] = _rand(g, inter, h), _rand(g, inter)
        sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"] = _rand(g, h, inter), _rand(g, h)
    return sd


def t5_text_encoder(dims: tuple[int, int, int], g: torch.Generator, vocab: int = 64) -> dict[str, torch.Tensor]:
    """A transformers T5EncoderModel (T5 v1.1, gated GELU) state dict as its files store it, random values: no
    biases anywhere, relative attention buckets in block 0 only, ``shared`` the token embedding."""
    h, inter, n = dims
    heads = 2
    sd = {"shared.weight": _rand(g, vocab, h), "encoder.final_layer_norm.weight": torch.ones(h)}
    for i in range(n):
        p = f"encoder.block.{i}."
        for proj in ("q", "k", "v", "o"):
            sd[p + f"layer.0.SelfAttention.{proj}.weight"] = _rand(g, h, h)
        if i == 0:
            sd[p + "layer.0.SelfAttention.relative_attention_bias.weight"] = _rand(g, 32, heads)
        sd[p + "layer.0.layer_norm.weight"], sd[p + "layer.1.layer_norm.weight"] = torch.ones(h), torch.ones(h)
        for proj in ("wi_0", "wi_1"):
            sd[p + f"layer.1.DenseReluDense.{proj}.weight"] = _rand(g, inter, h)
        sd[p + "layer.1.DenseReluDense.wo.weight"] = _rand(g, h, inter)
    return sd


def _t5_config(dims: tuple[int, int, int]) -> dict[str, object]:
    h, inter, n = dims
    return {
        "architectures": ["T5EncoderModel"],
        "model_type": "t5",
        "d_model": h,
        "d_ff": inter,
        "d_kv": h // 2,
        "num_heads": 2,
        "num_layers": n,
        "vocab_size": 64,
        "feed_forward_proj": "gated-gelu",
        "is_encoder_decoder": False,
        "relative_attention_num_buckets": 32,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "torch_dtype": "float32",
    }


def _prefixed(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in sd.items()}


def _unet_vae(g: torch.Generator, sdxl: bool = False) -> dict[str, torch.Tensor]:
    sd = {
        "model.diffusion_model.input_blocks.0.0.weight": _rand(g, 8, 4, 3, 3),
        "model.diffusion_model.input_blocks.0.0.bias": _rand(g, 8),
        "first_stage_model.encoder.conv_in.weight": _rand(g, 8, 3, 3, 3),
        "first_stage_model.decoder.conv_out.weight": _rand(g, 3, 8, 3, 3),
    }
    if sdxl:
        sd["model.diffusion_model.label_emb.0.0.weight"] = _rand(g, 8, 16)
    return sd


def _clip_config(dims: tuple[int, int, int], hidden_act: str = "quick_gelu") -> dict[str, object]:
    h, inter, n = dims
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "hidden_size": h,
        "intermediate_size": inter,
        "num_hidden_layers": n,
        "num_attention_heads": 4,
        "vocab_size": 64,
        "max_position_embeddings": 77,
        "hidden_act": hidden_act,
        "projection_dim": h,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
        "torch_dtype": "float32",
    }


def _save(sd: dict[str, torch.Tensor], path: Path, dtype: str) -> None:
    """Every tensor in ``dtype``, except T5's ``wo``, kept float32 as transformers keeps it (fp16 overflows there)."""
    from safetensors.torch import save_file

    def stored(key: str) -> torch.dtype:
        return torch.float32 if key.endswith(".DenseReluDense.wo.weight") else _DTYPES[dtype]

    save_file({k: v.to(stored(k)).contiguous() for k, v in sd.items()}, str(path), metadata={"format": "pt"})


def _encoder_folder(
    folder: Path, sd: dict[str, torch.Tensor], config: dict[str, object], dtype: str, name: str = "model.safetensors"
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    _save(sd, folder / name, dtype)


def _edit(sd: dict[str, torch.Tensor], layers: list[int], seed: int) -> None:
    """Perturb the FFN weights of ``layers`` in place, as an erasing tool would."""
    g = _gen(seed + 1000)
    for k in sorted(sd):
        if any(
            f"layers.{i}.mlp." in k or f"resblocks.{i}.mlp." in k or f"block.{i}.layer.1.DenseReluDense." in k
            for i in layers
        ):
            sd[k] = sd[k] + _rand(g, *sd[k].shape) * 0.5


def make_checkpoint(
    path: str | Path,
    layout: str,
    dtype: str = "F32",
    seed: int = 0,
    edit_layers: list[int] | None = None,
    edit_seed: int = 0,
) -> Path:
    """Write a tiny checkpoint of ``layout`` (see :data:`LAYOUTS`) at ``path`` and return the path.

    ``edit_layers`` perturbs those FFN layers (same seed otherwise), giving an "edited" model to diff;
    ``edit_seed`` picks another perturbation of the same base.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    path = Path(path)
    if layout in FLUX_SD3_LAYOUTS:
        return _make_flux_sd3(path, layout, dtype, lambda kind: _encoder_alone(kind, seed, edit_layers, edit_seed))
    g = _gen(seed)

    def enc(kind: str) -> dict[str, torch.Tensor]:
        if kind == "T5":
            sd = t5_text_encoder(T5, g)
        elif kind == "L":
            sd = hf_text_encoder(CLIP_L, g)
        else:
            sd = openclip_text_encoder(OPENCLIP_H if kind == "H" else BIGG, g)
        if edit_layers:
            _edit(sd, edit_layers, seed + 7919 * edit_seed)
        return sd

    if layout.startswith("diffusers"):
        path.mkdir(parents=True, exist_ok=True)
        comps: dict[str, list[str | None]] = {
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }
        cls = "StableDiffusionPipeline"
        if layout in ("diffusers-sd1", "diffusers-sd1-prefixed", "diffusers-sd1-fp16-variant"):
            sd = enc("L")
            if layout == "diffusers-sd1-prefixed":
                sd = _prefixed(sd, "text_model.")
            _encoder_folder(path / "text_encoder", sd, _clip_config(CLIP_L), dtype)
            if layout == "diffusers-sd1-fp16-variant":
                _save(sd, path / "text_encoder" / "model.fp16.safetensors", "F16")
            comps["text_encoder"] = ["transformers", "CLIPTextModel"]
        elif layout == "diffusers-sd2":
            _encoder_folder(
                path / "text_encoder", _hf_from(enc("H"), OPENCLIP_H), _clip_config(OPENCLIP_H, "gelu"), dtype
            )
            comps["text_encoder"] = ["transformers", "CLIPTextModel"]
        else:
            cls = "StableDiffusionXLPipeline" if layout == "diffusers-sdxl" else "StableDiffusionXLImg2ImgPipeline"
            if layout == "diffusers-sdxl":
                _encoder_folder(path / "text_encoder", enc("L"), _clip_config(CLIP_L), dtype)
                comps["text_encoder"] = ["transformers", "CLIPTextModel"]
            else:
                comps["text_encoder"] = [None, None]
            cfg = _clip_config(BIGG, "gelu") | {"architectures": ["CLIPTextModelWithProjection"]}
            _encoder_folder(path / "text_encoder_2", _hf_from(enc("G"), BIGG), cfg, dtype)
            comps["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
        (path / "model_index.json").write_text(
            json.dumps({"_class_name": cls, "_diffusers_version": "0.42.1", **comps}, indent=1)
        )
        return path
    if layout == "transformers-clip":
        _encoder_folder(path, enc("L"), _clip_config(CLIP_L), dtype)
        return path
    if layout == "transformers-t5":
        _encoder_folder(path, enc("T5"), _t5_config(T5), dtype)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout in ("single-sd1", "ckpt-sd1"):
        sd = _prefixed(enc("L"), "cond_stage_model.transformer.text_model.") | _unet_vae(g)
    elif layout == "single-sd1-old":
        sd = _prefixed(enc("L"), "cond_stage_model.transformer.") | _unet_vae(g)
    elif layout == "t5-file":  # t5xxl_fp16.safetensors, as ComfyUI users keep it
        sd = enc("T5")
    elif layout == "single-sd2":
        sd = _prefixed(enc("H"), "cond_stage_model.model.") | _unet_vae(g)
    elif layout == "single-sdxl":
        sd = (
            _prefixed(enc("L"), "conditioner.embedders.0.transformer.text_model.")
            | _prefixed(enc("G"), "conditioner.embedders.1.model.")
            | _unet_vae(g, sdxl=True)
        )
    else:  # single-sdxl-refiner
        sd = _prefixed(enc("G"), "conditioner.embedders.0.model.") | _unet_vae(g, sdxl=True)
    if layout == "ckpt-sd1":
        torch.save({"state_dict": {k: v.to(_DTYPES[dtype]) for k, v in sd.items()}, "global_step": 1}, path)
    else:
        _save(sd, path, dtype)
    return path


def _encoder_alone(kind: str, seed: int, edit_layers: list[int] | None, edit_seed: int) -> dict[str, torch.Tensor]:
    """One encoder ("L", "G" in transformers naming, "T5") drawn from ``seed`` alone: the same tensors in a pipeline
    as in the encoder's own file ("transformers-clip", "t5-file", "clip-l-file", "clip-g-file"), so that a patch of
    the one fits the other exactly."""
    g = _gen(seed)
    if kind == "T5":
        sd = t5_text_encoder(T5, g)
    elif kind == "L":
        sd = hf_text_encoder(CLIP_L, g)
    else:
        sd = openclip_text_encoder(BIGG, g)
    if edit_layers:
        _edit(sd, edit_layers, seed + 7919 * edit_seed)
    return _hf_from(sd, BIGG) if kind == "G" else sd


# placeholders for what erasekit's file operations never read (the transformer, the VAE): a few tensors named as
# the real ones are, enough for a folder to be complete and a single file to be told from others by its keys
_FLUX_TRANSFORMER = ("double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight", "img_in.weight")
_SD3_TRANSFORMER = ("joint_blocks.0.x_block.attn.qkv.weight", "x_embedder.proj.weight")
_VAE = ("encoder.conv_in.weight", "decoder.conv_out.weight")


def _placeholders(names: tuple[str, ...], prefix: str = "") -> dict[str, torch.Tensor]:
    g = _gen(99)
    return {prefix + n: _rand(g, 8, 4) for n in names}


def _make_flux_sd3(path: Path, layout: str, dtype: str, enc: Callable[[str], dict[str, torch.Tensor]]) -> Path:
    """A FLUX.1 or SD3.x checkpoint of ``layout`` (see :data:`FLUX_SD3_LAYOUTS`), or an encoder file beside one."""
    flux = "flux" in layout
    kinds = ("L", "T5") if flux else ("L", "G") if layout.endswith("no-t5") else ("L", "G", "T5")
    transformer = _FLUX_TRANSFORMER if flux else _SD3_TRANSFORMER
    if layout.startswith("diffusers"):
        return _flux_sd3_folder(path, flux, kinds, dtype, enc)
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout in ("clip-l-file", "clip-g-file"):  # ComfyUI's models/text_encoders/clip_l.safetensors
        sd = _prefixed(enc("L" if layout == "clip-l-file" else "G"), "text_model.")
    elif layout.endswith("-transformer"):
        sd = _placeholders(transformer, "" if flux else "model.diffusion_model.")
    else:  # ComfyUI's all-in-one checkpoints (SD3.5's, and ComfyUI's saves of FLUX.1)
        prefixes = {
            "L": "text_encoders.clip_l.transformer.",
            "G": "text_encoders.clip_g.transformer.",
            "T5": "text_encoders.t5xxl.transformer.",
        }
        sd = {k: v for kind in kinds for k, v in _prefixed(_with_root(enc(kind), kind), prefixes[kind]).items()}
        sd |= _placeholders(transformer, "model.diffusion_model.") | _placeholders(_VAE, "first_stage_model.")
    _save(sd, path, dtype)
    return path


def _with_root(sd: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """A CLIP encoder's tensors below ``text_model.``, as a whole CLIPTextModel names them (T5's have no root)."""
    return sd if kind == "T5" else _prefixed(sd, "text_model.")


def _flux_sd3_folder(
    path: Path, flux: bool, kinds: tuple[str, ...], dtype: str, enc: Callable[[str], dict[str, torch.Tensor]]
) -> Path:
    components = ("text_encoder", "text_encoder_2") if flux else ("text_encoder", "text_encoder_2", "text_encoder_3")
    index: dict[str, object] = {
        "_class_name": "FluxPipeline" if flux else "StableDiffusion3Pipeline",
        "_diffusers_version": "0.42.1",
        "transformer": ["diffusers", "FluxTransformer2DModel" if flux else "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    for component, kind in itertools.zip_longest(components, kinds):
        if kind is None:  # SD3.x without its T5
            index[component] = [None, None]
            continue
        if kind == "T5":
            config = _t5_config(T5)
        else:
            config = _clip_config(CLIP_L if kind == "L" else BIGG, "quick_gelu" if kind == "L" else "gelu")
            if not flux or kind == "G":
                config["architectures"] = ["CLIPTextModelWithProjection"]
        _encoder_folder(path / component, enc(kind), config, dtype)
        index[component] = ["transformers", str(config["architectures"][0])]  # type: ignore[index]
    for part, names in (("transformer", _FLUX_TRANSFORMER if flux else _SD3_TRANSFORMER), ("vae", _VAE)):
        (path / part).mkdir(parents=True, exist_ok=True)
        (path / part / "config.json").write_text(json.dumps({"_class_name": index[part][1]}))  # type: ignore[index]
        _save(_placeholders(names), path / part / "diffusion_pytorch_model.safetensors", dtype)
    (path / "model_index.json").write_text(json.dumps(index, indent=1))
    return path


def _hf_from(oc: dict[str, torch.Tensor], dims: tuple[int, int, int]) -> dict[str, torch.Tensor]:
    """The same OpenCLIP tower in transformers naming (how diffusers stores SD2/SDXL encoders)."""
    g = _gen(7)
    sd = hf_text_encoder(dims, g)
    h, _, n = dims
    for i in range(n):
        for a, b in (("fc1", "c_fc"), ("fc2", "c_proj")):
            for kind in ("weight", "bias"):
                sd[f"encoder.layers.{i}.mlp.{a}.{kind}"] = oc[f"transformer.resblocks.{i}.mlp.{b}.{kind}"]
        q, k, v = oc[f"transformer.resblocks.{i}.attn.in_proj_weight"].chunk(3)
        sd[f"encoder.layers.{i}.self_attn.q_proj.weight"] = q
        sd[f"encoder.layers.{i}.self_attn.k_proj.weight"] = k
        sd[f"encoder.layers.{i}.self_attn.v_proj.weight"] = v
    sd["embeddings.token_embedding.weight"] = oc["token_embedding.weight"]
    assert h == oc["ln_final.weight"].shape[0]
    return sd


def main(argv: list[str] | None = None) -> int:
    import argparse

    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m erasekit.testing", description="Write a tiny random checkpoint.")
    ap.add_argument("layout", choices=LAYOUTS)
    ap.add_argument("path")
    ap.add_argument("--dtype", choices=sorted(_DTYPES), default="F32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--edit-layers", type=int, nargs="*", help="perturb these FFN layers (an 'edited' model)")
    ap.add_argument("--edit-seed", type=int, default=0, help="another perturbation of the same base")
    args = ap.parse_args(argv)
    print(make_checkpoint(args.path, args.layout, args.dtype, args.seed, args.edit_layers, args.edit_seed))
    return 0


# -- tiny runnable pipelines (for erase/generate tests) --------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def byte_level_tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIPTokenizer with only the 512 byte tokens and no merges: every word becomes byte pieces.

    Tiny and offline; real CLIP vocabularies only change how words are split.
    """
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def add_to_hub_cache(
    cache_dir: str | Path,
    repo_id: str,
    folder: str | Path,
    commit: str = "a" * 40,
    ref: str | None = "main",
    only: tuple[str, ...] | None = None,
) -> Path:
    """Lay ``folder`` into a Hugging Face cache as huggingface_hub lays out a download: each file a
    content-addressed blob under ``models--ORG--NAME/blobs/``, ``snapshots/<commit>/<path>`` a relative symlink
    to it, and ``refs/<ref>`` holding the commit. ``only``: the top-level entries to copy (a partial download).
    Returns the snapshot folder."""
    import hashlib

    repo_dir = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snap = repo_dir / "snapshots" / commit
    for src in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        rel = src.relative_to(folder)
        if only is not None and rel.parts[0] not in only:
            continue
        data = src.read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref is not None:
        (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)
    return snap


def make_tiny_pipeline(
    path: str | Path, arch: str = "sd1", seed: int = 0, prediction_type: str = "epsilon", clip_vocab: bool = False
) -> Path:
    """Write a tiny runnable diffusers pipeline folder (random weights, 32x32 images, 8x8 latents).

    ``arch``: "sd1" (CLIP-style quick_gelu encoder), "sd2" (gelu encoder, like SD2.x), "sdxl" (two encoders,
    the second with a projection, and a UNet with SDXL's text-time conditioning), "flux" (FLUX.1-dev: CLIP-L and
    T5, a transformer with a guidance embedding), "flux-schnell" (without one) or "sd3" (two CLIPs and T5): see
    :func:`_make_tiny_flow` for the last three.
    ``clip_vocab``: use the real 49408-token CLIP tokenizer that erasekit ships (sd1/sd2), as the bundled
    single-file configs do, instead of a 514-token byte-level one.
    """
    import tempfile

    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if arch not in ("sd1", "sd2", "sdxl", *FLOW_ARCHS):
        raise ValueError(f"unknown arch {arch!r}; choose sd1, sd2, sdxl, {', '.join(FLOW_ARCHS)}")
    if arch in FLOW_ARCHS:
        return _make_tiny_flow(Path(path), arch, seed)
    if arch == "sdxl":
        return _make_tiny_sdxl(Path(path), seed)
    path = Path(path)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        if clip_vocab:
            from transformers import CLIPTokenizer

            from ..checkpoints.model_configs import TOKENIZER_DIR

            tokenizer = CLIPTokenizer.from_pretrained(
                TOKENIZER_DIR, pad_token="!" if arch == "sd2" else "<|endoftext|>"
            )
        else:
            tokenizer = byte_level_tokenizer(Path(tmp))
        te = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                hidden_act="quick_gelu" if arch == "sd1" else "gelu",
                projection_dim=32,
                bos_token_id=len(tokenizer) - 2,
                eos_token_id=len(tokenizer) - 1,
                pad_token_id=len(tokenizer) - 1,
            )
        )
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=4,
            norm_num_groups=16,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=(16, 32, 32),
            layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            norm_num_groups=16,
            sample_size=32,
        )
        scheduler = DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            prediction_type=prediction_type,
        )
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=te,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(path)  # type: ignore[attr-defined]  # a DiffusionPipeline method diffusers' types hide
    return path


def _make_tiny_sdxl(path: Path, seed: int) -> Path:
    import tempfile

    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tok = byte_level_tokenizer(Path(tmp))
        n = len(tok)

        def cfg(act: str, width: int) -> CLIPTextConfig:
            return CLIPTextConfig(
                vocab_size=n,
                hidden_size=width,
                intermediate_size=2 * width,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                hidden_act=act,
                projection_dim=32,
                bos_token_id=n - 2,
                eos_token_id=n - 1,
                pad_token_id=n - 1,
            )

        # two widths, as in SDXL (768 and 1280): diffusers tells the encoders of a single file apart by width
        te1, te2 = CLIPTextModel(cfg("quick_gelu", 32)), CLIPTextModelWithProjection(cfg("gelu", 40))
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 1),
            projection_class_embeddings_input_dim=6 * 8 + 32,
            cross_attention_dim=32 + 40,
            norm_num_groups=16,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=(16, 32, 32),
            layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            norm_num_groups=16,
            sample_size=32,
        )
        sched = EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            steps_offset=1,
            timestep_spacing="leading",
        )
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=sched
        )
        pipe.save_pretrained(path)  # type: ignore[attr-defined]  # a DiffusionPipeline method diffusers' types hide
    return path


FLOW_ARCHS = ("flux", "flux-schnell", "sd3")  # the flow-matching families' tiny pipelines
TINY_T5 = (80, 96, 2)  # wider than both tiny CLIPs together, as SD3.x's T5 is (SD3 pads the CLIPs' 72 to 80)


def _tiny_clip(width: int, act: str, with_projection: bool) -> Any:
    """A CLIP text encoder of ``width`` for the toy world's tokenizer (its 49408 tokens)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=32,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModelWithProjection(config) if with_projection else CLIPTextModel(config)


def _tiny_t5(vocab_size: int) -> Any:
    """A T5 v1.1 encoder (gated GELU, no biases) of :data:`TINY_T5` sizes."""
    from transformers import T5Config, T5EncoderModel

    width, ffn, layers = TINY_T5
    config = T5Config(
        vocab_size=vocab_size,
        d_model=width,
        d_ff=ffn,
        d_kv=16,
        num_heads=2,
        num_layers=layers,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=8,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config)


def _tiny_flow_vae(latent_channels: int, shift: float, scale: float) -> Any:
    """An AutoencoderKL that takes 32x32 images to 8x8 latents, with a FLUX/SD3 VAE's shift and scaling factors
    (the values of the real ones' configs) and without their quant convs."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=16,
        sample_size=32,
        shift_factor=shift,
        scaling_factor=scale,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _make_tiny_flow(path: Path, arch: str, seed: int) -> Path:
    """A tiny FLUX.1 ("flux": dev, with a guidance embedding; "flux-schnell": without) or SD3.x ("sd3") pipeline
    folder, as diffusers' own tests build them: a one-block transformer, a VAE with 4 latent channels (FLUX packs
    them 2x2 into 16), ``FlowMatchEulerDiscreteScheduler`` (FLUX-dev's resolution-dependent shift; SD3's shift 3),
    CLIP encoders with the toy world's CLIP tokenizer and a T5 with the counted T5 tokenizer
    (:mod:`erasekit.toyworld.t5_tokenizer`). 32x32 images, 8x8 latents."""
    import shutil
    import tempfile

    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTokenizer

    from ..toyworld import builtin_model_path
    from ..toyworld.t5_tokenizer import t5_tokenizer

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        clip_dir = Path(tmp) / "clip"
        shutil.copytree(builtin_model_path() / "tokenizer", clip_dir)
        clip_tok = CLIPTokenizer.from_pretrained(clip_dir)
    t5_tok = t5_tokenizer()
    t5 = _tiny_t5(len(t5_tok))
    pipe: Any
    if arch.startswith("flux"):
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=TINY_T5[0],
            pooled_projection_dim=32,
            axes_dims_rope=(4, 4, 8),
            guidance_embeds=arch == "flux",
        )
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0 if arch == "flux" else 1.0, use_dynamic_shifting=arch == "flux"
        )
        pipe = FluxPipeline(
            scheduler=scheduler,
            vae=_tiny_flow_vae(4, 0.1159, 0.3611),
            text_encoder=_tiny_clip(32, "quick_gelu", with_projection=False),
            tokenizer=clip_tok,
            text_encoder_2=t5,
            tokenizer_2=t5_tok,
            transformer=transformer,
        )
    else:
        sd3 = SD3Transformer2DModel(
            sample_size=8,
            patch_size=1,
            in_channels=4,
            num_layers=1,
            attention_head_dim=8,
            num_attention_heads=4,
            caption_projection_dim=32,
            joint_attention_dim=TINY_T5[0],
            pooled_projection_dim=64,
            out_channels=4,
            pos_embed_max_size=16,
        )
        pipe = StableDiffusion3Pipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=_tiny_flow_vae(4, 0.0609, 1.5305),
            text_encoder=_tiny_clip(32, "quick_gelu", with_projection=True),
            tokenizer=clip_tok,
            text_encoder_2=_tiny_clip(40, "gelu", with_projection=True),
            tokenizer_2=clip_tok,
            text_encoder_3=t5,
            tokenizer_3=t5_tok,
            transformer=sd3,
        )
    pipe.save_pretrained(path)
    return path


# -- diffusers folder -> original (LDM/A1111/ComfyUI) single file ----------------------------------
# The inverse of diffusers' single-file conversion, after diffusers' scripts/
# convert_diffusers_to_original_stable_diffusion.py, but built from the folder's configs (any number of
# levels and layers per block) and strict: a tensor no rule maps is an error, never copied under its own name.

_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_SAME: dict[str, str] = {}  # leaf names kept as they are (transformer blocks, samplers, top-level convs)


def _unet_rules(cfg: dict[str, object], keys: list[str]) -> list[tuple[str, str, dict[str, str]]]:
    """(diffusers prefix, LDM prefix, leaf renames) for a UNet2DConditionModel of SD1.x/SD2.x shape."""
    per = int(cfg["layers_per_block"]) + 1  # type: ignore[call-overload]  # LDM blocks per level: resnets + a sampler slot
    rules = [
        ("time_embedding.linear_1.", "time_embed.0.", _SAME),
        ("time_embedding.linear_2.", "time_embed.2.", _SAME),
        ("conv_in.", "input_blocks.0.0.", _SAME),
        ("conv_norm_out.", "out.0.", _SAME),
        ("conv_out.", "out.2.", _SAME),
        ("mid_block.resnets.0.", "middle_block.0.", _UNET_RESNET),
        ("mid_block.attentions.0.", "middle_block.1.", _SAME),
        ("mid_block.resnets.1.", "middle_block.2.", _UNET_RESNET),
    ]
    for i in range(len(cfg["block_out_channels"])):  # type: ignore[arg-type]
        for j in range(per - 1):
            rules += [
                (f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{per * i + j + 1}.0.", _UNET_RESNET),
                (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{per * i + j + 1}.1.", _SAME),
            ]
        rules.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{per * (i + 1)}.0.op.", _SAME))
        for j in range(per):
            rules += [
                (f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{per * i + j}.0.", _UNET_RESNET),
                (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{per * i + j}.1.", _SAME),
            ]
        slot = 2 if any(k.startswith(f"up_blocks.{i}.attentions.") for k in keys) else 1  # after the attention, if any
        rules.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{per * i + per - 1}.{slot}.", _SAME))
    if cfg.get("addition_embed_type") == "text_time":  # SDXL's size/pooled-text conditioning
        rules += [
            ("add_embedding.linear_1.", "label_emb.0.0.", _SAME),
            ("add_embedding.linear_2.", "label_emb.0.2.", _SAME),
        ]
    return rules


def _vae_rules(cfg: dict[str, object]) -> list[tuple[str, str, dict[str, str]]]:
    """(diffusers prefix, LDM prefix, leaf renames) for an AutoencoderKL; LDM numbers decoder levels bottom-up."""
    n = len(cfg["block_out_channels"])  # type: ignore[arg-type]
    per = int(cfg["layers_per_block"])  # type: ignore[call-overload]
    rules = [
        (f"{p}", f"{p}", _SAME)
        for p in (
            "quant_conv.",
            "post_quant_conv.",
            "encoder.conv_in.",
            "encoder.conv_out.",
            "decoder.conv_in.",
            "decoder.conv_out.",
        )
    ]
    for part in ("encoder", "decoder"):
        rules += [
            (f"{part}.conv_norm_out.", f"{part}.norm_out.", _SAME),
            (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", _VAE_ATTN),
        ]
        rules += [(f"{part}.mid_block.resnets.{j}.", f"{part}.mid.block_{j + 1}.", _VAE_RESNET) for j in range(2)]
    for i in range(n):
        rules += [
            (f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", _VAE_RESNET) for j in range(per)
        ]
        rules += [
            (f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{n - 1 - i}.block.{j}.", _VAE_RESNET)
            for j in range(per + 1)
        ]
        rules += [
            (f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.", _SAME),
            (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{n - 1 - i}.upsample.", _SAME),
        ]
    return rules


def _to_ldm(
    sd: dict[str, torch.Tensor], rules: list[tuple[str, str, dict[str, str]]], prefix: str, what: str
) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        match = [(src, dst, leaves) for src, dst, leaves in rules if key.startswith(src)]
        if len(match) != 1:
            raise ValueError(f"{what} tensor {key!r} matches {len(match)} conversion rules, expected 1")
        src, dst, leaves = match[0]
        rest = key[len(src) :]
        for old, new in leaves.items():
            if rest.startswith(old + "."):
                rest = new + rest[len(old) :]
                if leaves is _VAE_ATTN and value.ndim == 2:
                    value = value.reshape(*value.shape, 1, 1)  # LDM's VAE attention projections are 1x1 convs
                break
        else:
            if leaves is not _SAME:
                raise ValueError(f"{what} tensor {key!r} has no LDM name for {rest.split('.')[0]!r}")
        out[prefix + dst + rest] = value
    return out


def _to_openclip(te: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIP text encoder under OpenCLIP's names (SD2.x, SDXL's second encoder): q/k/v fused into
    ``in_proj``, ``c_fc``/``c_proj``, ``ln_1``/``ln_2``, ``text_projection`` transposed."""
    te = {k.removeprefix("text_model."): v for k, v in te.items() if not k.endswith("position_ids")}
    out = {
        prefix + "token_embedding.weight": te.pop("embeddings.token_embedding.weight"),
        prefix + "positional_embedding": te.pop("embeddings.position_embedding.weight"),
        prefix + "ln_final.weight": te.pop("final_layer_norm.weight"),
        prefix + "ln_final.bias": te.pop("final_layer_norm.bias"),
    }
    if "text_projection.weight" in te:
        out[prefix + "text_projection"] = te.pop("text_projection.weight").T.contiguous()
    layers = 1 + max(int(k.split(".")[2]) for k in te if k.startswith("encoder.layers."))
    names = {
        "layer_norm1": "ln_1",
        "layer_norm2": "ln_2",
        "self_attn.out_proj": "attn.out_proj",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
    }
    for i in range(layers):
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([te.pop(f"{src}self_attn.{p}_proj.{kind}") for p in "qkv"])
            for old, new in names.items():
                out[f"{dst}{new}.{kind}"] = te.pop(f"{src}{old}.{kind}")
    if te:
        raise ValueError(f"text encoder tensors with no OpenCLIP name: {sorted(te)[:3]}")
    return out


def save_single_file(pipeline_dir: str | Path, out_path: str | Path, fmt: str = "safetensors") -> Path:
    """Write the diffusers pipeline folder at ``pipeline_dir`` (as :func:`make_tiny_pipeline` writes it) as
    ONE original-layout checkpoint, the layout A1111/ComfyUI files have: ``model.diffusion_model.*`` (UNet),
    ``first_stage_model.*`` (VAE) and the text encoders: SD1.x ``cond_stage_model.transformer.text_model.*``,
    SD2.x ``cond_stage_model.model.*`` (OpenCLIP names), SDXL ``conditioner.embedders.0.transformer.text_model.*``
    and ``conditioner.embedders.1.model.*``.

    ``fmt``: "safetensors", or "ckpt" (a torch pickle holding ``{"state_dict": ...}``). Values are copied
    bit for bit; only names change (and the VAE attention weights gain the 1x1 conv dims).
    """
    from safetensors.torch import load_file, save_file

    if fmt not in ("safetensors", "ckpt"):
        raise ValueError(f"unknown fmt {fmt!r}; choose safetensors or ckpt")
    src, out_path = Path(pipeline_dir), Path(out_path)

    def part(name: str, weights: str) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
        cfg = json.loads((src / name / "config.json").read_text())
        return load_file(str(src / name / weights)), cfg

    unet, unet_cfg = part("unet", "diffusion_pytorch_model.safetensors")
    vae, vae_cfg = part("vae", "diffusion_pytorch_model.safetensors")
    te, te_cfg = part("text_encoder", "model.safetensors")
    if (src / "text_encoder_2").is_dir():  # SDXL base
        te2, _ = part("text_encoder_2", "model.safetensors")
        encoders = {
            "conditioner.embedders.0.transformer.text_model." + k.removeprefix("text_model."): v for k, v in te.items()
        } | _to_openclip(te2, "conditioner.embedders.1.model.")
    elif te_cfg.get("hidden_act") == "gelu":  # SD2.x: OpenCLIP ViT-H
        encoders = _to_openclip(te, "cond_stage_model.model.")
    else:
        encoders = {
            "cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v for k, v in te.items()
        }
    unet_ldm = _to_ldm(unet, _unet_rules(unet_cfg, list(unet)), "model.diffusion_model.", "UNet")
    vae_ldm = _to_ldm(vae, _vae_rules(vae_cfg), "first_stage_model.", "VAE")
    sd = unet_ldm | vae_ldm | encoders
    assert len(sd) == len(unet_ldm) + len(vae_ldm) + len(encoders), "two tensors were given the same LDM name"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.contiguous() for k, v in sd.items()}
    if fmt == "ckpt":
        torch.save({"state_dict": sd}, out_path)
    else:
        save_file(sd, str(out_path), metadata={"format": "pt"})
    return out_path


# -- FLUX.1 / SD3.x diffusers folder -> the single files their users keep ------------------------------------------
# The transformer's original keys (Black Forest Labs' for FLUX.1, Stability's MMDiT for SD3.x) with their shapes, for
# a transformer config of any size; the values come from the folder through diffusers' own conversion, inverted.


def _flux_original_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of a FLUX.1 transformer as Black Forest Labs' files name it, for the diffusers ``cfg``."""
    h = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    head, mlp, chans = cfg["attention_head_dim"], 4 * h, cfg["in_channels"]
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, out: int, inp: int) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (out, inp), (out,)

    linear("img_in", h, chans)
    linear("txt_in", h, cfg["joint_attention_dim"])
    for embedder, width in (("time_in", 256), ("vector_in", cfg["pooled_projection_dim"]), ("guidance_in", 256)):
        if embedder != "guidance_in" or cfg.get("guidance_embeds"):
            linear(f"{embedder}.in_layer", h, width)
            linear(f"{embedder}.out_layer", h, h)
    for i in range(cfg["num_layers"]):
        for stream in ("img", "txt"):
            b = f"double_blocks.{i}.{stream}"
            linear(f"{b}_mod.lin", 6 * h, h)
            linear(f"{b}_attn.qkv", 3 * h, h)
            linear(f"{b}_attn.proj", h, h)
            linear(f"{b}_mlp.0", mlp, h)
            linear(f"{b}_mlp.2", h, mlp)
            shapes[f"{b}_attn.norm.query_norm.scale"] = shapes[f"{b}_attn.norm.key_norm.scale"] = (head,)
    for i in range(cfg["num_single_layers"]):
        b = f"single_blocks.{i}"
        linear(f"{b}.linear1", 3 * h + mlp, h)
        linear(f"{b}.linear2", h, h + mlp)
        linear(f"{b}.modulation.lin", 3 * h, h)
        shapes[f"{b}.norm.query_norm.scale"] = shapes[f"{b}.norm.key_norm.scale"] = (head,)
    linear("final_layer.linear", cfg["patch_size"] ** 2 * (cfg.get("out_channels") or chans), h)
    linear("final_layer.adaLN_modulation.1", 2 * h, h)
    return shapes


def _sd3_original_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of an SD3.x MMDiT as Stability's files name it (below ``model.diffusion_model.``)."""
    h, head, p = cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["attention_head_dim"], cfg["patch_size"]
    n, dual, qk = cfg["num_layers"], set(cfg.get("dual_attention_layers") or ()), bool(cfg.get("qk_norm"))
    shapes: dict[str, tuple[int, ...]] = {"pos_embed": (1, cfg["pos_embed_max_size"] ** 2, h)}

    def linear(name: str, out: int, inp: int) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (out, inp), (out,)

    def attention(name: str, proj: bool) -> None:
        linear(f"{name}.qkv", 3 * h, h)
        if proj:
            linear(f"{name}.proj", h, h)
        if qk:
            shapes[f"{name}.ln_q.weight"] = shapes[f"{name}.ln_k.weight"] = (head,)

    shapes["x_embedder.proj.weight"], shapes["x_embedder.proj.bias"] = (h, cfg["in_channels"], p, p), (h,)
    linear("t_embedder.mlp.0", h, 256)
    linear("t_embedder.mlp.2", h, h)
    linear("y_embedder.mlp.0", h, cfg["pooled_projection_dim"])
    linear("y_embedder.mlp.2", h, h)
    linear("context_embedder", cfg["caption_projection_dim"], cfg["joint_attention_dim"])
    for i in range(n):
        x, c, last = f"joint_blocks.{i}.x_block", f"joint_blocks.{i}.context_block", i == n - 1
        attention(f"{x}.attn", True)
        linear(f"{x}.adaLN_modulation.1", (9 if i in dual else 6) * h, h)
        linear(f"{x}.mlp.fc1", 4 * h, h)
        linear(f"{x}.mlp.fc2", h, 4 * h)
        if i in dual:
            attention(f"{x}.attn2", True)
        attention(f"{c}.attn", not last)
        linear(f"{c}.adaLN_modulation.1", (2 if last else 6) * h, h)
        if not last:
            linear(f"{c}.mlp.fc1", 4 * h, h)
            linear(f"{c}.mlp.fc2", h, 4 * h)
    linear("final_layer.linear", p * p * cfg["out_channels"], h)
    linear("final_layer.adaLN_modulation.1", 2 * h, h)
    return shapes


def convert_flux_any_width(checkpoint: dict[str, torch.Tensor], **kwargs: Any) -> dict[str, torch.Tensor]:
    """diffusers' FLUX.1 transformer conversion for a transformer of any width: diffusers' own splits a single
    block's fused ``linear1`` at FLUX.1's width (3072), so tiny models are converted with the split moved to their
    width, every other tensor by diffusers. Real FLUX.1 files load with diffusers' own; tests put this one in its
    place (``SINGLE_FILE_LOADABLE_CLASSES``)."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers as convert

    sd = {k.removeprefix("model.diffusion_model."): v for k, v in checkpoint.items()}
    width = sd["img_in.weight"].shape[0]
    fused = {k: sd.pop(k) for k in [k for k in sd if ".linear1." in k]}
    for key, value in fused.items():  # what diffusers' split expects, never read
        sd[key] = torch.empty((3 * 3072 + 4 * 3072, *value.shape[1:]), device="meta")
    out = convert(sd, **kwargs)
    for key, value in fused.items():
        block, kind = f"single_transformer_blocks.{key.split('.')[1]}.", key.rsplit(".", 1)[1]
        q, k, v, mlp = torch.split(value, [width, width, width, value.shape[0] - 3 * width], dim=0)
        for name, part in (("attn.to_q", q), ("attn.to_k", k), ("attn.to_v", v), ("proj_mlp", mlp)):
            out[f"{block}{name}.{kind}"] = part.contiguous()
    return out


def _to_original(
    weights: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], convert: Callable[..., Any]
) -> dict[str, torch.Tensor]:
    """``weights`` (diffusers names) under the original names ``shapes`` lists, by running diffusers' conversion
    (``convert``: original -> diffusers) on the positions of every original element and putting each diffusers value
    back where it came from; every element must come from exactly one place."""
    dtype = next(iter(weights.values())).dtype
    positions, offset = {}, 0
    for key, shape in shapes.items():
        n = int(torch.tensor(shape).prod())
        positions[key] = torch.arange(offset, offset + n, dtype=torch.float64).reshape(shape)
        offset += n
    flat = torch.full((offset,), float("nan"), dtype=torch.float64)
    converted = convert(dict(positions))
    if set(converted) != set(weights):
        raise ValueError(f"conversion names differ: {sorted(set(converted) ^ set(weights))[:4]}")
    for key, where in converted.items():
        flat[where.flatten().long()] = weights[key].to(torch.float64).flatten()
    if flat.isnan().any() or sum(w.numel() for w in converted.values()) != offset:
        raise ValueError("the conversion does not use every original tensor exactly once")
    out, offset = {}, 0
    for key, shape in shapes.items():
        n = int(torch.tensor(shape).prod())
        out[key] = flat[offset : offset + n].reshape(shape).to(dtype).contiguous()
        offset += n
    return out


# the encoders' own files as ComfyUI users keep them (models/text_encoders/), and the name of each in an all-in-one file
_ENCODER_FILES = (("clip_l", "clip_l"), ("clip_g", "clip_g"), ("t5xxl_fp16", "t5xxl"))


def flow_single_files(pipeline_dir: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """The files users keep of the tiny FLUX.1 or SD3.x pipeline folder ``pipeline_dir`` (as :func:`make_tiny_pipeline`
    writes it), written into ``out_dir``, values copied bit for bit: ``"all-in-one"``, ComfyUI's checkpoint (the
    transformer under ``model.diffusion_model.`` in its original names, the VAE under ``first_stage_model.``, the
    encoders under ``text_encoders.clip_l.transformer.`` and the like); and the files kept apart, the encoders' with
    Hugging Face key names: for FLUX.1, as Black Forest Labs and ComfyUI users keep them, ``"transformer"``
    (``flux1-dev.safetensors``: the transformer alone, unprefixed), ``"vae"`` (``ae.safetensors``), ``"clip_l"`` and
    ``"t5"`` (``t5xxl_fp16.safetensors``); for SD3.x, as Stability AI ships them, ``"transformer"``
    (``sd3_medium.safetensors``: the transformer and the VAE, below ``model.diffusion_model.`` and
    ``first_stage_model.``), ``"clip_l"``, ``"clip_g"`` and ``"t5"`` (the files of its ``text_encoders/``)."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
    from safetensors.torch import load_file, save_file

    src, out_dir = Path(pipeline_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    index = json.loads((src / "model_index.json").read_text())
    flux = index["_class_name"].startswith("Flux")

    def part(name: str, weights: str = "diffusion_pytorch_model.safetensors") -> dict[str, torch.Tensor]:
        return load_file(str(src / name / weights))

    cfg = json.loads((src / "transformer" / "config.json").read_text())
    shapes = _flux_original_shapes(cfg) if flux else _sd3_original_shapes(cfg)
    convert = convert_flux_any_width if flux else convert_sd3_transformer_checkpoint_to_diffusers
    transformer = _to_original(part("transformer"), shapes, convert)
    vae_cfg = json.loads((src / "vae" / "config.json").read_text())
    vae = _to_ldm(part("vae"), _vae_rules(vae_cfg), "", "VAE")
    names = {"text_encoder": "clip_l", "text_encoder_2": "t5xxl" if flux else "clip_g", "text_encoder_3": "t5xxl"}
    rooted = lambda k: k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k  # noqa: E731
    encoders = {  # CLIP's keys below text_model., as a whole CLIPTextModel names them (transformers saves them flat)
        names[c]: {k if names[c] == "t5xxl" else rooted(k): v for k, v in part(c, "model.safetensors").items()}
        for c in names
        if (src / c).is_dir()
    }
    whole = _prefixed(transformer, "model.diffusion_model.") | _prefixed(vae, "first_stage_model.")
    for name, sd in encoders.items():
        whole |= _prefixed(sd, f"text_encoders.{name}.transformer.")
    files = {"all-in-one": (whole, out_dir / f"{src.name}-all-in-one.safetensors")}
    apart = {name: (encoders[key], out_dir / f"{name}.safetensors") for name, key in _ENCODER_FILES if key in encoders}
    if flux:
        files |= {
            "transformer": (transformer, out_dir / "flux1-dev.safetensors"),
            "vae": (vae, out_dir / "ae.safetensors"),
        }
    else:
        mmdit_and_vae = _prefixed(transformer, "model.diffusion_model.") | _prefixed(vae, "first_stage_model.")
        files["transformer"] = (mmdit_and_vae, out_dir / "sd3_medium.safetensors")
    files |= {("t5" if name.startswith("t5") else name): part for name, part in apart.items()}
    for sd, path in files.values():
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata={"format": "pt"})
    return {name: path for name, (_, path) in files.items()}
