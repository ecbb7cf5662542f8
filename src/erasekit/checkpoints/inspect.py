"""Describe a patch (manifest and per-layer deltas) or a checkpoint (layout, encoders, applied patches).

Torch-free for patches and safetensors checkpoints, so ``erasekit inspect`` answers in well under a second.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ErasekitError
from ..families import family
from ..families.encoders import KIND_OF_PROJECTION
from ..format.erase_config import recorded_defaults
from ..format.patchfile import Evaluation, Patch, delta_norm, is_patch_file, load_patch
from .hub import TEXT_ENCODERS, resolve_model
from .in_place import changed_in_place, checked_journal, described_journal, read_consistently, tensor_places
from .journal import Journal, entry_summary
from .layouts import Checkpoint, check_ffn_dtypes, detect
from .model_configs import choose_config


@dataclass
class DeltaRow:
    module: str
    encoder: str
    layer: int
    proj: str
    shape: list[int]
    storage: str  # "dense" or "rank 4"
    dtype: str
    delta_norm: float
    bias_delta_norm: float | None  # None: the projection has no bias (T5's); 0.0: a patch that leaves it
    relative: float | None = None  # |delta| / |W_base| when inspected against a checkpoint
    error: float | None = None  # low-rank: the stored factors' relative error against the change they stand for
    kept: float | None = None  # low-rank: the share of that change's squared norm they keep


def _bias_norm(delta: Any, proj: str) -> float | None:
    """The norm of a bias delta; 0 where a patch leaves a bias alone, None where the projection has none."""
    if delta is not None:
        return float(np.linalg.norm(delta))
    return 0.0 if KIND_OF_PROJECTION[proj].biases else None


@dataclass
class EvaluationSummary:
    """One recorded evaluation (``erasekit eval --record``) in brief, and the record as stored (``record``)."""

    version: int  # evaluation format; records newer than this erasekit reads have only ``record``
    record: dict[str, Any]
    recorded_at: str | None = None
    judge: str | None = None  # "toy world" or "CLIP <folder name>"
    model: str | None = None  # "<name> (exact|approx|differs)"
    concept: str | None = None
    target_before: float | None = None
    target_after: float | None = None
    largest_drop: str | None = None  # the other concept whose rate fell most, if any fell
    drop_before: float | None = None
    drop_after: float | None = None
    paraphrase_before: float | None = None
    paraphrase_after: float | None = None
    images_per_prompt: int | None = None
    strength: float | None = None
    current: bool = True  # measured on this patch's tensors (its patch id)


@dataclass
class MethodSettings:
    """A patch's method record grouped for reading, each group in the record's order: an erase's settings that
    differ from :class:`~erasekit.format.erase_config.EraseConfig`'s defaults (``changed``), those at them (``default``),
    and the rest of the record (``other``: what the run measured; a merge's or diff's inputs, which are all here)."""

    changed: dict[str, Any] = field(default_factory=dict)
    default: dict[str, Any] = field(default_factory=dict)
    other: dict[str, Any] = field(default_factory=dict)


@dataclass
class PatchInspection:
    path: str
    size_bytes: int
    patch_id: str
    format_version: int
    erasekit_version: str
    created_at: str
    title: str
    concepts: list[dict[str, str]]
    method: dict[str, Any]
    architecture: str
    encoders: dict[str, dict[str, int]]
    rows: list[DeltaRow]
    base_config: str | None = None
    against: str | None = None
    against_layout: str | None = None
    compatibility: str | None = None  # "exact", "approx", "N of M tensors differ", or the refusal message
    warnings: list[str] = field(default_factory=list)
    evaluations: list[EvaluationSummary] = field(default_factory=list)  # oldest first
    settings: MethodSettings = field(default_factory=MethodSettings)  # ``method`` grouped; ``method`` is the record
    kind: str = "patch"


@dataclass
class EncoderRow:
    slot: str
    file: str
    style: str
    prefix: str
    hidden: int
    intermediate: int
    layers: int
    dtype: str


@dataclass
class CheckpointInspection:
    path: str
    layout: str
    architecture: str
    encoders: list[EncoderRow]
    applied: list[dict[str, Any]]
    interrupted: list[dict[str, Any]]
    config: str | None = None  # single files: the bundled configs erase/generate would load it with, and why
    kind: str = "checkpoint"


def _rows(patch: Patch) -> list[DeltaRow]:
    rows = []
    for m, slot, layer, proj in patch.modules():
        info = patch.manifest.deltas[m]
        b = patch.bias_delta(m)
        main = f"{m}.diff" if info.storage == "dense" else f"{m}.lora_up.weight"
        rows.append(
            DeltaRow(
                m,
                slot,
                layer,
                proj,
                list(patch.weight_shape(m)),
                "dense" if info.storage == "dense" else f"rank {info.rank}",
                patch.dtypes[main],
                delta_norm(patch.weight_factors(m)),  # from the factors: no product out x in
                _bias_norm(b, proj),
                error=info.error,
                kept=info.kept,
            )
        )
    return rows


def _evaluations(patch: Patch) -> list[EvaluationSummary]:
    out = []
    for ev in patch.manifest.evaluations:
        record = ev.model_dump(mode="json")
        if not isinstance(ev, Evaluation):
            out.append(EvaluationSummary(ev.version, record, recorded_at=record.get("recorded_at")))
            continue
        drops = [
            (r.after - r.before, name, r)
            for name, r in ev.others.items()
            if r.before is not None and r.after is not None and r.after < r.before
        ]
        worst = min(drops, key=lambda d: (d[0], d[1]))[1:] if drops else None
        rob = ev.robustness
        out.append(
            EvaluationSummary(
                ev.version,
                record,
                ev.recorded_at,
                "toy world" if ev.judge.kind == "toyworld-cnn" else f"CLIP {ev.judge.name}",
                f"{ev.model.name} ({ev.model.match})",
                ev.concept,
                ev.target.before,
                ev.target.after,
                worst[0] if worst else None,
                worst[1].before if worst else None,
                worst[1].after if worst else None,
                rob.before if rob else None,
                rob.after if rob else None,
                ev.images_per_prompt,
                ev.strength,
                ev.patch_id == patch.patch_id,
            )
        )
    return out


def method_settings(method: dict[str, Any]) -> MethodSettings:
    """``method`` (a manifest's, as JSON) grouped: an erase's settings (its seed among them) by whether they differ
    from the defaults of its recipe; everything else, and every entry of a record without a recipe (merge, diff), in
    ``other``. ``left_out`` (a line of its own) is left out."""
    record = {k: v for k, v in method.get("hyperparameters", {}).items() if k != "left_out"}
    if "recipe" not in record:
        return MethodSettings(other=record)
    record |= {"seed": method["seed"]} if method.get("seed") is not None else {}
    defaults = recorded_defaults(str(record["recipe"]))
    grouped = MethodSettings()
    for name, value in record.items():
        group = (
            grouped.other if name not in defaults else grouped.default if value == defaults[name] else grouped.changed
        )
        group[name] = value
    return grouped


def _against(patch: Patch, rows: list[DeltaRow], ckpt: Checkpoint) -> str:
    from .compat import base_statuses, crossing_note, slot_map
    from .in_place import pristine_reader

    where = f"{ckpt.path} [{ckpt.describe()}]"
    try:
        mapping = slot_map(patch, ckpt.architecture, ckpt.encoders, where)
    except ErasekitError as e:
        return str(e)
    crossing = crossing_note(patch, ckpt.architecture, mapping)
    for row in (row for row in rows if row.encoder in mapping):  # a bare encoder takes one part of the patch
        wf = next(f for f in ckpt.files if mapping[row.encoder] in f.encoders)
        w = wf.read_numpy(wf.encoders[mapping[row.encoder]].key(row.layer, row.proj, "weight"))
        n = float(np.linalg.norm(w.astype(np.float64)))
        row.relative = row.delta_norm / n if n else None
    statuses = list(base_statuses(patch, ckpt, mapping, pristine_reader(ckpt)).values())  # below applied patches
    differing = statuses.count("differs")
    if differing:
        return f"{differing} of {len(statuses)} base tensors differ (apply needs force)"
    journal = checked_journal(ckpt, warn=False)  # pristine_reader warned of patches no longer there whole
    refused = _changed_under(patch, mapping, ckpt, journal)
    if refused:
        return refused
    note = _applied_note(ckpt, journal)
    note += f"; {crossing}" if crossing else ""
    return ("exact" if "approx" not in statuses else "approx (same model, other precision)") + note


def _changed_under(patch: Patch, mapping: dict[str, str], ckpt: Checkpoint, journal: Journal) -> str | None:
    """Why apply would refuse ``patch``: tensors it changes that another program wrote since the patch applied in
    place before it last changed them (as :func:`erasekit.checkpoints.apply` refuses them); None if none."""
    from .compat import touches

    if any(e.patch_id == patch.patch_id for e in journal.committed):
        return None  # applied there itself: the note on the applied patches says what changed of it
    changed = journal.changed_since(tensor_places(ckpt))
    keys = {
        (wf.part(key).label, key)
        for wf in ckpt.files
        for t in touches(patch, mapping)
        if t.slot in wf.encoders
        for key in [wf.encoders[t.slot].key(t.layer, t.proj, t.kind)]
    }
    hit = sorted(k for k in keys if k in changed)
    if not hit:
        return None
    title = next(e.patch_title for e in journal.committed if e.id == changed[hit[0]])
    many = f"{len(hit)} tensors it changes were" if len(hit) > 1 else "a tensor it changes was"
    return (
        f"apply refuses it: {many} changed by another program since '{title}' was applied in place ({hit[0][1]}"
        f"{f' and {len(hit) - 1} more' if len(hit) > 1 else ''}); revert '{title}' forcing it first, or restore "
        "the file"
    )


def _applied_note(ckpt: Checkpoint, journal: Journal) -> str:
    """The patches applied in place to ``ckpt``, each with the count of its tensors another program changed since."""
    changed = changed_in_place(ckpt, journal)
    applied = [
        e.patch_title
        + (
            f" ({len(changed[e.id])} of its {len(e.tensors)} tensors changed since by another program)"
            if e.id in changed
            else ""
        )
        for e in journal.committed
    ]
    return f"; note: patches already applied to it: {', '.join(applied)}" if applied else ""


def inspect_patch(patch: Patch) -> PatchInspection:
    """Describe a loaded patch (read from ``patch.path``): its manifest, and each module's delta norms, computed
    from the stored factors (memory bounded by the file, whatever its layers' sizes)."""
    m = patch.manifest
    path = Path(patch.path) if patch.path is not None else None
    method = m.method.model_dump(mode="json")
    return PatchInspection(
        str(path or patch.title),
        path.stat().st_size if path is not None else 0,
        patch.patch_id,
        m.format_version,
        m.erasekit_version,
        m.created_at,
        m.title,
        [c.model_dump() for c in m.concepts],
        method,
        m.base.architecture,
        {s: e.model_dump() for s, e in m.base.encoders.items()},
        _rows(patch),
        m.base.config,
        warnings=list(patch.warnings),
        evaluations=_evaluations(patch),
        settings=method_settings(method),
    )


def inspect_path(
    path: str | os.PathLike, against: str | os.PathLike | None = None
) -> PatchInspection | CheckpointInspection:
    """Inspect a patch (optionally against a checkpoint) or a checkpoint."""
    path = Path(path)
    if is_patch_file(path):
        patch = load_patch(path)
        result = inspect_patch(patch)
        if against is not None:
            ckpt = detect(resolve_model(against, TEXT_ENCODERS))
            check_ffn_dtypes(ckpt)
            result.against, result.against_layout = str(ckpt.path), ckpt.describe()
            # one state of it: fingerprints of a half-applied file, or of one an apply writes meanwhile, would mislead
            result.compatibility = read_consistently(ckpt, lambda: _against(patch, result.rows, ckpt))
        return result
    if against is not None:
        raise ErasekitError(
            f"'against' compares a patch with a checkpoint, and {path} is not a patch",
            "name a .erasepatch first",
            option="against",
        )
    ckpt = detect(resolve_model(path, TEXT_ENCODERS))
    encoders = []
    for wf in ckpt.files:
        info = wf.tensor_info()
        for slot, enc in sorted(wf.encoders.items()):
            encoders.append(
                EncoderRow(
                    slot,
                    wf.display,
                    enc.naming.title,
                    enc.prefix,
                    enc.hidden,
                    enc.intermediate,
                    enc.layers,
                    "/".join(dict.fromkeys(info[enc.key(0, p, "weight")][0] for p in enc.projections)),  # T5: F16/F32
                )
            )
    journal = described_journal(ckpt)  # interrupted entries are shown; a journal of another file is set aside
    changed = changed_in_place(ckpt, journal)  # tensors of an applied patch that another program changed since
    return CheckpointInspection(
        str(ckpt.path),
        ckpt.layout,
        ckpt.architecture,
        encoders,
        [{**entry_summary(e), "changed": len(changed.get(e.id, []))} for e in journal.committed],
        [entry_summary(e) for e in journal.interrupted()],
        _config_of(ckpt),
    )


def _config_of(ckpt: Checkpoint) -> str | None:
    """What a single file would be loaded with (folders carry their own configs; none where erasekit does not run
    the family)."""
    if ckpt.path.is_dir() or not family(ckpt.architecture).bundled:
        return None
    try:
        return choose_config(ckpt).describe()
    except ErasekitError as e:
        return f"none ({e.problem})"
