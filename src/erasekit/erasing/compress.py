"""Low-rank storage of an erase's weight deltas, at the rank what the erase changed needs.

:class:`Compaction` measures the text encoders on the erase's own prompts (the concept's and the anchors') before
the loop and after it, and turns the trained deltas into factors with :func:`erasekit.format.lowrank.low_rank`, each
sized on the inputs its layer sees on those prompts.

Per-tensor errors add up through the layers, so the stored form is then judged end to end, on each output the
UNet reads (:func:`erasekit.erasing.conditioning.encoder_outputs`) separately: one that moved little must not hide
behind one that moved a lot. Where an output is off by more than ``tol``, every tensor's ``tol`` is halved and
the deltas compressed again (at most :data:`TIGHTENINGS` times). A layer that reaches the UNet only through the
pooled embedding (SDXL's te2 last layer) is measured with the end-of-text rows that the embedding is read from
among its rows. The end-to-end errors are judged on prompts the factors were not fitted on too (the rest of the
erase's lists, :data:`HELD_OUT` of each group), so that they say how the patch does on prompts it did not see.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..format.erase_config import GENERIC_ANCHORS
from ..format.lowrank import LowRank, low_rank

# FFN-input rows (tokens) kept per layer to measure errors with: enough to span what the prompts use
INPUT_ROWS = 1024
# prompts measured per group (the concept's, the others'): 8 x 77 tokens fill a group's half of INPUT_ROWS, and
# each text-encoder pass over them costs (a CLIP-L pass over 58 prompts took 14 s on a 2-core CPU)
GROUP_PROMPTS = 8
# prompts per group the stored form is judged on but not fitted on (the rest of the group's list, spread)
HELD_OUT = 4
# times rank="auto" halves the per-tensor tolerance when an output is off by more than it end to end
TIGHTENINGS = 3


def relative_error(approx: Any, reference: Any, base: Any) -> float:
    """``|approx - reference| / |reference - base|``: how far the stored deltas move the text encoders' outputs
    from where the trained deltas put them, relative to how far the trained deltas moved them."""
    change = float(((reference - base).double() ** 2).sum()) ** 0.5
    return float(((approx - reference).double() ** 2).sum()) ** 0.5 / change if change else 0.0


class Compaction:
    """The erase's change, stored at low rank and measured on its prompts: create it before the loop (it encodes
    them with the original weights), call :meth:`factors` after it."""

    def __init__(
        self, config: Any, concepts: Sequence[str], captions: list[str | None], cond_of: Any, device: Any
    ) -> None:
        self.config, self.cond_of, self.device = config, cond_of, device
        self.groups, self.held_out = _measured_prompts(config, concepts, captions)
        self.judged = sum(self.groups, []) + self.held_out  # the prompts the end-to-end errors are measured on
        self.frozen: dict[Any, Any] = {}  # the untrained encoders' outputs for them, computed once (T5's: costly)
        self.base = _conditioning(cond_of, self.judged, device, self.frozen)

    def factors(
        self, params: list[tuple[str, str, Any]], originals: dict[tuple[str, str], Any]
    ) -> tuple[dict[str, LowRank], dict[str, float]]:
        """Each trained weight's :class:`LowRank`, and the end-to-end error per output on the judged prompts: how
        far the stored deltas move it from where the trained ones put it (relative to how far those moved it).
        Leaves the trained weights at original + stored delta; the caller restores them."""
        import torch

        gen = torch.Generator().manual_seed(self.config.seed + 2)
        inputs, trained = _ffn_inputs(
            self.cond_of, self.groups, params, self.device, gen, INPUT_ROWS, self.held_out, self.frozen
        )
        deltas = {m: p.detach().cpu() - originals[(m, kind)] for m, kind, p in params if kind == "weight"}  # on the CPU
        tol = self.config.rank_tol
        stored: dict[str, LowRank] = {}
        for _ in range(TIGHTENINGS + 1):
            ranks = {m: lr.rank for m, lr in stored.items()}
            stored = _compress(self.config, deltas, inputs, tol)
            _with_factors(params, originals, stored)
            got = _conditioning(self.cond_of, self.judged, self.device, self.frozen)
            errors = {name: relative_error(got[name], trained[name], self.base[name]) for name in got}
            done = self.config.rank != "auto" or max(errors.values()) <= self.config.rank_tol
            if done or ranks == {m: lr.rank for m, lr in stored.items()}:  # met, or tightening no longer helps
                break
            tol /= 2
        return stored, errors


def _measured_prompts(
    config: Any, concepts: Sequence[str], captions: list[str | None]
) -> tuple[list[list[str]], list[str]]:
    """The prompts a low-rank patch is fitted on, GROUP_PROMPTS of each group spread evenly over it: the erased
    concepts' (their templates, the images' captions) and those the erase should leave alone (the anchors and
    --keep concepts); and HELD_OUT more of each group, where it has more, that it is judged on too."""
    erased = list(
        dict.fromkeys([t.format(c) for c in concepts for t in config.templates_for(c)] + [c for c in captions if c])
    )
    anchors = list(config.anchor_prompts if config.anchor_prompts is not None else GENERIC_ANCHORS)
    anchors += [t.format(k) for k in config.keep for t in config.templates_for(k)[:4]]
    others = [a for a in dict.fromkeys(anchors) if a not in erased]
    groups = [g for g in (erased, others) if g]
    fitted = [_spread(g, GROUP_PROMPTS) for g in groups]
    return fitted, [p for g, f in zip(groups, fitted) for p in _spread([q for q in g if q not in f], HELD_OUT)]


def _spread(items: list[str], n: int) -> list[str]:
    """At most ``n`` of ``items``, evenly spaced, first and last included."""
    if len(items) <= n:
        return items
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)] if n > 1 else items[:1]


def _ffn_inputs(
    cond_of: Any,
    groups: list[list[str]],
    params: list[tuple[str, str, Any]],
    device: Any,
    gen: Any,
    rows: int,
    held_out: Sequence[str] = (),
    frozen: dict[Any, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per trained FFN layer, the inputs it sees on the prompts: ``rows`` token rows in all, split evenly between
    the groups, drawn with ``gen`` (for a layer read only through the pooled embedding, every prompt's end-of-text
    row among them: sized on those alone it would fit a few rows and miss unseen prompts); and the outputs of all
    the prompts and of ``held_out`` after them (one text-encoder pass)."""
    import torch

    from ..format.names import parse_module_name

    layers = {m: p for m, kind, p in params if kind == "weight"}
    modules = linear_modules(cond_of, layers)
    taken: dict[str, Any] = {}
    # the rows drawn for each length of the encoders' prompts (77 for CLIP, 512 or 256 for T5), in their order
    spreads: dict[int, Any] = {}
    for tokens in dict.fromkeys(cond_of.lengths.values()):
        starts = [0]
        for g in groups:
            starts.append(starts[-1] + len(g) * tokens)
        spreads[tokens] = torch.cat(
            [
                a + torch.randperm(b - a, generator=gen)[: max(1, rows // len(groups))]
                for a, b in zip(starts, starts[1:])
            ]
        )
    prompts = sum(groups, [])
    picks = {}
    for m in modules:
        slot, layer, _ = parse_module_name(m)  # type: ignore[misc]
        tokens = cond_of.lengths[slot]
        picks[m] = spreads[tokens]
        if cond_of.pooled_only(slot, layer):  # every prompt's end-of-text row among them
            ends = [i * tokens + pos for i, pos in enumerate(cond_of.pooled_positions(slot, prompts))]
            picks[m] = torch.tensor(sorted(set(spreads[tokens].tolist()) | set(ends)))

    def hook(name: str) -> Any:
        def keep(_mod: Any, args: tuple[Any, ...]) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])
            taken[name] = x[picks[name].to(x.device)].detach().float()

        return keep

    handles = [mod.register_forward_pre_hook(hook(m)) for m, mod in modules.items()]
    try:
        conditioning = _conditioning(cond_of, sum(groups, []) + list(held_out), device, frozen)
    finally:
        for h in handles:
            h.remove()
    return taken, conditioning


def linear_modules(cond_of: Any, layers: dict[str, Any]) -> dict[str, Any]:
    """The nn.Linear module that owns each trained weight."""
    by_param = {id(p): m for m, p in layers.items()}
    found = {}
    for te, _ in cond_of.all.values():
        for mod in te.modules():
            w = getattr(mod, "weight", None)
            if w is not None and id(w) in by_param:
                found[by_param[id(w)]] = mod
    return found


def _conditioning(
    cond_of: Any, prompts: list[str], device: Any, frozen: dict[Any, Any] | None = None
) -> dict[str, Any]:
    """Each output the UNet reads from the text encoders for ``prompts`` (hidden states, pooled embedding); the
    untrained encoders' outputs kept in and reused from ``frozen`` (:class:`~.conditioning.Conditioner`)."""
    import torch

    from .conditioning import encoder_outputs

    with torch.no_grad():
        return {name: out.float() for name, out in encoder_outputs(cond_of(prompts, device, frozen)).items()}


def _compress(config: Any, deltas: dict[str, Any], inputs: dict[str, Any], tol: float) -> dict[str, LowRank]:
    """Each trained weight's delta in low-rank form, per ``config.rank`` (``auto``: within ``tol`` on its inputs);
    one delta at a time on the inputs' device."""
    return {
        m: low_rank(d.to(inputs[m].device), inputs[m], config.rank, tol, config.max_rank) for m, d in deltas.items()
    }


def _with_factors(
    params: list[tuple[str, str, Any]], originals: dict[tuple[str, str], Any], factors: dict[str, Any]
) -> None:
    """Set each trained weight to its original plus the stored low-rank delta (biases keep their trained values)."""
    import torch

    from .._torch import from_numpy32

    with torch.no_grad():
        for m, kind, p in params:
            if kind == "weight":
                lr = factors[m]
                p.copy_(originals[(m, kind)].to(p.device) + (from_numpy32(lr.up) @ from_numpy32(lr.down)).to(p.device))
