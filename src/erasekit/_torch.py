"""The few places where erasekit converts between torch tensors and stored bytes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import numpy as np
import torch

_CODES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


def dtype_code(dtype: torch.dtype) -> str:
    """safetensors dtype code of a torch dtype ('F16', 'BF16', ...)."""
    return _CODES.get(dtype, str(dtype).removeprefix("torch."))


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Exact little-endian bytes of a tensor, as safetensors stores them."""
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().tobytes()
    return t.numpy().tobytes()


def from_numpy32(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively (CUDA with bf16 support; a CPU with AVX512-BF16 or AMX),
    so that autocasting the frozen UNet to bf16 is faster rather than slower."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        checks = (
            getattr(torch.cpu, "_is_avx512_bf16_supported", None),
            getattr(torch.cpu, "_is_amx_tile_supported", None),
        )
        return any(bool(c()) for c in checks if c is not None)
    return False


def compute_dtype(setting: str, device: torch.device) -> torch.dtype:
    """The dtype the erase loop computes the frozen UNet in, for a ``dtype`` setting of auto, fp32 or bf16."""
    if setting == "bf16" or (setting == "auto" and native_bf16(device)):
        return torch.bfloat16
    return torch.float32


def encoder_dtype(train: str, setting: str, device: torch.device) -> torch.dtype:
    """The dtype an erase holds the text encoders' weights in. Where the weights train (``train: dense``): float32.
    Under ``train: factors`` they are frozen (Adam trains the factors and bias deltas, float32): held in the dtype
    the loop computes the denoiser in (:func:`compute_dtype` of the ``dtype`` setting: bf16, or float32). Never fp16:
    T5 overflows in it (and the setting refuses fp16)."""
    return compute_dtype(setting, device) if train == "factors" else torch.float32


@contextlib.contextmanager
def held_in(modules: Iterable[torch.nn.Module], dtype: torch.dtype) -> Iterator[None]:
    """Hold ``modules``' floating-point parameters and buffers in ``dtype`` within the block, and give each back
    bit for bit in its own dtype on leaving it, by success or error. A widening (bf16 or fp16 to float32) is undone
    by converting back; a conversion that may round (float32 or fp16 to bf16) keeps the tensor as found in CPU
    memory (off the GPU, which holds only the narrower copy) and puts it back."""
    tensors = {id(t): t for m in modules for t in (*m.parameters(), *m.buffers())}.values()
    converted = [t for t in tensors if t.is_floating_point() and t.dtype != dtype]
    found: list[tuple[torch.Tensor, torch.dtype, torch.Tensor | None]] = []  # (tensor, its dtype, its value if kept)
    try:
        with torch.no_grad():
            for t in converted:
                widens = dtype.itemsize > t.dtype.itemsize
                found.append((t, t.dtype, None if widens else t.data.to("cpu")))
                t.data = t.data.to(dtype)
        yield
    finally:
        with torch.no_grad():
            for t, was, kept in found:
                t.data = t.data.to(was) if kept is None else kept.to(t.device)


@contextlib.contextmanager
def kept_as_found(modules: Iterable[torch.nn.Module]) -> Iterator[None]:
    """Give back ``modules`` as they were on leaving the block, by success or error: each parameter's and
    buffer's dtype and ``requires_grad``, and every submodule's train/eval mode. (Values are the caller's to
    restore; a dtype round trip through float32 is exact.)"""
    modules = list(modules)
    params = [(p, p.dtype, p.requires_grad) for m in modules for p in m.parameters()]
    buffers = [(b, b.dtype) for m in modules for b in m.buffers()]
    modes = [(sub, sub.training) for m in modules for sub in m.modules()]
    try:
        yield
    finally:
        with torch.no_grad():
            for p, dtype, grad in params:
                if p.dtype != dtype:
                    p.data = p.data.to(dtype)
                p.requires_grad_(grad)
            for b, dtype in buffers:
                if b.dtype != dtype:
                    b.data = b.data.to(dtype)
        for sub, training in modes:
            sub.training = training


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """Run torch on ``n`` intra-op threads for the block; the caller's count is given back. One thread for small
    LAPACK calls (eigh, QR of thin matrices) and small models: on a busy CPU, OpenMP threads that wait for each
    other can make them many times slower (a 10-step erase of the built-in model: 0.6 s on one thread, 2.9 s on
    two with two other jobs running)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
