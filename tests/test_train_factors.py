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
from erasekit.erasing.erase_job import erase_model, load_for, prepare_erase
from erasekit.erasing.unlearn import Clock, EraseReport, erase
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


# -- the frozen encoders held in bf16 under train: factors (issue 21, item 5) ----------------------------------------

HELD = dict(resolution=32, steps=2, batch_size=1, cache=False, device="cpu", lr=1e-2)
ENCODERS = ("text_encoder", "text_encoder_2")  # the tiny FLUX.1's CLIP-L and T5


def cat_images() -> list[Any]:
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(2)]


def encoder_dtypes(pipe: Any) -> set[torch.dtype]:
    return {p.dtype for name in ENCODERS for p in getattr(pipe, name).parameters()}


def recording(pipe: Any, seen: list[set[torch.dtype]]) -> Any:
    """A progress callback that records the encoders' dtypes at each step."""
    return lambda _: seen.append(encoder_dtypes(pipe))


def fp32_bytes(pipe: Any) -> int:
    return sum(4 * p.numel() for name in ENCODERS for p in getattr(pipe, name).parameters())


def encoder_state(pipe: Any) -> dict[str, tuple[Any, torch.dtype, bool]]:
    """Every encoder parameter's value, dtype and requires_grad flag: what the caller gets back."""
    return {
        f"{name}.{k}": (v.detach().clone(), v.dtype, v.requires_grad)
        for name in ENCODERS
        for k, v in getattr(pipe, name).named_parameters()
    }


def assert_as_found(before: dict[str, tuple[Any, torch.dtype, bool]], pipe: Any) -> None:
    after = encoder_state(pipe)
    assert after.keys() == before.keys()
    for k, (value, dtype, grad) in before.items():
        assert after[k][1:] == (dtype, grad), f"{k}: dtype or requires_grad changed"
        assert torch.equal(after[k][0], value), f"{k}: value changed"


@dataclass
class HeldErases:
    pipe: Any
    before: dict[str, tuple[Any, torch.dtype, bool]]
    reports: dict[str, EraseReport]  # dtype setting -> the erase's report
    seen: dict[str, list[set[torch.dtype]]]  # dtype setting -> the encoders' dtypes at each step


@pytest.fixture(scope="module")
def held(flux: Path) -> HeldErases:
    """The same 2-step erase of "cat" from the tiny FLUX.1 (train: factors through CLIP-L and T5), with ``dtype``
    fp32 and bf16, on one pipeline loaded in float32; its progress callback records the encoders' dtypes."""
    pipe, _ = load_pipeline(flux)
    before = encoder_state(pipe)
    reports, seen = {}, {}
    for dtype in ("fp32", "bf16"):
        seen[dtype] = []
        config = EraseConfig(**HELD, dtype=dtype)  # type: ignore[arg-type]
        reports[dtype] = erase(pipe, ["cat"], [cat_images()], config, progress=recording(pipe, seen[dtype]))
    return HeldErases(pipe, before, reports, seen)


def test_under_factors_dtype_bf16_holds_the_frozen_encoders_in_bf16_and_trains_in_float32(held: HeldErases) -> None:
    """Every encoder weight is bf16 in the loop (fp32 with dtype fp32), and the report says so: half the bytes.
    Adam's state is two float32 moments a parameter and a float32 step a tensor (bf16 parameters would have bf16
    moments): the factors and bias deltas it trains are float32. The pipeline comes back bit for bit."""
    bf16, fp32 = held.reports["bf16"], held.reports["fp32"]
    assert held.seen == {"fp32": [{torch.float32}] * 2, "bf16": [{torch.bfloat16}] * 2}
    assert (bf16.encoder_dtype, fp32.encoder_dtype) == ("bf16", "fp32")
    assert fp32.encoder_bytes == 2 * bf16.encoder_bytes == fp32_bytes(held.pipe) > 0
    tensors = 2 * (4 + 6) + 4  # up and down of CLIP-L's 4 FFN weights and T5's 6, and CLIP-L's 4 bias deltas
    assert bf16.trained_parameters == fp32.trained_parameters
    assert bf16.optimizer_bytes == fp32.optimizer_bytes == 8 * bf16.trained_parameters + 4 * tensors
    assert_as_found(held.before, held.pipe)


def test_a_bf16_held_erase_stores_what_the_fp32_one_does_to_bf16s_precision(held: HeldErases, flux: Path) -> None:
    """The same layout (factors, CLIP's bias deltas dense), the same base fingerprints (of the weights as found:
    the bf16-held patch applies "exact" to them), and deltas pointing the same way. Not closer: Adam's first steps
    move each entry by about +-lr whatever its gradient's size, so entries whose gradient is near zero turn over
    with bf16's rounding of the forward pass (2^-8 relative). Measured: cosine 0.95 or more per tensor, the
    empty prompt's drift within 4%; asserted: 0.9 and 10%."""
    assert held.reports["bf16"].encoder_dtype == "bf16"
    a, b = held.reports["fp32"].patch, held.reports["bf16"].patch
    assert a.manifest.deltas == b.manifest.deltas and a.manifest.base.tensors == b.manifest.base.tensors
    assert {n: t.shape for n, t in a.tensors.items()} == {n: t.shape for n, t in b.tensors.items()}
    assert len([n for n in b.tensors if n.endswith(".diff_b")]) == 4
    for name, x in a.tensors.items():
        x, y = x.astype(np.float64).ravel(), b.tensors[name].astype(np.float64).ravel()
        assert x @ y >= 0.9 * np.linalg.norm(x) * np.linalg.norm(y), name
    drift = b.manifest.method.hyperparameters["empty_prompt_drift"]
    assert drift == pytest.approx(a.manifest.method.hyperparameters["empty_prompt_drift"], rel=0.1)
    pipe, _ = load_pipeline(flux)
    assert apply_patch(pipe, b).applied[0].fingerprint == "exact"


def test_an_error_mid_loop_gives_back_encoders_held_in_bf16(flux: Path) -> None:
    """A caller's fp16 CLIP-L and fp32 T5, both held in bf16 (rounding each), come back bit for bit when the loop
    fails after its first step."""
    pipe, _ = load_pipeline(flux)
    pipe.text_encoder.to(torch.float16)
    before, seen = encoder_state(pipe), []

    def fails(_: Any) -> None:
        seen.append(encoder_dtypes(pipe))
        raise RuntimeError("CUDA out of memory (simulated)")

    with pytest.raises(RuntimeError, match="out of memory"):
        erase(pipe, ["cat"], [cat_images()], EraseConfig(**HELD, dtype="bf16"), progress=fails)  # type: ignore[arg-type]
    assert seen == [{torch.bfloat16}]
    assert_as_found(before, pipe)


def test_a_dense_clip_only_erase_keeps_float32_encoders(flux: Path) -> None:
    """dtype bf16 without factors: CLIP-L's weights train, so every encoder stays float32, as before."""
    pipe, _ = load_pipeline(flux)
    seen: list[set[torch.dtype]] = []
    config = EraseConfig(**HELD, dtype="bf16", encoders=["te1"])  # type: ignore[arg-type]
    report = erase(pipe, ["cat"], [cat_images()], config, progress=recording(pipe, seen))
    assert seen == [{torch.float32}] * 2 and report.rank_kept is not None, "dense training"
    assert (report.encoder_dtype, report.encoder_bytes) == ("fp32", fp32_bytes(pipe))


def test_the_cli_loads_the_encoders_as_an_erase_holds_them(tmp_path: Path, t5_erase: T5Erase, flux: Path) -> None:
    """``erase --dtype bf16`` loads T5 and CLIP-L in bf16 (they are never float32 on the device), reports half the
    float32 bytes, and its patch applies "exact" to the files it was erased from; a dense erase's encoders load
    float32, and a batch does not share one pipeline between the two."""
    out = tmp_path / "bf16.erasepatch"
    r = run(
        "erase",
        "--model",
        flux,
        "--concept",
        "cat",
        "--images",
        t5_erase.images,
        "--dtype",
        "bf16",
        "--steps",
        "2",
        "-o",
        out,
        "--json",
    )
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    pipe, _ = load_pipeline(flux)
    assert (report["encoder_dtype"], 2 * report["encoder_bytes"]) == ("bf16", fp32_bytes(pipe))
    target = shutil.copytree(flux, tmp_path / "flux")
    r = run("apply", out, "--to", target, "--in-place")
    assert r.exit_code == 0 and "base fingerprint exact" in r.stdout, r.output
    jobs = {
        train: prepare_erase(
            flux, ["cat"], [t5_erase.images], tmp_path / f"{train}.erasepatch", {"dtype": "bf16", "train": train}
        )
        for train in ("factors", "dense")
    }
    assert jobs["factors"].load_key() != jobs["dense"].load_key()
    for train, dtype in (("factors", torch.bfloat16), ("dense", torch.float32)):
        loaded, _ = load_for(jobs[train], Clock())
        assert encoder_dtypes(loaded) == {dtype}, train


@pytest.mark.parametrize("kept", ["all-in-one", "apart"])
def test_a_single_files_vae_loads_in_float32_as_stored_beside_bf16_held_encoders(tmp_path: Path, kept: str) -> None:
    """``erase --dtype bf16`` of an SD3 single file, or of its transformer file with the encoder files: the encoders
    load in bf16, the VAE (it encodes the training images) in float32 with the values it is stored with, its folder's
    bit for bit, as under dense training; not rounded through bf16 (the loop's dtype and the encoders' alike)."""
    from erasekit.testing import flow_single_files

    folder = make_tiny_pipeline(tmp_path / "sd3", "sd3")
    files = flow_single_files(folder, tmp_path / "files")
    (tmp_path / "cats").mkdir()
    for i, image in enumerate(cat_images()):
        image.save(tmp_path / "cats" / f"cat{i}.png")
    model, encoders = (
        (files["all-in-one"], [])
        if kept == "all-in-one"
        else (files["transformer"], [files["clip_l"], files["clip_g"], files["t5"]])
    )
    job = prepare_erase(
        model, ["cat"], [tmp_path / "cats"], tmp_path / "p.erasepatch", {"dtype": "bf16", "device": "cpu"},
        config_dir=folder, text_encoders=encoders,
    )  # fmt: skip
    loaded, _ = load_for(job, Clock())
    assert job.config.train == "factors" and encoder_dtypes(loaded) == {torch.bfloat16}
    want = load_pipeline(folder)[0].vae.state_dict()
    got = loaded.vae.state_dict()
    assert {p.dtype for p in got.values()} == {torch.float32}
    assert [k for k in want if not torch.equal(got[k], want[k])] == []


def test_an_erase_after_a_patch_holds_in_bf16_a_pipeline_with_a_patch_applied_in_memory(
    held: HeldErases, flux: Path
) -> None:
    """A caller's float32 pipeline with a patch applied in memory, erased ``after`` another patch with the encoders
    held in bf16: the earlier patch is checked against the weights below the applied one in their own dtype (not
    their bytes read as bf16), and the pipeline comes back as found, the applied patch still revertible."""
    from erasekit.checkpoints.memory import revert_patch

    pipe, _ = load_pipeline(flux)
    pristine = encoder_state(pipe)
    apply_patch(pipe, held.reports["fp32"].patch)
    before = encoder_state(pipe)
    config = EraseConfig(**HELD, dtype="bf16")  # type: ignore[arg-type]
    report = erase(pipe, ["dog"], [cat_images()], config, after=[held.reports["bf16"].patch])
    assert report.encoder_dtype == "bf16"
    assert [a["patch_id"] for a in report.patch.manifest.method.hyperparameters["after"]] == [
        held.reports["bf16"].patch.patch_id
    ]
    assert_as_found(before, pipe)
    revert_patch(pipe, held.reports["fp32"].patch)
    assert_as_found(pristine, pipe)


def test_a_patch_erased_from_a_half_precision_pipeline_applies_exact_to_it(tmp_path: Path) -> None:
    """SD3.x loaded in fp16 as diffusers documents it keeps T5's ``wo`` in float32 (transformers'
    ``_keep_in_fp32_modules``): the patch's base fingerprints are of each tensor in its own dtype as found (``wo``
    float32, not rounded to fp16), so the patch applies "exact" to such a pipeline."""
    folder = make_tiny_pipeline(tmp_path / "sd3", "sd3")
    pipe, _ = load_pipeline(folder, torch_dtype=torch.float16)
    wo = "encoder.block.0.layer.1.DenseReluDense.wo.weight"
    assert pipe.text_encoder_3.get_parameter(wo).dtype == torch.float32
    config = EraseConfig(**HELD, dtype="bf16")  # type: ignore[arg-type]
    patch = erase(pipe, ["cat"], [cat_images()], config).patch
    assert patch.manifest.base.tensors["lora_te3_encoder_block_0_layer_1_DenseReluDense_wo.weight"].dtype == "F32"
    assert apply_patch(load_pipeline(folder, torch_dtype=torch.float16)[0], patch).applied[0].fingerprint == "exact"
