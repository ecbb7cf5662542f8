"""Concept-preserving gradient surgery (DoCo, arXiv 2405.15304, section 3.3): per parameter tensor, where the
gradient of the erasing term points against the gradient of the term that holds other prompts in place (negative
cosine), remove the conflicting component before the step.

The reference subtracts ``lambda x cos x`` the unit holding gradient from the erasing gradient after clipping the
gradients of all its trained tensors to a total norm of at most 1; here nothing is clipped, so the step is written
as a projection, ``g_erase -= lambda x (g_erase . g_hold) / |g_hold|^2 x g_hold``: with ``lambda = 1`` the erasing
gradient keeps no component against the holding one. The two agree for a tensor whose clipped erasing gradient has
norm 1; below that the reference removes more (docs/erase.md, "Where doco departs")."""

from __future__ import annotations

from typing import Any


def surgery_grads(params: list[Any], erase: Any, hold: Any, lam: float, hold_counts: bool = True) -> int:
    """Set each parameter's ``.grad`` to the erasing gradient with its conflict with the holding gradient
    removed (plus the holding gradient where ``hold_counts``). The number of tensors where they conflicted."""
    import torch

    g_erase = torch.autograd.grad(erase, params, retain_graph=True, allow_unused=True)
    g_hold = torch.autograd.grad(hold, params, allow_unused=True)
    conflicts = 0
    for p, a, b in zip(params, g_erase, g_hold):
        a = torch.zeros_like(p) if a is None else a
        if b is not None:
            dot = (a * b).sum()
            if dot < 0:
                a = a - (lam * dot / (b * b).sum()) * b
                conflicts += 1
            if hold_counts:
                a = a + b
        p.grad = a
    return conflicts
