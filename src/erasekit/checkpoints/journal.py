"""The undo journal kept beside a checkpoint that erasekit has written to.

Layout on disk (see docs/format.md, "Undo journal"):

* a diffusers or transformers folder ``F``: ``F/.erasekit/``
* a single file ``D/name.safetensors``: ``D/.erasekit/name.safetensors/``

holding ``journal.json`` (the list of applied patches, oldest first, and a stamp of each weight file as the
last write left it), one ``NNNN.undo`` per entry (a safetensors file that says how to get back the bytes of
every tensor the entry changed) and a ``lock`` file. Model loaders skip both: the folder is hidden and
``.undo`` is no weights extension. The folder is made by the first write, never by a reader or a refused
command.

What an undo record holds is :mod:`erasekit.checkpoints.undo_record`'s concern.

Writes follow a write-ahead protocol, so that ``kill -9`` at any instant leaves a state that
the next erasekit command completes or rolls back:

apply:  write every NNNN.undo (fsync) -> their entries "pending" -> rewrite tensors (fsync) -> all "committed"
revert: rebuild and verify the originals -> entry "reverting" -> write them (fsync) -> drop entry, NNNN.undo

:meth:`Journal.reconcile` rolls "pending" entries back (newest first: the patches of one command go in all
together or not at all) and finishes a "reverting" one; it is idempotent because it only ever writes bytes
verified against the original hashes. Before writing, it proves that the journal describes the file there: the
file's size and header are those it stamped, and every tensor an entry touched holds, page by page, its bytes
before or after that entry. A journal that does not describe the file (the file was replaced) is set aside,
kept in a folder named ``set-aside-<time>`` beside it, with a warning; nothing is written to the file.

Two files may hold each other's stamps (their names were swapped): every command refuses them, and the journal
describes them again once their names are back. A tensor that a committed entry changed and another program wrote
since is recorded in ``changed`` (:meth:`Journal.changed_since`), for readers to say that the file no longer holds
that patch whole.

Readers take the lock only to recover, set aside, stamp or delete undo records no entry names
(:mod:`erasekit.checkpoints.in_place`): ``generation`` grows with every
save, and a reader that sees the same generation (and no interrupted entry) before and after reading the tensors
saw no write (:func:`generation`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import struct
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, StringConstraints, ValidationError

from .._parallel import map_threads
from ..errors import ErasekitWarning, ForeignBytesError, TargetLockedError, TargetNotWritableError, UndoRecordError
from ..format import _st
from .undo_record import (
    TensorRecord,
    UndoTensor,
    check_before_or_after,
    read_full,
    read_residual,
    rebuild,
    sha256,
    undo_name,
)

JOURNAL_VERSION = 2  # the newest this erasekit reads; a journal is saved as 1 while it holds no residual record
DIRNAME = ".erasekit"
WRITE_CHUNK = 1 << 20  # tensors are written in pieces that end on multiples of this in the file
SET_ASIDE = "set-aside-"  # a journal that does not describe its file is moved into <journal dir>/set-aside-<time>/

TensorAt = Callable[[str, str], _st.TensorEntry]  # (weight file label, key) -> the tensor's place in its file


class Entry(BaseModel):
    id: Annotated[str, StringConstraints(pattern=r"^[0-9]{4,18}$")]  # names NNNN.undo: digits only, never a path
    state: Literal["pending", "committed", "reverting"]
    patch_id: str
    patch_title: str
    patch_path: str | None = None
    strength: float
    fingerprint: Literal["exact", "approx", "forced"]
    applied_at: str
    tensors: list[TensorRecord]
    undo: Literal["full", "residual"] = "full"  # "residual": NNNN.undo may hold residual records (journal version 2)
    parts: dict[str, str] = {}  # a merged patch: the patches it was made of (patch_id -> title), nested ones too

    @property
    def undo_file(self) -> str:
        return f"{self.id}.undo"


class FileStamp(BaseModel):
    """A weight file as a write left it. Size and header say which file it is (a file of another layout, or with
    other metadata, is not the one the journal describes); inode and modification time say whether anything
    wrote it since (when they differ, the tensors are checked against the journal's hashes)."""

    size: int
    header_sha256: str
    mtime_ns: int
    inode: int


class JournalFile(BaseModel):
    erasekit_journal: int = 1
    generation: int = 0  # grows with every save (to the time in ns, at least: a journal made anew never repeats one)
    files: dict[str, FileStamp] = {}  # weight file label -> its stamp at the last save
    # weight file label -> tensor key -> the id of the committed entry whose bytes it no longer holds (another
    # program wrote it after that entry), as the last save found them
    changed: dict[str, dict[str, str]] = {}
    entries: list[Entry] = []


def journal_dir(checkpoint: Path) -> Path:
    """Where a checkpoint's journal and lock live, from its resolved path: two spellings of one checkpoint
    (a symlink, a relative path) share one journal."""
    checkpoint = Path(checkpoint).resolve()
    if checkpoint.is_dir():
        return checkpoint / DIRNAME
    return checkpoint.parent / DIRNAME / checkpoint.name


def file_stamp(path: Path) -> FileStamp:
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        digest = hashlib.sha256(head + f.read(min(n, _st.MAX_HEADER_BYTES))).hexdigest()
    return FileStamp(size=st.st_size, header_sha256=digest, mtime_ns=st.st_mtime_ns, inode=st.st_ino)


def generation(checkpoint: Path) -> tuple[int, bool] | None:
    """What a reader compares before and after reading a checkpoint's tensors: the journal's generation and
    whether an entry is interrupted (None: no journal). Equal answers with no interruption: no write in between."""
    try:
        data = JournalFile.model_validate_json((journal_dir(checkpoint) / "journal.json").read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValidationError):
        return (-1, True)
    return data.generation, any(e.state != "committed" for e in data.entries)


def _write_all(f: Any, data: bytes, offset: int) -> None:
    """Write ``data`` at ``offset`` of the open file ``f`` in pieces that end on WRITE_CHUNK multiples of the file,
    so a write cut short ends on a page boundary even where a file system splits writes relative to their start.
    Only seek and write: portable (Windows has no ``os.pwrite``)."""
    view, pos = memoryview(data).cast("B"), 0
    while pos < len(view):
        end = min(len(view), pos + WRITE_CHUNK - (offset + pos) % WRITE_CHUNK)
        f.seek(offset + pos)
        pos += f.write(view[pos:end])


def _held_elsewhere(path: Path, e: OSError) -> TargetNotWritableError:
    return TargetNotWritableError(
        f"cannot write {path} ({e.strerror}): it is read-only, or another program holds it "
        "open (on Windows, a UI with the model loaded)",
        "close the model in that program (or make the file writable), then retry",
    )


class Journal:
    """The journal of one checkpoint. Create with :meth:`open`; mutate only inside :meth:`locked`."""

    def __init__(
        self,
        checkpoint: Path,
        files: dict[str, Path],
        hashes: dict[tuple[str, str], tuple[FileStamp, str]] | None = None,
    ) -> None:
        self.checkpoint = Path(checkpoint)
        self.dir = journal_dir(self.checkpoint)
        self.files = files  # label -> weight file path
        self.data = self._load()
        self._undo: dict[str, dict[tuple[str, str], UndoTensor]] = {}  # entry id -> its records, until a save
        self._changed: dict[tuple[str, str], str] | None = None  # changed_since, once found
        # (label, key) -> (its file's stamp when hashed, sha256): shared by the journals of one command's checkpoint
        self._hashes = {} if hashes is None else hashes

    # -- reading ---------------------------------------------------------------------------------
    def _load(self) -> JournalFile:
        path = self.dir / "journal.json"
        if not path.exists():
            return JournalFile()
        try:
            data = JournalFile.model_validate_json(path.read_bytes())
        except (OSError, ValidationError) as e:
            raise UndoRecordError(
                f"undo journal {path} is unreadable or corrupt ({type(e).__name__})",
                "restore it from a backup, or delete the folder to forget the applied patches",
            ) from None
        if data.erasekit_journal > JOURNAL_VERSION:
            raise UndoRecordError(
                f"undo journal {path} was written by a newer erasekit", "upgrade erasekit (pip install -U erasekit)"
            )
        return data

    @property
    def entries(self) -> list[Entry]:
        return self.data.entries

    @property
    def committed(self) -> list[Entry]:
        return [e for e in self.entries if e.state == "committed"]

    def interrupted(self) -> list[Entry]:
        return [e for e in self.entries if e.state != "committed"]

    def _stamps_now(self) -> dict[str, FileStamp]:
        return {label: file_stamp(path) for label, path in self.files.items()}

    def needs_reconcile(self) -> bool:
        """Whether the journal has entries and an interrupted one, or a weight file is not as it stamped it; or it
        has undo records no entry names (:meth:`strays`)."""
        written = bool(self.entries) and (bool(self.interrupted()) or self._stamps_now() != self.data.files)
        return written or bool(self.strays())

    def strays(self) -> list[Path]:
        """Undo records no entry names: what a writer killed between writing one and the journal (apply), or
        between the journal and deleting one (revert, recovery), leaves. Every reader goes by the entries, so
        they are ignored; the next command that takes the lock deletes them (:meth:`reconcile`)."""
        live = {e.undo_file for e in self.entries}
        return sorted(p for p in self.dir.glob("*.undo") if p.name not in live)

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
                    out[(rec.file, rec.key)] = read_full(header, f, name, ent, path, rec.key)
                elif entry.undo == "residual":
                    out[(rec.file, rec.key)] = read_residual(header, f, name, ent, path, rec.key)
                else:
                    raise UndoRecordError(f"undo record {path} lacks {rec.key}", "it is damaged; revert is impossible")
        self._undo[entry.id] = out
        return out

    def _read(self, label: str, ent: _st.TensorEntry) -> bytes:
        with open(self.files[label], "rb") as f:
            return _st.read_raw(f, ent)

    def originals(
        self,
        entry: Entry,
        tensor_at: TensorAt,
        current: dict[tuple[str, str], tuple[bytes, str]] | None = None,
        prove: bool = False,
        skip: set[tuple[str, str]] | frozenset = frozenset(),
        older: set[tuple[str, str]] | frozenset = frozenset(),
    ) -> dict[tuple[str, str], bytes]:
        """Every tensor's bytes from before ``entry``, rebuilt from the tensors now (``current``: their bytes and
        sha256, else read) and verified against their recorded hashes. ``prove``: first check that the bytes now
        are, page by page, those before or after the entry, also where a full record would not need them
        (:class:`ForeignBytesError` if not). ``skip``: tensors left out. ``older``: tensors an older interrupted
        entry of the same command also changed: where such a tensor is not proven for this entry, this entry never
        wrote it (the older one's writes come first) and it is left out, for the older entry to restore. Raises
        :class:`UndoRecordError`; writes nothing."""
        undo, path, current = self.read_undo(entry, tensor_at), self.dir / entry.undo_file, current or {}

        def one(tr: TensorRecord) -> bytes | None:
            k, ent = (tr.file, tr.key), tensor_at(tr.file, tr.key)
            if undo[k].full and not prove:
                return rebuild(undo[k], b"", ent, entry.strength, tr, path)
            cur, cur_sha = current[k] if k in current else (self._read(tr.file, ent), None)
            try:
                if prove:
                    check_before_or_after(undo[k], cur, ent, tr, cur_sha, reverting=entry.state == "reverting")
                return rebuild(undo[k], cur, ent, entry.strength, tr, path, cur_sha)
            except ForeignBytesError:
                if k in older:
                    return None
                raise

        wanted = [r for r in entry.tensors if (r.file, r.key) not in skip]
        found = zip(((r.file, r.key) for r in wanted), map_threads(one, wanted))
        return {k: data for k, data in found if data is not None}

    def last_changes(self) -> dict[tuple[str, str], tuple[Entry, str]]:
        """Each tensor a committed entry changed: the newest such entry, and the sha256 it left the tensor with."""
        return {(r.file, r.key): (e, r.after_sha256) for e in self.committed for r in e.tensors}

    def pristine(self, label: str, key: str, current: bytes, tensor_at: TensorAt) -> bytes | None:
        """The tensor as it was before any committed entry changed it, rebuilt from its bytes now down the stack of
        undo records (down to the lowest full record, which needs no bytes now). None when no entry changed it, or
        when another program changed it since and only residual records lie below."""
        touching = [e for e in self.committed if any(r.file == label and r.key == key for r in e.tensors)]
        if not touching:
            return None
        records = [
            (
                e,
                self.read_undo(e, tensor_at)[(label, key)],
                next(r for r in e.tensors if r.file == label and r.key == key),
            )
            for e in touching
        ]
        lowest_full = next((i for i, (_, u, _) in enumerate(records) if u.full), None)
        if lowest_full is None and sha256(current) != records[-1][2].after_sha256:
            return None
        chain = records if lowest_full is None else records[: lowest_full + 1]
        data, ent = current, tensor_at(label, key)
        for e, undo, tr in reversed(chain):
            data = rebuild(undo, data, ent, e.strength, tr, self.dir / e.undo_file)
        return data

    def foreign(self, tensor_at: TensorAt) -> str | None:
        """Why the journal does not describe the weight files there (None: it does); reads, never writes. Size and
        header must be as stamped; where a file was written since (inode or time differ, or no stamp), each
        committed entry must still be there: some tensor it was the last to change (and no interrupted entry
        touches) holds its after bytes (another program's edit of some of them leaves the entry, which then needs a
        forced revert); and each interrupted entry's tensors that no newer one touches hold, page by page, its
        bytes before or after it."""
        gone = sorted({r.file for e in self.entries for r in e.tensors} - set(self.files))
        if gone:
            return f"it names the weight file {gone[0] or self.checkpoint.name}, which is not there"
        for entry in self.interrupted():
            self.check_undo_file(entry)
        now = self._stamps_now()
        self._refuse_swapped(now)
        for label, stamp in self.data.files.items():
            if label in now and (now[label].size, now[label].header_sha256) != (stamp.size, stamp.header_sha256):
                return f"{self.files[label].name} has another size or header than the file it describes"
        if now == self.data.files:
            return None
        busy = {(r.file, r.key) for e in self.interrupted() for r in e.tensors}
        last, changed = self.last_changes(), self.changed_since(tensor_at)
        for entry in self.committed:
            mine = [k for k, (e, _) in last.items() if e is entry and k not in busy]
            if mine and all(k in changed for k in mine):
                return f"no tensor that patch '{entry.patch_title}' changed is as it left it"
        proven: set[tuple[str, str]] = set()  # a tensor several interrupted entries changed: proven for one of them
        for entry, older in reversed(self._interrupted_with_older()):
            try:
                proven |= set(self.originals(entry, tensor_at, prove=True, skip=proven, older=older))
            except ForeignBytesError as e:
                return e.problem
        return None

    def _refuse_swapped(self, now: dict[str, FileStamp]) -> None:
        """Refuse weight files that hold each other's size and header, as the journal stamped them, since their
        names were swapped (two shards renamed, their index with them): setting the journal aside would lose the
        patches applied there, and swapping the names back makes it describe the files again."""
        stamped = {(st.size, st.header_sha256): label for label, st in self.data.files.items()}
        moved = {
            label: stamped[(st.size, st.header_sha256)]
            for label, st in now.items()
            if label in self.data.files and stamped.get((st.size, st.header_sha256), label) != label
        }
        if not moved or set(moved.values()) != set(moved):  # not a renaming of the same files among themselves
            return
        name, was = next(iter(moved.items()))
        others = f" ({len(moved) - 2} more files too)" if len(moved) > 2 else ""
        raise UndoRecordError(
            f"{self.files[name].name} of {self.checkpoint} is the file its undo journal knows as "
            f"{self.files[was].name}{' and the other way round' if moved.get(was) == name else ''}{others}: their "
            "names were swapped since patches were applied in place; nothing was written",
            "swap their names back (in the index file too, where one names them) to revert or apply patches there",
        )

    def changed_since(self, tensor_at: TensorAt) -> dict[tuple[str, str], str]:
        """Each tensor a committed entry was the last to change (and no interrupted entry touches) that no longer holds
        the bytes it left, as another program's write leaves it, with that entry's id: in a weight file as the last
        save stamped it, as that save found them (``changed`` in journal.json); in one written since, by its hash now.
        Reads, never writes."""
        if self._changed is None:
            now = self._stamps_now()
            written = {label for label in self.files if now[label] != self.data.files.get(label)}
            busy = {(r.file, r.key) for e in self.interrupted() for r in e.tensors}
            last = {k: v for k, v in self.last_changes().items() if k not in busy and k[0] in self.files}
            hashed = [k for k in last if k[0] in written]
            hashes = map_threads(lambda k: self._hash_now(k, now[k[0]], tensor_at), hashed)
            found = {k for k, h in zip(hashed, hashes) if h != last[k][1]}
            found |= {
                k for k in last if k[0] not in written and self.data.changed.get(k[0], {}).get(k[1]) == last[k][0].id
            }
            self._changed = {k: last[k][0].id for k in sorted(found)}
        return self._changed

    def _hash_now(self, k: tuple[str, str], stamp: FileStamp, tensor_at: TensorAt) -> str:
        """The sha256 of tensor ``k``'s bytes now, its file stamped ``stamp``: hashed once while the file keeps it."""
        seen = self._hashes.get(k)
        if seen is not None and seen[0] == stamp:
            return seen[1]
        digest = sha256(self._read(k[0], tensor_at(*k)))
        self._hashes[k] = (stamp, digest)
        return digest

    def _still_changed(self) -> dict[str, dict[str, str]]:
        """What ``changed`` in journal.json says after this command: the tensors found changed that are still last
        changed by the same entry (a revert restores a tensor's bytes, and apply refuses to change such a tensor)."""
        found = (
            self._changed
            if self._changed is not None
            else {(label, key): eid for label, keys in self.data.changed.items() for key, eid in keys.items()}
        )
        last = self.last_changes()
        out: dict[str, dict[str, str]] = {}
        for (label, key), eid in found.items():
            if (label, key) in last and last[(label, key)][0].id == eid:
                out.setdefault(label, {})[key] = eid
        return out

    def _interrupted_with_older(self) -> list[tuple[Entry, set[tuple[str, str]]]]:
        """Each interrupted entry, oldest first, with the tensors that older interrupted entries changed."""
        out: list[tuple[Entry, set[tuple[str, str]]]] = []
        seen: set[tuple[str, str]] = set()
        for entry in self.interrupted():
            out.append((entry, set(seen)))
            seen |= {(r.file, r.key) for r in entry.tensors}
        return out

    def check_undo_file(self, entry: Entry) -> None:
        if not (self.dir / entry.undo_file).exists():  # written before the entry: only a deletion explains this
            raise UndoRecordError(
                f"an interrupted {'revert' if entry.state == 'reverting' else 'apply'} in "
                f"{self.dir} lost its undo record {entry.undo_file}",
                "restore the checkpoint from a backup",
            )

    # -- writing ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self, wait: float = 0) -> Iterator[Journal]:
        """Hold the checkpoint's writer lock, waiting up to ``wait`` seconds for another holder (a second writer gets
        a clear error at once). A journal folder made for the lock is removed again when the block wrote no journal
        (a refused command leaves nothing)."""
        from filelock import FileLock, Timeout

        made = [d for d in (self.dir.parent, self.dir) if not d.exists()]
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except PermissionError:
            raise TargetNotWritableError(
                f"cannot create the undo journal folder {self.dir} (permission denied)",
                "make the checkpoint's folder writable, or write a copy to an output elsewhere",
                option="output",
            ) from None
        lock = FileLock(str(self.dir / "lock"), timeout=wait)
        try:
            lock.acquire()
        except Timeout:
            raise TargetLockedError(
                f"another erasekit process is writing {self.checkpoint}", "wait for it to finish, then retry"
            ) from None
        try:
            self.data = self._load()
            self._undo.clear()
            self._changed = None
            yield self
        finally:
            unmake = made and not (self.dir / "journal.json").exists()
            if unmake:  # while holding the lock where the system allows it (POSIX), else just after (Windows)
                with contextlib.suppress(OSError):
                    (self.dir / "lock").unlink()
            lock.release()
            if unmake:
                with contextlib.suppress(OSError):
                    (self.dir / "lock").unlink(missing_ok=True)
                    for d in reversed(made):
                        d.rmdir()

    def save(self) -> None:
        self._undo.clear()  # ids are reused after a revert: cached records may be stale
        self.data.erasekit_journal = 2 if any(e.undo == "residual" for e in self.entries) else 1
        self.data.generation = max(
            self.data.generation + 1, time.time_ns()
        )  # a new journal does not repeat an old one's
        self.data.files = self._stamps_now()
        self.data.changed = self._still_changed()
        self._changed = {(label, key): eid for label, keys in self.data.changed.items() for key, eid in keys.items()}
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
            try:
                f = open(self.files[label], "r+b", buffering=0)
            except PermissionError as e:
                raise _held_elsewhere(self.files[label], e) from None
            with f:
                for off, data in sorted(writes, key=lambda w: w[0]):
                    _write_all(f, data, off)
                os.fsync(f.fileno())

    def commit(
        self,
        batch: list[tuple[Entry, dict[tuple[str, str], UndoTensor], dict[tuple[str, str], bytes]]],
        tensor_at: TensorAt,
    ) -> None:
        """Apply the patches of one command, all or none, write-ahead: every undo record (fsynced), every entry as
        "pending", each patch's tensor bytes in order (fsynced), then every entry as "committed". A crash anywhere
        in between is rolled back by the next :meth:`reconcile`; an error here (a full disk, an I/O error) is
        rolled back at once (and, should that fail too, by the next command; so is an interrupt)."""
        try:
            for entry, records, _ in batch:
                self.write_undo(entry.id, records)
                entry.undo = "full" if all(r.full for r in records.values()) else "residual"
                self.entries.append(entry)
            self.save()
            for _, _, updates in batch:
                self.write_tensors(updates, {k: tensor_at(*k).begin for k in updates})
            for entry, _, _ in batch:
                entry.state = "committed"
            self.save()
        except Exception:
            with contextlib.suppress(Exception):
                self.data = self._load()  # what reached the disk
                self._undo.clear()
                self._changed = None
                self.reconcile(tensor_at)
            raise
        self.drop_strays()

    def revert(
        self,
        entry: Entry,
        tensor_at: TensorAt,
        restored: Any,
        where: str,
        current: dict[tuple[str, str], tuple[bytes, str]] | None = None,
    ) -> bool:
        """Revert, write-ahead: the original bytes rebuilt and verified, the entry as "reverting", the bytes written
        (fsynced), each checked with ``restored(record)``, then the entry and its undo record dropped. A crash is
        finished by :meth:`reconcile`. Returns whether every restored tensor matched its recorded hash (else
        :class:`UndoRecordError`)."""
        originals = self.originals(entry, tensor_at, current)
        entry.state = "reverting"
        self.save()
        self.write_tensors(originals, {k: tensor_at(*k).begin for k in originals})
        verified = all(map_threads(restored, entry.tensors))
        if not verified:
            raise UndoRecordError(
                f"restored tensors of {where} do not match their recorded hashes",
                "the disk may be failing; restore from a backup",
            )
        self.entries.remove(entry)
        self.save()
        (self.dir / entry.undo_file).unlink(missing_ok=True)
        self.drop_strays()
        return verified

    def reconcile(self, tensor_at: TensorAt, stamp: bool = True) -> list[Entry]:
        """Under the lock: make the journal describe the weight files or set it aside. Interrupted entries are
        finished or rolled back, newest first, each only after its tensors are proven to hold its before or after
        bytes; stamps of files written since are renewed once their tensors are checked, and undo records no entry
        names are deleted, where ``stamp`` (a writer, which may yet refuse, passes False: its own save stamps them
        and it deletes them once it writes, and a refusal leaves every file as it was). Returns the entries rolled
        back or finished."""
        reason = self.foreign(tensor_at) if self.entries else None
        if reason is not None:
            self.set_aside(reason)
            return []
        done: list[Entry] = []
        for entry, older in reversed(self._interrupted_with_older()):
            undo_path = self.dir / entry.undo_file
            self.check_undo_file(entry)
            try:
                originals = self.originals(entry, tensor_at, prove=True, older=older)
            except ForeignBytesError as e:
                self.set_aside(e.problem)
                return done
            self.write_tensors(originals, {k: tensor_at(*k).begin for k in originals})
            self.data.entries.remove(entry)
            self.save()
            with contextlib.suppress(FileNotFoundError):
                undo_path.unlink()
            done.append(entry)
        if stamp and self.entries and self._stamps_now() != self.data.files:
            self.save()  # the files hold what the journal says: stamp them as they are
        if stamp or done:
            self.drop_strays()
        return done

    def drop_strays(self) -> None:
        """Under the lock: delete the undo records no entry names (:meth:`strays`), as a command that writes (or a
        reader that stamps) does; one refused before it writes leaves them."""
        for p in self.strays():
            with contextlib.suppress(OSError):  # garbage: the next command tries again
                p.unlink()

    def set_aside(self, reason: str) -> Path:
        """Move the journal and its undo records into ``set-aside-<time>/`` beside them, and warn: the journal
        describes another file than the one there. Nothing is written to the weight files."""
        folder = self.dir / f"{SET_ASIDE}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        n = 1
        while folder.exists() or folder.is_symlink():
            n += 1
            folder = self.dir / f"{SET_ASIDE}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{n}"
        folder.mkdir()
        # the undo files first: a journal.json left behind by a crash here still names them (none is swept away)
        for p in [*(self.dir / e.undo_file for e in self.entries), self.dir / "journal.json"]:
            if p.exists():
                os.replace(p, folder / p.name)
        _st.fsync_dir(self.dir)
        self.data, self._undo, self._changed = JournalFile(), {}, None
        warnings.warn(
            ErasekitWarning(
                f"the undo journal of {self.checkpoint} does not describe the file there ({reason}): it was set aside in "
                f"{folder} and nothing was written to the file; if the file was replaced on purpose, delete that folder"
            ),
            stacklevel=2,
        )
        return folder


def copy_journal(src_checkpoint: Path, dst_dir: Path) -> None:
    """Copy a checkpoint's journal (for ``-o`` outputs, which inherit the source's applied patches)."""
    src = journal_dir(src_checkpoint)
    if not (src / "journal.json").exists():
        return
    dst_dir.mkdir(parents=True, exist_ok=True)
    for p in [src / "journal.json", *(src / name for name in named_undo_files(src))]:
        shutil.copy2(p, dst_dir / p.name)


def named_undo_files(folder: Path) -> set[str]:
    """The undo records the journal in ``folder`` names (a copy leaves out the others: :meth:`Journal.strays`)."""
    try:
        return {e.undo_file for e in JournalFile.model_validate_json((folder / "journal.json").read_bytes()).entries}
    except (OSError, ValidationError):
        return {p.name for p in folder.glob("*.undo")}  # an unreadable journal is copied as it is, for its reader


def entry_summary(entry: Entry) -> dict[str, Any]:
    return {
        "id": entry.id,
        "state": entry.state,
        "title": entry.patch_title,
        "patch_id": entry.patch_id,
        "strength": entry.strength,
        "fingerprint": entry.fingerprint,
        "applied_at": entry.applied_at,
        "tensors": len(entry.tensors),
    }
