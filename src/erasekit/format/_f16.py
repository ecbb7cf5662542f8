"""float16 <-> float32 with numpy's integer and float32 ufuncs, bit for bit what ``numpy.astype`` gives.

Why: numpy's own casts between float16 and float32 run about one element per 2-3 ns in its x86-64 wheels (not
vectorised; numpy 2.4 here). On a 768x3072 tensor they took about 4 ms (F16 -> F32) and 7 ms (F32 -> F16), most
of an in-place apply's time; these vectorised versions take about half of that, and apply's F16 + delta -> F16
(12 ms with numpy) about 5 ms (``python bench/apply_inplace.py --convert``). torch would do it faster still, but
apply and inspect must not import torch. They work in blocks of ``CHUNK`` elements with small scratch arrays,
reused: fresh full-size temporaries cost page faults that were as dear as the arithmetic.

* :func:`f16_to_f32` is exact, as any conversion to a wider float is.
* :func:`f16_add` is ``float16(float32(W) + term)`` (apply's arithmetic) without a float32 copy of ``W``.
* :func:`f32_to_f16` rounds to nearest, ties to even, with subnormal results, overflow to inf and signed zeros.
  Elements that are inf, NaN or too large for float16 (``|x| >= 65536``; rare in weights, none in a finite apply)
  go through numpy's own cast, so NaN payloads are numpy's too.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_U16, _U32, _I16, _I32, _F16, _F32 = (np.dtype(t) for t in ("<u2", "<u4", "<i2", "<i4", "<f2", "<f4"))


CHUNK = 1 << 17  # elements per block


def f16_to_f32(bits: np.ndarray) -> np.ndarray:
    """float32 values of float16 ``bits`` (uint16, any shape), as a new array of the same shape."""
    bits = np.asarray(bits)
    out = np.empty(bits.shape, _F32)
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        _widen_into(np.ascontiguousarray(bits).view(_U16).reshape(-1), out.reshape(-1).view(_I32))
    return out


def f32_to_f16(x: np.ndarray) -> np.ndarray:
    """float16 bits (uint16, same shape) of float32 ``x``, rounded to nearest, ties to even."""
    x = np.asarray(x)
    a = np.ascontiguousarray(x, dtype=_F32).reshape(-1)
    return _rounded(a.size, lambda i, j, w: np.copyto(w, a[i:j])).reshape(x.shape)


def f16_add(bits: np.ndarray, term: np.ndarray, subtract: bool = False) -> np.ndarray:
    """float16 bits of ``float32(W) + term`` (``- term`` if ``subtract``), W given by its float16 ``bits`` (uint16),
    ``term`` of the same size: what ``(W.astype(float32) + term).astype(float16)`` gives, flat."""
    h = np.ascontiguousarray(bits).view(_U16).reshape(-1)
    t = np.asarray(term).reshape(-1)
    if t.size != h.size:
        raise ValueError(f"term has {t.size} elements, the tensor {h.size}")

    def fill(i: int, j: int, w: np.ndarray) -> None:
        _widen_into(h[i:j], w.view(_I32))
        if subtract:
            w -= t[i:j]
        else:
            w += t[i:j]

    return _rounded(h.size, fill)


def f16_add_inverted(bits: np.ndarray, term: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``after = f16_add(bits, term)``, and the flat indices (uint32) where ``f16_add(after, term, subtract=True)``
    does not give ``bits`` back: an apply and the exceptions of its undo record in one pass over the tensor, each
    block still in the cache when it is inverted."""
    h = np.ascontiguousarray(bits).view(_U16).reshape(-1)
    t = np.asarray(term).reshape(-1)
    if t.size != h.size:
        raise ValueError(f"term has {t.size} elements, the tensor {h.size}")
    after, back, misses = np.empty(h.size, _U16), np.empty(min(h.size, CHUNK), _U16), []
    scratch = _Scratch(min(h.size, CHUNK))
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        for i in range(0, h.size, CHUNK):
            j = min(h.size, i + CHUNK)
            w, c, s, floor = scratch.cut(j - i)
            _widen_into(h[i:j], w.view(_I32))
            w += t[i:j]
            _round_into(w, c, s, floor, after[i:j])
            _widen_into(after[i:j], w.view(_I32))
            w -= t[i:j]
            _round_into(w, c, s, floor, back[: j - i])
            missed = np.flatnonzero(back[: j - i] != h[i:j])
            if missed.size:
                misses.append((missed + i).astype(_U32))
    return after, np.concatenate(misses) if misses else np.zeros(0, _U32)


def _rounded(n: int, fill: Any) -> np.ndarray:
    """float16 bits of ``n`` float32 values made block by block: ``fill(i, j, w)`` writes values ``[i, j)`` into
    the float32 scratch ``w``, which is then rounded into the result."""
    out = np.empty(n, _U16)
    scratch = _Scratch(min(n, CHUNK))
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        for i in range(0, n, CHUNK):
            j = min(n, i + CHUNK)
            w, c, s, floor = scratch.cut(j - i)
            fill(i, j, w)
            _round_into(w, c, s, floor, out[i:j])
    return out


class _Scratch:
    def __init__(self, n: int) -> None:
        self.w, self.c, self.s = np.empty(n, _F32), np.empty(n, _U32), np.empty(n, _U32)
        self.floor = np.full(n, 113 << 23, _U32)  # np.maximum is twice as fast against an array as a scalar

    def cut(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return self.w[:n], self.c[:n], self.s[:n], self.floor[:n]


def _widen_into(h: np.ndarray, out: np.ndarray) -> None:
    """float32 values of the float16 bits ``h`` into ``out`` (int32, viewed as float32 after)."""
    # sign-extend to 32 bits, put the 15 exponent and mantissa bits at 13..27 and keep the sign at bit 31: a float32
    # whose exponent is the half's, unbiased by 127 - 15 = 112; multiplying by 2**112 rebiases it exactly (half
    # subnormals arrive as float32 subnormals and leave normalised)
    np.copyto(out, h.view(_I16))
    out <<= np.int32(13)
    out &= np.int32(-0x70000001)  # 0x8FFFFFFF
    f = out.view(_F32)
    f *= np.float32(2.0**112)
    if f.size and (f.max() >= 65536 or f.min() <= -65536):  # inf and NaN: exponent 31 must become 255
        idx = np.flatnonzero((h & np.uint16(0x7C00)) == 0x7C00)
        f[idx] = h[idx].view(_F16).astype(_F32)


def _round_into(a: np.ndarray, c: np.ndarray, s: np.ndarray, floor: np.ndarray, out: np.ndarray) -> None:
    """float16 bits of float32 ``a`` (left holding garbage) into ``out`` (uint16); ``c``, ``s``: uint32 scratch,
    ``floor``: 113 << 23 (the exponent field of 2**-14) in each element."""
    u = a.view(_U32)
    np.right_shift(u, np.uint32(16), out=s)
    s &= np.uint32(0x8000)  # the sign, where float16 keeps it
    u &= np.uint32(0x7FFFFFFF)  # a = |x| from here
    special = None
    if a.size and not a.max() < 65536:  # inf, NaN (max is NaN) or beyond float16's range: numpy's cast, below
        idx = np.flatnonzero(~(a < 65536))
        special = idx, (u[idx] | (s[idx] << np.uint32(16))).view(_F32)
    # round |x| to float16 precision in float32: adding c = 2**(e + 13), e the exponent of |x| but at least -14,
    # leaves float32 a quantum of 2**(e - 10), float16's at that exponent (2**-24 below 2**-14, its subnormals);
    # the FPU rounds the sum to nearest even, and subtracting c again is exact
    np.bitwise_and(u, np.uint32(0x7F800000), out=c)
    np.maximum(c, floor, out=c)
    c += np.uint32(13 << 23)
    a += c.view(_F32)
    a -= c.view(_F32)
    # scaling by 2**-112 makes the float32 exponent the half's (subnormals: a float32 subnormal, exactly); its
    # exponent and top 10 mantissa bits are then the half's 15 bits
    a *= np.float32(2.0**-112)
    u >>= np.uint32(13)
    u |= s
    np.copyto(out, u, casting="unsafe")
    if special is not None:
        idx, values = special
        out[idx] = values.astype(_F16).view(_U16)
