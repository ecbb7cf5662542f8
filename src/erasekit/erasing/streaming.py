"""``offload: blocks``: the frozen transformer's blocks streamed from CPU memory, for a GPU that cannot hold them.

FLUX.1-dev's transformer is 23.8 GB in bf16: on a 24 GB GPU it cannot stay beside the text encoders. The erase
needs gradients with respect to the conditioning only (the encoders' outputs), never the transformer's weights,
but the backward pass goes through every block. So each block (``Family.streamed_blocks``: FLUX.1's
``transformer_blocks`` and ``single_transformer_blocks``, SD3.x's ``transformer_blocks``) lives in CPU memory,
pinned where the device is CUDA, and comes to the device for a use and leaves after it: once for its forward pass,
which runs without keeping activations, and once for the backward pass, which recomputes the forward from the
block's saved inputs (as activation checkpointing does) and gives the gradients for those inputs
(:class:`_StreamedBlock`). The transformer's other modules (embedders, final norm, projection) stay on the device.
A block called without gradients (a frozen prediction, an image rendered) is moved in for the call alone.

diffusers' group offloading (``diffusers.hooks.apply_group_offloading``) moves blocks the same way for inference,
but it gives a block back to the CPU after its forward by setting each parameter's ``.data``; a backward pass then
reads the CPU tensor through any op that saved the parameter itself (``hidden_states * self.weight`` in RMSNorm),
and nothing brings the block back for it. Hence this module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from itertools import repeat
from typing import Any

import torch


def blocks_of(denoiser: Any, names: Sequence[str]) -> list[Any]:
    """The blocks of ``denoiser``'s block lists ``names``, in the order they run."""
    return [block for name in names for block in getattr(denoiser, name)]


class BlockStream:
    """Where streamed blocks are: each at home in CPU memory (pinned where ``device`` is CUDA) but during a use, when
    a copy of it is on ``device`` (on a CPU device too: a use always computes with a copy, which is dropped after).
    ``moves`` and ``bytes_moved`` count the blocks and the bytes moved to the device. :meth:`restore` gives every
    tensor back where it was found, with its values."""

    def __init__(self, blocks: Sequence[Any], device: Any) -> None:
        self.device = torch.device(device)
        self.pinned = self.device.type == "cuda"
        self.moves = self.bytes_moved = 0
        self.tensors = {id(b): [*b.parameters(), *b.buffers()] for b in blocks}
        self.found: list[tuple[Any, Any]] = []  # (tensor, the device it was found on), as each was taken home
        try:
            for tensors in self.tensors.values():
                for t in tensors:
                    self.found.append((t, t.device))
                    t.data = self._home_copy(t.data)
        except BaseException:
            self.restore()
            raise

    def _home_copy(self, data: Any) -> Any:
        if data.device.type != "cpu":
            data = data.to("cpu")
        return data.pin_memory() if self.pinned and not data.is_pinned() else data

    @contextmanager
    def on_device(self, block: Any) -> Iterator[None]:
        """``block`` on the device for the length of the block, then back home (by success or error)."""
        tensors = self.tensors[id(block)]
        home = [t.data for t in tensors]
        try:
            for t, h in zip(tensors, home):
                t.data = h.to(self.device, non_blocking=self.pinned, copy=True)
            self.moves += 1
            self.bytes_moved += sum(h.numel() * h.element_size() for h in home)
            yield
        finally:
            for t, h in zip(tensors, home):
                t.data = h  # the device copy is dropped (ops queue on one stream: no wait needed)

    def restore(self) -> None:
        """Every tensor back on the device it was found on, with its values (a tensor found in CPU memory keeps its
        pinned copy)."""
        for t, device in self.found:
            if t.device != device:
                t.data = t.data.to(device)


@contextmanager
def streamed(denoiser: Any, names: Sequence[str], device: Any) -> Iterator[BlockStream | None]:
    """Within the block, ``denoiser``'s blocks (its block lists ``names``) are streamed to ``device`` (nothing where
    ``names`` is empty: then None). Their forward methods, devices and values are given back on leaving, by success
    or error."""
    if not names:
        yield None
        return
    blocks = blocks_of(denoiser, names)
    stream = BlockStream(blocks, device)
    had = [(b, b.__dict__.get("forward")) for b in blocks]  # an instance's own forward (a hook's), if any
    try:
        for block, _ in had:
            block.forward = _streamed_forward(stream, block, block.forward)
        yield stream
    finally:
        for block, own in had:
            if own is None:
                vars(block).pop("forward", None)
            else:
                block.forward = own
        stream.restore()


def _streamed_forward(stream: BlockStream, block: Any, forward: Callable[..., Any]) -> Callable[..., Any]:
    """``block``'s forward, run on the device: through :class:`_StreamedBlock` where an input requires a gradient."""

    def run(*args: Any, **kwargs: Any) -> Any:
        if not (torch.is_grad_enabled() and _tensors((args, kwargs), _needs_grad)):
            with stream.on_device(block):
                return forward(*args, **kwargs)
        call = _Call(stream, block, forward, args, kwargs)
        return call.rebuild_outputs(_StreamedBlock.apply(call, *call.inputs))

    return run


class _Call:
    """One call of a streamed block: its arguments with the tensors that require gradients (``inputs``) set apart,
    and the autocast state it was called in, to recompute it in the backward pass."""

    def __init__(self, stream: BlockStream, block: Any, forward: Callable[..., Any], args: Any, kwargs: Any) -> None:
        self.stream, self.block, self.forward = stream, block, forward
        self.inputs = _tensors((args, kwargs), _needs_grad)
        # the arguments and the outputs without those tensors (holes in their place): the call is kept until the
        # backward pass, and must not keep the block's outputs or its inputs after they are used
        self.arguments = _replaced((args, kwargs), _needs_grad, repeat(_HOLE))
        self.outputs: Any = None
        kind = stream.device.type
        self.autocast = (kind, torch.get_autocast_dtype(kind), torch.is_autocast_enabled(kind))
        self.autocast_cache = torch.is_autocast_cache_enabled()

    def run(self, inputs: Sequence[Any]) -> tuple[Any, ...]:
        """The block's output tensors for ``inputs`` in place of the tensors that required gradients."""
        with self.stream.on_device(self.block):
            return self._outputs(inputs)

    def _outputs(self, inputs: Sequence[Any]) -> tuple[Any, ...]:
        """:meth:`run` with the block on the device."""
        args, kwargs = _replaced(self.arguments, _is_hole, iter(inputs))
        kind, dtype, enabled = self.autocast
        with torch.autocast(kind, dtype=dtype, enabled=enabled, cache_enabled=self.autocast_cache):
            out = self.forward(*args, **kwargs)
        self.outputs = _replaced(out, _any, repeat(_HOLE))
        return tuple(_tensors(out, _any))

    def rebuild_outputs(self, tensors: Sequence[Any]) -> Any:
        """The block's outputs as it returns them, of ``tensors`` (those :meth:`run` gave)."""
        return _replaced(self.outputs, _is_hole, iter(tensors))

    def input_grads(self, saved: Sequence[Any], grads: Sequence[Any]) -> tuple[Any, ...]:
        """The gradients of the inputs: the block recomputed from ``saved`` on the device, then differentiated there
        (an op may have saved a weight itself for its backward, as RMSNorm's ``x * self.weight`` does)."""
        inputs = [x.detach().requires_grad_(True) for x in saved]
        with self.stream.on_device(self.block), torch.enable_grad():
            outputs = self._outputs(inputs)
            pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]
            if not pairs:
                return (None,) * len(inputs)
            return torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True)


class _StreamedBlock(torch.autograd.Function):
    """A streamed block's call: the forward pass without activations kept, the backward pass by recomputing."""

    @staticmethod
    def forward(ctx: Any, call: _Call, *inputs: Any) -> Any:
        ctx.call = call
        ctx.save_for_backward(*inputs)
        ctx.set_materialize_grads(False)
        return call.run(inputs)

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        return (None, *ctx.call.input_grads(ctx.saved_tensors, grads))


def _needs_grad(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.requires_grad


class _Hole:
    """Where a tensor was taken out of a block's arguments or outputs (None may be an argument or an output)."""


_HOLE = _Hole()


def _is_hole(x: Any) -> bool:
    return x is _HOLE


def _any(x: Any) -> bool:
    return isinstance(x, torch.Tensor)


def _tensors(obj: Any, keep: Callable[[Any], bool]) -> list[Any]:
    """The tensors in ``obj`` (nested in tuples, lists and dicts) that ``keep``, in a fixed order."""
    found: list[Any] = []
    _replaced(obj, keep, None, found)
    return found


def _replaced(obj: Any, keep: Callable[[Any], bool], new: Iterator[Any] | None, found: list[Any] | None = None) -> Any:
    """``obj`` with each leaf that ``keep`` (a tensor, or a hole where one was taken out) replaced by the next of
    ``new`` (None: left as it is), in a fixed order; ``found`` collects those leaves."""
    if keep(obj):
        if found is not None:
            found.append(obj)
        return next(new) if new is not None else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_replaced(o, keep, new, found) for o in obj)
    if isinstance(obj, dict):
        return {k: _replaced(v, keep, new, found) for k, v in obj.items()}
    return obj
