"""Writes tests/golden/v1.erasepatch. Run once per format version; the file is then kept forever.

    python tests/golden/make_golden.py

It carries one dense module (layer 0 fc1) and one rank-2 module (layer 1 fc2), made for the
tiny SD1 checkpoint ``make_checkpoint(..., "single-sd1", "F32", seed=0)``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

from erasekit.checkpoints.layouts import detect
from erasekit.format.names import module_name
from erasekit.format.patchfile import (
    Concept,
    DeltaInfo,
    EncoderInfo,
    Method,
    Patch,
    fingerprint,
    new_manifest,
    save_patch,
)
from erasekit.testing import make_checkpoint

HERE = Path(__file__).parent


def build() -> Patch:
    with tempfile.TemporaryDirectory() as tmp:
        base = make_checkpoint(Path(tmp) / "base.safetensors", "single-sd1", "F32", seed=0)
        wf = detect(base).files[0]
        enc = wf.encoders["te"]
        fps = {}
        for layer, proj in ((0, "fc1"), (1, "fc2")):
            for kind in ("weight", "bias"):
                key = enc.key(layer, proj, kind)
                dtype, shape = wf.tensor_info()[key]
                fps[f"{module_name('te', layer, proj)}.{kind}"] = fingerprint(wf.read_raw(key), dtype, shape)
    rng = np.random.default_rng(1234)
    m0, m1 = module_name("te", 0, "fc1"), module_name("te", 1, "fc2")
    tensors = {
        f"{m0}.diff": (rng.standard_normal((64, 32)) * 1e-3).astype(np.float32),
        f"{m0}.diff_b": (rng.standard_normal(64) * 1e-3).astype(np.float32),
        f"{m1}.lora_up.weight": (rng.standard_normal((32, 2)) * 1e-2).astype(np.float32),
        f"{m1}.lora_down.weight": (rng.standard_normal((2, 64)) * 1e-2).astype(np.float32),
        f"{m1}.alpha": np.array(1.0, dtype=np.float32),
        f"{m1}.diff_b": (rng.standard_normal(32) * 1e-3).astype(np.float32),
    }
    dtypes = {n: "F32" for n in tensors} | {f"{m0}.diff": "F16", f"{m1}.lora_up.weight": "BF16"}
    manifest = new_manifest(
        title="golden v1",
        architecture="sd1",
        encoders={"te": EncoderInfo(hidden=32, intermediate=64, layers=2)},
        fingerprints=fps,
        deltas={m0: DeltaInfo(storage="dense", bias=True), m1: DeltaInfo(storage="lowrank", rank=2, bias=True)},
        concepts=[Concept(name="circle", kind="object")],
        method=Method(
            name="fuchi-takagi-2024",
            hyperparameters={"lr": 1e-5, "steps": 10},
            seed=0,
            images_sha256="0" * 64,
            num_images=4,
            duration_s=1.5,
        ),
        source="base.safetensors",
        created_at="2026-11-23T00:00:00Z",
    )
    # round-trip through the stored dtypes so the in-memory values equal what the file holds
    from erasekit.format import _st

    tensors = {
        n: _st.to_numpy(_st.encode(a, dtypes[n]), dtypes[n], a.shape).astype(np.float32) for n, a in tensors.items()
    }
    return Patch(manifest, tensors, dtypes)


if __name__ == "__main__":
    out = HERE / "v1.erasepatch"
    if out.exists() and "--overwrite" not in sys.argv:
        sys.exit(f"{out} exists; golden files are kept forever (pass --overwrite only for a new format version)")
    save_patch(build(), out)
    print(out)
