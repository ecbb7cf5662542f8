"""A patch's memory is bounded by its file, not by the layer sizes its manifest claims: sizes no supported text
encoder has are refused in one line, and inspect and diff compute norms from low-rank factors, never their product."""

from __future__ import annotations

import json
import re
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from conftest import snapshot
from typer.testing import CliRunner

from erasekit.cli import app
from erasekit.format.patchfile import Patch, load_patch, save_patch, storage_dtypes
from erasekit.testing.fuzz import MEMORY_LIMIT, claimed_width

GOLDEN = Path(__file__).parent / "golden" / "v1.erasepatch"
runner = CliRunner()


def run_measured(*args: object) -> tuple[object, int]:
    """The command's result and its peak traced memory (a first run imports what the command needs, unmeasured)."""
    argv = [str(a) for a in args]
    runner.invoke(app, argv)
    tracemalloc.start()
    try:
        result = runner.invoke(app, argv)
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def claiming(path: Path, architecture: str, slot: str, hidden: int, intermediate: int) -> Path:
    """The golden patch's low-rank module (rank 2) with factors as wide as the claimed encoder."""
    path.write_bytes(claimed_width(GOLDEN.read_bytes(), architecture, slot, hidden, intermediate, 2))
    return path


@pytest.mark.parametrize(
    "command",
    [
        ["inspect", "{p}"],
        ["diff", "{p}", "{p}"],
        ["merge", "{p}", "{p}", "-o", "{out}"],
        ["export", "{p}", "--ui", "a1111", "-o", "{out}"],
    ],
    ids=lambda c: c[0],
)
def test_a_half_megabyte_patch_claiming_65536_wide_layers_is_refused_in_one_line(
    tmp_path: Path, command: list[str]
) -> None:
    patch = claiming(tmp_path / "wide.erasepatch", "sd1", "te", 65536, 65536)
    assert patch.stat().st_size < 700_000  # its product would be 65536 x 65536: 32 GiB in float64
    before = snapshot(tmp_path)
    out = tmp_path / ("merged.erasepatch" if command[0] == "merge" else "wide-a1111.safetensors")
    r, peak = run_measured(*[a.format(p=patch, out=out) for a in command])
    assert r.exit_code == 3, r.output  # as any other malformed patch
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(
        r"^error: .*wide\.erasepatch: encoder te claims hidden 65536, intermediate "
        r"65536, 2 layers, larger than any sd1 text encoder \(hidden 768, "
        r"intermediate 3072, 12 layers at most\); .*re-create it$",
        lines[0],
    ), r.stderr
    assert peak < MEMORY_LIMIT, f"{peak / 2**20:.0f} MiB"
    assert snapshot(tmp_path) == before and not out.exists()


def test_inspect_and_diff_of_a_full_width_low_rank_patch_never_multiply_the_factors_out(tmp_path: Path) -> None:
    """SDXL's bigG FFN (1280 x 5120): the product would take 75 MiB (float64 and float32); the factors 40 KiB."""
    patch = claiming(tmp_path / "bigg.erasepatch", "sdxl", "te2", 1280, 5120)
    module = "lora_te2_text_model_encoder_layers_1_mlp_fc2"
    r, peak = run_measured("inspect", patch, "--json")
    assert r.exit_code == 0, r.output
    assert peak < 16 * 2**20, f"{peak / 2**20:.0f} MiB"
    (row,) = json.loads(r.stdout)["rows"]
    product = load_patch(patch).weight_delta(module).astype(np.float64)  # measured: not in the command
    assert (row["module"], row["shape"], row["storage"]) == (module, [1280, 5120], "rank 2")
    assert row["delta_norm"] == pytest.approx(np.linalg.norm(product), rel=1e-6)
    r, peak = run_measured("diff", patch, patch, "--json")
    assert r.exit_code == 0, r.output
    assert peak < 16 * 2**20, f"{peak / 2**20:.0f} MiB"
    (row,) = json.loads(r.stdout)["comparisons"]
    assert row["norm_a"] == row["norm_b"] == pytest.approx(np.linalg.norm(product), rel=1e-6)
    assert row["cosine"] == pytest.approx(1, abs=1e-9)


def test_norms_and_cosines_from_factors_agree_with_the_multiplied_out_deltas(tmp_path: Path) -> None:
    """Low-rank against its dense twin, and factors of a rank above a side (multiplied out, being no larger)."""
    golden = load_patch(GOLDEN)
    dense = {m: golden.weight_delta(m) for m in golden.manifest.deltas}
    tensors = {n: a for n, a in golden.tensors.items() if n.endswith(".diff_b")} | {
        f"{m}.diff": d for m, d in dense.items()
    }
    deltas = {m: d.model_copy(update={"storage": "dense", "rank": None}) for m, d in golden.manifest.deltas.items()}
    twin = tmp_path / "twin.erasepatch"
    save_patch(
        Patch(golden.manifest.model_copy(update={"deltas": deltas}), tensors, storage_dtypes(tensors, "F32")), twin
    )
    r = runner.invoke(app, ["diff", str(GOLDEN), str(twin), "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["comparisons"]
    assert [row["norm_a"] for row in rows] == pytest.approx(
        [np.linalg.norm(dense[row["module"]]) for row in rows], rel=1e-6
    )
    assert [row["cosine"] for row in rows] == pytest.approx([1.0, 1.0], abs=1e-6)
    narrow = claiming(tmp_path / "narrow.erasepatch", "sd1", "te", 1, 64)  # fc2 out 1, rank 2
    r = runner.invoke(app, ["inspect", str(narrow), "--json"])
    assert r.exit_code == 0, r.output
    (row,) = json.loads(r.stdout)["rows"]
    product = load_patch(narrow).weight_delta("lora_te_text_model_encoder_layers_1_mlp_fc2")
    assert row["shape"] == [1, 64] and row["delta_norm"] == pytest.approx(np.linalg.norm(product.astype(np.float64)))
