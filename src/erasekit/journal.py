"""The undo journal kept beside a checkpoint that erasekit has written to.

Layout on disk (see docs/format.md, "Undo journal"):

* a diffusers or transformers folder ``F``: ``F/.erasekit/``
* a single file ``D/name.safetensors``: ``D/.erasekit/name.safetensors/``

holding ``journal.json`` (the list of applied patches, oldest first), one ``NNNN.undo`` per
entry (a safetensors file with the original bytes of every tensor the entry changed, named
``<weight file>::<key>``) and a ``lock`` file. Model loaders skip both: the folder is hidden
and ``.undo`` is no weights extension.

Writes follow a write-ahead protocol, so that ``kill -9`` at any instant leaves a state that
the next erasekit command completes or rolls back:

apply:  write NNNN.undo (fsync) -> journal entry "pending" -> rewrite tensors (fsync) -> "committed"
revert: journal entry "reverting" -> restore tensors (fsync) -> drop entry -> delete NNNN.undo

:func:`Journal.recover` rolls a "pending" entry back and finishes a "reverting" one; both are
idempotent because they only ever write the original bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from . import _st
from .errors import TargetLockedError, TargetNotWritableError, UndoRecordError

JOURNAL_VERSION = 1
DIRNAME = ".erasekit"


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

    @property
    def undo_file(self) -> str:
        return f"{self.id}.undo"


class JournalFile(BaseModel):
    erasekit_journal: int = JOURNAL_VERSION
    entries: list[Entry] = []


def journal_dir(checkpoint: Path) -> Path:
    """Where a checkpoint's journal and lock live, from its resolved path: two spellings of one checkpoint
    (a symlink, a relative path) share one journal."""
    checkpoint = Path(checkpoint).resolve()
    if checkpoint.is_dir():
        return checkpoint / DIRNAME
    return checkpoint.parent / DIRNAME / checkpoint.name


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _undo_name(label: str, key: str) -> str:
    return f"{label}::{key}"


class Journal:
    """The journal of one checkpoint. Create with :meth:`open`; mutate only inside :meth:`locked`."""

    def __init__(self, checkpoint: Path, files: dict[str, Path]) -> None:
        self.checkpoint = Path(checkpoint)
        self.dir = journal_dir(self.checkpoint)
        self.files = files  # label -> weight file path
        self.data = self._load()

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

    def read_undo(self, entry: Entry) -> dict[tuple[str, str], bytes]:
        """Original bytes of every tensor the entry changed, verified against their recorded hashes."""
        path = self.dir / entry.undo_file
        header = _st.read_header(path, err=UndoRecordError, what="undo record")
        out: dict[tuple[str, str], bytes] = {}
        with open(path, "rb") as f:
            for rec in entry.tensors:
                ent = header.entries.get(_undo_name(rec.file, rec.key))
                if ent is None:
                    raise UndoRecordError(f"undo record {path} lacks {rec.key}", "it is damaged; revert is impossible")
                raw = _st.read_raw(f, ent)
                if sha256(raw) != rec.before_sha256:
                    raise UndoRecordError(f"undo record {path} is corrupt ({rec.key} does not match its hash)",
                                          "it is damaged; revert is impossible")
                out[(rec.file, rec.key)] = raw
        return out

    def pristine_source(self, label: str, key: str) -> Entry | None:
        """The oldest committed entry that changed this tensor (its undo record holds the original)."""
        for e in self.committed:
            if any(r.file == label and r.key == key for r in e.tensors):
                return e
        return None

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
            yield self
        finally:
            lock.release()

    def save(self) -> None:
        with _st.atomic_write(self.dir / "journal.json") as f:
            f.write(self.data.model_dump_json(indent=1).encode())

    def next_id(self) -> str:
        used = [int(e.id) for e in self.entries]
        return f"{(max(used) + 1 if used else 1):04d}"

    def write_undo(self, entry_id: str, originals: dict[tuple[str, str], tuple[str, tuple[int, ...], bytes]]) -> None:
        tensors = {_undo_name(label, key): v for (label, key), v in originals.items()}
        _st.write_safetensors(self.dir / f"{entry_id}.undo", tensors, {"erasekit_undo": entry_id})

    def write_tensors(self, updates: dict[tuple[str, str], bytes], offsets: dict[tuple[str, str], int]) -> None:
        """Overwrite tensors in place at their byte offsets; fsync every file touched."""
        by_file: dict[str, list[tuple[int, bytes]]] = {}
        for (label, key), data in updates.items():
            by_file.setdefault(label, []).append((offsets[(label, key)], data))
        for label, writes in by_file.items():
            with open(self.files[label], "r+b") as f:
                for off, data in sorted(writes):
                    f.seek(off)
                    f.write(data)
                f.flush()
                os.fsync(f.fileno())

    def commit(self, entry: Entry, originals: dict[tuple[str, str], tuple[str, tuple[int, ...], bytes]],
               updates: dict[tuple[str, str], bytes], offsets_for: Any) -> None:
        """Apply, write-ahead: the undo record (fsynced), the entry as "pending", the new tensor bytes (fsynced),
        the entry as "committed". A crash anywhere in between is rolled back by :meth:`recover`."""
        self.write_undo(entry.id, originals)
        self.entries.append(entry)
        self.save()
        self.write_tensors(updates, {k: offsets_for(*k) for k in updates})
        entry.state = "committed"
        self.save()

    def revert(self, entry: Entry, offsets_for: Any, restored: Any, where: str) -> None:
        """Revert, write-ahead: the entry as "reverting", the original bytes back (fsynced), each checked with
        ``restored(record)``, then the entry and its undo record dropped. A crash is finished by :meth:`recover`."""
        originals = self.read_undo(entry)
        entry.state = "reverting"
        self.save()
        self.write_tensors(originals, {k: offsets_for(*k) for k in originals})
        if not all(restored(r) for r in entry.tensors):
            raise UndoRecordError(f"restored tensors of {where} do not match their recorded hashes",
                                  "the disk may be failing; restore from a backup")
        self.entries.remove(entry)
        self.save()
        (self.dir / entry.undo_file).unlink(missing_ok=True)

    def recover(self, offsets_for: Any) -> list[Entry]:
        """Finish or roll back interrupted entries. ``offsets_for(label, key)`` gives a tensor's byte offset."""
        done = []
        for entry in self.interrupted():
            undo_path = self.dir / entry.undo_file
            if undo_path.exists():
                originals = self.read_undo(entry)
                self.write_tensors(originals, {k: offsets_for(*k) for k in originals})
            else:  # the undo record is written before the entry, so only a deletion explains this
                raise UndoRecordError(f"an interrupted {'revert' if entry.state == 'reverting' else 'apply'} in "
                                      f"{self.dir} lost its undo record {entry.undo_file}",
                                      "restore the checkpoint from a backup")
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
