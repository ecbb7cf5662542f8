"""``train: factors``: each trained FFN weight learns its delta as two low-rank factors, LoRA-style (Hu et al.,
"LoRA: Low-Rank Adaptation of Large Language Models", 2021), instead of as a dense matrix.

A layer's ``W x + b`` becomes ``W x + b + up (down x) + db``, added by a forward hook while the erase runs; ``W``
and ``b`` are never written, so they can stay in a narrower dtype than the factors (bf16:
``erasekit._torch.encoder_dtype``). ``db`` is the bias's delta, where the bias trains (CLIP's; T5 has none): float32,
starting at zero. ``down`` (r x in) starts small and random, uniform in +-1/sqrt(in) as a Linear's own weight
starts, drawn from a generator seeded by the erase's seed; ``up`` (out x r) starts at zero, so the erase starts
where the model is.
Adam trains only the factors (and CLIP's bias deltas, dense as before): r (out + in) parameters a weight instead of
out x in, 459 K instead of 3.0 B for T5-XXL's FFN at rank 16. The patch stores ``up @ down`` as those factors are
(``format.patchfile.lowrank_tensors``: ``lora_up`` holds ``up`` scaled by rank / alpha, so that a UI's
``alpha / rank`` gives ``up @ down`` back): nothing is compressed after the loop.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import Any

from ..format.lowrank import LowRank


class Factors:
    """The factors of every trained weight: create them before the loop, train :meth:`tensors` with the hooks
    :meth:`attached`, and store :meth:`stored`."""

    def __init__(self, linears: dict[str, Any], rank: int, seed: int, biases: Collection[str] = ()) -> None:
        """``linears``: module name -> the ``nn.Linear`` whose weight is trained; ``rank``: at most the smaller side
        of each weight; ``seed``: of the generator ``down`` is drawn from (in module order); ``biases``: the modules
        whose bias trains too (as a delta)."""
        import torch

        gen = torch.Generator().manual_seed(seed)
        self.linears = linears
        self.pairs: dict[str, tuple[Any, Any]] = {}
        for m, linear in linears.items():
            out_features, in_features = linear.weight.shape
            r = min(rank, out_features, in_features)
            down = (torch.rand(r, in_features, generator=gen) * 2 - 1) / in_features**0.5
            up = torch.zeros(out_features, r)
            self.pairs[m] = (up.to(linear.weight.device), down.to(linear.weight.device))
        self.bias_deltas = {m: torch.zeros(linears[m].out_features, device=linears[m].weight.device) for m in biases}

    def tensors(self) -> list[Any]:
        """Every factor, ``up`` then ``down`` of each weight in module order, then each bias delta: what Adam trains
        in their place."""
        return [t for pair in self.pairs.values() for t in pair] + list(self.bias_deltas.values())

    @contextmanager
    def attached(self) -> Iterator[None]:
        """Each layer adds ``up (down x)`` to its output within the block; the hooks are gone after it."""
        handles = [linear.register_forward_hook(self._adds(m)) for m, linear in self.linears.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _adds(self, m: str) -> Any:
        import torch.nn.functional as F

        up, down = self.pairs[m]
        bias = self.bias_deltas.get(m)

        def add(_module: Any, args: tuple[Any, ...], out: Any) -> Any:
            x = args[0]
            return out + F.linear(F.linear(x.to(down.dtype), down), up, bias).to(out.dtype)

        return add

    def stored(self) -> dict[str, LowRank]:
        """Each weight's delta as the patch stores it: the trained factors themselves (float32), error 0, all kept."""
        return {
            m: LowRank(up.detach().float().cpu().numpy(), down.detach().float().cpu().numpy(), 0.0, 1.0)
            for m, (up, down) in self.pairs.items()
        }

    def stored_biases(self) -> dict[str, Any]:
        """Each trained bias's delta (numpy, float32), as the patch stores a dense bias delta."""
        return {m: db.detach().cpu().numpy() for m, db in self.bias_deltas.items()}

    def norms(self) -> dict[str, float]:
        """``|up @ down|`` (Frobenius) of each weight's delta, from r x r products alone."""
        import torch

        with torch.no_grad():
            return {
                m: float(((up.T @ up) * (down @ down.T)).sum().clamp(min=0).double() ** 0.5)
                for m, (up, down) in self.pairs.items()
            }
