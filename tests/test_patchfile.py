"""The .erasepatch format: golden file, determinism, metadata, and every rejected input."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from erasekit.errors import InputFileError, PatchFormatError, PatchVersionError
from erasekit.format import _st
from erasekit.format.patchfile import FORMAT_VERSION, UPGRADES, load_patch, parse_manifest, read_manifest, save_patch

GOLDEN = Path(__file__).parent / "golden" / "v1.erasepatch"


def split(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def join(path: Path, header: dict, data: bytes) -> Path:
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


def edit_manifest(src: Path, dst: Path, fn) -> Path:  # type: ignore[no-untyped-def]
    header, data = split(src)
    m = json.loads(header["__metadata__"]["erasekit"])
    fn(m)
    header["__metadata__"]["erasekit"] = json.dumps(m)
    return join(dst, header, data)


def test_golden_v1_loads_forever() -> None:
    p = load_patch(GOLDEN)
    m = p.manifest
    assert (m.format_version, m.title, m.base.architecture) == (1, "golden v1", "sd1")
    assert [c.name for c in m.concepts] == ["circle"]
    assert m.method.hyperparameters == {"lr": 1e-5, "steps": 10}
    assert {k: v.storage for k, v in m.deltas.items()} == {
        "lora_te_text_model_encoder_layers_0_mlp_fc1": "dense",
        "lora_te_text_model_encoder_layers_1_mlp_fc2": "lowrank",
    }
    assert p.dtypes["lora_te_text_model_encoder_layers_0_mlp_fc1.diff"] == "F16"
    assert p.patch_id == "f7fcb74db952b418" + p.patch_id[16:]
    dense = p.weight_delta("lora_te_text_model_encoder_layers_1_mlp_fc2")
    sv = np.linalg.svd(dense.astype(np.float64), compute_uv=False)
    assert dense.shape == (32, 64) and sv[2] < 1e-5 * sv[0], "a rank-2 module multiplies out to rank 2"


def test_golden_rewrites_to_the_same_data_and_manifest(tmp_path: Path) -> None:
    """Only the ModelSpec architecture id changed since the golden file was written (…/erasepatch -> …/lycoris,
    the id ModelSpec gives LyCORIS networks); tensor bytes and manifest are the golden file's, and writing is
    deterministic."""
    out = save_patch(load_patch(GOLDEN), tmp_path / "again.erasepatch")
    (h_gold, d_gold), (h_new, d_new) = split(GOLDEN), split(out)
    assert d_new == d_gold and h_new["__metadata__"]["erasekit"] == h_gold["__metadata__"]["erasekit"]
    changed = {k for k in h_gold["__metadata__"] if h_gold["__metadata__"][k] != h_new["__metadata__"][k]}
    assert changed == {"modelspec.architecture"}
    assert save_patch(load_patch(out), tmp_path / "third.erasepatch").read_bytes() == out.read_bytes()


def test_metadata_has_manifest_modelspec_and_kohya_keys(tmp_path: Path) -> None:
    header, data = split(save_patch(load_patch(GOLDEN), tmp_path / "again.erasepatch"))
    meta = header["__metadata__"]
    assert meta["format"] == "pt"
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lycoris"
    assert meta["modelspec.title"] == "golden v1" and meta["modelspec.date"] == "2026-11-23T00:00:00Z"
    import hashlib

    assert meta["modelspec.hash_sha256"] == "0x" + hashlib.sha256(data).hexdigest()
    assert (meta["ss_base_model_version"], meta["ss_v2"], meta["ss_network_module"]) == (
        "sd_v1",
        "False",
        "lycoris.kohya",
    )
    # Nothing but network tensors: ComfyUI warns on unknown keys.
    allowed = (".diff", ".diff_b", ".lora_up.weight", ".lora_down.weight", ".alpha")
    assert all(k.startswith("lora_te_") and k.endswith(allowed) for k in header if k != "__metadata__")


def test_same_inputs_same_bytes(tmp_path: Path) -> None:
    p = load_patch(GOLDEN)
    a, b = save_patch(p, tmp_path / "a.erasepatch"), save_patch(p, tmp_path / "b.erasepatch")
    assert a.read_bytes() == b.read_bytes()
    assert oct(a.stat().st_mode & 0o777) != oct(0o600), "atomic writes must not leave mkstemp's 0600 mode"


def test_bf16_encoder_matches_torch() -> None:
    x = torch.cat(
        [torch.randn(1000) * 3, torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 1.00390625, 1.01171875])]
    )
    ours = _st.float32_to_bf16_bytes(x.numpy())
    assert ours == x.to(torch.bfloat16).view(torch.int16).numpy().tobytes()
    back = _st.to_numpy(ours, "BF16", (x.numel(),))
    assert np.array_equal(back, x.to(torch.bfloat16).float().numpy())


# -- rejected inputs: each a PatchFormatError with a message naming the problem --------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputFileError, match="does not exist"):
        load_patch(tmp_path / "nope.erasepatch")


@pytest.mark.parametrize("cut", [0, 5, 8, 100, -1])
def test_truncated(tmp_path: Path, cut: int) -> None:
    raw = GOLDEN.read_bytes()
    bad = tmp_path / "t.erasepatch"
    bad.write_bytes(raw[:cut] if cut >= 0 else raw[:-1])
    with pytest.raises(PatchFormatError, match="truncated|corrupt"):
        load_patch(bad)


def test_huge_header_length(tmp_path: Path) -> None:
    bad = tmp_path / "h.erasepatch"
    bad.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(PatchFormatError, match="header claims"):
        load_patch(bad)


def test_header_not_json(tmp_path: Path) -> None:
    bad = tmp_path / "j.erasepatch"
    bad.write_bytes(struct.pack("<Q", 4) + b"{{{{")
    with pytest.raises(PatchFormatError, match="corrupt safetensors header"):
        load_patch(bad)


def test_a_header_that_names_a_key_twice_is_refused(tmp_path: Path) -> None:
    """JSON readers disagree on which duplicate wins; a header that says two things is hostile."""
    raw = GOLDEN.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = raw[8 : 8 + n].decode().rstrip()
    name = next(k for k in json.loads(header) if k != "__metadata__")
    entry = json.dumps(json.loads(header)[name])
    doubled = header[:-1] + f',"{name}":{entry}' + "}"  # the same tensor again, last in the object
    bad = tmp_path / "d.erasepatch"
    bad.write_bytes(struct.pack("<Q", len(doubled)) + doubled.encode() + raw[8 + n :])
    with pytest.raises(PatchFormatError, match=f"names '{name}' twice"):
        load_patch(bad)
    m = json.loads(json.loads(header)["__metadata__"]["erasekit"])
    text = json.dumps(m)[:-1] + ', "title": "other"}'
    with pytest.raises(PatchFormatError, match="manifest names 'title' twice"):
        parse_manifest(text)


def test_offsets_with_hole(tmp_path: Path) -> None:
    header, data = split(GOLDEN)
    name = next(k for k in header if k != "__metadata__")
    b, e = header[name]["data_offsets"]
    header[name]["data_offsets"] = [b + 2, e + 2]
    with pytest.raises(PatchFormatError, match="bytes for shape|hole|overlaps"):
        load_patch(join(tmp_path / "o.erasepatch", header, data))


def test_flipped_data_byte_fails_hash(tmp_path: Path) -> None:
    raw = bytearray(GOLDEN.read_bytes())
    raw[-3] ^= 0x01
    bad = tmp_path / "c.erasepatch"
    bad.write_bytes(bytes(raw))
    with pytest.raises(PatchFormatError, match="does not match its recorded hash"):
        load_patch(bad)


def test_not_an_erasekit_file(tmp_path: Path) -> None:
    header, data = split(GOLDEN)
    del header["__metadata__"]["erasekit"]
    with pytest.raises(PatchFormatError, match="not an erasekit patch.*LoRA"):
        load_patch(join(tmp_path / "lora.safetensors.erasepatch", header, data))


def test_newer_format_version_says_upgrade(tmp_path: Path) -> None:
    bad = edit_manifest(GOLDEN, tmp_path / "v9.erasepatch", lambda m: m.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(PatchVersionError, match="upgrade erasekit"):
        load_patch(bad)


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [("architecture", "qwen-image", "architecture 'qwen-image'"), ("encoders", {"te4": None}, "encoder slot 'te4'")],
)
def test_a_model_a_newer_erasekit_knows_says_upgrade(tmp_path: Path, field: str, value: object, named: str) -> None:
    """A family added by a later erasekit, at the same format version: upgrade, not "invalid manifest"; the same
    field from this version or an older one is a damaged patch."""

    def edit(writer: str):  # noqa: ANN202
        def change(m: dict) -> None:
            m["base"][field] = value if field == "architecture" else m["base"][field] | {"te4": m["base"][field]["te"]}
            m["erasekit_version"] = writer

        return change

    newer = edit_manifest(GOLDEN, tmp_path / "newer.erasepatch", edit("99.0"))
    with pytest.raises(PatchVersionError, match=f"is for {named}, which this erasekit .* does not know") as e:
        load_patch(newer)
    assert e.value.fix == "upgrade erasekit (pip install -U erasekit)"
    older = edit_manifest(GOLDEN, tmp_path / "older.erasepatch", edit("0.0.1"))
    with pytest.raises(PatchFormatError, match="invalid manifest field base") as e2:
        load_patch(older)
    assert not isinstance(e2.value, PatchVersionError)


def test_older_version_goes_through_named_upgrade(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend the current format is v2: a v1 file then loads through UPGRADES[1]."""
    text = split(GOLDEN)[0]["__metadata__"]["erasekit"]

    def upgrade_v1_to_v2(old: dict) -> dict:
        return dict(old, format_version=2, title=old["title"] + " (upgraded)")

    monkeypatch.setattr("erasekit.format.patchfile.FORMAT_VERSION", 2)
    monkeypatch.setitem(UPGRADES, 1, upgrade_v1_to_v2)
    manifest, _ = parse_manifest(text)
    assert (manifest.format_version, manifest.title) == (2, "golden v1 (upgraded)")
    monkeypatch.setattr("erasekit.format.patchfile.FORMAT_VERSION", 3)
    with pytest.raises(PatchFormatError, match="no upgrade from format version 2"):
        parse_manifest(text)


def test_unknown_fields_load_with_a_warning(tmp_path: Path) -> None:
    p = edit_manifest(GOLDEN, tmp_path / "x.erasepatch", lambda m: m["method"].update(future_knob=3))
    loaded = load_patch(p)
    assert loaded.warnings and "method.future_knob" in loaded.warnings[0]


@pytest.mark.parametrize("field", ["title", "base", "deltas", "method"])
def test_missing_required_field(tmp_path: Path, field: str) -> None:
    p = edit_manifest(GOLDEN, tmp_path / "m.erasepatch", lambda m: m.pop(field))
    with pytest.raises(PatchFormatError, match=f"invalid manifest field {field}"):
        load_patch(p)


def test_manifest_not_json(tmp_path: Path) -> None:
    header, data = split(GOLDEN)
    header["__metadata__"]["erasekit"] = "{not json"
    with pytest.raises(PatchFormatError, match="not valid JSON"):
        load_patch(join(tmp_path / "n.erasepatch", header, data))


NESTED = "[" * 200_000 + "]" * 200_000  # JSON nested 200,000 deep: too deep for any JSON reader's recursion


@pytest.mark.parametrize(
    ("where", "name", "code", "message"),
    [
        (
            "header",
            "deep.erasepatch",
            3,
            r"^error: patch .* has a safetensors header nested too deeply to read; re-create",
        ),
        ("header", "deep.safetensors", 4, r"^error: checkpoint .* has a safetensors header nested too deeply to read"),
        (
            "manifest",
            "deep.erasepatch",
            3,
            r"^error: .*: the erasekit manifest is nested too deeply to read; re-create",
        ),
    ],
)
def test_json_nested_200000_deep_is_a_format_error(
    tmp_path: Path, where: str, name: str, code: int, message: str
) -> None:
    """Not an internal error (exit 70, RecursionError): the exit code and one line of any other malformed file."""
    from typer.testing import CliRunner

    from erasekit.cli import app

    header, data = split(GOLDEN)
    if where == "manifest":
        header["__metadata__"]["erasekit"] = '{"title":' + NESTED + "}"
        text = json.dumps(header)
    else:
        text = json.dumps(header)[:-1] + ', "deep": ' + NESTED + "}"
    raw = struct.pack("<Q", len(text)) + text.encode() + data
    path = tmp_path / name
    path.write_bytes(raw)
    r = CliRunner().invoke(app, ["inspect", str(path)])
    assert r.exit_code == code, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]), r.stderr
    assert path.read_bytes() == raw


def test_an_invalid_field_nested_hundreds_deep_is_named_in_a_short_line(tmp_path: Path) -> None:
    p = edit_manifest(
        GOLDEN,
        tmp_path / "d.erasepatch",
        lambda m: m["method"]["hyperparameters"].update(x=json.loads("[" * 300 + "]" * 300)),
    )
    with pytest.raises(PatchFormatError, match=r"invalid manifest field method\.hyperparameters\.x\.") as e:
        load_patch(p)
    assert len(str(e.value)) < 300


def test_tensor_missing_from_file(tmp_path: Path) -> None:
    header, data = split(GOLDEN)
    victim = "lora_te_text_model_encoder_layers_0_mlp_fc1.diff_b"
    b, e = header.pop(victim)["data_offsets"]
    for k, v in header.items():  # close the gap so only the missing tensor is wrong
        if k != "__metadata__" and v["data_offsets"][0] >= e:
            v["data_offsets"] = [v["data_offsets"][0] - (e - b), v["data_offsets"][1] - (e - b)]
    with pytest.raises(PatchFormatError, match="lacks 1 tensors"):
        read_manifest(join(tmp_path / "mt.erasepatch", header, data[:b] + data[e:]))


def test_extra_tensor_in_file(tmp_path: Path) -> None:
    header, data = split(GOLDEN)
    header["lora_te_text_model_encoder_layers_0_mlp_fc1.extra"] = {
        "dtype": "F32",
        "shape": [1],
        "data_offsets": [len(data), len(data) + 4],
    }
    with pytest.raises(PatchFormatError, match="does not list"):
        read_manifest(join(tmp_path / "et.erasepatch", header, data + b"\0\0\0\0"))


def test_wrong_shape(tmp_path: Path) -> None:
    header, data = split(GOLDEN)
    header["lora_te_text_model_encoder_layers_0_mlp_fc1.diff"]["shape"] = [32, 64]
    with pytest.raises(PatchFormatError, match="manifest implies"):
        read_manifest(join(tmp_path / "ws.erasepatch", header, data))


def test_wrong_dtype(tmp_path: Path) -> None:
    header, data = split(GOLDEN)
    header["lora_te_text_model_encoder_layers_0_mlp_fc1.diff"]["dtype"] = "I16"
    with pytest.raises(PatchFormatError, match="patches store F32, F16 or BF16"):
        read_manifest(join(tmp_path / "wd.erasepatch", header, data))


def test_module_outside_encoder(tmp_path: Path) -> None:
    def move(m: dict) -> None:
        m["deltas"]["lora_te_text_model_encoder_layers_7_mlp_fc1"] = m["deltas"].pop(
            "lora_te_text_model_encoder_layers_0_mlp_fc1"
        )

    with pytest.raises(PatchFormatError, match="outside the base model"):
        load_patch(edit_manifest(GOLDEN, tmp_path / "mo.erasepatch", move))


def test_non_finite_values(tmp_path: Path) -> None:
    p = load_patch(GOLDEN)
    header, data = split(GOLDEN)
    ent = header["lora_te_text_model_encoder_layers_0_mlp_fc1.diff_b"]  # F32
    b = ent["data_offsets"][0]
    data = data[:b] + np.float32("nan").tobytes() + data[b + 4 :]
    del header["__metadata__"]["modelspec.hash_sha256"]
    with pytest.raises(PatchFormatError, match="NaN or infinite"):
        load_patch(join(tmp_path / "nan.erasepatch", header, data))
    assert p.manifest.title == "golden v1"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["deltas"]["lora_te_text_model_encoder_layers_1_mlp_fc2"].pop("rank"), "rank is required"),
        (lambda m: m["deltas"]["lora_te_text_model_encoder_layers_0_mlp_fc1"].update(rank=4), "not allowed for dense"),
        (lambda m: m["base"]["encoders"].update(te1=m["base"]["encoders"]["te"]), "allowed are"),
        (
            lambda m: m["deltas"].update(
                lora_te_text_model_encoder_layers_01_mlp_fc1=m["deltas"].pop(
                    "lora_te_text_model_encoder_layers_0_mlp_fc1"
                )
            ),
            "not a text-encoder FFN module name",
        ),
        (lambda m: m["base"]["encoders"]["te"].update(layers="2"), "invalid manifest field base.encoders.te.layers"),
        (lambda m: m.update(deltas={}), "invalid manifest field deltas"),
        (lambda m: m.update(title=""), "invalid manifest field title"),
    ],
)
def test_manifest_consistency_rules(tmp_path: Path, edit, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PatchFormatError, match=message):
        load_patch(edit_manifest(GOLDEN, tmp_path / "r.erasepatch", edit))


def test_f16_overflow_is_refused_before_writing(tmp_path: Path) -> None:
    from erasekit.errors import NonFiniteError

    p = load_patch(GOLDEN)
    p.tensors["lora_te_text_model_encoder_layers_0_mlp_fc1.diff"] = (
        p.tensors["lora_te_text_model_encoder_layers_0_mlp_fc1.diff"] * 1e9
    )
    with pytest.raises(NonFiniteError, match="stored as F16"):
        save_patch(p, tmp_path / "big.erasepatch")
    assert not (tmp_path / "big.erasepatch").exists()


# -- recorded evaluations (erasekit eval --record): validated strictly, newer versions kept unread ----------------

EVALUATED = Path(__file__).parent / "golden" / "v1-evaluated.erasepatch"


def _ev(edit):  # type: ignore[no-untyped-def]
    return lambda m: edit(m["evaluations"][0])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            _ev(lambda e: e["target"].update(after=1.5)),
            "evaluations.0.target.after: Input should be less than or equal to 1",
        ),
        (
            _ev(lambda e: e["others"]["square"].update(before=-0.1)),
            "evaluations.0.others.square.before: Input should be greater",
        ),
        (
            _ev(lambda e: e["target"].update(after=float("nan"))),
            "evaluations.0.target.after: Input should be a finite number",
        ),
        (_ev(lambda e: e.update(guidance=float("inf"))), "evaluations.0.guidance: Input should be a finite number"),
        (_ev(lambda e: e.update(strength="1")), "evaluations.0.strength: Input should be a valid number"),
        (_ev(lambda e: e.update(surprise=1)), "evaluations.0.surprise: Extra inputs are not permitted"),
        (_ev(lambda e: e["judge"].update(weights="x")), "evaluations.0.judge.weights: Extra inputs are not permitted"),
        (_ev(lambda e: e.pop("target")), "evaluations.0.target: Field required"),
        (_ev(lambda e: e.pop("version")), "evaluations.0.version: Field required"),
        (_ev(lambda e: e.update(version=0)), "evaluations.0.version: Input should be greater than or equal to 1"),
        (_ev(lambda e: e.update(version=True)), "evaluations.0.version: Input should be a valid integer"),
        (_ev(lambda e: e.update(version=2.0)), "evaluations.0.version: Input should be a valid integer"),
        (_ev(lambda e: e.update(recorded_at="yesterday")), "evaluations.0.recorded_at: String should match pattern"),
        (_ev(lambda e: e.update(patch_id="F7")), "evaluations.0.patch_id: String should match pattern"),
        (
            _ev(lambda e: e["judge"].update(kind="human")),
            "evaluations.0.judge.kind: Input should be 'toyworld-cnn' or 'clip'",
        ),
        (
            _ev(lambda e: e["model"].update(match="close")),
            "evaluations.0.model.match: Input should be 'exact', 'approx'",
        ),
        (_ev(lambda e: e.update(seeds=[])), "evaluations.0.seeds: List should have at least 1 item"),
        (
            _ev(lambda e: e.update(images_per_prompt=0)),
            "evaluations.0.images_per_prompt: Input should be greater than or equal to 1",
        ),
        (
            _ev(lambda e: e["prompts"]["texts"].pop()),
            "evaluations.0.prompts: Value error, texts has 3 prompts, count says 4",
        ),
        (
            _ev(lambda e: e["prompts"]["texts"].reverse()),
            "evaluations.0.prompts: Value error, sha256 is not the hash of texts",
        ),
        (
            _ev(lambda e: e["robustness"].update(after=2)),
            "evaluations.0.robustness.after: Input should be less than or equal to 1",
        ),
        (lambda m: m.update(evaluations={"0": {}}), "evaluations: Input should be a valid list"),
        (lambda m: m["evaluations"].append(3), "evaluations.1: Input should be a valid dictionary"),
    ],
)
def test_a_malformed_evaluation_is_refused(tmp_path: Path, edit, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PatchFormatError, match=f"invalid manifest field {message}".replace("(", r"\(")) as e:
        load_patch(edit_manifest(EVALUATED, tmp_path / "e.erasepatch", edit))
    assert (
        e.value.fix
        == "a recorded evaluation was edited or damaged; re-create the patch and record its evaluation again"
    )


def test_an_evaluation_of_a_newer_version_is_kept_unread(tmp_path: Path) -> None:
    """A v2 record (new keys, say) does not stop the patch loading: it is kept whole, written back as it came, and
    named in one warning; the v1 records beside it are read as usual."""

    def add_v2(m: dict) -> None:
        m["evaluations"].append(
            dict(
                m["evaluations"][0],
                version=2,
                recorded_at="2027-01-01T00:00:00Z",
                fid=12.5,
                target={"before": 1.0, "after": 0.0, "ci": [0.0, 0.1]},
            )
        )

    p = load_patch(edit_manifest(EVALUATED, tmp_path / "v2.erasepatch", add_v2))
    known, future = p.manifest.evaluations
    assert known == load_patch(EVALUATED).manifest.evaluations[0]
    assert type(future).__name__ == "FutureEvaluation" and future.version == 2
    assert len(p.warnings) == 1 and "1 recorded evaluation(s) use evaluation format v2" in p.warnings[0]
    again = save_patch(p, tmp_path / "again.erasepatch")
    stored = json.loads(split(again)[0]["__metadata__"]["erasekit"])["evaluations"][1]
    assert stored["fid"] == 12.5 and stored["target"]["ci"] == [0.0, 0.1] and stored["version"] == 2
    from erasekit.checkpoints.inspect import inspect_path

    rows = inspect_path(again).evaluations  # type: ignore[union-attr]
    assert [(e.version, e.concept) for e in rows] == [(1, "circle"), (2, None)]


def test_no_evaluations_means_no_key_and_old_bytes(tmp_path: Path) -> None:
    """An empty list is left out, as if the field did not exist: the golden v1 manifest rewrites byte for byte."""
    p = edit_manifest(GOLDEN, tmp_path / "empty.erasepatch", lambda m: m.update(evaluations=[]))
    out = save_patch(load_patch(p), tmp_path / "out.erasepatch")
    assert split(out)[0]["__metadata__"]["erasekit"] == split(GOLDEN)[0]["__metadata__"]["erasekit"]
