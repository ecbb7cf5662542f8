"""Fuzzing the readers of patch files and checkpoint headers (test support; needs hypothesis, a test dependency).

Every case starts from a valid file (a tiny patch with dense and low-rank modules, or a tiny single-file checkpoint) and breaks it one way:
truncation, a header length far beyond the file, hostile data offsets (overlapping, out of range, negative), wrong
dtypes and shapes, NaN/inf deltas, non-UTF-8 or non-JSON headers and metadata, manifests with missing, extra,
wrongly typed or huge fields, names that do not belong to the layout, duplicated keys, and manifests claiming layers
of any width (up to 70,000) with low-rank factors of that width in the file. The property, for every
case: the reader either accepts the file or raises an :class:`~erasekit.errors.ErasekitError` (a clear one-line
error with its exit code), never anything else; the file's bytes do not change; and the reader's peak memory stays
under :data:`MEMORY_LIMIT` (no size from the file is trusted before it is checked, and a patch's norms, as inspect
and diff compute them, come from its factors, never their product).

``python -m erasekit.testing fuzz --n 10000`` runs a long campaign; the test suite runs a few hundred cases.
"""

from __future__ import annotations

import json
import math
import struct
import tempfile
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ErasekitError

MEMORY_LIMIT = 32 * 2**20  # bytes a reader may allocate on any of these small files


@dataclass
class Findings:
    cases: int = 0
    accepted: int = 0
    refused: dict[str, int] = field(default_factory=dict)  # error class -> count
    failures: list[str] = field(default_factory=list)  # anything that broke the property
    labels: dict[str, int] = field(default_factory=dict)  # "target/strategy" -> cases


def split(raw: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def join(header: Any, data: bytes, text: str | bytes | None = None) -> bytes:
    body = text if text is not None else json.dumps(header, allow_nan=True)
    raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    return struct.pack("<Q", len(raw)) + raw + data


def check(raw: bytes, read: Callable[[Path], Any], findings: Findings, label: str) -> None:
    """Write ``raw`` to a file, read it with ``read``, and record whether the property held."""
    findings.cases += 1
    findings.labels[label] = findings.labels.get(label, 0) + 1
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "case.safetensors"
        path.write_bytes(raw)
        tracemalloc.start()
        try:
            read(path)
            findings.accepted += 1
        except ErasekitError as e:
            name = type(e).__name__
            findings.refused[name] = findings.refused.get(name, 0) + 1
            if "\n" in str(e):
                findings.failures.append(f"{label}: a multi-line error: {str(e)[:120]!r}")
        except Exception as e:  # noqa: BLE001 - anything else breaks the property
            findings.failures.append(f"{label}: {type(e).__name__}: {str(e)[:160]}")
        finally:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        if peak > MEMORY_LIMIT:
            findings.failures.append(f"{label}: peak memory {peak / 2**20:.0f} MiB")
        if path.read_bytes() != raw:
            findings.failures.append(f"{label}: the reader changed the file")


# -- strategies ---------------------------------------------------------------------------------------


def strategies() -> dict[str, Any]:
    """Hypothesis strategies, each turning a valid file's bytes into a broken one."""
    from hypothesis import strategies as st

    big = st.one_of(
        st.integers(min_value=-(2**70), max_value=2**70), st.sampled_from([0, -1, 2**63, 2**64 - 1, 10**30])
    )
    junk = st.one_of(
        st.none(),
        st.booleans(),
        big,
        st.floats(allow_nan=True),
        st.text(max_size=40),
        st.lists(st.integers(-3, 3), max_size=4),
        st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
    )

    @st.composite
    def truncated(draw: Any, raw: bytes) -> bytes:
        return raw[: draw(st.integers(0, len(raw) - 1))]

    @st.composite
    def header_length(draw: Any, raw: bytes) -> bytes:
        return struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + raw[8:]

    @st.composite
    def entry_field(draw: Any, raw: bytes) -> bytes:
        header, data = split(raw)
        names = [k for k in header if k != "__metadata__"]
        name = draw(st.sampled_from(names))
        key = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        value = draw(
            st.one_of(
                junk,
                st.sampled_from(["F64", "I8", "BOOL", "F8_E4M3", "bf16"]),
                st.lists(big, min_size=0, max_size=3),
                st.tuples(big, big).map(list),
            )
        )
        header[name][key] = value
        return join(header, data)

    @st.composite
    def offsets(draw: Any, raw: bytes) -> bytes:  # overlapping, shifted, out of range or negative offsets
        header, data = split(raw)
        names = [k for k in header if k != "__metadata__"]
        name = draw(st.sampled_from(names))
        begin, end = header[name]["data_offsets"]
        shift = draw(st.one_of(st.integers(-len(data) - 8, len(data) + 8), st.sampled_from([-begin, -1, 1, 2**40])))
        header[name]["data_offsets"] = [begin + shift, end + shift]
        return join(header, data)

    @st.composite
    def metadata(draw: Any, raw: bytes) -> bytes:
        header, data = split(raw)
        meta = header.setdefault("__metadata__", {})
        key = draw(st.sampled_from(sorted(meta) + ["erasekit", "modelspec.hash_sha256", "x"]))
        meta[key] = draw(st.one_of(junk, st.text(max_size=200), st.just("{}"), st.just("[]"), st.just('{"a":')))
        return join(header, data)

    @st.composite
    def manifest(draw: Any, raw: bytes) -> bytes:
        header, data = split(raw)
        m = json.loads(header["__metadata__"]["erasekit"])
        paths = list(_paths(m))
        path = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(["drop", "retype", "extra", "huge"]))
        parent, key = _walk(m, path[:-1]), path[-1]
        if action == "drop" and isinstance(parent, dict):
            parent.pop(key, None)
        elif action == "retype":
            parent[key] = draw(junk)
        elif action == "extra" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(junk)
        else:
            parent[key] = draw(st.sampled_from(["x" * 100_000, 10**400, [0] * 10_000, math.inf]))
        header["__metadata__"]["erasekit"] = json.dumps(m, allow_nan=True)
        return join(header, data)

    @st.composite
    def values(draw: Any, raw: bytes) -> bytes:  # NaN/inf (or any bits) inside the tensor data
        header, data = split(raw)
        header["__metadata__"].pop("modelspec.hash_sha256", None)  # else the hash check refuses first
        at = draw(st.integers(0, max(0, len(data) - 4)))
        bits = draw(
            st.sampled_from([b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\x00\x7c\x00\x7c", b"\xff\xff\xff\xff"])
        )
        return join(header, data[:at] + bits + data[at + 4 :])

    @st.composite
    def names(draw: Any, raw: bytes) -> bytes:  # renamed, duplicated or foreign tensor names
        header, data = split(raw)
        tensors = [k for k in header if k != "__metadata__"]
        old = draw(st.sampled_from(tensors))
        new = draw(
            st.one_of(
                st.text(max_size=60),
                st.sampled_from(
                    ["lora_te_text_model_encoder_layers_99_mlp_fc1.diff", "lora_unet_down.lora_up.weight", tensors[0]]
                ),
            )
        )
        if new == old:
            text = json.dumps(header)
            dup = json.dumps({old: header[old]})[1:-1]
            return join(None, data, text[:-1] + ", " + dup + "}")  # the same key twice
        header[new] = header.pop(old)
        return join(header, data)

    @st.composite
    def raw_header(draw: Any, raw: bytes) -> bytes:  # non-UTF-8, non-JSON, or other JSON
        (n,) = struct.unpack("<Q", raw[:8])
        body = draw(
            st.one_of(
                st.binary(min_size=1, max_size=64),
                st.sampled_from([b"[]", b"null", b"1", b"\xff\xfe{}"]),
                st.text(max_size=30).map(lambda t: t.encode()),
            )
        )
        return join(None, raw[8 + n :], body)

    @st.composite
    def claims(draw: Any, raw: bytes) -> bytes:  # wide layers claimed, and factors of that width in a small file
        named = st.sampled_from(
            [
                ("sd1", "te", 768, 3072, 12),
                ("sdxl", "te2", 1280, 5120, 32),
                ("sdxl-refiner", "te2", 1280, 5120, 32),
                ("sd1", "te", 65536, 65536, 2),
                ("clip-text", "te", 1281, 5120, 32),
                ("sd2", "te", 1024, 4096, 2**31),
            ]
        )
        drawn = st.tuples(
            st.sampled_from([("sd1", "te"), ("sd2", "te"), ("sdxl", "te1"), ("sdxl", "te2"), ("clip-text", "te")]),
            st.integers(1, 70_000),
            st.integers(1, 70_000),
            st.integers(2, 40),
        ).map(lambda t: (*t[0], *t[1:]))
        arch, slot, hidden, intermediate, layers = draw(st.one_of(named, drawn))
        return claimed_width(raw, arch, slot, hidden, intermediate, layers)

    return {
        "truncated": truncated,
        "header_length": header_length,
        "entry_field": entry_field,
        "offsets": offsets,
        "metadata": metadata,
        "manifest": manifest,
        "values": values,
        "names": names,
        "raw_header": raw_header,
        "claims": claims,
    }


def claimed_width(raw: bytes, architecture: str, slot: str, hidden: int, intermediate: int, layers: int) -> bytes:
    """The patch ``raw`` reduced to its low-rank module, moved to ``slot`` of an ``architecture`` base whose encoder
    claims these sizes, with factors and bias delta of the width they imply (BF16 0.01 throughout; no data hash)."""
    from ..format import _st
    from ..format.names import module_name, parse_module_name

    header, _ = split(raw)
    meta = header["__metadata__"]
    m = json.loads(meta.pop("erasekit"))
    meta.pop("modelspec.hash_sha256", None)
    old = next(k for k, d in m["deltas"].items() if d["storage"] == "lowrank")
    _, layer, proj = parse_module_name(old)  # type: ignore[misc]
    new, rank = module_name(slot, layer, proj), m["deltas"][old]["rank"]
    out, into = (intermediate, hidden) if proj == "fc1" else (hidden, intermediate)
    m["base"] |= {
        "architecture": architecture,
        "encoders": {slot: {"hidden": hidden, "intermediate": intermediate, "layers": layers}},
        "tensors": {new + k[len(old) :]: v for k, v in m["base"]["tensors"].items() if k.startswith(old + ".")},
    }
    m["deltas"] = {new: m["deltas"][old]}
    meta["erasekit"] = json.dumps(m)
    shapes = {".lora_up.weight": (out, rank), ".lora_down.weight": (rank, into), ".diff_b": (out,)}
    tensors = {new + k: ("BF16", shape, b"\x24\x3c" * math.prod(shape)) for k, shape in shapes.items()}
    tensors[new + ".alpha"] = ("F32", (), struct.pack("<f", rank))
    return _st.build_header(tensors, meta) + b"".join(tensors[n][2] for n in sorted(tensors))


def _paths(obj: Any, prefix: tuple = ()) -> Any:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield (*prefix, k)
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:3]):
            yield (*prefix, i)
            yield from _paths(v, (*prefix, i))


def _walk(obj: Any, path: tuple) -> Any:
    for k in path:
        obj = obj[k]
    return obj


# -- campaigns ----------------------------------------------------------------------------------------


def read_patch(path: Path) -> Any:
    """Load the patch, then compute what ``erasekit inspect`` shows of it and ``erasekit diff`` of it with itself."""
    from ..checkpoints.diff import compare_patches
    from ..checkpoints.inspect import inspect_patch
    from ..format.patchfile import load_patch

    patch = load_patch(path)
    return inspect_patch(patch), compare_patches(patch, patch)


def read_checkpoint(path: Path) -> Any:
    from ..checkpoints.inspect import inspect_path

    return inspect_path(path)


def campaign(n: int, findings: Findings | None = None, seed: int | None = None) -> Findings:
    """Run about ``n`` cases over every strategy, against the patch reader and the checkpoint reader."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hseed

    findings = findings or Findings()
    patch, checkpoint = _tiny_files()
    targets = {"patch": (patch, read_patch), "checkpoint": (checkpoint, read_checkpoint)}
    strats = strategies()
    per = max(1, n // (len(strats) * len(targets)))
    for target, (raw, read) in targets.items():
        for name, strat in strats.items():
            if target == "checkpoint" and name in ("manifest", "values", "claims"):
                continue  # checkpoints have no manifest; their values are not read by the header reader

            run = settings(max_examples=per, deadline=None, database=None, suppress_health_check=list(HealthCheck))(
                given(strat(raw))(_checker(read, findings, f"{target}/{name}"))
            )
            (hseed(seed)(run) if seed is not None else run)()
    return findings


def _checker(read: Callable[[Path], Any], findings: Findings, label: str) -> Callable[[bytes], None]:
    def run(case: bytes) -> None:
        check(case, read, findings, label)

    return run


def _tiny_files() -> tuple[bytes, bytes]:
    """A valid patch (layer 0 dense, layer 1 low-rank) and the tiny single-file checkpoint it was made from."""
    from ..checkpoints.diff import diff_checkpoints
    from ..format.patchfile import Patch, load_patch, save_patch, storage_dtypes
    from . import make_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = make_checkpoint(root / "m.safetensors", "single-sd1")
        diff_checkpoints(
            base, make_checkpoint(root / "a.safetensors", "single-sd1", edit_layers=[0]), output=root / "a.erasepatch"
        )
        diff_checkpoints(
            base,
            make_checkpoint(root / "b.safetensors", "single-sd1", edit_layers=[1]),
            output=root / "b.erasepatch",
            rank=2,
        )
        dense, low = load_patch(root / "a.erasepatch"), load_patch(root / "b.erasepatch")
        manifest = dense.manifest.model_copy(
            update={
                "deltas": dense.manifest.deltas | low.manifest.deltas,
                "base": dense.manifest.base.model_copy(
                    update={"tensors": dense.manifest.base.tensors | low.manifest.base.tensors}
                ),
            }
        )
        tensors = dense.tensors | low.tensors
        save_patch(Patch(manifest, tensors, storage_dtypes(tensors, "BF16")), root / "both.erasepatch")
        return (root / "both.erasepatch").read_bytes(), base.read_bytes()


def main(argv: list[str]) -> int:
    """``python -m erasekit.testing fuzz --n 10000``: a long fuzz campaign over the patch and checkpoint readers."""
    import argparse
    import time

    ap = argparse.ArgumentParser(prog="python -m erasekit.testing fuzz", description=campaign.__doc__)
    ap.add_argument("--n", type=int, default=10_000, help="cases, spread over every mutation and both readers")
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    found = campaign(args.n, seed=args.seed)
    refused = ", ".join(f"{k} {v}" for k, v in sorted(found.refused.items()))
    print(f"{found.cases} cases in {time.perf_counter() - t0:.0f} s: {found.accepted} accepted, refused: {refused}")
    for line in found.failures[:50]:
        print("FAILED", line)
    print(f"{len(found.failures)} failed")
    return 1 if found.failures else 0
