"""What a new user reads first: ``inspect``'s summary of a patch, ``erase``'s settings lines, and which files of an
image folder an erase used and which it skipped (issue 23, item 4)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from erasekit.cli import app
from erasekit.format.patchfile import load_patch

runner = CliRunner()


def _env(home: Path) -> dict[str, str]:
    """No run touches the real user's cache or config (the module's erase runs before conftest's isolation)."""
    return {"HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"), "XDG_CONFIG_HOME": str(home / ".config")}


@pytest.fixture(scope="module")
def erased(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One small erase on the built-in model (it recommends its own anchors and stand-ins): the patch and the
    erase's stdout."""
    root = tmp_path_factory.mktemp("first")
    out = root / "c.erasepatch"
    r = runner.invoke(app, ["erase", "-c", "circle", "--steps", "2", "--no-cache", "-o", str(out)], env=_env(root))
    assert r.exit_code == 0, r.output
    return out, r.stdout


def _lines_from(text: str, first: str) -> list[str]:
    """The line starting with ``first`` (after its indent) and its continuation lines (indented deeper)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(first))
    indent = len(lines[start]) - len(lines[start].lstrip())
    after = [j for j in range(start + 1, len(lines)) if len(lines[j]) - len(lines[j].lstrip()) <= indent]
    end = after[0] if after else len(lines)
    return lines[start:end]


def test_inspect_summarises_the_method_without_torch(erased: tuple[Path, str]) -> None:
    patch, _ = erased
    hp = load_patch(patch).manifest.method.hyperparameters
    code = (
        "import sys\nsys.argv = ['erasekit', *sys.argv[1:]]\nfrom erasekit.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\nprint('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n"
    )
    r = subprocess.run([sys.executable, "-c", code, "inspect", str(patch)], capture_output=True, text=True, timeout=120)
    text = r.stdout.removesuffix("NO-TORCH\n")
    assert r.stdout.endswith("NO-TORCH\n"), r.stdout[-200:] + r.stderr
    shown = len(text.replace(str(patch), ""))  # whatever the temporary folder's name
    assert shown < 1400, f"{shown} characters:\n{text}"  # the whole record: 3.7 KB
    changed, defaults = _lines_from(text, "settings"), _lines_from(text, "defaults")
    assert text.index(changed[0]) < text.index(defaults[0]), "the settings that differ from the defaults come first"
    assert all(len(line) < 110 for line in changed + defaults), changed + defaults
    changed_text, defaults_text = " ".join(changed), " ".join(defaults)
    assert f"anchor_prompts {len(hp['anchor_prompts'])} prompts" in changed_text
    assert f"stand_ins {len(hp['stand_ins'])} pairs" in changed_text
    assert "steps 2," in changed_text and "batch_size" in defaults_text and "batch_size" not in changed_text
    assert hp["anchor_prompts"][-1] not in text


def test_full_and_json_keep_the_whole_record(erased: tuple[Path, str]) -> None:
    patch, _ = erased
    hp = load_patch(patch).manifest.method.hyperparameters
    full = runner.invoke(app, ["inspect", str(patch), "--full"])
    assert full.exit_code == 0, full.output
    words = " ".join(full.stdout.split())  # the record as one paragraph, wrapped at the terminal's width
    assert all(repr(prompt) in words for prompt in hp["anchor_prompts"])
    record = json.loads(runner.invoke(app, ["inspect", str(patch), "--json"]).stdout)
    assert record["method"]["hyperparameters"] == hp
    assert record["settings"]["changed"]["anchor_prompts"] == hp["anchor_prompts"]
    assert record["settings"]["changed"]["steps"] == 2 and record["settings"]["default"]["batch_size"] == 2


def test_erase_groups_its_settings_in_short_lines(erased: tuple[Path, str]) -> None:
    _, stdout = erased
    hp = load_patch(erased[0]).manifest.method.hyperparameters
    start = next(i for i, line in enumerate(stdout.splitlines()) if line.strip().startswith("settings"))
    block = stdout.splitlines()[start:]
    block = block[: next(i for i, line in enumerate(block) if line.strip().startswith("other settings")) + 1]
    assert all(len(line) < 110 for line in block), block
    assert block[0] == "  settings you gave: steps 2", "what the user set comes first"
    assert block[1].startswith("  settings the model recommends: ")
    assert f"anchor_prompts {len(hp['anchor_prompts'])} prompts" in " ".join(block)
    assert block[-1] == "  other settings: defaults (erasekit erase --help)"


def test_image_folder_uses_what_pillow_reads_and_names_what_it_skipped(tmp_path: Path) -> None:
    from erasekit.toyworld.concepts import render_concept

    folder = tmp_path / "circles"
    (folder / "more").mkdir(parents=True)  # a subfolder: passed over
    for i in range(3):
        render_concept("circle", seed=i)[0].save(folder / f"c{i}.png")
    render_concept("circle", seed=3)[0].save(folder / "c3.tif")
    (folder / "notes.txt").write_text("where these came from\n")
    (folder / "._c0.png").write_bytes(b"\x00\x05\x16\x07 macOS metadata")  # hidden: passed over, not decoded
    r = runner.invoke(
        app,
        [
            "erase",
            "-c",
            "circle",
            "--images",
            str(folder),
            "--steps",
            "1",
            "--no-cache",
            "-o",
            str(tmp_path / "c.erasepatch"),
        ],
    )
    assert r.exit_code == 0, r.output
    assert " on 4 images" in r.stdout, "the three PNGs and the TIFF"
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {folder}: skipped notes.txt (not an image Pillow reads)"], r.stderr
    assert "._c0" not in r.stderr and "more" not in r.stderr
