"""erasekit eval's robustness section: the target under wordings the erase did not train on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from erasekit.checkpoints.pipeline import model_settings
from erasekit.cli import app
from erasekit.errors import ErasekitError
from erasekit.format.erase_config import OBJECT_TEMPLATES, recommended_for
from erasekit.toyworld import builtin_model_path
from erasekit.toyworld.captions import NOUNS_WITHOUT_SHAPE, PREFIXES
from erasekit.toyworld.concepts import PARAPHRASES, paraphrases_of
from erasekit.toyworld.render import ATTRIBUTES, COLOURS, PATTERNS, SHAPES

runner = CliRunner()


def training_captions() -> set[str]:
    """Every caption the built-in model was trained on (captions.caption: colour, pattern, shape in that order,
    "object" or "shape" when no shape is named, an optional prefix)."""
    out = {""}
    for c in (None, *COLOURS):
        for p in (None, *PATTERNS):
            for s in (None, *SHAPES):
                words = [w for w in (c, p) if w]
                for noun in [s] if s else NOUNS_WITHOUT_SHAPE:
                    if not words and not s:
                        continue
                    text = " ".join(words + [noun])
                    text = f"{'an' if text[0] in 'aeiou' else 'a'} {text}"
                    out |= {text, *(f"{pre} {text}" for pre in PREFIXES)}
    return out


def test_builtin_paraphrases_are_wordings_the_erase_never_trained_on() -> None:
    trained = training_captions()
    assert "a photo of a red striped circle" in trained and "a striped shape" in trained and "circle" not in trained
    assert set(PARAPHRASES) == set(ATTRIBUTES)
    for attribute, values in ATTRIBUTES.items():
        assert len(PARAPHRASES[attribute]) >= 3
        for concept in values:
            assert paraphrases_of(concept) == list(PARAPHRASES[attribute])
            for wording in paraphrases_of(concept):
                prompt = wording.replace("{}", concept)
                assert wording.count("{}") == 1 and prompt not in trained, prompt
                assert prompt not in {t.format(concept) for t in OBJECT_TEMPLATES}, prompt
                # nor what the model recommends erasing it with (its own templates and anchors)
                rec = recommended_for(model_settings(builtin_model_path()), [concept])
                held = {t.format(concept) for t in rec.get("concept_templates", {}).get(concept, [])}
                assert prompt not in held | set(rec["anchor_prompts"]), prompt
    with pytest.raises(ErasekitError, match="no concept 'snoopy'"):
        paraphrases_of("snoopy")


@pytest.fixture(scope="module")
def patch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_clip_judge import noise_patch

    return noise_patch(builtin_model_path(), tmp_path_factory.mktemp("robust") / "noise.erasepatch")


def test_a_paraphrases_file_replaces_the_builtin_wordings(tmp_path: Path, patch: Path) -> None:
    """Templates and whole prompts, n images each on the eval's seeds; strength 0 changes nothing; the table
    shows the section."""
    wordings = tmp_path / "wordings.txt"
    wordings.write_text("one {}\n\n  a drawing of a round thing  \n")
    args = ["eval", "--patch", str(patch), "--concept", "circle", "-n", "2", "--paraphrases", str(wordings)]
    r = runner.invoke(app, [*args, "--strength", "0", "--json", "--grid", str(tmp_path / "grid.png")])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    rb = rep["robustness"]
    assert rb["concept"] == "circle" and rb["source"] == str(wordings)
    assert [w["concept"] for w in rb["wordings"]] == ["one circle", "a drawing of a round thing"]
    assert rep["seeds"] == [1000, 1001] and rep["prompts"] == 5 * 2  # the paraphrases are not among these
    for s in (rb, *rb["wordings"]):
        assert 0 <= s["before"] <= 1 and s["before"] == s["after"], s
    assert rb["before"] == pytest.approx(sum(w["before"] for w in rb["wordings"]) / 2)  # the same n per wording
    assert rb["wordings"][0]["before"] == 1.0, "the unpatched model draws 'one circle' as circles"
    from PIL import Image

    with Image.open(tmp_path / "grid.png") as g:  # 5 shapes and 2 wordings, a before and an after row each
        assert g.size[1] == 20 + 14 * (128 + 4)

    r = runner.invoke(app, [*args, "-n", "1", "--steps", "3"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert any(ln.startswith("paraphrases: circle rate (2 wordings)") for ln in lines), r.stdout
    assert any(ln.strip().startswith("'a drawing of a round thing'") for ln in lines), r.stdout


def test_the_builtin_model_reports_its_paraphrases_by_default(patch: Path) -> None:
    from erasekit.judging.evaluate import EvalConfig, evaluate_model

    rep = evaluate_model("striped", [patch], config=EvalConfig(n=1, steps=3))
    assert rep.robustness is not None and rep.robustness.source == "built-in"
    assert [w.concept for w in rep.robustness.wordings] == [w.replace("{}", "striped") for w in PARAPHRASES["pattern"]]
    assert rep.robustness.change_pp == 100 * (rep.robustness.after - rep.robustness.before)


def test_bad_paraphrases_files_are_one_line_and_write_nothing(tmp_path: Path, patch: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    out = tmp_path / "out"
    out.mkdir()
    for path, code, message in [
        (tmp_path / "missing.txt", 2, "cannot read the wordings file"),
        (empty, 1, "is empty"),
        (binary, 2, "not UTF-8"),
    ]:
        r = runner.invoke(
            app,
            [
                "eval",
                "--patch",
                str(patch),
                "--concept",
                "circle",
                "--paraphrases",
                str(path),
                "--grid",
                str(out / "grid.png"),
            ],
        )
        assert r.exit_code == code, r.output
        assert r.stderr.count("\n") == 1 and message in r.stderr and r.stderr.strip().endswith("(--paraphrases)")
        assert list(out.iterdir()) == []
