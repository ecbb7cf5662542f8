"""The shapes of the data that says what an architecture family and a text-encoder kind are.

An :class:`EncoderKind` (CLIP, T5) says what one layer's FFN holds and how files spell its keys; an
:class:`Encoder` is one trained model of a kind (CLIP ViT-L, OpenCLIP ViT-bigG); a :class:`Family` (SD1.x, SDXL
base, a CLIP text encoder alone) says which encoders sit in which slots, where its files and pipelines keep them,
how it is recognised, and what its denoiser reads. Plain frozen data and string formatting: no torch, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Dims = tuple[int, int, int]  # hidden width, FFN width, layers
# what a single checkpoint file of the latent-diffusion layout holds besides its text encoders: component -> key prefix
LDM_PARTS = (("unet", "model.diffusion_model."), ("vae", "first_stage_model."))


@dataclass(frozen=True)
class Naming:
    """How one convention spells an encoder kind's FFN tensors: the key after a file's own prefix."""

    name: str  # "hf", "oc": what a detected encoder records as its style; unique over every kind
    title: str  # "transformers", "openclip": as inspect shows it
    ffn: str  # "encoder.layers.{layer}.mlp.{proj}": one projection's module, below the file's prefix
    root: str = ""  # the module path above ``ffn`` in a whole model so named ("text_model." in a CLIPTextModel)
    renamed: dict[str, str] = field(
        default_factory=dict
    )  # erasekit's projection name -> this naming's, where they differ

    def path(self, layer: int | str, proj: str) -> str:
        """``encoder.layers.3.mlp.fc1``: the module of ``proj`` in ``layer``, below the file's prefix."""
        return self.ffn.format(layer=layer, proj=self.renamed.get(proj, proj))

    def key(self, prefix: str, layer: int, proj: str, kind: str) -> str:
        """The key of ``proj``'s ``kind`` (weight/bias) in ``layer`` of the encoder at ``prefix``."""
        return f"{prefix}{self.path(layer, proj)}.{kind}"

    def module(self, layer: int, proj: str) -> str:
        """The whole model's module path with dots as underscores (``text_model_encoder_layers_3_mlp_fc1``), as
        kohya and the UIs spell a network's module."""
        return (self.root + self.path(layer, proj)).replace(".", "_")

    def projection(self, spelled: str) -> str:
        """erasekit's name of a projection as this naming spells it (``c_fc`` -> ``fc1``)."""
        return next((p for p, s in self.renamed.items() if s == spelled), spelled)

    def key_pattern(self, projections: tuple[str, ...], kinds: tuple[str, ...]) -> re.Pattern[str]:
        """Matches every FFN key in this naming, with groups ``prefix``, ``layer``, ``proj`` (as spelled here), ``kind``."""
        names = [self.renamed.get(p, p) for p in projections]
        body = _fill(re.escape(self.ffn), r"\d+", names)
        return re.compile(rf"^(?P<prefix>.*?){body}\.(?P<kind>{'|'.join(kinds)})$")


@dataclass(frozen=True)
class Unpatched:
    """A model erasekit does not patch, told from the header of a weights file (its tensors' names and shapes) or
    the ``architectures`` of a transformers ``config.json``: a T5 that is not T5 v1.1 (umT5, T5 v1.0), the language
    model a newer family uses as its text encoder (Qwen2.5-VL), the denoiser of such a family. Refused in one line
    that says what it is (:attr:`what`) and how that shows (:attr:`evidence`), never read as something else."""

    what: str  # "a umT5 text encoder (Wan's)": as messages name it
    evidence: str  # "relative attention bias in every block": what in the file shows it
    # patterns (searched in each tensor name, so any prefix) of which every one names some tensor of the file
    keys: tuple[str, ...] = ()
    # (pattern, dimension, size): some tensor whose name matches has that size there (``shared.weight``'s vocabulary)
    sizes: tuple[tuple[str, int, int], ...] = ()
    classes: tuple[str, ...] = ()  # starts of transformers class names (``architectures``) of its model folders
    yet: bool = False  # part of a model line erasekit means to patch (its messages say "not yet")

    def matches(self, shapes: Mapping[str, tuple[int, ...]]) -> bool:
        """Whether the tensors named ``shapes`` (name -> shape) are this model's: every key pattern and size found."""
        if not (self.keys or self.sizes):
            return False
        found = all(any(re.search(k, name) for name in shapes) for k in self.keys)
        return found and all(
            any(re.search(k, name) and len(s) > dim and s[dim] == size for name, s in shapes.items())
            for k, dim, size in self.sizes
        )

    def named_by(self, classes: Collection[str]) -> bool:
        """Whether a config's ``architectures`` name this model."""
        return any(str(c).startswith(self.classes) for c in classes) if self.classes else False


@dataclass(frozen=True)
class NotYet:
    """A model line erasekit does not patch yet (Qwen-Image, FLUX.2), as its diffusers folders, its text encoders'
    files and a file of its denoiser alone are recognised and refused, naming its text encoders."""

    line: str  # "Qwen-Image"
    encoders: str  # "Qwen2.5-VL": its text encoders, as messages name them
    pipelines: tuple[str, ...]  # the starts of its diffusers pipeline class names ("QwenImage")
    denoiser: Unpatched | None = None  # how a file of its denoiser alone is told


@dataclass(frozen=True)
class EncoderKind:
    """A kind of text encoder: what one layer's FFN holds, and how files, modules and networks name it."""

    name: str  # "clip"
    title: str  # "CLIP": "not a CLIP text encoder"
    projections: tuple[str, ...]  # erasekit's names of one layer's FFN projections, in order; unique over every kind
    widening: tuple[str, ...]  # those from the hidden width to the FFN width (weight [FFN, hidden]); the rest go back
    biases: bool  # whether each projection has a bias
    namings: tuple[Naming, ...]  # how files spell its FFN keys; the first is transformers', which model folders use
    transformers_classes: tuple[str, ...]  # ``architectures`` in the config.json of a model folder of one encoder
    uis: tuple[str, ...]  # what loads a network into it: "comfyui", "a1111", "diffusers" (load_lora_weights)
    supported: str = ""  # what of the kind erasekit patches, as messages name it ("T5 v1.1"); its title if empty
    # encoders whose files hold keys of this kind's naming but which erasekit does not patch (umT5 beside T5 v1.1)
    lookalikes: tuple[Unpatched, ...] = ()
    # the keys of its transformers config.json that give its hidden width, FFN width and layers
    config_dims: tuple[str, str, str] = ("hidden_size", "intermediate_size", "num_hidden_layers")

    def dims_of(self, config: dict[str, Any]) -> tuple[Any, Any, Any]:
        """(hidden width, FFN width, layers) as a transformers ``config`` of this kind gives them; None where absent."""
        hidden, ffn, layers = self.config_dims
        return config.get(hidden), config.get(ffn), config.get(layers)

    @property
    def tensor_kinds(self) -> tuple[str, ...]:
        return ("weight", "bias") if self.biases else ("weight",)

    @property
    def folder_prefixes(self) -> tuple[str, ...]:
        """Key prefixes of a transformers model's weights: its root, or none (older saves)."""
        return tuple(dict.fromkeys(("", self.namings[0].root)))

    def shape(self, proj: str, kind: str, hidden: int, intermediate: int) -> tuple[int, ...]:
        out, inp = (intermediate, hidden) if proj in self.widening else (hidden, intermediate)
        return (out, inp) if kind == "weight" else (out,)

    def module(self, layer: int, proj: str) -> str:
        """The network module name of ``proj`` in ``layer``, without its slot's prefix."""
        return self.namings[0].module(layer, proj)

    def module_pattern(self, slots: tuple[str, ...]) -> re.Pattern[str]:
        """Matches the network module names of this kind's FFN projections in ``slots``: groups ``slot``,
        ``layer`` (no leading zeros), ``proj``."""
        template = (self.namings[0].root + self.namings[0].ffn).replace(".", "_")
        body = _fill(re.escape(template), r"0|[1-9]\d*", list(self.projections))
        return re.compile(rf"^lora_(?P<slot>{'|'.join(slots)})_{body}$")


def _fill(escaped: str, layer: str, projections: list[str]) -> str:
    """An escaped ``{layer}``/``{proj}`` template with both replaced by named groups."""
    alternatives = "|".join(re.escape(p) for p in projections)
    return escaped.replace(r"\{layer\}", f"(?P<layer>{layer})").replace(r"\{proj\}", f"(?P<proj>{alternatives})")


@dataclass(frozen=True)
class Encoder:
    """One trained text encoder of a kind, as a slot holds it."""

    title: str  # "OpenCLIP ViT-bigG/14"
    kind: EncoderKind
    largest: Dims  # the largest such encoder: a patch's manifest claiming more is refused before a tensor is read
    pad_token: str | None = None  # what its tokenizer pads a prompt with
    file: str = ""  # the file UI users keep it in on its own (ComfyUI's models/text_encoders/clip_l.safetensors)


@dataclass(frozen=True)
class Slot:
    """One text encoder of a family: its slot name, what it holds, and where a diffusers pipeline keeps it."""

    name: str  # "te1": kohya's name, and the start of a patch's module names (``lora_te1_...``)
    encoder: Encoder
    component: str = "text_encoder"  # the pipeline's component (folder and attribute) that holds it
    tokenizer: str = "tokenizer"  # the component of its tokenizer
    optional: bool = False  # a pipeline or single file of the family may be without it (SD3.x's T5)


@dataclass(frozen=True)
class SingleFile:
    """One way a single checkpoint file holds a family's text encoders."""

    layout: str  # "single-file-sdxl", as inspect shows it and patches record it
    encoders: dict[str, tuple[str, str]]  # slot -> (naming, key prefix up to the naming's FFN path)
    # a key prefix the file must also hold, where two families keep the same encoders alike (the SDXL refiner's
    # UNet ``label_emb``, which SD2.x lacks); a layout with a marker is tried before one without
    marker: str = ""


@dataclass(frozen=True)
class Conditioning:
    """What the denoiser reads from the text encoders: token states (a sequence it attends to) and pooled
    embeddings (one vector per prompt)."""

    hidden_from: tuple[str, ...]  # slots whose hidden states it reads as tokens, joined along the features
    # "last": the encoder's output (after its final layer norm); "penultimate": the hidden states before the last layer
    hidden_layer: Literal["last", "penultimate"] = "last"
    # slots whose last hidden states follow those tokens along the sequence (SD3.x's T5 after its two CLIPs'), the
    # joined CLIP features zero-padded to their width first
    sequence_from: tuple[str, ...] = ()
    pooled_from: tuple[str, ...] = ()  # slots whose pooled embeddings it also reads, joined along the features
    # whether a pooled embedding is taken after the encoder's text projection (``text_embeds``: SDXL, SD3.x) or
    # before it (``pooler_output``, the final-layer-normed end-of-text state: FLUX.1's CLIP-L)
    pooled_projected: bool = True
    size_ids: bool = False  # SDXL's size conditioning (original size, crop, target size), from no encoder

    @property
    def slots_read(self) -> tuple[str, ...]:
        """Every slot it reads from, those of the tokens first."""
        return tuple(dict.fromkeys((*self.hidden_from, *self.sequence_from, *self.pooled_from)))

    def layers_read(self, slot: str, layers: int) -> list[int]:
        """The layers of ``slot`` (of ``layers``) whose change reaches the denoiser: a pooled embedding is read
        after the last layer, penultimate hidden states before it."""
        return list(range(layers if slot in self.pooled_from else self._hidden_layers(slot, layers)))

    def pooled_only(self, slot: str, layer: int, layers: int) -> bool:
        """Whether ``layer`` reaches the denoiser only through ``slot``'s pooled embedding (every layer of FLUX.1's
        CLIP-L, whose tokens it does not read)."""
        return slot in self.pooled_from and layer >= self._hidden_layers(slot, layers)

    def _hidden_layers(self, slot: str, layers: int) -> int:
        """How many of ``slot``'s layers the token states the denoiser reads have passed through."""
        if slot in self.sequence_from:
            return layers
        if slot not in self.hidden_from:
            return 0
        return layers - 1 if self.hidden_layer == "penultimate" else layers


@dataclass(frozen=True)
class Sampling:
    """What generate and eval sample a pipeline with when they are given no steps or guidance: its makers'
    recommendation (erasekit's own 25 steps at CFG scale 7.5 for SD1.x, SD2.x and SDXL)."""

    steps: int = 25
    guidance: float = 7.5
    # what reads the guidance: "cfg", classifier-free guidance (the denoiser runs with and without the prompt);
    # "distilled", a guidance-distilled denoiser, as an input of its own (FLUX.1 dev's guidance embedding, one
    # pass, what Forge calls "Distilled CFG Scale"); "none", nothing (FLUX.1 schnell has no guidance embedding)
    guidance_kind: Literal["cfg", "distilled", "none"] = "cfg"
    max_sequence_length: int | None = None  # T5 tokens a prompt is padded to, where not the pipeline's default
    title: str = ""  # "FLUX.1 dev": whose recommendation it is, as messages name it; "" for erasekit's own
    # (component, config key, value) that tells the pipelines these are for from the family's others (FLUX.1
    # schnell: its transformer's "guidance_embeds" is false); None: the family's own
    when: tuple[str, str, Any] | None = None

    def describe(self) -> str:
        """``"28 steps, distilled guidance 3.5"``: the settings as messages name them."""
        guidance = {
            "cfg": f"CFG scale {self.guidance:g}",
            "distilled": f"distilled guidance {self.guidance:g}",
            "none": "no guidance",
        }[self.guidance_kind]
        return f"{self.steps} steps, {guidance}"


@dataclass(frozen=True)
class Family:
    """An architecture family: what a patch records as its base's ``architecture``, and everything that name means."""

    name: str  # "sdxl"
    title: str  # "SDXL base": as messages name it
    line: str | None  # "SDXL": the model line, as messages list what erasekit supports; None for an encoder alone
    slots: tuple[Slot, ...]  # its text encoders, in the order of their components
    single_files: tuple[SingleFile, ...]  # how single checkpoint files hold its encoders
    modelspec: str  # ModelSpec architecture id of its patches, before "/lora" or "/lycoris"
    ss_base_model_version: str  # kohya's metadata value
    ss_v2: bool = False  # kohya's ``ss_v2``: an SD 2.x base
    modelspec_variants: dict[str, str] = field(default_factory=dict)  # prediction type -> suffix of the id
    bare: bool = False  # a text encoder on its own: no pipeline, patched by matching FFN shapes, never run
    folder_layout: str = "diffusers"  # the layout name of its model folders
    # (component, key, value) of an encoder's config that tells it from families of the same components (SD2.x's
    # OpenCLIP text_encoder has "hidden_act": "gelu"); of those, the one without is the rest
    told_apart: tuple[str, str, str] | None = None
    kin: tuple[str, ...] = ()  # families whose patches fit this one slot for slot (the SDXL refiner and base)
    pipeline: str | None = None  # the diffusers pipeline class erase and generate load it with; None: they cannot
    # the starts of the class names of its diffusers pipelines, where its encoders' components and configs alone do
    # not tell it (an SD3.x folder without its T5 has SDXL's); a folder or pipeline of such a class is this family
    diffusers_classes: tuple[str, ...] = ()
    why_not_run: str = ""  # where they cannot: why, and what to run instead
    safety_checker: bool = False  # whether that pipeline has a safety checker (loaded without one)
    parts: tuple[tuple[str, str], ...] = LDM_PARTS  # what its single files hold besides the encoders
    # what a file of its denoiser alone holds, in each naming (every one of the key parts of one of them; BFL's
    # flux1-dev.safetensors, diffusers' transformer/diffusion_pytorch_model.safetensors): such a file is refused with
    # the encoder files to patch instead, and erase, generate and eval run it with those files
    denoiser_alone: tuple[tuple[str, ...], ...] = ()
    vae_file: str = "FILE"  # the file its VAE is kept in beside such a file (FLUX.1's ae.safetensors)
    flow_matching: bool = False  # its denoiser is trained by flow matching: no epsilon or v prediction type
    # the lists of its denoiser's blocks that erase's ``offload: blocks`` keeps in CPU memory and streams to the device
    # one block at a time (FLUX.1's transformer_blocks and single_transformer_blocks); empty: its denoiser is not
    # streamed (a UNet fits a GPU whole)
    streamed_blocks: tuple[str, ...] = ()
    bundled: tuple[
        str, ...
    ] = ()  # erasekit's bundled configs (checkpoints/configs/NAME); several: one per prediction type or variant
    # where its variants differ in the denoiser's shapes (FLUX.1 dev and schnell; SD3 medium, SD3.5 medium and large):
    # (bundled config, a part of a denoiser key that only that variant's files hold, what that key says), first
    # match wins; an empty part matches every file
    variants: tuple[tuple[str, str, str], ...] = ()
    conditioning: Conditioning | None = None  # what its denoiser reads; None where erasekit does not run it
    # UI -> (module prefix, naming) where a UI knows the family's encoder by a name of its own (the SDXL refiner)
    ui_modules: dict[str, tuple[str, str]] = field(default_factory=dict)
    uis: tuple[str, ...] = ("comfyui", "a1111", "diffusers")  # what erasekit exports its patches for
    # generate's and eval's defaults: its variants' (each with its ``when``), in the order they are tried, then the
    # family's own (the last, without one)
    sampling: tuple[Sampling, ...] = (Sampling(),)

    def slot(self, name: str) -> Slot:
        return next(s for s in self.slots if s.name == name)

    @property
    def components(self) -> tuple[str, ...]:
        """The pipeline components of its text encoders."""
        return tuple(s.component for s in self.slots)

    def has_encoders(self, components: Collection[str]) -> bool:
        """Whether ``components`` are the text encoders of a pipeline of this family: every one it must have, and
        none it has not."""
        return {s.component for s in self.slots if not s.optional} <= set(components) <= set(self.components)

    @property
    def pipeline_components(self) -> tuple[str, ...]:
        """Every component a model folder must have for erasekit to run it."""
        return (*(c for c, _ in self.parts), *(s.tokenizer for s in self.slots), "scheduler", *self.components)

    def modelspec_id(self, prediction_type: str | None) -> str:
        return self.modelspec + self.modelspec_variants.get(prediction_type or "epsilon", "")

    def sampling_of(self, setting: Callable[[str, str], Any]) -> Sampling:
        """The sampling defaults of a pipeline of this family whose components' configs ``setting(component, key)``
        reads: those of the first variant it is, else the family's own."""
        return next(s for s in self.sampling if s.when is None or setting(*s.when[:2]) == s.when[2])


def with_article(name: str) -> str:
    """``name`` with its article, as it is read aloud: "an SD3.x", "an sdxl", "an AuraFlow", "an epsilon", "a FLUX.1",
    "a T5", "a UMT5" (initials and names read letter by letter take "an" before an S; vowels "an", except U)."""
    return f"{'an' if name.lower().startswith('sd') or name[:1].upper() in 'AEIO' else 'a'} {name}"
