"""``erasekit eval --record``: an evaluation written into the patch's manifest, the patch id unchanged, the file
rewritten atomically or not at all, and shown by ``inspect``."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import snapshot
from typer.testing import CliRunner

from erasekit.checkpoints.inspect import inspect_path
from erasekit.cli import app
from erasekit.errors import ErasekitError, PatchFormatError, TargetNotWritableError
from erasekit.format.patchfile import Evaluation, load_patch, manifest_json
from erasekit.judging.evidence import evaluated_model, judge_info, record_evaluation, weights_sha256

GOLDEN_DIR = Path(__file__).parent / "golden"
GOLDEN = GOLDEN_DIR / "v1.erasepatch"
EVALUATED = GOLDEN_DIR / "v1-evaluated.erasepatch"
runner = CliRunner()

_spec = importlib.util.spec_from_file_location("make_golden_evaluated", GOLDEN_DIR / "make_golden_evaluated.py")
maker = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
_spec.loader.exec_module(maker)  # type: ignore[union-attr]


def split(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".incomplete")]


@pytest.fixture
def golden_copy(tmp_path: Path) -> Path:
    out = tmp_path / "g.erasepatch"
    out.write_bytes(GOLDEN.read_bytes())
    return out


@pytest.fixture(scope="module")
def golden_evaluation() -> Evaluation:
    return maker.evaluation(load_patch(GOLDEN).patch_id)


# -- the golden file --------------------------------------------------------------------------------------------------


def test_golden_evaluated_is_rebuilt_byte_for_byte(tmp_path: Path) -> None:
    """Same patch, same report, same injected time and version -> the golden file, byte for byte."""
    assert maker.build(tmp_path / "again.erasepatch").read_bytes() == EVALUATED.read_bytes()


def test_golden_evaluated_differs_from_v1_only_in_its_manifest_evaluations() -> None:
    (h_gold, d_gold), (h_ev, d_ev) = split(GOLDEN), split(EVALUATED)
    assert d_ev == d_gold, "the tensor data is the patch's, byte for byte"
    m_gold, m_ev = h_gold.pop("__metadata__"), h_ev.pop("__metadata__")
    assert h_ev == h_gold, "tensor entries and offsets as they were"
    assert {k for k in m_gold if m_gold[k] != m_ev[k]} == {"erasekit"} and set(m_ev) == set(m_gold)
    manifest = json.loads(m_ev["erasekit"])
    evaluations = manifest.pop("evaluations")
    assert json.dumps(manifest, sort_keys=True, separators=(",", ":")) == m_gold["erasekit"]
    assert len(evaluations) == 1 and evaluations[0]["patch_id"] == load_patch(GOLDEN).patch_id


def test_golden_evaluated_loads_forever() -> None:
    p = load_patch(EVALUATED)
    assert p.patch_id == load_patch(GOLDEN).patch_id and p.warnings == []
    (ev,) = p.manifest.evaluations
    assert isinstance(ev, Evaluation)
    assert (ev.version, ev.recorded_at, ev.erasekit_version, ev.concept, ev.attribute) == (
        1,
        "2026-11-24T12:00:00Z",
        "0.1.0.dev0",
        "circle",
        "shape",
    )
    assert (ev.judge.kind, ev.model.name, ev.model.match) == ("toyworld-cnn", "base.safetensors", "exact")
    assert (ev.strength, ev.seeds, ev.images_per_prompt, ev.steps, ev.guidance) == (1.0, [1000, 1001], 2, 10, 7.5)
    assert ev.prompts.count == 4 and ev.prompts.texts == maker.PROMPTS
    assert (ev.target.before, ev.target.after, ev.others["square"].after) == (1.0, 0.0, 0.75)
    assert ev.attributes_elsewhere["pattern"].after is None, "a NaN rate (no image had that truth) is null"
    assert ev.robustness is not None and (ev.robustness.after, ev.robustness.wordings.count) == (0.25, 2)
    assert (
        p.manifest.model_dump(mode="json")["evaluations"][0]
        == json.loads(split(EVALUATED)[0]["__metadata__"]["erasekit"])["evaluations"][0]
    )


def test_a_manifest_without_evaluations_has_no_evaluations_key() -> None:
    p = load_patch(GOLDEN)
    assert p.manifest.evaluations == [] and '"evaluations"' not in manifest_json(p.manifest)


# -- recording --------------------------------------------------------------------------------------------------------


def test_record_keeps_the_patch_id_and_the_data(golden_copy: Path, golden_evaluation: Evaluation) -> None:
    before = load_patch(golden_copy)
    mode = 0o640
    os.chmod(golden_copy, mode)
    rec = record_evaluation(golden_copy, golden_evaluation)
    after = load_patch(golden_copy)
    assert rec.patch_id == before.patch_id == after.patch_id
    assert (rec.evaluations, rec.replaced, rec.path) == (1, False, str(golden_copy))
    assert split(golden_copy)[1] == split(GOLDEN)[1]
    assert after.manifest.evaluations == [golden_evaluation]
    assert golden_copy.stat().st_mode & 0o777 == mode and leftovers(golden_copy.parent) == []


def test_the_same_measurement_replaces_another_is_appended(golden_copy: Path, golden_evaluation: Evaluation) -> None:
    record_evaluation(golden_copy, golden_evaluation)
    later = golden_evaluation.model_copy(update={"recorded_at": "2026-12-01T00:00:00Z", "erasekit_version": "9.9"})
    rec = record_evaluation(golden_copy, later)
    assert (rec.evaluations, rec.replaced) == (1, True)
    assert load_patch(golden_copy).manifest.evaluations == [later]
    half = golden_evaluation.model_copy(update={"strength": 0.5})
    rec = record_evaluation(golden_copy, half)
    assert (rec.evaluations, rec.replaced) == (2, False)
    assert load_patch(golden_copy).manifest.evaluations == [later, half], "oldest first"
    rec = record_evaluation(golden_copy, later.model_copy(update={"recorded_at": "2026-12-02T00:00:00Z"}))
    assert rec.replaced and [e.strength for e in load_patch(golden_copy).manifest.evaluations] == [0.5, 1.0], (
        "a replaced record moves to the end: newest last"
    )


def test_record_through_a_link_rewrites_the_file_it_names(golden_copy: Path, golden_evaluation: Evaluation) -> None:
    link = golden_copy.parent / "link.erasepatch"
    link.symlink_to(golden_copy.name)
    record_evaluation(link, golden_evaluation)
    assert link.is_symlink() and load_patch(golden_copy).manifest.evaluations == [golden_evaluation]


def _other_patch(e: Evaluation) -> Evaluation:
    return e.model_copy(update={"patch_id": "0" * 64})


def _bad_rate(e: Evaluation) -> Evaluation:  # bypasses validation, as a caller's own object could
    return Evaluation.model_construct(**dict(e, target=e.target.model_construct(before=1.5, after=0.0)))


@pytest.mark.parametrize(
    ("case", "error", "message"),
    [
        ("other patch", ErasekitError, "measured on patch 0000000000000000"),
        ("read-only", TargetNotWritableError, "is read-only"),
        ("corrupt", PatchFormatError, "does not match its recorded hash"),
        ("invalid record", PatchFormatError, "invalid manifest field evaluations.0.target.before"),
        ("changed meanwhile", ErasekitError, "changed while the evaluation was being recorded"),
        ("disk full", TargetNotWritableError, "No space left on device"),
    ],
)
def test_a_failed_record_leaves_the_file_byte_identical(
    golden_copy: Path,
    golden_evaluation: Evaluation,
    monkeypatch: pytest.MonkeyPatch,
    case: str,
    error: type,
    message: str,
) -> None:
    evaluation = golden_evaluation
    if case == "other patch":
        evaluation = _other_patch(evaluation)
    elif case == "read-only":
        os.chmod(golden_copy, 0o444)
    elif case == "corrupt":
        raw = bytearray(golden_copy.read_bytes())
        raw[-3] ^= 1
        golden_copy.write_bytes(bytes(raw))
    elif case == "invalid record":
        evaluation = _bad_rate(evaluation)
    elif case == "changed meanwhile":  # another program rewrites the patch while its data is being copied
        import erasekit.judging.evidence as evidence

        calls = []
        real = evidence._identity

        def identity(path: Path) -> tuple[int, int, int]:
            calls.append(path)
            st = real(path)
            return st if len(calls) == 1 else (st[0], st[1], st[2] + 1)

        monkeypatch.setattr(evidence, "_identity", identity)
    elif case == "disk full":

        def fsync(fd: int) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "fsync", fsync)
    original = golden_copy.read_bytes()
    with pytest.raises(error, match=message):
        record_evaluation(golden_copy, evaluation)
    assert golden_copy.read_bytes() == original and leftovers(golden_copy.parent) == []


def test_apply_and_revert_work_on_a_recorded_patch(
    tmp_path: Path, sd1: tuple[Path, Path], sd1_patch: Path, golden_evaluation: Evaluation
) -> None:
    from erasekit.checkpoints.apply import apply_to_checkpoint, revert_from_checkpoint

    base, _ = sd1
    pristine = snapshot(base)
    patch_id = load_patch(sd1_patch).patch_id
    model = evaluated_model(load_patch(sd1_patch), base)
    assert model.match == "exact" and model.name == "base.safetensors"
    record_evaluation(sd1_patch, golden_evaluation.model_copy(update={"patch_id": patch_id, "model": model}))
    assert load_patch(sd1_patch).patch_id == patch_id
    report = apply_to_checkpoint([sd1_patch], base, in_place=True)
    assert [a.patch_id for a in report.applied] == [patch_id]
    assert evaluated_model(load_patch(sd1_patch), base).match == "differs", "the patched model is not the base"
    revert_from_checkpoint(sd1_patch, base)
    assert snapshot(base) == pristine


# -- what is recorded -------------------------------------------------------------------------------------------------


def test_judges_are_recorded_by_their_weights(tmp_path: Path) -> None:
    from erasekit.toyworld import builtin_judge_path

    toy = judge_info(None)
    assert (toy.kind, toy.name) == ("toyworld-cnn", "judge.safetensors") and judge_info("toyworld") == toy
    assert toy.sha256 == hashlib.sha256(builtin_judge_path().read_bytes()).hexdigest()
    clip = tmp_path / "clip-vit-base"
    (clip / "sub").mkdir(parents=True)
    (clip / "model.safetensors").write_bytes(b"weights")
    (clip / "sub" / "extra.safetensors").write_bytes(b"more")
    (clip / "pytorch_model.bin").write_bytes(b"the same weights, in a pickle")  # not counted beside safetensors
    h = lambda b: hashlib.sha256(b).hexdigest()  # noqa: E731
    expected = h(f"model.safetensors {h(b'weights')}\nsub/extra.safetensors {h(b'more')}\n".encode())
    info = judge_info(clip)
    assert (
        (info.kind, info.name, info.sha256)
        == ("clip", "clip-vit-base", expected)
        == ("clip", "clip-vit-base", weights_sha256(clip))
    )


def test_several_patches_are_refused_before_anything_is_rendered(tmp_path: Path, sd1_patch: Path) -> None:
    from erasekit.judging.evidence import evaluate_and_record

    other = tmp_path / "other.erasepatch"
    other.write_bytes(GOLDEN.read_bytes())
    before = {p: p.read_bytes() for p in (sd1_patch, other)}
    with pytest.raises(ErasekitError, match="2 patches applied together cannot be recorded") as e:
        evaluate_and_record("circle", [sd1_patch, other])
    assert e.value.option == "record"
    r = runner.invoke(app, ["eval", "-p", str(sd1_patch), "-p", str(other), "-c", "circle", "--record"])
    assert r.exit_code == 1 and r.stderr.startswith("error: an evaluation of 2 patches") and "(--record)" in r.stderr
    assert {p: p.read_bytes() for p in before} == before


def test_a_read_only_patch_is_refused_before_anything_is_rendered(golden_copy: Path) -> None:
    os.chmod(golden_copy, 0o444)
    r = runner.invoke(app, ["eval", "-p", str(golden_copy), "-c", "circle", "--record", "-n", "1"])
    assert r.exit_code == TargetNotWritableError.exit_code and "is read-only" in r.stderr, r.output
    assert golden_copy.read_bytes() == GOLDEN.read_bytes()


def test_eval_record_through_the_cli_json_then_replace(
    tmp_path: Path, golden_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI's --record path without rendering: the evaluation is the golden file's fixed report."""
    from erasekit.testing import make_checkpoint

    base = make_checkpoint(tmp_path / "base.safetensors", "single-sd1", "F32", seed=0)  # what v1 was made for
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(maker.PROMPTS) + "\n")
    seen = {}

    def fake(concept, patches, **kw):  # type: ignore[no-untyped-def]
        seen.update(concept=concept, patches=patches, **kw)
        report = maker.report()
        report.robustness = None  # what --json prints must be a dataclass, and the golden report's is a namespace
        report.steps, report.guidance = kw["config"].steps, 7.5  # as evaluate_model resolves an SD model's default
        return report

    monkeypatch.setattr("erasekit.judging.evaluate.evaluate_model", fake)
    args = [
        "eval",
        "-p",
        str(golden_copy),
        "-c",
        "circle",
        "-m",
        str(base),
        "--prompts",
        str(prompts),
        "-n",
        "2",
        "--steps",
        "10",
        "--record",
    ]
    r = runner.invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    patch_id = load_patch(GOLDEN).patch_id
    assert out["recorded"] == {"path": str(golden_copy), "patch_id": patch_id, "evaluations": 1, "replaced": False}
    assert out["target"] == {"concept": "circle", "before": 1.0, "after": 0.0}
    assert seen["patches"] == [golden_copy] and seen["model"] == str(base) and seen["config"].steps == 10
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert (
        f"recorded in {golden_copy} (replacing the earlier record of the same settings; 1 recorded; patch id "
        f"{patch_id[:16]} unchanged)"
    ) in r.stdout
    (ev,) = load_patch(golden_copy).manifest.evaluations
    assert isinstance(ev, Evaluation) and ev.prompts.texts == maker.PROMPTS and ev.steps == 10
    assert (ev.model.name, ev.model.match) == ("base.safetensors", "exact") and ev.judge == judge_info(None)
    assert split(golden_copy)[1] == split(GOLDEN)[1]


# -- inspect ----------------------------------------------------------------------------------------------------------


def test_inspect_shows_recorded_evaluations() -> None:
    r = runner.invoke(app, ["inspect", str(EVALUATED)])
    assert r.exit_code == 0, r.output
    assert "evaluations recorded (1, oldest first)" in r.stdout
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("2026-11-24 12:00"))
    assert line.split() == [
        "2026-11-24",
        "12:00",
        "toy",
        "world",
        "base.safetensors",
        "(exact)",
        "2",
        "1",
        "circle",
        "100%",
        "->",
        "0%",
        "square",
        "100%",
        "->",
        "75%",
        "100%",
        "->",
        "25%",
    ]
    info = json.loads(runner.invoke(app, ["inspect", str(EVALUATED), "--json"]).stdout)
    (ev,) = info["evaluations"]
    assert (ev["largest_drop"], ev["drop_after"], ev["paraphrase_after"], ev["current"]) == ("square", 0.75, 0.25, True)
    assert ev["record"] == json.loads(split(EVALUATED)[0]["__metadata__"]["erasekit"])["evaluations"][0]
    assert "evaluations recorded" not in runner.invoke(app, ["inspect", str(GOLDEN)]).stdout


def test_inspect_marks_a_record_of_other_tensors(tmp_path: Path, sd1_patch: Path) -> None:
    """A record carried into a patch with other tensors (by hand, or a tool that copies manifests) is flagged."""
    header, data = split(sd1_patch)
    m = json.loads(header["__metadata__"]["erasekit"])
    m["evaluations"] = json.loads(split(EVALUATED)[0]["__metadata__"]["erasekit"])["evaluations"]
    header["__metadata__"]["erasekit"] = json.dumps(m)
    h = json.dumps(header).encode()
    sd1_patch.write_bytes(struct.pack("<Q", len(h)) + h + data)
    assert inspect_path(sd1_patch).evaluations[0].current is False  # type: ignore[union-attr]
    r = runner.invoke(app, ["inspect", str(sd1_patch)])
    assert "base.safetensors (exact) *" in r.stdout and "measured on other tensors" in r.stdout


def test_inspect_of_a_recorded_patch_does_not_import_torch() -> None:
    code = (
        "import sys\nsys.argv = ['erasekit', 'inspect', sys.argv[1]]\nfrom erasekit.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(EVALUATED)], capture_output=True, text=True, timeout=120)
    assert "evaluations recorded" in r.stdout and r.stdout.strip().endswith("NO-TORCH"), r.stderr


# -- end to end on the built-in model ----------------------------------------------------------------------------------


def test_erase_eval_record_inspect_on_the_builtin_model(tmp_path: Path) -> None:
    patch = tmp_path / "circle.erasepatch"
    r = runner.invoke(app, ["erase", "--concept", "circle", "--steps", "3", "-o", str(patch)])
    assert r.exit_code == 0, r.output
    patch_id = load_patch(patch).patch_id
    data = split(patch)[1]
    r = runner.invoke(app, ["eval", "-p", str(patch), "-c", "circle", "-n", "1", "--steps", "2", "--record"])
    assert r.exit_code == 0, r.output
    assert f"recorded in {patch} (added; 1 recorded; patch id {patch_id[:16]} unchanged)" in r.stdout
    loaded = load_patch(patch)
    assert loaded.patch_id == patch_id and split(patch)[1] == data
    (ev,) = loaded.manifest.evaluations
    assert isinstance(ev, Evaluation) and ev.patch_id == patch_id
    assert (ev.judge.kind, ev.model.name, ev.model.match) == ("toyworld-cnn", "built-in toy world", "exact")
    assert (ev.images_per_prompt, ev.steps, ev.seeds, ev.strength) == (1, 2, [1000], 1.0)
    assert ev.prompts.texts is not None and len(ev.prompts.texts) == ev.prompts.count == 5
    assert set(ev.others) == {"cross", "square", "star", "triangle"} and set(ev.attributes) == {"colour", "pattern"}
    from dataclasses import fields

    from erasekit.judging.evaluate import EvalReport

    if "robustness" in {f.name for f in fields(EvalReport)}:  # eval measures paraphrases on the built-in model
        assert ev.robustness is not None and ev.robustness.wordings.count >= 1
    r = runner.invoke(app, ["inspect", str(patch)])
    assert r.exit_code == 0 and "evaluations recorded (1, oldest first)" in r.stdout
    assert "toy world  built-in toy world (exact)" in r.stdout
    info = json.loads(runner.invoke(app, ["inspect", str(patch), "--json"]).stdout)
    assert info["patch_id"] == patch_id and info["evaluations"][0]["record"]["concept"] == "circle"
