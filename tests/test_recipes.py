"""The doco recipe and gradient surgery: what they compute, what they record, and that doco erases on the
built-in model without touching its neighbours."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from erasekit.checkpoints.pipeline import model_settings
from erasekit.cli import app
from erasekit.erasing.erase_job import erase_model
from erasekit.erasing.recipes.doco import DoCo, discriminator
from erasekit.erasing.surgery import surgery_grads
from erasekit.format.erase_config import EraseConfig, effective_settings
from erasekit.format.patchfile import load_patch
from erasekit.judging.evaluate import EvalConfig, evaluate_model
from erasekit.toyworld import builtin_model_path

SETTINGS = model_settings(builtin_model_path())


def _two_objectives() -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Two tensors; on the first the two gradients conflict (cosine < 0), on the second they agree."""
    p = [torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)]
    erase = (p[0] * torch.tensor([1.0, 2.0, 0.0])).sum() + (p[1] * torch.tensor([1.0, 1.0])).sum()
    hold = (p[0] * torch.tensor([-1.0, 0.0, 1.0])).sum() + (p[1] * torch.tensor([2.0, 0.0])).sum()
    return p, erase, hold


def test_surgery_removes_the_conflicting_component_per_tensor() -> None:
    p, erase, hold = _two_objectives()
    assert surgery_grads(p, erase, hold, 1.0, hold_counts=False) == 1
    # [1,2,0] against [-1,0,1]: dot -1, |b|^2 2 -> [1,2,0] + 0.5 [-1,0,1]; orthogonal to the holding gradient now
    assert torch.allclose(p[0].grad, torch.tensor([0.5, 2.0, 0.5]))
    assert float(p[0].grad @ torch.tensor([-1.0, 0.0, 1.0])) == 0.0
    assert torch.equal(p[1].grad, torch.tensor([1.0, 1.0])), "gradients that agree are left alone"

    p, erase, hold = _two_objectives()
    surgery_grads(p, erase, hold, 0.5, hold_counts=True)
    assert torch.allclose(p[0].grad, torch.tensor([0.75, 2.0, 0.25]) + torch.tensor([-1.0, 0.0, 1.0]))
    assert torch.equal(p[1].grad, torch.tensor([3.0, 1.0])), "the holding gradient is added where it counts"


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_a_perfect_prediction_gives_back_the_clean_latents(prediction: str) -> None:
    """What the discriminator sees: the clean latents a UNet output predicts, for both prediction types."""
    from diffusers import DDPMScheduler

    from erasekit.erasing.denoising import Denoiser, Prediction

    d = Denoiser.__new__(Denoiser)
    d.scheduler = DDPMScheduler(prediction_type=prediction)
    d.prediction_type = prediction
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    noisy = d.scheduler.add_noise(x0, noise, t)
    exact = noise if prediction == "epsilon" else d.scheduler.get_velocity(x0, noise, t)
    assert torch.allclose(Prediction(d, noisy, t, exact, exact).clean(), x0, atol=1e-3)


def test_the_discriminator_fits_any_latent_size() -> None:
    for size in (4, 8, 64):
        d = discriminator(4, size)
        assert d(torch.zeros(2, 4, size, size)).shape[:2] == (2, 1)


def test_doco_settings_are_recorded_and_its_surgery_is_on_by_default() -> None:
    config = EraseConfig(recipe="doco")
    assert config.surgery == 1.0
    hp = config.hyperparameters()
    assert (hp["surgery"], hp["disc_lr"], hp["disc_warmup"]) == (1.0, 1e-4, 10)
    assert "stop_ratio" not in hp, "doco runs every step: the early stop is not a setting of it"
    assert EraseConfig(recipe="doco", surgery=0).surgery == 0, "--surgery 0 turns it off"
    for recipe in ("paper", "anchored"):
        hp = EraseConfig(recipe=recipe).hyperparameters()
        assert not {"surgery", "disc_lr", "disc_warmup"} & set(hp), "the other recipes' manifests are as before"
    hp = EraseConfig(recipe="paper", surgery=0.5).hyperparameters()
    assert hp["surgery"] == 0.5 and "anchor_prompts" in hp, "paper with surgery records what it kept clear of"


def test_a_models_recommendations_for_another_recipe() -> None:
    config, sources = effective_settings(SETTINGS["erase"], {"recipe": "doco"}, SETTINGS["erase_recipes"])
    assert (config.recipe, config.epochs, config.lr, config.resolution) == ("doco", 40, 2.5e-3, 32)
    assert config.stand_ins["circle"] == ["square"] and sources["epochs"] == "model"
    config, _ = effective_settings(SETTINGS["erase"], {"recipe": "paper"}, SETTINGS["erase_recipes"])
    assert (config.lr, config.stand_ins) == (1e-5, {}), "a recipe the model has no entry for: the published one"


def test_doco_anchors_replace_the_concept_by_its_stand_ins() -> None:
    config = EraseConfig(recipe="doco", stand_ins={"circle": ["square", "star"]})
    recipe = DoCo(config, ["circle", "red"], "cpu")
    assert recipe.anchors("a red striped circle") == ["a striped square", "a striped star"], (
        "each erased concept takes its stand-ins; one without (red) is dropped"
    )
    assert recipe.anchors("a blue square") == ["a blue square"]


def test_doco_erases_the_target_and_leaves_its_neighbours(tmp_path: Path) -> None:
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    out = tmp_path / "circle.erasepatch"
    short = {"recipe": "doco", "steps": 25, "lr": 3e-3}  # a third of the model's 80 steps, a little faster
    report = erase_model(None, ["circle"], None, out, short)
    assert torch.equal(torch.get_rng_state(), rng), "the discriminator's initialisation leaves torch's generator alone"
    manifest = load_patch(out).manifest
    hp = manifest.method.hyperparameters
    assert manifest.method.name == "wu-2024-doco" and hp["surgery"] == 1.0 and hp["steps"] == 25
    assert 0 <= hp["surgery_conflicts"] <= 1
    assert report.steps == 25
    ev = evaluate_model("circle", [out], config=EvalConfig(n=4))
    assert ev.target.before >= 0.75 and ev.target.after <= 0.05, "doco erases the circle"
    assert all(o.change_pp >= -5 for o in ev.others), [(o.concept, o.change_pp) for o in ev.others]

    again = tmp_path / "again.erasepatch"
    erase_model(None, ["circle"], None, again, short)
    assert load_patch(again).patch_id == load_patch(out).patch_id, "same seed, same patch"


def test_surgery_on_the_anchored_recipe_changes_the_patch_and_is_recorded(tmp_path: Path) -> None:
    plain, cut = tmp_path / "plain.erasepatch", tmp_path / "cut.erasepatch"
    erase_model(None, ["circle"], None, plain, {"steps": 6})
    erase_model(None, ["circle"], None, cut, {"steps": 6, "surgery": 1.0})
    a, b = load_patch(plain), load_patch(cut)
    assert "surgery" not in a.manifest.method.hyperparameters
    assert b.manifest.method.hyperparameters["surgery"] == 1.0
    assert b.manifest.method.hyperparameters["surgery_conflicts"] > 0, "the anchors' gradient conflicts sometimes"
    assert a.patch_id != b.patch_id


@pytest.mark.parametrize("value", ["1.5", "-1"])
def test_surgery_outside_0_1_is_refused(tmp_path: Path, value: str) -> None:
    r = CliRunner().invoke(
        app, ["erase", "-c", "circle", "--recipe", "doco", "--surgery", value, "-o", str(tmp_path / "x.erasepatch")]
    )
    assert r.exit_code != 0 and "surgery" in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("arch, prediction", [("sd1", "epsilon"), ("sdxl", "v_prediction")])
def test_doco_on_real_architectures_with_user_images(tmp_path: Path, arch: str, prediction: str) -> None:
    """Templates with the concept's name (no captions), SDXL's added conditioning for the anchors, v-prediction."""
    from PIL import Image

    from erasekit.testing import make_tiny_pipeline

    model = make_tiny_pipeline(tmp_path / arch, arch=arch, prediction_type=prediction)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (200, 30 + 40 * i, 30)).save(images / f"{i}.png")
    config = EraseConfig(
        recipe="doco", resolution=32, lr=1e-3, steps=3, disc_warmup=1, stand_ins={"circle": "dog"}, keep=["cat"]
    )
    report = erase_model(model, ["circle"], [images], tmp_path / "p.erasepatch", config)
    assert report.steps == 3 and all(map(torch.isfinite, torch.tensor(report.losses)))
    assert load_patch(report.output).manifest.method.name == "wu-2024-doco"


def test_an_erase_after_other_patches_learns_on_top_of_them_and_stacks_on_the_same_base(tmp_path: Path) -> None:
    import shutil

    from conftest import snapshot

    from erasekit.checkpoints.apply import apply_to_checkpoint, revert_from_checkpoint
    from erasekit.checkpoints.pipeline import load_pipeline
    from erasekit.erasing.unlearn import erase
    from erasekit.toyworld.concepts import render_concept

    circle, red, alone = tmp_path / "circle.erasepatch", tmp_path / "red.erasepatch", tmp_path / "alone.erasepatch"
    erase_model(None, ["circle"], None, circle, {"steps": 4})
    r = CliRunner().invoke(app, ["erase", "-c", "red", "--steps", "4", "--after", str(circle), "-o", str(red)])
    assert r.exit_code == 0, r.output
    erase_model(None, ["red"], None, alone, {"steps": 4})
    a, b, c = load_patch(circle), load_patch(red), load_patch(alone)
    assert b.manifest.method.hyperparameters["after"] == [{"patch_id": a.patch_id, "title": a.title}]
    assert b.manifest.base.tensors == c.manifest.base.tensors == a.manifest.base.tensors, "the base is the model's own"
    assert b.patch_id != c.patch_id, "it learned with the circle patch in place"
    shown = CliRunner().invoke(app, ["inspect", str(red)])
    assert f"after [{a.title} ({a.patch_id[:12]})]" in " ".join(shown.stdout.split())

    model = tmp_path / "model"
    shutil.copytree(builtin_model_path(), model)
    before = snapshot(model)
    alone_first = apply_to_checkpoint([red], model, output=tmp_path / "red-only")
    assert any("was made to be applied after 'circle erased'" in w for w in alone_first.warnings)
    independent = apply_to_checkpoint([circle, alone], model, output=tmp_path / "independent")
    assert [w for w in independent.warnings if "was made without" in w] == [
        f"patch '{c.title}' was made without '{a.title}' ({a.patch_id[:12]}) applied: each erases its concept alone, "
        "stacked they may erase less; for concepts that must stay erased together, erase them in one patch (several "
        "--concept) or each --after the ones before it"
    ], "stacking independently made erase patches says what the built-in model measured"
    report = apply_to_checkpoint([circle, red], model, in_place=True)
    assert [p.fingerprint for p in report.applied] == ["exact", "exact"] and not report.warnings
    revert_from_checkpoint(red, model)
    revert_from_checkpoint(circle, model)
    assert snapshot(model) == before

    pipe, _ = load_pipeline(builtin_model_path())
    weights = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    erase(pipe, ["red"], [[render_concept("red", i) for i in range(2)]], EraseConfig(resolution=32, steps=1), after=[a])
    assert all(torch.equal(weights[k], v) for k, v in pipe.text_encoder.state_dict().items()), (
        "the earlier patches are taken off again"
    )
    assert not getattr(pipe, "_erasekit_applied", None)

    from erasekit.checkpoints.memory import apply_patch, revert_patch

    assert any("applied after" in w for w in apply_patch(pipe, b).warnings), "in memory too"
    revert_patch(pipe, b)
    assert not apply_patch(pipe, a).warnings
    assert any(f"made without '{a.title}'" in w for w in apply_patch(pipe, c).warnings), "in memory too"
    revert_patch(pipe, c)
    assert not any("made without" in w for w in apply_patch(pipe, b).warnings), "made --after the circle patch"

    from erasekit.checkpoints.merge import merge_patches

    merged = merge_patches([circle, alone], tmp_path / "merged.erasepatch")
    assert any(f"patch '{c.title}' was made without '{a.title}'" in n for n in merged.notes), "a merge is a stack"
    assert not merge_patches([circle, red], tmp_path / "planned.erasepatch").notes

    stacked = ["--patch", str(circle), "--patch", str(alone)]
    for cmd in (
        ["eval", "--concept", "circle", "-n", "1", "--steps", "2", *stacked],
        ["generate", "a circle", "-n", "1", "--steps", "2", "-o", str(tmp_path / "images"), *stacked],
    ):
        r = CliRunner().invoke(app, cmd)
        assert r.exit_code == 0, r.output
        assert f"warning: patch '{c.title}' was made without '{a.title}'" in r.stderr, (cmd[0], r.stderr)


def test_an_erase_of_a_checkpoint_with_patches_applied_in_place_is_made_after_them(tmp_path: Path) -> None:
    """Erase circle, apply it in place, erase red from that checkpoint: the red patch is made after the circle
    patch on the checkpoint below it, so it applies "exact" there, says nothing, and the stack reverts bit for bit."""
    import shutil

    from conftest import snapshot

    from erasekit.checkpoints.apply import apply_to_checkpoint, revert_from_checkpoint

    model, circle, red = tmp_path / "model", tmp_path / "circle.erasepatch", tmp_path / "red.erasepatch"
    shutil.copytree(builtin_model_path(), model)
    before = snapshot(model)
    erase_model(model, ["circle"], None, circle, {"steps": 2})
    apply_to_checkpoint([circle], model, in_place=True)
    erase_model(model, ["red"], None, red, {"steps": 2})
    a, b = load_patch(circle), load_patch(red)
    assert b.manifest.method.hyperparameters["after"] == [{"patch_id": a.patch_id, "title": a.title}]
    assert b.manifest.base.tensors == a.manifest.base.tensors, "the base is the checkpoint below the patches"
    for cmd in (
        ["eval", "--concept", "red", "-n", "1", "--steps", "2"],
        ["generate", "a red circle", "-n", "1", "--steps", "2", "-o", str(tmp_path / "images")],
    ):
        r = CliRunner().invoke(app, [*cmd, "-m", str(model), "--patch", str(red)])
        assert r.exit_code == 0 and "warning" not in r.stderr, (cmd[0], r.output, "circle is in place below it")
    shown = " ".join(CliRunner().invoke(app, ["inspect", str(red), "--against", str(model)]).stdout.split())
    assert "exact; note: patches already applied to it: circle erased" in shown, shown
    report = apply_to_checkpoint([red], model, in_place=True)
    assert [p.fingerprint for p in report.applied] == ["exact"] and not report.warnings
    revert_from_checkpoint(red, model)
    revert_from_checkpoint(circle, model)
    assert snapshot(model) == before
    fresh = apply_to_checkpoint([red], model, output=tmp_path / "red-alone")
    assert any("was made to be applied after 'circle erased'" in w for w in fresh.warnings)


def test_a_missing_after_patch_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    r = CliRunner().invoke(
        app,
        [
            "erase",
            "-c",
            "red",
            "--steps",
            "1",
            "--after",
            str(tmp_path / "missing.erasepatch"),
            "-o",
            str(tmp_path / "red.erasepatch"),
        ],
    )
    assert r.exit_code != 0 and "missing.erasepatch" in r.output and not (tmp_path / "red.erasepatch").exists()
