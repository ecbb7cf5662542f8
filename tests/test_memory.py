"""The Python API on in-memory models: apply_patch / revert_patch on transformers and pipeline objects."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection

import erasekit
from erasekit.checkpoints.diff import diff_checkpoints
from erasekit.errors import FingerprintMismatchError, IncompatiblePatchError, NotAppliedError
from erasekit.testing import make_checkpoint


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("layout", ["transformers-clip", "diffusers-sd1-prefixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_apply_then_revert_is_bit_exact(tmp_path: Path, layout: str, dtype: torch.dtype) -> None:
    base = make_checkpoint(tmp_path / "a", layout, "F32")
    edited = make_checkpoint(tmp_path / "b", layout, "F32", edit_layers=[0])
    patch = tmp_path / "p.erasepatch"
    diff_checkpoints(base, edited, output=patch)
    sub = "" if layout == "transformers-clip" else "text_encoder"
    model = CLIPTextModel.from_pretrained(base / sub, dtype=dtype)
    want = CLIPTextModel.from_pretrained(edited / sub, dtype=dtype)
    before = params(model)

    report = erasekit.apply_patch(model, erasekit.load_patch(patch))
    assert report.applied[0].tensors == 4
    assert report.applied[0].fingerprint == ("exact" if dtype == torch.float32 else "approx")
    after = params(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"encoder.layers.0.mlp.{p}.{k}" for p in ("fc1", "fc2") for k in ("weight", "bias")}
    for k in changed:
        torch.testing.assert_close(
            after[k].float(), want.state_dict()[k].float(), atol=1e-6 if dtype == torch.float32 else 1e-2, rtol=1e-2
        )

    erasekit.revert_patch(model, patch)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(NotAppliedError):
        erasekit.revert_patch(model, patch)


def test_pipeline_like_object_sdxl(tmp_path: Path) -> None:
    base = make_checkpoint(tmp_path / "a", "diffusers-sdxl", "F32")
    edited = make_checkpoint(tmp_path / "b", "diffusers-sdxl", "F32", edit_layers=[1])
    patch = tmp_path / "p.erasepatch"
    diff_checkpoints(base, edited, output=patch)
    pipe = SimpleNamespace(
        text_encoder=CLIPTextModel.from_pretrained(base / "text_encoder"),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(base / "text_encoder_2"),
    )
    before = (params(pipe.text_encoder), params(pipe.text_encoder_2))
    report = erasekit.apply_patch(pipe, patch, strength=0.25)
    assert report.architecture == "sdxl" and report.applied[0].tensors == 8
    erasekit.revert_patch(pipe, patch)
    assert all(torch.equal(before[0][k], v) for k, v in pipe.text_encoder.state_dict().items())
    assert all(torch.equal(before[1][k], v) for k, v in pipe.text_encoder_2.state_dict().items())


def test_refusals_leave_weights_untouched(tmp_path: Path) -> None:
    base = make_checkpoint(tmp_path / "a", "transformers-clip", "F32")
    edited = make_checkpoint(tmp_path / "b", "transformers-clip", "F32", edit_layers=[0])
    patch = tmp_path / "p.erasepatch"
    diff_checkpoints(base, edited, output=patch)
    stranger = CLIPTextModel.from_pretrained(make_checkpoint(tmp_path / "c", "transformers-clip", "F32", seed=3))
    before = params(stranger)
    with pytest.raises(FingerprintMismatchError, match="differ"):
        erasekit.apply_patch(stranger, patch)
    assert all(torch.equal(before[k], v) for k, v in stranger.state_dict().items())
    with pytest.raises(IncompatiblePatchError, match="no text encoder|not a CLIP"):
        erasekit.apply_patch(torch.nn.Linear(2, 2), patch)
