"""Layout detection: every layout, and a clear error for everything else."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ckpt_path
from safetensors.torch import save_file

from erasekit.checkpoints.layouts import detect
from erasekit.errors import InputFileError, LayoutError
from erasekit.testing import make_checkpoint

EXPECTED = {
    "diffusers-sd1": ("diffusers", "sd1", {"te": (32, 64, 2)}, ""),
    "diffusers-sd1-prefixed": ("diffusers", "sd1", {"te": (32, 64, 2)}, "text_model."),
    "diffusers-sd1-fp16-variant": ("diffusers", "sd1", {"te": (32, 64, 2)}, ""),
    "diffusers-sd2": ("diffusers", "sd2", {"te": (48, 96, 3)}, ""),
    "diffusers-sdxl": ("diffusers", "sdxl", {"te1": (32, 64, 2), "te2": (40, 80, 2)}, ""),
    "diffusers-sdxl-refiner": ("diffusers", "sdxl-refiner", {"te2": (40, 80, 2)}, ""),
    "transformers-clip": ("transformers-clip", "clip-text", {"te": (32, 64, 2)}, ""),
    "transformers-t5": ("transformers-t5", "t5-text", {"te3": (32, 64, 2)}, ""),
    "t5-file": ("t5-encoder-file", "t5-text", {"te3": (32, 64, 2)}, ""),
    "single-sd1": ("single-file-sd1", "sd1", {"te": (32, 64, 2)}, "cond_stage_model.transformer.text_model."),
    "single-sd1-old": ("single-file-sd1-old", "sd1", {"te": (32, 64, 2)}, "cond_stage_model.transformer."),
    "single-sd2": ("single-file-sd2", "sd2", {"te": (48, 96, 3)}, "cond_stage_model.model."),
    "single-sdxl": ("single-file-sdxl", "sdxl", {"te1": (32, 64, 2), "te2": (40, 80, 2)}, None),
    "single-sdxl-refiner": (
        "single-file-sdxl-refiner",
        "sdxl-refiner",
        {"te2": (40, 80, 2)},
        "conditioner.embedders.0.model.",
    ),
    "ckpt-sd1": ("single-file-sd1 (pickle)", "sd1", {"te": (32, 64, 2)}, "cond_stage_model.transformer.text_model."),
    "diffusers-flux": ("diffusers", "flux", {"te1": (32, 64, 2), "te3": (32, 64, 2)}, ""),
    "diffusers-sd3": ("diffusers", "sd3", {"te1": (32, 64, 2), "te2": (40, 80, 2), "te3": (32, 64, 2)}, ""),
    "diffusers-sd3-no-t5": ("diffusers", "sd3", {"te1": (32, 64, 2), "te2": (40, 80, 2)}, ""),
    "single-flux": ("single-file-flux", "flux", {"te1": (32, 64, 2), "te3": (32, 64, 2)}, None),
    "single-sd3": ("single-file-sd3", "sd3", {"te1": (32, 64, 2), "te2": (40, 80, 2), "te3": (32, 64, 2)}, None),
    "single-sd3-no-t5": ("single-file-sd3", "sd3", {"te1": (32, 64, 2), "te2": (40, 80, 2)}, None),
    "clip-l-file": ("text-encoder-file", "clip-text", {"te": (32, 64, 2)}, "text_model."),
    "clip-g-file": ("text-encoder-file", "clip-text", {"te": (40, 80, 2)}, "text_model."),
}


@pytest.mark.parametrize("layout", list(EXPECTED))
def test_detects_every_layout(tmp_path: Path, layout: str) -> None:
    ckpt = detect(make_checkpoint(ckpt_path(tmp_path, layout), layout, "F16"))
    name, arch, dims, prefix = EXPECTED[layout]
    assert (ckpt.layout, ckpt.architecture) == (name, arch)
    assert {s: e.dims for s, e in ckpt.encoders.items()} == dims
    if prefix is not None:
        assert all(e.prefix == prefix for e in ckpt.encoders.values())
    two = ("diffusers-sd1-fp16-variant", "diffusers-sdxl", "diffusers-flux", "diffusers-sd3-no-t5")
    files = dict.fromkeys(two, 2) | {"diffusers-sd3": 3}  # one per encoder and weight variant
    assert len(ckpt.files) == files.get(layout, 1)


def test_variant_files_plain_first(tmp_path: Path) -> None:
    ckpt = detect(make_checkpoint(tmp_path / "p", "diffusers-sd1-fp16-variant", "F32"))
    assert [f.label for f in ckpt.files] == ["text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors"]


def test_sd2_turbo_style_single_file(tmp_path: Path) -> None:
    """OpenCLIP at conditioner.embedders.0 without SDXL's label embedding is SD2 (e.g. SD2-turbo)."""
    from erasekit.testing import OPENCLIP_H, _gen, _prefixed, openclip_text_encoder

    sd = _prefixed(openclip_text_encoder(OPENCLIP_H, _gen(0)), "conditioner.embedders.0.model.")
    save_file(sd, str(tmp_path / "turbo.safetensors"))
    ckpt = detect(tmp_path / "turbo.safetensors")
    assert (ckpt.architecture, list(ckpt.encoders)) == ("sd2", ["te"])


def test_missing_path() -> None:
    with pytest.raises(InputFileError, match="does not exist; check the path"):
        detect("/no/such/model.safetensors")


def test_unknown_file_kind(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(LayoutError, match="not a .safetensors or .ckpt"):
        detect(tmp_path / "model.onnx")


def test_no_text_encoder(tmp_path: Path) -> None:
    save_file({"model.diffusion_model.x.weight": torch.zeros(2)}, str(tmp_path / "unet.safetensors"))
    with pytest.raises(LayoutError, match="no text encoder FFN tensors .*1 tensors"):
        detect(tmp_path / "unet.safetensors")


def test_missing_ffn_tensor(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    p = make_checkpoint(tmp_path / "b.safetensors", "single-sd1", "F16")
    sd = load_file(str(p))
    del sd["cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc2.bias"]
    save_file(sd, str(p))
    with pytest.raises(LayoutError, match="lacks tensor .*layers.0.mlp.fc2.bias"):
        detect(p)


def test_wrong_ffn_shape(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    p = make_checkpoint(tmp_path / "b.safetensors", "single-sd1", "F16")
    sd = load_file(str(p))
    sd["cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.weight"] = torch.zeros(3, 3)
    save_file(sd, str(p))
    with pytest.raises(LayoutError, match=r"has shape \[3, 3\], expected \[32, 64\]"):
        detect(p)


def test_folder_without_index(tmp_path: Path) -> None:
    with pytest.raises(LayoutError, match="without model_index.json or config.json"):
        detect(tmp_path)


def test_folder_without_text_encoder(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "X", "unet": ["diffusers", "UNet"]}))
    with pytest.raises(LayoutError, match="has no text_encoder component"):
        detect(tmp_path)


def test_text_encoder_without_weights(tmp_path: Path) -> None:
    p = make_checkpoint(tmp_path / "p", "diffusers-sd1", "F16")
    (p / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(LayoutError, match="has no model.safetensors"):
        detect(p)


def test_an_index_of_shards_without_a_weight_map_is_refused(tmp_path: Path) -> None:
    """Sharded encoders are read (tests/test_sharded.py); an index that maps no tensor to a shard is refused."""
    p = make_checkpoint(tmp_path / "p", "diffusers-sd1", "F16")
    index = p / "text_encoder" / "model.safetensors.index.json"
    index.write_text("{}")
    with pytest.raises(LayoutError) as e:
        detect(p)
    assert str(e.value) == (
        f"{index} has no weight_map of tensor names to shard files; re-download the shards with the index file"
    )


def test_corrupt_model_index(tmp_path: Path) -> None:
    p = make_checkpoint(tmp_path / "p", "diffusers-sd1", "F16")
    (p / "model_index.json").write_text("{nope")
    with pytest.raises(LayoutError, match="not readable JSON"):
        detect(p)


def test_truncated_checkpoint(tmp_path: Path) -> None:
    p = make_checkpoint(tmp_path / "b.safetensors", "single-sd1", "F16")
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(LayoutError, match="truncated"):
        detect(p)


def test_pickle_with_code_is_refused(tmp_path: Path) -> None:
    """A .ckpt that would run code on load is rejected by weights_only=True, not executed."""

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (print, ("pwned",))

    p = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": Evil()}, p)
    with pytest.raises(LayoutError, match="weights-only torch pickle"):
        detect(p)


def test_config_of_other_model(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(
        LayoutError, match="not a CLIP text encoder or T5 text encoder; .*CLIPTextModel or T5EncoderModel"
    ):
        detect(tmp_path)


def _with_index(folder: Path, **entries: object) -> None:
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(index | entries))


def test_flux_and_sd3_folders_are_never_read_as_sdxl(tmp_path: Path) -> None:
    """A FLUX.1 folder has SDXL's component names (its text_encoder_2 is a T5), an SD3.x folder SDXL's plus
    text_encoder_3, or SDXL's alone without its T5: none may be read as an SDXL pipeline, where `apply --force` would
    patch their CLIPs. The pipeline class names the family where the components do not; pipelines of families not
    patched yet are refused by their class."""
    flux = make_checkpoint(tmp_path / "flux", "diffusers-sdxl", "F16")
    _with_index(flux, _class_name="FluxPipeline")
    with pytest.raises(LayoutError, match="text_encoder_2/model.safetensors does not look like a T5 text encoder"):
        detect(flux)
    sd3 = make_checkpoint(tmp_path / "sd3", "diffusers-sdxl", "F16")
    make_checkpoint(sd3 / "text_encoder_3", "transformers-t5", "F16")
    _with_index(sd3, text_encoder_3=["transformers", "T5EncoderModel"])
    assert (detect(sd3).architecture, sorted(detect(sd3).encoders)) == ("sd3", ["te1", "te2", "te3"])
    _with_index(sd3, text_encoder_3=[None, None])  # a component the index leaves out is no encoder
    assert detect(sd3).architecture == "sdxl"
    _with_index(sd3, _class_name="StableDiffusion3Pipeline")  # SD3.x without its T5
    assert (detect(sd3).architecture, sorted(detect(sd3).encoders)) == ("sd3", ["te1", "te2"])
    _with_index(flux, _class_name="Flux2Pipeline")
    with pytest.raises(LayoutError, match=r"is a FLUX.2 pipeline \(Flux2Pipeline\), which erasekit does not patch yet"):
        detect(flux)
