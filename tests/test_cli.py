"""The CLI as a translation layer: arguments in, one library call, rendered result or one-line error out."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import snapshot
from typer.testing import CliRunner

from erasekit.cli import app
from erasekit.testing import make_checkpoint

GOLDEN = Path(__file__).parent / "golden" / "v1.erasepatch"
runner = CliRunner()


def run(*args: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return runner.invoke(app, [str(a) for a in args], env=env)


def no_torch(*argv: str) -> subprocess.CompletedProcess[str]:
    code = (
        "import sys\nsys.argv = ['erasekit', *sys.argv[1:]]\nfrom erasekit.cli import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n"
    )
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)


def test_help_does_not_import_torch() -> None:
    r = no_torch("--help")
    assert "inspect" in r.stdout and "apply" in r.stdout and "diff" in r.stdout
    assert r.stdout.strip().endswith("NO-TORCH")


def test_the_python_api_is_top_level_and_lazy() -> None:
    code = (
        "import sys, erasekit\n"
        "from erasekit.erasing import unlearn\nfrom erasekit.format import erase_config\nfrom erasekit.judging import sampling, evaluate\n"
        "assert erasekit.erase is unlearn.erase and erasekit.generate is sampling.generate\n"
        "assert erasekit.EraseConfig is erase_config.EraseConfig and erasekit.evaluate_model is evaluate.evaluate_model\n"
        "assert all(getattr(erasekit, n) is not None for n in erasekit.__all__)\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "NO-TORCH", r.stderr


def test_inspect_patch_does_not_import_torch() -> None:
    r = no_torch("inspect", str(GOLDEN))
    assert "golden v1" in r.stdout and r.stdout.strip().endswith("NO-TORCH"), r.stderr


def test_inspect_safetensors_checkpoint_does_not_import_torch(tmp_path: Path) -> None:
    p = make_checkpoint(tmp_path / "b.safetensors", "single-sdxl", "F16")
    r = no_torch("inspect", str(p))
    assert "single-file-sdxl" in r.stdout and r.stdout.strip().endswith("NO-TORCH"), r.stderr


def test_version() -> None:
    from erasekit import __version__

    assert run("--version").stdout.strip() == f"erasekit {__version__}"


def test_apply_passes_options_to_the_library(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen = {}

    def fake(patches, target, **kw):  # type: ignore[no-untyped-def]
        seen.update(patches=patches, target=target, **kw)
        from erasekit.checkpoints.apply import ApplyReport

        return ApplyReport(str(target), "x", "sd1", str(kw["output"]), False, [], 0, 0.0)

    monkeypatch.setattr("erasekit.checkpoints.apply.apply_to_checkpoint", fake)
    r = run(
        "apply",
        "a.erasepatch",
        "b.erasepatch",
        "--to",
        "m.safetensors",
        "-o",
        "o.safetensors",
        "--strength",
        "0.5",
        "--strength",
        "0.25",
        "--force",
    )
    assert r.exit_code == 0, r.output
    assert seen == {
        "patches": [Path("a.erasepatch"), Path("b.erasepatch")],
        "target": Path("m.safetensors"),
        "output": Path("o.safetensors"),
        "in_place": False,
        "strength": [0.5, 0.25],
        "force": True,
    }


def test_revert_passes_options(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def fake(patch, target, force):  # type: ignore[no-untyped-def]
        seen.update(patch=patch, target=target, force=force)
        from erasekit.checkpoints.apply import RevertReport

        return RevertReport(str(target), "x", "t", "id", 4, True, 0.0)

    monkeypatch.setattr("erasekit.checkpoints.apply.revert_from_checkpoint", fake)
    assert run("apply", "--revert", "a.erasepatch", "--to", "m").exit_code == 0
    assert seen == {"patch": Path("a.erasepatch"), "target": Path("m"), "force": False}


def test_full_cycle_with_json(tmp_path: Path) -> None:
    base = make_checkpoint(tmp_path / "base.safetensors", "single-sd1", "BF16")
    edited = make_checkpoint(tmp_path / "edited.safetensors", "single-sd1", "BF16", edit_layers=[0, 1])
    patch = tmp_path / "e.erasepatch"
    original = snapshot(base)
    r = run("diff", base, edited, "-o", patch, "--rank", "4", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["kind"] == "checkpoints" and d["output"] == str(patch) and len(d["changes"]) == 4
    stored = [c["stored_error"] for c in d["changes"] if c["delta_norm"]]  # what rank 4 lost, per tensor
    assert stored and all(0 <= e < 1 for e in stored)
    r = run("inspect", patch, "--against", base, "--json")
    info = json.loads(r.stdout)
    assert info["compatibility"] == "exact" and {row["storage"] for row in info["rows"]} == {"rank 4"}
    assert sorted(row["error"] for row in info["rows"]) == pytest.approx(sorted(stored), abs=1e-6)
    assert all(row["kept"] == pytest.approx(1 - row["error"] ** 2, abs=1e-5) for row in info["rows"])
    r = run("apply", patch, "--to", base, "--in-place", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["applied"][0]["fingerprint"] == "exact"
    r = run("inspect", base, "--json")
    assert [a["title"] for a in json.loads(r.stdout)["applied"]] == ["edited minus base"]
    r = run("inspect", base)
    assert "edited minus base" in r.stdout and "single-file-sd1" in r.stdout
    r = run("apply", "--revert", patch, "--to", base)
    assert r.exit_code == 0 and "sha256 verified" in r.stdout
    assert snapshot(base) == original
    r = run("diff", patch, patch, "--json")
    assert all(abs(c["cosine"] - 1) < 1e-6 for c in json.loads(r.stdout)["comparisons"])


def test_human_tables_show_which_layers_changed(tmp_path: Path) -> None:
    r = run("inspect", GOLDEN)
    assert r.exit_code == 0
    assert "changed    te: layers 0-1 of 0-1" in r.stdout
    assert "rank 2" in r.stdout and "dense" in r.stdout and "█" in r.stdout


@pytest.fixture
def world(tmp_path: Path) -> dict[str, Path]:
    base = make_checkpoint(tmp_path / "base.safetensors", "single-sd1", "F16")
    edited = make_checkpoint(tmp_path / "edited.safetensors", "single-sd1", "F16", edit_layers=[1])
    patch = tmp_path / "p.erasepatch"
    assert run("diff", base, edited, "-o", patch).exit_code == 0
    corrupt = tmp_path / "corrupt.erasepatch"
    corrupt.write_bytes(patch.read_bytes()[:-7])
    xl = make_checkpoint(tmp_path / "xl.safetensors", "single-sdxl", "F16")
    other = make_checkpoint(tmp_path / "other.safetensors", "single-sd1", "F16", seed=9)
    ckpt = make_checkpoint(tmp_path / "old.ckpt", "ckpt-sd1", "F16")
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    return {
        "base": base,
        "patch": patch,
        "corrupt": corrupt,
        "xl": xl,
        "other": other,
        "ckpt": ckpt,
        "notes": notes,
        "dir": tmp_path,
    }


BAD = [
    (["inspect", "{dir}/missing.erasepatch"], 2, "does not exist; check the path"),
    (["inspect", "{corrupt}"], 3, "truncated"),
    (["inspect", "{notes}"], 4, "not a .safetensors or .ckpt file"),
    (["apply", "{corrupt}", "--to", "{base}", "--in-place"], 3, "truncated"),
    (["apply", "{patch}", "--to", "{dir}/missing.safetensors", "--in-place"], 2, "does not exist"),
    (["apply", "{patch}", "--to", "{xl}", "--in-place"], 5, "is for sd1, but .* is sdxl"),
    (
        ["apply", "{patch}", "--to", "{other}", "--in-place"],
        5,
        r"4 of 4 tensors .* differ .*force it to apply anyway \(--force\)$",
    ),
    (["apply", "{patch}", "--to", "{ckpt}", "--in-place"], 7, r"cannot be patched in place.*OUT.safetensors \(-o\)$"),
    (["apply", "{patch}", "--to", "{base}"], 1, "pass either -o OUT or --in-place"),
    (["apply", "{patch}", "--to", "{base}", "-o", "{other}"], 7, "already exists"),
    (["apply", "--revert", "{patch}", "--to", "{base}"], 6, "no erasekit patch is applied"),
    (["apply", "--revert", "{patch}", "{patch}", "--to", "{base}"], 1, "exactly one patch"),
    (["apply", "{patch}", "--to", "{base}", "--in-place", "--strength", "1e30"], 8, "non-finite"),
    (["diff", "{base}", "{patch}"], 1, "cannot diff a patch with a checkpoint"),
    (["diff", "{base}", "{xl}"], 5, "is sd1 but .* is sdxl"),
    (["diff", "{base}", "{base}", "-o", "{dir}/same.erasepatch"], 1, "identical FFN weights"),
    (["inspect", "{base}", "--against", "{other}"], 1, "is not a patch"),
]


@pytest.mark.parametrize(("args", "code", "message"), BAD, ids=[" ".join(a[:2]) + f"-{c}" for a, c, _ in BAD])
def test_bad_input_one_line_error_nothing_changed(
    world: dict[str, Path], args: list[str], code: int, message: str
) -> None:
    before = snapshot(world["dir"])
    r = run(*[a.format(**world) for a in args])
    assert r.exit_code == code, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert re.search(message, lines[0]), lines[0]
    assert "Traceback" not in r.output
    assert snapshot(world["dir"]) == before, "a refused command must leave every file as it was"


def test_debug_env_shows_the_traceback(world: dict[str, Path]) -> None:
    r = run("inspect", world["corrupt"], env={"ERASEKIT_DEBUG": "1"})
    assert r.exit_code != 0 and type(r.exception).__name__ == "PatchFormatError"


def test_python_dash_m() -> None:
    r = subprocess.run([sys.executable, "-m", "erasekit", "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("erasekit ")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from erasekit.testing import make_tiny_pipeline

    return make_tiny_pipeline(tmp_path_factory.mktemp("cli") / "tiny")


def test_erase_and_generate_commands(tmp_path: Path, tiny_model: Path) -> None:
    model = tiny_model
    patch = tmp_path / "c.erasepatch"
    r = run(
        "erase",
        "--model",
        model,
        "--concept",
        "circle",
        "--images",
        "auto",
        "--num-images",
        "2",
        "--resolution",
        "32",
        "--steps",
        "2",
        "--layers",
        "1",
        "-o",
        patch,
        "--json",
    )
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["steps"] == 2 and summary["output"] == str(patch)
    assert {m for m, _ in summary["top_layers"]} == {
        "lora_te_text_model_encoder_layers_1_mlp_fc1",
        "lora_te_text_model_encoder_layers_1_mlp_fc2",
    }
    assert set(json.loads(run("inspect", patch, "--json").stdout)["method"]["hyperparameters"]["layers"]) == {1}
    r = run(
        "generate",
        "-m",
        model,
        "a circle",
        "-n",
        "1",
        "--steps",
        "2",
        "--patch",
        patch,
        "--compare",
        "-o",
        tmp_path / "out",
    )
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "a-circle_0_after.png",
        "a-circle_0_before.png",
        "grid.png",
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layers", "x-y"], "layers 'x-y' is not a list of layers; write it like 0-11 or 3,5,8-11 (--layers)"),
        (["--layers", "7"], "layer 7 is outside the text encoder's layers 0-1; use layers 0-1 (--layers)"),
        (["--kind", "song"], "invalid kind: Input should be 'object' or 'style' (--kind)"),
        (["--template", "no slot"], "invalid templates: "),
        (["--recipe", "magic"], "invalid recipe: Input should be 'paper', 'anchored' or 'doco' (--recipe)"),
        (["--stand-in", "circle"], "stand-in 'circle' is not CONCEPT=WORD; write it as circle=square (--stand-in)"),
        (
            ["--concept-template", "a {} pattern"],
            "concept template 'a {} pattern' is not CONCEPT=TEMPLATE; write it as "
            "'Van Gogh=a painting in the style of {}' (--concept-template)",
        ),
        (["--concept-template", "circle=a circle"], "invalid concept_templates: "),
        (
            ["--concept-template", "cirle=a {} shape"],
            "templates are given for 'cirle', which this erase neither erases "
            "nor keeps; name it as a --concept or --keep, or check its spelling "
            "(--concept-template)",
        ),
        (
            ["--keep", "Circle"],
            "'Circle' is both erased (--concept) and kept (--keep); name it in one of the two (--keep)",
        ),
        (["--rank", "0"], "invalid rank: Value error, rank must be at least 1, auto or dense, got 0 (--rank)"),
        (["--rank", "low"], "invalid rank: "),
    ],
)
def test_erase_option_errors(tmp_path: Path, tiny_model: Path, args: list[str], message: str) -> None:
    model = tiny_model
    r = run(
        "erase",
        "--model",
        model,
        "--concept",
        "circle",
        "--images",
        "auto",
        "--resolution",
        "32",
        "-o",
        tmp_path / "x.erasepatch",
        *args,
    )
    assert r.exit_code != 0 and r.stderr.startswith("error: ") and message in r.stderr, r.stderr
    assert not (tmp_path / "x.erasepatch").exists()


def test_erase_with_stand_in_and_rank(tmp_path: Path, tiny_model: Path) -> None:
    patch = tmp_path / "c.erasepatch"
    r = run(
        "erase",
        "--model",
        tiny_model,
        "--concept",
        "circle",
        "--images",
        "auto",
        "--num-images",
        "2",
        "--resolution",
        "32",
        "--steps",
        "2",
        "--recipe",
        "anchored",
        "--stand-in",
        "circle=square, star",
        "--rank",
        "2",
        "-o",
        patch,
    )
    assert r.exit_code == 0, r.output
    assert re.search(
        r"stored low-rank \(ranks 2-2\): the text encoders' outputs within \d+\.\d% \(hidden states\) of the trained "
        r"change's, \d+\.\d% of its squared norm kept",
        r.stdout,
    ), r.stdout
    hp = json.loads(run("inspect", patch, "--json").stdout)["method"]["hyperparameters"]
    assert hp["stand_ins"] == {"circle": ["square", "star"]} and hp["rank"] == 2
    assert "concept_templates" not in hp  # none given, none recorded
    table = run("inspect", patch).stdout  # what the rank-2 factors lost, per tensor
    assert re.search(r"storage\s+dtype\s+\|ΔW\|\s+\|Δb\|\s+off\s+kept", table), table
    assert re.search(r"rank 2\s+BF16\s+\S+\s+\S+\s+\d+\.\d%\s+\d+\.\d%", table), table


def test_erase_with_templates_for_one_concept(tmp_path: Path, tiny_model: Path) -> None:
    """--concept-template: that concept's own list (several, in order), recorded; the other concept keeps --template."""
    patch = tmp_path / "cs.erasepatch"
    r = run(
        "erase",
        "--model",
        tiny_model,
        "--concept",
        "circle",
        "--concept",
        "striped",
        "--images",
        "auto",
        "--num-images",
        "1",
        "--resolution",
        "32",
        "--steps",
        "1",
        "--template",
        "a photo of a {}",
        "--concept-template",
        "striped=a {} pattern",
        "--concept-template",
        "Striped={} pattern",
        "-o",
        patch,
    )
    assert r.exit_code == 0, r.output
    hp = json.loads(run("inspect", patch, "--json").stdout)["method"]["hyperparameters"]
    assert hp["templates"] == ["a photo of a {}"]
    assert hp["concept_templates"] == {"striped": ["a {} pattern", "{} pattern"]}  # one concept, any case


def test_erase_with_a_missing_model_says_so(tmp_path: Path) -> None:
    r = run("erase", "--model", tmp_path / "nope", "--concept", "circle", "-o", tmp_path / "x.erasepatch")
    assert (
        r.exit_code == 2
        and r.stderr.strip()
        == f"error: {tmp_path / 'nope'} does not exist; check the path "
        "(or name a model id: ORG/NAME[@REVISION], or a built-in model: toy-sd, toy-sdxl, toy-flux)"
    )
    assert list(tmp_path.iterdir()) == []


def test_erase_needs_images_for_other_models(tmp_path: Path, tiny_model: Path) -> None:
    r = run("erase", "--model", tiny_model, "--concept", "circle", "-o", tmp_path / "x.erasepatch")
    assert (
        r.exit_code == 1 and "needs images of the concept; give a folder of images per concept, or 'auto'" in r.stderr
    )
    assert r.stderr.strip().endswith("(--images)")


def test_json_output_is_strict_json_with_null_for_nan(capsys: pytest.CaptureFixture[str]) -> None:
    from dataclasses import dataclass

    from erasekit.cli._common import print_json

    @dataclass
    class Report:
        loss: float
        losses: list[float]
        nested: dict[str, object]

    print_json(Report(float("nan"), [1.0, float("inf")], {"ratio": float("-inf"), "ok": 0.5}))
    text = capsys.readouterr().out
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON")) == {
        "loss": None,
        "losses": [1.0, None],
        "nested": {"ratio": None, "ok": 0.5},
    }
