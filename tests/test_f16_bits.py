"""erasekit.format._f16: the bit-level float16 <-> float32 conversions give numpy's bits, every one (NaN payloads too)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from erasekit.format import _f16, _st
from erasekit.format._f16 import f16_add, f16_add_inverted, f16_to_f32, f32_to_f16


def numpy_f16(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(x, dtype=np.float32).astype(np.float16).view(np.uint16)


def same_f16(x: np.ndarray) -> None:
    got, want = f32_to_f16(x), numpy_f16(x)
    assert got.dtype == np.uint16 and got.shape == want.shape
    got, want, bits = got.reshape(-1), want.reshape(-1), np.asarray(x, np.float32).reshape(-1).view(np.uint32)
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, [(hex(int(bits[i])), hex(int(got[i])), hex(int(want[i]))) for i in bad[:8]]


def test_f16_to_f32_every_half() -> None:
    halves = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    want = halves.view(np.float16).astype(np.float32)
    got = f16_to_f32(halves)
    assert got.dtype == np.float32 and got.shape == (2**16,)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))  # NaNs included: payload and quiet bit kept


def test_f32_to_f16_every_rounding_case() -> None:
    """Every sign, exponent and top 10 mantissa bits of float32 (so every float16 result, every binade, inf and
    NaN), each with the 13 bits below exact, just under a tie, a tie, and just over it."""
    top = np.arange(2**19, dtype=np.uint32) << np.uint32(13)
    for low in (0x0000, 0x0FFF, 0x1000, 0x1001):
        for sign in (0, 0x80000000):
            same_f16((top | np.uint32(low | sign)).view(np.float32))


EDGES = [
    0.0,
    -0.0,
    1.0,
    -1.0,
    65504.0,
    -65504.0,
    65519.99,
    65520.0,
    -65520.0,
    65535.99,
    65536.0,
    1e30,
    -1e30,
    3.4028235e38,
    np.inf,
    -np.inf,
    2.0**-14,
    -(2.0**-14),
    2.0**-14 * (1 - 2.0**-24),
    2.0**-14 - 2.0**-25,
    2.0**-14 - 2.0**-26,
    2.0**-24,
    2.0**-25,
    -(2.0**-25),
    2.0**-25 * (1 + 2.0**-23),
    2.0**-26,
    3 * 2.0**-25,
    5 * 2.0**-25,
    1e-45,
    -1e-45,
    1.1754942e-38,
    1.17549435e-38,
    1 + 2.0**-11,
    1 + 3 * 2.0**-11,
    1 + 2.0**-11 + 2.0**-23,
    2048 + 1,
    2048 + 3,
    4096 + 2,
    4096 + 6,
    0.1,
    -0.1,
    1 / 3,
]
NANS = [0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FFFFFFF, 0x7FA00000, 0x7F802000, 0xFFFFE000]


def test_f32_to_f16_edges() -> None:
    """Ties at normal and subnormal scales, the subnormal boundaries, the largest half and what overflows, the
    float32 subnormals, signed zeros, inf, and NaNs quiet and signalling with payloads (numpy's payloads kept)."""
    values = np.array(EDGES, dtype=np.float32)
    same_f16(values)
    same_f16(np.array(NANS, dtype=np.uint32).view(np.float32))
    got = f32_to_f16(values).view(np.float16)
    assert got[1] == 0 and np.signbit(got[1]) and got[6] == 65504 and np.isinf(got[7]) and got[22] == 0


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(width=32), min_size=1, max_size=64))
def test_f32_to_f16_drawn_floats(values: list[float]) -> None:
    same_f16(np.array(values, dtype=np.float32))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=64))
def test_f32_to_f16_drawn_bit_patterns(bits: list[int]) -> None:
    same_f16(np.array(bits, dtype=np.uint32).view(np.float32))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-(2.0**-13), 2.0**-13, width=32), min_size=1, max_size=64))
def test_f32_to_f16_drawn_near_the_subnormals(values: list[float]) -> None:
    same_f16(np.array(values, dtype=np.float32))


def test_weights_plus_a_delta_as_apply_makes_them() -> None:
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((96, 384)) * 0.016).astype(np.float16)
    term = (rng.standard_normal(w.shape) * 0.002).astype(np.float32)
    assert np.array_equal(f16_to_f32(w.view(np.uint16)), w.astype(np.float32))
    same_f16(w.astype(np.float32) + term)
    assert np.array_equal(f16_add(w.view(np.uint16), term), numpy_f16(w.astype(np.float32) + term).reshape(-1))
    assert np.array_equal(
        f16_add(w.view(np.uint16), term, subtract=True), numpy_f16(w.astype(np.float32) - term).reshape(-1)
    )


@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (5,), (4, 6), (2, 3, 4)])
def test_shapes(shape: tuple[int, ...]) -> None:
    x = np.linspace(-70000, 70000, int(np.prod(shape)), dtype=np.float32).reshape(shape)
    same_f16(x)
    bits = numpy_f16(x)
    assert f16_to_f32(bits).shape == shape
    assert np.array_equal(f16_to_f32(bits), bits.view(np.float16).astype(np.float32))


def test_inputs_left_alone() -> None:
    base = np.linspace(-3, 3, 40, dtype=np.float32)
    strided, f64, ro = base[::2], base.astype(np.float64)[::3], base.copy()
    ro.flags.writeable = False
    for x in (strided, f64, ro, base):
        keep = x.copy()
        assert np.array_equal(f32_to_f16(x), numpy_f16(x))
        assert np.array_equal(x, keep)
    bits, term = numpy_f16(base), base[::-1].copy()
    keep = bits.copy(), term.copy()
    assert np.array_equal(f16_add(bits, term), numpy_f16(bits.view(np.float16).astype(np.float32) + term))
    assert np.array_equal(bits, keep[0]) and np.array_equal(term, keep[1])
    with pytest.raises(ValueError, match="term has 3 elements, the tensor 40"):
        f16_add(bits, term[:3])


def test_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Arrays longer than a block, and a last block shorter than the others, with specials in several blocks."""
    monkeypatch.setattr(_f16, "CHUNK", 64)
    rng = np.random.default_rng(2)
    x = (rng.standard_normal(1000) * 30000).astype(np.float32)
    x[[5, 70, 640, 999]] = [np.nan, np.inf, 1e9, -70000]
    same_f16(x)
    bits = numpy_f16(x)
    assert np.array_equal(f16_to_f32(bits).view(np.uint32), bits.view(np.float16).astype(np.float32).view(np.uint32))
    term = (rng.standard_normal(1000) * 100).astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        want = numpy_f16(bits.view(np.float16).astype(np.float32) + term)
    assert np.array_equal(f16_add(bits, term), want)


def inverse_misses(bits: np.ndarray, term: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What f16_add_inverted must give, by numpy's casts: the sum's bits, and where subtracting misses ``bits``."""
    with np.errstate(over="ignore", invalid="ignore"):
        after = numpy_f16(bits.view(np.float16).astype(np.float32) + term).reshape(-1)
        back = numpy_f16(after.view(np.float16).astype(np.float32) - term.reshape(-1))
    return after, np.flatnonzero(back != bits.reshape(-1))


@pytest.mark.parametrize("chunk", [64, 1 << 17])
def test_an_apply_and_its_exceptions_in_one_pass(monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    """The exceptions of a residual undo record: every element (and only those) that ``after - term`` does not give
    back, found in blocks; specials (inf, NaN, overflow) included."""
    monkeypatch.setattr(_f16, "CHUNK", chunk)
    rng = np.random.default_rng(3)
    bits = numpy_f16((rng.standard_normal((40, 25)) * 0.02).astype(np.float32))
    term = (rng.standard_normal((40, 25)) * 0.003).astype(np.float32)
    term.reshape(-1)[[3, 500, 999]] = [np.inf, 70000, np.nan]
    after, misses = f16_add_inverted(bits, term)
    want_after, want_misses = inverse_misses(bits, term)
    assert np.array_equal(after, want_after) and np.array_equal(misses, want_misses)
    assert misses.dtype == np.uint32 and 20 < misses.size < 900 and {3, 500, 999} <= set(misses.tolist())
    none = f16_add_inverted(bits[:0], term[:0])
    assert none[0].size == 0 and none[1].size == 0 and none[1].dtype == np.uint32


def test_st_helpers_use_them() -> None:
    """_st.encode and _st.to_float32, what apply and revert go through, give numpy's bytes and values."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((7, 9)) * 3).astype(np.float32)
    assert _st.encode(x, "F16") == x.astype(np.float16).tobytes()
    assert _st.encode(x.astype(np.float64), "F16") == x.astype(np.float64).astype(np.float16).tobytes()
    raw = x.astype(np.float16).tobytes()
    got = _st.to_float32(raw, "F16", (7, 9))
    assert got.shape == (7, 9) and got.flags.writeable and np.array_equal(got, x.astype(np.float16).astype(np.float32))
