"""A FLUX.1 or SD3.x model kept as separate files, as Black Forest Labs and Stability AI ship them and ComfyUI and
Forge users keep them: the transformer (``flux1-dev.safetensors``: ``double_blocks.``, ``single_blocks.``, alone and
unprefixed; ``sd3_medium.safetensors``, ``sd3.5_large.safetensors``: ``joint_blocks.`` below
``model.diffusion_model.``, with the VAE below ``first_stage_model.``), each text encoder in a file of its own
(``clip_l.safetensors``, ``clip_g.safetensors``, ``t5xxl_fp16.safetensors``, as ComfyUI's DualCLIPLoader and
TripleCLIPLoader and Forge's "VAE / Text Encoder" selector take them) and the VAE (``ae.safetensors``) where the
transformer's file holds none.

erase, generate and eval run such a model from ``--model`` (the transformer), ``--text-encoders`` (the encoder files,
in any order: each goes to the slot of its kind, CLIP-L ``te1``, CLIP-G ``te2``, T5 ``te3``; SD3.x's two CLIPs by
their widths in the configs the model is loaded with) and ``--vae``. The detected
:class:`~erasekit.checkpoints.layouts.Checkpoint` holds the encoder files (layout :data:`PARTS_LAYOUT`); its path is
the transformer's. A patch erased from it is of the family (FLUX.1: te1 and te3; SD3.x: te1, te2 and te3, or te1 and
te2 where no T5 is given, as SD3.x runs without it) and applies to each encoder file, its fitting part there.
Torch-free: headers only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import ErasekitError, InputFileError, LayoutError
from ..families import family, listing, with_article
from ..families.base import Family, Slot
from .layouts import Checkpoint, EncoderSpec, WeightFile, _denoiser_alone, detect, with_slot

PARTS_LAYOUT = "separate-files"
_VAE_KEYS = ("encoder.conv_in.weight", "decoder.conv_out.weight")  # LDM's names, as ae.safetensors holds them
_VAE_PREFIXES = ("", "first_stage_model.")  # alone (ae.safetensors) or in a checkpoint (sd3_medium.safetensors)


def detect_model(
    model: str | os.PathLike,
    text_encoders: Sequence[str | os.PathLike] = (),
    vae: str | os.PathLike | None = None,
    config: str | os.PathLike | None = None,
) -> Checkpoint:
    """``model`` as :func:`~erasekit.checkpoints.layouts.detect` finds it, or, with ``text_encoders``, the model of
    separate files: ``model`` a transformer file, ``text_encoders`` its encoder files, ``vae`` its VAE file (which
    may be left out where the transformer's file holds the VAE); ``config``, the model's config folder where given,
    says the widths of slots of one kind (SD3.x's CLIP-L and CLIP-G), as the bundled configs do otherwise."""
    if not text_encoders:
        if vae is not None:
            raise ErasekitError(
                "--vae is for a transformer file kept apart from its encoders",
                "give its encoder files too (--text-encoders), or leave --vae out",
                option="vae",
            )
        return _detect_whole(Path(model))
    path = Path(model)
    fam = _transformer_family(path)
    if vae is not None:
        check_vae(Path(vae))
    elif _vae_prefix(path) is None:
        raise ErasekitError(
            f"{path.name} holds no VAE", f"give its VAE file as well: --vae {fam.vae_file}", option="vae"
        )
    files = _slotted(fam, [Path(p) for p in text_encoders], _slot_widths(fam, path, config))
    return Checkpoint(path, PARTS_LAYOUT, fam.name, files)


def vae_source(ckpt: Checkpoint, vae: str | os.PathLike | None) -> tuple[Path, str]:
    """(file, key prefix) of the VAE of a model of separate files: ``vae`` where given, else the transformer's file
    (Stability AI's ``sd3_medium.safetensors`` holds it below ``first_stage_model.``)."""
    path = Path(vae) if vae is not None else ckpt.path
    return path, _vae_prefix(path) or ""


def denoiser_prefix(ckpt: Checkpoint) -> str:
    """The key prefix of the transformer in a model of separate files' transformer file: ``model.diffusion_model.``
    in a file that holds the VAE too (``sd3_medium.safetensors``), none in one of the transformer alone
    (``flux1-dev.safetensors``)."""
    prefix = family(ckpt.architecture).parts[0][1]
    return prefix if any(k.startswith(prefix) for k in _keys(ckpt.path)) else ""


def _detect_whole(path: Path) -> Checkpoint:
    """``path`` detected; a transformer file alone is refused with the options that run it."""
    try:
        return detect(path)
    except LayoutError:
        fam = _denoiser_alone(list(WeightFile(path, "").tensor_info())) if _is_safetensors(path) else None
        if fam is None:
            raise
        files = ",".join(s.encoder.file for s in fam.slots)
        vae = "" if _vae_prefix(path) is not None else f" --vae {fam.vae_file}"
        raise LayoutError(
            f"{path.name} holds {with_article(fam.title)} {fam.parts[0][0]} but no text encoders",
            f"give its encoder files{' and VAE' if vae else ''}: --text-encoders {files}{vae}",
            option="text_encoders",
        ) from None


def _transformer_family(path: Path) -> Family:
    """The family of the transformer file ``path`` (a denoiser alone); one line if it is not one."""
    try:
        ckpt = detect(path)
    except ErasekitError:
        if not path.exists():
            raise
        fam = _denoiser_alone(list(WeightFile(path, "").tensor_info())) if _is_safetensors(path) else None
        if fam is not None:
            return fam
        raise LayoutError(
            f"{path.name} is not a FLUX.1 or SD3.x transformer file, which --text-encoders goes with",
            "name the transformer file (flux1-dev.safetensors) as the model",
            option="text_encoders",
        ) from None
    if family(ckpt.architecture).bare:
        raise LayoutError(
            f"{path.name} is a text encoder's file, not a transformer",
            "--model takes the transformer file (flux1-dev.safetensors) and the encoder files go in --text-encoders",
            option="model",
        )
    raise LayoutError(
        f"{path.name} holds its text encoders itself", "leave --text-encoders and --vae out", option="text_encoders"
    )


def _is_safetensors(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".safetensors"


def _keys(path: Path) -> list[str]:
    """The tensor names of a safetensors file (none of another file)."""
    return list(WeightFile(path, "").tensor_info()) if _is_safetensors(path) else []


def _vae_prefix(path: Path) -> str | None:
    """The prefix below which ``path`` holds a VAE in LDM's names (none: ``ae.safetensors``; ``first_stage_model.``:
    a checkpoint's); None where it holds none."""
    keys = set(_keys(path))
    return next((p for p in _VAE_PREFIXES if all(p + k in keys for k in _VAE_KEYS)), None)


def check_vae(path: Path) -> None:
    """Refuse, in one line, a ``--vae`` that is no VAE file of LDM's names (``ae.safetensors``, or a checkpoint that
    holds one below ``first_stage_model.``)."""
    if not path.is_file():
        raise InputFileError(f"VAE file {path} does not exist", "check the path", option="vae")
    if _vae_prefix(path) is None:
        raise LayoutError(
            f"{path.name} is not a VAE file (no {_VAE_KEYS[0]})",
            "give the model's VAE file as --vae (FLUX.1's is ae.safetensors)",
            option="vae",
        )


def _slot_widths(fam: Family, transformer: Path, config: str | os.PathLike | None) -> dict[str, tuple[object, ...]]:
    """slot -> (hidden, FFN) of its encoder, where two slots of ``fam`` hold one kind (SD3.x's CLIP-L and CLIP-G): as
    the configs the model is loaded with say (``config``, else the bundled ones its transformer's keys choose), else
    as published; empty where each slot is of its own kind."""
    kinds = [s.encoder.kind.name for s in fam.slots]
    if len(set(kinds)) == len(kinds):
        return {}
    from .model_configs import choose_config, config_architecture

    # the configs' own checks first: a --config that is no folder of this family is refused as such
    choice = choose_config(Checkpoint(transformer, PARTS_LAYOUT, fam.name, []), config)
    configs = config_architecture(choice.path)[1]
    return {
        s.name: s.encoder.kind.dims_of(configs[s.name])[:2] if s.name in configs else s.encoder.largest[:2]
        for s in fam.slots
    }


def _slotted(fam: Family, paths: list[Path], widths: dict[str, tuple[object, ...]]) -> list[WeightFile]:
    """Each encoder file's weight file, its encoder in the slot of ``fam`` that its kind (and ``widths``, where two
    slots hold one kind) says; one line for a file that is no encoder, an encoder ``fam`` has no slot for, two files
    for one slot, or a slot without a file (SD3.x's T5 may be left out)."""
    taken: dict[str, Path] = {}
    files = []
    for path in paths:
        wf, spec = _encoder_file(fam, path)
        slot = _slot_of(fam, spec, path, widths)
        if slot.name in taken:
            raise LayoutError(
                f"{taken[slot.name].name} and {path.name} are both {slot.encoder.title} text encoders ({slot.name})",
                f"give one file per text encoder: {_reads(fam)}",
                option="text_encoders",
            )
        taken[slot.name] = path
        wf.label = path.name if sum(p.name == path.name for p in paths) == 1 else str(path)
        wf.encoders = {slot.name: with_slot(spec, slot.name)}
        files.append(wf)
    missing = [s for s in fam.slots if s.name not in taken and not s.optional]
    if missing:
        raise LayoutError(
            f"{fam.title} needs its {listing([s.encoder.title for s in missing])} text encoder"
            f"{'s' if len(missing) > 1 else ''} too",
            f"add {listing([s.encoder.file for s in missing])} to --text-encoders",
            option="text_encoders",
        )
    return files


def _encoder_file(fam: Family, path: Path) -> tuple[WeightFile, EncoderSpec]:
    """The weight file of an encoder's own file and its one encoder; one line if it is something else (a missing
    file, the VAE or the transformer among the encoders)."""
    if not path.exists():
        raise InputFileError(f"text-encoder file {path} does not exist", "check the path", option="text_encoders")
    try:
        ckpt = detect(path)
    except LayoutError:
        _refuse_other_part(path)
        raise
    found = family(ckpt.architecture)
    if not found.bare or path.is_dir():
        raise LayoutError(
            f"{path.name} is {'a folder' if path.is_dir() else f'a whole {found.title} checkpoint'}, not one text "
            "encoder's file",
            f"give each text encoder's own file ({', '.join(s.encoder.file for s in fam.slots)})",
            option="text_encoders",
        )
    _check_unpatched(ckpt)
    wf = ckpt.files[0]
    return wf, next(iter(wf.encoders.values()))


def _refuse_other_part(path: Path) -> None:
    """Refuse, saying where it goes, the VAE or transformer file of a model kept apart listed among its encoders."""
    keys = _keys(path)
    if keys and all(k in keys for k in _VAE_KEYS):
        raise LayoutError(
            f"{path.name} is a VAE file, not a text encoder's", "give it as --vae instead", option="text_encoders"
        )
    fam = _denoiser_alone(keys) if keys else None
    if fam is not None:
        raise LayoutError(
            f"{path.name} is {with_article(fam.title)} {fam.parts[0][0]} file: the model (--model), not a text encoder",
            "leave it out of --text-encoders",
            option="text_encoders",
        )


def _check_unpatched(ckpt: Checkpoint) -> None:
    """Refuse an encoder file with patches applied in place: a model of separate files is run as its files are
    stored, with no undo journal of its own to tell the patches' base from them."""
    from .in_place import applied_in_place

    applied = applied_in_place(ckpt, stamp=False)
    if applied:
        raise ErasekitError(
            f"{ckpt.path.name} has patches applied in place ({', '.join(repr(a['title']) for a in applied)}), which "
            "a model of separate files is not run with",
            f"revert them first (erasekit apply --revert PATCH --to {ckpt.path.name}), or use a copy without them",
            option="text_encoders",
        )


def _slot_of(fam: Family, spec: EncoderSpec, path: Path, widths: dict[str, tuple[object, ...]]) -> Slot:
    """The slot of ``fam`` an encoder of ``spec``'s kind goes to: the one of that kind, or of several (SD3.x's CLIP-L
    and CLIP-G) the one of its ``widths``."""
    kind = spec.encoder_kind
    slots = [s for s in fam.slots if s.encoder.kind == kind]
    if len(slots) > 1:
        slots = [s for s in slots if widths[s.name] == tuple(spec.dims[:2])]
    if len(slots) != 1:
        raise LayoutError(
            f"{path.name} is {with_article(kind.title)} text encoder of {spec.hidden} x {spec.intermediate} (hidden x FFN), "
            f"which no {fam.title} slot takes",
            _reads(fam),
            option="text_encoders",
        )
    return slots[0]


def _reads(fam: Family) -> str:
    """What text encoders ``fam`` reads and the files they are kept in, the optional ones said so."""
    wants = [f"{s.encoder.title} ({s.encoder.file})" for s in fam.slots if not s.optional]
    optional = [f"{s.encoder.title} ({s.encoder.file})" for s in fam.slots if s.optional]
    return f"{fam.title} reads {listing(wants)}" + (f", and {listing(optional)} where given" if optional else "")


def check_encoder_sizes(ckpt: Checkpoint, config: str | os.PathLike | None = None) -> None:
    """Refuse, in one line naming the file, an encoder file of other sizes than its slot's config (bundled or
    ``config``) gives, as CLIP-G or OpenCLIP-H for FLUX.1's CLIP-L, or T5 v1.1 base for its T5-XXL: before gigabytes
    are loaded."""
    from .model_configs import encoder_configs, encoder_fits

    source, configs = encoder_configs(ckpt, config)
    fam = family(ckpt.architecture)
    for wf in ckpt.files:
        for name, spec in wf.encoders.items():
            want = spec.encoder_kind.dims_of(configs.get(name, {}))
            if name in configs and not encoder_fits(spec, want):
                slot = fam.slot(name)
                raise LayoutError(
                    f"{wf.path.name} is {with_article(spec.encoder_kind.title)} text encoder of {_dims(spec.dims)} (hidden x FFN x "
                    f"layers), but {fam.title}'s {slot.encoder.title} ({name}) is {_dims(want)} in {source}",
                    f"give its {slot.encoder.title} file ({slot.encoder.file}) instead",
                    option="text_encoders",
                )


def _dims(dims: Sequence[object]) -> str:
    return "x".join(map(str, dims))
