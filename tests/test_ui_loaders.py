"""Every patch erasekit writes loads in ComfyUI and AUTOMATIC1111 with every tensor matched and erasekit's weights.

The two loaders are stated here in our own words (from reading how each UI names text-encoder layers, which
network tensors it reads and the arithmetic it applies; no code of theirs is used), as small functions over
the model's FFN tensors. Each architecture x {dense, low-rank} x strength {1.0, 0.5} is then loaded the way a
user would (the patch itself where it loads as is, else `erasekit export --ui`), and compared with
`erasekit apply` on the same checkpoint: max abs difference <= 1e-6 in float32.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from typer.testing import CliRunner

from erasekit.checkpoints.apply import apply_to_checkpoint
from erasekit.checkpoints.diff import diff_checkpoints
from erasekit.checkpoints.layouts import detect
from erasekit.cli import app
from erasekit.format.patchfile import load_patch
from erasekit.format.ui_export import export_patch, loads_as_is
from erasekit.testing import make_checkpoint

runner = CliRunner()
LAYOUT = {"sd1": "single-sd1", "sd2": "single-sd2", "sdxl": "single-sdxl", "sdxl-refiner": "single-sdxl-refiner"}
OPENCLIP = {"fc1": "c_fc", "fc2": "c_proj"}
# Which encoder each UI sees in each architecture, by erasekit's slot.
COMFY_ENCODER = {
    ("sd1", "te"): "clip_l",
    ("sd2", "te"): "clip_h",
    ("sdxl", "te1"): "clip_l",
    ("sdxl", "te2"): "clip_g",
    ("sdxl-refiner", "te2"): "clip_g",
}


def a1111_layer_name(arch: str, slot: str, layer: int, proj: str) -> str:
    """A1111 names each text-encoder Linear by its module path with dots as underscores; SDXL-family models prefix
    the conditioner's embedder index (the refiner's bigG is embedder 0)."""
    return {
        ("sd1", "te"): f"transformer_text_model_encoder_layers_{layer}_mlp_{proj}",
        ("sd2", "te"): f"model_transformer_resblocks_{layer}_mlp_{OPENCLIP[proj]}",
        ("sdxl", "te1"): f"0_transformer_text_model_encoder_layers_{layer}_mlp_{proj}",
        ("sdxl", "te2"): f"1_model_transformer_resblocks_{layer}_mlp_{OPENCLIP[proj]}",
        ("sdxl-refiner", "te2"): f"0_model_transformer_resblocks_{layer}_mlp_{OPENCLIP[proj]}",
    }[(arch, slot)]


def model_ffn(path: Path) -> dict[tuple[str, int, str, str], np.ndarray]:
    """(slot, layer, proj, kind) -> float32 tensor of a checkpoint."""
    ckpt = detect(path)
    wf = ckpt.files[0]
    return {
        (slot, i, proj, kind): wf.read_numpy(enc.key(i, proj, kind)).copy()
        for slot, enc in ckpt.encoders.items()
        for i in range(enc.layers)
        for proj in ("fc1", "fc2")
        for kind in ("weight", "bias")
    }


def read_network(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    assert path.suffix == ".safetensors", "both UIs list only .safetensors (and pickles) in their LoRA folders"
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        meta = json.loads(f.read(n)).get("__metadata__", {})
    return {k: v.astype(np.float32) for k, v in load_file(str(path)).items()}, meta


def lora_delta(group: dict[str, np.ndarray]) -> np.ndarray:
    """Both UIs: up @ down, scaled by alpha / rank when an alpha is given (rank = rows of down)."""
    up, down = group["lora_up.weight"], group["lora_down.weight"]
    scale = float(group["alpha"]) / down.shape[0] if "alpha" in group else 1.0
    return (up @ down) * np.float32(scale)


def comfyui_load(path: Path, arch: str, model: dict, strength: float) -> tuple[dict, list[str]]:
    """ComfyUI: a map from network names to its own weight keys, built from the encoders the model has. CLIP-L
    (or SD2's CLIP-H) answers to lora_te_ and lora_te1_; CLIP-G to lora_te2_ when a CLIP-L is present, else (the
    refiner) to lora_te_ and lora_prior_te_. For each mapped name it reads .lora_up/.lora_down(/.alpha), .diff and
    .diff_b, adds strength x delta to the weight and strength x diff_b to the bias; any other key is 'not loaded'."""
    tensors, _ = read_network(path)
    present = {COMFY_ENCODER[(arch, slot)]: slot for slot in {s for s, *_ in model}}
    names: dict[str, tuple[str, int, str]] = {}
    for enc, slot in present.items():
        layers = max(i for s, i, *_ in model if s == slot) + 1
        if enc == "clip_g":
            prefixes = ["lora_te2_"] if "clip_l" in present else ["lora_te_", "lora_prior_te_"]
        else:
            prefixes = ["lora_te_", "lora_te1_"]
        for i in range(layers):
            for proj in ("fc1", "fc2"):
                for p in prefixes:
                    names[f"{p}text_model_encoder_layers_{i}_mlp_{proj}"] = (slot, i, proj)
    out = {k: v.copy() for k, v in model.items()}
    used: set[str] = set()
    for name, (slot, i, proj) in names.items():
        group = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}
        if not group:
            continue
        if "lora_up.weight" in group:
            out[(slot, i, proj, "weight")] += np.float32(strength) * lora_delta(group)
        if "diff" in group:
            out[(slot, i, proj, "weight")] += np.float32(strength) * group["diff"]
        if "diff_b" in group:
            out[(slot, i, proj, "bias")] += np.float32(strength) * group["diff_b"]
        used |= {f"{name}.{k}" for k in group}
    return out, sorted(set(tensors) - used)


def a1111_load(path: Path, arch: str, model: dict, strength: float) -> tuple[dict, list[str]]:
    """A1111 (built-in Lora extension): the name before the first '.' is converted to a layer name:
    lora_te_..._layers_{i}_{rest} -> SD2: model_transformer_resblocks_{i} with fc1/fc2 as c_fc/c_proj, else
    transformer_text_model_encoder_layers_{i}_{rest}; lora_te2_... -> 1_model_transformer_resblocks_{i}...;
    lora_te1_text_model -> 0_transformer_text_model, then transformer_text_model; any other name is tried as is.
    Per layer, a group with lora_up and lora_down is a LoRA module (reads no bias delta); one with diff is a full
    module (reads diff_b); a group that is neither makes the whole file fail. Unmatched names are skipped.
    Weight += multiplier x delta; bias += multiplier x diff_b."""
    tensors, _ = read_network(path)
    layer_of = {a1111_layer_name(arch, s, i, p): (s, i, p) for (s, i, p, _k) in model}

    def convert(name: str) -> str | None:
        m = re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", name)
        if m:
            if arch == "sd2":
                return f"model_transformer_resblocks_{m[1]}_{m[2].replace('mlp_fc1', 'mlp_c_fc').replace('mlp_fc2', 'mlp_c_proj')}"
            return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
        m = re.match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", name)
        if m:
            return f"1_model_transformer_resblocks_{m[1]}_{m[2].replace('mlp_fc1', 'mlp_c_fc').replace('mlp_fc2', 'mlp_c_proj')}"
        if name in layer_of:
            return name
        for new in ("0_transformer_text_model", "transformer_text_model"):
            cand = name.replace("lora_te1_text_model", new)
            if "lora_te1_text_model" in name and cand in layer_of:
                return cand
        return None

    groups: dict[str, dict[str, np.ndarray]] = {}
    unmatched = []
    for key, value in tensors.items():
        name, _, part = key.partition(".")
        layer = convert(name)
        if layer not in layer_of:
            unmatched.append(key)
            continue
        groups.setdefault(layer, {})[part] = value
    out = {k: v.copy() for k, v in model.items()}
    ignored = []
    for layer, group in groups.items():
        slot, i, proj = layer_of[layer]
        if "lora_up.weight" in group and "lora_down.weight" in group:
            out[(slot, i, proj, "weight")] += lora_delta(group) * np.float32(strength)
            ignored += [f"{layer}.{k}" for k in group if k == "diff_b"]  # the LoRA module reads no bias delta
        elif "diff" in group:
            out[(slot, i, proj, "weight")] += group["diff"] * np.float32(strength)
            if "diff_b" in group:
                out[(slot, i, proj, "bias")] += group["diff_b"] * np.float32(strength)
        else:
            raise AssertionError(f"A1111 refuses the whole file: no module type for {layer} ({sorted(group)})")
    return out, unmatched + ignored


def a1111_family(meta: dict[str, str]) -> str:
    """A1111 files networks by ss_base_model_version ('sdxl_' prefix: SDXL), then ss_v2 == 'True' (SD2), else
    SD1 when the file has any metadata."""
    if meta.get("ss_base_model_version", "").startswith("sdxl_"):
        return "SDXL"
    if str(meta.get("ss_v2")) == "True":
        return "SD2"
    return "SD1" if meta else "Unknown"


LOADERS = {"comfyui": comfyui_load, "a1111": a1111_load}
FAMILY = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL", "sdxl-refiner": "SDXL"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("ui")
    return {
        arch: (
            make_checkpoint(root / f"{arch}-base.safetensors", layout),
            make_checkpoint(root / f"{arch}-edit.safetensors", layout, edit_layers=[0, 1]),
        )
        for arch, layout in LAYOUT.items()
    }


@pytest.mark.parametrize("ui", sorted(LOADERS))
@pytest.mark.parametrize("storage", ["dense", "lowrank"])
@pytest.mark.parametrize("arch", sorted(LAYOUT))
def test_every_patch_loads_in_each_ui_as_erasekit_applies_it(
    arch: str, storage: str, ui: str, tmp_path: Path, checkpoints: dict[str, tuple[Path, Path]]
) -> None:
    base, edited = checkpoints[arch]
    patch_file = tmp_path / "erased.safetensors"
    diff_checkpoints(base, edited, output=patch_file, rank=2 if storage == "lowrank" else None)
    patch = load_patch(patch_file)
    if loads_as_is(patch, ui):
        ui_file = patch_file
    else:
        ui_file = Path(export_patch(patch_file, ui, tmp_path / f"erased-{ui}.safetensors").output)
    _, meta = read_network(ui_file)
    assert a1111_family(meta) == FAMILY[arch]
    for strength in (1.0, 0.5):
        out = tmp_path / f"applied-{strength}.safetensors"
        apply_to_checkpoint([patch_file], base, output=out, strength=strength)
        want = model_ffn(out)
        got, unused = LOADERS[ui](ui_file, arch, model_ffn(base), strength)
        assert unused == [], f"{ui} would not load: {unused[:4]}"
        worst = max(float(np.abs(got[k] - want[k]).max()) for k in want)
        assert worst <= 1e-6, (arch, storage, ui, strength, worst)
        changed = sum(not np.array_equal(got[k], v) for k, v in model_ffn(base).items())
        assert changed > 0, "the patch changed something"


def test_which_files_need_an_export(checkpoints: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    """The .erasepatch itself serves both UIs except for the refiner, and low-rank deltas in A1111."""
    for arch, (base, edited) in checkpoints.items():
        for rank in (None, 2):
            p = tmp_path / f"{arch}-{rank}.erasepatch"
            diff_checkpoints(base, edited, output=p, rank=rank)
            patch = load_patch(p)
            assert loads_as_is(patch, "comfyui") == (arch != "sdxl-refiner")
            assert loads_as_is(patch, "a1111") == (arch != "sdxl-refiner" and rank is None)


def test_the_a1111_export_of_a_low_rank_patch_keeps_its_bias_deltas(
    checkpoints: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    base, edited = checkpoints["sd1"]
    patch_file = tmp_path / "low.safetensors"
    diff_checkpoints(base, edited, output=patch_file, rank=2)
    # loading the low-rank file itself in A1111 silently drops every bias delta: the reason for the export
    _, dropped = a1111_load(patch_file, "sd1", model_ffn(base), 1.0)
    assert dropped and all(k.endswith(".diff_b") for k in dropped)
    r = runner.invoke(
        app, ["export", str(patch_file), "--ui", "a1111", "-o", str(tmp_path / "low-a1111.safetensors"), "--json"]
    )
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["dense_for_bias"] == report["modules"] > 0
    tensors, meta = read_network(tmp_path / "low-a1111.safetensors")
    assert (
        meta["ss_network_module"] == "lycoris.kohya" and meta["modelspec.architecture"] == "stable-diffusion-v1/lycoris"
    )
    assert json.loads(meta["erasekit_export"])["ui"] == "a1111"
    assert all(k.endswith((".diff", ".diff_b")) for k in tensors)


def test_export_refuses_bad_requests_and_writes_nothing(
    checkpoints: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    base, edited = checkpoints["sdxl-refiner"]
    patch_file = tmp_path / "r.erasepatch"
    diff_checkpoints(base, edited, output=patch_file)
    cases = [
        (
            ["--ui", "invokeai", "-o", str(tmp_path / "x.safetensors")],
            1,
            "unknown UI 'invokeai'; choose comfyui, a1111 or diffusers",
        ),
        (["--ui", "comfyui", "-o", str(tmp_path / "x.erasepatch")], 7, "must end in .safetensors"),
        (["--ui", "comfyui", "-o", str(patch_file)], 7, "must end in .safetensors"),
    ]
    for args, code, message in cases:
        r = runner.invoke(app, ["export", str(patch_file), *args])
        assert r.exit_code == code and message in r.stderr, (args, r.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.erasepatch"]


def test_modelspec_names_the_base_and_the_adapter_kind(
    checkpoints: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    want = {
        ("sd1", None): "stable-diffusion-v1/lycoris",
        ("sd1", 2): "stable-diffusion-v1/lora",
        ("sd2", None): "stable-diffusion-v2-512/lycoris",
        ("sdxl", 2): "stable-diffusion-xl-v1-base/lora",
        ("sdxl-refiner", None): "stable-diffusion-xl-v1-refiner/lycoris",
    }
    for (arch, rank), spec in want.items():
        p = tmp_path / f"{arch}-{rank}.safetensors"
        diff_checkpoints(*checkpoints[arch], output=p, rank=rank)
        assert read_network(p)[1]["modelspec.architecture"] == spec
