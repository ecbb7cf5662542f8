"""One alpha for every low-rank module (issue 24, item 1): diffusers turns per-module alphas into a peft
``alpha_pattern`` whose names match no module, so peft scaled every module with the most common alpha. With one
alpha (the scale made up for in ``lora_up``) its kohya loader gives erasekit's weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from erasekit.checkpoints.merge import merge_patches
from erasekit.checkpoints.pipeline import load_pipeline
from erasekit.erasing.unlearn import erase
from erasekit.format import _st
from erasekit.format.erase_config import EraseConfig
from erasekit.format.patchfile import NETWORK_ALPHA, Patch, load_patch, metadata_for, save_patch
from erasekit.testing import make_tiny_pipeline

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_pipeline(tmp_path_factory.mktemp("sd1") / "model", arch="sd1")


@pytest.fixture(scope="module")
def patches(model: Path) -> list[Patch]:
    """Two erases of the tiny model (seeds 0 and 1), low-rank at the ranks --rank auto picks."""
    pipe, _ = load_pipeline(model)
    out = []
    for seed in (0, 1):
        images = [Image.new("RGB", (32, 32), (200, 30 + 40 * i, 30 * seed)) for i in range(4)]
        out.append(
            erase(
                pipe,
                ["circle"],
                [images],
                EraseConfig(resolution=32, lr=1e-2, steps=4, rank="auto", patch_dtype="F32", seed=seed),
            ).patch
        )
    return out


def _without_bias_deltas(patch: Patch, path: Path) -> Path:
    """The patch's file less its ``.diff_b`` tensors, which diffusers' kohya converter does not know."""
    tensors = {
        k: ("F32", v.shape, np.ascontiguousarray(v, dtype=np.float32).tobytes())
        for k, v in patch.tensors.items()
        if not k.endswith(".diff_b")
    }
    _st.write_safetensors(path, tensors, {"format": "pt"})
    return path


def _fused_deltas(model: Path, lora: Path, patch: Patch) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per module: (the weight change diffusers' load_lora_weights + fuse_lora made, erasekit's weight delta)."""
    pipe, _ = load_pipeline(model)
    before = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora()
    after = pipe.text_encoder.state_dict()
    out = {}
    for module, _, layer, proj in patch.modules():
        name = f"layers.{layer}.mlp.{proj}"
        got = next(v for k, v in after.items() if k.endswith(f"{name}.base_layer.weight"))
        was = next(v for k, v in before.items() if k.endswith(f"{name}.weight"))
        out[module] = ((got - was).numpy(), patch.weight_delta(module))
    return out


def _check_one_alpha(patch: Patch) -> None:
    alphas = {float(v) for k, v in patch.tensors.items() if k.endswith(".alpha")}
    assert alphas == {NETWORK_ALPHA}
    assert metadata_for(patch)["ss_network_alpha"] == f"{NETWORK_ALPHA:g}"


def test_modules_of_different_ranks_load_in_diffusers_with_erasekit_weights(
    model: Path, patches: list[Patch], tmp_path: Path
) -> None:
    patch = patches[0]
    ranks = {d.rank for d in patch.manifest.deltas.values()}
    assert len(ranks) > 1, "the check needs modules of different ranks"
    _check_one_alpha(patch)
    for module, (got, want) in _fused_deltas(
        model, _without_bias_deltas(patch, tmp_path / "p.safetensors"), patch
    ).items():
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), module


def test_merged_and_reloaded_patches_keep_one_alpha(patches: list[Patch], tmp_path: Path) -> None:
    a, b = tmp_path / "a.erasepatch", tmp_path / "b.erasepatch"
    save_patch(patches[0], a)
    save_patch(patches[1], b)
    merged = tmp_path / "m.erasepatch"
    merge_patches([a, b], merged, strengths=[1.0, 0.5])
    m = load_patch(merged)
    _check_one_alpha(m)
    pa, pb = load_patch(a), load_patch(b)
    for module in m.manifest.deltas:
        want = pa.weight_delta(module) + np.float32(0.5) * pb.weight_delta(module)
        np.testing.assert_allclose(m.weight_delta(module), want, rtol=0, atol=1e-6 * np.abs(want).max())
