"""Every script in bench/ starts: its imports of erasekit still resolve and it prints its help (two had gone stale
when erase_model moved to erasekit.erasing.erase_job). Running them is for people: they print figures, not verdicts."""

from __future__ import annotations

import os
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


def test_the_gpu_suites_flux_table_shows_each_erase_and_the_oom(monkeypatch: pytest.MonkeyPatch) -> None:
    """The FLUX/SD3 table: step time and peak memory of each erase, the weights already resident, the image's
    sampling, the bytes the 24 GB configuration moves a step, and an erase that ran out of memory as OOM in each of
    its rows."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_suite", BENCH / "gpu_suite.py")
    suite = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    monkeypatch.setitem(sys.modules, "gpu_suite", suite)  # its dataclasses look their module up
    spec.loader.exec_module(suite)  # type: ignore[union-attr]
    erase = {
        "loop_s": 5.0,
        "peak": 61_200_000_000,
        "resident": 43_500_000_000,
        "timings": {"encode": 1.5, "loop": 5.0},
        "total_s": 9.0,
        "trained": 16_515_072,
        "adam_bytes": 132_120_576,
        "patch_bytes": 34_000_000,
        "ranks": (16, 16, 94),
        "save_s": 0.2,
    }
    results = {
        "flux": {
            "build": {"seconds": 20.0, "unet": "11901M", "encoders": "123M + 4762M", "vae": "84M"},
            "to bfloat16": {"dtype": "bfloat16"},
            "erase auto": erase,
            "erase streamed": erase
            | {"loop_s": 25.0, "peak": 16_400_000_000, "resident": 11_000_000_000, "streamed_bytes": 476_000_000_000},
            "erase clips": erase | {"loop_s": 3.0, "peak": 50_000_000_000},
            "generate auto": {"seconds": 4.0, "peak": 45_000_000_000, "resident": 43.5e9, "settings": "28 steps"},
            "erase checkpointing": "not run (past the 270 s budget)",
            "erase dense": "OOM",
        }
    }
    table = suite.flow_table(results, suite.PAPER)
    assert table.startswith("| figure | FLUX.1-dev size |\n")
    assert "| parameters: transformer / text encoders / VAE | 11901M / 123M + 4762M / 84M |" in table
    assert "| defaults (T5 trains rank-16 factors) | 5.00 s (0.500 s/step) |" in table
    assert "| defaults (T5 trains rank-16 factors) | 61.20 GB |" in table
    assert "| resident before the runs (transformer, VAE and encoders in compute dtype) | 43.50 GB |" in table
    assert "| erase (defaults) / generate | 1.36x |" in table
    assert "| generate 1 image, the family's default sampling | 45.00 GB (4.00 s; 28 steps) |" in table
    assert "| defaults (T5 factors, CLIP factors) | 34,000,000 B (34.0 MB; rank 16-16 over 94 weights) |" in table
    dense = [line for line in table.splitlines() if line.startswith("| train dense, rank dense")]
    assert len(dense) == 3 and all(line.endswith("| OOM |") for line in dense)
    assert "| defaults + checkpointing | not run (past the 270 s budget) |" in table
    streamed = "| defaults, --offload blocks, encoders bf16 (the 24 GB configuration) |"
    assert f"{streamed} 25.00 s (2.500 s/step) |" in table and f"{streamed} 16.40 GB |" in table
    assert "| moved to the device a step (--offload blocks: the blocks, twice) | 47.60 GB |" in table
    assert "| resident before the 24 GB configuration's erase (blocks in CPU memory) | 11.00 GB |" in table


@pytest.mark.skipif(
    not os.environ.get("ERASEKIT_SLOW_TESTS"),
    reason="two tiny erases per model (about 2 minutes); ERASEKIT_SLOW_TESTS=1",
)
def test_the_gpu_suite_runs_its_flux_and_sd3_rows_at_tiny_size() -> None:
    """--quick --only flux,sd3: every cell of both models runs (the tiny pipelines on the CPU) and the table has
    a column per model."""
    r = subprocess.run(
        [sys.executable, str(BENCH / "gpu_suite.py"), "--quick", "--only", "flux,sd3"],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=BENCH.parent,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| figure | FLUX.1-dev size | SD3.5-large size |" in r.stdout
    lines = r.stdout.splitlines()
    steps = [line for line in lines if line.startswith("| defaults (T5 trains rank-16 factors) |")][0]
    assert steps.count("s/step") == 2, steps
    patch = [line for line in lines if line.startswith("| defaults (T5 factors, CLIP factors) |")][0]
    assert patch.count("rank 16-16") == 2, patch
    assert "| error: " not in r.stdout and "| OOM |" not in r.stdout
