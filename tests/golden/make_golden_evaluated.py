"""Writes tests/golden/v1-evaluated.erasepatch: tests/golden/v1.erasepatch with one recorded evaluation
(``erasekit eval --record``), made from a fixed report with fixed time, version, judge and prompts. Run once per
evaluation format version; the file is then kept forever.

    python tests/golden/make_golden_evaluated.py

The evaluated model is the tiny SD1 checkpoint v1.erasepatch was made for (``make_checkpoint(...,
"single-sd1", "F32", seed=0)``), so the record says ``match: exact``.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

from erasekit.format.patchfile import Evaluation, JudgeInfo, load_patch
from erasekit.judging.evaluate import ConceptScore, EvalConfig, EvalReport
from erasekit.judging.evidence import evaluated_model, evaluation_from_report, record_evaluation
from erasekit.testing import make_checkpoint

HERE = Path(__file__).parent
RECORDED_AT = "2026-11-24T12:00:00Z"
VERSION = "0.1.0.dev0"
JUDGE = JudgeInfo(kind="toyworld-cnn", name="judge.safetensors", sha256="5" * 64)
PROMPTS = ["a red solid circle", "a green hollow circle", "a red solid square", "a green hollow square"]


def report() -> EvalReport:
    """An evaluation of erasing "circle" among two shapes, 2 images per prompt, with paraphrases."""
    r = EvalReport(
        concept="circle",
        attribute="shape",
        target=ConceptScore("circle", 1.0, 0.0),
        others=[ConceptScore("square", 1.0, 0.75)],
        attributes={"colour": ConceptScore("colour", 0.875, 0.875), "pattern": ConceptScore("pattern", 0.75, 0.5)},
        attributes_elsewhere={
            "colour": ConceptScore("colour", 1.0, 1.0),
            "pattern": ConceptScore("pattern", 0.75, float("nan")),
        },
        largest_drop=ConceptScore("square", 1.0, 0.75),
        images_per_prompt=2,
        seeds=[1000, 1001],
        prompts=4,
        seconds=3.5,
        patches=["golden v1"],
        prompt_texts=list(PROMPTS),
    )
    # set as an attribute: erasekit versions whose EvalReport has no such field still build the same record
    r.robustness = SimpleNamespace(
        before=1.0, after=0.25, wordings=[ConceptScore("a round shape", 1.0, 0.5), ConceptScore("a ring", 1.0, 0.0)]
    )
    r.labels = ["circle", "square"]
    return r


def evaluation(patch_id: str) -> Evaluation:
    with tempfile.TemporaryDirectory() as tmp:
        base = make_checkpoint(Path(tmp) / "base.safetensors", "single-sd1", "F32", seed=0)
        model = evaluated_model(load_patch(HERE / "v1.erasepatch"), base)
    return evaluation_from_report(
        report(),
        patch_id=patch_id,
        config=EvalConfig(n=2, steps=10, guidance=7.5),
        model=model,
        judge=JUDGE,
        prompts=PROMPTS,
        recorded_at=RECORDED_AT,
        erasekit_version=VERSION,
    )


def build(out: Path) -> Path:
    shutil.copyfile(HERE / "v1.erasepatch", out)
    record_evaluation(out, evaluation(load_patch(out).patch_id))
    return out


if __name__ == "__main__":
    out = HERE / "v1-evaluated.erasepatch"
    if out.exists() and "--overwrite" not in sys.argv:
        sys.exit(f"{out} exists; golden files are kept forever (pass --overwrite only for a new evaluation format)")
    build(out)
    print(out)
