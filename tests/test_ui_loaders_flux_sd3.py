"""FLUX.1 and SD3.x patches load in ComfyUI with every tensor matched and erasekit's weights; AUTOMATIC1111 gets none.

ComfyUI's text-encoder side for these families, stated in our own words from reading how it builds the text-encoder
object, names its tensors and matches network names to them (no code of theirs is used), as small functions:

- The object's tensors are named ``clip_l.transformer.<CLIP key>``, ``clip_g.transformer.<CLIP key>`` and
  ``t5xxl.transformer.<T5 key>``, with the transformers key names (``text_model.encoder.layers.3.mlp.fc1.weight``,
  ``encoder.block.3.layer.1.DenseReluDense.wi_0.weight``). From an all-in-one checkpoint (SD3.5's, ComfyUI's saves
  of FLUX.1) these are the file's keys below ``text_encoders.``, for each encoder whose final layer norm is in the
  file; from the encoder files users keep (``clip_l.safetensors``, ``clip_g.safetensors``, ``t5xxl_fp16.safetensors``
  in DualCLIPLoader/TripleCLIPLoader), each file's own keys below its encoder's name.
- The network names it answers to: CLIP-L's layers ``lora_te_`` and ``lora_te1_``; CLIP-G's ``lora_te2_`` when a
  CLIP-L is loaded beside it (else ``lora_te_``); every T5 weight answers ``lora_te{n}_`` + its key without
  ``.weight``, dots as underscores, where n is one more than the CLIP encoders loaded: SD3.x (two CLIPs) ``lora_te3_``
  only; FLUX.1 (CLIP-L alone) both ``lora_te2_`` and ``lora_te3_``.
- Per matched name: ``.lora_up/.lora_down(/.alpha)`` adds strength x up @ down x alpha/rank to the weight, ``.diff``
  strength x diff, ``.diff_b`` strength x diff_b to the bias; a tensor of another shape is not merged, and a file
  tensor no name claims is "lora key not loaded".

Each patch (FLUX.1 te1+te3, te3 alone, te1 alone; SD3.x te1+te2+te3, te1+te2 of an SD3.x without T5) x {dense,
low-rank} x strength {1.0, 0.5} is loaded so into the all-in-one file and into the encoder files, and compared with
`erasekit apply` of the same patch to the same files: max abs difference <= 1e-6 in float32.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from test_ui_loaders import lora_delta, read_network
from typer.testing import CliRunner

from erasekit.checkpoints.apply import apply_to_checkpoint
from erasekit.checkpoints.diff import diff_checkpoints
from erasekit.cli import app
from erasekit.families import family
from erasekit.families.base import Slot
from erasekit.format.names import module_name
from erasekit.format.patchfile import load_patch
from erasekit.format.ui_export import export_patch, loads_as_is, ui_advice
from erasekit.testing import make_checkpoint

runner = CliRunner()
ENCODER_OF_SLOT = {"te1": "clip_l", "te2": "clip_g", "te3": "t5xxl"}
ENCODER_FILE = {"clip_l": "clip-l-file", "clip_g": "clip-g-file", "t5xxl": "t5-file"}  # erasekit.testing's layouts
# case -> (the all-in-one layout the patch is made on, the slots it changes)
CASES = {
    "flux-te1-te3": ("single-flux", ("te1", "te3")),
    "flux-te3": ("single-flux", ("te3",)),
    "flux-te1": ("single-flux", ("te1",)),
    "sd3-te1-te2-te3": ("single-sd3", ("te1", "te2", "te3")),
    "sd3-no-t5-te1-te2": ("single-sd3-no-t5", ("te1", "te2")),
}
# a FLUX.1 patch loaded into SD3.x, whose CLIP-L and T5 the toy models draw as FLUX.1's: erasekit applies it slot for
# slot, and ComfyUI must find its T5 part there too (lora_te3_, the one T5 name both families answer)
LOADED_INTO = {"flux-te1-te3-into-sd3": ("flux-te1-te3", "single-sd3")}
FINAL_NORM = {
    "clip_l": "clip_l.transformer.text_model.final_layer_norm.weight",
    "clip_g": "clip_g.transformer.text_model.final_layer_norm.weight",
    "t5xxl": "t5xxl.transformer.encoder.final_layer_norm.weight",
}


def comfyui_text_encoders(source: Path | dict[str, Path]) -> dict[str, np.ndarray]:
    """The tensors of ComfyUI's text-encoder object, float32: from an all-in-one checkpoint, or from
    ``{encoder name: its own file}``. (ComfyUI tells encoder files apart by their keys, CLIP-G by a 31st layer and
    T5-XXL by a 24th block, which the toy encoders lack: here each file comes with its encoder's name.)"""
    if isinstance(source, dict):
        return {
            f"{name}.transformer.{k}": v.astype(np.float32)
            for name, path in source.items()
            for k, v in load_file(str(path)).items()
        }
    inner = {k[len("text_encoders.") :]: v for k, v in load_file(str(source)).items() if k.startswith("text_encoders.")}
    loaded = [name for name, norm in FINAL_NORM.items() if norm in inner]
    return {k: v.astype(np.float32) for k, v in inner.items() if k.split(".", 1)[0] in loaded}


def comfyui_network_names(state: dict[str, np.ndarray]) -> dict[str, str]:
    """Network module name -> the weight key it patches (the FFN's; ComfyUI maps CLIP's attention too)."""
    loaded = {k.split(".", 1)[0] for k in state}
    names: dict[str, str] = {}
    for enc in ("clip_l", "clip_g"):
        if enc not in loaded:
            continue
        if enc == "clip_l":
            prefixes = ["lora_te_", "lora_te1_"]
        else:
            prefixes = ["lora_te2_"] if "clip_l" in loaded else ["lora_te_", "lora_prior_te_"]
        for layer in range(32):
            for proj in ("fc1", "fc2"):
                key = f"{enc}.transformer.text_model.encoder.layers.{layer}.mlp.{proj}.weight"
                if key in state:
                    names.update({f"{p}text_model_encoder_layers_{layer}_mlp_{proj}": key for p in prefixes})
    if "t5xxl" in loaded:
        n = 1 + ("clip_g" in loaded) + ("clip_l" in loaded)
        indexes = [2, 3] if n == 2 and "clip_l" in loaded else [n]
        for key in state:
            if key.startswith("t5xxl.transformer.") and key.endswith(".weight"):
                path = key[len("t5xxl.transformer.") : -len(".weight")].replace(".", "_")
                names.update({f"lora_te{i}_{path}": key for i in indexes})
    return names


def comfyui_load(network: Path, state: dict[str, np.ndarray], strength: float) -> tuple[dict, list[str]]:
    """``state`` with the network at ``network`` added at ``strength``, and the file's tensors left unloaded."""
    tensors, _ = read_network(network)
    out = {k: v.copy() for k, v in state.items()}
    used: set[str] = set()
    for name, key in comfyui_network_names(state).items():
        group = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}
        additions = []
        if "lora_up.weight" in group:
            additions.append((key, lora_delta(group)))
        if "diff" in group:
            additions.append((key, group["diff"]))
        if "diff_b" in group:
            additions.append((key[: -len(".weight")] + ".bias", group["diff_b"]))
        for target, delta in additions:
            assert out[target].shape == delta.shape, f"ComfyUI would not merge {name} into {target}: shape"
            out[target] += np.float32(strength) * delta
        used |= {f"{name}.{k}" for k in group}
    return out, sorted(set(tensors) - used)


def edited_only(base: Path, edited: Path, slots: tuple[str, ...], out: Path) -> Path:
    """``base`` with the encoders of ``slots`` taken from ``edited``: a model changed in those encoders alone."""
    prefixes = tuple(f"text_encoders.{ENCODER_OF_SLOT[s]}." for s in slots)
    theirs = load_file(str(edited))
    save_file({k: theirs[k] if k.startswith(prefixes) else v for k, v in load_file(str(base)).items()}, str(out))
    return out


def encoder_files(layout: str, root: Path) -> dict[str, Path]:
    """The encoder files a ComfyUI user keeps for this model, as erasekit's toy encoders draw them (the same
    tensors as the all-in-one file's)."""
    names = ["clip_l", "t5xxl"] if "flux" in layout else ["clip_l", "clip_g"]
    names += ["t5xxl"] if layout == "single-sd3" else []
    files = {"clip_l": "clip_l.safetensors", "clip_g": "clip_g.safetensors", "t5xxl": "t5xxl_fp16.safetensors"}
    return {n: make_checkpoint(root / files[n], ENCODER_FILE[n]) for n in names}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flux-sd3")
    out: dict[str, Path] = {}
    for layout in {layout for layout, _ in CASES.values()}:
        out[layout] = make_checkpoint(root / f"{layout}.safetensors", layout)
        make_checkpoint(root / f"{layout}-edited.safetensors", layout, edit_layers=[0, 1])
    for case, (layout, slots) in CASES.items():
        out[case] = edited_only(out[layout], root / f"{layout}-edited.safetensors", slots, root / f"{case}.safetensors")
    return out


def erasekit_applied(patch: Path, source: Path | dict[str, Path], strength: float, root: Path) -> dict:
    """`erasekit apply` of ``patch`` to copies of the all-in-one file or of each encoder file it has a part for,
    read as ComfyUI reads them (in the new folder ``root``)."""
    root.mkdir()
    if not isinstance(source, dict):
        return comfyui_text_encoders(
            Path(apply_to_checkpoint([patch], source, output=root / source.name, strength=strength).output)
        )
    reached = {ENCODER_OF_SLOT[s] for s in load_patch(patch).manifest.base.encoders}
    copies = {}
    for name, path in source.items():
        copies[name] = path
        if name in reached:
            copies[name] = Path(apply_to_checkpoint([patch], path, output=root / path.name, strength=strength).output)
    return comfyui_text_encoders(copies)


@pytest.mark.parametrize("files", ["all-in-one", "encoder-files"])
@pytest.mark.parametrize("storage", ["dense", "lowrank"])
@pytest.mark.parametrize("case", [*CASES, *LOADED_INTO])
def test_every_flux_and_sd3_patch_loads_in_comfyui_as_erasekit_applies_it(
    case: str, storage: str, files: str, models: dict[str, Path], tmp_path: Path
) -> None:
    made_from, target = LOADED_INTO[case] if case in LOADED_INTO else (case, CASES[case][0])
    layout, slots = CASES[made_from]
    patch_file = tmp_path / "erased.safetensors"
    diff_checkpoints(models[layout], models[made_from], output=patch_file, rank=2 if storage == "lowrank" else None)
    patch = load_patch(patch_file)
    assert sorted(patch.manifest.base.encoders) == sorted(slots)
    assert loads_as_is(patch, "comfyui")  # the patch file itself, nothing exported
    source: Path | dict[str, Path] = models[target] if files == "all-in-one" else encoder_files(target, tmp_path)
    base = comfyui_text_encoders(source)
    exported = Path(export_patch(patch_file, "comfyui", tmp_path / "erased-comfyui.safetensors").output)
    for strength in (1.0, 0.5):
        got, unused = comfyui_load(patch_file, base, strength)
        assert unused == [], f"ComfyUI would not load: {unused[:4]}"
        again, unused = comfyui_load(exported, base, strength)  # `export --ui comfyui` writes the same network
        assert unused == [] and all(np.array_equal(again[k], v) for k, v in got.items())
        want = erasekit_applied(patch_file, source, strength, tmp_path / f"applied-{strength}")
        assert sorted(want) == sorted(got)
        worst = max(float(np.abs(got[k] - want[k]).max()) for k in want)
        assert worst <= 1e-6, (case, storage, files, strength, worst)
        changed = {k.split(".", 1)[0] for k in got if not np.array_equal(got[k], base[k])}
        assert changed == {ENCODER_OF_SLOT[s] for s in slots}, "the patch reaches each encoder it changes"


def comfyui_key(slot: Slot, layer: int, proj: str) -> str:
    """The tensor of ComfyUI's text-encoder object that ``slot``'s ``proj`` weight in ``layer`` is."""
    encoder = ENCODER_OF_SLOT[slot.name]
    if encoder == "t5xxl":
        return f"t5xxl.transformer.encoder.block.{layer}.layer.1.DenseReluDense.{proj}.weight"
    return f"{encoder}.transformer.text_model.encoder.layers.{layer}.mlp.{proj}.weight"


@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_erasekit_names_every_projection_as_comfyui_names_its_encoder(arch: str) -> None:
    """At the real encoders' sizes (CLIP-L 12 layers, CLIP-G 32, T5-XXL 24 blocks), with and without SD3.x's T5:
    every module name erasekit writes is the one ComfyUI maps to that slot's tensor. T5 answers lora_te3_ beside
    SD3.x's two CLIPs and beside FLUX.1's CLIP-L, where lora_te2_ is T5's too: erasekit's one name serves both."""
    slots = family(arch).slots
    for loaded in (slots, [s for s in slots if not s.optional]):
        every = [
            (s, layer, proj)
            for s in loaded
            for layer in range(s.encoder.largest[2])
            for proj in s.encoder.kind.projections
        ]
        names = comfyui_network_names({comfyui_key(*p): np.zeros(1, np.float32) for p in every})
        for slot, layer, proj in every:
            assert names.get(module_name(slot.name, layer, proj)) == comfyui_key(slot, layer, proj), (arch, slot.name)
        t5_prefixes = {n.split("_encoder_block_")[0] for n in names if "_encoder_block_" in n}
        assert t5_prefixes == (
            {"lora_te2", "lora_te3"} if arch == "flux" else {"lora_te3"} if len(loaded) == 3 else set()
        )


@pytest.mark.parametrize("case", ["flux-te1-te3", "sd3-te1-te2-te3"])
def test_a1111_runs_no_flux_sd3_or_t5_and_gets_no_file(case: str, models: dict[str, Path], tmp_path: Path) -> None:
    """AUTOMATIC1111 has no FLUX.1 or SD3.x support and runs no T5: erasekit makes no file for it and says so."""
    layout, _ = CASES[case]
    patch_file = tmp_path / "p.erasepatch"
    diff_checkpoints(models[layout], models[case], output=patch_file)
    patch = load_patch(patch_file)
    title = "FLUX.1" if layout == "single-flux" else "SD3.x"
    assert not loads_as_is(patch, "a1111")
    assert ui_advice(patch, patch_file)[:2] == [
        "ComfyUI: copy it as p.safetensors",
        f"AUTOMATIC1111: no export for {title} patches yet",
    ]
    r = runner.invoke(app, ["export", str(patch_file), "--ui", "a1111", "-o", str(tmp_path / "a.safetensors")])
    assert r.exit_code == 5 and r.stderr == (
        f"error: erasekit has no AUTOMATIC1111 export for {title} patches yet; load the patch in ComfyUI as it is, "
        "or apply it to the model's files (erasekit apply)\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.erasepatch"]
    r = runner.invoke(app, ["export", str(patch_file), "--ui", "comfyui", "-o", str(tmp_path / "c.safetensors")])
    assert r.exit_code == 0, r.output
    assert json.loads(read_network(tmp_path / "c.safetensors")[1]["erasekit_export"])["ui"] == "comfyui"
