"""Undo records: how to get back the bytes of a tensor that an apply rewrote, and the arithmetic apply and revert
share (see docs/format.md, "Undo journal").

A record holds, per tensor, one of:

* ``full``: the original bytes (all records before journal version 2), and a CRC-32 of the after bytes per
  4 KiB page of the file (records written since erasekit knows the file a journal describes), so that recovery
  can prove a tensor holds the bytes before or after the entry before it writes the original bytes back;
* ``residual``: what the inverse ``round(float(after) - float32(strength) * delta)`` needs, the delta as the patch
  stores it (dense diff or low-rank factors), plus the exceptions (indices and original values of the elements the
  inverse does not give back bit for bit) and a CRC-32 of the after bytes per 4 KiB page of the file, so that a
  tensor a crash left half rewritten is undone page by page.

Apply keeps whichever is smaller; every rebuilt tensor is checked against its recorded sha256.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from pydantic import BaseModel

from ..errors import ForeignBytesError, UndoRecordError
from ..format import _st
from ..format._f16 import f16_add, f16_add_inverted


class TensorRecord(BaseModel):
    """One tensor a journal entry changed: where it is, and the sha256 of its bytes before and after."""

    file: str  # weight file label: "text_encoder/model.safetensors" in a folder, "" for a single-file checkpoint
    key: str
    before_sha256: str
    after_sha256: str


PAGE = 4096  # a write cut short by kill -9 stops on a page boundary of the file
_BITS = {"F16": "<u2", "BF16": "<u2", "F32": "<u4", "F64": "<u8"}
_PARTS = ({"diff"}, {"lora_up", "lora_down", "alpha"})
_RESIDUAL = {"exc_index", "exc_value", "page_crc32"}

# a delta as the patch stores it: "diff" (dense), or "lora_up", "lora_down", "alpha" -> (stored dtype, float32 values)
DeltaParts = dict[str, tuple[str, np.ndarray]]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def undo_name(label: str, key: str) -> str:
    return f"{label}::{key}"


# -- the arithmetic apply and revert share ---------------------------------------------------------------


def delta_of(parts: DeltaParts) -> np.ndarray:
    """The float32 delta ``parts`` stand for, computed as ``Patch.weight_delta`` computes it (float64 product of
    the low-rank factors, rounded once): apply and revert use this one function."""
    if "diff" in parts:
        return parts["diff"][1]
    up, down, alpha = (parts[n][1] for n in ("lora_up", "lora_down", "alpha"))
    product, scale = up.astype(np.float64) @ down.astype(np.float64), float(alpha) / up.shape[1]
    if scale != 1:  # alpha = rank, as erasekit writes them: x * 1.0 is x
        product *= scale
    return product.astype(np.float32)


def scaled(delta: np.ndarray, strength: float) -> np.ndarray:
    """``float32(strength) * delta``, the term apply adds (``delta`` itself at strength 1: the same bits). An
    overflow gives inf, which the caller reports."""
    if strength == 1:
        return delta
    with np.errstate(over="ignore", invalid="ignore"):
        return np.float32(strength) * delta


def add_term(raw: bytes, dtype: str, shape: tuple[int, ...], term: np.ndarray, subtract: bool = False) -> bytes:
    """Stored bytes of ``round_to_dtype(float32(W) +/- term)`` (float64 for F64), round-to-nearest-even."""
    return _sum_bits(raw, dtype, shape, term, subtract).tobytes()


def _sum_bits(raw: bytes, dtype: str, shape: tuple[int, ...], term: np.ndarray, subtract: bool = False) -> np.ndarray:
    """:func:`add_term`'s bytes as a flat array of unsigned integers of the element size, without copying them into
    a bytes object. F16 goes through :func:`erasekit.format._f16.f16_add` (numpy's casts were most of an apply's time)."""
    if dtype == "F16":
        return f16_add(np.frombuffer(raw, "<u2"), np.broadcast_to(term, shape), subtract)
    if dtype == "F64":
        x = _st.to_numpy(raw, dtype, shape).astype(np.float64)
    else:
        x = _st.to_float32(raw, dtype, shape)  # BF16: a new array; F32: a read-only view
        if not x.flags.writeable:
            x = x.copy()
    if subtract:
        x -= term
    else:
        x += term
    return np.frombuffer(_st.encode(x, dtype), _BITS[dtype])


def _pages(begin: int, nbytes: int) -> list[tuple[int, int]]:
    """The byte ranges of a tensor at file offset ``begin`` that each lie in one 4 KiB page of the file."""
    cuts = [0, *range((-begin) % PAGE or PAGE, nbytes, PAGE), nbytes]
    return list(zip(cuts[:-1], cuts[1:]))


def page_crcs(data: bytes, begin: int) -> np.ndarray:
    view = memoryview(data)
    return np.array([zlib.crc32(view[a:b]) for a, b in _pages(begin, len(view))], dtype="<u4")


# -- undo records ------------------------------------------------------------------------------------------


@dataclass
class UndoTensor:
    """How to get one tensor's bytes from before an entry back: the bytes themselves (``original``), or the
    delta parts, the exceptions and the checksums of the after bytes' pages (a residual record)."""

    dtype: str
    shape: tuple[int, ...]
    original: bytes | None = None
    parts: DeltaParts = field(default_factory=dict)
    exc_index: np.ndarray = field(default_factory=lambda: np.zeros(0, "<u4"))
    exc_value: np.ndarray = field(default_factory=lambda: np.zeros(0, "<u2"))  # raw bits of the original values
    page_crc: np.ndarray = field(default_factory=lambda: np.zeros(0, "<u4"))

    @property
    def full(self) -> bool:
        return self.original is not None

    @property
    def nbytes(self) -> int:
        if self.original is not None:
            return len(self.original)
        parts = sum(_st.ITEMSIZE[dt] * a.size for dt, a in self.parts.values())
        return parts + self.exc_index.nbytes + self.exc_value.nbytes + self.page_crc.nbytes

    def stored(self, name: str) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
        """The safetensors entries of this record."""
        crc = {f"{name}::page_crc32": ("U32", self.page_crc.shape, self.page_crc.tobytes())}
        if self.original is not None:
            return {name: (self.dtype, self.shape, self.original), **(crc if self.page_crc.size else {})}
        out = {f"{name}::{p}": (dt, a.shape, _st.encode(a, dt)) for p, (dt, a) in self.parts.items()}
        out[f"{name}::exc_index"] = ("U32", self.exc_index.shape, self.exc_index.tobytes())
        out[f"{name}::exc_value"] = (self.dtype, self.exc_value.shape, self.exc_value.tobytes())
        return {**out, **crc}


def _exact_parts(parts: DeltaParts) -> DeltaParts:
    """``parts`` with any values their stored dtype would round (a patch made in memory) kept as F32."""
    out = {}
    for p, (dt, a) in parts.items():
        same = dt == "F32" or np.array_equal(_st.to_float32(_st.encode(a, dt), dt, a.shape), a)
        out[p] = (dt if same else "F32", a)
    return out


def residual_fits(ent: _st.TensorEntry, parts: DeltaParts | None) -> bool:
    """Whether a residual record of the tensor could be smaller than its bytes; if not, apply keeps them whole and
    need not compute the exceptions."""
    if not parts or ent.dtype not in _BITS or ent.begin % _st.ITEMSIZE[ent.dtype] or ent.numel >= 2**32:
        return False  # page boundaries must fall between elements; indices must fit U32
    floor = sum(_st.ITEMSIZE[dt] * a.size for dt, a in parts.values()) + 4 * len(_pages(ent.begin, ent.nbytes))
    return floor < ent.nbytes


def added(before: bytes, ent: _st.TensorEntry, term: np.ndarray, inverted: bool) -> tuple[bytes, np.ndarray | None]:
    """The bytes of ``before + term`` (:func:`add_term`) and, if ``inverted``, the exceptions of its residual record:
    the element indices where subtracting ``term`` again does not give ``before`` back."""
    if not inverted:
        return add_term(before, ent.dtype, ent.shape, term), None
    if ent.dtype == "F16":
        after_bits, misses = f16_add_inverted(np.frombuffer(before, "<u2"), np.broadcast_to(term, ent.shape))
        return after_bits.tobytes(), misses
    after = add_term(before, ent.dtype, ent.shape, term)
    with np.errstate(over="ignore", invalid="ignore"):  # a non-finite sum is refused by the caller
        back = _sum_bits(after, ent.dtype, ent.shape, term, subtract=True)
    return after, np.flatnonzero(back != np.frombuffer(before, _BITS[ent.dtype])).astype("<u4")


def undo_record(
    before: bytes, after: bytes, ent: _st.TensorEntry, parts: DeltaParts | None, misses: np.ndarray | None
) -> UndoTensor:
    """The smaller record of one tensor that apply turned from ``before`` into ``after``; ``misses``: the exceptions
    :func:`added` found (``None``: keep the bytes whole)."""
    crcs = page_crcs(after, ent.begin)
    full = UndoTensor(ent.dtype, ent.shape, original=before, page_crc=crcs)
    if not parts or misses is None:
        return full
    orig = np.frombuffer(before, _BITS[ent.dtype])
    res = UndoTensor(
        ent.dtype, ent.shape, parts=_exact_parts(parts), exc_index=misses, exc_value=orig[misses], page_crc=crcs
    )
    return res if res.nbytes < full.nbytes else full


def _corrupt(path: Path, key: str, what: str) -> UndoRecordError:
    return UndoRecordError(
        f"undo record {path} is corrupt ({key}: {what})",
        "it is damaged; revert is impossible: restore the checkpoint from a backup",
    )


def read_full(header: _st.Header, f: BinaryIO, name: str, ent: _st.TensorEntry, path: Path, key: str) -> UndoTensor:
    """A full record: the original bytes, and the after bytes' page checksums where the record has them."""
    crc = header.entries.get(f"{name}::page_crc32")
    rec = UndoTensor(ent.dtype, ent.shape, original=_st.read_raw(f, header.entries[name]))
    if crc is not None:
        rec.page_crc = np.frombuffer(_st.read_raw(f, crc), "<u4") if crc.dtype == "U32" else np.zeros(0, "<u4")
        if len(rec.page_crc) != len(_pages(ent.begin, ent.nbytes)):
            raise _corrupt(path, key, "its page checksums do not fit the tensor")
    return rec


def read_residual(header: _st.Header, f: BinaryIO, name: str, ent: _st.TensorEntry, path: Path, key: str) -> UndoTensor:
    got = {n[len(name) + 2 :]: e for n, e in header.entries.items() if n.startswith(name + "::")}
    if not got:
        raise UndoRecordError(f"undo record {path} lacks {key}", "it is damaged; revert is impossible")
    deltas = set(got) - _RESIDUAL
    if deltas not in _PARTS or not _RESIDUAL <= set(got):
        raise _corrupt(path, key, f"unexpected parts {sorted(got)}")
    wanted = {"exc_index": "U32", "page_crc32": "U32", "exc_value": ent.dtype}
    if any(e.dtype != wanted[p] if p in wanted else e.dtype not in _st.FLOAT_DTYPES for p, e in got.items()):
        raise _corrupt(path, key, "a part has the wrong dtype")
    raw = {p: _st.read_raw(f, e) for p, e in got.items()}
    parts = {p: (got[p].dtype, _st.to_float32(raw[p], got[p].dtype, got[p].shape)) for p in deltas}
    rec = UndoTensor(
        ent.dtype,
        ent.shape,
        parts=parts,
        exc_index=np.frombuffer(raw["exc_index"], "<u4"),
        exc_value=np.frombuffer(raw["exc_value"], _BITS[ent.dtype]),
        page_crc=np.frombuffer(raw["page_crc32"], "<u4"),
    )
    if not _consistent(rec, ent):
        raise _corrupt(path, key, "its parts do not fit the tensor")
    return rec


def _consistent(rec: UndoTensor, ent: _st.TensorEntry) -> bool:
    shapes = {p: a.shape for p, (_, a) in rec.parts.items()}
    if "diff" in shapes:
        fits = shapes["diff"] == ent.shape
    else:
        up, down = shapes["lora_up"], shapes["lora_down"]
        fits = (
            len(up) == len(down) == 2
            and (up[0], down[1]) == ent.shape
            and up[1] == down[0] > 0
            and shapes["alpha"] == ()
        )
    counts = rec.exc_index.size == rec.exc_value.size and len(rec.page_crc) == len(_pages(ent.begin, ent.nbytes))
    return fits and counts and (rec.exc_index.size == 0 or int(rec.exc_index.max()) < ent.numel)


def rebuild(
    rec: UndoTensor,
    cur: bytes,
    ent: _st.TensorEntry,
    strength: float,
    tr: TensorRecord,
    path: Path,
    cur_sha: str | None = None,
) -> bytes:
    """The tensor's bytes before the entry, from its bytes now (all, some or none of its pages rewritten; their
    sha256 if known), verified against ``before_sha256``."""
    if rec.original is not None:
        data, cur_sha = rec.original, ""
    else:
        cur_sha = cur_sha or sha256(cur)
        if cur_sha == tr.before_sha256:  # never rewritten, or already restored
            return cur
        data = _undo_residual(rec, cur, ent, strength, whole=cur_sha == tr.after_sha256)
    if sha256(data) == tr.before_sha256:
        return data
    if cur_sha and cur_sha != tr.after_sha256:
        raise ForeignBytesError(
            f"{tr.key} is neither as patched nor as before (changed by another program?), and undo "
            f"record {path} holds the change, not the original bytes",
            "restore the checkpoint from a backup",
        )
    raise UndoRecordError(
        f"undo record {path} is corrupt ({tr.key} does not match its hash)", "it is damaged; revert is impossible"
    )


def check_before_or_after(
    rec: UndoTensor,
    cur: bytes,
    ent: _st.TensorEntry,
    tr: TensorRecord,
    cur_sha: str | None = None,
    reverting: bool = False,
) -> None:
    """Raise :class:`ForeignBytesError` unless ``cur`` holds the tensor's bytes before or after the entry, page by
    page (one page may be cut inside by a write that stopped there: its before part must be the original's).
    A residual record is not checked here: its rebuild proves it (the result must hash to the bytes before).
    ``reverting``: the entry's revert was under way (it writes the original bytes from the start)."""
    if rec.original is None or (cur_sha or sha256(cur)) in (tr.before_sha256, tr.after_sha256):
        return
    pages, orig = _pages(ent.begin, len(cur)), rec.original
    same = [cur[a:b] == orig[a:b] for a, b in pages]
    if len(rec.page_crc) == len(pages):
        odd = [
            (a, b)
            for (a, b), crc, s in zip(pages, rec.page_crc.tolist(), same)
            if not s and zlib.crc32(cur[a:b]) != crc
        ]
        proven = not odd or (len(odd) == 1 and _cut_before_part(cur, orig, *odd[0], _st.ITEMSIZE[ent.dtype]))
    elif reverting:  # a record from before page checksums: a write runs from the start, so a revert it cut holds
        proven = same[0] and not any(same[same.index(False) :])  # original pages first, the rest still as patched
    else:  # and an apply it cut holds after bytes first, original pages from one on
        proven = any(same) and all(same[same.index(True) :])
    if not proven:
        raise ForeignBytesError(
            f"{tr.key} holds neither its bytes from before the interrupted write nor those it wrote",
            "restore the file the journal describes",
        )


def _cut_before_part(cur: bytes, orig: bytes, a: int, b: int, item: int) -> bool:
    """Whether the page ``[a, b)`` is one a write stopped inside: original bytes after the cut (an apply) or
    before it (a revert), with at least one element on either side."""
    return any(cur[t:b] == orig[t:b] or cur[a:t] == orig[a:t] for t in range(a + item, b, item))


def _undo_residual(rec: UndoTensor, cur: bytes, ent: _st.TensorEntry, strength: float, whole: bool) -> bytes:
    """The inverse of the apply, corrected by the exceptions; unless ``whole`` (``cur`` is all after bytes), only
    on the pages that hold after bytes."""
    term = scaled(delta_of(rec.parts), strength)
    back = _sum_bits(cur, ent.dtype, ent.shape, term, subtract=True)
    if not back.flags.writeable:
        back = back.copy()
    back[rec.exc_index] = rec.exc_value
    if whole:
        return back.tobytes()
    return _mix(cur, back.tobytes(), add_term(cur, ent.dtype, ent.shape, term), rec.page_crc, ent)


def _mix(cur: bytes, back: bytes, fwd: bytes, crcs: np.ndarray, ent: _st.TensorEntry) -> bytes:
    """``cur`` undone page by page: a page whose checksum is the after bytes' becomes ``back`` (its inverse); a page
    that the apply's arithmetic turns into them (``fwd`` is ``cur`` through it) holds before bytes and stays. A crash
    cuts at most one page of a tensor inside, which :func:`_cut` undoes; a second such page means that another
    program wrote here, and is left for the caller's hash check to refuse."""
    out, cut = bytearray(cur), False
    for (a, b), crc in zip(_pages(ent.begin, len(cur)), crcs.tolist()):
        if zlib.crc32(cur[a:b]) == crc:
            out[a:b] = back[a:b]
        elif zlib.crc32(fwd[a:b]) != crc:
            if cut:
                break
            cut = True
            _cut(out, cur, back, fwd, a, b, crc, _st.ITEMSIZE[ent.dtype])
    return bytes(out)


def _cut(out: bytearray, cur: bytes, back: bytes, fwd: bytes, a: int, b: int, crc: int, item: int) -> None:
    """Undo a page a write stopped inside, at element ``t``: after bytes up to ``t`` on before bytes (an apply), or
    before bytes on after bytes (a revert). ``t`` is where the page, completed to after bytes, matches ``crc``."""
    for t in range(a + item, b, item):
        if zlib.crc32(cur[a:t] + fwd[t:b]) == crc:
            out[a:t] = back[a:t]
            return
        if zlib.crc32(fwd[a:t] + cur[t:b]) == crc:
            out[t:b] = back[t:b]
            return
