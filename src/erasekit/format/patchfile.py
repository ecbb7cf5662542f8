"""The ``.erasepatch`` format: manifest model, validating reader, deterministic atomic writer.

The normative description is ``docs/format.md``; this module is its reference implementation.
No torch here: patches are read and written with numpy, so ``erasekit inspect`` stays fast.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    JsonValue,
    Tag,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from .._version import __version__
from ..errors import InputFileError, PatchFormatError, PatchVersionError
from ..families import FAMILIES, family, weight_shape
from ..families.encoders import KIND_OF_PROJECTION
from . import _st
from .names import ARCH_SLOTS, SLOTS, Architecture, module_name, parse_module_name

FORMAT_VERSION = 1
EVALUATION_VERSION = 1  # the version of the records in ``Manifest.evaluations`` this erasekit writes and reads
PATCH_SUFFIX = ".erasepatch"
STORED_DTYPES = _st.FLOAT_DTYPES

# Upgrade functions from older format versions: UPGRADES[n] turns a version-n manifest dict into version n+1.
UPGRADES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}


class _Model(BaseModel):
    # strict: "32" is not an int and "yes" is not a bool; unknown fields are kept and reported as warnings
    model_config = ConfigDict(extra="allow", frozen=True, strict=True)


class Concept(_Model):
    name: str = Field(min_length=1)
    kind: Literal["object", "style", "attribute", "other"] = "object"


class Method(_Model):
    """How the deltas were made, with every setting needed to make them again."""

    name: str = Field(min_length=1)  # "fuchi-takagi-2024", "diff", ...
    hyperparameters: dict[str, JsonValue] = {}
    seed: int | None = None
    images_sha256: str | None = None
    num_images: int | None = None
    duration_s: float | None = None


class EncoderInfo(_Model):
    hidden: int = Field(gt=0)
    intermediate: int = Field(gt=0)
    layers: int = Field(gt=0)


# The largest text encoder (hidden, intermediate, layers) of each architecture's encoder slot (its family's
# ``Encoder.largest``): CLIP ViT-L (SD1, SDXL's first), OpenCLIP ViT-H (SD2; 24 blocks in single files) and OpenCLIP
# ViT-bigG (SDXL's second); a bare CLIP text encoder may be any of them. A manifest claiming more is refused before a
# tensor is read: these sizes are what bounds the memory of the commands that multiply low-rank factors out (merge,
# export).
MAX_ENCODER = {(f.name, s.name): s.encoder.largest for f in FAMILIES.values() for s in f.slots}


class TensorFingerprint(_Model):
    """Identity of one base tensor: exact (sha256 of its bytes in ``dtype``) and approximate (``sketch``),
    so that the same model stored at another precision is still recognised."""

    dtype: str
    shape: list[int]
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    sketch: list[float]


class BaseModelInfo(_Model):
    architecture: Architecture
    encoders: dict[str, EncoderInfo]
    tensors: dict[str, TensorFingerprint]  # "<module>.weight" / "<module>.bias"
    source: str | None = None
    config: str | None = None  # for a single-file base: the component configs it was loaded with, and why

    @field_validator("encoders")
    @classmethod
    def _slots(cls, v: dict[str, EncoderInfo]) -> dict[str, EncoderInfo]:
        bad = [s for s in v if s not in SLOTS]
        if bad or not v:
            raise ValueError(f"encoder slots must be among {SLOTS}, got {sorted(v)}")
        return v


class DeltaInfo(_Model):
    storage: Literal["dense", "lowrank"]
    rank: int | None = Field(default=None, gt=0)
    bias: bool = True
    # low-rank only: what the stored factors lost against the delta they stand for. error: relative error of
    # their effect on the layer's inputs (the erase's prompts; for diff, any input: the Frobenius error);
    # kept: the share of the delta's squared Frobenius norm they keep.
    error: float | None = Field(default=None, ge=0)
    kept: float | None = Field(default=None, ge=0)

    @model_serializer(mode="wrap")
    def _unset_fields_unwritten(self, handler: Any) -> dict[str, Any]:
        """Written only when known: a manifest without them reads and rewrites byte for byte."""
        data = handler(self)
        return {k: v for k, v in data.items() if not (k in ("error", "kept") and v is None)}

    @model_validator(mode="after")
    def _rank_iff_lowrank(self) -> DeltaInfo:
        if (self.storage == "lowrank") != (self.rank is not None):
            raise ValueError("rank is required for lowrank storage and not allowed for dense storage")
        return self


# -- recorded evaluations (``erasekit eval --record``) --------------------------------------------------------------
# A version-1 evaluation is closed: unknown keys are refused, not kept (a measurement a reader half understands is
# worse than none). Keys are added by a new EVALUATION_VERSION; a reader keeps records of versions it does not know
# unread (FutureEvaluation) and writes them back unchanged.

_SHA256 = r"^[0-9a-f]{64}$"
_UTC = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$"
Rate = Annotated[float | None, Field(ge=0, le=1, allow_inf_nan=False)]  # null: no image had that truth


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Rates(_Closed):
    """A share of images judged as the truth says, without the patch (``before``) and with it (``after``)."""

    before: Rate
    after: Rate


class JudgeInfo(_Closed):
    """What labelled the images: the toy world's CNN (``toyworld-cnn``) or a CLIP model folder (``clip``)."""

    kind: Literal["toyworld-cnn", "clip"]
    name: str = Field(min_length=1)  # file or folder name
    sha256: str = Field(pattern=_SHA256)  # of its weights (see docs/format.md)


class EvaluatedModel(_Closed):
    """The model the patch was evaluated on, named as ``base.source`` names one, and how it compares with the
    base the patch was made for (the fingerprints of the tensors the patch changes, before it was applied)."""

    name: str = Field(min_length=1)
    match: Literal["exact", "approx", "differs"]
    sha256: str = Field(pattern=_SHA256)  # of "<fingerprint name> <sha256>\n" over the patch's base tensors, sorted


class PromptSet(_Closed):
    """The distinct prompts, in order of first use: their count, the sha256 of each followed by a newline (UTF-8),
    and the prompts themselves when there are at most ``PROMPTS_LISTED`` of them."""

    count: int = Field(ge=1)
    sha256: str = Field(pattern=_SHA256)
    texts: list[str] | None = None

    @model_validator(mode="after")
    def _texts_match(self) -> PromptSet:
        if self.texts is not None:
            if len(self.texts) != self.count:
                raise ValueError(f"texts has {len(self.texts)} prompts, count says {self.count}")
            if prompts_sha256(self.texts) != self.sha256:
                raise ValueError("sha256 is not the hash of texts")
        return self


class Robustness(_Closed):
    """The target's rate under wordings the erase did not train on (paraphrases), over all their images."""

    wordings: PromptSet  # the paraphrase prompts, the concept filled in
    before: Rate
    after: Rate


class Evaluation(_Closed):
    """One ``erasekit eval`` of this patch, alone, on one model: the settings and the measured rates."""

    version: int = Field(ge=EVALUATION_VERSION, le=EVALUATION_VERSION)
    recorded_at: str = Field(pattern=_UTC)
    erasekit_version: str = Field(min_length=1)
    patch_id: str = Field(pattern=_SHA256)  # the tensors measured: a record whose id is not the patch's is stale
    concept: str = Field(min_length=1)  # the erased concept, as judged
    attribute: str  # what the judge read: shape, colour or pattern (toy world), "concept" (CLIP)
    labels: list[str]  # what the judge chose among for it
    judge: JudgeInfo
    model: EvaluatedModel
    strength: float = Field(allow_inf_nan=False)
    prompts: PromptSet
    seeds: list[int] = Field(min_length=1)
    images_per_prompt: int = Field(ge=1)
    steps: int = Field(ge=1)
    guidance: float = Field(allow_inf_nan=False)
    target: Rates  # how often the target concept is still drawn
    others: dict[str, Rates]  # each other concept of its attribute: how often it is still drawn
    attributes: dict[str, Rates]  # each other attribute, over all images
    attributes_elsewhere: dict[str, Rates]  # ... over the other concepts' images only
    robustness: Robustness | None = None

    def settings_key(self) -> tuple[Any, ...]:
        """What makes two records the same measurement (``record_evaluation`` keeps the newer): everything but the
        time, the erasekit version, the model's name and the results."""
        return (
            self.patch_id,
            self.concept,
            self.attribute,
            tuple(self.labels),
            self.judge.kind,
            self.judge.sha256,
            self.model.sha256,
            self.strength,
            self.prompts.sha256,
            tuple(self.seeds),
            self.images_per_prompt,
            self.steps,
            self.guidance,
        )


class FutureEvaluation(BaseModel):
    """A record of an evaluation version newer than this erasekit's: kept unread, written back as it came."""

    model_config = ConfigDict(extra="allow", frozen=True, strict=True)

    version: int = Field(gt=EVALUATION_VERSION)


def _evaluation_kind(value: Any) -> str:
    version = value.get("version") if isinstance(value, dict) else getattr(value, "version", None)
    return "future" if type(version) is int and version > EVALUATION_VERSION else "known"


_EVALUATION_TAGS = ("known", "future")
AnyEvaluation = Annotated[
    Annotated[Evaluation, Tag("known")] | Annotated[FutureEvaluation, Tag("future")], Discriminator(_evaluation_kind)
]
PROMPTS_LISTED = 64


def prompts_sha256(prompts: list[str]) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(p.encode("utf-8") + b"\n")
    return h.hexdigest()


class Manifest(_Model):
    format_version: int
    erasekit_version: str
    created_at: str
    title: str = Field(min_length=1)
    concepts: list[Concept] = []
    method: Method
    base: BaseModelInfo
    deltas: dict[str, DeltaInfo] = Field(min_length=1)
    # what the patch was measured to do (``erasekit eval --record``), oldest first; not part of the patch id
    evaluations: list[AnyEvaluation] = []


Factors = tuple[np.ndarray, np.ndarray | None]  # (up, down) of a low-rank delta, or (dense delta, None)


@dataclass
class Patch:
    """A loaded (or freshly made) patch: manifest plus its tensors, decoded to float32.

    ``dtypes`` says how each tensor is stored on disk; ``warnings`` collects what a reader
    tolerated (unknown manifest fields from a newer erasekit of the same format version).
    """

    manifest: Manifest
    tensors: dict[str, np.ndarray]
    dtypes: dict[str, str]
    path: Path | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def title(self) -> str:
        return self.manifest.title

    @functools.cached_property
    def patch_id(self) -> str:
        """sha256 of the tensor data in name order (the order erasekit writes): the same deltas give the same
        id. Computed once: a Patch's tensors are not meant to change after it is made."""
        return data_sha256(self.tensors, self.dtypes)

    def weight_delta(self, module: str) -> np.ndarray:
        """The dense float32 weight delta of ``module`` (low-rank factors multiplied out, in float64: out x in, at
        most the largest encoder a manifest may claim, :data:`MAX_ENCODER`). For norms and inner products, use
        :meth:`weight_factors`, which never multiplies out."""
        info = self.manifest.deltas[module]
        if info.storage == "dense":
            return self.tensors[f"{module}.diff"]
        up = self.tensors[f"{module}.lora_up.weight"].astype(np.float64)
        down = self.tensors[f"{module}.lora_down.weight"].astype(np.float64)
        alpha = float(self.tensors[f"{module}.alpha"])
        return ((up @ down) * (alpha / info.rank)).astype(np.float32)  # type: ignore[operator]

    def weight_shape(self, module: str) -> tuple[int, int]:
        """(out, in) of ``module``'s weight delta, without multiplying factors out."""
        if self.manifest.deltas[module].storage == "dense":
            return self.tensors[f"{module}.diff"].shape
        return self.tensors[f"{module}.lora_up.weight"].shape[0], self.tensors[f"{module}.lora_down.weight"].shape[1]

    def weight_factors(self, module: str) -> Factors:
        """``module``'s weight delta in float64 for :func:`delta_inner` and :func:`delta_norm`: low-rank as
        ``(up * alpha / rank, down)``, dense as ``(diff, None)``. Factors of a rank above the smaller side are
        multiplied out (the product is then no larger than they are)."""
        info = self.manifest.deltas[module]
        if info.storage == "dense":
            return self.tensors[f"{module}.diff"].astype(np.float64), None
        up = self.tensors[f"{module}.lora_up.weight"]
        down = self.tensors[f"{module}.lora_down.weight"]
        if info.rank > min(up.shape[0], down.shape[1]):
            return self.weight_delta(module).astype(np.float64), None
        scale = float(self.tensors[f"{module}.alpha"]) / info.rank  # type: ignore[operator]
        return up.astype(np.float64) * scale, down.astype(np.float64)

    def bias_delta(self, module: str) -> np.ndarray | None:
        return self.tensors.get(f"{module}.diff_b")

    def modules(self) -> list[tuple[str, str, int, str]]:
        """(module, slot, layer, proj) in file order."""
        out = []
        for m in sorted(self.manifest.deltas):
            slot, layer, proj = parse_module_name(m)  # type: ignore[misc]
            out.append((m, slot, layer, proj))
        return out


def delta_inner(a: Factors, b: Factors) -> float:
    """The Frobenius inner product of two weight deltas of one shape (:meth:`Patch.weight_factors`), computed from
    the factors, never their product: ``<U D, U' D'> = sum((U^T U') * (D D'^T))`` (rank x rank) and
    ``<A, U D> = sum((U^T A) * D)`` (rank x in)."""
    (ua, da), (ub, db) = a, b
    if da is None and db is None:
        return float(np.vdot(ua, ub))
    if da is None:
        return float(((ub.T @ ua) * db).sum())
    if db is None:
        return float(((ua.T @ ub) * da).sum())
    return float(((ua.T @ ub) * (da @ db.T)).sum())


def delta_norm(a: Factors) -> float:
    """The Frobenius norm of a weight delta from its factors: ``|U D|^2 = sum((U^T U) * (D D^T))``."""
    return math.sqrt(max(delta_inner(a, a), 0.0))  # rounding may leave a zero delta's square a hair below 0


def data_sha256(tensors: dict[str, np.ndarray], dtypes: dict[str, str]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(_st.encode(tensors[name], dtypes[name]))
    return h.hexdigest()


def expected_tensors(manifest: Manifest) -> dict[str, tuple[int, ...] | None]:
    """Every tensor name the manifest implies, with its shape (None: rank-dependent, checked separately)."""
    out: dict[str, tuple[int, ...] | None] = {}
    for m, info in manifest.deltas.items():
        slot, layer, proj = parse_module_name(m)  # type: ignore[misc]
        enc = manifest.base.encoders[slot]
        o, i = weight_shape(proj, enc.hidden, enc.intermediate)
        if info.storage == "dense":
            out[f"{m}.diff"] = (o, i)
        else:
            out[f"{m}.lora_up.weight"] = (o, info.rank)  # type: ignore[assignment]
            out[f"{m}.lora_down.weight"] = (info.rank, i)  # type: ignore[assignment]
            out[f"{m}.alpha"] = ()
        if info.bias:
            out[f"{m}.diff_b"] = (o,)
    return out


def _check_manifest(manifest: Manifest, where: str) -> None:
    for m in manifest.deltas:
        parsed = parse_module_name(m)
        if parsed is None:
            raise PatchFormatError(
                f"{where}: {m!r} is not a text-encoder FFN module name",
                "the file was not written by erasekit; re-create it",
            )
        slot, layer, _ = parsed
        enc = manifest.base.encoders.get(slot)
        if enc is None or layer >= enc.layers:
            raise PatchFormatError(
                f"{where}: module {m} is outside the base model's encoders {sorted(manifest.base.encoders)}",
                "re-create the patch",
            )
        if manifest.deltas[m].bias and not KIND_OF_PROJECTION[parsed[2]].biases:
            raise PatchFormatError(
                f"{where}: module {m} records a bias delta, but {KIND_OF_PROJECTION[parsed[2]].title} projections "
                "have no bias",
                "the file was not written by erasekit; re-create it",
            )
        for kind in ("weight", "bias") if manifest.deltas[m].bias else ("weight",):
            if f"{m}.{kind}" not in manifest.base.tensors:
                raise PatchFormatError(f"{where}: no base fingerprint for {m}.{kind}", "re-create the patch")
    allowed = ARCH_SLOTS[manifest.base.architecture]
    if not set(manifest.base.encoders) <= allowed:
        raise PatchFormatError(
            f"{where}: a {manifest.base.architecture} patch has encoder slots "
            f"{sorted(manifest.base.encoders)}, allowed are {sorted(allowed)}",
            "re-create the patch",
        )
    for slot, enc in manifest.base.encoders.items():
        claimed, largest = (enc.hidden, enc.intermediate, enc.layers), MAX_ENCODER[manifest.base.architecture, slot]
        if any(c > m for c, m in zip(claimed, largest)):
            raise PatchFormatError(
                f"{where}: encoder {slot} claims {_dims(claimed)}, larger than any "
                f"{manifest.base.architecture} text encoder ({_dims(largest)} at most)",
                "the file is damaged or was not written by erasekit; re-create it",
            )


def _dims(dims: tuple[int, int, int]) -> str:
    return f"hidden {dims[0]}, intermediate {dims[1]}, {dims[2]} layers"


def _upgrade(obj: dict[str, Any], where: str) -> dict[str, Any]:
    version = obj.get("format_version")
    if type(version) is not int or version < 1:
        raise PatchFormatError(f"{where}: manifest has no valid format_version", "re-create the patch")
    if version > FORMAT_VERSION:
        raise PatchVersionError(
            f"{where} uses format version {version}; this erasekit {__version__} reads up to {FORMAT_VERSION}",
            "upgrade erasekit (pip install -U erasekit)",
        )
    while version < FORMAT_VERSION:
        if version not in UPGRADES:
            raise PatchFormatError(f"{where}: no upgrade from format version {version}", "re-create the patch")
        obj = UPGRADES[version](obj)
        version = obj["format_version"]
    return obj


def _check_known_models(obj: dict[str, Any], where: str) -> None:
    """A newer erasekit may write a patch for an architecture or an encoder slot this one does not know (a family
    added since, at the same format version): say to upgrade, rather than that the patch is invalid."""
    base = obj.get("base")
    if not isinstance(base, dict):
        return
    arch, encoders = base.get("architecture"), base.get("encoders")
    unknown = [f"architecture {arch!r}"] if isinstance(arch, str) and arch not in ARCH_SLOTS else []
    unknown += [f"encoder slot {s!r}" for s in (encoders if isinstance(encoders, dict) else {}) if s not in SLOTS]
    writer = obj.get("erasekit_version")
    if unknown and isinstance(writer, str) and _is_newer(writer, __version__):
        raise PatchVersionError(
            f"{where} is for {unknown[0]}, which this erasekit {__version__} does not know (written by erasekit "
            f"{writer})",
            "upgrade erasekit (pip install -U erasekit)",
        )


def _is_newer(version: str, than: str) -> bool:
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version) > Version(than)
    except InvalidVersion:
        return False


def parse_manifest(text: str, where: str = "patch") -> tuple[Manifest, list[str]]:
    """Parse, upgrade and validate a manifest JSON string. Returns it and any warnings."""
    try:
        obj = json.loads(text, object_pairs_hook=_st.unique_keys)
    except _st.DuplicateKeyError as e:
        raise PatchFormatError(f"{where}: the erasekit manifest names {e.key!r} twice", "re-create the patch") from None
    except json.JSONDecodeError as e:
        raise PatchFormatError(
            f"{where}: the erasekit manifest is not valid JSON ({e.msg})", "re-create the patch"
        ) from None
    except RecursionError:
        raise PatchFormatError(
            f"{where}: the erasekit manifest is nested too deeply to read", "re-create the patch"
        ) from None
    if not isinstance(obj, dict):
        raise PatchFormatError(f"{where}: the erasekit manifest is not a JSON object", "re-create the patch")
    obj = _upgrade(obj, where)
    _check_known_models(obj, where)
    try:
        manifest = Manifest.model_validate(obj)
    except ValidationError as e:
        err = e.errors()[0]
        parts = list(err["loc"])
        if parts[:1] == ["evaluations"] and len(parts) > 2 and parts[2] in _EVALUATION_TAGS:
            del parts[2]  # the union's tag, not a field
        loc = ".".join(str(x) for x in parts)
        loc = loc if len(loc) <= 120 else loc[:100] + "..."  # a value nested hundreds deep names a long path
        fix = (
            "a recorded evaluation was edited or damaged; re-create the patch and record its evaluation again"
            if parts[:1] == ["evaluations"]
            else "re-create the patch"
        )
        raise PatchFormatError(f"{where}: invalid manifest field {loc or '(root)'}: {err['msg']}", fix) from None
    found: list[str] = []

    def collect(model: BaseModel, prefix: str) -> None:
        if isinstance(model, FutureEvaluation):
            return  # kept whole, reported below
        for k in model.model_extra or {}:
            found.append(prefix + k)
        for name in type(model).model_fields:
            val = getattr(model, name)
            vals = val.values() if isinstance(val, dict) else val if isinstance(val, list) else [val]
            for v in vals:
                if isinstance(v, BaseModel):
                    collect(v, f"{prefix}{name}.")

    collect(manifest, "")
    notes = (
        [
            f"{where}: ignoring manifest fields this erasekit does not know: {', '.join(sorted(set(found)))} "
            f"(written by erasekit {manifest.erasekit_version})"
        ]
        if found
        else []
    )
    future = [i for i, ev in enumerate(manifest.evaluations) if isinstance(ev, FutureEvaluation)]
    if future:
        versions = sorted({manifest.evaluations[i].version for i in future})
        notes.append(
            f"{where}: {len(future)} recorded evaluation(s) use evaluation format "
            f"{', '.join(f'v{v}' for v in versions)}; this erasekit {__version__} reads v{EVALUATION_VERSION}, "
            "keeps them unread and does not show them (upgrade erasekit to see them)"
        )
    _check_manifest(manifest, where)
    return manifest, notes


def read_manifest(path: str | Path) -> tuple[Manifest, _st.Header, list[str]]:
    """Read and validate header and manifest only (no tensor data)."""
    path = Path(path)
    header = _st.read_header(path, err=PatchFormatError, what="patch")
    text = header.metadata.get("erasekit")
    if text is None:
        hint = (
            "it looks like a LoRA/LyCORIS network; `erasekit diff` makes patches from two checkpoints"
            if any(k.startswith("lora_") for k in header.entries)
            else "name a file written by erasekit"
        )
        raise PatchFormatError(f"{path} is not an erasekit patch (no 'erasekit' manifest in its metadata)", hint)
    manifest, notes = parse_manifest(text, str(path))
    expected = expected_tensors(manifest)
    missing = sorted(set(expected) - set(header.entries))
    extra = sorted(set(header.entries) - set(expected))
    if missing or extra:
        what = (
            f"lacks {len(missing)} tensors the manifest lists (e.g. {missing[0]})"
            if missing
            else f"has {len(extra)} tensors the manifest does not list (e.g. {extra[0]})"
        )
        raise PatchFormatError(f"{path} {what}", "the file is damaged or was edited; re-create it")
    for name, shape in expected.items():
        ent = header.entries[name]
        if ent.dtype not in STORED_DTYPES:
            raise PatchFormatError(
                f"{path}: tensor {name} is {ent.dtype}; patches store F32, F16 or BF16", "re-create the patch"
            )
        if ent.shape != shape:
            raise PatchFormatError(
                f"{path}: tensor {name} has shape {list(ent.shape)}, the manifest implies {list(shape)}",  # type: ignore[arg-type]
                "the file is damaged; re-create it",
            )
    return manifest, header, notes


def is_patch_file(path: str | os.PathLike) -> bool:
    """True for ``*.erasepatch`` and for safetensors files whose metadata holds an erasekit manifest."""
    path = Path(path)
    if path.suffix == PATCH_SUFFIX:
        return True
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    try:
        return "erasekit" in _st.read_header(path).metadata
    except Exception:  # a corrupt checkpoint is reported by the checkpoint reader, with its own message
        return False


def load_patch(path: str | os.PathLike) -> Patch:
    """Read a ``.erasepatch`` and validate everything: header, manifest, tensor set, shapes, dtypes,
    finite values and the recorded data hash. Raises :class:`PatchFormatError` (or a subclass)."""
    path = Path(path)
    manifest, header, notes = read_manifest(path)
    tensors: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for name in sorted(header.entries, key=lambda n: header.entries[n].begin):
                ent = header.entries[name]
                raw = _st.read_raw(f, ent)
                digest.update(raw)
                arr = _st.to_numpy(raw, ent.dtype, ent.shape).astype(np.float32)
                if not np.isfinite(arr).all():
                    raise PatchFormatError(
                        f"{path}: tensor {name} holds NaN or infinite values",
                        "re-create the patch (the run that made it diverged)",
                    )
                tensors[name], dtypes[name] = arr, ent.dtype
    except OSError as e:
        raise InputFileError(f"cannot read {path} ({e.strerror})", "check the file and its permissions") from None
    recorded = header.metadata.get("modelspec.hash_sha256")
    if recorded is not None and recorded != "0x" + digest.hexdigest():
        raise PatchFormatError(
            f"{path}: tensor data does not match its recorded hash (corrupt file)", "re-download or re-create the patch"
        )
    patch = Patch(manifest, tensors, dtypes, path, notes)
    if list(header.entries) and sorted(header.entries) == sorted(header.entries, key=lambda n: header.entries[n].begin):
        patch.__dict__["patch_id"] = digest.hexdigest()  # data in name order: the file's hash is the id
    return patch


def manifest_json(m: Manifest) -> str:
    """The manifest as stored: canonical JSON. Fields added since format 1 are left out while unset, so patches
    that do not use them keep their bytes (and older readers see no unknown field)."""
    unset: dict[str, Any] = {}
    if m.base.config is None:
        unset["base"] = {"config"}
    if not m.evaluations:
        unset["evaluations"] = True
    return json.dumps(m.model_dump(mode="json", exclude=unset or None), sort_keys=True, separators=(",", ":"))


def modelspec_architecture(m: Manifest) -> str:
    """ModelSpec 1.0.1 id of the patch: the base model's (SD2.x split by prediction type) plus ``/lora`` for kohya
    low-rank files or ``/lycoris`` for files holding full (``.diff``) deltas."""
    v = m.method.hyperparameters.get("prediction_type") == "v_prediction" or "v_prediction" in (m.base.config or "")
    spec = family(m.base.architecture).modelspec_id("v_prediction" if v else "epsilon")
    kind = "lora" if all(d.storage == "lowrank" for d in m.deltas.values()) else "lycoris"
    return f"{spec}/{kind}"


def metadata_for(patch: Patch) -> dict[str, str]:
    """The safetensors ``__metadata__`` of a patch: manifest, ModelSpec and kohya keys."""
    m = patch.manifest
    base = family(m.base.architecture)
    meta = {
        "format": "pt",
        "erasekit": manifest_json(m),
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": modelspec_architecture(m),
        "modelspec.implementation": "erasekit",
        "modelspec.title": m.title,
        "modelspec.date": m.created_at,
        "modelspec.hash_sha256": "0x" + patch.patch_id,
        "ss_base_model_version": base.ss_base_model_version,
        "ss_v2": str(base.ss_v2),
        # kohya's own module for plain LoRA files; LyCORIS for anything holding full (.diff) deltas
        "ss_network_module": (
            "networks.lora" if all(d.storage == "lowrank" for d in m.deltas.values()) else "lycoris.kohya"
        ),
        "ss_output_name": m.title,
    }
    ranks = {d.rank for d in m.deltas.values() if d.storage == "lowrank"}
    if len(ranks) == 1:
        meta["ss_network_dim"] = str(ranks.pop())
    alphas = {float(patch.tensors[f"{k}.alpha"]) for k, d in m.deltas.items() if d.storage == "lowrank"}
    if len(alphas) == 1:
        meta["ss_network_alpha"] = f"{alphas.pop():g}"
    return meta


def save_patch(patch: Patch, path: str | Path) -> Path:
    """Write ``patch`` atomically. Same manifest and tensors -> same bytes."""
    path = Path(path)
    encoded = {n: (patch.dtypes[n], tuple(a.shape), _st.encode(a, patch.dtypes[n])) for n, a in patch.tensors.items()}
    for name, (dtype, shape, raw) in encoded.items():  # after encoding: F16 overflows to inf
        if not np.isfinite(_st.to_numpy(raw, dtype, shape)).all():
            from ..errors import NonFiniteError

            raise NonFiniteError(
                f"tensor {name} holds NaN or infinite values when stored as {dtype}; no patch written",
                "lower the learning rate or the number of steps, or store F32",
            )
    _st.write_safetensors(path, encoded, metadata_for(patch))
    patch.path = path
    return path


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def source_date() -> str | None:
    """``SOURCE_DATE_EPOCH`` (the reproducible-builds convention) as the time a new patch records, if set: the
    same erase then writes the same bytes (patches made so record no loop duration either)."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not epoch.isdigit():
        return None
    return datetime.fromtimestamp(int(epoch), timezone.utc).isoformat().replace("+00:00", "Z")


def storage_dtypes(tensors: dict[str, np.ndarray], dtype: str) -> dict[str, str]:
    """The storage dtype of each patch tensor: ``dtype`` for the deltas; F32 for low-rank ``alpha`` scalars,
    which must stay exact (BF16 holds integers only up to 256 exactly)."""
    return {n: "F32" if n.endswith(".alpha") else dtype for n in tensors}


# the alpha of every low-rank module erasekit writes: one value for all, so that diffusers and peft need no
# per-module alpha pattern (which they drop when its names do not match); the scale alpha / rank is made up for in
# lora_up, which holds rank / NETWORK_ALPHA times the delta's left factor
NETWORK_ALPHA = 1.0


def lowrank_tensors(module: str, up: np.ndarray, down: np.ndarray) -> dict[str, np.ndarray]:
    """The ``.lora_up``/``.lora_down``/``.alpha`` tensors of the weight delta ``up @ down`` (float32 factors)."""
    rank = down.shape[0]
    return {
        f"{module}.lora_up.weight": (np.asarray(up, dtype=np.float64) * (rank / NETWORK_ALPHA)).astype(np.float32),
        f"{module}.lora_down.weight": np.asarray(down, dtype=np.float32),
        f"{module}.alpha": np.array(NETWORK_ALPHA, dtype=np.float32),
    }


def delta_tensors(
    module: str, dw: np.ndarray | None, db: np.ndarray | None, factors: Any = None
) -> tuple[dict[str, np.ndarray], DeltaInfo]:
    """The patch tensors of one module's weight and bias deltas: dense (``.diff``), or, given ``factors`` (a
    :class:`~erasekit.format.lowrank.LowRank`), the weight delta as :func:`lowrank_tensors` (``dw`` unread, may be
    None); the bias delta as ``.diff_b``, none where ``db`` is None (a projection without a bias, as T5's)."""
    bias = db is not None
    out = {f"{module}.diff_b": np.asarray(db, dtype=np.float32)} if bias else {}
    if factors is None:
        out[f"{module}.diff"] = np.asarray(dw, dtype=np.float32)
        return out, DeltaInfo(storage="dense", bias=bias)
    out |= lowrank_tensors(module, factors.up, factors.down)
    return out, DeltaInfo(
        storage="lowrank", rank=factors.rank, bias=bias, error=round(factors.error, 6), kept=round(factors.kept, 6)
    )


def fingerprint(
    raw: bytes, dtype: str, shape: tuple[int, ...], sha256: str | None = None, sketch: bool = True
) -> TensorFingerprint:
    """Exact hash plus a precision-independent sketch (mean, rms and 8 evenly spaced values).

    ``sha256``: the hash of ``raw`` when the caller already has it. ``sketch=False`` leaves the sketch empty, for a
    comparison with a fingerprint of the same dtype, which the hash alone decides (the sketch's float64 pass is
    most of the cost)."""
    digest = sha256 or hashlib.sha256(raw).hexdigest()
    if not sketch:
        return TensorFingerprint(dtype=dtype, shape=list(shape), sha256=digest, sketch=[])
    arr = _st.to_numpy(raw, dtype, shape).reshape(-1)
    n = arr.size
    s1 = s2 = 0.0
    for i in range(0, n, 1 << 20):  # float64 sums, one chunk at a time: no full float64 copy
        chunk = arr[i : i + (1 << 20)].astype(np.float64)
        s1 += float(chunk.sum())
        s2 += float((chunk * chunk).sum())  # numpy's pairwise sum: the same bits whatever BLAS's thread count
    idx = np.linspace(0, n - 1, num=min(8, n)).astype(np.int64) if n else np.array([], np.int64)
    return TensorFingerprint(
        dtype=dtype,
        shape=list(shape),
        sha256=digest,
        sketch=[s1 / n if n else 0.0, math.sqrt(s2 / n) if n else 0.0] + [float(arr[i]) for i in idx],
    )


def compare_fingerprint(
    expected: TensorFingerprint, actual: TensorFingerprint
) -> Literal["exact", "approx", "differs"]:
    """``exact``: same bytes. ``approx``: same values at another precision (e.g. fp32 base, fp16 target)."""
    if expected.shape != actual.shape:
        return "differs"
    if expected.dtype == actual.dtype:
        return "exact" if expected.sha256 == actual.sha256 else "differs"
    a, b = np.array(expected.sketch), np.array(actual.sketch)
    if a.shape != b.shape:
        return "differs"
    rms = max(abs(a[1]), 1e-12)
    return "approx" if np.all(np.abs(a - b) <= 1e-2 * np.abs(a) + 1e-3 * rms) else "differs"


def new_manifest(
    *,
    title: str,
    architecture: str,
    encoders: dict[str, EncoderInfo],
    fingerprints: dict[str, TensorFingerprint],
    deltas: dict[str, DeltaInfo],
    method: Method,
    concepts: list[Concept] | None = None,
    source: str | None = None,
    config: str | None = None,
    created_at: str | None = None,
) -> Manifest:
    return Manifest(
        format_version=FORMAT_VERSION,
        erasekit_version=__version__,
        created_at=created_at or source_date() or now_iso(),
        title=title,
        concepts=concepts or [],
        method=method,
        base=BaseModelInfo(
            architecture=architecture,  # pydantic checks the name
            encoders=encoders,
            tensors=fingerprints,
            source=source,
            **({"config": config} if config else {}),
        ),
        deltas=deltas,
    )


__all__ = [
    "EVALUATION_VERSION",
    "FORMAT_VERSION",
    "PATCH_SUFFIX",
    "Concept",
    "DeltaInfo",
    "EncoderInfo",
    "EvaluatedModel",
    "Evaluation",
    "FutureEvaluation",
    "JudgeInfo",
    "Manifest",
    "Method",
    "Patch",
    "PromptSet",
    "Rates",
    "Robustness",
    "TensorFingerprint",
    "compare_fingerprint",
    "fingerprint",
    "load_patch",
    "module_name",
    "new_manifest",
    "parse_manifest",
    "read_manifest",
    "save_patch",
]
