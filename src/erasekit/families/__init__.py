"""Architectures as data: one module per family (:mod:`.sd1`, :mod:`.sd2`, :mod:`.sdxl`, :mod:`.sdxl_refiner`,
:mod:`.flux`, :mod:`.sd3`, :mod:`.clip_text`, :mod:`.t5_text`) and one per text-encoder kind (:mod:`.encoders.clip`, :mod:`.encoders.t5`),
read by everything that names, finds, loads, conditions on or exports a model's text encoders. Adding a family is
one new module, listed in :data:`FAMILIES` (docs/architecture.md says what it holds); the model lines not patched
yet, and how their files are told, are :mod:`.unpatched`. Torch-free, no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from . import clip_text, flux, sd1, sd2, sd3, sdxl, sdxl_refiner, t5_text, unpatched
from .base import Encoder, EncoderKind, Family, NotYet, Unpatched
from .base import with_article as with_article  # for the modules that word messages
from .encoders import ENCODER_KINDS, KIND_OF_PROJECTION

# in the order messages and manifests list them
FAMILIES: dict[str, Family] = {
    f.FAMILY.name: f.FAMILY for f in (sd1, sd2, sdxl, sdxl_refiner, flux, sd3, clip_text, t5_text)
}
PIPELINES = [f for f in FAMILIES.values() if not f.bare]
BARE = [f for f in FAMILIES.values() if f.bare]  # text encoders on their own
# the pipeline components of text encoders and their tokenizers, in the order families list them
ENCODER_COMPONENTS = tuple(dict.fromkeys(s.component for f in PIPELINES for s in f.slots))
TOKENIZER_COMPONENTS = tuple(dict.fromkeys(s.tokenizer for f in PIPELINES for s in f.slots))


# diffusers pipeline classes (by their name's start) of model lines erasekit does not patch yet; their text encoders
# may share component names with the families above (FLUX.2's text_encoder is no CLIP)
NOT_YET: dict[str, NotYet] = {start: line for line in unpatched.LINES for start in line.pipelines}


def not_yet(pipeline_class: str) -> NotYet | None:
    """The model line of a diffusers pipeline class erasekit does not patch yet (FLUX.2's); None otherwise."""
    return next((line for start, line in NOT_YET.items() if pipeline_class.startswith(start)), None)


def unpatched_encoder(shapes: Mapping[str, tuple[int, ...]], classes: Collection[str] = ()) -> Unpatched | None:
    """The text encoder erasekit recognises but does not patch whose file holds the tensors ``shapes`` (name ->
    shape), or whose config names ``classes``: a kind's lookalike (umT5 beside T5 v1.1), else the language model of a
    line not patched yet (Qwen2.5-VL), in the order they are tried; None if none."""
    known = [*(u for k in ENCODER_KINDS.values() for u in k.lookalikes), *unpatched.ENCODERS]
    return next((u for u in known if u.matches(shapes) or u.named_by(classes)), None)


def unpatched_denoiser(shapes: Mapping[str, tuple[int, ...]]) -> NotYet | None:
    """The line not patched yet whose denoiser alone a file of the tensors ``shapes`` holds (tried before the
    families' ``denoiser_alone``: a FLUX.2 transformer has FLUX.1's blocks); None if none."""
    return next((line for line in unpatched.LINES if line.denoiser and line.denoiser.matches(shapes)), None)


def kind_of_lookalike(model: Unpatched) -> EncoderKind | None:
    """The encoder kind ``model`` is a lookalike of (T5 for umT5); None for the language models."""
    return next((k for k in ENCODER_KINDS.values() if model in k.lookalikes), None)


def known_encoders() -> list[Encoder]:
    """The trained encoders the pipeline families hold (CLIP ViT-L/14, ..., T5 v1.1 XXL), each once."""
    return list({s.encoder.title: s.encoder for f in PIPELINES for s in f.slots}.values())


def patched_encoders() -> str:
    """What erasekit patches, as messages say it: ``"CLIP and T5 v1.1 text encoders"``."""
    return f"{listing([k.supported or k.title for k in ENCODER_KINDS.values()])} text encoders"


def family(name: str) -> Family:
    """The family a patch or checkpoint names (its ``architecture``)."""
    return FAMILIES[name]


def by_components(
    components: Collection[str], setting: Callable[[str, str], Any], class_name: str = ""
) -> Family | None:
    """The pipeline family whose text encoders are ``components`` (in a model folder, a config folder or a loaded
    pipeline): the one its diffusers ``class_name`` names (``Family.diffusers_classes``: SD3.x without T5 has SDXL's
    components), else the one of those components, told apart where several are by ``setting(component, key)``, a
    value of that encoder's config, and else a family not known by its class names; None if none."""
    named = [f for f in PIPELINES if _named_by(f, class_name)]
    if named:
        return next((f for f in named if f.has_encoders(components)), None)
    same = [f for f in PIPELINES if f.has_encoders(components)]
    for f in sorted(same, key=lambda f: (f.told_apart is None, bool(f.diffusers_classes))):
        if f.told_apart is None or setting(*f.told_apart[:2]) == f.told_apart[2]:
            return f
    return None


def _named_by(f: Family, class_name: str) -> bool:
    """Whether a diffusers pipeline class (``FluxImg2ImgPipeline``) is one of ``f``'s (never one of a family not
    patched yet: ``Flux2Pipeline``)."""
    return bool(f.diffusers_classes) and class_name.startswith(f.diffusers_classes) and not_yet(class_name) is None


def of_pipeline(pipe: Any) -> Family | None:
    """The family of a loaded diffusers pipeline, from its class and the text-encoder components it has (and their
    configs)."""
    present = [c for c in ENCODER_COMPONENTS if getattr(pipe, c, None) is not None]
    return by_components(
        present, lambda c, key: getattr(getattr(getattr(pipe, c), "config", None), key, None), type(pipe).__name__
    )


def bare_by_class(names: Collection[str]) -> Family | None:
    """The family of a text encoder on its own whose transformers class is among ``names``."""
    return next((f for f in BARE if set(names) & set(f.slots[0].encoder.kind.transformers_classes)), None)


def by_bundled_config(name: str) -> Family:
    """The family of one of erasekit's bundled configs."""
    return next(f for f in FAMILIES.values() if name in f.bundled)


def single_file_encoders() -> set[tuple[str, str]]:
    """Every (naming, key prefix) at which a family's single files hold a text encoder."""
    return {where for f in FAMILIES.values() for sf in f.single_files for where in sf.encoders.values()}


def same_slots(a: str, b: str) -> bool:
    """Whether patches of family ``a`` fit family ``b`` slot for slot."""
    return a == b or b in family(a).kin or a in family(b).kin


def weight_shape(proj: str, hidden: int, intermediate: int) -> tuple[int, int]:
    """(out, in) of a projection's weight in an encoder of these widths."""
    out, inp = KIND_OF_PROJECTION[proj].shape(proj, "weight", hidden, intermediate)
    return out, inp


def listing(words: Sequence[str], last: str = "and") -> str:
    """``"SD1.x, SD2.x and SDXL"``."""
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} {last} {words[-1]}"


def lines() -> list[str]:
    """The model lines erasekit supports (SD1.x, SD2.x, SDXL, FLUX.1, SD3.x), as messages list them."""
    return list(dict.fromkeys(f.line for f in FAMILIES.values() if f.line))
