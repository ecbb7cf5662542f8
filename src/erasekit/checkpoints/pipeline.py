"""Load a local Stable Diffusion pipeline for erase and generate (never from a hub)."""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import ErasekitError, LayoutError
from ..families import ENCODER_COMPONENTS, FAMILIES, family, listing, with_article
from ..families.base import Family
from .layouts import Checkpoint, WeightFile, read_json
from .model_configs import ConfigChoice, choose_config
from .parts import PARTS_LAYOUT, check_encoder_sizes, denoiser_prefix, detect_model, vae_source


class UnsupportedModelError(LayoutError):
    """The model is readable but erase/generate do not support its architecture yet."""


def quiet_libraries() -> None:
    """diffusers and transformers log loudly (progress bars, deprecations); erasekit reports for itself."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is first imported
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="diffusers")


def model_settings(model: str | os.PathLike) -> dict[str, Any]:
    """A model folder's ``erasekit.json``: recommended settings per command (``{"erase": {...}}``) and
    ``"toyworld": true`` for models of the built-in world. Empty for other models and for single files. The folder
    is the one :func:`load_pipeline` loads ``model`` from (:func:`erasekit.checkpoints.hub.resolve_model`): a model id's
    snapshot in the Hugging Face cache, a local path as it is."""
    from .hub import resolve_model

    path = resolve_model(model) / "erasekit.json"
    if not path.is_file():
        return {}
    return read_json(path, "repair or delete it")


@contextlib.contextmanager
def model_threads(model: str | os.PathLike) -> Iterator[None]:
    """The torch threads a model's ``erasekit.json`` asks for (``"threads": 1`` for the built-in model, whose
    matrices are too small for a second thread to pay), for the length of a call; none asked: torch's own."""
    n = model_settings(model).get("threads")
    if not n:
        yield
        return
    from .._torch import threads

    with threads(int(n)):
        yield


def weights_variant(folder: Path, denoiser: str = "unet") -> str | None:
    """``"fp16"`` for a folder that holds only the fp16 weight variant (as a download of just that variant does), as
    its ``denoiser`` component (``unet``, ``transformer``) tells."""
    unet = folder / denoiser
    plain = any(unet.glob("diffusion_pytorch_model.safetensors")) or any(unet.glob("diffusion_pytorch_model.bin"))
    return "fp16" if not plain and any(unet.glob("diffusion_pytorch_model.fp16.*")) else None


def resolve_device(device: str) -> Any:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ErasekitError(f"unknown device {device!r}", "use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ErasekitError(
            "device cuda was asked for but this torch has no CUDA device", "use the cpu", option="device"
        )
    return dev


def load_pipeline(
    model: str | os.PathLike,
    *,
    device: Any = "cpu",
    torch_dtype: Any = None,
    text_encoder_dtype: Any = None,
    vae_dtype: Any = None,
    config: str | os.PathLike | None = None,
    prediction_type: str | None = None,
    text_encoders: Sequence[str | os.PathLike] = (),
    vae: str | os.PathLike | None = None,
    offload_blocks: bool = False,
) -> tuple[Any, Checkpoint]:
    """A pipeline of its family's class (StableDiffusion(XL)Pipeline) from a local diffusers folder, a model id (``ORG/NAME[@REVISION]``, from the
    Hugging Face cache or downloaded), or a single file. A single file is built with erasekit's bundled configs
    of its architecture, or with ``config`` (a local diffusers folder of the same model) when given; the choice
    is in ``ckpt.config``. ``prediction_type`` overrides the scheduler's (``epsilon`` or ``v_prediction``).
    ``text_encoder_dtype`` and ``vae_dtype`` load the text encoders and the VAE in another dtype than the rest
    (erase: fp32 encoders to train and an fp32 VAE to encode its images with, a bf16 UNet to compute with).
    ``text_encoders`` and ``vae``: for a transformer file kept apart (Black Forest Labs' ``flux1-dev.safetensors``),
    its encoder files and its VAE file (:mod:`erasekit.checkpoints.parts`). ``offload_blocks``: the denoiser's
    streamed blocks (``Family.streamed_blocks``) stay in CPU memory, everything else goes to ``device`` (erase's
    ``offload: blocks`` streams them from there)."""
    from .hub import resolve_model
    from .in_place import read_consistently, recover_interrupted

    path = resolve_model(model)
    quiet_libraries()  # before diffusers is imported: it imports transformers, which logs on import
    import diffusers
    import torch

    ckpt = detect_model(path, text_encoders, vae, config)
    recover_interrupted(ckpt)  # never fingerprint or train on a half-applied file
    fam = runnable_family(ckpt, config)
    dtype = torch_dtype or torch.float32
    te_dtype = text_encoder_dtype or dtype
    vae_dtype = vae_dtype or dtype
    cls = getattr(diffusers, fam.pipeline or "")
    extra = (
        {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
        if fam.safety_checker
        else {}
    )
    if path.is_dir():
        index = read_json(path / "model_index.json") if (path / "model_index.json").exists() else {}
        for comp in fam.pipeline_components:
            if comp in _absent_optional(fam, index):
                continue
            if not (isinstance(index.get(comp), list) and index[comp][0] and (path / comp).is_dir()):
                raise LayoutError(
                    f"model folder {path} lacks its {comp} ({comp}/ folder or model_index.json entry)",
                    "use a complete diffusers pipeline folder",
                )
        variant = weights_variant(path, fam.parts[0][0])
        extra |= dict.fromkeys(_absent_optional(fam, index))  # diffusers wants them passed as None
        dtypes = {"default": dtype, "vae": vae_dtype} | dict.fromkeys(fam.components, te_dtype)
        load: Callable[..., Any] = lambda: cls.from_pretrained(  # noqa: E731
            path,
            local_files_only=True,
            torch_dtype=dtypes,
            variant=variant,
            **extra,
        )
    elif ckpt.layout == PARTS_LAYOUT:
        choice = choose_config(ckpt, config, prediction_type)
        ckpt.config = choice.describe()
        part_dtypes = {"default": dtype, "vae": vae_dtype} | dict.fromkeys(fam.components, te_dtype)
        load = lambda **_: pipeline_from_parts(cls, ckpt, choice, vae, part_dtypes)  # noqa: E731
    else:
        choice = choose_config(ckpt, config, prediction_type)
        ckpt.config = choice.describe()
        absent = _absent_from_file(fam, ckpt)
        extra |= dict.fromkeys(absent) | choice.tokenizers(ckpt.encoders)  # an SD3.x file without its T5
        load_dtype = single_file_load_dtype(ckpt, dtype, te_dtype, vae_dtype)
        load = lambda **kw: cls.from_single_file(  # noqa: E731
            str(path),
            config=str(choice.path),
            local_files_only=True,
            torch_dtype=load_dtype,
            **extra,
            **kw,
        )
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    def read() -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                return _own_text_encoders(load())
            except NotImplementedError as e:
                if path.is_dir() or "meta tensor" not in str(e):
                    raise
                # with accelerate installed, diffusers leaves the tensors a file lacks on the meta device and fails
                # on them; loaded without that (missing tensors random), the check below says what is missing
                check_single_file_pipeline(load(low_cpu_mem_usage=False), ckpt, config, vae)
                raise

    try:
        pipe = read_consistently(ckpt, read)  # never one with tensors half-written by an apply under way
    except (OSError, ValueError, KeyError, RuntimeError, SingleFileComponentError) as e:
        fix = (
            "check that the folder is a complete local diffusers pipeline"
            if path.is_dir()
            else f"check that {path} is a complete checkpoint"
            + (f" and {config} a pipeline of the same model" if config else "")
        )
        detail = " ".join(line.strip() for line in str(e).splitlines()[:2])[:240]  # torch puts the why on line 2
        raise LayoutError(f"cannot load a pipeline from {path} ({type(e).__name__}: {detail})", fix) from None
    if not path.is_dir():
        check_single_file_pipeline(pipe, ckpt, config, vae)
        for name in fam.components:
            if getattr(pipe, name) is not None:  # SD3.x without its T5
                getattr(pipe, name).to(te_dtype)
        denoiser_of(pipe).to(dtype)
        pipe.vae.to(vae_dtype)
    if prediction_type is not None and pipe.scheduler.config.get("prediction_type") != prediction_type:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=prediction_type)
    pipe.set_progress_bar_config(disable=True)
    if offload_blocks:
        return _to_device_but_blocks(pipe, device, fam.streamed_blocks), ckpt
    return pipe.to(device), ckpt


def _to_device_but_blocks(pipe: Any, device: Any, blocks: Sequence[str]) -> Any:
    """``pipe.to(device)``, but for the denoiser's block lists ``blocks``, which stay where they are (in CPU memory,
    as loaded). FLUX.1's and SD3.x's transformers hold no tensors of their own outside their submodules."""
    import torch

    denoiser = denoiser_of(pipe)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module) and component is not denoiser:
            component.to(device)
    for name, child in denoiser.named_children():
        if name not in blocks:
            child.to(device)
    return pipe


def denoiser_of(pipe: Any) -> Any:
    """A loaded pipeline's denoiser: its UNet (SD1.x, SD2.x, SDXL) or its transformer (FLUX.1, SD3.x)."""
    transformer = getattr(pipe, "transformer", None)
    return transformer if transformer is not None else pipe.unet


def _absent_optional(fam: Family, index: dict[str, Any]) -> set[str]:
    """The components (encoder and tokenizer) of ``fam``'s optional slots that a folder's model_index.json leaves
    out (SD3.x without its T5: ``"text_encoder_3": [null, null]``)."""
    return {
        c
        for s in fam.slots
        if s.optional and not (isinstance(index.get(s.component), list) and index[s.component][0])
        for c in (s.component, s.tokenizer)
    }


def _absent_from_file(fam: Family, ckpt: Checkpoint) -> set[str]:
    """The components (encoder and tokenizer) of ``fam``'s optional slots that a single file is without."""
    return {c for s in fam.slots if s.optional and s.name not in ckpt.encoders for c in (s.component, s.tokenizer)}


def runnable_family(ckpt: Checkpoint, config: str | os.PathLike | None = None) -> Family:
    """The family of ``ckpt``, which erase, generate and eval can run; :class:`UnsupportedModelError` where they
    cannot, and a :class:`LayoutError` for a single file that erasekit has no configs for and no ``config`` folder
    is given (a FLUX.1 or SD3.x transformer of other sizes than the bundled configs'): before a judge is asked for or
    an image read."""
    fam = family(ckpt.architecture)
    if not fam.bare and fam.pipeline and not fam.bundled and config is None and not ckpt.path.is_dir():
        raise LayoutError(
            f"erasekit has no configs to load {with_article(fam.title)} single file with", fam.why_not_run
        )
    if fam.flow_matching and config is None and not ckpt.path.is_dir():
        choose_config(ckpt)  # a transformer the bundled configs do not describe (FLUX.1 Fill): from its header
    if ckpt.layout == PARTS_LAYOUT:
        check_encoder_sizes(ckpt, config)  # CLIP-G given as FLUX.1's CLIP-L: before gigabytes are loaded
    if fam.bare:
        raise UnsupportedModelError(
            f"{ckpt.path} is {with_article(fam.title)} on its own (no UNet or VAE), which erase, generate and eval cannot run",
            "name the whole Stable Diffusion model it belongs "
            "to (a text-encoder file still takes patches: erasekit apply)",
        )
    if fam.pipeline is None:
        titles = [f.title for f in FAMILIES.values() if f.pipeline]
        raise UnsupportedModelError(
            f"{ckpt.path} is {fam.name}; erase and generate support {listing(titles)}",
            f"use one of those ({fam.why_not_run})",
        )
    return fam


def _own_text_encoders(pipe: Any) -> Any:
    """``pipe`` with its text encoders' tensors in memory of their own: loaded from safetensors in their stored
    dtype they are views of the mapped file, which an in-place apply or revert by another process would change
    under the running job (after the read was checked to be of one state)."""
    for name in ENCODER_COMPONENTS:
        encoder = getattr(pipe, name, None)
        if encoder is not None and any(p.is_meta for p in encoder.parameters()):
            # diffusers loads a single file's encoders into empty weights and ties none: T5's input embedding is
            # its shared one, which the file holds once (``shared.weight``)
            encoder.tie_weights()
        for tensor in [*encoder.parameters(), *encoder.buffers()] if encoder is not None else []:
            tensor.data = tensor.data.clone()
    return pipe


def _part_files(ckpt: Checkpoint, vae: str | os.PathLike | None) -> list[tuple[str, WeightFile, str]]:
    """(component, file, key prefix) of a single file's denoiser and VAE; of a model of separate files, the
    transformer's file and the VAE's (:func:`~erasekit.checkpoints.parts.vae_source`)."""
    parts = family(ckpt.architecture).parts
    if ckpt.layout != PARTS_LAYOUT:
        return [(comp, ckpt.files[0], prefix) for comp, prefix in parts]
    vae_path, vae_prefix = vae_source(ckpt, vae)
    return [
        (parts[0][0], WeightFile(ckpt.path, ""), denoiser_prefix(ckpt)),
        (parts[1][0], WeightFile(vae_path, ""), vae_prefix),
    ]


def single_file_load_dtype(ckpt: Checkpoint, dtype: Any, te_dtype: Any, vae_dtype: Any) -> Any:
    """The one dtype diffusers loads a whole single file in, before each component is cast to its own: theirs where
    they share one; else the file's own text-encoder dtype where that loses nothing (an fp16 file for a bf16 UNet
    and fp32 encoders or VAE: no fp32 copy of the UNet is ever made), else fp32."""
    import torch

    if dtype == te_dtype == vae_dtype:
        return dtype
    wf = next(f for f in ckpt.files if f.encoders)
    enc = next(iter(wf.encoders.values()))
    first = enc.key(0, enc.projections[0], "weight")
    stored = {"F16": torch.float16, "BF16": torch.bfloat16}.get(wf.tensor_info()[first][0])
    # widening the stored encoders afterwards is exact, and a UNet computed in half precision needs no more
    return stored if stored is not None and dtype != torch.float32 else torch.float32


def pipeline_from_parts(
    cls: Any, ckpt: Checkpoint, choice: ConfigChoice, vae: str | os.PathLike | None, dtypes: dict[str, Any]
) -> Any:
    """A pipeline of class ``cls`` from a model of separate files (:mod:`erasekit.checkpoints.parts`) and the configs
    ``choice``: diffusers loads the transformer and the VAE (from ``vae``, else from the transformer's file) as
    ``from_single_file`` does, each from its own tensors, and each text encoder from its own file as it loads one from
    an all-in-one file (its keys put below that file's prefix). ``dtypes``: component -> the dtype it loads in (else
    ``"default"``'s): each file is read into its own component's, never through another file's."""
    import diffusers
    import transformers
    from diffusers.loaders.single_file_utils import (
        create_diffusers_clip_model_from_ldm,
        create_diffusers_t5_model_from_checkpoint,
    )
    from safetensors.torch import load_file

    fam = family(ckpt.architecture)
    index = read_json(choice.path / "model_index.json")
    (denoiser, _), (vae_part, _) = fam.parts

    def kw(comp: str) -> dict[str, Any]:
        return {
            "config": str(choice.path),
            "local_files_only": True,
            "torch_dtype": dtypes.get(comp, dtypes["default"]),
        }

    (_, _, denoiser_at), (_, vae_file, vae_at) = _part_files(ckpt, vae)
    parts: dict[str, Any] = {
        denoiser: getattr(diffusers, index[denoiser][1]).from_single_file(
            _tensors_below(ckpt.path, denoiser_at), subfolder=denoiser, **kw(denoiser)
        ),
        vae_part: getattr(diffusers, index[vae_part][1]).from_single_file(
            _tensors_below(vae_file.path, vae_at), subfolder=vae_part, **kw(vae_part)
        ),
        "scheduler": getattr(diffusers, index["scheduler"][1]).from_pretrained(choice.path, subfolder="scheduler"),
    }
    all_in_one = fam.single_files[0].encoders  # slot -> (naming, key prefix) in a ComfyUI all-in-one file
    for slot in fam.slots:
        wf = next((f for f in ckpt.files if slot.name in f.encoders), None)
        if wf is None:  # SD3.x without its T5
            parts[slot.component] = parts[slot.tokenizer] = None
            continue
        spec, prefix = wf.encoders[slot.name], all_in_one[slot.name][1]
        root = prefix.removesuffix(spec.naming.root)  # the encoder's own root there: text_encoders.clip_l.transformer.
        state = {
            prefix + k[len(spec.prefix) :] if k.startswith(spec.prefix) else root + k: v
            for k, v in load_file(str(wf.path)).items()
        }
        make = (
            create_diffusers_t5_model_from_checkpoint
            if slot.encoder.kind.name == "t5"
            else create_diffusers_clip_model_from_ldm
        )
        parts[slot.component] = make(
            getattr(transformers, index[slot.component][1]), state, subfolder=slot.component, **kw(slot.component)
        )
        if not choice.bundled:  # a user's config folder holds the tokenizers
            parts[slot.tokenizer] = transformers.AutoTokenizer.from_pretrained(choice.path, subfolder=slot.tokenizer)
    return cls(**parts | choice.tokenizers(ckpt.encoders))


def _tensors_below(path: Path, prefix: str) -> dict[str, Any]:
    """The tensors of the safetensors file ``path`` below ``prefix`` (all of them for none), as stored: one
    component's of a file that holds two (``sd3_medium.safetensors``), not the whole file read for each."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


def check_single_file_pipeline(
    pipe: Any, ckpt: Checkpoint, config: str | os.PathLike | None, vae: str | os.PathLike | None = None
) -> None:
    """diffusers loads single files with ``strict=False``: without accelerate, tensors that its key conversion
    misses keep their random initial values, silently (with it, they stay on the meta device). Refuse such a pipeline: every UNet and VAE tensor must
    have a source in the file, and the text-encoder FFN tensors erasekit trains must be the file's, bit for bit
    (a patch's base fingerprints are taken from the file)."""
    import torch

    from .memory import memory_encoders

    for comp, wf, prefix in _part_files(ckpt, vae):
        # counted in numbers, not tensors: original files fuse what diffusers splits (FLUX.1's and SD3.x's q, k, v)
        need = sum(p.numel() for p in getattr(pipe, comp).parameters())
        have = sum(math.prod(shape) for k, (_, shape) in wf.tensor_info().items() if k.startswith(prefix))
        if have < need:
            raise LayoutError(
                f"{wf.path.name} has {have:,} {comp} weights ({prefix}*) but the {comp} of its "
                f"config ({ckpt.config}) has {need:,}",
                "use a complete checkpoint, and a config of the same model",
                option="config_dir",
            )
    _, encoders = memory_encoders(pipe)
    for slot, enc in ckpt.encoders.items():
        wf = next(f for f in ckpt.files if slot in f.encoders)
        module, spec = encoders[slot]
        state = module.state_dict()
        for layer, proj, kind in spec.tensors():
            key = enc.key(layer, proj, kind)
            got = state[spec.key(layer, proj, kind)]
            want = torch.from_numpy(wf.read_numpy(key).copy()).to(got.dtype)
            if got.is_meta or not torch.equal(got.cpu(), want):  # meta: never loaded (accelerate's empty weights)
                raise LayoutError(
                    f"diffusers did not load {ckpt.path.name}'s text encoder as it is stored ({key} differs)",
                    "report this with your diffusers and transformers versions",
                )
