"""`diff -o` on an edit that is not only in the FFN (the authors' script also trains the last layer's
self-attention): refused by default, naming what differs; `--ffn-only` writes the FFN part and says what it left out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from erasekit.checkpoints.diff import diff_checkpoints
from erasekit.cli import app
from erasekit.errors import ErasekitError
from erasekit.format.patchfile import load_patch
from erasekit.testing import make_checkpoint

runner = CliRunner()
ATTN = "cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.out_proj.weight"


@pytest.fixture()
def pair(tmp_path: Path) -> tuple[Path, Path]:
    base = make_checkpoint(tmp_path / "base.safetensors", "single-sd1")
    edited = make_checkpoint(tmp_path / "edited.safetensors", "single-sd1", edit_layers=[1])
    sd = load_file(str(edited))
    sd[ATTN] = sd[ATTN] * np.float32(1.01)  # the last layer's self-attention trained too
    save_file(sd, str(edited))
    return base, edited


def test_an_edit_beyond_the_ffn_is_refused_by_default(pair: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "p.erasepatch"
    with pytest.raises(ErasekitError) as e:
        diff_checkpoints(*pair, output=out)
    assert str(e.value) == (
        f"edited.safetensors also differs from base.safetensors outside the FFN layers, in 1 "
        f"text-encoder tensors (largest: te:{ATTN}, relative change 1.00e-02); a patch of the FFN "
        "part would not reproduce the edit; ask for the FFN part only to write it anyway (the patch "
        "records what it leaves out, and inspect shows it)"
    )
    assert e.value.option == "ffn_only"
    assert not out.exists()
    r = runner.invoke(app, ["diff", str(pair[0]), str(pair[1]), "-o", str(out)])
    assert r.exit_code == 1 and r.stderr.strip().endswith("(--ffn-only)") and not out.exists()


def test_ffn_only_writes_the_ffn_part_and_inspect_shows_the_loss(pair: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "p.erasepatch"
    r = runner.invoke(app, ["diff", str(pair[0]), str(pair[1]), "-o", str(out), "--ffn-only"])
    assert r.exit_code == 0, r.output
    left = load_patch(out).manifest.method.hyperparameters["left_out"]
    assert left["tensors"] == 1 and left["largest"] == f"te:{ATTN}"
    assert left["largest_relative"] == pytest.approx(0.01, rel=1e-3)
    r = runner.invoke(app, ["inspect", str(out)])
    assert f"left out   1 non-FFN tensors of the edit (largest: te:{ATTN}, relative change 1.00e-02)" in r.stdout
    assert json.loads(runner.invoke(app, ["inspect", str(out), "--json"]).stdout)["method"]["hyperparameters"][
        "left_out"
    ]


def test_an_ffn_only_edit_needs_no_flag(tmp_path: Path) -> None:
    base = make_checkpoint(tmp_path / "a.safetensors", "single-sd1")
    edited = make_checkpoint(tmp_path / "b.safetensors", "single-sd1", edit_layers=[0])
    diff_checkpoints(base, edited, output=tmp_path / "p.erasepatch")
    assert "left_out" not in load_patch(tmp_path / "p.erasepatch").manifest.method.hyperparameters


def test_clip_text_and_pipeline_patches_meet_by_one_rule_everywhere(tmp_path: Path) -> None:
    """A patch from a bare CLIP text encoder and one from an SD1.x model with the same encoder shapes: apply, inspect
    --against and diff of the two patches all map them onto each other the same way, and each says so."""
    te_base = make_checkpoint(tmp_path / "te", "transformers-clip")
    te_edit = make_checkpoint(tmp_path / "te-edit", "transformers-clip", edit_layers=[1])
    sd_base = make_checkpoint(tmp_path / "sd.safetensors", "single-sd1")
    sd_edit = make_checkpoint(tmp_path / "sd-edit.safetensors", "single-sd1", edit_layers=[1])
    clip_patch, sd_patch = tmp_path / "clip.erasepatch", tmp_path / "sd.erasepatch"
    diff_checkpoints(te_base, te_edit, output=clip_patch)
    diff_checkpoints(sd_base, sd_edit, output=sd_patch)
    assert load_patch(clip_patch).manifest.base.architecture == "clip-text"
    note = "was made for clip-text and goes to an sd1 model by matching FFN shapes (encoder te -> te)"

    r = runner.invoke(app, ["diff", str(sd_patch), str(clip_patch), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert any(note in n for n in report["notes"])
    assert {c["layer"] for c in report["comparisons"]} == {1} and all(
        c["cosine"] is not None for c in report["comparisons"]
    )

    r = runner.invoke(app, ["inspect", str(clip_patch), "--against", str(sd_base), "--json"])
    assert note in json.loads(r.stdout)["compatibility"]

    r = runner.invoke(app, ["apply", str(clip_patch), "--to", str(sd_base), "-o", str(tmp_path / "out.safetensors")])
    assert r.exit_code == 0 and note in r.stderr, r.output
