"""The unlearning engine on a tiny pipeline: what changes, that the loss rises, determinism, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import snapshot
from PIL import Image, ImageDraw

from erasekit.checkpoints.apply import apply_to_checkpoint, revert_from_checkpoint
from erasekit.checkpoints.memory import apply_patch
from erasekit.checkpoints.pipeline import load_pipeline
from erasekit.erasing.erase_job import erase_model
from erasekit.erasing.unlearn import erase
from erasekit.errors import ErasekitError, InputFileError, LayoutError, NonFiniteError, TargetNotWritableError
from erasekit.format.erase_config import GENERIC_ANCHORS, EraseConfig
from erasekit.format.patchfile import load_patch
from erasekit.testing import make_checkpoint, make_tiny_pipeline

FAST = dict(resolution=32, lr=1e-3)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd1")


@pytest.fixture(scope="session")
def circles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("circles")
    for i in range(4):
        img = Image.new("RGB", (64, 64), (235, 235, 235))
        ImageDraw.Draw(img).ellipse((8 + 3 * i, 10, 52, 50 + i), fill=(200, 30, 30))
        img.save(folder / f"{i}.png")
    return folder


@pytest.fixture
def work(tmp_path: Path, tiny: Path) -> Path:
    """A private copy of the tiny pipeline (some tests write to it)."""
    return Path(shutil.copytree(tiny, tmp_path / "model"))


def test_only_ffn_changes_and_forget_loss_rises(tiny: Path, circles: Path) -> None:
    pipe, ckpt = load_pipeline(tiny)
    before = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    unet_before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    report = erase(
        pipe, ["circle"], [sorted(circles.iterdir())], EraseConfig(**FAST, forget_check=True), base_files=ckpt
    )
    # the pipeline is left as it was
    assert all(torch.equal(before[k], v) for k, v in pipe.text_encoder.state_dict().items())
    assert all(torch.equal(unet_before[k], v) for k, v in pipe.unet.state_dict().items())
    assert report.steps == 10 and len(report.losses) == 10  # 5 epochs x 4 images / batch 2
    assert report.forget_loss_after > report.forget_loss_before, "gradient ascent must raise the denoising loss"
    # applying the patch changes exactly the FFN tensors of the text encoder
    apply_patch(pipe, report.patch)
    changed = {k for k, v in pipe.text_encoder.state_dict().items() if not torch.equal(before[k], v)}
    assert changed == {
        f"text_model.encoder.layers.{i}.mlp.{p}.{k}" for i in (0, 1) for p in ("fc1", "fc2") for k in ("weight", "bias")
    } or changed == {
        f"encoder.layers.{i}.mlp.{p}.{k}" for i in (0, 1) for p in ("fc1", "fc2") for k in ("weight", "bias")
    }
    m = report.patch.manifest
    assert m.method.name == "fuchi-takagi-2024" and m.method.num_images == 4 and m.method.seed == 0
    assert m.method.hyperparameters["lr"] == 1e-3 and m.method.hyperparameters["betas"] == [0.9, 0.98]


def test_the_erase_runs_the_unet_once_per_step_and_reports_where_its_time_went(tiny: Path, circles: Path) -> None:
    pipe, _ = load_pipeline(tiny)
    calls = []
    handle = pipe.unet.register_forward_hook(lambda *_: calls.append(1))
    try:
        report = erase(pipe, ["circle"], [sorted(circles.iterdir())], EraseConfig(**FAST, steps=6))
    finally:
        handle.remove()
    assert len(calls) == 6 and report.steps == 6  # no diagnostic passes unless forget_check
    assert report.forget_loss_before is None and report.forget_loss_after is None
    assert list(report.timings) == ["images", "encode", "compress", "loop", "patch"]
    assert report.timings["loop"] == report.loop_seconds and 0 < sum(report.timings.values()) <= report.total_seconds
    assert report.loss_start == pytest.approx(report.losses[0]) and report.loss_end == pytest.approx(report.losses[-1])


def test_defaults_are_the_published_recipe() -> None:
    c = EraseConfig()
    assert (c.lr, c.betas, c.eps, c.weight_decay, c.batch_size, c.epochs, c.resolution) == (
        1e-5,
        (0.9, 0.98),
        1e-6,
        1e-8,
        2,
        5,
        512,
    )
    assert len(c.template_list()) == 27 and len(EraseConfig(kind="style").template_list()) == 19


def test_same_seed_same_patch(tmp_path: Path, tiny: Path, circles: Path) -> None:
    a = erase_model(tiny, ["circle"], [circles], tmp_path / "a.erasepatch", EraseConfig(**FAST))
    b = erase_model(tiny, ["circle"], [circles], tmp_path / "b.erasepatch", EraseConfig(**FAST, cache=False))
    pa, pb = load_patch(a.output), load_patch(b.output)
    assert pa.patch_id == pb.patch_id
    ma, mb = pa.manifest.model_dump(), pb.manifest.model_dump()
    for m in (ma, mb):  # the only fields allowed to differ: when it ran and how long it took
        m.pop("created_at")
        m["method"].pop("duration_s")
    assert ma == mb
    c = erase_model(tiny, ["circle"], [circles], tmp_path / "c.erasepatch", EraseConfig(**FAST, seed=1))
    assert load_patch(c.output).patch_id != pa.patch_id


def test_patch_applies_exactly_and_reverts_on_the_folder(tmp_path: Path, work: Path, circles: Path) -> None:
    report = erase_model(work, ["circle"], [circles], tmp_path / "p.erasepatch", EraseConfig(**FAST))
    original = snapshot(work)
    rep = apply_to_checkpoint([report.output], work, in_place=True)
    assert rep.applied[0].fingerprint == "exact"
    assert snapshot(work) != original
    revert_from_checkpoint(report.output, work)
    assert snapshot(work) == original


def test_layers_and_v_prediction(tmp_path: Path, circles: Path) -> None:
    model = make_tiny_pipeline(tmp_path / "v", arch="sd2", prediction_type="v_prediction")
    r = erase_model(model, ["circle"], [circles], tmp_path / "p.erasepatch", EraseConfig(**FAST, layers=[1], steps=3))
    m = load_patch(r.output).manifest
    assert m.base.architecture == "sd2" and m.method.hyperparameters["prediction_type"] == "v_prediction"
    assert list(m.deltas) == [
        "lora_te_text_model_encoder_layers_1_mlp_fc1",
        "lora_te_text_model_encoder_layers_1_mlp_fc2",
    ]
    assert r.steps == 3


def test_auto_images_and_several_concepts(tmp_path: Path, tiny: Path) -> None:
    r = erase_model(
        tiny, ["circle", "square"], "auto", tmp_path / "p.erasepatch", EraseConfig(**FAST, steps=2), num_images=2
    )
    m = load_patch(r.output).manifest
    assert [c.name for c in m.concepts] == ["circle", "square"] and m.method.num_images == 4
    assert m.title == "circle + square erased"


def test_latents_are_cached(tmp_path: Path, tiny: Path, circles: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ERASEKIT_CACHE_DIR", str(tmp_path / "cache"))
    pipe, _ = load_pipeline(tiny)
    first = erase(pipe, ["circle"], [sorted(circles.iterdir())], EraseConfig(**FAST, steps=2))
    assert len(list((tmp_path / "cache" / "latents").glob("*.safetensors"))) == 4

    def no_vae(*a, **k):  # type: ignore[no-untyped-def]
        raise AssertionError("the VAE must not run when the latents are cached")

    monkeypatch.setattr(pipe.vae, "encode", no_vae)
    second = erase(pipe, ["circle"], [sorted(circles.iterdir())], EraseConfig(resolution=32, steps=2, lr=3e-3))
    assert second.patch.patch_id != first.patch.patch_id  # other hyperparameters, same latents
    with pytest.raises(AssertionError, match="must not run"):
        erase(pipe, ["circle"], [sorted(circles.iterdir())], EraseConfig(**FAST, steps=2, cache=False))


# -- bad input: one clear error, no output file -----------------------------------------------------


def _expect(tmp_path: Path, exc: type[Exception], match: str, *args, **kw) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out.erasepatch"
    with pytest.raises(exc, match=match):
        erase_model(*args, output=out, **kw)
    assert not out.exists() and not list(tmp_path.glob("*.incomplete"))


def test_no_images(tmp_path: Path, tiny: Path) -> None:
    (tmp_path / "empty").mkdir()
    _expect(tmp_path, InputFileError, "no images found in", tiny, ["circle"], [tmp_path / "empty"])
    _expect(tmp_path, InputFileError, "does not exist", tiny, ["circle"], [tmp_path / "nope"])


def test_unreadable_image_is_named(tmp_path: Path, tiny: Path, circles: Path) -> None:
    bad = Path(shutil.copytree(circles, tmp_path / "imgs"))
    (bad / "broken.png").write_text("not a png")
    _expect(
        tmp_path,
        InputFileError,
        "broken.png is not a readable image",
        tiny,
        ["circle"],
        [bad],
        config=EraseConfig(**FAST),
    )


def test_fewer_images_than_batch(tmp_path: Path, tiny: Path, circles: Path) -> None:
    _expect(
        tmp_path,
        ErasekitError,
        "4 training images but a batch size of 8",
        tiny,
        ["circle"],
        [circles],
        config=EraseConfig(**FAST, batch_size=8),
    )


def test_concept_without_tokens(tmp_path: Path, tiny: Path, circles: Path) -> None:
    _expect(tmp_path, ErasekitError, "tokenizes to nothing", tiny, ["   "], [circles], config=EraseConfig(**FAST))


def test_concepts_and_folders_must_pair(tmp_path: Path, tiny: Path, circles: Path) -> None:
    _expect(tmp_path, ErasekitError, "2 concepts but 1 image folders", tiny, ["a", "b"], [circles])


def test_model_missing_a_component(tmp_path: Path, work: Path, circles: Path) -> None:
    shutil.rmtree(work / "unet")
    _expect(tmp_path, LayoutError, "lacks its unet", work, ["circle"], [circles])


def test_unsupported_architecture(tmp_path: Path, circles: Path) -> None:
    refiner = make_checkpoint(tmp_path / "refiner", "diffusers-sdxl-refiner", "F16")
    _expect(
        tmp_path,
        LayoutError,
        "is sdxl-refiner; erase and generate support SD1.x, SD2.x, SDXL base, FLUX.1 and SD3.x",
        refiner,
        ["circle"],
        [circles],
    )
    lone = make_checkpoint(tmp_path / "te", "transformers-clip", "F16")
    _expect(tmp_path, LayoutError, "is a CLIP text encoder on its own", lone, ["circle"], [circles])


def test_non_finite_loss_stops_and_names_the_step(tmp_path: Path, tiny: Path, circles: Path) -> None:
    _expect(
        tmp_path,
        NonFiniteError,
        r"non-finite at step \d+; no patch",
        tiny,
        ["circle"],
        [circles],
        config=EraseConfig(resolution=32, lr=1e9, steps=5),
    )


def test_existing_output_is_kept(tmp_path: Path, tiny: Path, circles: Path) -> None:
    out = tmp_path / "out.erasepatch"
    out.write_bytes(b"precious")
    with pytest.raises(TargetNotWritableError, match="already exists"):
        erase_model(tiny, ["circle"], [circles], out)
    assert out.read_bytes() == b"precious"


def test_bad_template() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        EraseConfig(templates=["no slot here"])
    assert np.isclose(EraseConfig(templates=["a {} photo"]).lr, 1e-5)
    hp = EraseConfig().hyperparameters()
    assert json.loads(json.dumps(hp)) == hp, "the recorded settings survive the manifest's JSON"
    published = {
        "lr": 1e-5,
        "betas": [0.9, 0.98],
        "eps": 1e-6,
        "weight_decay": 1e-8,
        "batch_size": 2,
        "epochs": 5,
        "resolution": 512,
        "flip": True,
        "recipe": "paper",
    }
    assert {k: hp[k] for k in published} == published


def test_sdxl_erases_through_both_encoders(tmp_path: Path, circles: Path) -> None:
    xl = make_tiny_pipeline(tmp_path / "xl", arch="sdxl")
    r = erase_model(xl, ["circle"], [circles], tmp_path / "p.erasepatch", EraseConfig(**FAST, steps=3))
    m = load_patch(r.output).manifest
    assert m.base.architecture == "sdxl" and set(m.base.encoders) == {"te1", "te2"}
    # SDXL reads te1's penultimate hidden state: te1's last layer is left alone, te2's is trained (pooled output)
    assert sorted(m.deltas) == [
        "lora_te1_text_model_encoder_layers_0_mlp_fc1",
        "lora_te1_text_model_encoder_layers_0_mlp_fc2",
        "lora_te2_text_model_encoder_layers_0_mlp_fc1",
        "lora_te2_text_model_encoder_layers_0_mlp_fc2",
        "lora_te2_text_model_encoder_layers_1_mlp_fc1",
        "lora_te2_text_model_encoder_layers_1_mlp_fc2",
    ]
    original = snapshot(xl)
    assert apply_to_checkpoint([r.output], xl, in_place=True).applied[0].fingerprint == "exact"
    revert_from_checkpoint(r.output, xl)
    assert snapshot(xl) == original
    only2 = erase_model(
        xl, ["circle"], [circles], tmp_path / "q.erasepatch", EraseConfig(**FAST, steps=2, encoders=["te2"])
    )
    assert set(load_patch(only2.output).manifest.base.encoders) == {"te2"}
    with pytest.raises(ErasekitError, match="te is not an encoder of this sdxl model"):
        erase_model(xl, ["circle"], [circles], tmp_path / "r.erasepatch", EraseConfig(**FAST, encoders=["te"]))


def test_anchored_recipe_holds_other_prompts_in_place(tiny: Path, circles: Path) -> None:
    """With the same lr and steps, anchoring moves the conditioning of unrelated and --keep prompts far less."""
    from erasekit.erasing.conditioning import Conditioner

    pipe, _ = load_pipeline(tiny)
    probe = ["a photo of a dog", "a square", ""]

    def drift(recipe: str) -> float:
        cfg = EraseConfig(resolution=32, lr=3e-3, steps=12, recipe=recipe, keep=["square"], stop_ratio=None)
        patch = erase(pipe, ["circle"], [sorted(circles.iterdir())], cfg).patch
        cond = Conditioner(pipe, 32, None)
        with torch.no_grad():
            ref = cond(probe, pipe.unet.device)[0]
            apply_patch(pipe, patch)
            new = cond(probe, pipe.unet.device)[0]
        from erasekit.checkpoints.memory import revert_patch

        revert_patch(pipe, patch)
        return float(((new - ref) ** 2).mean())

    paper, anchored = drift("paper"), drift("anchored")
    assert anchored < 0.5 * paper, (paper, anchored)


def test_early_stop_rule() -> None:
    from erasekit.erasing.recipes.anchored import tipped as _tipped

    cfg = EraseConfig(recipe="anchored", stop_ratio=1.5, stop_window=3)
    assert not _tipped([1.0, 1.0, 1.0, 1.1, 1.2], cfg)  # too few steps to judge
    assert not _tipped([1.0, 1.0, 1.0, 1.1, 1.2, 1.3], cfg)
    assert _tipped([1.0, 1.0, 1.0, 1.2, 1.8, 2.0], cfg)
    assert not _tipped([1.0] * 3 + [9.0] * 3, EraseConfig(recipe="anchored", stop_ratio=None, stop_window=3))


def test_recipe_settings_are_recorded_only_when_used() -> None:
    assert "anchor_weight" not in EraseConfig().hyperparameters()
    hp = EraseConfig(recipe="anchored", keep=["dog"]).hyperparameters()
    assert hp["keep"] == ["dog"] and hp["anchor_weight"] == 30.0 and "" in hp["anchor_prompts"]


def test_anchors_naming_the_erased_concept_are_dropped() -> None:
    from erasekit.erasing.recipes.holding import anchor_prompts as _anchor_prompts

    cfg = EraseConfig(
        recipe="anchored",
        anchor_prompts=["", "a red circle", "a blue square", "a circle"],
        keep=["cross"],
        templates=["a photo of a {}"],
    )
    prompts, refs, weights, unkept = _anchor_prompts(cfg, ["circle"])
    assert prompts == ["", "a blue square", "a photo of a cross"]
    assert refs == [[p] for p in prompts]
    assert weights.tolist() == [1.0, 1.0, 5.0] and unkept.tolist() == [1.0, 1.0, 0.0]


def test_keep_weighs_the_anchors_that_name_the_kept_concept() -> None:
    """--keep X: the model's own prompts naming X count keep_weight, like X in the templates (on the built-in model
    the templates alone, "a photo of a purple", are not how its world is described)."""
    from erasekit.erasing.recipes.holding import anchor_prompts as _anchor_prompts

    cfg = EraseConfig(
        recipe="anchored",
        anchor_prompts=["a purple object", "a blue square", "a purpled square"],
        keep=["purple"],
        templates=["a photo of a {}"],
    )
    prompts, _, weights, unkept = _anchor_prompts(cfg, ["red"])
    assert prompts == ["", "a purple object", "a blue square", "a purpled square", "a photo of a purple"]
    assert weights.tolist() == [1.0, 5.0, 1.0, 1.0, 5.0]
    assert unkept.tolist() == [1.0, 1.0, 1.0, 1.0, 0.0]  # the weights without --keep, which the penalty divides by


def test_keep_holds_the_kept_prompts_harder_and_the_others_as_hard_as_without_it() -> None:
    """--keep adds a hold on the kept concept's prompts and takes none from the others: with the kept prompts where
    they were, the penalty is the one without --keep, whatever keep_weight (a weighted mean over all held prompts
    held the others half as hard at keep weight 5 on the built-in models, and their images drifted)."""
    from erasekit.erasing.recipes.holding import Holding

    gen = torch.Generator().manual_seed(0)
    prompts = ["", "a purple object", "a blue square", "a photo of a purple", *GENERIC_ANCHORS]
    table = {p: torch.randn(3, 4, generator=gen) for p in prompts}

    def penalty(keep: list[str], keep_weight: float, moved: set[str]) -> float:
        cfg = EraseConfig(
            recipe="anchored",
            anchor_prompts=prompts[:3],
            keep=keep,
            keep_weight=keep_weight,
            templates=["a photo of a {}"],
        )
        holding = Holding(cfg, ["red"], "cpu")
        holding.prepare(lambda ps: (torch.stack([table[p] for p in ps]), None))
        holding.chosen = list(range(len(holding.held)))
        cond = torch.stack([table[p] + (0.5 if p in moved else 0.0) for p in holding.held])
        return float(holding.penalty((cond, None)))

    others = {"", "a blue square"}
    without = penalty([], 5.0, others)
    assert without > 0
    for weight in (0.5, 5.0, 20.0):
        assert penalty(["purple"], weight, others) == pytest.approx(without, rel=1e-6)
    kept_moved = {"a purple object", "a photo of a purple"}
    assert penalty(["purple"], 5.0, kept_moved) == pytest.approx(5 * penalty(["purple"], 1.0, kept_moved), rel=1e-6)
    assert penalty(["purple"], 5.0, kept_moved) > penalty([], 5.0, kept_moved)


def test_stand_ins_hold_the_erased_prompts_at_the_stand_in_prompts() -> None:
    from erasekit.erasing.recipes.holding import anchor_prompts as _anchor_prompts

    cfg = EraseConfig(
        recipe="anchored",
        anchor_prompts=["a red Circle", "a blue square", "circles"],
        stand_ins={"circle": "square", "red": ["", "green"]},
        stand_in_weight=0.5,
        templates=["a photo of a {}", "a {}"],
    )
    prompts, refs, weights, unkept = _anchor_prompts(cfg, ["circle", "red"])
    # whole words only ("circles" is not "circle"); both erased words replaced; "" drops a word; templates added
    assert prompts == [
        "",
        "a red Circle",
        "a blue square",
        "circles",
        "a photo of a circle",
        "a circle",
        "a photo of a red",
        "a red",
    ]
    assert refs == [
        [""],
        ["a square", "a green square"],
        ["a blue square"],
        ["circles"],
        ["a photo of a square"],
        ["a square"],
        ["a photo of a", "a photo of a green"],
        ["a", "a green"],
    ]
    assert weights.tolist() == unkept.tolist() == [1.0, 0.5, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5]  # no --keep: the same
    assert EraseConfig(stand_ins={"red": "blue"}).stand_ins == {"red": ["blue"]}


def test_a_rank_stores_the_change_projected_on_its_top_output_directions(
    tmp_path: Path, tiny: Path, circles: Path
) -> None:
    dense = erase_model(
        tiny, ["circle"], [circles], tmp_path / "dense.erasepatch", EraseConfig(**FAST, patch_dtype="F32", rank="dense")
    )
    low = erase_model(
        tiny, ["circle"], [circles], tmp_path / "r2.erasepatch", EraseConfig(**FAST, patch_dtype="F32", rank=2)
    )
    pd, pl = load_patch(dense.output), load_patch(low.output)
    assert low.patch_bytes < dense.patch_bytes and 0 < low.rank_kept < 1 and dense.rank_kept is None
    x = np.random.default_rng(0).standard_normal((64, 100))
    for m, info in pl.manifest.deltas.items():
        assert (info.storage, info.rank) == ("lowrank", 2) and 0 < info.error < 1 and 0 < info.kept < 1
        scale = float(pl.tensors[f"{m}.alpha"]) / info.rank  # lora_up holds the left factor over the scale
        up, full = pl.tensors[f"{m}.lora_up.weight"].astype(np.float64) * scale, pd.weight_delta(m).astype(np.float64)
        assert up.shape[1] == 2 and f"{m}.diff" not in pl.tensors
        np.testing.assert_allclose(up.T @ up, np.eye(2), atol=1e-5)  # orthonormal output directions ...
        np.testing.assert_allclose(pl.weight_delta(m), up @ up.T @ full, atol=1e-6)  # ... the change projected on them
        assert info.kept == pytest.approx(np.linalg.norm(up.T @ full) ** 2 / np.linalg.norm(full) ** 2, rel=1e-4)
        xs = x[: full.shape[1]]  # a projection never moves an input further than the whole change does
        assert (np.linalg.norm(pl.weight_delta(m) @ xs, axis=0) <= np.linalg.norm(full @ xs, axis=0) + 1e-9).all()
        np.testing.assert_array_equal(pl.tensors[f"{m}.diff_b"], pd.tensors[f"{m}.diff_b"])  # biases stay exact
    assert pl.manifest.method.hyperparameters["rank"] == 2 and 0 < low.output_error < 1
    assert pl.manifest.method.hyperparameters["output_error"] == pytest.approx(low.output_error, abs=1e-6)
    full = erase_model(
        tiny, ["circle"], [circles], tmp_path / "r9.erasepatch", EraseConfig(**FAST, patch_dtype="F32", rank=999)
    )
    assert (
        full.rank_kept == pytest.approx(1.0) and full.output_error < 1e-4
    )  # a rank above the matrix's keeps everything
    for m in pd.manifest.deltas:
        np.testing.assert_allclose(load_patch(full.output).weight_delta(m), pd.weight_delta(m), atol=1e-6)


def test_auto_rank_takes_per_tensor_the_smallest_rank_within_the_tolerance(
    tmp_path: Path, tiny: Path, circles: Path
) -> None:
    loose = erase_model(
        tiny,
        ["circle"],
        [circles],
        tmp_path / "loose.erasepatch",
        EraseConfig(**FAST, rank="auto", rank_tol=0.3, max_rank=16),
    )
    tight = erase_model(
        tiny,
        ["circle"],
        [circles],
        tmp_path / "tight.erasepatch",
        EraseConfig(**FAST, rank="auto", rank_tol=0.01, max_rank=16),
    )
    for report, tol in ((loose, 0.3), (tight, 0.01)):
        deltas = load_patch(report.output).manifest.deltas
        assert all(d.storage == "lowrank" and 1 <= d.rank <= 16 for d in deltas.values())
        assert all(d.error <= tol + 1e-6 for d in deltas.values() if d.rank < 16)  # within tol unless capped
    ranks = {
        m: (loose.patch.manifest.deltas[m].rank, tight.patch.manifest.deltas[m].rank)
        for m in loose.patch.manifest.deltas
    }
    assert all(a <= b for a, b in ranks.values()) and any(a < b for a, b in ranks.values())
    assert loose.patch_bytes < tight.patch_bytes and loose.output_error > tight.output_error
    hp = loose.patch.manifest.method.hyperparameters
    assert (hp["rank"], hp["rank_tol"], hp["max_rank"]) == ("auto", 0.3, 16)
    assert EraseConfig().rank == "auto" and EraseConfig(rank=None).rank == "dense" and EraseConfig(rank="8").rank == 8
    with pytest.raises(ValueError):
        EraseConfig(rank=0)


def test_each_concept_is_trained_and_held_in_its_own_templates() -> None:
    """concept_templates: a concept listed there is drawn, held at its stand-in and kept in its own wordings; the
    others in the erase's templates. Draws consume the generator the same way whichever list a concept has."""
    import torch

    from erasekit.erasing.denoising import Draws
    from erasekit.erasing.recipes.holding import anchor_prompts as _anchor_prompts

    cfg = EraseConfig(
        recipe="anchored",
        anchor_prompts=[""],
        templates=["a photo of a {}"],
        keep=["hollow"],
        concept_templates={"Striped": ["a {} pattern", "{} pattern"], "hollow": ["{} thing"]},
        stand_ins={"striped": "solid", "red": "blue"},
    )
    prompts, refs, weights, _ = _anchor_prompts(cfg, ["red", "striped"])
    assert prompts == ["", "a photo of a red", "a striped pattern", "striped pattern", "hollow thing"]
    assert refs[1:4] == [["a photo of a blue"], ["a solid pattern"], ["solid pattern"]]
    assert weights.tolist() == pytest.approx([1.0, 0.3, 0.3, 0.3, 5.0])
    draws = Draws(
        [cfg.templates_for(c) for c in ("red", "striped")], ["red", "striped"], [0, 1, 1], [None] * 3, 1000, (4, 4, 4)
    )
    assert draws.every_prompt() == ["a photo of a red", "a striped pattern", "striped pattern"]
    gen = torch.Generator().manual_seed(0)
    seen = {p for _ in range(20) for p in draws([0, 1, 2], gen)[2]}
    assert seen == set(draws.every_prompt())


def test_a_prompt_naming_part_of_a_concept_is_dropped_even_with_a_stand_in() -> None:
    from erasekit.erasing.recipes.holding import anchor_prompts as _anchor_prompts

    cfg = EraseConfig(
        recipe="anchored",
        anchor_prompts=["a painting by Gogh", "a Van Gogh painting", "a tree"],
        stand_ins={"Van Gogh": "Monet"},
        templates=["{}"],
    )
    prompts, refs, _, _ = _anchor_prompts(cfg, ["Van Gogh"])
    assert prompts == ["", "a Van Gogh painting", "a tree", "Van Gogh"]
    assert refs == [[""], ["a Monet painting"], ["a tree"], ["Monet"]]


def test_gradient_checkpointing_changes_memory_not_the_result(
    tiny: Path, circles: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch.utils.checkpoint

    pipe, _ = load_pipeline(tiny)
    cfg = dict(FAST, steps=3, dtype="fp32", rank="dense", patch_dtype="F32")
    plain = erase(pipe, ["circle"], [sorted(circles.iterdir())], EraseConfig(**cfg))
    recomputed = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(
        torch.utils.checkpoint, "checkpoint", lambda *a, **k: recomputed.append(1) or checkpoint(*a, **k)
    )
    checkpointed = erase(pipe, ["circle"], [sorted(circles.iterdir())], EraseConfig(**cfg, checkpointing=True))
    assert recomputed  # the UNet's blocks ran through torch's checkpointing
    assert not pipe.unet.is_gradient_checkpointing  # the UNet's own setting is given back
    assert plain.losses == pytest.approx(checkpointed.losses, rel=1e-5)
    for m in plain.patch.manifest.deltas:
        np.testing.assert_allclose(
            checkpointed.patch.weight_delta(m), plain.patch.weight_delta(m), rtol=1e-4, atol=1e-7
        )
    assert "checkpointing" not in checkpointed.patch.manifest.method.hyperparameters  # how it ran, not what it computed


def test_a_shorter_run_is_the_start_of_a_longer_one(tiny: Path, circles: Path) -> None:
    """Each epoch's shuffle is drawn when the epoch begins: --steps k stops where --steps N was after k steps."""
    pipe, _ = load_pipeline(tiny)
    cfg = dict(FAST, batch_size=1, dtype="fp32", rank="dense", patch_dtype="F32", cache=False)
    long = erase(pipe, ["circle"], [sorted(circles.iterdir())], EraseConfig(**cfg, steps=9))  # 4 images: 3 epochs
    short = erase(pipe, ["circle"], [sorted(circles.iterdir())], EraseConfig(**cfg, steps=5))
    assert short.losses == long.losses[:5]
