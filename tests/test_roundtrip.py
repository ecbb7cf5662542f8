"""Every layout x dtype: extract a patch, apply it (in place and to a copy), revert bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import ckpt_path, snapshot

from erasekit.checkpoints.apply import apply_to_checkpoint, revert_from_checkpoint
from erasekit.checkpoints.diff import diff_checkpoints
from erasekit.checkpoints.layouts import detect
from erasekit.errors import TargetNotWritableError
from erasekit.testing import LAYOUTS, NO_ENCODER_LAYOUTS, make_checkpoint

DTYPES = ("F32", "F16", "BF16")


def ffn_arrays(path: Path) -> dict[tuple[str, str], tuple[str, np.ndarray]]:
    ckpt = detect(path)
    return {
        (wf.label, key): (wf.tensor_info()[key][0], wf.read_numpy(key))
        for wf in ckpt.files
        for _, key, *_ in wf.ffn_keys()
    }


def assert_ffn_matches(result: Path, edited: Path, dtype: str) -> None:
    got, want = ffn_arrays(result), ffn_arrays(edited)
    assert got.keys() == want.keys()
    for k, (stored, arr) in got.items():
        if stored == dtype != "F32":
            # delta computed in float32 from 16-bit values: A + (B - A) rounds back to B exactly
            np.testing.assert_array_equal(arr, want[k][1], err_msg=str(k))
        elif stored == dtype:  # F32 arithmetic
            np.testing.assert_allclose(arr, want[k][1], atol=1e-6, err_msg=str(k))
        else:  # an F16 variant file patched with the delta taken from the main file: that file's precision
            np.testing.assert_allclose(arr, want[k][1], atol=1e-4, rtol=2**-7, err_msg=str(k))


def ffn_bytes(path: Path) -> dict[str, bytes]:
    wf = detect(path).files[0]
    return {k: wf.read_raw(k) for _, k, *_ in wf.ffn_keys()}


def non_ffn_bytes(path: Path) -> dict[tuple[str, str], bytes]:
    ckpt = detect(path)
    out = {}
    for wf in ckpt.files:
        ffn = {k for _, k, *_ in wf.ffn_keys()}
        out.update({(wf.label, k): wf.read_raw(k) for k in wf.tensor_info() if k not in ffn})
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", [layout for layout in LAYOUTS if layout not in NO_ENCODER_LAYOUTS])
def test_apply_and_revert_roundtrip(tmp_path: Path, layout: str, dtype: str) -> None:
    base = make_checkpoint(ckpt_path(tmp_path, layout, "base"), layout, dtype)
    edited = make_checkpoint(ckpt_path(tmp_path, layout, "edited"), layout, dtype, edit_layers=[1])
    patch = tmp_path / "p.erasepatch"
    report = diff_checkpoints(base, edited, output=patch)
    changed = {(c.encoder, c.layer) for c in report.changes if c.delta_norm > 0}
    assert changed and all(layer == 1 for _, layer in changed)
    original = snapshot(base)

    out = tmp_path / ("out" if base.is_dir() else "out.safetensors")
    rep = apply_to_checkpoint([patch], base, output=out)
    assert snapshot(base) == original, "-o must not touch the source"
    assert_ffn_matches(out, edited, dtype)
    assert rep.applied[0].fingerprint in ("exact", "approx")

    if layout.startswith("ckpt"):
        with pytest.raises(TargetNotWritableError, match="is a pickle and cannot be patched in place") as e:
            apply_to_checkpoint([patch], base, in_place=True)
        assert e.value.option == "output"
        ffn = ffn_bytes(out)
        revert_from_checkpoint(patch, out)  # the -o copy is safetensors, so it has a journal and reverts exactly
        assert ffn_bytes(out) != ffn and ffn_bytes(out) == ffn_bytes(base), "revert restores the original bytes"
        return
    others = non_ffn_bytes(base)
    rep = apply_to_checkpoint([patch], base, in_place=True)
    assert rep.in_place and rep.bytes_written > 0
    assert_ffn_matches(base, edited, dtype)
    assert non_ffn_bytes(base) == others, "only FFN tensors may change"
    rev = revert_from_checkpoint(patch, base)
    assert rev.verified
    assert snapshot(base) == original, "revert must restore every byte"
