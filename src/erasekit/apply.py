"""Apply patches to checkpoints (files or in-memory models) and revert them bit for bit.

The arithmetic is one line: ``W' = round_to_dtype(float32(W) + strength * delta)``. Because
``(W + d) - d != W`` in floating point, a revert never subtracts: it restores the original
bytes saved at apply time (the undo journal on disk, or a clone kept on the model in memory),
and checks them against their sha256.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from . import _st
from .errors import (
    ErasekitError,
    FingerprintMismatchError,
    IncompatiblePatchError,
    NonFiniteError,
    NotAppliedError,
    RevertOrderError,
    TargetNotWritableError,
    UndoRecordError,
)
from .journal import Entry, Journal, TensorRecord, copy_journal, journal_dir, sha256
from .hub import in_hub_cache, resolve_model
from .layouts import Checkpoint, EncoderSpec, WeightFile, detect, parse_module_name
from .patchfile import Patch, compare_fingerprint, fingerprint, load_patch, now_iso

FingerprintStatus = Literal["exact", "approx", "forced"]


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


# -- compatibility --------------------------------------------------------------------------------

def slot_map(patch: Patch, architecture: str, encoders: dict[str, EncoderSpec], where: str) -> dict[str, str]:
    """Map the patch's encoder slots onto the target's, or raise :class:`IncompatiblePatchError`."""
    m = patch.manifest
    used = sorted({parse_module_name(name)[0] for name in m.deltas})  # type: ignore[index]
    parch = m.base.architecture
    if parch == architecture or {parch, architecture} <= {"sdxl", "sdxl-refiner"}:
        mapping = {s: s for s in used}
    elif architecture == "clip-text" and len(used) == 1:
        mapping = {used[0]: "te"}
    elif parch == "clip-text" and len(used) == 1:
        pe = m.base.encoders[used[0]]
        fits = [s for s, e in encoders.items() if (e.hidden, e.intermediate) == (pe.hidden, pe.intermediate)]
        if len(fits) != 1:
            raise IncompatiblePatchError(f"patch '{m.title}' (from a bare text encoder, width {pe.hidden}) fits "
                                         f"{len(fits)} encoders of {where}", "apply it to a CLIP text encoder folder instead")
        mapping = {used[0]: fits[0]}
    else:
        raise IncompatiblePatchError(f"patch '{m.title}' is for {parch}, but {where} is {architecture}",
                                     f"apply it to a {parch} checkpoint")
    for ps, cs in mapping.items():
        if cs not in encoders:
            raise IncompatiblePatchError(f"patch '{m.title}' changes text encoder {ps}, which {where} lacks",
                                         "apply it to a checkpoint with that encoder")
        pe, ce = m.base.encoders[ps], encoders[cs]
        if (pe.hidden, pe.intermediate) != (ce.hidden, ce.intermediate):
            raise IncompatiblePatchError(f"patch '{m.title}' encoder {ps} is {pe.hidden}x{pe.intermediate}, "
                                         f"{where} has {ce.hidden}x{ce.intermediate}", "apply it to the model it was made for")
        top = max(layer for name in m.deltas for s, layer, _ in [parse_module_name(name)] if s == ps)  # type: ignore[misc]
        if top >= ce.layers:
            raise IncompatiblePatchError(f"patch '{m.title}' changes layer {top} of {ps}, {where} has {ce.layers} layers",
                                         "apply it to the model it was made for")
    return mapping


def crossing_note(patch: Patch, architecture: str, mapping: dict[str, str]) -> str | None:
    """The line that says a patch crossed between a bare CLIP text encoder and a pipeline (the one rule, used by
    apply, inspect --against and diff of two patches: same FFN shapes, one encoder)."""
    parch = patch.manifest.base.architecture
    if parch == architecture or "clip-text" not in (parch, architecture):
        return None
    pairs = ", ".join(f"{p} -> {c}" for p, c in sorted(mapping.items()))
    return (f"patch '{patch.title}' was made for {parch} and goes to a {architecture} model by matching FFN shapes "
            f"(encoder {pairs})")


@dataclass(frozen=True)
class Touch:
    """One base tensor a patch changes: patch module and kind, and where it lives in the target."""

    module: str
    kind: str  # "weight" | "bias"
    slot: str  # target slot
    layer: int
    proj: str


def touches(patch: Patch, mapping: dict[str, str]) -> list[Touch]:
    out = []
    for module, slot, layer, proj in patch.modules():
        kinds = ("weight", "bias") if patch.manifest.deltas[module].bias else ("weight",)
        out += [Touch(module, k, mapping[slot], layer, proj) for k in kinds]
    return out


def judge_fingerprints(patch: Patch, actual: dict[str, Any], force: bool, where: str) -> tuple[FingerprintStatus, int]:
    """Compare the base fingerprints in the patch with ``actual`` (fingerprint name -> TensorFingerprint)."""
    statuses = [compare_fingerprint(patch.manifest.base.tensors[name], fp) for name, fp in actual.items()]
    differing = statuses.count("differs")
    if differing:
        if not force:
            raise FingerprintMismatchError(
                f"{differing} of {len(statuses)} tensors of {where} differ from the base model patch "
                f"'{patch.title}' was made for", "apply it to that model, or pass --force to apply anyway",
                differing, len(statuses))
        return "forced", differing
    return ("approx" if "approx" in statuses else "exact"), 0


def add_delta(current: Any, delta: Any, strength: float, what: str) -> Any:
    """``round_to_dtype(float32(current) + strength * delta)`` for torch tensors; refuses non-finite results."""
    import torch

    new = (current.float() + strength * delta.to(current.device, torch.float32)).to(current.dtype)
    if not torch.isfinite(new).all():
        raise NonFiniteError(f"applying at strength {strength} makes {what} non-finite; nothing was written",
                             "use a smaller --strength")
    return new


def _delta_tensor(patch: Patch, t: Touch) -> Any:
    from ._torch import from_numpy32

    return from_numpy32(patch.weight_delta(t.module) if t.kind == "weight" else patch.bias_delta(t.module))


def _as_patch(p: Patch | str | os.PathLike) -> Patch:
    return p if isinstance(p, Patch) else load_patch(p)


def _strengths(patches: Sequence[Any], strength: float | Sequence[float]) -> list[float]:
    if isinstance(strength, (int, float)):
        return [float(strength)] * len(patches)
    if len(strength) != len(patches):
        raise ErasekitError(f"{len(strength)} strengths for {len(patches)} patches", "give one --strength per patch, or one for all")
    return [float(s) for s in strength]


# -- files ------------------------------------------------------------------------------------------

def _offsets(ckpt: Checkpoint) -> Any:
    by_label = {f.label: f for f in ckpt.files}

    def offset(label: str, key: str) -> int:
        return by_label[label].header.entries[key].begin

    return offset


def add_delta_bytes(raw: bytes, dtype: str, shape: tuple[int, ...], delta: np.ndarray, strength: float,
                    what: str) -> bytes:
    """Stored bytes of ``round_to_dtype(float32(W) + strength * delta)``, with numpy (no torch, one thread):
    float32 arithmetic, then round-to-nearest-even to the stored dtype, as torch would do it."""
    if dtype not in ("F32", "F16", "BF16", "F64"):
        raise IncompatiblePatchError(f"tensor {what} is stored as {dtype}", "erasekit patches floating-point weights only")
    w = _st.to_numpy(raw, dtype, shape)
    new = w.astype(np.float64 if dtype == "F64" else np.float32) + np.float32(strength) * delta
    out = _st.encode(new, dtype)
    if not np.isfinite(_st.to_numpy(out, dtype, shape)).all():
        raise NonFiniteError(f"applying at strength {strength} makes {what} non-finite; nothing was written",
                             "use a smaller --strength")
    return out


@dataclass
class _Plan:
    patch: Patch
    strength: float
    status: FingerprintStatus
    differing: int
    originals: dict[tuple[str, str], tuple[str, tuple[int, ...], bytes]]  # (label, key) -> dtype, shape, bytes
    before_sha: dict[tuple[str, str], str]
    updates: dict[tuple[str, str], bytes]


def _plan(ckpt: Checkpoint, journal: Journal, patch: Patch, strength: float, force: bool, where: str,
          state: dict[tuple[str, str], bytes], earlier: list[_Plan], undo_cache: dict[str, Any]) -> _Plan:
    """Everything an apply will write, computed before anything is written."""
    twice = [e.id for e in journal.committed if e.patch_id == patch.patch_id]
    if twice and not force:
        raise ErasekitError(f"patch '{patch.title}' is already applied to {where} (journal entry {twice[0]})",
                            "revert it first, or pass --force to apply it once more")
    tlist = touches(patch, slot_map(patch, ckpt.architecture, ckpt.encoders, where))
    deltas = {(t.module, t.kind): (patch.weight_delta(t.module) if t.kind == "weight" else patch.bias_delta(t.module))
              for t in tlist}
    fps: dict[str, Any] = {}
    plan = _Plan(patch, strength, "exact", 0, {}, {}, {})
    for wf in ckpt.files:
        for t in tlist:
            if t.slot not in wf.encoders:
                continue
            key = wf.encoders[t.slot].key(t.layer, t.proj, t.kind)
            ent = wf.header.entries[key]
            cur = state[(wf.label, key)] if (wf.label, key) in state else wf.read_raw(key)
            cur_sha = sha256(cur)
            # the fingerprint is checked against the tensor as it was before any erasekit patch
            src = journal.pristine_source(wf.label, key)
            if src is not None:
                if src.id not in undo_cache:
                    undo_cache[src.id] = journal.read_undo(src)
                pristine = undo_cache[src.id][(wf.label, key)]
            else:
                pristine = next((p.originals[(wf.label, key)][2] for p in earlier if (wf.label, key) in p.originals), cur)
            fp = fingerprint(pristine, ent.dtype, ent.shape, sha256=cur_sha if pristine is cur else None)
            name = f"{t.module}.{t.kind}"
            # across variant files the least favourable status counts: an fp16 variant that matches only
            # approximately makes the whole apply "approx", one that differs makes it "differs"
            base = patch.manifest.base.tensors[name]
            if name not in fps or _RANK[compare_fingerprint(base, fp)] > _RANK[compare_fingerprint(base, fps[name])]:
                fps[name] = fp
            plan.originals[(wf.label, key)] = (ent.dtype, ent.shape, cur)
            plan.before_sha[(wf.label, key)] = cur_sha
            plan.updates[(wf.label, key)] = add_delta_bytes(cur, ent.dtype, ent.shape, deltas[(t.module, t.kind)],
                                                            strength, key)
    plan.status, plan.differing = judge_fingerprints(patch, fps, force, where)
    return plan


def _apply_in_place(ckpt: Checkpoint, patches: list[Patch], strengths: list[float], force: bool,
                    where: str) -> tuple[list[AppliedPatch], int]:
    journal = Journal(ckpt.path, {f.label: f.path for f in ckpt.files})
    offset = _offsets(ckpt)
    written = 0
    with journal.locked():
        journal.recover(offset)
        state: dict[tuple[str, str], bytes] = {}  # bytes after the earlier patches of this call
        plans: list[_Plan] = []
        undo_cache: dict[str, Any] = {}
        for patch, strength in zip(patches, strengths):
            plans.append(_plan(ckpt, journal, patch, strength, force, where, state, plans, undo_cache))
            state.update(plans[-1].updates)
        results = []
        for plan in plans:  # write-ahead: undo record, "pending" entry, tensors, "committed"
            entry = Entry(id=journal.next_id(), state="pending", patch_id=plan.patch.patch_id,
                          patch_title=plan.patch.title, patch_path=str(plan.patch.path) if plan.patch.path else None,
                          strength=plan.strength, fingerprint=plan.status, applied_at=now_iso(),
                          tensors=[TensorRecord(file=label, key=key, before_sha256=plan.before_sha[(label, key)],
                                                after_sha256=sha256(data)) for (label, key), data in plan.updates.items()])
            journal.write_undo(entry.id, plan.originals)
            journal.entries.append(entry)
            journal.save()
            journal.write_tensors(plan.updates, {k: offset(*k) for k in plan.updates})
            entry.state = "committed"
            journal.save()
            written += sum(len(d) for d in plan.updates.values())
            results.append(AppliedPatch(plan.patch.title, plan.patch.patch_id, plan.strength, len(plan.updates),
                                        plan.status, plan.differing))
    return results, written


_RANK = {"exact": 0, "approx": 1, "differs": 2}


def _owning_pipeline(ckpt: Checkpoint) -> Path | None:
    """The diffusers pipeline folder whose component ``ckpt`` is (``F`` for ``F/text_encoder``), if any."""
    if not ckpt.path.is_dir():
        return None
    folder = ckpt.path.resolve()
    index = folder.parent / "model_index.json"
    try:
        return folder.parent if index.is_file() and folder.name in json.loads(index.read_text()) else None
    except (OSError, ValueError):
        return None


def _check_writable(ckpt: Checkpoint) -> None:
    owner = _owning_pipeline(ckpt)
    if owner is not None:  # one journal per weight file: the pipeline's
        raise TargetNotWritableError(f"{ckpt.path} is the {ckpt.path.resolve().name} of the diffusers pipeline {owner}, "
                                     "whose undo journal covers its weight files",
                                     f"apply to (or revert from) {owner} instead, or write a copy with -o")
    for wf in ckpt.files:
        if wf.format == "pickle":
            raise TargetNotWritableError(f"{wf.path} is a pickle and cannot be patched in place",
                                         "write a converted copy with -o OUT.safetensors")
        if in_hub_cache(wf.path):
            raise TargetNotWritableError(f"{wf.path} is a shared file of the Hugging Face cache (a link to a "
                                         "content-addressed blob that other snapshots share)",
                                         "write a patched copy with -o OUT instead of --in-place")
        if not os.access(wf.path, os.W_OK):
            raise TargetNotWritableError(f"{wf.path} is read-only", "make it writable, or use -o to write a copy")


def recover_interrupted(ckpt: Checkpoint) -> list[Entry]:
    """Before reading ``ckpt``'s tensors: roll back (or finish) an apply/revert that a crash interrupted, so no
    reader sees a half-written checkpoint. Refuses while another erasekit process is writing it."""
    journal = Journal(ckpt.path, {f.label: f.path for f in ckpt.files})
    if not journal.interrupted():
        return []
    with journal.locked():
        return journal.recover(_offsets(ckpt))


def _pickle_to_safetensors(src: Path, dst: Path) -> None:
    from ._torch import dtype_code, tensor_bytes
    from .layouts import load_pickle_state_dict

    sd = load_pickle_state_dict(src)
    _st.write_safetensors(dst, {k: (dtype_code(v.dtype), tuple(v.shape), tensor_bytes(v)) for k, v in sd.items()},
                          {"format": "pt"})


def _stage_copy(ckpt: Checkpoint, out: Path) -> Path:
    """Copy the checkpoint (and its journal) to a hidden temporary beside ``out``; pickles become safetensors."""
    tmp = out.parent / f".{out.name}.{secrets.token_hex(4)}.incomplete"
    if ckpt.path.is_dir():
        shutil.copytree(ckpt.path, tmp, ignore=lambda d, names: ["lock"] if Path(d).name == ".erasekit" else [])
        for wf in ckpt.files:
            if wf.format == "pickle":
                staged = tmp / wf.label
                _pickle_to_safetensors(staged, staged.with_name(staged.name.replace("pytorch_model", "model")
                                                                .removesuffix(".bin") + ".safetensors"))
                staged.unlink()
    else:
        if ckpt.files[0].format == "pickle":
            _pickle_to_safetensors(ckpt.path, tmp)
        else:
            shutil.copyfile(ckpt.path, tmp)
            copy_journal(ckpt.path, journal_dir(tmp))
    return tmp


def _restaged(ckpt: Checkpoint, tmp: Path) -> Checkpoint:
    if tmp.is_dir():
        return detect(tmp)
    wf = WeightFile(tmp, "")
    wf.encoders = dict(ckpt.files[0].encoders)
    return Checkpoint(tmp, ckpt.layout, ckpt.architecture, [wf])


def apply_to_checkpoint(patches: Sequence[Patch | str | os.PathLike], target: str | os.PathLike, *,
                        output: str | os.PathLike | None = None, in_place: bool = False,
                        strength: float | Sequence[float] = 1.0, force: bool = False) -> ApplyReport:
    """Apply ``patches`` (in order) to the checkpoint at ``target``.

    Either ``in_place`` (only the touched tensors' bytes are rewritten, under a write-ahead undo
    journal) or ``output`` (a new file or folder, written atomically). Everything is checked
    before anything is written: a refused patch leaves every file as it was.
    """
    t0 = time.perf_counter()
    if (output is None) == (not in_place):
        raise ErasekitError("say where the result goes", "pass either -o OUT or --in-place")
    loaded = [_as_patch(p) for p in patches]
    if not loaded:
        raise ErasekitError("no patch given", "name at least one .erasepatch file")
    strengths = _strengths(loaded, strength)
    ckpt = detect(resolve_model(target))
    where = f"{ckpt.path} [{ckpt.describe()}]"
    warnings = [w for p in loaded for w in p.warnings]
    warnings += [n for p in loaded
                 if (n := crossing_note(p, ckpt.architecture, slot_map(p, ckpt.architecture, ckpt.encoders, where)))]
    if in_place:
        _check_writable(ckpt)
        applied, written = _apply_in_place(ckpt, loaded, strengths, force, where)
        out = ckpt.path
    else:
        out = Path(output)  # type: ignore[arg-type]
        if out.exists() or out.is_symlink():
            raise TargetNotWritableError(f"{out} already exists", "choose a new output name, or delete it first")
        if not ckpt.path.is_dir() and out.suffix.lower() != ".safetensors":
            raise TargetNotWritableError(f"output {out} must end in .safetensors",
                                         "erasekit writes single-file checkpoints as safetensors")
        if not out.parent.is_dir():
            raise TargetNotWritableError(f"folder {out.parent} does not exist", "create it first or choose another output")
        if not os.access(out.parent, os.W_OK):
            raise TargetNotWritableError(f"cannot write in {out.parent} (permission denied)", "choose a writable location")
        for p in loaded:  # refuse early, before copying gigabytes
            slot_map(p, ckpt.architecture, ckpt.encoders, where)
        tmp = _stage_copy(ckpt, out)
        try:
            applied, written = _apply_in_place(_restaged(ckpt, tmp), loaded, strengths, force, where)
            _st.fsync_tree(tmp)  # every copied file on disk before the rename makes the output visible
            if tmp.is_dir():
                os.replace(tmp, out)
            else:
                stale = journal_dir(out)
                if stale.exists():
                    shutil.rmtree(stale)
                os.replace(journal_dir(tmp), stale)
                os.replace(tmp, out)
            _st.fsync_dir(out.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
            if not tmp.is_dir():
                shutil.rmtree(journal_dir(tmp), ignore_errors=True)
            raise
    return ApplyReport(str(ckpt.path), ckpt.layout, ckpt.architecture, str(out), in_place, applied, written,
                       time.perf_counter() - t0, warnings)


def revert_from_checkpoint(patch: Patch | str | os.PathLike, target: str | os.PathLike, *,
                           force: bool = False) -> RevertReport:
    """Restore the exact bytes the checkpoint had before ``patch`` was applied (sha256-verified)."""
    t0 = time.perf_counter()
    patch = _as_patch(patch)
    ckpt = detect(target)
    where = f"{ckpt.path} [{ckpt.describe()}]"
    _check_writable(ckpt)
    journal = Journal(ckpt.path, {f.label: f.path for f in ckpt.files})
    if not journal.entries:
        raise NotAppliedError(f"no erasekit patch is applied to {where}", "nothing to revert")
    offset = _offsets(ckpt)
    by_label = {f.label: f for f in ckpt.files}
    with journal.locked():
        journal.recover(offset)
        matches = [e for e in journal.committed if e.patch_id == patch.patch_id]
        if not matches:
            applied = ", ".join(f"'{e.patch_title}'" for e in journal.committed) or "none"
            raise NotAppliedError(f"patch '{patch.title}' is not applied to {where} (applied: {applied})",
                                  f"`erasekit inspect {ckpt.path}` lists what is applied")
        entry = matches[-1]
        mine = {(r.file, r.key) for r in entry.tensors}
        later = [e for e in journal.committed[journal.committed.index(entry) + 1:]
                 if mine & {(r.file, r.key) for r in e.tensors}]
        if later:
            raise RevertOrderError(f"'{patch.title}' was followed by {', '.join(repr(e.patch_title) for e in later)}, "
                                   "which change the same tensors", "revert those first (newest first)")
        changed = sum(sha256(by_label[r.file].read_raw(r.key)) != r.after_sha256 for r in entry.tensors)
        if changed and not force:
            raise UndoRecordError(f"{changed} tensors of {where} changed after '{patch.title}' was applied "
                                  "(by another program?)", "pass --force to restore the original bytes anyway")
        originals = journal.read_undo(entry)
        entry.state = "reverting"
        journal.save()
        journal.write_tensors(originals, {k: offset(*k) for k in originals})
        verified = all(sha256(by_label[r.file].read_raw(r.key)) == r.before_sha256 for r in entry.tensors)
        if not verified:
            raise UndoRecordError(f"restored tensors of {where} do not match their recorded hashes",
                                  "the disk may be failing; restore from a backup")
        journal.entries.remove(entry)
        journal.save()
        (journal.dir / entry.undo_file).unlink(missing_ok=True)
        remaining = [e.patch_title for e in journal.committed]
    return RevertReport(str(ckpt.path), ckpt.layout, entry.patch_title, entry.patch_id, len(entry.tensors), verified,
                        time.perf_counter() - t0, remaining)


# -- in-memory models -------------------------------------------------------------------------------

_MEMORY_ATTR = "_erasekit_applied"


def memory_encoders(model: Any) -> tuple[str, dict[str, tuple[Any, EncoderSpec]]]:
    """(architecture, slot -> (torch module, spec)) of a diffusers pipeline or a transformers text encoder."""
    from .layouts import find_encoders, with_slot

    def spec_of(module: Any, slot: str) -> EncoderSpec:
        from ._torch import dtype_code

        info = {k: (dtype_code(v.dtype), tuple(v.shape)) for k, v in module.state_dict().items()}
        found = [s for (style, prefix), s in find_encoders(info).items() if s and style == "hf" and prefix in ("", "text_model.")]
        if len(found) != 1:
            raise IncompatiblePatchError(f"{type(module).__name__} is not a CLIP text encoder", "pass a pipeline or CLIPTextModel")
        return with_slot(found[0], slot)

    te, te2 = getattr(model, "text_encoder", None), getattr(model, "text_encoder_2", None)
    if te is None and te2 is None:
        if not hasattr(model, "state_dict"):
            raise IncompatiblePatchError(f"{type(model).__name__} has no text encoder",
                                         "pass a diffusers pipeline or a transformers CLIPTextModel")
        return "clip-text", {"te": (model, spec_of(model, "te"))}
    if te is not None and te2 is not None:
        return "sdxl", {"te1": (te, spec_of(te, "te1")), "te2": (te2, spec_of(te2, "te2"))}
    if te2 is not None:
        return "sdxl-refiner", {"te2": (te2, spec_of(te2, "te2"))}
    arch = "sd2" if getattr(getattr(te, "config", None), "hidden_act", "") == "gelu" else "sd1"
    return arch, {"te": (te, spec_of(te, "te"))}


def apply_patch(model: Any, patch: Patch | str | os.PathLike, strength: float = 1.0, force: bool = False) -> ApplyReport:
    """Apply a patch to an in-memory diffusers pipeline or CLIPTextModel (weights changed in place).

    The original values are kept on the model so that :func:`revert_patch` restores them exactly.
    """
    import torch

    from ._torch import dtype_code, tensor_bytes

    t0 = time.perf_counter()
    patch = _as_patch(patch)
    arch, encoders = memory_encoders(model)
    where = f"the in-memory {type(model).__name__} ({arch})"
    mapping = slot_map(patch, arch, {s: spec for s, (_, spec) in encoders.items()}, where)
    tlist = touches(patch, mapping)
    params: dict[Touch, Any] = {}
    fps = {}
    for t in tlist:
        module, spec = encoders[t.slot]
        p = module.get_parameter(spec.key(t.layer, t.proj, t.kind))
        params[t] = p
        pristine = _memory_pristine(model, t.slot, spec.key(t.layer, t.proj, t.kind), p)
        fps[f"{t.module}.{t.kind}"] = fingerprint(tensor_bytes(pristine), dtype_code(p.dtype), tuple(p.shape))
    status, differing = judge_fingerprints(patch, fps, force, where)
    with torch.no_grad():
        news = {t: add_delta(p.data, _delta_tensor(patch, t), strength, f"{t.module}.{t.kind}") for t, p in params.items()}
        originals = {}
        for t, p in params.items():
            originals[(t.slot, encoders[t.slot][1].key(t.layer, t.proj, t.kind))] = p.data.clone()
            p.data.copy_(news[t])
    stack = getattr(model, _MEMORY_ATTR, None)
    if stack is None:
        stack = []
        object.__setattr__(model, _MEMORY_ATTR, stack)
    stack.append({"patch_id": patch.patch_id, "title": patch.title, "strength": strength, "originals": originals})
    written = sum(t.numel() * t.element_size() for t in news.values())
    return ApplyReport(where, "in-memory", arch, where, True,
                       [AppliedPatch(patch.title, patch.patch_id, strength, len(news), status, differing)], written,
                       time.perf_counter() - t0, list(patch.warnings))


def _memory_pristine(model: Any, slot: str, key: str, current: Any) -> Any:
    for rec in getattr(model, _MEMORY_ATTR, None) or []:
        if (slot, key) in rec["originals"]:
            return rec["originals"][(slot, key)]
    return current


def revert_patch(model: Any, patch: Patch | str | os.PathLike) -> RevertReport:
    """Undo :func:`apply_patch` on the same in-memory model, restoring the exact original values."""
    import torch

    t0 = time.perf_counter()
    patch = _as_patch(patch)
    arch, encoders = memory_encoders(model)
    where = f"the in-memory {type(model).__name__} ({arch})"
    stack = getattr(model, _MEMORY_ATTR, None) or []
    idx = [i for i, rec in enumerate(stack) if rec["patch_id"] == patch.patch_id]
    if not idx:
        raise NotAppliedError(f"patch '{patch.title}' is not applied to {where}", "apply it first, or revert another patch")
    rec = stack[idx[-1]]
    later = [r["title"] for r in stack[idx[-1] + 1:] if set(r["originals"]) & set(rec["originals"])]
    if later:
        raise RevertOrderError(f"'{patch.title}' was followed by {', '.join(map(repr, later))}, which change the same "
                               "tensors", "revert those first (newest first)")
    with torch.no_grad():
        for (slot, key), orig in rec["originals"].items():
            encoders[slot][0].get_parameter(key).data.copy_(orig)
    del stack[idx[-1]]
    return RevertReport(where, "in-memory", patch.title, patch.patch_id, len(rec["originals"]), True,
                        time.perf_counter() - t0, [r["title"] for r in stack])


@contextlib.contextmanager
def patches_applied(model: Any, patches: Sequence[Patch], strength: float = 1.0) -> Iterator[None]:
    """Apply ``patches`` in order to an in-memory model for the ``with`` block, then revert them newest first.
    If one is refused, those already applied are reverted before the error propagates: the caller's model is
    left as it was found either way."""
    applied: list[Patch] = []
    try:
        for p in patches:
            apply_patch(model, p, strength=strength)
            applied.append(p)
        yield
    finally:
        for p in reversed(applied):
            revert_patch(model, p)
