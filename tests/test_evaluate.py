"""erasekit eval's pieces that do not need the built-in model: prompt sets, truth, concept images."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from erasekit.checkpoints.pipeline import model_settings
from erasekit.errors import ErasekitError, LayoutError
from erasekit.toyworld.concepts import attribute_of, eval_prompts, render_concept, truth_of


def test_attribute_of_known_and_unknown() -> None:
    assert (attribute_of("circle"), attribute_of("red"), attribute_of("striped")) == ("shape", "colour", "pattern")
    with pytest.raises(ErasekitError, match="toy world has no concept 'snoopy'.*shapes: circle"):
        attribute_of("snoopy")


def test_eval_prompts_cover_the_other_attributes_evenly() -> None:
    specs = eval_prompts("shape", 15)
    assert len(specs) == 5 * 15
    circles = [t for _, t in specs if t["shape"] == "circle"]
    assert Counter(t["colour"] for t in circles) == {c: 3 for c in ("red", "green", "blue", "yellow", "purple")}
    assert Counter(t["pattern"] for t in circles) == {"solid": 5, "hollow": 5, "striped": 5}
    assert all(truth_of(p) == t for p, t in specs), "every prompt names exactly its attributes"


def test_truth_of_free_prompts() -> None:
    assert truth_of("a photo of a red, striped circle") == {"shape": "circle", "colour": "red", "pattern": "striped"}
    assert truth_of("a blue object") == {"colour": "blue"}


def test_render_concept_shows_the_concept() -> None:
    from erasekit.toyworld.judge import judge

    for concept in ("circle", "red", "striped"):
        shots = [render_concept(concept, seed=s) for s in range(6)]
        labels = judge([img for img, _ in shots])
        assert all(lab[attribute_of(concept)] == concept for lab in labels), (concept, labels)
        assert all(truth_of(caption) == lab for (_, caption), lab in zip(shots, labels)), "captions say what is drawn"
    assert render_concept("star", 3)[0].tobytes() == render_concept("star", 3)[0].tobytes()


def test_model_settings(tmp_path: Path) -> None:
    assert model_settings(tmp_path) == {}
    (tmp_path / "erasekit.json").write_text(json.dumps({"erase": {"lr": 0.003}, "toyworld": True}))
    assert model_settings(tmp_path)["erase"] == {"lr": 0.003}
    (tmp_path / "erasekit.json").write_text("{oops")
    with pytest.raises(LayoutError, match="erasekit.json is not readable JSON"):
        model_settings(tmp_path)


def test_erase_and_eval_end_to_end_on_the_builtin_model(tmp_path: Path) -> None:
    """The README's demo, small: erase a shape with the built-in model's defaults, then judge it against the
    bars (target gone; other shapes, colour and pattern as before, give or take one image)."""
    from erasekit.erasing.erase_job import erase_model
    from erasekit.judging.evaluate import EvalConfig, evaluate_model

    patch = tmp_path / "circle.erasepatch"
    er = erase_model(None, ["circle"], None, patch, {})
    assert er.loss_end > er.loss_start  # the loop ascends the denoising loss
    assert {d.storage for d in er.patch.manifest.deltas.values()} == {"lowrank"}  # compact by default
    ev = evaluate_model("circle", [patch], config=EvalConfig(n=8), grid=tmp_path / "grid.png")
    assert ev.target.before >= 0.75 and ev.target.after == 0, ev.target
    assert all(o.after >= o.before - 1 / 8 for o in ev.others), ev.others
    assert all(a.after >= a.before - 1 / 40 for a in ev.attributes.values()), ev.attributes
    # the built-in paraphrases ("one circle", "a circle shape", ...): drawn before, erased too (0 of 16 per wording
    # when measured with n=16, docs/toyworld.md)
    rb = ev.robustness
    assert rb is not None and [w.concept for w in rb.wordings][:2] == ["one circle", "circle"], rb
    assert rb.before >= 0.9 and rb.after <= 0.1, rb
    assert (tmp_path / "grid.png").stat().st_size > 0
