"""A small, strict safetensors reader and an atomic writer that need only numpy.

Why not ``safetensors.numpy``: numpy has no bfloat16, ``inspect`` must not import torch,
and in-place writes need each tensor's byte offset, which the bindings do not expose.
The layout follows the safetensors README: an 8-byte little-endian header length N,
N bytes of JSON, then one contiguous byte buffer that the entries index without holes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .. import _temps
from ..errors import ErasekitError, InputFileError
from ._f16 import f16_to_f32, f32_to_f16

MAX_HEADER_BYTES = 100_000_000

ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
FLOAT_DTYPES = ("F32", "F16", "BF16")  # what patches store; checkpoints may also hold F64
_NUMPY = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "BF16": "<u2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U64": "<u8",
    "U32": "<u4",
    "U16": "<u2",
    "U8": "u1",
    "BOOL": "?",
}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor's place in a safetensors file; ``begin``/``end`` are absolute file offsets."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    path: Path
    header_len: int
    entries: dict[str, TensorEntry]
    metadata: dict[str, str]
    file_size: int

    @property
    def data_start(self) -> int:
        return 8 + self.header_len


class DuplicateKeyError(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json.loads`` hook refusing an object that names a key twice (JSON parsers disagree on which one wins)."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise DuplicateKeyError(k)
        out[k] = v
    return out


def read_header(path: str | os.PathLike, err: type[ErasekitError] = InputFileError, what: str = "file") -> Header:
    """Read and validate a safetensors header. Raises ``err`` naming ``what`` on any defect."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise err(
                    f"{what} {path} is truncated ({size} bytes, no safetensors header)",
                    "re-download or re-create the file",
                )
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise err(
                    f"{what} {path} is corrupt or truncated (header claims {n} bytes, file has {size})",
                    "re-download or re-create the file",
                )
            raw = f.read(n)
    except FileNotFoundError:
        raise InputFileError(f"{path} does not exist", "check the path") from None
    except IsADirectoryError:
        raise InputFileError(f"{path} is a folder, not a file", "name the file inside it") from None
    except PermissionError:
        raise InputFileError(f"{path} is not readable", "check its permissions") from None
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=unique_keys)
    except DuplicateKeyError as dup:
        raise err(
            f"{what} {path} has a safetensors header that names {dup.key!r} twice (a header that says two things "
            "is refused)",
            "re-download or re-create the file",
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as bad:
        raise err(
            f"{what} {path} has a corrupt safetensors header ({bad.__class__.__name__})",
            "re-download or re-create the file",
        ) from None
    except RecursionError:  # a safetensors header is two levels deep; thousands of levels is a hostile file
        raise err(f"{what} {path} has a safetensors header nested too deeply to read", "re-create the file") from None
    if not isinstance(obj, dict):
        raise err(f"{what} {path} has a safetensors header that is not a JSON object", "re-create the file")
    meta = obj.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise err(f"{what} {path}: __metadata__ must map strings to strings", "re-create the file")
    entries: dict[str, TensorEntry] = {}
    data_start = 8 + n
    for name, info in obj.items():
        try:
            dtype, shape, (b, e) = info["dtype"], info["shape"], info["data_offsets"]
            ok = (
                dtype in ITEMSIZE
                and isinstance(shape, list)
                and all(type(s) is int and s >= 0 for s in shape)
                and type(b) is int
                and type(e) is int
                and 0 <= b <= e
            )
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise err(f"{what} {path}: malformed header entry for tensor {name!r}", "re-create the file")
        if (e - b) != math.prod(shape) * ITEMSIZE[dtype]:
            raise err(
                f"{what} {path}: tensor {name!r} has {e - b} bytes for shape {shape} {dtype}", "re-create the file"
            )
        entries[name] = TensorEntry(name, dtype, tuple(shape), data_start + b, data_start + e)
    # The byte buffer must be indexed entirely, without holes or overlaps.
    pos = data_start
    for ent in sorted(entries.values(), key=lambda x: (x.begin, x.end)):
        if ent.begin != pos:
            raise err(
                f"{what} {path}: tensor data overlaps or leaves a hole at tensor {ent.name!r}", "re-create the file"
            )
        pos = ent.end
    if pos != size:
        raise err(
            f"{what} {path} is truncated or has trailing bytes (data ends at {pos}, file has {size})",
            "re-download or re-create the file",
        )
    return Header(path, n, entries, meta, size)


def read_raw(f: BinaryIO, entry: TensorEntry) -> bytes:
    f.seek(entry.begin)
    data = f.read(entry.nbytes)
    if len(data) != entry.nbytes:
        raise InputFileError(
            f"{getattr(f, 'name', 'file')} changed while reading tensor {entry.name!r}",
            "retry when no other program writes it",
        )
    return data


def to_numpy(data: bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Decode raw little-endian bytes; BF16 is widened to float32 exactly."""
    if dtype == "BF16":
        arr = (np.frombuffer(data, "<u2").astype(np.uint32) << 16).view(np.float32)
    elif dtype in _NUMPY:
        arr = np.frombuffer(data, _NUMPY[dtype])
    else:
        raise InputFileError(f"tensor dtype {dtype} cannot be decoded without torch", "convert the file to F16/F32")
    return arr.reshape(shape)


def to_float32(data: bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """float32 values of raw F16, BF16 or F32 bytes: a new array, except for F32 (a read-only view of ``data``).
    F16 goes through :func:`erasekit.format._f16.f16_to_f32` (numpy's cast is several times slower)."""
    if dtype == "F16":
        return f16_to_f32(np.frombuffer(data, "<u2")).reshape(shape)
    if dtype in ("BF16", "F32"):
        return to_numpy(data, dtype, shape)
    raise InputFileError(f"tensor dtype {dtype} has no float32 reading here", "convert the file to F16/F32")


def read_array(f: BinaryIO, entry: TensorEntry) -> np.ndarray:
    return to_numpy(read_raw(f, entry), entry.dtype, entry.shape)


def float32_to_bf16_bytes(arr: np.ndarray) -> bytes:
    """Round float32 to bfloat16 (nearest, ties to even), as ``torch.Tensor.to(torch.bfloat16)`` does."""
    flat = np.ascontiguousarray(arr, dtype="<f4").reshape(-1)
    u = flat.view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2")
    rounded[np.isnan(flat)] = 0x7FC0
    return rounded.tobytes()


def encode(arr: np.ndarray, dtype: str) -> bytes:
    if dtype == "BF16":
        return float32_to_bf16_bytes(np.asarray(arr, dtype=np.float32))
    if dtype == "F16" and arr.dtype == np.float32:  # the same bits as numpy's cast, faster (erasekit.format._f16)
        return f32_to_f16(arr).tobytes()
    with np.errstate(over="ignore"):  # overflow to inf is reported by the callers that care
        return np.ascontiguousarray(arr, dtype=_NUMPY[dtype]).tobytes()


def build_header(tensors: Mapping[str, tuple[str, tuple[int, ...], bytes]], metadata: Mapping[str, str]) -> bytes:
    """Header bytes (length prefix included) for ``tensors`` stored in sorted-name order."""
    obj: dict[str, object] = {}
    if metadata:
        obj["__metadata__"] = dict(sorted(metadata.items()))
    off = 0
    for name in sorted(tensors):
        dtype, shape, data = tensors[name]
        obj[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + len(data)]}
        off += len(data)
    raw = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # align the data buffer to 8 bytes, as the reference writer does
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, tuple[str, tuple[int, ...], bytes]], metadata: Mapping[str, str]
) -> None:
    """Write deterministically (sorted names, sorted metadata) and atomically."""
    with atomic_write(path) as f:
        f.write(build_header(tensors, metadata))
        for name in sorted(tensors):
            f.write(tensors[name][2])


def fsync_tree(path: Path) -> None:
    """fsync a file, or every file and folder below ``path`` (a copied checkpoint before it is renamed into place)."""
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]
    for p in files:
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    if path.is_dir():
        for d in [path, *(p for p in path.rglob("*") if p.is_dir())]:
            fsync_dir(d)


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _mode_for(path: Path) -> int:
    """Keep the mode of the file being replaced; new files get the usual 0666 minus the umask."""
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def replace(tmp: str | Path, path: Path) -> None:
    """``os.replace``, a file that another program holds open (Windows refuses to replace it) named in one line.
    On Windows a few short retries first: a reader (another erasekit reading a journal) holds a file a moment."""
    for wait in (0.05, 0.1, 0.2, 0.4) if os.name == "nt" else ():
        try:
            os.replace(tmp, path)
            return
        except PermissionError:
            time.sleep(wait)
    try:
        os.replace(tmp, path)
    except PermissionError as e:
        from ..errors import TargetNotWritableError

        raise TargetNotWritableError(
            f"cannot replace {path} ({e.strerror}): another program holds it open, or it or its folder is read-only",
            "close it in that program (or make it writable), then retry",
        ) from None


def check_new_output(out: Path, replace: bool = False, make_folder: bool = False) -> None:
    """Refuse, before any work, an output that exists (unless it is to be ``replace``-d) or whose folder is missing
    (unless the caller will ``make_folder`` it: then the nearest folder that exists must be writable) or not
    writable."""
    from ..errors import TargetNotWritableError

    if (out.exists() or out.is_symlink()) and not replace:
        raise TargetNotWritableError(
            f"{out} already exists", "choose a new output name, or delete it first", option="output"
        )
    folder = out.parent
    while make_folder and not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise TargetNotWritableError(
            f"folder {folder} does not exist" if not folder.exists() else f"{folder} is not a folder",
            "create it first or choose another output",
            option="output",
        )
    if not os.access(folder, os.W_OK):
        raise TargetNotWritableError(
            f"cannot write in {folder} (permission denied)", "choose a writable location", option="output"
        )


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[BinaryIO]:
    """Write to a temporary beside ``path`` (:mod:`erasekit._temps`), fsync, then rename over it.

    A crash at any point leaves either the old file or the new one, never a mix; the
    temporary file is removed on error, and one a killed writer left is removed by the next write.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    try:
        _temps.remove_stale(parent / path.name)
        fd, tmp = tempfile.mkstemp(prefix=_temps.prefix(path), suffix=_temps.SUFFIX, dir=parent)
    except FileNotFoundError:
        raise InputFileError(f"folder {parent} does not exist", "create it first or choose another output") from None
    except PermissionError:
        from ..errors import TargetNotWritableError

        raise TargetNotWritableError(
            f"cannot write in {parent} (permission denied)", "choose a writable output location"
        ) from None
    try:
        with os.fdopen(fd, mode) as f:
            yield f  # type: ignore[misc]
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _mode_for(path))
        replace(tmp, path)
        fsync_dir(parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
