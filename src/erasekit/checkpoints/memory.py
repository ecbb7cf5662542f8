"""Apply patches to in-memory models (a diffusers pipeline, a CLIPTextModel or a T5EncoderModel) and revert them
exactly.

The original values of every touched tensor are kept on the model (``_erasekit_applied``), so a revert restores
them rather than subtracting. :func:`patches_applied` applies a list for a ``with`` block and always gives the
model back as it was.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Collection, Iterator, Sequence
from typing import Any

from ..errors import ErasekitError, IncompatiblePatchError, NonFiniteError, NotAppliedError, RevertOrderError
from ..families import BARE, ENCODER_COMPONENTS, bare_by_class, of_pipeline, with_article
from ..families.base import Slot
from ..format.patchfile import Patch, fingerprint
from .apply import AppliedPatch, ApplyReport, RevertReport, as_patch
from .compat import (
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
from .layouts import EncoderSpec, check_patchable, transformers_encoder


def add_delta(current: Any, delta: Any, strength: float, what: str) -> Any:
    """``round_to_dtype(float32(current) + strength * delta)`` for torch tensors; refuses non-finite results."""
    import torch

    new = (current.float() + strength * delta.to(current.device, torch.float32)).to(current.dtype)
    if not torch.isfinite(new).all():
        raise NonFiniteError(
            f"applying at strength {strength} makes {what} non-finite; nothing was written",
            "use a smaller strength",
            option="strength",
        )
    return new


def _delta_tensor(patch: Patch, t: Touch) -> Any:
    from .._torch import from_numpy32

    delta = patch.weight_delta(t.module) if t.kind == "weight" else patch.bias_delta(t.module)
    assert delta is not None, "a bias is touched only where the manifest records one, and load_patch checks it is there"
    return from_numpy32(delta)


_MEMORY_ATTR = "_erasekit_applied"


def memory_encoders(model: Any) -> tuple[str, dict[str, tuple[Any, EncoderSpec]]]:
    """(architecture, slot -> (torch module, spec)) of a diffusers pipeline or a transformers text encoder."""
    if not any(getattr(model, c, None) is not None for c in ENCODER_COMPONENTS):
        if not hasattr(model, "state_dict"):
            raise IncompatiblePatchError(
                f"{type(model).__name__} has no text encoder",
                "pass a diffusers pipeline or a transformers CLIPTextModel",
            )
        bare = bare_by_class([type(model).__name__]) or BARE[0]
        return bare.name, {s.name: (model, _spec_of(model, s)) for s in bare.slots}
    family = of_pipeline(model)
    if family is None:
        raise IncompatiblePatchError(
            f"the text encoders of {type(model).__name__} are of no family erasekit knows",
            "pass a Stable Diffusion pipeline",
        )
    return family.name, {
        s.name: (getattr(model, s.component), _spec_of(getattr(model, s.component), s))
        for s in family.slots
        if getattr(model, s.component, None) is not None  # SD3.x without its T5
    }


def _spec_of(module: Any, slot: Slot) -> EncoderSpec:
    """The spec of a transformers text encoder in memory, as ``slot`` holds it."""
    from .._torch import dtype_code

    spec = transformers_encoder(
        {k: (dtype_code(v.dtype), tuple(v.shape)) for k, v in module.state_dict().items()}, slot
    )
    if spec is None:
        kind = slot.encoder.kind
        raise IncompatiblePatchError(
            f"{type(module).__name__} is not {with_article(kind.title)} text encoder",
            f"pass a pipeline or {kind.transformers_classes[0]}",
        )
    return spec


def apply_patch(
    model: Any, patch: Patch | str | os.PathLike, strength: float = 1.0, force: bool = False
) -> ApplyReport:
    """Apply a patch to an in-memory diffusers pipeline or CLIPTextModel (weights changed in place).

    The original values are kept on the model so that :func:`revert_patch` restores them exactly.
    """
    import torch

    from .._torch import dtype_code, tensor_bytes

    t0 = time.perf_counter()
    patch = as_patch(patch)
    arch, encoders = memory_encoders(model)
    where = f"the in-memory {type(model).__name__} ({arch})"
    _refuse_twice(model, patch, where)
    mapping = slot_map(patch, arch, {s: spec for s, (_, spec) in encoders.items()}, where)
    tlist = touches(patch, mapping)
    params: dict[Touch, Any] = {}
    fps = {}
    for t in tlist:
        module, spec = encoders[t.slot]
        p = module.get_parameter(spec.key(t.layer, t.proj, t.kind))
        check_patchable(dtype_code(p.dtype), f"{where}: tensor {spec.key(t.layer, t.proj, t.kind)}")
        params[t] = p
        pristine = _memory_pristine(model, t.slot, spec.key(t.layer, t.proj, t.kind), p)
        fps[f"{t.module}.{t.kind}"] = fingerprint(tensor_bytes(pristine), dtype_code(pristine.dtype), tuple(p.shape))
    status, differing = judge_fingerprints(patch, fps, force, where)
    with torch.no_grad():
        news = {
            t: add_delta(p.data, _delta_tensor(patch, t), strength, f"{t.module}.{t.kind}") for t, p in params.items()
        }
        originals = {}
        for t, p in params.items():
            originals[(t.slot, encoders[t.slot][1].key(t.layer, t.proj, t.kind))] = p.data.clone()
            p.data.copy_(news[t])
    stack = getattr(model, _MEMORY_ATTR, None)
    if stack is None:
        stack = []
        object.__setattr__(model, _MEMORY_ATTR, stack)
    notes = order_notes([patch], stack)
    crossing = crossing_note(patch, arch, mapping)
    stack.append(
        {
            "patch_id": patch.patch_id,
            "title": patch.title,
            "strength": strength,
            "parts": merged_parts(patch),
            "originals": originals,
        }
    )
    written = sum(t.numel() * t.element_size() for t in news.values())
    return ApplyReport(
        where,
        "in-memory",
        arch,
        where,
        True,
        [AppliedPatch(patch.title, patch.patch_id, strength, len(news), status, differing)],
        written,
        time.perf_counter() - t0,
        list(patch.warnings) + ([crossing] if crossing else []) + notes,
    )


def _refuse_twice(model: Any, patch: Patch, where: str) -> None:
    """Refuse a patch that would apply one already applied to ``model`` twice: the same patch, a merged patch that
    contains one, or one that a merged patch applied contains (whatever ``force`` says: its base may well match)."""
    stack = [Stacked(r["patch_id"], r["title"], r.get("parts", {})) for r in getattr(model, _MEMORY_ATTR, None) or []]
    if any(s.patch_id == patch.patch_id for s in stack):
        raise ErasekitError(
            f"patch '{patch.title}' is already applied to {where}",
            "revert it first, or apply it once at the strength you want",
            option="patches",
        )
    clash = applied_twice(Stacked.of(patch), stack, f"already applied to {where}")
    if clash:
        raise ErasekitError(*clash, option="patches")


def _memory_pristine(model: Any, slot: str, key: str, current: Any) -> Any:
    for rec in getattr(model, _MEMORY_ATTR, None) or []:
        if (slot, key) in rec["originals"]:
            return rec["originals"][(slot, key)]
    return current


def revert_patch(model: Any, patch: Patch | str | os.PathLike) -> RevertReport:
    """Undo :func:`apply_patch` on the same in-memory model, restoring the exact original values."""
    import torch

    t0 = time.perf_counter()
    patch = as_patch(patch)
    arch, encoders = memory_encoders(model)
    where = f"the in-memory {type(model).__name__} ({arch})"
    stack = getattr(model, _MEMORY_ATTR, None) or []
    idx = [i for i, rec in enumerate(stack) if rec["patch_id"] == patch.patch_id]
    if not idx:
        raise NotAppliedError(
            f"patch '{patch.title}' is not applied to {where}", "apply it first, or revert another patch"
        )
    rec = stack[idx[-1]]
    later = [r["title"] for r in stack[idx[-1] + 1 :] if set(r["originals"]) & set(rec["originals"])]
    if later:
        raise RevertOrderError(
            f"'{patch.title}' was followed by {', '.join(map(repr, later))}, which change the same tensors",
            "revert those first (newest first)",
        )
    with torch.no_grad():
        for (slot, key), orig in rec["originals"].items():
            encoders[slot][0].get_parameter(key).data.copy_(orig)
    verified = all(
        torch.equal(encoders[slot][0].get_parameter(key), orig) for (slot, key), orig in rec["originals"].items()
    )
    del stack[idx[-1]]
    return RevertReport(
        where,
        "in-memory",
        patch.title,
        patch.patch_id,
        len(rec["originals"]),
        verified,
        time.perf_counter() - t0,
        [r["title"] for r in stack],
    )


@contextlib.contextmanager
def patches_applied(
    model: Any, patches: Sequence[Patch], strength: float = 1.0, checked: Collection[str] = ()
) -> Iterator[None]:
    """Apply ``patches`` in order to an in-memory model for the ``with`` block, then revert them newest first.
    If one is refused, those already applied are reverted before the error propagates: the caller's model is
    left as it was found either way. ``checked``: ids of patches whose base was checked against the model's files
    (:func:`erasekit.checkpoints.in_place.in_place_stack`), applied without comparing it with the loaded weights."""
    applied: list[Patch] = []
    try:
        for p in patches:
            apply_patch(model, p, strength=strength, force=p.patch_id in checked)
            applied.append(p)
        yield
    finally:
        for p in reversed(applied):
            revert_patch(model, p)
