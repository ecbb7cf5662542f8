"""The settings of an erase run: :class:`EraseConfig`, the prompt templates, and which of a model's
recommended settings hold when the user gives others."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from ..errors import ErasekitError, InputFileError, invalid_setting
from .names import SlotName

# Textual inversion's template lists, as the reference recipe uses them.
OBJECT_TEMPLATES = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
)
STYLE_TEMPLATES = (
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a cropped painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
)
# Everyday captions whose conditioning the "anchored" recipe holds in place while the concept is erased.
GENERIC_ANCHORS = (
    "",
    "a photo of a dog",
    "a photo of a cat",
    "a person walking in a park",
    "a city street at night",
    "a bowl of fruit on a table",
    "a mountain landscape",
    "a portrait of a woman",
    "a portrait of a man",
    "a red car parked outside",
    "a house with a garden",
    "a painting of flowers",
    "a cup of coffee",
    "a beach at sunset",
    "a bird on a branch",
    "a plate of food",
    "a child playing with a ball",
    "an old building",
    "a forest in autumn",
    "a boat on a lake",
    "a computer on a desk",
    "a green field",
    "a blue sky with clouds",
    "a book on a shelf",
    "a horse in a field",
    "a snowy road",
    "a kitchen interior",
    "a drawing of a tree",
    "a bicycle leaning on a wall",
    "a glass of water",
    "a cartoon character",
)


# what the same settings compute, recorded with them: raised when an erase with unchanged settings computes
# another patch, so that a batch rerun redoes patches made before. 2: every output the UNet reads held, in units of
# everyday captions' spread, the empty prompt in every step; low-rank storage judged per output, on held-out prompts
ALGORITHM = 2

# the rank `train: factors` trains at unless `rank` says another: a default FLUX.1 patch stays under 64 MB at real
# size (T5-XXL's 72 FFN matrices of 10240 x 4096 at rank 16 in BF16: 72 x 16 x (10240 + 4096) x 2 bytes = 33.0 MB,
# CLIP-L's 24 matrices 2.9 MB, its biases 0.1 MB)
FACTOR_RANK = 16


class EraseConfig(BaseModel):
    """Every setting of an erase run; the defaults reproduce the published recipe. Recorded in the patch."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["object", "style"] = "object"
    templates: list[str] | None = None  # overrides the kind's template list; each holds one "{}"
    # concept -> its own template list, in place of `templates` for that concept (its prompts in training, the
    # wordings it and --keep concepts are held in): e.g. a pattern in the wordings of patterns next to a colour
    concept_templates: dict[str, list[str]] = {}
    lr: float = Field(1e-5, gt=0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-6, gt=0)
    weight_decay: float = Field(1e-8, ge=0)
    batch_size: int = Field(2, ge=1)
    draws: int = Field(1, ge=1)  # noise draws (timestep, noise, prompt) per image per step
    epochs: int = Field(5, ge=1)
    steps: int | None = Field(None, ge=1)  # overrides epochs
    resolution: int = Field(512, ge=8)
    layers: list[int] | None = None  # text-encoder layers to train; None = all
    encoders: list[SlotName] | None = None  # SDXL: which encoders to train; None = all
    seed: int = 0
    device: str = "auto"
    # autocast dtype of the frozen UNet, and with train: factors the dtype the frozen text encoders are held in
    # (erasekit._torch.encoder_dtype; dense training holds them in fp32); auto: bf16 where the device computes it
    # natively, else fp32
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    flip: bool = True  # horizontal flip, p = 0.5, decided once per image
    patch_dtype: Literal["F32", "F16", "BF16"] = "BF16"
    # how each weight delta is stored. "auto": low-rank, per tensor the smallest rank (up to max_rank) whose effect
    # on the erase's prompts is within rank_tol of the trained delta's (see erasekit.erasing.compress); N: that rank;
    # "dense": the whole delta.
    rank: int | Literal["auto", "dense"] = "auto"
    rank_tol: float = Field(0.05, gt=0, lt=1)
    max_rank: int = Field(32, ge=1)
    # how each FFN weight trains. "dense": the weight itself, its delta stored per `rank` after the loop;
    # "factors": W computes as W + up @ down, LoRA-style, and Adam trains only the factors (and CLIP's biases) at
    # rank `rank` (auto: FACTOR_RANK), stored as trained, with no compression after the loop (see
    # erasekit.erasing.factors); "auto": factors where the erase trains a T5 (FLUX.1's and SD3.x's te3: training
    # T5-XXL's FFN densely holds 3.0 B weights, their gradients and Adam's two moments, 48 GB in float32), else
    # dense. for_kinds decides it before the erase runs.
    train: Literal["auto", "dense", "factors"] = "auto"
    cache: bool = True
    forget_check: bool = False  # also measure the denoising loss on fixed draws before and after (8 UNet passes)
    checkpointing: bool = False  # gradient checkpointing of the frozen UNet: less memory, about 1.3x the time
    # where the frozen denoiser's weights are held. "none": on the erase's device, whole. "blocks" (FLUX.1, SD3.x): the
    # transformer's blocks in CPU memory (pinned where CUDA is), each moved to the device for its forward pass and
    # again for the backward, where it is recomputed (erasekit.erasing.streaming): a GPU that cannot hold the
    # transformer beside the text encoders (FLUX.1-dev's 23.8 GB on 24 GB) runs the erase, for the time of moving
    # the blocks twice a step. The same results either way (up to float rounding)
    offload: Literal["none", "blocks"] = "none"
    # "paper": the published recipe, ascent only. "anchored": ascent plus a penalty that keeps the encoder's
    # output for other prompts (generic captions and --keep concepts) where it was, and an early stop when the
    # erasure tips (mean of the last `stop_window` losses above `stop_ratio` x the first ones).
    # "doco": concept domain correction (arXiv 2405.15304) on the text encoders: a discriminator tells the frozen
    # model's predictions for the stand-in's prompts from the edited model's for the concept's, and the encoders
    # learn to fool it, with the anchored recipe's penalty holding other prompts (see erasekit.erasing.recipes.doco).
    recipe: Literal["paper", "anchored", "doco"] = "paper"
    # gradient surgery (erasekit.erasing.surgery): lambda, the share of the erasing gradient's conflict with the holding
    # gradient removed each step; None: off (doco: 1.0)
    surgery: float | None = Field(None, ge=0, le=1)
    disc_lr: float = Field(1e-4, gt=0)  # doco: the discriminator's learning rate (Adam, betas 0.5, 0.999)
    disc_warmup: int = Field(10, ge=0)  # doco: steps the discriminator trains alone first
    keep: list[str] = []  # concepts to protect (anchored and doco recipes); their prompts count `keep_weight` times
    anchor_weight: float = Field(30.0, ge=0)
    keep_weight: float = Field(5.0, ge=0)
    anchor_prompts: list[str] | None = None  # None: GENERIC_ANCHORS
    stop_ratio: float | None = Field(1.5, gt=1)  # None: never stop early
    stop_window: int = Field(5, ge=1)
    anchor_batch: int | None = Field(None, ge=1)  # anchors sampled per step (None: all, every step)
    # concept -> what stands in for it (anchored recipe). An anchor prompt naming the concept is then not dropped
    # but held at the original conditioning of the same prompt with the stand-in in the concept's place ("a red
    # circle" -> "a red square"), so the words around the concept keep their meaning. "" drops the word; several
    # stand-ins: the mean of their conditionings.
    stand_ins: dict[str, list[str]] = {}
    stand_in_weight: float = Field(0.3, ge=0)  # weight of those prompts, relative to other anchors

    @field_validator("stand_ins", mode="before")
    @classmethod
    def _listed(cls, v: Any) -> Any:
        return {k: [w] if isinstance(w, str) else w for k, w in v.items()} if isinstance(v, dict) else v

    @model_validator(mode="after")
    def _doco_surgery(self) -> EraseConfig:
        if self.recipe == "doco" and self.surgery is None:
            self.surgery = 1.0  # part of the method
        return self

    @model_validator(mode="after")
    def _factor_rank(self) -> EraseConfig:
        if self.train == "factors" and self.rank == "auto":
            self.rank = FACTOR_RANK  # factors are trained at one rank: auto sizes only what a dense erase stores
        return self

    @field_validator("train")
    @classmethod
    def _factors_are_stored_as_trained(cls, v: str, info: ValidationInfo) -> str:
        if v == "factors" and info.data.get("rank") == "dense":
            raise ValueError("factors are stored as they are trained, never dense; give rank N or auto, or train dense")
        return v

    @field_validator("rank", mode="before")
    @classmethod
    def _rank_spelling(cls, v: Any) -> Any:
        if v is None:  # settings written before 0.4 said None for dense
            return "dense"
        if isinstance(v, str) and v.strip().isdigit():
            v = int(v)
        if isinstance(v, int) and not isinstance(v, bool) and v < 1:
            raise ValueError(f"rank must be at least 1, auto or dense, got {v}")
        return v

    @field_validator("dtype")
    @classmethod
    def _no_fp16_training(cls, v: str) -> str:
        if v == "fp16":  # fp16's range: small gradients through the UNet flush to zero without loss scaling
            raise ValueError(
                "fp16 autocast is not used for training (its gradients into the text encoder underflow "
                "without loss scaling); use bf16, auto or fp32"
            )
        return v

    @field_validator("templates")
    @classmethod
    def _one_slot(cls, v: list[str] | None) -> list[str] | None:
        return v if v is None else _checked_templates(v)

    @field_validator("concept_templates")
    @classmethod
    def _one_slot_each(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        return {concept: _checked_templates(t) for concept, t in v.items()}

    def for_kinds(self, kinds: Iterable[str]) -> EraseConfig:
        """These settings for an erase that trains encoders of ``kinds`` (``EncoderKind.name``: "clip", "t5"), with
        ``train: auto`` decided: factors where a T5 trains (unless ``rank`` is dense), else dense. Settings already
        decided come back as they are."""
        if self.train != "auto":
            return self
        factors = "t5" in set(kinds) and self.rank != "dense"
        return EraseConfig.model_validate(self.model_dump() | {"train": "factors" if factors else "dense"})

    def template_list(self) -> list[str]:
        return list(self.templates or (STYLE_TEMPLATES if self.kind == "style" else OBJECT_TEMPLATES))

    def templates_for(self, concept: str) -> list[str]:
        """The templates ``concept`` is worded in: its own (``concept_templates``, any case) or the erase's."""
        own = {k.lower(): t for k, t in self.concept_templates.items()}.get(concept.lower())
        return list(own) if own else self.template_list()

    def hyperparameters(self) -> dict[str, Any]:
        """What the manifest records (device and cache are where it ran, not what it computed)."""
        hp = self.model_dump(
            mode="json", exclude={"device", "cache", "seed", "forget_check", "checkpointing", "offload"}
        )
        if self.rank != "auto":
            hp.pop("rank_tol")
            hp.pop("max_rank")
        if self.train != "factors":  # dense (or not yet decided): as every patch recorded it before factors
            hp.pop("train")
        for k in ("disc_lr", "disc_warmup") if self.recipe != "doco" else ("stop_ratio", "stop_window"):
            hp.pop(k)
        if self.surgery is None:
            hp.pop("surgery")
        if not self.concept_templates:
            hp.pop("concept_templates")
        if self.recipe == "paper" and self.surgery is None:
            for k in (
                "keep",
                "anchor_weight",
                "keep_weight",
                "anchor_prompts",
                "stop_ratio",
                "stop_window",
                "anchor_batch",
                "stand_ins",
                "stand_in_weight",
            ):
                hp.pop(k)
        elif self.anchor_prompts is None:
            hp["anchor_prompts"] = list(GENERIC_ANCHORS)
        return hp | {"algorithm": ALGORITHM}


def recorded_defaults(recipe: str) -> dict[str, Any]:
    """Each setting as a patch records it when left at its default (as JSON; the anchors as the captions they stand
    for) in an erase with ``recipe``, where a recipe's own default differs (doco's surgery): what ``inspect`` tells
    the settings an erase changed from. ``recipe`` itself at the published recipe's."""
    try:
        config = EraseConfig(recipe=recipe)
    except ValueError:  # a recipe of a newer erasekit: the settings every recipe starts from
        config = EraseConfig()
    return config.model_dump(mode="json") | {"recipe": EraseConfig().recipe, "anchor_prompts": list(GENERIC_ANCHORS)}


def _checked_templates(templates: list[str]) -> list[str]:
    if not templates:
        raise ValueError("give at least one template")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ValueError(f"template {bad[0]!r} must contain exactly one {{}} for the concept")
    return templates


# Settings a model's erasekit.json recommends because of what the model is (its image size, where bf16 pays);
# they hold whatever the recipe. Every other recommendation tunes the model's own recipe and holds only for it.
MODEL_PROPERTIES = ("resolution", "dtype")


def recommended_for(model_settings: dict[str, Any], concepts: list[str]) -> dict[str, Any]:
    """A model's recommended erase settings (its ``erasekit.json``) for these concepts: its ``erase`` settings, with
    what its ``erase_concepts`` recommends for each concept laid over them: ``templates`` become that concept's own
    (``concept_templates``, e.g. the wordings a pattern is held in, which suit no colour), ``anchor_prompts_extra``
    is appended to the anchors, and any other setting holds where every concept of the erase recommends the same."""
    rec = dict(model_settings.get("erase", {}))
    per_concept = {k.lower(): v for k, v in model_settings.get("erase_concepts", {}).items()}
    overlays = [dict(per_concept.get(c.lower()) or {}) for c in concepts]
    own = {c: o.pop("templates") for c, o in zip(concepts, overlays) if "templates" in o}
    extra = list(dict.fromkeys(a for o in overlays for a in o.pop("anchor_prompts_extra", [])))
    if overlays and all(o == overlays[0] for o in overlays):
        rec |= overlays[0]
    if own:
        rec["concept_templates"] = own
    if extra:
        rec["anchor_prompts"] = list(rec.get("anchor_prompts") or GENERIC_ANCHORS) + extra
    return rec


def effective_settings(
    recommended: dict[str, Any], given: dict[str, Any], per_recipe: dict[str, dict[str, Any]] | None = None
) -> tuple[EraseConfig, dict[str, str]]:
    """The settings an erase runs with, and where each came from ("user", "model" or "default"):
    what the user gave always wins; a model's recommendations (``recommended``, for its own recipe) hold for
    another recipe only where ``per_recipe`` (erasekit.json's ``erase_recipes``) has an entry for it, which is laid
    over them; otherwise only what the model is (MODEL_PROPERTIES) holds: ``--recipe paper`` on a model that
    recommends ``anchored`` is the whole published recipe, but at the model's resolution. ``--epochs`` given alone
    replaces a recommended ``steps``, and ``templates`` given alone the recommended ``concept_templates``."""
    rec = dict(recommended)
    chosen = given.get("recipe", rec.get("recipe", "paper"))
    if chosen != rec.get("recipe", "paper"):
        own = (per_recipe or {}).get(chosen)
        rec = rec | own if own is not None else {k: v for k, v in rec.items() if k in MODEL_PROPERTIES}
    if "epochs" in given and "steps" not in given:
        rec.pop("steps", None)
    if "templates" in given and "concept_templates" not in given:  # the user's wordings are every concept's
        rec.pop("concept_templates", None)
    if "concept_templates" in given:  # per concept: the user's lists win, the model's stand for the other concepts
        given = given | {"concept_templates": rec.get("concept_templates", {}) | given["concept_templates"]}
    try:
        config = EraseConfig(**(rec | given))
    except ValueError as e:
        raise invalid_setting(e) from None
    sources = {
        name: "user" if name in given else "model" if name in rec else "default" for name in EraseConfig.model_fields
    }
    return config, sources


# -- settings as people write them (erase's options, a batch manifest) ---------------------------------------------


def parse_layers(spec: str) -> list[int]:
    """'0-11' / '3,5,7-9' -> a list of layer indices."""
    layers: list[int] = []
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            layers += list(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ErasekitError(
            f"layers {spec!r} is not a list of layers", "write it like 0-11 or 3,5,8-11", option="layers"
        ) from None
    return layers


def parse_stand_ins(items: list[str]) -> dict[str, list[str]]:
    """['circle=square', 'red=blue,green'] -> {'circle': ['square'], 'red': ['blue', 'green']}."""
    return {
        concept: [w.strip() for w in words.split(",")]
        for concept, words in _assignments(items, "stand_ins", "stand-in", "WORD", "circle=square")
    }


def parse_concept_templates(items: list[str]) -> dict[str, list[str]]:
    """['Van Gogh=a painting in the style of {}', 'van gogh={} style'] -> {'Van Gogh': [both templates]} (a concept's
    spellings in any case are one concept, named as first written)."""
    out: dict[str, list[str]] = {}
    for concept, template in _assignments(
        items, "concept_templates", "concept template", "TEMPLATE", "'Van Gogh=a painting in the style of {}'"
    ):
        key = next((k for k in out if k.lower() == concept.lower()), concept)
        out.setdefault(key, []).append(template.strip())
    return out


def _assignments(items: list[str], option: str, what: str, placeholder: str, example: str) -> list[tuple[str, str]]:
    """``CONCEPT=VALUE`` items as (concept, value), split at the first "="."""
    pairs = []
    for item in items:
        concept, eq, value = item.partition("=")
        if not eq or not concept.strip():
            raise ErasekitError(
                f"{what} {item!r} is not CONCEPT={placeholder}", f"write it as {example}", option=option
            )
        pairs.append((concept.strip(), value))
    return pairs


def read_templates_file(path: str | Path) -> list[str]:
    """A file of prompt templates, one per line (blank lines skipped)."""
    try:
        return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError as e:
        raise InputFileError(
            f"cannot read the templates file {path} ({e.strerror})", "check the path", option="templates_file"
        ) from None
