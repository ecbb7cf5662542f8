"""A library call leaves the caller's pipeline as it found it: weights, dtypes, requires_grad flags and
train/eval modes, on success and on every error path (erase, generate)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from erasekit.checkpoints.diff import diff_checkpoints
from erasekit.checkpoints.pipeline import load_pipeline
from erasekit.erasing.erase_job import erase_model
from erasekit.erasing.unlearn import erase
from erasekit.errors import ErasekitError, IncompatiblePatchError
from erasekit.format.erase_config import EraseConfig
from erasekit.judging.sampling import GenerateConfig, generate
from erasekit.testing import make_checkpoint, make_tiny_pipeline


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("state")
    folder = make_tiny_pipeline(root / "tiny", "sd1")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(2)]
    return {"folder": folder, "images": images, "root": root}


def snapshot(pipe: Any) -> dict[str, Any]:
    """Everything a caller could notice: values, dtypes, requires_grad, train/eval mode of every submodule."""
    out: dict[str, Any] = {}
    for name in ("unet", "vae", "text_encoder"):
        module = getattr(pipe, name)
        out[name] = (
            {k: (v.detach().clone(), v.dtype, v.requires_grad) for k, v in module.named_parameters()},
            [m.training for m in module.modules()],
        )
    return out


def assert_same(before: dict[str, Any], pipe: Any) -> None:
    after = snapshot(pipe)
    for name, (params, modes) in before.items():
        now, now_modes = after[name]
        for k, (value, dtype, grad) in params.items():
            assert now[k][1] == dtype and now[k][2] == grad, f"{name}.{k}: dtype/requires_grad changed"
            assert torch.equal(now[k][0], value), f"{name}.{k}: value changed"
        assert now_modes == modes, f"{name}: train/eval mode changed"


@pytest.fixture()
def pipe(world: dict[str, Any]) -> Any:
    p, _ = load_pipeline(world["folder"])
    p.text_encoder.to(torch.float16)  # a caller's half-precision encoder must come back half precision
    p.unet.train()  # and a caller's mode must come back too
    p.vae.requires_grad_(False)  # and mixed flags
    return p


FAST = dict(resolution=32, steps=2, batch_size=1, cache=False, device="cpu", dtype="fp32")


def test_a_successful_erase_gives_the_pipeline_back_as_found(pipe: Any, world: dict[str, Any]) -> None:
    before = snapshot(pipe)
    report = erase(pipe, ["circle"], [world["images"]], EraseConfig(**FAST))
    assert report.patch.manifest.deltas
    assert_same(before, pipe)


def test_a_refused_layer_list_leaves_the_pipeline_as_found(pipe: Any, world: dict[str, Any]) -> None:
    before = snapshot(pipe)
    with pytest.raises(ErasekitError, match="layer 7 is outside the text encoder's layers 0-1"):
        erase(pipe, ["circle"], [world["images"]], EraseConfig(**FAST, layers=[7]))
    assert_same(before, pipe)


def test_an_error_inside_the_loop_leaves_the_pipeline_as_found(
    pipe: Any, world: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    before = snapshot(pipe)
    calls = {"n": 0}
    forward = type(pipe.unet).forward

    def flaky(self: Any, *args: Any, **kw: Any) -> Any:  # fails after the loop has taken a step
        calls["n"] += 1
        if calls["n"] > 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return forward(self, *args, **kw)

    monkeypatch.setattr(type(pipe.unet), "forward", flaky)
    with pytest.raises(RuntimeError, match="out of memory"):
        erase(pipe, ["circle"], [world["images"]], EraseConfig(**(FAST | {"steps": 5})))
    monkeypatch.undo()
    assert calls["n"] == 3  # two steps taken, the third failed
    assert_same(before, pipe)


def test_fp16_autocast_is_refused_for_training_before_anything_loads(world: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(ErasekitError, match=r"invalid dtype: .*fp16 autocast is not used for training .*use bf16"):
        erase_model(world["folder"], ["circle"], "auto", tmp_path / "x.erasepatch", {"dtype": "fp16"})
    assert list(tmp_path.iterdir()) == []


def test_generate_reverts_the_patches_it_applied_when_a_later_one_is_refused(
    pipe: Any, world: dict[str, Any], tmp_path: Path
) -> None:
    fits = erase(pipe, ["circle"], [world["images"]], EraseConfig(**FAST)).patch
    root = world["root"]
    other = diff_checkpoints(
        make_checkpoint(root / "b.safetensors", "single-sd2"),
        make_checkpoint(root / "e.safetensors", "single-sd2", edit_layers=[0]),
        output=tmp_path / "sd2.erasepatch",
    )
    before = snapshot(pipe)
    with pytest.raises(IncompatiblePatchError):
        generate(pipe, ["a circle"], tmp_path / "out", GenerateConfig(n=1, steps=1), patches=[fits, other.output])
    assert_same(before, pipe)
    assert not getattr(pipe, "_erasekit_applied", None), "no patch is left on the stack"
