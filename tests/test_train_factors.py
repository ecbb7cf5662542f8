"""``train: factors``: low-rank factors trained in place of the FFN weights (issue 21, item 5): the default where an
erase trains a T5, stored as trained, the optimizer holding the factors alone."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import snapshot

from erasekit.checkpoints.memory import apply_patch
from erasekit.checkpoints.pipeline import load_pipeline
from erasekit.erasing.batch import settings_differ
from erasekit.erasing.conditioning import Conditioner, encoder_outputs, output_drift
from erasekit.erasing.erase_job import erase_model, prepare_erase
from erasekit.errors import ErasekitError
from erasekit.format.erase_config import FACTOR_RANK, EraseConfig
from erasekit.format.patchfile import Patch, load_patch
from erasekit.testing import TINY_T5, make_tiny_pipeline


def run(*args: object) -> Any:
    from typer.testing import CliRunner

    from erasekit.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_pipeline(tmp_path_factory.mktemp("flux") / "flux", "flux")


@dataclass
class T5Erase:
    patch: Path
    report: dict[str, Any]
    images: Path


@pytest.fixture(scope="module")
def t5_erase(tmp_path_factory: pytest.TempPathFactory, flux: Path) -> T5Erase:
    """A 2-step erase of "cat" through the tiny FLUX.1's T5 alone, by the CLI with its defaults otherwise (but a
    high lr, so that the factors move)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("t5-erase")
    (root / "cats").mkdir()
    for i in range(2):
        pixels = np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "cats" / f"cat{i}.png")
    out = root / "t5.erasepatch"
    args = ("erase", "--model", flux, "--concept", "cat", "--images", root / "cats", "--encoders", "te3")
    r = run(*args, "--steps", "2", "--lr", "0.01", "-o", out, "--json")
    assert r.exit_code == 0, r.output
    return T5Erase(out, json.loads(r.stdout), root / "cats")


def factor_sizes(patch: Patch) -> int:
    return sum(a.size for n, a in patch.tensors.items() if n.endswith((".lora_up.weight", ".lora_down.weight")))


def test_a_t5_erase_stores_the_factors_it_trained_and_no_dense_tensor(t5_erase: T5Erase) -> None:
    patch = load_patch(t5_erase.patch)
    width, ffn, layers = TINY_T5
    assert len(patch.manifest.deltas) == 3 * layers
    assert {(d.storage, d.rank, d.bias) for d in patch.manifest.deltas.values()} == {("lowrank", FACTOR_RANK, False)}
    assert not [n for n in patch.tensors if n.endswith((".diff", ".diff_b"))]
    assert {patch.tensors[f"{m}.lora_down.weight"].shape for m in patch.manifest.deltas} == {(16, width), (16, ffn)}
    hp = patch.manifest.method.hyperparameters
    assert (hp["train"], hp["rank"]) == ("factors", 16) and "rank_tol" not in hp and "max_rank" not in hp


def test_the_optimizer_holds_the_factors_alone(tmp_path: Path, t5_erase: T5Erase, flux: Path) -> None:
    """Adam's parameters are the factors (3 x 2 x 16 x (80 + 96) = 16,896, where a dense erase trains T5's 46,080
    FFN weights); its state: two float32 moments a parameter and a float32 step count a tensor."""
    patch = load_patch(t5_erase.patch)
    factors = sum(a.size for n, a in patch.tensors.items() if n.endswith((".lora_up.weight", ".lora_down.weight")))
    width, ffn, layers = TINY_T5
    assert t5_erase.report["trained_parameters"] == factors == 3 * layers * 16 * (width + ffn)
    assert t5_erase.report["optimizer_bytes"] == 8 * factors + 4 * 2 * 3 * layers
    settings = {"encoders": ["te3"], "steps": 1, "rank": "dense"}  # a dense delta: dense training
    dense = erase_model(flux, ["cat"], [t5_erase.images], tmp_path / "dense.erasepatch", settings)
    weights = 3 * layers * width * ffn
    assert dense.trained_parameters == weights and dense.optimizer_bytes == 8 * weights + 4 * 3 * layers


def test_the_patch_moves_the_encoder_as_the_trained_factors_did(t5_erase: T5Erase, flux: Path) -> None:
    """The empty prompt's drift the erase measured with its trained factors in place is the drift the stored patch
    gives (within its BF16 rounding): lora_up @ lora_down x alpha / rank is what trained."""
    patch = load_patch(t5_erase.patch)
    recorded = patch.manifest.method.hyperparameters["empty_prompt_drift"]
    assert recorded["hidden"] > 1e-3, "the factors moved"
    pipe, _ = load_pipeline(flux)
    assert drift_of(pipe, patch) == pytest.approx(recorded, rel=2e-3)
    assert recorded["pooled"] == 0.0, "CLIP-L was not trained"


def drift_of(pipe: Any, patch: Patch) -> dict[str, float]:
    """How far ``patch``, applied in memory, moves the empty prompt's outputs."""
    cond_of = Conditioner(pipe, 32, None)
    with torch.no_grad():
        before = encoder_outputs(cond_of([""], "cpu"))
        apply_patch(pipe, patch)
        return output_drift(before, encoder_outputs(cond_of([""], "cpu")))


def test_a_t5_patch_applies_and_reverts_bit_for_bit(tmp_path: Path, t5_erase: T5Erase, flux: Path) -> None:
    target = shutil.copytree(flux, tmp_path / "flux")
    before = snapshot(target)
    r = run("apply", t5_erase.patch, "--to", target, "--in-place")
    assert r.exit_code == 0 and "base fingerprint exact" in r.stdout and snapshot(target) != before, r.output
    r = run("apply", "--revert", t5_erase.patch, "--to", target)
    assert r.exit_code == 0 and snapshot(target) == before, r.output


def test_the_built_in_model_trains_factors_when_asked(tmp_path: Path) -> None:
    """CLIP's weights as rank-16 factors, its biases dense; the patch moves the encoder as the factors did."""
    from erasekit.toyworld import builtin_model_path

    report = erase_model(None, ["circle"], None, tmp_path / "f.erasepatch", {"train": "factors", "steps": 4})
    patch = load_patch(tmp_path / "f.erasepatch")
    deltas = patch.manifest.deltas
    assert len(deltas) == 4 and {(d.storage, d.rank, d.bias) for d in deltas.values()} == {("lowrank", 16, True)}
    biases = sum(patch.tensors[f"{m}.diff_b"].size for m in deltas)
    factors = sum(a.size for n, a in patch.tensors.items() if n.endswith((".lora_up.weight", ".lora_down.weight")))
    assert report.trained_parameters == factors + biases == 2 * (16 * (64 + 256) * 2 + 256 + 64)
    assert report.sources["train"] == "user" and report.rank_kept is None
    pipe, _ = load_pipeline(builtin_model_path())
    recorded = patch.manifest.method.hyperparameters["empty_prompt_drift"]
    assert recorded["hidden"] > 0 and drift_of(pipe, patch) == pytest.approx(recorded, rel=5e-3)
    # a batch redoes the patch for a dense erase of the same rank, and keeps it for the same settings
    again = {"train": "factors", "steps": 4}
    assert settings_differ(prepare_erase(None, ["circle"], None, tmp_path / "a.erasepatch", again), patch) is None
    dense = prepare_erase(None, ["circle"], None, tmp_path / "b.erasepatch", {"rank": 16, "steps": 4})
    assert settings_differ(dense, patch) == "its train differed"


def test_a_clip_only_erase_trains_dense_and_records_no_training_setting(tmp_path: Path) -> None:
    """The built-in model's default erase is the one it was: every FFN weight and bias trained, compressed after."""
    report = erase_model(None, ["circle"], None, tmp_path / "d.erasepatch", {"steps": 2})
    assert report.trained_parameters == 2 * (2 * 64 * 256 + 256 + 64) and report.rank_kept is not None
    assert "train" not in report.patch.manifest.method.hyperparameters and "train" not in report.sources


def test_which_training_an_erase_gets() -> None:
    assert EraseConfig().for_kinds(["clip", "t5"]).model_dump(include={"train", "rank"}) == {
        "train": "factors",
        "rank": 16,
    }
    assert EraseConfig(rank=8).for_kinds(["t5"]).rank == 8
    assert EraseConfig().for_kinds(["clip"]).train == EraseConfig(rank="dense").for_kinds(["t5"]).train == "dense"
    assert EraseConfig(train="factors").for_kinds(["clip"]).rank == 16
    assert (
        "train" not in EraseConfig().hyperparameters() and "train" not in EraseConfig(train="dense").hyperparameters()
    )


def test_factors_stored_dense_are_refused_before_the_model_loads(tmp_path: Path) -> None:
    with pytest.raises(ErasekitError, match="invalid train: .*factors are stored as they are trained") as e:
        erase_model(None, ["circle"], None, tmp_path / "p.erasepatch", {"train": "factors", "rank": "dense"})
    assert e.value.option == "train" and not (tmp_path / "p.erasepatch").exists()
