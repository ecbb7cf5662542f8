"""Apply patches to checkpoint files and revert them bit for bit (in-memory models: :mod:`erasekit.checkpoints.memory`).

The arithmetic is one line: ``W' = round_to_dtype(float32(W) + strength * delta)``. Because
``(W + d) - d != W`` in floating point, a revert on disk subtracts and then puts back, from the undo
record, every element the subtraction misses (or restores the original bytes, where the record holding
them is smaller); in memory it restores a clone kept on the model. Either way the result is checked
against the original sha256.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import _temps
from .._parallel import map_threads
from ..errors import (
    ErasekitError,
    NonFiniteError,
    NotAppliedError,
    RevertOrderError,
    TargetNotWritableError,
    UndoRecordError,
)
from ..format import _st
from ..format.patchfile import Patch, compare_fingerprint, fingerprint, load_patch, now_iso
from .compat import (
    STATUS_RANK,
    FingerprintStatus,
    Stacked,
    Touch,
    applied_twice,
    crossing_note,
    judge_fingerprints,
    merged_parts,
    order_notes,
    slot_map,
    touches,
)
from .hub import in_hub_cache, resolve_model
from .in_place import applied_in_place, journal_of, read_consistently, tensor_places
from .journal import DIRNAME, SET_ASIDE, Entry, Journal, TensorAt, copy_journal, journal_dir, named_undo_files
from .layouts import Checkpoint, WeightFile, check_ffn_dtypes, check_patchable, detect
from .undo_record import (
    DeltaParts,
    TensorRecord,
    UndoTensor,
    added,
    delta_of,
    residual_fits,
    scaled,
    sha256,
    undo_record,
)


@dataclass
class AppliedPatch:
    title: str
    patch_id: str
    strength: float
    tensors: int
    fingerprint: FingerprintStatus
    differing: int = 0


@dataclass
class ApplyReport:
    target: str
    layout: str
    architecture: str
    output: str
    in_place: bool
    applied: list[AppliedPatch]
    bytes_written: int
    seconds: float
    warnings: list[str] = field(default_factory=list)


@dataclass
class RevertReport:
    target: str
    layout: str
    title: str
    patch_id: str
    tensors: int
    verified: bool
    seconds: float
    remaining: list[str] = field(default_factory=list)


def as_patch(p: Patch | str | os.PathLike) -> Patch:
    return p if isinstance(p, Patch) else load_patch(p)


def per_patch_strengths(n: int, strength: float | Sequence[float]) -> list[float]:
    """One strength for each of ``n`` patches, from one for all (a number, or a list of one) or one per patch."""
    values = [float(strength)] if isinstance(strength, (int, float)) else [float(s) for s in strength]
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise ErasekitError(
            f"{len(values)} strengths for {n} patches", "give one strength per patch, or one for all", option="strength"
        )
    return values


# -- files ------------------------------------------------------------------------------------------


def _check_finite(raw: bytes, dtype: str, strength: float, what: str) -> None:
    if not _finite(raw, dtype):
        raise NonFiniteError(
            f"applying at strength {strength} makes {what} non-finite; nothing was written",
            "use a smaller strength",
            option="strength",
        )


def _finite(raw: bytes, dtype: str) -> bool:
    """No inf or NaN; 16-bit floats are judged by their exponent bits (numpy's isfinite on float16 is slow)."""
    if dtype in ("F16", "BF16"):
        exponent = np.uint16(0x7C00 if dtype == "F16" else 0x7F80)
        return not ((np.frombuffer(raw, "<u2") & exponent) == exponent).any()
    return bool(np.isfinite(_st.to_numpy(raw, dtype, (-1,))).all())


def _delta_parts(patch: Patch, module: str, kind: str) -> DeltaParts:
    """The patch tensors one delta is made of, as the patch stores them (docs/format.md §3)."""
    if kind == "bias":
        names = {"diff": f"{module}.diff_b"}
    elif patch.manifest.deltas[module].storage == "dense":
        names = {"diff": f"{module}.diff"}
    else:
        names = {
            "lora_up": f"{module}.lora_up.weight",
            "lora_down": f"{module}.lora_down.weight",
            "alpha": f"{module}.alpha",
        }
    return {part: (patch.dtypes[n], patch.tensors[n]) for part, n in names.items()}


@dataclass
class _Rewrite:
    """One tensor an apply changes: its bytes before and after, their hashes, its undo record."""

    wf: WeightFile
    key: str
    touch: Touch
    before: bytes = b""
    before_sha: str = ""
    after: bytes = b""
    after_sha: str = ""
    record: UndoTensor | None = None


def _rewrite_job(wf: WeightFile, touch: Touch) -> _Rewrite:
    """The rewrite of the tensor ``touch`` changes in ``wf``, in the file on disk that holds it (a shard of a
    sharded file)."""
    key = wf.encoders[touch.slot].key(touch.layer, touch.proj, touch.kind)
    return _Rewrite(wf.part(key), key, touch)


def _rewrite(job: _Rewrite, patch: Patch, strength: float, state: dict[tuple[str, str], bytes]) -> _Rewrite:
    k, ent = (job.wf.label, job.key), job.wf.header.entries[job.key]
    job.before = state[k] if k in state else job.wf.read_raw(job.key)
    parts = _delta_parts(patch, job.touch.module, job.touch.kind)
    check_patchable(ent.dtype, f"{job.wf.display}: tensor {job.key}")
    term = scaled(delta_of(parts), strength)
    job.after, misses = added(job.before, ent, term, inverted=residual_fits(ent, parts))
    _check_finite(job.after, ent.dtype, strength, job.key)
    job.before_sha, job.after_sha = sha256(job.before), sha256(job.after)
    job.record = undo_record(job.before, job.after, ent, parts, misses)
    return job


@dataclass
class _Plan:
    patch: Patch
    strength: float
    status: FingerprintStatus
    differing: int
    rewrites: list[_Rewrite]

    @property
    def updates(self) -> dict[tuple[str, str], bytes]:
        return {(r.wf.label, r.key): r.after for r in self.rewrites}


def _plan(
    ckpt: Checkpoint,
    journal: Journal,
    patch: Patch,
    strength: float,
    force: bool,
    where: str,
    state: dict[tuple[str, str], bytes],
    pristines: dict[tuple[str, str], bytes],
    tensor_at: TensorAt,
    earlier: Sequence[Patch] = (),
) -> _Plan:
    """Everything an apply will write, computed before anything is written. ``state``: the bytes after the earlier
    patches of this command (``earlier``); ``pristines``: each tensor as it was before any erasekit patch, filled
    in here."""
    _refuse_twice(journal, patch, earlier, force, where)
    tlist = touches(patch, slot_map(patch, ckpt.architecture, ckpt.encoders, where))
    jobs = [_rewrite_job(wf, t) for wf in ckpt.files for t in tlist if t.slot in wf.encoders]
    jobs = map_threads(lambda j: _rewrite(j, patch, strength, state), jobs)
    _check_as_left(journal, [j for j in jobs if (j.wf.label, j.key) not in state], where)
    fps: dict[str, Any] = {}
    for job in jobs:
        k, ent, name = (job.wf.label, job.key), job.wf.header.entries[job.key], f"{job.touch.module}.{job.touch.kind}"
        # the fingerprint is checked against the tensor as it was before any erasekit patch
        if k not in pristines:
            pristines[k] = journal.pristine(*k, job.before, tensor_at) or job.before
        base, known = patch.manifest.base.tensors[name], job.before_sha if pristines[k] is job.before else None
        fp = fingerprint(
            pristines[k], ent.dtype, ent.shape, sha256=known, sketch=ent.dtype != base.dtype
        )  # same dtype: the hash alone decides
        # across variant files the least favourable status counts: an fp16 variant that matches only
        # approximately makes the whole apply "approx", one that differs makes it "differs"
        if (
            name not in fps
            or STATUS_RANK[compare_fingerprint(base, fp)] > STATUS_RANK[compare_fingerprint(base, fps[name])]
        ):
            fps[name] = fp
    status, differing = judge_fingerprints(patch, fps, force, where)
    return _Plan(patch, strength, status, differing, jobs)


def _refuse_twice(journal: Journal, patch: Patch, earlier: Sequence[Patch], force: bool, where: str) -> None:
    """Refuse (unless forced) a patch already applied or given twice in this command, or that would apply one twice:
    a merged patch that contains one applied (in the journal, or earlier in this command), or one contained in a
    merged patch applied."""
    twice = [e.id for e in journal.committed if e.patch_id == patch.patch_id]
    if twice and not force:
        raise ErasekitError(
            f"patch '{patch.title}' is already applied to {where} (journal entry {twice[0]})",
            "revert it first, or force it to apply it once more",
            option="force",
        )
    if any(p.patch_id == patch.patch_id for p in earlier) and not force:
        raise ErasekitError(
            f"patch '{patch.title}' is given twice to apply to {where}",
            "give it once (its strength sets how much it changes), or force it to apply it twice",
            option="force",
        )
    applied = [Stacked(e.patch_id, e.patch_title, e.parts) for e in journal.committed]
    clash = applied_twice(Stacked.of(patch), applied, f"already applied to {where}", forcible=True)
    inner = applied_twice(Stacked.of(patch), [Stacked.of(p) for p in earlier], f"applied to {where} by this command")
    if clash is None and inner is not None:
        clash = (inner[0], "apply only one of them, or force it to apply it twice")
    if clash and not force:
        raise ErasekitError(*clash, option="force")


def _check_as_left(journal: Journal, jobs: list[_Rewrite], where: str) -> None:
    """Refuse to stack a patch on tensors that another program changed since the patch applied before it last
    changed them: their bytes from before any patch, rebuilt from the undo records, would not be what the file
    holds, and reverting that patch would fail. Only the tensors the new patch touches are checked (their hashes
    are at hand)."""
    last = journal.last_changes()
    changed = [(j.key, last[k][0]) for j in jobs if (k := (j.wf.label, j.key)) in last and j.before_sha != last[k][1]]
    if changed:
        entry = changed[0][1]
        keys = list(dict.fromkeys(key for key, e in changed if e is entry))
        shown = ", ".join(keys[:2]) + (f" and {len(keys) - 2} more" if len(keys) > 2 else "")
        raise UndoRecordError(
            f"{len(keys)} tensors of {where} changed since '{entry.patch_title}' was applied ({shown}); nothing "
            "was written",
            f"revert '{entry.patch_title}' forcing it (it restores the bytes from before it), or restore the file",
        )


def _apply_in_place(
    ckpt: Checkpoint, patches: list[Patch], strengths: list[float], force: bool, where: str
) -> tuple[list[AppliedPatch], int]:
    journal = journal_of(ckpt)
    tensor_at = tensor_places(ckpt)
    with journal.locked():
        journal.reconcile(tensor_at, stamp=False)  # a refusal below leaves journal.json as it is
        state: dict[tuple[str, str], bytes] = {}  # bytes after the earlier patches of this call
        pristines: dict[tuple[str, str], bytes] = {}
        plans: list[_Plan] = []
        for patch, strength in zip(patches, strengths):
            plans.append(
                _plan(ckpt, journal, patch, strength, force, where, state, pristines, tensor_at, patches[: len(plans)])
            )
            state.update(plans[-1].updates)
        first = int(journal.next_id())
        journal.commit(
            [(_entry(f"{first + i:04d}", plan), _records(plan), plan.updates) for i, plan in enumerate(plans)],
            tensor_at,
        )
    results = [
        AppliedPatch(p.patch.title, p.patch.patch_id, p.strength, len(p.rewrites), p.status, p.differing) for p in plans
    ]
    return results, sum(len(r.after) for p in plans for r in p.rewrites)


def _entry(entry_id: str, plan: _Plan) -> Entry:
    return Entry(
        id=entry_id,
        state="pending",
        patch_id=plan.patch.patch_id,
        patch_title=plan.patch.title,
        patch_path=str(plan.patch.path) if plan.patch.path else None,
        strength=plan.strength,
        fingerprint=plan.status,
        applied_at=now_iso(),
        parts=merged_parts(plan.patch),
        tensors=[
            TensorRecord(file=r.wf.label, key=r.key, before_sha256=r.before_sha, after_sha256=r.after_sha)
            for r in plan.rewrites
        ],
    )


def _records(plan: _Plan) -> dict[tuple[str, str], UndoTensor]:
    return {(r.wf.label, r.key): r.record for r in plan.rewrites if r.record is not None}


def _owning_folder(ckpt: Checkpoint) -> Path | None:
    """The folder checkpoint whose journal covers ``ckpt``'s weight files, if it is not ``ckpt`` itself: the
    diffusers pipeline ``F`` of a component ``F/text_encoder``, or the folder (or its pipeline) of a weight file
    ``F/text_encoder/model.safetensors``."""
    path = ckpt.path.resolve()
    if path.is_dir():
        return _pipeline_of(path)
    folder = path.parent
    if not ((folder / "config.json").is_file() or (folder / "model_index.json").is_file()):
        return None
    try:
        owner = detect(folder)
    except ErasekitError:
        return None
    if not any(wf.path.resolve() == path for wf in owner.disk_files):
        return None
    return _pipeline_of(folder) or folder


def _pipeline_of(folder: Path) -> Path | None:
    index = folder.parent / "model_index.json"
    try:
        return folder.parent if index.is_file() and folder.name in json.loads(index.read_text()) else None
    except (OSError, ValueError, RecursionError):
        return None


def _check_writable(ckpt: Checkpoint) -> None:
    owner = _owning_folder(ckpt)
    if owner is not None:  # one journal per weight file: the folder's
        what = (
            f"the {ckpt.path.resolve().name} of the diffusers pipeline"
            if ckpt.path.is_dir()
            else "a weight file of the model folder"
        )
        raise TargetNotWritableError(
            f"{ckpt.path} is {what} {owner}, whose undo journal covers its weight files",
            f"apply to (or revert from) {owner} instead, or write a copy to an output",
            option="output",
        )
    for wf in ckpt.disk_files:
        if wf.format == "pickle":
            raise TargetNotWritableError(
                f"{wf.path} is a pickle and cannot be patched in place",
                "write a converted copy to an output OUT.safetensors",
                option="output",
            )
        if in_hub_cache(wf.path):
            raise TargetNotWritableError(
                f"{wf.path} is a shared file of the Hugging Face cache (a link to a "
                "content-addressed blob that other snapshots share)",
                "write a patched copy to an output instead of in place",
                option="output",
            )
        if not os.access(wf.path, os.W_OK):
            raise TargetNotWritableError(
                f"{wf.path} is read-only", "make it writable, or write a copy to an output", option="output"
            )


def _pickle_to_safetensors(src: Path, dst: Path) -> None:
    from .._torch import dtype_code, tensor_bytes
    from .layouts import load_pickle_state_dict

    sd = load_pickle_state_dict(src)
    _st.write_safetensors(
        dst, {k: (dtype_code(v.dtype), tuple(v.shape), tensor_bytes(v)) for k, v in sd.items()}, {"format": "pt"}
    )


def _stage_copy(ckpt: Checkpoint, out: Path) -> Path:
    """Copy the checkpoint (and its journal) to a hidden temporary beside ``out``; pickles become safetensors. The
    temporaries (and their journals) of an earlier run that was killed are removed first. The copy is of one state
    of the checkpoint: an in-place apply or revert of the source that saves its journal while the copy is made
    makes it copy again (:func:`read_consistently`)."""
    for stale in _temps.remove_stale(out):
        shutil.rmtree(journal_dir(stale), ignore_errors=True)

    def copy() -> Path:
        tmp = out.parent / f"{_temps.prefix(out)}{secrets.token_hex(4)}{_temps.SUFFIX}"
        try:
            _copy(ckpt, tmp)
        except BaseException as e:
            _remove_staged(tmp)
            if isinstance(e, PermissionError):
                raise TargetNotWritableError(
                    f"cannot copy {ckpt.path} to {out.parent} ({e.strerror}: {e.filename})",
                    "check the permissions of both",
                    option="output",
                ) from None
            raise
        return tmp

    return read_consistently(ckpt, copy, discard=_remove_staged, stamp=False)


def _copy(ckpt: Checkpoint, tmp: Path) -> None:
    if ckpt.path.is_dir():
        shutil.copytree(ckpt.path, tmp, ignore=_not_the_journal_lock)
        for wf in ckpt.files:
            if wf.format == "pickle":
                staged = tmp / wf.label
                _pickle_to_safetensors(
                    staged,
                    staged.with_name(
                        staged.name.replace("pytorch_model", "model").removesuffix(".bin") + ".safetensors"
                    ),
                )
                staged.unlink()
    elif ckpt.files[0].format == "pickle":
        _pickle_to_safetensors(ckpt.path, tmp)
    else:
        shutil.copyfile(ckpt.path, tmp)
        copy_journal(ckpt.path, journal_dir(tmp))


def _not_the_journal_lock(folder: str, names: list[str]) -> list[str]:
    """What a copy of a checkpoint folder leaves out of its journal folder: the lock, set-aside journals and undo
    records no entry names."""
    if Path(folder).name != DIRNAME:
        return []
    named = named_undo_files(Path(folder))
    return [n for n in names if n == "lock" or n.startswith(SET_ASIDE) or (n.endswith(".undo") and n not in named)]


def _remove_staged(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    if not tmp.is_dir():
        shutil.rmtree(journal_dir(tmp), ignore_errors=True)
        with contextlib.suppress(OSError):  # the output folder's .erasekit, if the copy made it
            journal_dir(tmp).parent.rmdir()


def _publish(tmp: Path, out: Path) -> None:
    """Rename the staged copy (and a single file's journal) onto ``out`` (a file another program holds open is
    named in one line: :func:`erasekit.format._st.replace`)."""
    if tmp.is_dir():
        _st.replace(tmp, out)
    else:
        journal = journal_dir(out)
        if journal.exists():
            shutil.rmtree(journal)
        _st.replace(journal_dir(tmp), journal)
        try:
            _st.replace(tmp, out)
        except BaseException:  # no output, so no journal for it (a crash here leaves one for a missing file,
            shutil.rmtree(journal, ignore_errors=True)  # which a file written there later finds set aside)
            raise
    _st.fsync_dir(out.parent)


def _restaged(ckpt: Checkpoint, tmp: Path) -> Checkpoint:
    if tmp.is_dir():
        return detect(tmp)
    wf = WeightFile(tmp, "")
    wf.encoders = dict(ckpt.files[0].encoders)
    return Checkpoint(tmp, ckpt.layout, ckpt.architecture, [wf])


def _check_outside(ckpt: Checkpoint, out: Path) -> None:
    """Refuse an output inside the checkpoint folder it is a copy of (symlinks and ``..`` resolved): the copy would
    copy itself, level after level, until the disk is full or the name too long."""
    source, target = ckpt.path.resolve(), out.resolve()
    if ckpt.path.is_dir() and (target == source or source in target.parents):
        raise TargetNotWritableError(
            f"output {out} is inside the checkpoint {ckpt.path}", "choose an output outside it", option="output"
        )


def _refuse_builtin(ckpt: Checkpoint) -> None:
    """A built-in model is the installed package's own files, the model of every command without one."""
    from ..toyworld import BUILTIN_MODELS, builtin_model_path

    names = [n for n in BUILTIN_MODELS if builtin_model_path(n).resolve() == ckpt.path.resolve()]
    if names:
        raise TargetNotWritableError(
            f"{names[0]} is a built-in model, erasekit's own files",
            "write a patched copy to an output instead of in place",
            option="output",
        )


def apply_to_checkpoint(
    patches: Sequence[Patch | str | os.PathLike],
    target: str | os.PathLike,
    *,
    output: str | os.PathLike | None = None,
    in_place: bool = False,
    strength: float | Sequence[float] = 1.0,
    force: bool = False,
) -> ApplyReport:
    """Apply ``patches`` (in order) to the checkpoint at ``target``.

    Either ``in_place`` (only the touched tensors' bytes are rewritten, under a write-ahead undo
    journal) or ``output`` (a new file or folder, written atomically). Everything is checked
    before anything is written: a refused patch leaves every file as it was.
    """
    t0 = time.perf_counter()
    if (output is None) == (not in_place):
        raise ErasekitError("say where the result goes", "give an output, or apply in place (not both)")
    loaded = [as_patch(p) for p in patches]
    if not loaded:
        raise ErasekitError("no patch given", "name at least one .erasepatch file")
    strengths = per_patch_strengths(len(loaded), strength)
    ckpt = detect(resolve_model(target))
    where = f"{ckpt.path} [{ckpt.describe()}]"
    warnings = [w for p in loaded for w in p.warnings]
    warnings += [
        n
        for p in loaded
        if (n := crossing_note(p, ckpt.architecture, slot_map(p, ckpt.architecture, ckpt.encoders, where)))
    ]
    warnings += order_notes(loaded, applied_in_place(ckpt, stamp=False, warn=False))  # a refusal is one line
    check_ffn_dtypes(ckpt)  # before a copy is made
    if in_place:
        _refuse_builtin(ckpt)
        _check_writable(ckpt)
        applied, written = _apply_in_place(ckpt, loaded, strengths, force, where)
        out = ckpt.path
    else:
        out = Path(output)  # type: ignore[arg-type]
        _check_outside(ckpt, out)
        _st.check_new_output(out)
        if not ckpt.path.is_dir() and out.suffix.lower() != ".safetensors":
            raise TargetNotWritableError(
                f"output {out} must end in .safetensors", "erasekit writes single-file checkpoints as safetensors"
            )
        for p in loaded:  # refuse early, before copying gigabytes
            slot_map(p, ckpt.architecture, ckpt.encoders, where)
        tmp = _stage_copy(ckpt, out)
        try:
            applied, written = _apply_in_place(_restaged(ckpt, tmp), loaded, strengths, force, where)
            _st.fsync_tree(tmp)  # every copied file on disk before the rename makes the output visible
            _publish(tmp, out)
        except BaseException:
            _remove_staged(tmp)
            raise
    return ApplyReport(
        str(ckpt.path),
        ckpt.layout,
        ckpt.architecture,
        str(out),
        in_place,
        applied,
        written,
        time.perf_counter() - t0,
        warnings,
    )


def revert_from_checkpoint(
    patch: Patch | str | os.PathLike, target: str | os.PathLike, *, force: bool = False
) -> RevertReport:
    """Restore the exact bytes the checkpoint had before ``patch`` was applied (sha256-verified)."""
    t0 = time.perf_counter()
    patch = as_patch(patch)
    ckpt = detect(target)
    where = f"{ckpt.path} [{ckpt.describe()}]"
    _check_writable(ckpt)
    journal = journal_of(ckpt)
    if not journal.entries:
        raise NotAppliedError(f"no erasekit patch is applied to {where}", "nothing to revert")
    tensor_at = tensor_places(ckpt)
    by_label = {f.label: f for f in ckpt.disk_files}
    with journal.locked():
        journal.reconcile(tensor_at, stamp=False)  # a refusal below leaves journal.json as it is
        matches = [e for e in journal.committed if e.patch_id == patch.patch_id]
        if not matches:
            applied = ", ".join(f"'{e.patch_title}'" for e in journal.committed) or "none"
            raise NotAppliedError(
                f"patch '{patch.title}' is not applied to {where} (applied: {applied})",
                f"`erasekit inspect {ckpt.path}` lists what is applied",
            )
        entry = matches[-1]
        mine = {(r.file, r.key) for r in entry.tensors}
        later = [
            e
            for e in journal.committed[journal.committed.index(entry) + 1 :]
            if mine & {(r.file, r.key) for r in e.tensors}
        ]
        if later:
            raise RevertOrderError(
                f"'{patch.title}' was followed by {', '.join(repr(e.patch_title) for e in later)}, "
                "which change the same tensors",
                "revert those first (newest first)",
            )
        raw = [by_label[r.file].read_raw(r.key) for r in entry.tensors]
        current = {(r.file, r.key): (b, h) for r, b, h in zip(entry.tensors, raw, map_threads(sha256, raw))}
        changed = sum(current[(r.file, r.key)][1] != r.after_sha256 for r in entry.tensors)
        if changed and not force:
            raise UndoRecordError(
                f"{changed} tensors of {where} changed after '{patch.title}' was applied (by another program?)",
                "force it to restore the original bytes anyway",
                option="force",
            )
        verified = journal.revert(
            entry, tensor_at, lambda r: sha256(by_label[r.file].read_raw(r.key)) == r.before_sha256, where, current
        )
        remaining = [e.patch_title for e in journal.committed]
    return RevertReport(
        str(ckpt.path),
        ckpt.layout,
        entry.patch_title,
        entry.patch_id,
        len(entry.tensors),
        verified,
        time.perf_counter() - t0,
        remaining,
    )
