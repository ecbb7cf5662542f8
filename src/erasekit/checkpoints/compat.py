"""Does a patch fit a checkpoint? Slot mapping, the tensors it touches, and the fingerprint verdict.

One rule for every command that judges fit (apply, inspect --against, diff of two patches): same architecture,
or kin families with the slots they share (SDXL base/refiner, FLUX.1/SD3.x: ``Family.kin``), or a bare text encoder
("clip-text", "t5-text": ``Family.bare``) meeting the one encoder of its kind and equal FFN shapes; never a patch of
one encoder kind (CLIP, T5) on an encoder of another. A patch of several encoders meets a bare one with the part of
the one encoder that fits it (a FLUX.1 patch's T5 part on ``t5xxl_fp16.safetensors``); the rest is left for the
other encoders' files, and :func:`crossing_note` says so. Torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import FingerprintMismatchError, IncompatiblePatchError
from ..families import family, known_encoders, listing, same_slots, with_article
from ..families.base import EncoderKind
from ..format.names import parse_module_name
from ..format.patchfile import Patch, compare_fingerprint, fingerprint
from .layouts import EncoderSpec

FingerprintStatus = Literal["exact", "approx", "forced"]
STATUS_RANK = {"exact": 0, "approx": 1, "differs": 2}  # across weight variants, the highest counts


def slot_map(patch: Patch, architecture: str, encoders: dict[str, EncoderSpec], where: str) -> dict[str, str]:
    """Map the patch's encoder slots onto the target's, or raise :class:`IncompatiblePatchError`. On a bare text
    encoder, a patch of several encoders maps only the one that fits it (:func:`left_slots` are the rest)."""
    m = patch.manifest
    used = _used(patch)
    parch = m.base.architecture
    if same_slots(parch, architecture):
        mapping = {s: s for s in used}
    elif family(architecture).bare and len(used) == 1:
        mapping = {used[0]: family(architecture).slots[0].name}
    elif family(architecture).bare:
        mapping = _part_for(patch, architecture, encoders, where)
    elif family(parch).bare and len(used) == 1:
        pe, kind = m.base.encoders[used[0]], _kind(parch, used[0])
        of_kind = [s for s in encoders if _kind(architecture, s) is kind]
        if not of_kind:
            raise _no_encoder_of(patch, kind, where)
        fits = [s for s in of_kind if (encoders[s].hidden, encoders[s].intermediate) == (pe.hidden, pe.intermediate)]
        if len(fits) != 1:
            raise IncompatiblePatchError(
                f"patch '{m.title}' (from a bare text encoder, width {pe.hidden}) fits {len(fits)} encoders of {where}",
                f"apply it to {with_article(family(parch).title)} folder instead",
            )
        mapping = {used[0]: fits[0]}
    else:
        raise IncompatiblePatchError(
            f"patch '{m.title}' is for {parch}, but {where} is {architecture}",
            f"apply it to {with_article(parch)} checkpoint",
        )
    for ps, cs in mapping.items():
        if cs not in encoders:
            raise IncompatiblePatchError(
                f"patch '{m.title}' changes text encoder {ps}, which {where} lacks",
                "apply it to a checkpoint with that encoder",
            )
        if _kind(parch, ps) is not _kind(architecture, cs):  # a bare encoder of another kind
            raise _no_encoder_of(patch, _kind(parch, ps), where)
        pe, ce = m.base.encoders[ps], encoders[cs]
        if (pe.hidden, pe.intermediate) != (ce.hidden, ce.intermediate):
            raise IncompatiblePatchError(
                f"patch '{m.title}' encoder {ps} is {pe.hidden}x{pe.intermediate}, "
                f"{where} has {ce.hidden}x{ce.intermediate}",
                "apply it to the model it was made for",
            )
        top = max(layer for name in m.deltas for s, layer, _ in [parse_module_name(name)] if s == ps)  # type: ignore[misc]
        if top >= ce.layers:
            raise IncompatiblePatchError(
                f"patch '{m.title}' changes layer {top} of {ps}, {where} has {ce.layers} layers",
                "apply it to the model it was made for",
            )
    return mapping


def _used(patch: Patch) -> list[str]:
    """The encoder slots a patch changes."""
    return sorted({parse_module_name(name)[0] for name in patch.manifest.deltas})  # type: ignore[index]


def _part_for(patch: Patch, architecture: str, encoders: dict[str, EncoderSpec], where: str) -> dict[str, str]:
    """The one part of a patch of several encoders that fits the bare text encoder ``architecture`` (its kind and
    FFN shapes), mapped onto it."""
    m, target = patch.manifest, family(architecture).slots[0].name
    ce = encoders.get(target)
    fits = [
        s
        for s in _used(patch)
        if _kind(m.base.architecture, s) is _kind(architecture, target)
        and ce is not None
        and (m.base.encoders[s].hidden, m.base.encoders[s].intermediate) == (ce.hidden, ce.intermediate)
    ]
    if len(fits) != 1:
        parch = m.base.architecture
        titles = [_encoder_title(parch, s) for s in _used(patch)]
        widths = "" if ce is None else _widths(patch, _kind(architecture, target), ce.hidden)
        owners = [f"{s} to {family(parch).slot(s).encoder.title}'s{_file(parch, s)}" for s in _used(patch)]
        raise IncompatiblePatchError(
            f"patch '{m.title}' changes the {listing(titles)} of {with_article(parch)} model, and "
            f"{len(fits) or 'none'} of them fit{'s' if len(fits) == 1 else ''} {where}{widths}",
            f"apply it to {with_article(parch)} checkpoint, or each part to its own encoder's file: {', '.join(owners)}",
        )
    return {fits[0]: target}


def _widths(patch: Patch, kind: EncoderKind, hidden: int) -> str:
    """``": its CLIP is 1280 wide (OpenCLIP ViT-bigG/14's width), the patch's te1 768 wide"``: a bare encoder's
    width beside those of the patch's parts of its kind."""
    m = patch.manifest
    parts = [f"{s} {m.base.encoders[s].hidden} wide" for s in _used(patch) if _kind(m.base.architecture, s) is kind]
    known = [e.title for e in known_encoders() if e.kind is kind and e.largest[0] == hidden]
    ours = f"its {kind.title} is {hidden} wide" + (f" ({listing(known, 'or')}'s width)" if known else "")
    return f": {ours}, the patch's {listing(parts)}" if parts else f": {ours}, the patch changes no {kind.title}"


def _file(architecture: str, slot: str) -> str:
    """`` (clip_l.safetensors)``: the file UI users keep ``slot``'s encoder in, where it has one."""
    file = family(architecture).slot(slot).encoder.file
    return f" ({file})" if file else ""


def left_slots(patch: Patch, mapping: dict[str, str]) -> list[str]:
    """The encoder slots of the patch that ``mapping`` leaves (a bare text encoder takes one part of it)."""
    return [s for s in _used(patch) if s not in mapping]


def _encoder_title(architecture: str, slot: str) -> str:
    return f"{slot} ({family(architecture).slot(slot).encoder.title})"


def _kind(architecture: str, slot: str) -> EncoderKind:
    """The kind of text encoder (CLIP, T5) that ``slot`` of ``architecture`` holds."""
    return family(architecture).slot(slot).encoder.kind


def _no_encoder_of(patch: Patch, kind: EncoderKind, where: str) -> IncompatiblePatchError:
    return IncompatiblePatchError(
        f"patch '{patch.title}' changes {with_article(kind.title)} text encoder, and {where} has none",
        f"apply it to a model with {with_article(kind.title)} text encoder",
    )


def crossing_note(patch: Patch, architecture: str, mapping: dict[str, str]) -> str | None:
    """The line that says a patch crossed families (the one rule, used by apply, inspect --against and diff of two
    patches): between a bare text encoder and a pipeline (same kind and FFN shapes, one encoder), or between kin
    families (slot for slot), and which of its parts it leaves for other files; None where it did neither."""
    parch = patch.manifest.base.architecture
    if parch == architecture:
        return None
    pairs = ", ".join(f"{p} -> {c}" for p, c in sorted(mapping.items()))
    how = (
        f"by matching FFN shapes (encoder {pairs})"
        if family(parch).bare or family(architecture).bare
        else f"slot for slot ({', '.join(sorted(mapping))}); its base fingerprints tell whether the encoders are "
        "the same"
    )
    note = f"patch '{patch.title}' was made for {parch} and goes to {with_article(architecture)} model {how}"
    left = left_slots(patch, mapping)
    if left:
        files = listing([family(parch).slot(s).encoder.file or f"the {s} encoder's file" for s in left])
        note += (
            f"; its {listing([_encoder_title(parch, s) for s in left])} part"
            f"{'s are' if len(left) > 1 else ' is'} left for {files}: apply the patch to "
            f"{'those' if len(left) > 1 else 'that'} too"
        )
    return note


@dataclass(frozen=True)
class Touch:
    """One base tensor a patch changes: patch module and kind, and where it lives in the target."""

    module: str
    kind: str  # "weight" | "bias"
    slot: str  # target slot
    layer: int
    proj: str


def touches(patch: Patch, mapping: dict[str, str]) -> list[Touch]:
    """The base tensors of the target the patch changes: those of the slots ``mapping`` maps."""
    out = []
    for module, slot, layer, proj in patch.modules():
        if slot not in mapping:
            continue
        kinds = ("weight", "bias") if patch.manifest.deltas[module].bias else ("weight",)
        out += [Touch(module, k, mapping[slot], layer, proj) for k in kinds]
    return out


def base_statuses(patch: Patch, ckpt: Any, mapping: dict[str, str], read: Any = None) -> dict[str, str]:
    """For each base tensor the patch changes (``"<module>.<kind>"``), how the checkpoint's tensor on disk (or as
    ``read(weight_file, key)`` gives it) compares with the patch's fingerprint of it: "exact", "approx" or
    "differs"."""
    read = read or (lambda wf, key: wf.read_raw(key))
    statuses: dict[str, str] = {}
    for t in touches(patch, mapping):
        wf = next(f for f in ckpt.files if t.slot in f.encoders)
        key = wf.encoders[t.slot].key(t.layer, t.proj, t.kind)
        dtype, shape = wf.tensor_info()[key]
        name = f"{t.module}.{t.kind}"
        statuses[name] = compare_fingerprint(
            patch.manifest.base.tensors[name], fingerprint(read(wf, key), dtype, shape)
        )
    return statuses


def judge_fingerprints(patch: Patch, actual: dict[str, Any], force: bool, where: str) -> tuple[FingerprintStatus, int]:
    """Compare the base fingerprints in the patch with ``actual`` (fingerprint name -> TensorFingerprint)."""
    statuses = [compare_fingerprint(patch.manifest.base.tensors[name], fp) for name, fp in actual.items()]
    differing = statuses.count("differs")
    if differing:
        if not force:
            raise FingerprintMismatchError(
                f"{differing} of {len(statuses)} tensors of {where} differ from the base model patch "
                f"'{patch.title}' was made for",
                "apply it to that model, or force it to apply anyway",
                differing,
                len(statuses),
            )
        return "forced", differing
    return ("approx" if "approx" in statuses else "exact"), 0


TRAINED_METHODS = ("fuchi-takagi-2024", "wu-2024-doco")  # patches an erase trained (not diffs or merges)


def order_notes(patches: Sequence[Patch], applied: Sequence[dict[str, Any]]) -> list[str]:
    """Notes on a stack: ``patches`` applied in order on top of ``applied`` (``patch_id`` and ``title`` of each,
    oldest first).
    For an erase patch made ``--after`` others (its ``after`` setting), a note when one of those is neither already
    applied nor earlier in ``patches``: it was trained with them in place and measured so. For an erase patch
    stacked on patches it was not made after, a note that each was measured alone (on the built-in model such
    stacks let concepts partly back; one patch for all, or ``--after``, is what stays erased together)."""
    notes, present = [], [(a["patch_id"], a["title"]) for a in applied]
    for p in patches:
        after = p.manifest.method.hyperparameters.get("after")
        wanted = (
            {a.get("patch_id"): a.get("title") for a in after if isinstance(a, dict)} if isinstance(after, list) else {}
        )
        missing = [(i, t) for i, t in wanted.items() if i not in dict(present)]
        if missing:
            notes.append(
                f"patch '{p.title}' was made to be applied after {_named(missing)}, which is not applied "
                "before it: apply them first, in the order they were made"
            )
        unplanned = [(i, t) for i, t in present if i not in wanted and i != p.patch_id]
        if unplanned and p.manifest.method.name in TRAINED_METHODS:
            notes.append(
                f"patch '{p.title}' was made without {_named(unplanned)} applied: each erases its concept "
                "alone, stacked they may erase less; for concepts that must stay erased together, erase "
                "them in one patch (several --concept) or each --after the ones before it"
            )
        present.append((p.patch_id, p.title))
    return notes


def _named(patches: Sequence[tuple[object, object]]) -> str:  # ids and titles as read from JSON
    return ", ".join(f"'{t}' ({str(i)[:12]})" for i, t in patches)


def merged_parts(patch: Patch) -> dict[str, str]:
    """The patches a merged ``patch`` was made of, the parts of merged parts included (patch_id -> title); ``{}``
    for a patch that is no merge. A merge records its parts in ``method.hyperparameters.patches``."""
    if patch.manifest.method.name != "merge":
        return {}
    return _parts(patch.manifest.method.hyperparameters.get("patches"))


def _parts(listed: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in listed if isinstance(listed, list) else []:
        if isinstance(part, dict) and isinstance(part.get("patch_id"), str):
            out[part["patch_id"]] = str(part.get("title", part["patch_id"]))
            out.update(_parts(part.get("patches")))
    return out


@dataclass(frozen=True)
class Stacked:
    """A patch in a stack (applied, or to be): its id, title and, for a merge, the patches it was made of."""

    patch_id: str
    title: str
    parts: dict[str, str]

    @classmethod
    def of(cls, patch: Patch) -> Stacked:
        return cls(patch.patch_id, patch.title, merged_parts(patch))

    def ids(self) -> dict[str, str]:
        return {self.patch_id: self.title, **self.parts}


def applied_twice(
    new: Stacked, applied: Sequence[Stacked], where: str, forcible: bool = False
) -> tuple[str, str] | None:
    """(problem, fix) when adding ``new`` on top of ``applied`` (which are ``where``: "already applied to X") would
    apply some patch twice, through a merged patch that contains it or one it contains; None when it would not. The
    same patch twice is the caller's to word. ``forcible``: the fix names forcing it too."""
    force = ", or force it to apply it twice" if forcible else ""
    for old in applied:
        common = [(i, t) for i, t in new.ids().items() if i in old.ids() and old.patch_id != new.patch_id]
        if not common:
            continue
        pid, title = common[0]
        if pid == old.patch_id:
            return (
                f"'{new.title}' contains '{old.title}', which is {where}",
                f"revert it first, merge without it{force}",
            )
        if pid == new.patch_id:
            return (
                f"'{new.title}' is {where}, as part of '{old.title}'",
                f"revert '{old.title}' first, leave '{new.title}' out{force}",
            )
        return (
            f"'{new.title}' and '{old.title}', {where}, both contain '{title}'",
            f"revert '{old.title}' first, merge without '{title}'{force}",
        )
    return None
