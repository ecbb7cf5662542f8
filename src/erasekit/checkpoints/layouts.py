"""Find the text encoders' FFN tensors in every local checkpoint layout people keep.

A checkpoint is one or more weight files (:class:`WeightFile`); each holds one or more
text encoders (:class:`EncoderSpec`) whose FFN tensors are found by key *suffix*, in every naming of every encoder
kind (:mod:`erasekit.families.encoders`: ``encoder.layers.{i}.mlp.fc1.weight`` or OpenCLIP's
``transformer.resblocks.{i}.mlp.c_fc.weight``), so files with or without the ``text_model.`` prefix read alike.
Which family a checkpoint is comes from the families' data (:mod:`erasekit.families`): the key prefixes of their
single files, the components of their folders. Detection is structural (key prefixes, configs), never by tensor
size, so tiny test models are detected like real ones.

Only the safetensors header is read here; no torch import unless a ``.ckpt``/``.bin``
pickle is opened (and then only with ``weights_only=True``).
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import IncompatiblePatchError, InputFileError, LayoutError
from ..families import (
    BARE,
    ENCODER_COMPONENTS,
    FAMILIES,
    PIPELINES,
    bare_by_class,
    by_components,
    kind_of_lookalike,
    lines,
    listing,
    not_yet,
    patched_encoders,
    single_file_encoders,
    unpatched_denoiser,
    unpatched_encoder,
    with_article,
)
from ..families.base import EncoderKind, Family, Naming, NotYet, SingleFile, Slot, Unpatched
from ..families.encoders import ENCODER_KINDS, KIND_OF_NAMING, NAMINGS
from ..families.encoders.t5 import T5_XXL
from ..format import _st

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

# every naming of every encoder kind, with the pattern of its FFN keys
_KEY_PATTERNS = [(n, n.key_pattern(k.projections, k.tensor_kinds)) for k in ENCODER_KINDS.values() for n in k.namings]
_SINGLE_FILE_ENCODERS = single_file_encoders()  # (naming, key prefix) of every family's single files


@dataclass(frozen=True)
class EncoderSpec:
    """One text encoder inside one weight file."""

    slot: str
    style: str  # the naming of its keys: "hf" (transformers CLIPTextModel) or "oc" (OpenCLIP resblocks)
    prefix: str
    hidden: int
    intermediate: int
    layers: int

    @property
    def naming(self) -> Naming:
        return NAMINGS[self.style]

    @property
    def encoder_kind(self) -> EncoderKind:
        return KIND_OF_NAMING[self.style]

    @property
    def projections(self) -> tuple[str, ...]:
        return self.encoder_kind.projections

    @property
    def biased(self) -> bool:
        """Whether its FFN projections have biases (CLIP's do, T5's do not)."""
        return self.encoder_kind.biases

    def key(self, layer: int, proj: str, kind: str) -> str:
        """Checkpoint key of ``proj`` (fc1/fc2, wi_0/wi_1/wo) ``kind`` (weight/bias) in ``layer``."""
        return self.naming.key(self.prefix, layer, proj, kind)

    def shape(self, proj: str, kind: str) -> tuple[int, ...]:
        return self.encoder_kind.shape(proj, kind, self.hidden, self.intermediate)

    def tensors(self) -> Iterator[tuple[int, str, str]]:
        """(layer, proj, kind) of every FFN tensor, in a stable order."""
        return itertools.product(range(self.layers), self.projections, self.encoder_kind.tensor_kinds)

    @property
    def dims(self) -> tuple[int, int, int]:
        return (self.hidden, self.intermediate, self.layers)


class WeightFile:
    """A weights file (safetensors or pickle) and the encoders it holds."""

    def __init__(self, path: Path, label: str) -> None:
        self.path = path
        self.label = label  # "text_encoder/model.fp16.safetensors"; "" for a single-file checkpoint
        self.format = "pickle" if path.suffix.lower() in PICKLE_SUFFIXES else "safetensors"
        self.encoders: dict[str, EncoderSpec] = {}
        self._header: _st.Header | None = None
        self._state: dict[str, Any] | None = None

    # -- tensor access -------------------------------------------------------------------------
    @property
    def header(self) -> _st.Header:
        if self._header is None:
            self._header = _st.read_header(self.path, err=LayoutError, what="checkpoint")
        return self._header

    @property
    def state_dict(self) -> dict[str, Any]:
        """The pickle's tensors, loaded with ``weights_only=True`` (never arbitrary code)."""
        if self._state is None:
            self._state = load_pickle_state_dict(self.path)
        return self._state

    def tensor_info(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """name -> (safetensors dtype code, shape) for every tensor in the file."""
        if self.format == "safetensors":
            return {n: (e.dtype, e.shape) for n, e in self.header.entries.items()}
        from .._torch import dtype_code

        return {n: (dtype_code(t.dtype), tuple(t.shape)) for n, t in self.state_dict.items()}

    def read_numpy(self, key: str) -> np.ndarray:
        """The tensor as float32 numpy (exact widening from F16/BF16)."""
        if self.format == "safetensors":
            with open(self.path, "rb") as f:
                return _st.read_array(f, self.header.entries[key]).astype(np.float32, copy=False)
        return self.state_dict[key].float().numpy()

    def read_raw(self, key: str) -> bytes:
        """Exact stored bytes (little-endian) of one tensor."""
        if self.format == "safetensors":
            with open(self.path, "rb") as f:
                return _st.read_raw(f, self.header.entries[key])
        from .._torch import tensor_bytes

        return tensor_bytes(self.state_dict[key])

    @property
    def display(self) -> str:
        return self.label or self.path.name

    @property
    def parts(self) -> list[WeightFile]:
        """The files on disk it is stored in: itself (a sharded file: its shards)."""
        return [self]

    def part(self, key: str) -> WeightFile:
        """The file on disk that holds tensor ``key``: the one an in-place write rewrites, and the undo journal names."""
        return self

    def ffn_keys(self) -> list[tuple[str, str, int, str, str]]:
        """(slot, key, layer, proj, kind) for every FFN tensor, in a stable order."""
        return [
            (slot, enc.key(i, proj, kind), i, proj, kind)
            for slot, enc in sorted(self.encoders.items())
            for i, proj, kind in enc.tensors()
        ]


class ShardedFile(WeightFile):
    """A weights file saved in shards (``model-00001-of-00002.safetensors``, ``model-00002-of-00002.safetensors``) and
    the index that maps each tensor to its shard (``model.safetensors.index.json``), read as one file: ``path`` and
    ``label`` are the index's. Each tensor is read from, written to and journaled in the shard that holds it
    (:meth:`part`)."""

    def __init__(self, index: Path, label: str, shards: list[WeightFile], holder: dict[str, WeightFile]) -> None:
        super().__init__(index, label)
        self.format = "safetensors"
        self.shards = shards
        self._holder = holder  # tensor name -> the shard that holds it, as the index's weight_map says

    @property
    def header(self) -> _st.Header:
        raise TypeError(f"{self.display} has one header per shard; read part(key).header")

    @property
    def parts(self) -> list[WeightFile]:
        return list(self.shards)

    def part(self, key: str) -> WeightFile:
        return self._holder[key]

    def tensor_info(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {n: info for shard in self.shards for n, info in shard.tensor_info().items()}

    def read_numpy(self, key: str) -> np.ndarray:
        return self.part(key).read_numpy(key)

    def read_raw(self, key: str) -> bytes:
        return self.part(key).read_raw(key)

    @property
    def display(self) -> str:
        return f"{self.label} ({len(self.shards)} shards)"


EIGHT_BIT_FLOATS = ("F8_E4M3", "F8_E5M2")


def check_patchable(dtype: str, what: str) -> None:
    """Refuse a tensor a patch cannot be added to exactly: 8-bit floats (``t5xxl_fp8_e4m3fn.safetensors``, whose
    3 mantissa bits round a patch's change away or to a whole step) and whatever is not a float."""
    if dtype in EIGHT_BIT_FLOATS:
        raise IncompatiblePatchError(
            f"{what} is stored as {dtype} (8-bit float), too coarse to add a patch's change to exactly",
            "patch an fp16 or bf16 copy of the model instead (e.g. t5xxl_fp16.safetensors)",
        )
    if dtype not in (*_st.FLOAT_DTYPES, "F64"):
        raise IncompatiblePatchError(f"{what} is stored as {dtype}", "erasekit patches floating-point weights only")


def check_ffn_dtypes(ckpt: Checkpoint) -> None:
    """:func:`check_patchable` on every FFN tensor of ``ckpt``, from the headers alone (before anything is copied
    or read)."""
    for wf in ckpt.files:
        info = wf.tensor_info()
        for _, key, *_ in wf.ffn_keys():
            check_patchable(info[key][0], f"{wf.part(key).display}: tensor {key}")


@dataclass
class Checkpoint:
    """A detected checkpoint: where it is, what layout and architecture, and its weight files."""

    path: Path
    layout: str
    architecture: str
    files: list[WeightFile]
    notes: list[str] = field(default_factory=list)
    config: str | None = None  # the component configs a single file was loaded with, and why (model_configs)
    # the undo journal's generation when its files were last read as one state (in_place.read_consistently)
    read_at: tuple[int, bool] | None = field(default=None, compare=False)
    # the undo journal's hashes of tensors in files written since it stamped them (Journal.changed_since), so that one
    # command hashes each once: (weight file label, key) -> (the file's stamp when hashed, sha256)
    tensor_hashes: dict[tuple[str, str], Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def encoders(self) -> dict[str, EncoderSpec]:
        """One spec per slot (the first file's; every file of a slot has the same dims)."""
        out: dict[str, EncoderSpec] = {}
        for f in self.files:
            for slot, enc in f.encoders.items():
                out.setdefault(slot, enc)
        return out

    @property
    def disk_files(self) -> list[WeightFile]:
        """Its files on disk, each shard of a sharded file apart: what in-place writes and the undo journal name."""
        return [part for f in self.files for part in f.parts]

    @property
    def journal_files(self) -> dict[str, Path]:
        """label -> path of every file on disk, as the undo journal takes them."""
        return {f.label: f.path for f in self.disk_files}

    def describe(self) -> str:
        return f"{self.layout} ({self.architecture})"


def load_pickle_state_dict(path: Path) -> dict[str, Any]:
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except FileNotFoundError:
        raise InputFileError(f"{path} does not exist", "check the path") from None
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, zipfile errors...
        raise LayoutError(
            f"cannot read {path} as a weights-only torch pickle ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:160] if str(e) else ''})",
            "convert it to .safetensors with a trusted tool, or re-download it",
        ) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise LayoutError(f"{path} holds a {type(obj).__name__}, not a state dict", "name a checkpoint file")
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


def find_encoders(
    info: dict[str, tuple[str, tuple[int, ...]]], only: Any = None
) -> dict[tuple[str, str], EncoderSpec | None]:
    """Group FFN keys by (style, prefix) and validate each group (of ``only`` those (style, prefix) pairs, when
    given: another model's encoders, e.g. SD3's, are not judged); slot is filled in by the caller."""
    groups: dict[tuple[str, str], dict[tuple[int, str, str], tuple[int, ...]]] = defaultdict(dict)
    for key, (_dtype, shape) in info.items():
        for naming, pattern in _KEY_PATTERNS:
            if m := pattern.match(key):
                groups[(naming.name, m["prefix"])][(int(m["layer"]), naming.projection(m["proj"]), m["kind"])] = shape
                break
    found: dict[tuple[str, str], EncoderSpec | None] = {}
    for (style, prefix), tensors in groups.items():
        if only is not None and (style, prefix) not in only:
            continue
        found[(style, prefix)] = _encoder_of(style, prefix, tensors)
    return found


def _encoder_of(style: str, prefix: str, tensors: dict[tuple[int, str, str], tuple[int, ...]]) -> EncoderSpec | None:
    """The encoder whose FFN tensors (layer, proj, kind) -> shape are ``tensors``: sizes from layer 0's first
    projection, every tensor of every layer present in its shape; None where that first weight is not a matrix."""
    kind = KIND_OF_NAMING[style]
    first = tensors.get((0, kind.projections[0], "weight"))
    if first is None or len(first) != 2:
        return None
    intermediate, hidden = first if kind.projections[0] in kind.widening else first[::-1]
    spec = EncoderSpec("?", style, prefix, hidden, intermediate, layers=max(i for i, _, _ in tensors) + 1)
    for layer, proj, tensor_kind in spec.tensors():
        key, got = spec.key(layer, proj, tensor_kind), tensors.get((layer, proj, tensor_kind))
        if got is None:
            raise LayoutError(
                f"text encoder at {prefix or '(no prefix)'} lacks tensor {key}",
                "the file is incomplete or damaged; re-download it",
            )
        if tuple(got) != spec.shape(proj, tensor_kind):
            raise LayoutError(
                f"tensor {key} has shape {list(got)}, expected {list(spec.shape(proj, tensor_kind))}",
                f"the file is damaged or not {with_article(kind.title)} text encoder",
            )
    return spec


def transformers_encoder(info: dict[str, tuple[str, tuple[int, ...]]], slot: Slot) -> EncoderSpec | None:
    """The one text encoder in a transformers model's tensors (name -> (dtype, shape)) of the kind ``slot`` holds,
    as that slot; None unless there is exactly one."""
    kind = slot.encoder.kind
    found = [
        spec
        for (style, prefix), spec in find_encoders(info).items()
        if spec is not None and style == kind.namings[0].name and prefix in kind.folder_prefixes
    ]
    return with_slot(found[0], slot.name) if len(found) == 1 else None


# What a file without Stable Diffusion text encoders holds, judged by its key names (first match wins).
_LOOKS_LIKE = (
    ("an erasekit patch (apply it to a checkpoint: erasekit apply PATCH --to MODEL)", lambda k, m: "erasekit" in m),
    ("an erasekit export for a UI (inspect or apply the patch it was made from)", lambda k, m: "erasekit_export" in m),
    (
        "a LoRA/LyCORIS network, not a whole model",
        lambda k, m: any(
            x.startswith(("lora_", "lycoris_")) or ".lora_up." in x or ".lora_A." in x or ".hada_w1" in x for x in k
        ),
    ),
    (
        "a textual-inversion embedding",
        lambda k, m: (
            any(x in ("emb_params", "clip_l", "clip_g") for x in k) or any(x.startswith("string_to_param") for x in k)
        ),
    ),
    (
        "a UNet on its own",
        lambda k, m: any(
            x.startswith(("model.diffusion_model.input_blocks.", "input_blocks.")) or x.startswith("time_embedding.")
            for x in k
        ),
    ),
    (
        "a VAE on its own",
        lambda k, m: any(
            x.startswith(
                ("first_stage_model.", "encoder.conv_in.", "decoder.conv_out.", "encoder.down.", "decoder.up.")
            )
            for x in k
        ),
    ),
)


def looks_like(names: Any, metadata: dict[str, str]) -> str | None:
    """What a file that is not a Stable Diffusion checkpoint looks like, for the error message; None if unknown."""
    names = list(names)
    return next((what for what, test in _LOOKS_LIKE if test(names, metadata)), None)


def _denoiser_alone(names: list[str]) -> Family | None:
    """The family whose denoiser alone a file of tensors ``names`` holds (``Family.denoiser_alone``: FLUX.1's
    ``double_blocks.`` and ``single_blocks.``, at the start of a key or after a prefix); None if none."""
    has = lambda part: any(x.startswith(part) or f".{part}" in x for x in names)  # noqa: E731
    return next((f for f in FAMILIES.values() if any(all(map(has, parts)) for parts in f.denoiser_alone)), None)


def _shapes(info: dict[str, tuple[str, tuple[int, ...]]]) -> dict[str, tuple[int, ...]]:
    return {name: shape for name, (_dtype, shape) in info.items()}


def _supported() -> str:
    """What erasekit patches, as the fix of a refusal says it."""
    return f"erasekit patches {patched_encoders()}, those of {listing(lines())}"


def unpatched_error(where: str, model: Unpatched, evidence: str = "") -> LayoutError:
    """The error for a text encoder erasekit recognises but does not patch (umT5, Qwen2.5-VL): what it is, how that
    shows (``evidence``, else the model's), and what erasekit patches; for a lookalike of a kind, the file of that
    kind the families use."""
    kind = kind_of_lookalike(model)
    instead = ""
    if kind is not None:
        users = [
            (f.line, s.encoder.file) for f in PIPELINES for s in f.slots if s.encoder.kind is kind and s.encoder.file
        ]
        owners = listing([f"{line}'s" for line in dict.fromkeys(line for line, _ in users)])
        instead = f"; {owners} {kind.title} is {listing(list(dict.fromkeys(file for _, file in users)), 'or')}"
    return LayoutError(
        f"{where} is {model.what} ({evidence or model.evidence}), which erasekit does not patch"
        + (" yet" if model.yet else ""),
        _supported() + instead,
    )


def _refuse_lookalikes(where: str, info: dict[str, tuple[str, tuple[int, ...]]], kinds: Any = None) -> None:
    """Refuse a file of a text encoder erasekit does not patch: of the lookalikes of ``kinds`` (T5's: umT5, T5
    v1.0), or of any it recognises where ``kinds`` is None."""
    shapes = _shapes(info)
    if kinds is None:
        model = unpatched_encoder(shapes)
    else:
        model = next((u for k in kinds for u in k.lookalikes if u.matches(shapes)), None)
    if model is not None:
        raise unpatched_error(where, model)


def not_yet_error(where: str, line: NotYet, what: str) -> LayoutError:
    """The error for a file or folder of a model line erasekit does not patch yet, naming its text encoders."""
    return LayoutError(
        f"{where} {what}, which erasekit does not patch yet: {line.line} encodes prompts with {line.encoders}",
        f"{_supported()}, or such an encoder's own file or folder",
    )


def _no_encoders_in(path: Path, wf: WeightFile, info: dict[str, Any]) -> LayoutError:
    """The error for a single file without text encoders erasekit knows: for a denoiser alone, the encoder files to
    patch instead (or, for a line not patched yet, its text encoders); for a text encoder erasekit does not patch,
    what it is; else what the file looks like, or what erasekit reads."""
    line = unpatched_denoiser(_shapes(info))
    if line is not None and line.denoiser is not None:
        return not_yet_error(path.name, line, f"holds {line.denoiser.what} ({line.denoiser.evidence})")
    fam = _denoiser_alone(list(info))
    if fam is not None:
        files = [s.encoder.file for s in fam.slots]
        return LayoutError(
            f"{path.name} holds {with_article(fam.title)} {fam.parts[0][0]} but no text encoders",
            f"patch the text-encoder files it is used with instead ({listing(files)}), or a model folder",
        )
    model = unpatched_encoder(_shapes(info))
    if model is not None:
        return unpatched_error(path.name, model)
    looks = looks_like(info, wf.header.metadata if wf.format == "safetensors" else {})
    return LayoutError(
        f"{path.name} looks like {looks}, which erasekit does not erase or patch"
        if looks
        else f"{path} has no text encoder FFN tensors erasekit knows "
        f"({len(info)} tensors; neither {listing([*lines(), *(with_article(f.title) for f in BARE)], 'nor')})",
        f"erasekit supports {listing(lines())} checkpoints: one .safetensors/.ckpt file, a "
        "diffusers folder or a model id",
    )


def with_slot(spec: EncoderSpec, slot: str) -> EncoderSpec:
    return EncoderSpec(slot, spec.style, spec.prefix, spec.hidden, spec.intermediate, spec.layers)


def _detect_single_file(path: Path) -> Checkpoint:
    wf = WeightFile(path, "")  # label "": the checkpoint file itself, whatever it is renamed to
    info = wf.tensor_info()
    found = {k: v for k, v in find_encoders(info, only=_SINGLE_FILE_ENCODERS).items() if v is not None}
    if not found:
        raise _no_encoders_in(path, wf, info)
    _refuse_lookalikes(path.name, info, [KIND_OF_NAMING[style] for style, _ in found])
    family, layout = _single_file_layout(path, set(found), info)
    wf.encoders = {slot: with_slot(found[where], slot) for slot, where in layout.encoders.items()}
    return Checkpoint(path, layout.layout, family.name, [wf])


def _single_file_layout(path: Path, found: set[tuple[str, str]], info: Any) -> tuple[Family, SingleFile]:
    """The family and single-file layout that holds exactly the encoders ``found`` ((naming, prefix) pairs) in a
    file of the tensors ``info``: a layout with a marker key only where the file holds one."""
    layouts = [(f, sf) for f in FAMILIES.values() for sf in f.single_files]
    for f, sf in sorted(layouts, key=lambda pair: not pair[1].marker):
        if set(sf.encoders.values()) == found and (not sf.marker or any(k.startswith(sf.marker) for k in info)):
            return f, sf
    for f, sf in layouts:
        if found < set(sf.encoders.values()):
            raise LayoutError(
                f"{path} holds only {len(found)} of the {len(sf.encoders)} text encoders of {f.title}",
                "name a complete checkpoint",
            )
    names = {"/".join(sorted({sf.layout for _, sf in layouts if where in sf.encoders.values()})) for where in found}
    raise LayoutError(
        f"{path} mixes text-encoder layouts ({', '.join(sorted(names))})",
        "name one checkpoint; merged or partial files are not supported",
    )


# a shard of a file transformers saved in shards: model-00001-of-00002.safetensors, model.fp16-00001-of-00002.safetensors
_SHARD = re.compile(r"(?P<stem>(?:pytorch_)?model(?:\.[^-/\\]+)?)-\d{5}-of-\d{5}\.(?:safetensors|bin)")
_SHARDS_FIX = "re-download the shards with the index file"


def _index_name(stem: str) -> str:
    """The index transformers writes beside the shards of ``stem``: ``model.safetensors.index.json``, or for the
    variant ``model.fp16``, ``model.safetensors.index.fp16.json``."""
    variant = stem.partition(".")[2]
    return f"model.safetensors.index.{variant}.json" if variant else "model.safetensors.index.json"


def _plain_first(wf: WeightFile) -> tuple[bool, str]:
    """The plain file first: it is the full-precision copy that diffs and fingerprints read."""
    plain = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    return (wf.path.name not in plain, wf.path.name)


def _weight_files(folder: Path, root: Path) -> list[WeightFile]:
    """The weight files of a transformers model folder: every ``model*.safetensors`` (the shards an index names as
    one :class:`ShardedFile`), else every ``pytorch_model*.bin``; labels are relative to ``root``."""
    sharded = _one_per_shards(
        [_sharded_file(index, root) for index in sorted(folder.glob("model.safetensors.index*.json"))]
    )
    named = {shard.path.name for f in sharded for shard in f.shards}
    _refuse_loose_shards(folder, named)
    files: list[WeightFile] = [
        WeightFile(p, str(p.relative_to(root)))
        for p in folder.glob("model*.safetensors")
        if p.name not in named and not _SHARD.fullmatch(p.name)
    ]
    if files or sharded:
        return sorted([*files, *sharded], key=_plain_first)
    _refuse_pickle_shards(folder)
    return sorted(
        (WeightFile(p, str(p.relative_to(root))) for p in folder.glob("pytorch_model*.bin")), key=_plain_first
    )


def _one_per_shards(sharded: list[ShardedFile]) -> list[ShardedFile]:
    """One file for index files that name the same shards (a copy of the index under a variant's name: each agrees
    with the shards' headers, so they say the same), by the plain index's name where it is one of them: the shards
    are read, written and journaled once. Index files that share some shards but not all are refused."""
    kept: list[ShardedFile] = []
    for f in sorted(sharded, key=_plain_first):
        names = {shard.path.name for shard in f.shards}
        for k in kept:
            theirs = {shard.path.name for shard in k.shards}
            if names & theirs and names != theirs:
                raise LayoutError(
                    f"{k.path} and {f.path.name} both name the shard {sorted(names & theirs)[0]}, but not the same "
                    "shards",
                    "remove the index file that is not the model's",
                )
        if not any(names == {shard.path.name for shard in k.shards} for k in kept):
            kept.append(f)
    return kept


def _sharded_file(index: Path, root: Path) -> ShardedFile:
    """The shards ``index`` names, read as one file, once the index and the shards agree: every shard it names is
    there, holds the tensors it puts there and no others."""
    weight_map = read_json(index, _SHARDS_FIX).get("weight_map")
    if not (isinstance(weight_map, dict) and weight_map and all(isinstance(v, str) for v in weight_map.values())):
        raise LayoutError(f"{index} has no weight_map of tensor names to shard files", _SHARDS_FIX)
    shards: dict[str, WeightFile] = {}
    for name in sorted(set(weight_map.values())):
        if not name.endswith(".safetensors") or "/" in name or "\\" in name:
            raise LayoutError(
                f"{index} names {name!r} as a shard, which is not a .safetensors file beside it", _SHARDS_FIX
            )
        if not (index.parent / name).is_file():
            raise LayoutError(f"{index} names the shard {name}, which is missing", _SHARDS_FIX)
        shards[name] = WeightFile(index.parent / name, str((index.parent / name).relative_to(root)))
    _refuse_swapped_shards(index, weight_map, shards)
    for key, name in weight_map.items():
        if key not in shards[name].header.entries:
            raise LayoutError(f"{index} puts tensor {key} in {name}, which lacks it", _SHARDS_FIX)
    for name, shard in shards.items():
        stray = next((k for k in shard.header.entries if weight_map.get(k) != name), None)
        if stray is not None:
            raise LayoutError(f"{shard.path} holds tensor {stray}, which {index.name} does not put there", _SHARDS_FIX)
    holder = {key: shards[name] for key, name in weight_map.items()}
    return ShardedFile(index, str(index.relative_to(root)), list(shards.values()), holder)


def _refuse_swapped_shards(index: Path, weight_map: dict[str, str], shards: dict[str, WeightFile]) -> None:
    """Refuse shards that hold each other's tensors, as the index puts them: their names were swapped (renamed
    after a download, or by hand), which a re-download would undo along with the patches applied in place."""
    wanted = {name: {k for k, v in weight_map.items() if v == name} for name in shards}
    holds = {frozenset(shard.header.entries): name for name, shard in shards.items()}
    moved = {name: holds.get(frozenset(keys), name) for name, keys in wanted.items()}
    swapped = {name: other for name, other in moved.items() if other != name}
    if swapped and all(swapped.get(other) for other in swapped.values()):
        name, other = next(iter(swapped.items()))
        raise LayoutError(
            f"{index} puts the tensors that {other} holds in {name}"
            + (" and the other way round" if swapped.get(other) == name else "")
            + ": their names were swapped",
            "swap the shards' names back",
        )


def _refuse_loose_shards(folder: Path, named: set[str]) -> None:
    """Refuse shards (``model-00001-of-00002.safetensors``) that no index names: without it, which tensor is where
    is unknown, and transformers would not load them either."""
    loose = sorted(
        p.name for p in folder.glob("model*.safetensors") if _SHARD.fullmatch(p.name) and p.name not in named
    )
    if not loose:
        return
    index = _index_name(_SHARD.fullmatch(loose[0])["stem"])  # type: ignore[index]
    if (folder / index).exists():
        raise LayoutError(
            f"{folder / index} does not name {listing(loose)}, which {'lies' if len(loose) == 1 else 'lie'} beside it",
            "remove the stray shards, or re-download the index file with its shards",
        )
    raise LayoutError(f"{folder} has {listing(loose)} but no {index}", "re-download the index file with the shards")


def _refuse_pickle_shards(folder: Path) -> None:
    shards = sorted(p.name for p in folder.glob("pytorch_model*.bin") if _SHARD.fullmatch(p.name))
    if shards or (folder / "pytorch_model.bin.index.json").exists():
        raise LayoutError(
            f"{folder} holds a text encoder in pickle shards "
            f"({listing(shards) if shards else 'pytorch_model.bin.index.json'}), which erasekit does not read",
            "download its safetensors shards and model.safetensors.index.json instead, or save it with "
            "save_pretrained(safe_serialization=True)",
        )


def read_json(path: Path, fix: str = "repair or re-download the file") -> dict[str, Any]:
    """A JSON object from a model's file (model_index.json, a config, erasekit.json), or a one-line LayoutError."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # nested 200,000 deep
        raise LayoutError(f"{path} is not readable JSON ({type(e).__name__})", fix) from None
    if not isinstance(obj, dict):
        raise LayoutError(f"{path} is not a JSON object", fix)
    return obj


def _encoder_folder_files(root: Path, sub: str, slot: Slot) -> list[WeightFile]:
    folder = root / sub if sub else root
    files = _weight_files(folder, root)
    if not files:
        raise LayoutError(
            f"{folder} has no model.safetensors or pytorch_model.bin",
            "the folder is incomplete; re-download the text encoder weights",
        )
    for wf in files:
        info = wf.tensor_info()
        spec = transformers_encoder(info, slot)
        what = f"the shards of {wf.path}" if isinstance(wf, ShardedFile) else str(wf.path)
        _refuse_lookalikes(what, info, None if spec is None else [slot.encoder.kind])
        if spec is None:
            kind = slot.encoder.kind
            what = f"the shards of {wf.path} do" if isinstance(wf, ShardedFile) else f"{wf.path} does"
            raise LayoutError(
                f"{what} not look like {with_article(kind.title)} text encoder "
                f"(no {kind.namings[0].path('N', kind.projections[0])}.weight)",
                "re-download the text encoder weights",
            )
        wf.encoders[slot.name] = spec
    return files


def _detect_folder(path: Path) -> Checkpoint:
    if (path / "model_index.json").exists():
        return _detect_pipeline_folder(path)
    classes = listing([f.slots[0].encoder.kind.transformers_classes[0] for f in BARE], "or")
    if (path / "config.json").exists():
        cfg = read_json(path / "config.json")
        archs = cfg.get("architectures") or []
        bare = bare_by_class(archs)
        if bare is not None:
            return Checkpoint(path, bare.folder_layout, bare.name, _encoder_folder_files(path, "", bare.slots[0]))
        names = [str(a) for a in archs] if isinstance(archs, list) else []
        model = unpatched_encoder({}, names)
        if model is not None:
            raise unpatched_error(str(path), model, f"its config.json names {', '.join(names)}")
        raise LayoutError(
            f"{path}/config.json describes {archs or 'an unknown model'}, not a "
            f"{listing([f.title for f in BARE], 'or')}",
            f"name a diffusers pipeline folder or a {classes} folder",
        )
    raise LayoutError(
        f"{path} is a folder without model_index.json or config.json",
        f"name a diffusers pipeline folder, a {classes} folder, or a single checkpoint file",
    )


def _detect_pipeline_folder(path: Path) -> Checkpoint:
    """A diffusers folder: its family from the text-encoder components its ``model_index.json`` names and it has
    (and, where families share those, a setting of the first encoder's config)."""
    index = read_json(path / "model_index.json")

    def has(component: str) -> bool:
        v = index.get(component)
        return isinstance(v, list) and len(v) == 2 and v[0] is not None and (path / component).is_dir()

    present = [c for c in ENCODER_COMPONENTS if has(c)]
    class_name = str(index.get("_class_name", ""))
    _refuse_unknown_pipeline(path, class_name, [c for c in index if has(c)], present)
    family = by_components(present, lambda component, key: _config_json(path / component).get(key), class_name)
    if family is None:
        raise LayoutError(
            f"diffusers folder {path} has "
            + (
                f"text encoders {', '.join(present)} of no family erasekit knows"
                if present
                else "no text_encoder component"
            ),
            "erasekit edits the text encoder; name a pipeline that has one",
        )
    files = [
        wf
        for slot in family.slots
        if slot.component in present
        for wf in _encoder_folder_files(path, slot.component, slot)
    ]
    dims = {(slot, enc.dims) for f in files for slot, enc in f.encoders.items()}
    if len(dims) != len({slot for slot, _ in dims}):
        raise LayoutError(
            f"the weight variants in {path} disagree on text encoder sizes", "remove the stray variant file"
        )
    return Checkpoint(path, family.folder_layout, family.name, files)


def _refuse_unknown_pipeline(path: Path, class_name: str, components: list[str], known: list[str]) -> None:
    """Refuse a pipeline of a model line erasekit does not patch yet, named by its class (FLUX.2's text encoder has
    SD1.x's component name) or holding a text encoder component no family has."""
    line = not_yet(class_name)
    if line is not None:
        raise not_yet_error(f"diffusers folder {path}", line, f"is {with_article(line.line)} pipeline ({class_name})")
    unknown = [c for c in components if c.startswith("text_encoder") and c not in known]
    if unknown:
        raise LayoutError(
            f"diffusers folder {path} is a pipeline with text encoders erasekit does not know ({', '.join(unknown)}), "
            "which erasekit does not patch yet",
            f"{_supported()}, or such an encoder's own file or folder",
        )


def _config_json(folder: Path) -> dict[str, Any]:
    """A component's config.json, or nothing where it has none."""
    return read_json(folder / "config.json") if (folder / "config.json").exists() else {}


def detect(path: str | os.PathLike) -> Checkpoint:
    """Detect a checkpoint's layout. Raises :class:`InputFileError` or :class:`LayoutError`."""
    path = Path(path)
    if not path.exists():
        raise InputFileError(f"{path} does not exist", "check the path")
    if path.is_dir():
        return _refuse_a_part(_detect_folder(path))
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", *PICKLE_SUFFIXES):
        raise LayoutError(
            f"{path} is not a .safetensors or .ckpt file",
            "name a checkpoint (.safetensors, .ckpt) or a diffusers folder",
        )
    if _SHARD.fullmatch(path.name):
        raise LayoutError(
            f"{path} is one shard of a model saved in shards",
            f"name the folder that holds all its shards and their index ({path.parent})",
        )
    ckpt = _refuse_a_part(_detect_single_file(path))
    if suffix in PICKLE_SUFFIXES:
        ckpt.layout += " (pickle)"
    return ckpt


def _refuse_a_part(ckpt: Checkpoint) -> Checkpoint:
    """``ckpt``, unless a weight file holds an encoder's first layers only, as a shard of a model saved in shards
    does (``model-00001-of-00002.safetensors`` renamed ``model.safetensors``, or left without its index and the
    other shards): it would read as an encoder of fewer layers. The rule is cheap: fewer layers than the
    ``config.json`` beside it names (folders), or than a T5 v1.1 XXL of its widths has."""
    for wf in ckpt.files:
        for enc in wf.encoders.values():
            expected, whose = _layers_expected(wf, enc, ckpt.path.is_dir())
            if enc.layers < expected:
                raise LayoutError(
                    f"{wf.path} holds {enc.layers} of the {expected} layers {whose} (no "
                    f"{enc.key(enc.layers, enc.projections[0], 'weight')}): it is a part of a model saved in shards "
                    "(a shard renamed, or left without the others?)",
                    "put all its shards back beside their index file (model.safetensors.index.json), or download "
                    "them again"
                    if ckpt.path.is_dir()
                    else "name the whole encoder's file, or the folder that holds all its shards and their index",
                )
    return ckpt


def _layers_expected(wf: WeightFile, enc: EncoderSpec, folder: bool) -> tuple[int, str]:
    """How many layers ``enc`` should have, and who says so (0: unknown)."""
    config = _config_json(wf.path.parent) if folder else {}
    count = config.get("num_layers" if enc.encoder_kind is T5_XXL.kind else "num_hidden_layers")
    if isinstance(count, int) and not isinstance(count, bool):
        return count, "its config.json names"
    if enc.encoder_kind is T5_XXL.kind and (enc.hidden, enc.intermediate) == T5_XXL.largest[:2]:
        return T5_XXL.largest[2], f"{with_article(T5_XXL.title)} has"
    return 0, ""
