"""Every script in bench/ starts: its imports of erasekit still resolve and it prints its help (two had gone stale
when erase_model moved to erasekit.erasing.erase_job). Running them is for people: they print figures, not verdicts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py")))
def test_a_bench_script_starts(script: str) -> None:
    r = subprocess.run(
        [sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True, timeout=120, cwd=BENCH.parent
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("usage: "), r.stdout[:200]


def test_the_recipe_tables_stacks_are_of_the_plain_single_patches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its stacked section stacks the single-concept patches, not the --keep ones the same run made under the
    same recipe, concept and seed; no two erases share a file."""
    import importlib.util
    from types import SimpleNamespace

    spec = importlib.util.spec_from_file_location("recipe_table", BENCH / "recipe_table.py")
    table = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(table)  # type: ignore[union-attr]
    made: dict[Path, dict] = {}

    def fake_erase(model, concepts, images, out, settings, after=()):  # noqa: ANN001, ANN202
        assert not Path(out).exists(), f"{out} written twice"
        Path(out).write_text("patch")
        made[Path(out)] = settings
        return SimpleNamespace(loop_seconds=1.0, empty_prompt_drift={"hidden": 0.01})

    judged: list[list[Path]] = []
    monkeypatch.setattr(table, "erase_model", fake_erase)
    monkeypatch.setattr(table.Runner, "held_drift", lambda self, concept, patch: {"hidden": 0.02})
    monkeypatch.setattr(
        table.Runner,
        "judge",
        lambda self, c, patches, erased, keep=None: (
            judged.append(patches)
            or {"fails": [], "others": {}, "attributes": {}, "paraphrases_after": None, "target_after": 0.0}
        ),
    )
    run = table.Runner(tmp_path, 1, tmp_path / "out.jsonl", tmp_path)
    for c in ("circle", "red"):
        run.single("anchored", c, 0)
        run.single("anchored", c, 0, keep=table.KEEP[c])
    run.stacked("anchored", ["circle", "red"], 0)
    run.sequential("anchored", ["circle", "red"], 0)
    stacked = judged[4]
    assert [made[p].get("keep") for p in stacked] == [None, None] and stacked == [judged[0][0], judged[2][0]]
    assert len(made) == 6, "four singles and two sequential erases, each its own file"
    assert run.done["single/anchored/circle/0"]["held_drift"] == {"hidden": 0.02}
    assert run.done["keep/anchored/red/0"]["empty_prompt_drift"] == {"hidden": 0.01}


def test_the_t5_real_size_bench_runs_at_tiny_size(tmp_path: Path) -> None:
    """Its tiny run builds a T5 file, patches it in place and reverts it bit for bit (exit 0 only then)."""
    r = subprocess.run(
        [sys.executable, str(BENCH / "t5_real_size.py"), "--quick", "--repeats", "1", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=BENCH.parent,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| bit-exact revert (sha256) | yes |" in r.stdout and "| T5-XXL |" in r.stdout
    assert not list(tmp_path.iterdir()), "the tiny file, its patch and its journal are removed"
