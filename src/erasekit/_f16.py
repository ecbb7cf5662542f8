"""float16 <-> float32 with numpy's integer and float32 ufuncs, bit for bit what ``numpy.astype`` gives.

Why: numpy's own casts between float16 and float32 are element-by-element loops (no SIMD in numpy 2.x wheels for
x86-64: they need F16C, above the wheels' baseline). On a 768x3072 tensor they took about 4 ms (F16 -> F32) and
6-8 ms (F32 -> F16), most of an in-place apply's time; these vectorised versions take about a quarter and a half
of that. torch would do it faster still, but apply and inspect must not import torch.

* :func:`f16_to_f32` is exact, as any conversion to a wider float is.
* :func:`f32_to_f16` rounds to nearest, ties to even, with subnormal results, overflow to inf and signed zeros.
  Elements that are inf, NaN or too large for float16 (``|x| >= 65536``; rare in weights, none in a finite apply)
  go through numpy's own cast, so NaN payloads are numpy's too.
"""

from __future__ import annotations

import numpy as np

_U16, _U32, _I16, _I32, _F16, _F32 = (np.dtype(t) for t in ("<u2", "<u4", "<i2", "<i4", "<f2", "<f4"))


def f16_to_f32(bits: np.ndarray) -> np.ndarray:
    """float32 values of float16 ``bits`` (uint16, any shape), as a new array of the same shape."""
    bits = np.asarray(bits)
    h = np.ascontiguousarray(bits).view(_U16).reshape(-1)
    # sign-extend to 32 bits, put the 15 exponent and mantissa bits at 13..27 and keep the sign at bit 31: a float32
    # whose exponent is the half's, unbiased by 127 - 15 = 112; multiplying by 2**112 rebiases it exactly (half
    # subnormals arrive as float32 subnormals and leave normalised).
    x = h.view(_I16).astype(_I32)
    x <<= 13
    x &= np.int32(-0x70000001)  # 0x8FFFFFFF
    f = x.view(_F32)
    f *= np.float32(2.0**112)
    if h.size and (h & np.uint16(0x7FFF)).max() >= 0x7C00:  # inf and NaN: exponent 31 must become 255
        idx = np.flatnonzero((h & np.uint16(0x7C00)) == 0x7C00)
        f[idx] = h[idx].view(_F16).astype(_F32)
    return f.reshape(bits.shape)


def f32_to_f16(x: np.ndarray, overwrite: bool = False) -> np.ndarray:
    """float16 bits (uint16, same shape) of float32 ``x``, rounded to nearest even; ``overwrite``: ``x`` (a
    contiguous float32 array of the caller's) may be used as scratch space and is left holding garbage."""
    x = np.asarray(x)
    if overwrite and x.dtype == _F32 and x.flags.c_contiguous and x.flags.writeable:
        a = x.reshape(-1)
    else:
        a = np.array(x, dtype=_F32, order="C").reshape(-1)
    u = a.view(_U32)
    sign = u >> np.uint32(16)
    sign &= np.uint32(0x8000)
    u &= np.uint32(0x7FFFFFFF)  # a = |x| from here
    special = None
    if a.size and not a.max() < 65536:  # inf, NaN (max is NaN) or beyond float16's range: numpy's cast, below
        idx = np.flatnonzero(~(a < 65536))
        special = idx, (u[idx] | (sign[idx] << np.uint32(16))).view(_F32)
    # round |x| to float16 precision in float32: adding c = 2**(e + 13), e the exponent of |x| but at least -14,
    # leaves float32 a quantum of 2**(e - 10), float16's at that exponent (2**-24 below 2**-14, its subnormals);
    # the FPU rounds the sum to nearest even, and subtracting c again is exact
    c = u & np.uint32(0x7F800000)
    np.maximum(c, np.uint32(113 << 23), out=c)
    c += np.uint32(13 << 23)
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        a += c.view(_F32)
        a -= c.view(_F32)
        # scaling by 2**-112 makes the float32 exponent the half's (subnormals: a float32 subnormal, exactly); its
        # exponent and top 10 mantissa bits are then the half's 15 bits
        a *= np.float32(2.0**-112)
    u >>= np.uint32(13)
    u |= sign
    out = u.astype(_U16)
    if special is not None:
        idx, values = special
        with np.errstate(over="ignore", invalid="ignore"):
            out[idx] = values.astype(_F16).view(_U16)
    return out.reshape(x.shape)
