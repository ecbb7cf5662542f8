"""Text encoders saved in shards (``model-00001-of-00002.safetensors``, ``model-00002-of-00002.safetensors`` and the
``model.safetensors.index.json`` that maps each tensor to its shard), as the hub ships T5-XXL in every FLUX.1 and
SD3.x folder and as ``save_pretrained`` writes any encoder over its ``max_shard_size``: inspect, diff, apply in place
and revert (each tensor rewritten in its own shard, one journal), apply to a copy, what transformers loads, and the
one-line refusals of shards and an index that disagree.

The models are tiny (:func:`erasekit.testing.make_checkpoint`), re-saved in two shards as transformers writes them:
the tensors in turn to each shard, so the FFN tensors of one layer fall in both."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import test_fault_injection as fi
from conftest import snapshot
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from erasekit.checkpoints.hub import TEXT_ENCODERS, allow_patterns, download_command, resolve_model
from erasekit.cli import app
from erasekit.errors import ErasekitError
from erasekit.testing import add_to_hub_cache, make_checkpoint

runner = CliRunner()
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
INDEX = "model.safetensors.index.json"
# layout -> the encoder folder that is sharded (relative to the model), the architecture, the encoder slot there
CASES = {
    "diffusers-flux": ("text_encoder_2", "flux", "te3"),
    "transformers-clip": ("", "clip-text", "te"),
    "transformers-t5": ("", "t5-text", "te3"),
}


def run(*args: object):  # type: ignore[no-untyped-def]
    return runner.invoke(app, [str(a) for a in args])


def shard(folder: Path, variant: str = "") -> None:
    """Re-save ``folder/model.safetensors`` (``model.VARIANT.safetensors``) as two shards and their index, as
    transformers writes them."""
    stem = f"model.{variant}" if variant else "model"
    shards = [name.replace("model", stem) for name in SHARDS]
    tensors = load_file(str(folder / f"{stem}.safetensors"))
    (folder / f"{stem}.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {name: shards[i % 2] for i, name in enumerate(names)}
    for part in shards:
        save_file({n: tensors[n] for n in names if weight_map[n] == part}, str(folder / part), {"format": "pt"})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    (folder / INDEX.replace("index", f"index.{variant}" if variant else "index")).write_text(
        json.dumps(index, indent=2, sort_keys=True) + "\n"
    )


def models(root: Path, layout: str) -> tuple[Path, Path, Path]:
    """The model of ``layout`` as it is (plain), a copy with its encoder sharded, and an edited plain copy."""
    plain = make_checkpoint(root / "plain", layout, "F16")
    sharded = make_checkpoint(root / "sharded", layout, "F16")
    shard(sharded / CASES[layout][0])
    edited = make_checkpoint(root / "edited", layout, "F16", edit_layers=[1])
    return plain, sharded, edited


def patch_of(root: Path, plain: Path, edited: Path) -> Path:
    out = root / "p.erasepatch"
    r = run("diff", plain, edited, "-o", out)
    assert r.exit_code == 0, r.output
    return out


@pytest.mark.parametrize("layout", list(CASES))
def test_inspect_and_diff_read_a_sharded_encoder_as_the_one_file_it_was(tmp_path: Path, layout: str) -> None:
    sub, arch, slot = CASES[layout]
    plain, sharded, _ = models(tmp_path, layout)
    got = [json.loads(run("inspect", m, "--json").stdout) for m in (plain, sharded)]
    assert got[1]["architecture"] == arch
    assert [e["slot"] for e in got[1]["encoders"]] == [e["slot"] for e in got[0]["encoders"]]
    rows = {e["slot"]: e for e in got[1]["encoders"]}
    assert rows[slot]["file"] == f"{sub}/{INDEX} (2 shards)".lstrip("/")
    assert [{k: v for k, v in e.items() if k != "file"} for e in got[1]["encoders"]] == [
        {k: v for k, v in e.items() if k != "file"} for e in got[0]["encoders"]
    ]
    r = run("diff", plain, sharded, "--json")
    assert r.exit_code == 0, r.output
    changes = json.loads(r.stdout)["changes"]
    assert changes and all(c["relative"] == 0 for c in changes)


@pytest.mark.parametrize("layout", list(CASES))
def test_apply_in_place_rewrites_both_shards_and_revert_restores_every_byte(tmp_path: Path, layout: str) -> None:
    sub, _, _ = CASES[layout]
    plain, sharded, edited = models(tmp_path, layout)
    patch = patch_of(tmp_path, plain, edited)
    before = snapshot(sharded)
    r = run("apply", patch, "--to", sharded, "--in-place")
    assert r.exit_code == 0 and "base fingerprint exact" in r.stdout, r.output
    changed = {name for name, digest in snapshot(sharded).items() if before[name] != digest}
    folder = f"{sub}/" if sub else ""
    assert {f"{folder}{s}" for s in SHARDS} <= changed and f"{folder}{INDEX}" not in changed
    journal = json.loads((sharded / ".erasekit" / "journal.json").read_text())
    assert {f"{folder}{s}" for s in SHARDS} <= set(journal["files"])
    assert {t["file"] for t in journal["entries"][0]["tensors"]} >= {f"{folder}{s}" for s in SHARDS}
    r = run("diff", edited, sharded, "--json")
    assert r.exit_code == 0 and max(c["relative"] for c in json.loads(r.stdout)["changes"]) < 1e-3, r.output
    r = run("inspect", sharded, "--json")
    assert [a["title"] for a in json.loads(r.stdout)["applied"]] == ["edited minus plain"]
    r = run("inspect", patch, "--against", sharded)  # the fingerprints of the bytes below the patch, from the journal
    assert r.exit_code == 0 and "exact; note: patches already applied to it: edited minus plain" in r.stdout, r.output
    r = run("apply", "--revert", patch, "--to", sharded)
    assert r.exit_code == 0 and "sha256 verified" in r.stdout, r.output
    assert snapshot(sharded) == before


@pytest.mark.parametrize("layout", ["diffusers-flux", "transformers-t5"])
def test_apply_to_a_copy_writes_the_same_shards_with_the_patched_tensors(tmp_path: Path, layout: str) -> None:
    sub, _, _ = CASES[layout]
    plain, sharded, edited = models(tmp_path, layout)
    patch = patch_of(tmp_path, plain, edited)
    before = snapshot(sharded)
    r = run("apply", patch, "--to", sharded, "-o", tmp_path / "out")
    assert r.exit_code == 0, r.output
    r = run("apply", patch, "--to", plain, "-o", tmp_path / "out-plain")
    assert r.exit_code == 0, r.output
    assert snapshot(sharded) == before
    out, want = tmp_path / "out" / sub, load_file(str(tmp_path / "out-plain" / sub / "model.safetensors"))
    assert sorted(p.name for p in out.glob("model*")) == sorted([*SHARDS, INDEX])
    assert (out / INDEX).read_bytes() == (sharded / sub / INDEX).read_bytes()
    got = {k: v for s in SHARDS for k, v in load_file(str(out / s)).items()}
    assert sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)
    r = run("inspect", tmp_path / "out", "--json")
    assert [a["title"] for a in json.loads(r.stdout)["applied"]] == ["edited minus plain"]


def test_both_sharded_variants_of_an_sd3_t5_are_patched_and_reverted(tmp_path: Path) -> None:
    """SD3's text_encoder_3 in full precision and as the fp16 variant, each in shards with its own index
    (``model.safetensors.index.fp16.json``): both are patched, as one-file variants are, and both revert."""
    plain = make_checkpoint(tmp_path / "plain", "diffusers-sd3", "F32")
    edited = make_checkpoint(tmp_path / "edited", "diffusers-sd3", "F32", edit_layers=[1])
    patch = patch_of(tmp_path, plain, edited)
    target, half = (make_checkpoint(tmp_path / n, "diffusers-sd3", d) for n, d in (("target", "F32"), ("half", "F16")))
    t5 = target / "text_encoder_3"
    shutil.copyfile(half / "text_encoder_3" / "model.safetensors", t5 / "model.fp16.safetensors")
    shard(t5)
    shard(t5, "fp16")
    r = run("inspect", target, "--json")
    assert [e["file"] for e in json.loads(r.stdout)["encoders"] if e["slot"] == "te3"] == [
        f"text_encoder_3/{INDEX} (2 shards)",
        "text_encoder_3/model.safetensors.index.fp16.json (2 shards)",
    ]
    before = snapshot(target)
    r = run("apply", patch, "--to", target, "--in-place")
    assert r.exit_code == 0 and "base fingerprint approx" in r.stdout, r.output  # the fp16 copy matches roughly
    changed = {name for name, digest in snapshot(target).items() if before[name] != digest}
    assert {n for n in changed if n.startswith("text_encoder_3/")} == {
        f"text_encoder_3/{s.replace('model', m)}" for s in SHARDS for m in ("model", "model.fp16")
    }
    r = run("apply", "--revert", patch, "--to", target)
    assert r.exit_code == 0 and "sha256 verified" in r.stdout, r.output
    assert snapshot(target) == before


def test_transformers_loads_the_patched_shards_as_the_patched_file(tmp_path: Path) -> None:
    import torch
    from transformers import T5EncoderModel

    plain, sharded, edited = models(tmp_path, "transformers-t5")
    patch = patch_of(tmp_path, plain, edited)
    assert run("apply", patch, "--to", sharded, "--in-place").exit_code == 0
    assert run("apply", patch, "--to", plain, "--in-place").exit_code == 0
    got, want = (T5EncoderModel.from_pretrained(str(m)).state_dict() for m in (sharded, plain))
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_shards_saved_by_transformers_apply_and_revert(tmp_path: Path) -> None:
    """What ``save_pretrained(max_shard_size=...)`` writes, not only this file's imitation of it."""
    from transformers import T5EncoderModel

    plain, _, edited = models(tmp_path, "transformers-t5")
    patch = patch_of(tmp_path, plain, edited)
    saved = tmp_path / "saved"
    T5EncoderModel.from_pretrained(str(plain)).to(dtype=__import__("torch").float16).save_pretrained(
        str(saved), max_shard_size="20KB"
    )
    assert len(list(saved.glob("model-*-of-*.safetensors"))) >= 2 and (saved / INDEX).exists()
    before = snapshot(saved)
    r = run("apply", patch, "--to", saved, "--in-place", "--force")
    assert r.exit_code == 0, r.output
    assert snapshot(saved) != before
    r = run("apply", "--revert", patch, "--to", saved)
    assert r.exit_code == 0 and "sha256 verified" in r.stdout, r.output
    assert snapshot(saved) == before


def _lose_index(folder: Path) -> None:
    (folder / INDEX).unlink()


def _lose_shard(folder: Path) -> None:
    (folder / SHARDS[1]).unlink()


def _misplace_a_tensor(folder: Path) -> None:
    index = json.loads((folder / INDEX).read_text())
    key = next(k for k, v in sorted(index["weight_map"].items()) if v == SHARDS[0])
    index["weight_map"][key] = SHARDS[1]
    (folder / INDEX).write_text(json.dumps(index))


def _forget_a_tensor(folder: Path) -> None:
    index = json.loads((folder / INDEX).read_text())
    del index["weight_map"][sorted(index["weight_map"])[0]]
    (folder / INDEX).write_text(json.dumps(index))


def _add_a_stray_shard(folder: Path) -> None:
    shutil.copyfile(folder / SHARDS[1], folder / "model-00003-of-00003.safetensors")


def _point_outside(folder: Path) -> None:
    index = json.loads((folder / INDEX).read_text())
    index["weight_map"] = {k: f"../{v}" for k, v in index["weight_map"].items()}
    (folder / INDEX).write_text(json.dumps(index))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            _add_a_stray_shard,
            "{d}/{i} does not name model-00003-of-00003.safetensors, which lies beside it; remove the stray shards, "
            "or re-download the index file with its shards",
        ),
        (
            _point_outside,
            "{d}/{i} names '../{s0}' as a shard, which is not a .safetensors file beside it; re-download the shards "
            "with the index file",
        ),
        (
            _lose_index,
            "{d} has {s0} and {s1} but no {i}; re-download the index file with the shards",
        ),
        (_lose_shard, "{d}/{i} names the shard {s1}, which is missing; re-download the shards with the index file"),
        (
            _misplace_a_tensor,
            "{d}/{i} puts tensor {k} in {s1}, which lacks it; re-download the shards with the index file",
        ),
        (
            _forget_a_tensor,
            "{d}/{s0} holds tensor {k}, which {i} does not put there; re-download the shards with the index file",
        ),
    ],
)
def test_shards_and_an_index_that_disagree_are_refused_in_one_line(tmp_path: Path, damage, message: str) -> None:  # type: ignore[no-untyped-def]
    plain, sharded, edited = models(tmp_path, "diffusers-flux")
    patch = patch_of(tmp_path, plain, edited)
    folder = sharded / "text_encoder_2"
    first = sorted(json.loads((folder / INDEX).read_text())["weight_map"])[0]
    damage(folder)
    before = snapshot(sharded)
    want = message.format(d=folder, i=INDEX, s0=SHARDS[0], s1=SHARDS[1], k=first)
    for args in (("inspect", sharded), ("apply", patch, "--to", sharded, "--in-place")):
        r = run(*args)
        assert r.exit_code == 4 and r.stderr == f"error: {want}\n", r.output
    r = run("apply", patch, "--to", sharded, "-o", tmp_path / "out")
    assert r.exit_code == 4 and r.stderr == f"error: {want}\n", r.output
    assert snapshot(sharded) == before and not (sharded / ".erasekit").exists()
    assert not (tmp_path / "out").exists()


def test_a_shard_named_alone_and_pickle_shards_are_refused_in_one_line(tmp_path: Path) -> None:
    _, sharded, _ = models(tmp_path, "transformers-t5")
    r = run("inspect", sharded / SHARDS[1])
    assert r.exit_code == 4 and r.stderr == (
        f"error: {sharded / SHARDS[1]} is one shard of a model saved in shards; name the folder that holds all "
        f"its shards and their index ({sharded})\n"
    )
    pickled = make_checkpoint(tmp_path / "pickled", "transformers-t5", "F16")
    (pickled / "model.safetensors").unlink()
    for name in (
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin",
        "pytorch_model.bin.index.json",
    ):
        (pickled / name).write_bytes(b"")
    r = run("inspect", pickled)
    assert r.exit_code == 4 and r.stderr == (
        f"error: {pickled} holds a text encoder in pickle shards (pytorch_model-00001-of-00002.bin and "
        "pytorch_model-00002-of-00002.bin), which erasekit does not read; download its safetensors shards and "
        "model.safetensors.index.json instead, or save it with save_pretrained(safe_serialization=True)\n"
    )


@pytest.fixture(scope="module")
def sharded_inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A FLUX.1 folder whose T5 is sharded, the patch p (layer 1), and the folder with p2 (layer 0) and p applied
    in place (to revert p, as tests/test_fault_injection.py does)."""
    from erasekit.checkpoints.apply import apply_to_checkpoint
    from erasekit.checkpoints.diff import diff_checkpoints

    root, made = tmp_path_factory.mktemp("sharded"), tmp_path_factory.mktemp("made")
    plain, sharded, edited = models(made, "diffusers-flux")
    patch = patch_of(root, plain, edited)
    other = make_checkpoint(made / "other", "diffusers-flux", "F16", edit_layers=[0], edit_seed=1)
    diff_checkpoints(plain, other, output=root / "p2.erasepatch", title="p2")
    shutil.copytree(sharded, root / "folder")
    shutil.copytree(sharded, root / "applied")
    apply_to_checkpoint([root / "p2.erasepatch", patch], root / "applied", in_place=True)
    return root


FAULT_CASES = [
    fi.Case(
        "apply-sharded",
        lambda r: ["apply", f"{r}/p.erasepatch", "--to", f"{r}/folder", "--in-place"],
        fi.in_place_state("folder"),
        in_place=True,
    ),
    fi.Case(
        "revert-sharded",
        lambda r: ["apply", "--revert", f"{r}/p.erasepatch", "--to", f"{r}/applied"],
        fi.in_place_state("applied"),
        in_place=True,
    ),
    fi.Case(
        "apply-o-sharded",
        lambda r: ["apply", f"{r}/p.erasepatch", "--to", f"{r}/folder", "-o", f"{r}/out"],
        fi.output_state("out", "folder"),
        in_place=False,
    ),
]


@pytest.mark.parametrize("case", FAULT_CASES, ids=[c.name for c in FAULT_CASES])
def test_a_fault_at_any_call_leaves_the_shards_before_or_after(
    case: fi.Case, sharded_inputs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tests/test_fault_injection.py's check, on a folder whose T5 is sharded: every write, fsync, rename and copy
    failing or the process dying there leaves every shard, the index and the journal as before or as after once
    the next command ran (``ERASEKIT_FAULTS=all``: every call)."""
    fi.test_a_fault_at_any_call_leaves_the_files_before_or_after(case, sharded_inputs, tmp_path, monkeypatch)


def test_a_model_id_downloads_the_shards_of_one_variant_with_their_index(tmp_path: Path) -> None:
    """SD3's text_encoder_3 as the hub has it: fp16 shards (``model.fp16-00001-of-00002.safetensors``) and their
    index ``model.safetensors.index.fp16.json``, maybe beside full-precision ones."""
    enc = "text_encoder_3/"
    plain = [f"{enc}{s}" for s in (*SHARDS, INDEX)]
    fp16 = [f"{enc}model.fp16-0000{i}-of-00002.safetensors" for i in (1, 2)] + [
        f"{enc}model.safetensors.index.fp16.json"
    ]
    common = ["model_index.json", f"{enc}config.json"]
    assert allow_patterns([*common, *plain, *fp16], TEXT_ENCODERS) == sorted([*common, *fp16])
    assert allow_patterns([*common, *plain], TEXT_ENCODERS) == sorted([*common, *plain])


def test_a_model_id_in_the_cache_with_a_sharded_t5_is_read_and_copied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    plain, sharded, edited = models(tmp_path, "diffusers-flux")
    patch = patch_of(tmp_path, plain, edited)
    hub = tmp_path / "hub"
    add_to_hub_cache(hub, "org/flux", sharded, commit="3" * 40)
    for name, value in (("HF_HUB_CACHE", str(hub)), ("HF_HUB_OFFLINE", True)):
        monkeypatch.setenv(name, str(value) if name == "HF_HUB_CACHE" else "1")
        monkeypatch.setattr(constants, name, value)
    r = run("diff", "org/flux", plain, "--json")
    assert r.exit_code == 0 and all(c["relative"] == 0 for c in json.loads(r.stdout)["changes"]), r.output
    cached = snapshot(hub)
    r = run("apply", patch, "--to", "org/flux", "--in-place")
    assert r.exit_code == 7 and "shared file of the Hugging Face cache" in r.stderr, r.output
    r = run("apply", patch, "--to", "org/flux", "-o", tmp_path / "copy")
    assert r.exit_code == 0, r.output
    assert snapshot(hub) == cached and sorted(
        p.name for p in (tmp_path / "copy" / "text_encoder_2").glob("model*")
    ) == sorted([*SHARDS, INDEX])


def test_a_cached_download_cut_off_after_one_of_two_shards_is_incomplete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A download of FLUX.1's sharded T5 cut off after its first shard: the component has a weight file, but not every
    shard its index names, so the model is not taken as in the cache (offline, the error says what it lacks)."""
    from huggingface_hub import constants

    _, sharded, _ = models(tmp_path, "diffusers-flux")
    hub = tmp_path / "hub"
    snap = add_to_hub_cache(hub, "org/flux", sharded, commit="3" * 40)
    for name, value in (("HF_HUB_CACHE", str(hub)), ("HF_HUB_OFFLINE", True)):
        monkeypatch.setenv(name, str(value) if name == "HF_HUB_CACHE" else "1")
        monkeypatch.setattr(constants, name, value)
    assert resolve_model("org/flux", TEXT_ENCODERS) == snap
    (snap / "text_encoder_2" / SHARDS[1]).unlink()
    with pytest.raises(ErasekitError) as e:
        resolve_model("org/flux", TEXT_ENCODERS)
    assert str(e.value) == (
        "org/flux lacks text_encoder_2 in the Hugging Face cache, and downloads are off (HF_HUB_OFFLINE); download "
        f"it once online: {download_command('org/flux', None, TEXT_ENCODERS)}"
    )


def every_file(root: Path) -> dict[str, bytes]:
    """Every file under ``root``, the undo journal included."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _swap(folder: Path, a: str, b: str) -> None:
    (folder / a).rename(folder / "swapping")
    (folder / b).rename(folder / a)
    (folder / "swapping").rename(folder / b)


def _swap_in_index(folder: Path) -> None:
    index = json.loads((folder / INDEX).read_text())
    index["weight_map"] = {k: SHARDS[1 - SHARDS.index(v)] for k, v in index["weight_map"].items()}
    (folder / INDEX).write_text(json.dumps(index))


@pytest.mark.parametrize("index_too", [False, True], ids=["names", "names-and-index"])
def test_shards_whose_names_were_swapped_are_refused_and_swapping_them_back_restores_the_journal(
    tmp_path: Path, index_too: bool
) -> None:
    """Two shards of a checkpoint with a patch applied in place swap names (and their index with them, or not):
    every command says so in one line and changes no byte (the journal is not set aside), and once their names are
    swapped back the patch reverts bit for bit."""
    plain, sharded, edited = models(tmp_path, "transformers-t5")
    patch = patch_of(tmp_path, plain, edited)
    pristine = snapshot(sharded)
    assert run("apply", patch, "--to", sharded, "--in-place").exit_code == 0
    _swap(sharded, *SHARDS)
    if index_too:
        _swap_in_index(sharded)
    before = every_file(sharded)
    want = (
        f"error: {SHARDS[0]} of {sharded} is the file its undo journal knows as {SHARDS[1]} and the other way round: "
        "their names were swapped since patches were applied in place; nothing was written; swap their names back "
        "(in the index file too, where one names them) to revert or apply patches there\n"
        if index_too
        else f"error: {sharded}/{INDEX} puts the tensors that {SHARDS[1]} holds in {SHARDS[0]} and the other way "
        "round: their names were swapped; swap the shards' names back\n"
    )
    for args in (
        ("inspect", sharded),
        ("inspect", patch, "--against", sharded),
        ("apply", patch, "--to", sharded, "--in-place"),
        ("apply", "--revert", patch, "--to", sharded),
    ):
        r = run(*args)
        assert r.exit_code != 0 and r.stderr == want, r.output
        assert every_file(sharded) == before
    _swap(sharded, *SHARDS)
    if index_too:
        _swap_in_index(sharded)
    r = run("apply", "--revert", patch, "--to", sharded)
    assert r.exit_code == 0 and "sha256 verified" in r.stdout, r.output
    assert snapshot(sharded) == {**pristine, INDEX: snapshot(sharded)[INDEX]}


def test_two_index_files_naming_the_same_shards_read_write_and_journal_them_once(tmp_path: Path) -> None:
    """A copy of the index under a variant's name (both agree with the shards): the shards are one file, each
    tensor is rewritten and journaled once, and revert restores every byte."""
    plain, sharded, edited = models(tmp_path, "transformers-t5")
    patch = patch_of(tmp_path, plain, edited)
    shutil.copyfile(sharded / INDEX, sharded / "model.safetensors.index.fp16.json")
    before = snapshot(sharded)
    r = run("inspect", sharded, "--json")
    assert r.exit_code == 0 and [e["file"] for e in json.loads(r.stdout)["encoders"]] == [f"{INDEX} (2 shards)"]
    r = run("apply", patch, "--to", sharded, "--in-place")
    assert r.exit_code == 0 and "3 tensors" in r.stdout, r.output
    tensors = json.loads((sharded / ".erasekit" / "journal.json").read_text())["entries"][0]["tensors"]
    assert len(tensors) == len({(t["file"], t["key"]) for t in tensors}) == 3
    assert run("apply", "--revert", patch, "--to", sharded).exit_code == 0
    assert snapshot(sharded) == before


def test_two_index_files_that_share_some_shards_are_refused_in_one_line(tmp_path: Path) -> None:
    plain, sharded, edited = models(tmp_path, "transformers-t5")
    patch = patch_of(tmp_path, plain, edited)
    third = "model-00003-of-00003.safetensors"
    shutil.copyfile(sharded / SHARDS[1], sharded / third)
    index = json.loads((sharded / INDEX).read_text())
    index["weight_map"] = {k: third if v == SHARDS[1] else v for k, v in index["weight_map"].items()}
    (sharded / "model.safetensors.index.fp16.json").write_text(json.dumps(index))
    before = snapshot(sharded)
    r = run("apply", patch, "--to", sharded, "--in-place")
    assert r.exit_code == 4 and r.stderr == (
        f"error: {sharded / INDEX} and model.safetensors.index.fp16.json both name the shard {SHARDS[0]}, but not the "
        "same shards; remove the index file that is not the model's\n"
    ), r.output
    assert snapshot(sharded) == before and not (sharded / ".erasekit").exists()


def _sparse_t5_xxl_blocks(path: Path, blocks: int) -> None:
    """A safetensors file of the FFN tensors of a T5 v1.1 XXL's first ``blocks`` blocks, as its first shard holds
    them: the header as it would be, the data a hole (a sparse file: nothing but the header is read)."""
    header, offset = {}, 0
    for i in range(blocks):
        for proj, shape in (("wi_0", [10240, 4096]), ("wi_1", [10240, 4096]), ("wo", [4096, 10240])):
            size = 2 * shape[0] * shape[1]
            header[f"encoder.block.{i}.layer.1.DenseReluDense.{proj}.weight"] = {
                "dtype": "F16",
                "shape": shape,
                "data_offsets": [offset, offset + size],
            }
            offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + offset)


def test_a_first_shard_on_its_own_is_refused_not_read_as_an_encoder_of_fewer_layers(tmp_path: Path) -> None:
    """The first shard renamed ``model.safetensors`` (the others and the index gone) holds the first layers only:
    refused in one line (fewer layers than its config.json names), every file as it was; so is such a shard on its
    own where no config says how many layers (a T5 v1.1 XXL's widths with fewer than its 24 blocks)."""
    plain, _, edited = models(tmp_path, "transformers-t5")
    patch = patch_of(tmp_path, plain, edited)
    folder = shutil.copytree(plain, tmp_path / "renamed")
    tensors = load_file(str(folder / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if ".block.1." not in k}, str(folder / "model.safetensors"))
    before = snapshot(folder)
    want = (
        f"error: {folder}/model.safetensors holds 1 of the 2 layers its config.json names (no "
        "encoder.block.1.layer.1.DenseReluDense.wi_0.weight): it is a part of a model saved in shards (a shard "
        "renamed, or left without the others?); put all its shards back beside their index file "
        "(model.safetensors.index.json), or download them again\n"
    )
    for args in (("inspect", folder), ("apply", patch, "--to", folder, "--in-place")):
        r = run(*args)
        assert r.exit_code == 4 and r.stderr == want, r.output
    assert snapshot(folder) == before and not (folder / ".erasekit").exists()
    alone = tmp_path / "t5xxl_fp16.safetensors"
    _sparse_t5_xxl_blocks(alone, 1)
    r = run("inspect", alone)
    assert r.exit_code == 4 and r.stderr == (
        f"error: {alone} holds 1 of the 24 layers a T5 v1.1 XXL has (no encoder.block.1.layer.1.DenseReluDense.wi_0."
        "weight): it is a part of a model saved in shards (a shard renamed, or left without the others?); name the "
        "whole encoder's file, or the folder that holds all its shards and their index\n"
    ), r.output


def test_a_refused_apply_in_place_leaves_an_undo_record_no_entry_names(tmp_path: Path) -> None:
    """An undo record no entry names (a copy of one, as a killed revert leaves) is garbage the next writer deletes;
    a command refused before it writes leaves it, as every other file, as it was; the next one that writes (here a
    revert) deletes it."""
    plain, sharded, edited = models(tmp_path, "transformers-t5")
    patch = patch_of(tmp_path, plain, edited)
    assert run("apply", patch, "--to", sharded, "--in-place").exit_code == 0
    shutil.copy(sharded / ".erasekit" / "0001.undo", sharded / ".erasekit" / "0099.undo")
    before = every_file(sharded)
    r = run("apply", patch, "--to", sharded, "--in-place")
    assert r.exit_code == 1, r.output
    assert r.stderr == (
        f"error: patch 'edited minus plain' is already applied to {sharded} [transformers-t5 (t5-text)] (journal entry "
        "0001); revert it first, or force it to apply it once more (--force)\n"
    )
    assert every_file(sharded) == before
    r = run("apply", "--revert", patch, "--to", sharded)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (sharded / ".erasekit").glob("*.undo")) == []


def test_after_a_touch_one_command_hashes_each_tensor_once_and_inspect_stamps_the_files_anew(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files with a patch in place written since the journal stamped them (touched: a copy, a backup tool) have the
    tensors the patch wrote hashed against the journal: by one command once each, however many times it reads the
    journal; and once only, as inspect (a reader that can take the lock) stamps them anew, so the next hashes none."""
    import os

    import erasekit.checkpoints.journal as journal_module

    plain, sharded, edited = models(tmp_path, "transformers-t5")
    patch = patch_of(tmp_path, plain, edited)
    assert run("apply", patch, "--to", sharded, "--in-place").exit_code == 0
    tensors = len(json.loads((sharded / ".erasekit" / "journal.json").read_text())["entries"][0]["tensors"])
    hashed: list[int] = []
    real = journal_module.sha256
    monkeypatch.setattr(journal_module, "sha256", lambda data: hashed.append(len(data)) or real(data))

    def hashes(*args: object, code: int = 0) -> int:
        hashed.clear()
        r = run(*args)
        assert r.exit_code == code, r.output
        return len(hashed)

    def touch(ns: int) -> None:
        for name in SHARDS:
            os.utime(sharded / name, ns=(ns, ns))

    touch(10**18)
    before = every_file(sharded)
    assert hashes("apply", patch, "--to", sharded, "--in-place", code=1) == tensors  # refused: changes no file
    assert every_file(sharded) == before
    assert hashes("diff", sharded, plain) == tensors
    touch(2 * 10**18)
    assert [hashes("inspect", sharded), hashes("inspect", sharded)] == [tensors, 0]
    stamps = json.loads((sharded / ".erasekit" / "journal.json").read_text())["files"]
    assert {name: stamps[name]["mtime_ns"] for name in SHARDS} == {name: 2 * 10**18 for name in SHARDS}
