"""The undo journal kept beside a checkpoint that erasekit has written to.

Layout on disk (see docs/format.md, "Undo journal"):

* a diffusers or transformers folder ``F``: ``F/.erasekit/``
* a single file ``D/name.safetensors``: ``D/.erasekit/name.safetensors/``

holding ``journal.json`` (the list of applied patches, oldest first), one ``NNNN.undo`` per
entry (a safetensors file that says how to get back the bytes of every tensor the entry changed)
and a ``lock`` file. Model loaders skip both: the folder is hidden and ``.undo`` is no weights
extension.

What an undo record holds is :mod:`erasekit.undo_record`'s concern.

Writes follow a write-ahead protocol, so that ``kill -9`` at any instant leaves a state that
the next erasekit command completes or rolls back:

apply:  write NNNN.undo (fsync) -> journal entry "pending" -> rewrite tensors (fsync) -> "committed"
revert: rebuild and verify the originals -> entry "reverting" -> write them (fsync) -> drop entry, NNNN.undo

:func:`Journal.recover` rolls a "pending" entry back and finishes a "reverting" one; both are
idempotent because they only ever write bytes verified against the original hashes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from . import _st
from ._parallel import map_threads
from .errors import TargetLockedError, TargetNotWritableError, UndoRecordError
from .undo_record import UndoTensor, read_residual, rebuild, sha256, undo_name

JOURNAL_VERSION = 2  # the newest this erasekit reads; a journal is saved as 1 while it holds no residual record
DIRNAME = ".erasekit"
WRITE_CHUNK = 1 << 20  # tensors are written in pieces that end on multiples of this in the file

TensorAt = Callable[[str, str], _st.TensorEntry]  # (weight file label, key) -> the tensor's place in its file


class TensorRecord(BaseModel):
    file: str  # weight file label: "text_encoder/model.safetensors" in a folder, "" for a single-file checkpoint
    key: str
    before_sha256: str
    after_sha256: str


class Entry(BaseModel):
    id: str
    state: Literal["pending", "committed", "reverting"]
    patch_id: str
    patch_title: str
    patch_path: str | None = None
    strength: float
    fingerprint: Literal["exact", "approx", "forced"]
    applied_at: str
    tensors: list[TensorRecord]
    undo: Literal["full", "residual"] = "full"  # "residual": NNNN.undo may hold residual records (journal version 2)

    @property
    def undo_file(self) -> str:
        return f"{self.id}.undo"


class JournalFile(BaseModel):
    erasekit_journal: int = 1
    entries: list[Entry] = []


def journal_dir(checkpoint: Path) -> Path:
    """Where a checkpoint's journal and lock live, from its resolved path: two spellings of one checkpoint
    (a symlink, a relative path) share one journal."""
    checkpoint = Path(checkpoint).resolve()
    if checkpoint.is_dir():
        return checkpoint / DIRNAME
    return checkpoint.parent / DIRNAME / checkpoint.name


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """Write ``data`` at ``offset`` in pieces that end on WRITE_CHUNK multiples of the file, so a write cut short
    ends on a page boundary even where a file system splits writes relative to their start."""
    view, pos = memoryview(data).cast("B"), 0
    while pos < len(view):
        end = min(len(view), pos + WRITE_CHUNK - (offset + pos) % WRITE_CHUNK)
        pos += os.pwrite(fd, view[pos:end], offset + pos)


class Journal:
    """The journal of one checkpoint. Create with :meth:`open`; mutate only inside :meth:`locked`."""

    def __init__(self, checkpoint: Path, files: dict[str, Path]) -> None:
        self.checkpoint = Path(checkpoint)
        self.dir = journal_dir(self.checkpoint)
        self.files = files  # label -> weight file path
        self.data = self._load()
        self._undo: dict[str, dict[tuple[str, str], UndoTensor]] = {}  # entry id -> its records, until a save

    # -- reading ---------------------------------------------------------------------------------
    def _load(self) -> JournalFile:
        path = self.dir / "journal.json"
        if not path.exists():
            return JournalFile()
        try:
            data = JournalFile.model_validate_json(path.read_bytes())
        except (OSError, ValidationError) as e:
            raise UndoRecordError(f"undo journal {path} is unreadable or corrupt ({type(e).__name__})",
                                  "restore it from a backup, or delete the folder to forget the applied patches") from None
        if data.erasekit_journal > JOURNAL_VERSION:
            raise UndoRecordError(f"undo journal {path} was written by a newer erasekit",
                                  "upgrade erasekit (pip install -U erasekit)")
        return data

    @property
    def entries(self) -> list[Entry]:
        return self.data.entries

    @property
    def committed(self) -> list[Entry]:
        return [e for e in self.entries if e.state == "committed"]

    def interrupted(self) -> list[Entry]:
        return [e for e in self.entries if e.state != "committed"]

    def read_undo(self, entry: Entry, tensor_at: TensorAt) -> dict[tuple[str, str], UndoTensor]:
        """The record of every tensor the entry changed (structure checked; values are checked when rebuilt)."""
        if entry.id in self._undo:
            return self._undo[entry.id]
        path = self.dir / entry.undo_file
        header = _st.read_header(path, err=UndoRecordError, what="undo record")
        out: dict[tuple[str, str], UndoTensor] = {}
        with open(path, "rb") as f:
            for rec in entry.tensors:
                name, ent = undo_name(rec.file, rec.key), tensor_at(rec.file, rec.key)
                if name in header.entries:
                    out[(rec.file, rec.key)] = UndoTensor(ent.dtype, ent.shape,
                                                          original=_st.read_raw(f, header.entries[name]))
                elif entry.undo == "residual":
                    out[(rec.file, rec.key)] = read_residual(header, f, name, ent, path, rec.key)
                else:
                    raise UndoRecordError(f"undo record {path} lacks {rec.key}", "it is damaged; revert is impossible")
        self._undo[entry.id] = out
        return out

    def _read(self, label: str, ent: _st.TensorEntry) -> bytes:
        with open(self.files[label], "rb") as f:
            return _st.read_raw(f, ent)

    def originals(self, entry: Entry, tensor_at: TensorAt,
                  current: dict[tuple[str, str], tuple[bytes, str]] | None = None) -> dict[tuple[str, str], bytes]:
        """Every tensor's bytes from before ``entry``, rebuilt from the tensors now (``current``: their bytes and
        sha256, else read) and verified against their recorded hashes. Raises :class:`UndoRecordError`; writes
        nothing."""
        undo, path, current = self.read_undo(entry, tensor_at), self.dir / entry.undo_file, current or {}

        def one(tr: TensorRecord) -> bytes:
            k, ent = (tr.file, tr.key), tensor_at(tr.file, tr.key)
            if undo[k].full:
                return rebuild(undo[k], b"", ent, entry.strength, tr, path)
            cur, cur_sha = current[k] if k in current else (self._read(tr.file, ent), None)
            return rebuild(undo[k], cur, ent, entry.strength, tr, path, cur_sha)

        return dict(zip(((r.file, r.key) for r in entry.tensors), map_threads(one, entry.tensors)))

    def pristine(self, label: str, key: str, current: bytes, tensor_at: TensorAt) -> bytes | None:
        """The tensor as it was before any committed entry changed it, rebuilt from its bytes now down the stack of
        undo records (down to the lowest full record, which needs no bytes now). None when no entry changed it, or
        when another program changed it since and only residual records lie below."""
        touching = [e for e in self.committed if any(r.file == label and r.key == key for r in e.tensors)]
        if not touching:
            return None
        records = [(e, self.read_undo(e, tensor_at)[(label, key)],
                    next(r for r in e.tensors if r.file == label and r.key == key)) for e in touching]
        lowest_full = next((i for i, (_, u, _) in enumerate(records) if u.full), None)
        if lowest_full is None and sha256(current) != records[-1][2].after_sha256:
            return None
        chain = records if lowest_full is None else records[:lowest_full + 1]
        data, ent = current, tensor_at(label, key)
        for e, undo, tr in reversed(chain):
            data = rebuild(undo, data, ent, e.strength, tr, self.dir / e.undo_file)
        return data

    # -- writing ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self) -> Iterator[Journal]:
        """Hold the checkpoint's writer lock (non-blocking: a second writer gets a clear error)."""
        from filelock import FileLock, Timeout

        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except PermissionError:
            raise TargetNotWritableError(f"cannot create the undo journal folder {self.dir} (permission denied)",
                                         "make the checkpoint's folder writable, or write a copy to an output elsewhere",
                                         option="output") from None
        lock = FileLock(str(self.dir / "lock"), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise TargetLockedError(f"another erasekit process is writing {self.checkpoint}",
                                    "wait for it to finish, then retry") from None
        try:
            self.data = self._load()
            self._undo.clear()
            yield self
        finally:
            lock.release()

    def save(self) -> None:
        self._undo.clear()  # ids are reused after a revert: cached records may be stale
        self.data.erasekit_journal = 2 if any(e.undo == "residual" for e in self.entries) else 1
        with _st.atomic_write(self.dir / "journal.json") as f:
            f.write(self.data.model_dump_json(indent=1).encode())

    def next_id(self) -> str:
        used = [int(e.id) for e in self.entries]
        return f"{(max(used) + 1 if used else 1):04d}"

    def write_undo(self, entry_id: str, records: dict[tuple[str, str], UndoTensor]) -> None:
        tensors: dict[str, tuple[str, tuple[int, ...], bytes]] = {}
        for (label, key), rec in records.items():
            tensors.update(rec.stored(undo_name(label, key)))
        _st.write_safetensors(self.dir / f"{entry_id}.undo", tensors, {"erasekit_undo": entry_id})

    def write_tensors(self, updates: dict[tuple[str, str], bytes], offsets: dict[tuple[str, str], int]) -> None:
        """Overwrite tensors in place at their byte offsets; fsync every file touched."""
        by_file: dict[str, list[tuple[int, bytes]]] = {}
        for (label, key), data in updates.items():
            by_file.setdefault(label, []).append((offsets[(label, key)], data))
        for label, writes in by_file.items():
            fd = os.open(self.files[label], os.O_RDWR)
            try:
                for off, data in sorted(writes, key=lambda w: w[0]):
                    _pwrite_all(fd, data, off)
                os.fsync(fd)
            finally:
                os.close(fd)

    def commit(self, entry: Entry, records: dict[tuple[str, str], UndoTensor], updates: dict[tuple[str, str], bytes],
               tensor_at: TensorAt) -> None:
        """Apply, write-ahead: the undo record (fsynced), the entry as "pending", the new tensor bytes (fsynced),
        the entry as "committed". A crash anywhere in between is rolled back by :meth:`recover`."""
        self.write_undo(entry.id, records)
        entry.undo = "full" if all(r.full for r in records.values()) else "residual"
        self.entries.append(entry)
        self.save()
        self.write_tensors(updates, {k: tensor_at(*k).begin for k in updates})
        entry.state = "committed"
        self.save()

    def revert(self, entry: Entry, tensor_at: TensorAt, restored: Any, where: str,
               current: dict[tuple[str, str], tuple[bytes, str]] | None = None) -> None:
        """Revert, write-ahead: the original bytes rebuilt and verified, the entry as "reverting", the bytes written
        (fsynced), each checked with ``restored(record)``, then the entry and its undo record dropped. A crash is
        finished by :meth:`recover`."""
        originals = self.originals(entry, tensor_at, current)
        entry.state = "reverting"
        self.save()
        self.write_tensors(originals, {k: tensor_at(*k).begin for k in originals})
        if not all(map_threads(restored, entry.tensors)):
            raise UndoRecordError(f"restored tensors of {where} do not match their recorded hashes",
                                  "the disk may be failing; restore from a backup")
        self.entries.remove(entry)
        self.save()
        (self.dir / entry.undo_file).unlink(missing_ok=True)

    def recover(self, tensor_at: TensorAt) -> list[Entry]:
        """Finish or roll back interrupted entries. ``tensor_at(label, key)`` gives a tensor's place in its file."""
        done = []
        for entry in self.interrupted():
            undo_path = self.dir / entry.undo_file
            if not undo_path.exists():  # the undo record is written before the entry, so only a deletion explains this
                raise UndoRecordError(f"an interrupted {'revert' if entry.state == 'reverting' else 'apply'} in "
                                      f"{self.dir} lost its undo record {entry.undo_file}",
                                      "restore the checkpoint from a backup")
            originals = self.originals(entry, tensor_at)
            self.write_tensors(originals, {k: tensor_at(*k).begin for k in originals})
            self.data.entries.remove(entry)
            self.save()
            with contextlib.suppress(FileNotFoundError):
                undo_path.unlink()
            done.append(entry)
        # Undo files no entry refers to (a crash between writing one and the journal) are garbage.
        live = {e.undo_file for e in self.entries}
        for p in self.dir.glob("*.undo"):
            if p.name not in live:
                p.unlink()
        return done


def copy_journal(src_checkpoint: Path, dst_dir: Path) -> None:
    """Copy a checkpoint's journal (for ``-o`` outputs, which inherit the source's applied patches)."""
    src = journal_dir(src_checkpoint)
    if not (src / "journal.json").exists():
        return
    dst_dir.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.name != "lock":
            shutil.copy2(p, dst_dir / p.name)


def entry_summary(entry: Entry) -> dict[str, Any]:
    return {"id": entry.id, "state": entry.state, "title": entry.patch_title, "patch_id": entry.patch_id,
            "strength": entry.strength, "fingerprint": entry.fingerprint, "applied_at": entry.applied_at,
            "tensors": len(entry.tensors)}
