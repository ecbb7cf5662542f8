"""Find the text encoders' FFN tensors in every local checkpoint layout people keep.

A checkpoint is one or more weight files (:class:`WeightFile`); each holds one or more
text encoders (:class:`EncoderSpec`) whose FFN tensors are found by key *suffix*
(``encoder.layers.{i}.mlp.fc1.weight`` or OpenCLIP's ``transformer.resblocks.{i}.mlp.c_fc.weight``),
so files with or without the ``text_model.`` prefix read alike. Detection is structural
(key prefixes, configs), never by tensor size, so tiny test models are detected like real ones.

Only the safetensors header is read here; no torch import unless a ``.ckpt``/``.bin``
pickle is opened (and then only with ``weights_only=True``).
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputFileError, LayoutError
from ..format import _st

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

_HF_RE = re.compile(r"^(.*?)encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$")
_OC_RE = re.compile(r"^(.*?)transformer\.resblocks\.(\d+)\.mlp\.(c_fc|c_proj)\.(weight|bias)$")
_OC_PROJ = {"fc1": "c_fc", "fc2": "c_proj"}

# single-file prefixes (up to the FFN suffix) -> (layout name, slot)
_SINGLE_FILE = {
    ("hf", "cond_stage_model.transformer.text_model."): ("single-file-sd1", "te"),
    ("hf", "cond_stage_model.transformer."): ("single-file-sd1-old", "te"),
    ("oc", "cond_stage_model.model."): ("single-file-sd2", "te"),
    ("hf", "conditioner.embedders.0.transformer.text_model."): ("single-file-sdxl", "te1"),
    ("oc", "conditioner.embedders.1.model."): ("single-file-sdxl", "te2"),
    ("oc", "conditioner.embedders.0.model."): ("single-file-embedder0", "te2"),
    ("hf", "text_model."): ("text-encoder-file", "te"),
    ("hf", ""): ("text-encoder-file", "te"),
}


@dataclass(frozen=True)
class EncoderSpec:
    """One text encoder inside one weight file."""

    slot: str
    style: str  # "hf" (transformers CLIPTextModel) or "oc" (OpenCLIP resblocks)
    prefix: str
    hidden: int
    intermediate: int
    layers: int

    def key(self, layer: int, proj: str, kind: str) -> str:
        """Checkpoint key of ``proj`` (fc1/fc2) ``kind`` (weight/bias) in ``layer``."""
        if self.style == "hf":
            return f"{self.prefix}encoder.layers.{layer}.mlp.{proj}.{kind}"
        return f"{self.prefix}transformer.resblocks.{layer}.mlp.{_OC_PROJ[proj]}.{kind}"

    def shape(self, proj: str, kind: str) -> tuple[int, ...]:
        out, inp = (self.intermediate, self.hidden) if proj == "fc1" else (self.hidden, self.intermediate)
        return (out, inp) if kind == "weight" else (out,)

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

    def ffn_keys(self) -> list[tuple[str, str, int, str, str]]:
        """(slot, key, layer, proj, kind) for every FFN tensor, in a stable order."""
        out = []
        for slot, enc in sorted(self.encoders.items()):
            for i in range(enc.layers):
                for proj in ("fc1", "fc2"):
                    for kind in ("weight", "bias"):
                        out.append((slot, enc.key(i, proj, kind), i, proj, kind))
        return out


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

    @property
    def encoders(self) -> dict[str, EncoderSpec]:
        """One spec per slot (the first file's; every file of a slot has the same dims)."""
        out: dict[str, EncoderSpec] = {}
        for f in self.files:
            for slot, enc in f.encoders.items():
                out.setdefault(slot, enc)
        return out

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
        m = _HF_RE.match(key)
        style = "hf"
        if not m:
            m = _OC_RE.match(key)
            style = "oc"
        if not m:
            continue
        proj = {"c_fc": "fc1", "c_proj": "fc2"}.get(m.group(3), m.group(3))
        groups[(style, m.group(1))][(int(m.group(2)), proj, m.group(4))] = shape
    found: dict[tuple[str, str], EncoderSpec | None] = {}
    for (style, prefix), tensors in groups.items():
        if only is not None and (style, prefix) not in only:
            continue
        n = max(i for i, _, _ in tensors) + 1
        w1 = tensors.get((0, "fc1", "weight"))
        if w1 is None or len(w1) != 2:
            found[(style, prefix)] = None
            continue
        spec = EncoderSpec("?", style, prefix, hidden=w1[1], intermediate=w1[0], layers=n)
        for i in range(n):
            for proj in ("fc1", "fc2"):
                for kind in ("weight", "bias"):
                    key = spec.key(i, proj, kind)
                    got = tensors.get((i, proj, kind))
                    if got is None:
                        raise LayoutError(
                            f"text encoder at {prefix or '(no prefix)'} lacks tensor {key}",
                            "the file is incomplete or damaged; re-download it",
                        )
                    if tuple(got) != spec.shape(proj, kind):
                        raise LayoutError(
                            f"tensor {key} has shape {list(got)}, expected {list(spec.shape(proj, kind))}",
                            "the file is damaged or not a CLIP text encoder",
                        )
        found[(style, prefix)] = spec
    return found


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
    ("an SD3 model (MMDiT)", lambda k, m: any(".joint_blocks." in x or x.startswith("joint_blocks.") for x in k)),
    ("a FLUX model", lambda k, m: any("double_blocks." in x for x in k) and any("single_blocks." in x for x in k)),
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


def with_slot(spec: EncoderSpec, slot: str) -> EncoderSpec:
    return EncoderSpec(slot, spec.style, spec.prefix, spec.hidden, spec.intermediate, spec.layers)


def _detect_single_file(path: Path) -> Checkpoint:
    wf = WeightFile(path, "")  # label "": the checkpoint file itself, whatever it is renamed to
    info = wf.tensor_info()
    found = {k: v for k, v in find_encoders(info, only=_SINGLE_FILE).items() if v is not None}
    layouts = set()
    for key, spec in found.items():
        if key in _SINGLE_FILE:
            layout, slot = _SINGLE_FILE[key]
            layouts.add(layout)
            wf.encoders[slot] = with_slot(spec, slot)
    if not wf.encoders:
        looks = looks_like(info, wf.header.metadata if wf.format == "safetensors" else {})
        raise LayoutError(
            f"{path.name} looks like {looks}, which erasekit does not erase or patch"
            if looks
            else f"{path} has no text encoder FFN tensors erasekit knows "
            f"({len(info)} tensors; neither SD1.x, SD2.x, SDXL nor a CLIP text encoder)",
            "erasekit supports SD1.x, SD2.x and SDXL checkpoints: one .safetensors/.ckpt file, a "
            "diffusers folder or a model id",
        )
    if layouts == {"single-file-embedder0"}:
        refiner = any(k.startswith("model.diffusion_model.label_emb.") for k in info)
        layout, arch = ("single-file-sdxl-refiner", "sdxl-refiner") if refiner else ("single-file-sd2-embedder", "sd2")
        if arch == "sd2":
            wf.encoders = {"te": with_slot(wf.encoders["te2"], "te")}
    elif layouts == {"single-file-sdxl"} and set(wf.encoders) == {"te1", "te2"}:
        layout, arch = "single-file-sdxl", "sdxl"
    elif len(layouts) == 1 and len(wf.encoders) == 1:
        layout = layouts.pop()
        arch = {
            "single-file-sd1": "sd1",
            "single-file-sd1-old": "sd1",
            "single-file-sd2": "sd2",
            "text-encoder-file": "clip-text",
        }.get(layout, "")
        if not arch:
            raise LayoutError(f"{path} holds only half of an SDXL text-encoder pair", "name a complete checkpoint")
    else:
        raise LayoutError(
            f"{path} mixes text-encoder layouts ({', '.join(sorted(layouts))})",
            "name one checkpoint; merged or partial files are not supported",
        )
    return Checkpoint(path, layout, arch, [wf])


def _weight_files(folder: Path) -> list[Path]:
    if (folder / "model.safetensors.index.json").exists() or (folder / "pytorch_model.bin.index.json").exists():
        raise LayoutError(
            f"{folder} holds a sharded text encoder, which erasekit does not support yet",
            "merge the shards into one model.safetensors (save_pretrained with a larger max_shard_size)",
        )
    # The plain file first: it is the full-precision copy that diffs and fingerprints read.
    plain = lambda p: (p.name not in ("model.safetensors", "pytorch_model.bin"), p.name)  # noqa: E731
    files = sorted(folder.glob("model*.safetensors"), key=plain)
    return files or sorted(folder.glob("pytorch_model*.bin"), key=plain)


def read_json(path: Path, fix: str = "repair or re-download the file") -> dict[str, Any]:
    """A JSON object from a model's file (model_index.json, a config, erasekit.json), or a one-line LayoutError."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # nested 200,000 deep
        raise LayoutError(f"{path} is not readable JSON ({type(e).__name__})", fix) from None
    if not isinstance(obj, dict):
        raise LayoutError(f"{path} is not a JSON object", fix)
    return obj


def _encoder_folder_files(root: Path, sub: str, slot: str) -> list[WeightFile]:
    folder = root / sub if sub else root
    paths = _weight_files(folder)
    if not paths:
        raise LayoutError(
            f"{folder} has no model.safetensors or pytorch_model.bin",
            "the folder is incomplete; re-download the text encoder weights",
        )
    out = []
    for p in paths:
        wf = WeightFile(p, str(p.relative_to(root)))
        found = [
            s
            for (style, prefix), s in find_encoders(wf.tensor_info()).items()
            if s is not None and style == "hf" and prefix in ("", "text_model.")
        ]
        if len(found) != 1:
            raise LayoutError(
                f"{p} does not look like a CLIP text encoder (no encoder.layers.N.mlp.fc1.weight)",
                "re-download the text encoder weights",
            )
        wf.encoders[slot] = with_slot(found[0], slot)
        out.append(wf)
    return out


def _detect_folder(path: Path) -> Checkpoint:
    if (path / "model_index.json").exists():
        index = read_json(path / "model_index.json")

        def has(component: str) -> bool:
            v = index.get(component)
            return isinstance(v, list) and len(v) == 2 and v[0] is not None and (path / component).is_dir()

        te, te2 = has("text_encoder"), has("text_encoder_2")
        files: list[WeightFile] = []
        if te and te2:
            arch = "sdxl"
            files = _encoder_folder_files(path, "text_encoder", "te1") + _encoder_folder_files(
                path, "text_encoder_2", "te2"
            )
        elif te2:
            arch = "sdxl-refiner"
            files = _encoder_folder_files(path, "text_encoder_2", "te2")
        elif te:
            cfg = (
                read_json(path / "text_encoder" / "config.json")
                if (path / "text_encoder" / "config.json").exists()
                else {}
            )
            # OpenAI CLIP-L (SD1.x) uses quick_gelu; OpenCLIP ViT-H (SD2.x) uses gelu.
            arch = "sd2" if cfg.get("hidden_act") == "gelu" else "sd1"
            files = _encoder_folder_files(path, "text_encoder", "te")
        else:
            raise LayoutError(
                f"diffusers folder {path} has no text_encoder component",
                "erasekit edits the text encoder; name a pipeline that has one",
            )
        dims = {(slot, enc.dims) for f in files for slot, enc in f.encoders.items()}
        if len(dims) != len({slot for slot, _ in dims}):
            raise LayoutError(
                f"the weight variants in {path} disagree on text encoder sizes", "remove the stray variant file"
            )
        return Checkpoint(path, "diffusers", arch, files)
    if (path / "config.json").exists():
        cfg = read_json(path / "config.json")
        archs = cfg.get("architectures") or []
        if any(a in ("CLIPTextModel", "CLIPTextModelWithProjection") for a in archs):
            return Checkpoint(path, "transformers-clip", "clip-text", _encoder_folder_files(path, "", "te"))
        raise LayoutError(
            f"{path}/config.json describes {archs or 'an unknown model'}, not a CLIP text encoder",
            "name a diffusers pipeline folder or a CLIPTextModel folder",
        )
    raise LayoutError(
        f"{path} is a folder without model_index.json or config.json",
        "name a diffusers pipeline folder, a CLIPTextModel folder, or a single checkpoint file",
    )


def detect(path: str | os.PathLike) -> Checkpoint:
    """Detect a checkpoint's layout. Raises :class:`InputFileError` or :class:`LayoutError`."""
    path = Path(path)
    if not path.exists():
        raise InputFileError(f"{path} does not exist", "check the path")
    if path.is_dir():
        return _detect_folder(path)
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", *PICKLE_SUFFIXES):
        raise LayoutError(
            f"{path} is not a .safetensors or .ckpt file",
            "name a checkpoint (.safetensors, .ckpt) or a diffusers folder",
        )
    ckpt = _detect_single_file(path)
    if suffix in PICKLE_SUFFIXES:
        ckpt.layout += " (pickle)"
    return ckpt
