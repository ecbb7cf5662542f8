"""Which component configs describe a single-file checkpoint: erasekit's bundled reference configs, or ``--config``.

A single ``.safetensors`` from a model site holds weights only. To build a pipeline from it, diffusers needs the
configs of its UNet, VAE, scheduler, text encoders and tokenizers. erasekit ships them (``configs/<name>/``) for
every architecture it detects (each family's ``bundled``, :mod:`erasekit.families`), so nothing is downloaded:

========== ======================================= ===========================
name       reference pipeline                      told apart by
========== ======================================= ===========================
sd1        SD 1.x (CLIP ViT-L/14), epsilon, 512 px  text-encoder keys
sd2-512    SD 2.x base, epsilon, 512 px            OpenCLIP ViT-H keys + weights
sd2-768-v  SD 2.x, v-prediction, 768 px            OpenCLIP ViT-H keys + weights
sdxl       SDXL base 1.0                           both encoders' keys
sdxl-refiner SDXL refiner 1.0                      bigG alone + UNet label_emb
flux-dev   FLUX.1-dev (and its fine-tunes)         transformer guidance_in keys
flux-schnell FLUX.1-schnell                        no guidance_in keys
sd3-medium SD3 medium                              MMDiT without ln_q, attn2 keys
sd3.5-medium SD3.5 medium                          MMDiT attn2 (dual attention) keys
sd3.5-large SD3.5 large and large turbo            MMDiT ln_q without attn2 keys
========== ======================================= ===========================

FLUX.1 and SD3.x variants differ in their transformers (``Family.variants``: a key part only that variant's files
hold); the transformer's widths and depths are then checked against the chosen config, so a FLUX.1 Fill or Depth file,
or a fine-tune of other sizes, is refused with the fix (``--config DIR``). Their T5 tokenizer (sentencepiece) is not
shipped: it is read from the Hugging Face cache, where any of :data:`T5_TOKENIZERS` left it, else downloaded once
(about 3 MB) from the first of them; only erase, generate and eval need it.

SD 2.x 512 (epsilon) and 768-v (v-prediction) have the same tensor shapes (a family with one bundled config per
prediction type, told apart by their schedulers' ``prediction_type``). erasekit decides, in this order:
``prediction_type`` given by the user; the file's ModelSpec metadata (``modelspec.prediction_type`` or
``modelspec.architecture``); else the spread of one UNet tensor (the bias of the first norm of the last output
block's transformer): v-prediction training leaves it far wider (std above :data:`V_PREDICTION_SPREAD`) than
epsilon training does. The choice and its reason are shown by ``erasekit inspect`` and recorded in patches; a
spread within :data:`NEAR_THRESHOLD` of the threshold is a guess, and a warning says so.

The CLIP BPE vocabulary ships once, with the built-in model; the tokenizers are built from it.
Torch-free: only safetensors headers and one small tensor are read (and the Hugging Face cache, for T5's tokenizer).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ErasekitError, ErasekitWarning, InputFileError, LayoutError
from ..families import ENCODER_COMPONENTS, by_bundled_config, by_components, family, with_article
from ..families.base import Family
from ..toyworld import builtin_model_path
from .layouts import Checkpoint, EncoderSpec, WeightFile, read_json

CONFIGS_DIR = Path(__file__).parent / "configs"
TOKENIZER_DIR = builtin_model_path() / "tokenizer"  # the full CLIP BPE vocabulary, shipped once
PREDICTION_TYPES = ("epsilon", "v_prediction")
V_PREDICTION_SPREAD = 0.09
# a spread within this share of the threshold (0.0675-0.1125) is a guess: the threshold is one cut-off with no
# measured margin, and the reference v-prediction value the docs show (0.213) is 2.4x it, far outside the band
NEAR_THRESHOLD = 0.25
_SPREAD_KEY = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
_UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
FLOW_MATCHING = "flow matching"  # what a flow-matching model's choice shows where others show a prediction type
# (repo, folder) where T5 v1.1's tokenizer lies in the Hugging Face cache, as diffusers downloads leave it; the first
# (not gated) is the one erasekit downloads where none is cached
T5_TOKENIZERS = (
    ("black-forest-labs/FLUX.1-schnell", "tokenizer_2"),
    ("black-forest-labs/FLUX.1-dev", "tokenizer_2"),
    ("stabilityai/stable-diffusion-3.5-large", "tokenizer_3"),
    ("stabilityai/stable-diffusion-3.5-medium", "tokenizer_3"),
    ("stabilityai/stable-diffusion-3-medium-diffusers", "tokenizer_3"),
)


@dataclass(frozen=True)
class ConfigChoice:
    """The configs a single file is loaded with, and why."""

    name: str  # "sd2-768-v", or "config DIR" for a user's folder
    path: Path
    prediction_type: str
    reason: str
    bundled: bool

    def describe(self) -> str:
        return f"{self.name} ({self.prediction_type}; {self.reason})"

    def tokenizers(self, slots: Any = None) -> dict[str, Any]:
        """The tokenizer objects to pass to diffusers for a bundled config (a user's folder has its own), of the
        ``slots`` the model holds (all where None): CLIP's built from the shipped vocabulary, T5's from the Hugging
        Face cache (:func:`t5_tokenizer_folder`)."""
        if not self.bundled:
            return {}
        from transformers import CLIPTokenizer, T5Tokenizer

        index = read_json(self.path / "model_index.json")
        out = {}
        for slot in by_bundled_config(self.name).slots:
            if (index.get(slot.tokenizer) or [None])[0] is None or (slots is not None and slot.name not in slots):
                continue
            if slot.encoder.kind.name == "t5":
                out[slot.tokenizer] = T5Tokenizer.from_pretrained(t5_tokenizer_folder(by_bundled_config(self.name)))
            else:
                out[slot.tokenizer] = CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token=slot.encoder.pad_token)
        return out


def t5_tokenizer_folder(fam: Family) -> Path:
    """A folder of T5 v1.1's tokenizer: from the Hugging Face cache where a FLUX.1 or SD3.x download left one
    (:data:`T5_TOKENIZERS`), else downloaded from the first of those repos when online; offline and with none cached,
    a one-line error that says what to do."""
    from huggingface_hub import is_offline_mode, snapshot_download, try_to_load_from_cache

    for repo, sub in T5_TOKENIZERS:
        found = try_to_load_from_cache(repo, f"{sub}/tokenizer_config.json")
        if isinstance(found, str) and any(
            (Path(found).parent / f).is_file() for f in ("tokenizer.json", "spiece.model")
        ):
            return Path(found).parent
    repo, sub = T5_TOKENIZERS[0]
    fix = (
        f"go online once (erasekit then downloads it from {repo}, about 3 MB), or give --config DIR: a diffusers "
        f"folder of the model with its {listing_tokenizers(fam)}"
    )
    if is_offline_mode():
        raise ErasekitError(
            f"{fam.title} needs T5's tokenizer, which erasekit does not ship and the Hugging Face cache does not hold "
            "(downloads are off: HF_HUB_OFFLINE)",
            fix,
        )
    try:
        return Path(snapshot_download(repo, allow_patterns=[f"{sub}/*"])) / sub
    except Exception as e:  # huggingface_hub's HTTP errors, OSError, the transport's: the network, not erasekit
        raise ErasekitError(f"cannot download T5's tokenizer from {repo} ({type(e).__name__})", fix) from None


def listing_tokenizers(fam: Family) -> str:
    """``tokenizer_2/`` folder: where a family's pipeline folder keeps T5's tokenizer."""
    return " and ".join(f"{s.tokenizer}/" for s in fam.slots if s.encoder.kind.name == "t5") + " folder"


def _metadata_prediction(ckpt: Checkpoint) -> str | None:
    wf = ckpt.files[0]
    if wf.format != "safetensors":
        return None
    meta = wf.header.metadata
    pred = meta.get("modelspec.prediction_type", "").strip().lower()
    if pred in ("v", "v_prediction", "v-prediction"):
        return "v_prediction"
    if pred in ("epsilon", "eps"):
        return "epsilon"
    spec, fam = meta.get("modelspec.architecture", ""), family(ckpt.architecture)
    return next((p for p in fam.modelspec_variants if spec.startswith(fam.modelspec_id(p))), None)


def sd2_prediction(ckpt: Checkpoint) -> tuple[str, str]:
    """(prediction type, reason) of an SD 2.x single file (of a family with a bundled config per prediction type),
    from its metadata, else from its weights."""
    found = _metadata_prediction(ckpt)
    if found:
        return found, "from the file's ModelSpec metadata"
    wf = ckpt.files[0]
    if _SPREAD_KEY not in wf.tensor_info():
        return "epsilon", "no UNet tensor to judge by; epsilon assumed"
    spread = float(wf.read_numpy(_SPREAD_KEY).std())
    pred = "v_prediction" if spread > V_PREDICTION_SPREAD else "epsilon"
    sign = ">" if pred == "v_prediction" else "<="
    if abs(spread - V_PREDICTION_SPREAD) <= NEAR_THRESHOLD * V_PREDICTION_SPREAD:
        warnings.warn(
            ErasekitWarning(
                f"{ckpt.path.name}: the prediction type {pred} was guessed from a weight statistic close to its threshold "
                f"(UNet norm-bias spread {spread:.3f}, threshold {V_PREDICTION_SPREAD}; the file has no ModelSpec "
                f"metadata); if that is wrong, set the prediction type: v_prediction for a 768-v model, epsilon for a 512 one",
                option="prediction_type",
            ),
            stacklevel=2,
        )
    return pred, f"UNet norm-bias spread {spread:.3f} {sign} {V_PREDICTION_SPREAD}"


def prediction_of(ckpt: Checkpoint) -> str | None:
    """The prediction type of a checkpoint where it can be told without loading it: a folder's scheduler config,
    an SD2.x single file's metadata or weights, the reference of other single files; None for text encoders and
    flow-matching models (FLUX.1, SD3.x), which predict neither noise nor v."""
    if family(ckpt.architecture).flow_matching:
        return None
    if ckpt.path.is_dir():
        cfg = ckpt.path / "scheduler" / "scheduler_config.json"
        return read_json(cfg).get("prediction_type", "epsilon") if cfg.is_file() else None
    if len(family(ckpt.architecture).bundled) > 1:
        return sd2_prediction(ckpt)[0]
    return None if family(ckpt.architecture).bare else "epsilon"


def bundled_choice(ckpt: Checkpoint, prediction_type: str | None = None) -> ConfigChoice:
    """The bundled configs for a single file (see the module docstring), checked against its UNet."""
    fam = family(ckpt.architecture)
    if fam.bare:
        raise LayoutError(
            f"{ckpt.path.name} holds only {with_article(fam.title)}, no UNet or VAE",
            "name a whole Stable Diffusion checkpoint (a text-encoder file can be patched, not run)",
        )
    if not fam.bundled:
        raise LayoutError(
            f"erasekit has no configs to load {with_article(fam.title)} single file with",
            f"{fam.why_not_run or 'patch it only'}",
        )
    if fam.flow_matching:
        return _flow_choice(ckpt, fam, prediction_type)
    if len(fam.bundled) > 1:
        pred, reason = (prediction_type, "as given") if prediction_type else sd2_prediction(ckpt)
        name = next((n for n in fam.bundled if _scheduler_prediction(CONFIGS_DIR / n) == pred), fam.bundled[0])
    else:
        name, reason = fam.bundled[0], "from its text-encoder keys"
        pred = prediction_type or _scheduler_prediction(CONFIGS_DIR / name)
    choice = ConfigChoice(name, CONFIGS_DIR / name, pred, reason, bundled=True)
    _check_unet(ckpt, choice)
    return choice


def _flow_choice(ckpt: Checkpoint, fam: Family, prediction_type: str | None) -> ConfigChoice:
    """The bundled configs of a FLUX.1 or SD3.x file: its variant by the transformer's keys (``Family.variants``),
    checked against the transformer's widths and depths."""
    if prediction_type is not None:
        raise ErasekitError(
            f"{fam.title} models have no prediction type (they are trained by flow matching)",
            "leave the prediction type out",
            option="prediction_type",
        )
    shapes = denoiser_shapes(ckpt)
    name, _, says = next(v for v in fam.variants if any(v[1] in k for k in shapes))
    choice = ConfigChoice(name, CONFIGS_DIR / name, FLOW_MATCHING, f"from its transformer's keys: {says}", bundled=True)
    _check_transformer(ckpt, choice, shapes)
    return choice


def denoiser_shapes(ckpt: Checkpoint) -> dict[str, tuple[int, ...]]:
    """name -> shape of the tensors of ``ckpt``'s denoiser, below its key prefix (``model.diffusion_model.``; Black
    Forest Labs' files of the transformer alone have none), from the header of the file at ``ckpt.path``."""
    wf = next((f for f in ckpt.files if f.path == ckpt.path), None) or WeightFile(ckpt.path, "")
    prefix = family(ckpt.architecture).parts[0][1]
    info = wf.tensor_info()
    inside = {k[len(prefix) :]: shape for k, (_, shape) in info.items() if k.startswith(prefix)}
    return inside or {k: shape for k, (_, shape) in info.items()}


# per flow-matching family: the transformer's first tensor (width x input channels) and its block lists
_TRANSFORMER_SHAPES = {
    "flux": ("img_in.weight", (("double_blocks", "num_layers"), ("single_blocks", "num_single_layers"))),
    "sd3": ("x_embedder.proj.weight", (("joint_blocks", "num_layers"),)),
}
_FLUX_OTHERS = {384: "a FLUX.1 Fill model", 128: "a FLUX.1 Depth model"}  # by input channels


def _check_transformer(ckpt: Checkpoint, choice: ConfigChoice, shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse, with a clear line, a file whose transformer is not the chosen config's (FLUX.1 Fill or Depth, other
    widths or depths)."""
    first, blocks = _TRANSFORMER_SHAPES[ckpt.architecture]
    if first not in shapes:
        raise LayoutError(
            f"{ckpt.path.name} has {ckpt.architecture} text encoders but no transformer ({first})",
            "name a whole checkpoint (transformer, VAE and text encoders in one file)",
        )
    cfg = read_json(choice.path / "transformer" / "config.json")
    want = (cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["in_channels"], *(cfg[n] for _, n in blocks))
    depth = [len({k.split(".")[1] for k in shapes if k.startswith(f"{b}.")}) for b, _ in blocks]
    got = (*shapes[first][:2], *depth)
    if got != want:
        what = _FLUX_OTHERS.get(got[1], "") if ckpt.architecture == "flux" else ""
        raise LayoutError(
            f"{ckpt.path.name} is {what or 'a transformer of other sizes'} ({_sizes(got)}); erasekit's bundled "
            f"{choice.name} config has {_sizes(want)}",
            "give a config: a local diffusers folder of this model",
            option="config_dir",
        )


def _sizes(dims: tuple[int, ...]) -> str:
    return f"width {dims[0]}, {dims[1]} input channels, depth {'+'.join(map(str, dims[2:]))}"


def _scheduler_prediction(folder: Path) -> str:
    path = folder / "scheduler" / "scheduler_config.json"
    return read_json(path).get("prediction_type", "epsilon") if path.is_file() else "epsilon"


def _check_unet(ckpt: Checkpoint, choice: ConfigChoice) -> None:
    """Refuse, with a clear line, a file whose UNet is not the reference architecture's (inpainting, other widths)."""
    info = ckpt.files[0].tensor_info()
    if _UNET_IN not in info:
        raise LayoutError(
            f"{ckpt.path.name} has {ckpt.architecture} text encoders but no UNet ({_UNET_IN})",
            "name a whole checkpoint (UNet, VAE and text encoders in one file)",
        )
    shape = info[_UNET_IN][1]
    cfg = read_json(choice.path / "unet" / "config.json")
    want = (cfg["block_out_channels"][0], cfg["in_channels"])
    if tuple(shape[:2]) != want:
        what = {9: "an inpainting model", 5: "a depth-conditioned model"}.get(shape[1], "a UNet of other sizes")
        raise LayoutError(
            f"{ckpt.path.name} is {what} (UNet input {shape[1]} channels, width {shape[0]}); erasekit's "
            f"bundled {choice.name} config has {want[1]} channels, width {want[0]}",
            "give a config: a local diffusers folder of this model",
            option="config_dir",
        )


def user_choice(ckpt: Checkpoint, config: str | os.PathLike, prediction_type: str | None = None) -> ConfigChoice:
    """A user's ``config`` folder, refused before anything is loaded when it is of another model than the file."""
    folder = Path(config)
    if not folder.is_dir():
        raise InputFileError(
            f"config {folder} is not a folder", "name a local diffusers pipeline folder", option="config_dir"
        )
    arch, configs = config_architecture(folder)
    if arch != ckpt.architecture:
        raise LayoutError(
            f"config {folder} is a pipeline for {arch} but {ckpt.path.name} is {ckpt.architecture}",
            f"give as config a diffusers folder of the {ckpt.architecture} family",
            option="config_dir",
        )
    for slot, enc in ckpt.encoders.items():
        dims = enc.encoder_kind.dims_of(configs[slot])
        if not encoder_fits(enc, dims):
            raise LayoutError(
                f"config {folder} describes a text encoder of {'x'.join(map(str, dims))} (hidden x FFN "
                f"x layers) but {ckpt.path.name} holds {'x'.join(map(str, enc.dims))}",
                "give as config the diffusers folder of the model this file was made from",
                option="config_dir",
            )
    pred = FLOW_MATCHING if family(arch).flow_matching else prediction_type or _scheduler_prediction(folder)
    return ConfigChoice(f"config {folder}", folder, pred, "given", bundled=False)


def encoder_fits(enc: EncoderSpec, dims: tuple[Any, Any, Any]) -> bool:
    """Whether a config's (hidden, FFN, layers) ``dims`` describe the text encoder ``enc``."""
    # diffusers' SD2.x text encoder stops one OpenCLIP block early (23 of 24 layers: the penultimate layer)
    layers_fit = dims[2] == enc.layers or (enc.style == "oc" and isinstance(dims[2], int) and 0 < dims[2] < enc.layers)
    return dims[:2] == enc.dims[:2] and layers_fit


def encoder_configs(ckpt: Checkpoint, config: str | os.PathLike | None = None) -> tuple[str, dict[str, dict[str, Any]]]:
    """(what they are, slot -> text encoder config) of the configs the single file ``ckpt`` is loaded with: the
    ``config`` folder, else the bundled ones; none where ``config`` is no folder of ``ckpt``'s family
    (:func:`user_choice` says so)."""
    if config is None:
        choice = bundled_choice(ckpt)
        return f"erasekit's bundled {choice.name} config", config_architecture(choice.path)[1]
    folder = Path(config)
    if not folder.is_dir():
        return "", {}
    arch, configs = config_architecture(folder)
    return f"config {folder}", configs if arch == ckpt.architecture else {}


def choose_config(
    ckpt: Checkpoint, config: str | os.PathLike | None = None, prediction_type: str | None = None
) -> ConfigChoice:
    """The configs to load the single file ``ckpt`` with: the user's ``config`` folder, else the bundled ones."""
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ErasekitError(f"unknown prediction type {prediction_type!r}", "use epsilon or v_prediction")
    if config is not None:
        return user_choice(ckpt, config, prediction_type)
    return bundled_choice(ckpt, prediction_type)


def config_architecture(config: Path) -> tuple[str, dict[str, dict[str, Any]]]:
    """(architecture, slot -> text encoder config) of a diffusers folder, from its JSON files only: a folder
    of configs without weights is enough."""
    if not (config / "model_index.json").is_file():
        raise LayoutError(
            f"config {config} has no model_index.json",
            "name a local diffusers pipeline folder (its configs are enough, weights are not needed)",
        )
    index = read_json(config / "model_index.json")
    names = [c for c in ENCODER_COMPONENTS if isinstance(index.get(c), list) and index[c][:1] != [None]]
    if not names:
        raise LayoutError(
            f"config {config} has no text encoder in its model_index.json",
            "name the diffusers pipeline folder of a Stable Diffusion model",
        )
    configs = {}
    for name in names:
        if not (config / name / "config.json").is_file():
            raise LayoutError(f"config {config} lacks {name}/config.json", "name a complete diffusers pipeline folder")
        configs[name] = read_json(config / name / "config.json")
    fam = by_components(  # as layouts._detect_folder
        names, lambda component, key: configs[component].get(key), str(index.get("_class_name", ""))
    )
    if fam is None:
        raise LayoutError(
            f"config {config} has text encoders {', '.join(names)}, of no family erasekit knows",
            "name the diffusers pipeline folder of a Stable Diffusion model",
        )
    return fam.name, {slot.name: configs[slot.component] for slot in fam.slots if slot.component in configs}


def native_resolution(
    ckpt: Checkpoint, config: str | os.PathLike | None = None, prediction_type: str | None = None
) -> int | None:
    """The image size the model renders at by default, from the model folder's configs or those a single file is
    loaded with (:func:`native_resolution_of`). None when they do not tell."""
    try:
        return native_resolution_of(
            ckpt.path if ckpt.path.is_dir() else choose_config(ckpt, config, prediction_type).path
        )
    except ErasekitError:
        return None


def native_resolution_of(folder: Path) -> int | None:
    """The default image size of a diffusers pipeline folder, as its pipelines choose it: the UNet's (SD3.x: the
    transformer's) ``sample_size`` times the VAE's scale factor, 2 ** (its blocks - 1) (SD1 512, SD2 768-v 768, SDXL
    and SD3.x 1024); for a transformer without one (FLUX.1's), the VAE's own ``sample_size`` (1024)."""
    denoiser = "unet" if (folder / "unet").is_dir() else "transformer"
    unet, vae = read_json(folder / denoiser / "config.json"), read_json(folder / "vae" / "config.json")
    if denoiser == "transformer" and "sample_size" not in unet:
        return vae.get("sample_size") if isinstance(vae.get("sample_size"), int) else None
    size, blocks = unet.get("sample_size"), vae.get("block_out_channels")
    if isinstance(size, list):  # [height, width]: a square model's
        size = size[0] if len(set(size)) == 1 else None
    if not isinstance(size, int) or not isinstance(blocks, list) or not blocks:
        return None
    return size * 2 ** (len(blocks) - 1)
