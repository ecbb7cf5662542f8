"""A checkpoint with patches applied in place, as its readers see it: its undo journal checked against the files
there (:meth:`erasekit.checkpoints.journal.Journal.reconcile`), reads of one state of it while another process may write it,
the patches applied and the bytes below them (base fingerprints are of those).

Writers (:mod:`erasekit.checkpoints.apply`) build on this; it imports no writer.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ..errors import ErasekitError, ErasekitWarning, TargetLockedError, TargetNotWritableError, UndoRecordError
from ..format import _st
from ..format.patchfile import Patch
from .compat import Stacked, applied_twice, base_statuses, slot_map
from .journal import Entry, Journal, TensorAt, generation
from .layouts import Checkpoint, WeightFile
from .undo_record import TensorRecord, sha256

T = TypeVar("T")


def tensor_places(ckpt: Checkpoint) -> TensorAt:
    by_label = {f.label: f for f in ckpt.disk_files}

    def at(label: str, key: str) -> _st.TensorEntry:
        wf = by_label.get(label)
        if wf is None or key not in wf.header.entries:
            raise UndoRecordError(
                f"the undo journal of {ckpt.path} names the tensor {key} of "
                f"{label or ckpt.path.name}, which the checkpoint lacks",
                "restore the checkpoint from a backup, or delete its .erasekit folder to forget the applied patches",
            )
        return wf.header.entries[key]

    return at


def journal_of(ckpt: Checkpoint) -> Journal:
    """``ckpt``'s undo journal as it is now; the journals of one ``ckpt`` (one command's) hash each tensor once."""
    return Journal(ckpt.path, ckpt.journal_files, ckpt.tensor_hashes)


def restamp(journal: Journal, places: TensorAt) -> None:
    """Best effort, for a reader: once the journal describes the files there, stamp them as they are (so the next
    reader need not hash their tensors again) and delete undo records no entry names; skipped, silently, where
    another process holds the lock, the folder is read-only, or an entry is interrupted."""
    with contextlib.suppress(TargetLockedError, TargetNotWritableError, OSError), journal.locked():
        if not journal.interrupted():
            journal.reconcile(places)


NO_JOURNAL = (0, False)  # Checkpoint.read_at of one read while it had no journal
READER_WAIT = 60.0  # seconds a reader waits for a writer of the same checkpoint (an apply, a revert) to finish


def recover_interrupted(ckpt: Checkpoint, stamp: bool = True) -> list[Entry]:
    """Before reading ``ckpt``'s tensors: roll back (or finish) an apply/revert that a crash interrupted, so no
    reader sees a half-written checkpoint, and set aside a journal that does not describe the files there
    (:meth:`Journal.reconcile`). Only then does it take the writers' lock (waiting up to :data:`READER_WAIT` for a
    writer at work); a journal that describes files written since (copied, or stamped by an older erasekit) is
    stamped anew where the lock is free, and read as it is where not (another reader, a read-only folder), or where
    not ``stamp`` (a command that may yet be refused: it changes no file then, and stamps them when it writes)."""
    journal = journal_of(ckpt)
    if not journal.needs_reconcile():
        return []
    places = tensor_places(ckpt)
    if not journal.interrupted():
        reason = journal.foreign(places)
        if reason is None:
            if stamp:
                restamp(journal, places)
            return []
        if not os.access(journal.dir, os.W_OK):
            raise UndoRecordError(
                f"the undo journal {journal.dir} does not describe {ckpt.path} ({reason}), and it "
                "cannot be set aside (read-only)",
                "move the journal folder away, or restore the file",
            )
    with journal.locked(wait=READER_WAIT):
        return journal.reconcile(places)


def read_consistently(
    ckpt: Checkpoint, read: Callable[[], T], discard: Callable[[T], Any] = lambda _: None, stamp: bool = True
) -> T:
    """``read()`` of ``ckpt``'s files as one state of them, without a lock: interrupted writes are finished first,
    and a read during which an in-place apply or revert saved the journal (its generation changed) is discarded
    and done again, up to three times; so is one that failed meanwhile (an undo record a revert removed).
    ``stamp``: as :func:`recover_interrupted`'s."""
    for _ in range(3):
        recover_interrupted(ckpt, stamp)
        seen = generation(ckpt.path)
        try:
            result = read()
        except (OSError, ErasekitError):
            if generation(ckpt.path) == seen:
                raise
            continue
        if generation(ckpt.path) == seen and not (seen and seen[1]):
            ckpt.read_at = seen or NO_JOURNAL
            return result
        discard(result)
    raise TargetLockedError(
        f"{ckpt.path} kept changing while it was read (another erasekit process is applying or "
        "reverting patches there)",
        "wait for it to finish, then retry",
    )


def checked_journal(ckpt: Checkpoint, stamp: bool = True, warn: bool = True) -> Journal:
    """``ckpt``'s journal, once it describes the files there (:func:`recover_interrupted`, ``stamp`` as there);
    ``warn``: with a warning for each patch applied there whose bytes another program changed since
    (:func:`warn_changed`)."""
    recover_interrupted(ckpt, stamp)
    journal = journal_of(ckpt)
    if warn:
        warn_changed(ckpt, journal)
    return journal


def changed_in_place(ckpt: Checkpoint, journal: Journal) -> dict[str, list[TensorRecord]]:
    """Entry id -> the tensors of that committed entry that no longer hold the bytes it left there (another program
    wrote them since: :meth:`Journal.changed_since`)."""
    changed = journal.changed_since(tensor_places(ckpt))
    out: dict[str, list[TensorRecord]] = {}
    for entry in journal.committed:
        mine = [r for r in entry.tensors if changed.get((r.file, r.key)) == entry.id]
        if mine:
            out[entry.id] = mine
    return out


def warn_changed(ckpt: Checkpoint, journal: Journal) -> None:
    """Warn, one line per patch applied in place to ``ckpt`` that the file no longer holds whole (another program
    wrote some of its tensors since), naming them and what to do: the journal says it is applied, the bytes do not."""
    for entry_id, records in changed_in_place(ckpt, journal).items():
        entry = next(e for e in journal.committed if e.id == entry_id)
        warnings.warn(ErasekitWarning(changed_note(ckpt, journal, entry, records)), stacklevel=2)


def changed_note(ckpt: Checkpoint, journal: Journal, entry: Entry, records: list[TensorRecord]) -> str:
    """What :func:`warn_changed` says of ``entry``, whose ``records`` another program changed since."""
    shown = f"{records[0].key} in {records[0].file or ckpt.path.name}" + (
        f" and {len(records) - 1} more" if len(records) > 1 else ""
    )
    lost = _unrestorable(ckpt, journal, entry, records)
    if lost:
        fix = (
            f"revert is impossible for {lost[0].key}{' and the others' if len(lost) > 1 else ''} (its undo record "
            "holds the change, not the bytes from before it): restore the file from a backup or download it again "
            "(its undo journal is then set aside), and apply the patch anew"
        )
    else:
        fix = (
            f"erasekit apply --revert {entry.patch_path or 'PATCH'} --to {ckpt.path} --force restores every "
            "tensor's bytes from before it (apply it anew after, to have it)"
        )
    return (
        f"{ckpt.path} no longer holds patch '{entry.patch_title}' whole, though its undo journal lists it: "
        f"{len(records)} of the {len(entry.tensors)} tensors it wrote in place hold other bytes now ({shown}; "
        f"changed by another program since?); {fix}"
    )


def _unrestorable(ckpt: Checkpoint, journal: Journal, entry: Entry, records: list[TensorRecord]) -> list[TensorRecord]:
    """The ``records`` a forced revert of ``entry`` cannot restore: those its undo record holds as a change (a
    residual record), whose bytes now are not those from before it either."""
    if entry.undo == "full":
        return []
    places = tensor_places(ckpt)
    try:
        undo = journal.read_undo(entry, places)
    except UndoRecordError:
        return records
    by_label = {f.label: f for f in ckpt.disk_files}
    return [
        r
        for r in records
        if not undo[(r.file, r.key)].full and sha256(by_label[r.file].read_raw(r.key)) != r.before_sha256
    ]


def described_journal(ckpt: Checkpoint) -> Journal:
    """``ckpt``'s journal as it is, interrupted entries included, once it is known to describe the files there
    (:meth:`Journal.foreign`; else it is set aside), and with files written since it stamped them stamped anew,
    where it can (:func:`restamp`). Writes nothing to the weight files: for listing it."""
    journal, places = journal_of(ckpt), tensor_places(ckpt)
    if journal.entries and journal.foreign(places) is not None:
        with journal.locked():
            if (reason := journal.foreign(places)) is not None:
                journal.set_aside(reason)
    if journal.needs_reconcile() and not journal.interrupted():  # files written since stamped, or stray undo records
        restamp(journal, places)
    warn_changed(ckpt, journal)
    return journal


def applied_in_place(ckpt: Checkpoint, stamp: bool = True, warn: bool = True) -> list[dict[str, str]]:
    """The patches applied in place to ``ckpt``, oldest first, as an erase's ``after`` records them (``stamp``, ``warn``:
    as :func:`checked_journal`'s)."""
    return [{"patch_id": e.patch_id, "title": e.patch_title} for e in checked_journal(ckpt, stamp, warn).committed]


def pristine_reader(ckpt: Checkpoint) -> Callable[[WeightFile, str], bytes]:
    """``read(weight_file, key)``: a tensor's bytes as they were before the patches applied in place to ``ckpt``
    (the file's own bytes where none changed it). Base fingerprints are of these."""
    journal = checked_journal(ckpt)
    if not journal.committed:
        return lambda wf, key: wf.read_raw(key)
    tensor_at = tensor_places(ckpt)

    def read(wf: WeightFile, key: str) -> bytes:
        current = wf.read_raw(key)
        return journal.pristine(wf.part(key).label, key, current, tensor_at) or current

    return read


def in_place_stack(patches: Sequence[Patch], ckpt: Checkpoint) -> tuple[list[dict[str, str]], list[str]]:
    """For patches to be added in memory to ``ckpt`` loaded as it is: the patches applied to it in place
    (:func:`applied_in_place`), and the ids of ``patches`` made for it as it is below those (their base
    fingerprints match the tensors there). The loaded weights are not such a patch's base, so in memory it is
    applied on trust of this check. A patch of ``patches`` that is itself applied in place is refused: the loaded
    weights hold it already, and adding it again would apply it twice. When ``ckpt`` was loaded as one state
    (``read_at``), the journal must still be at it: an apply or revert since would make the loaded weights and the
    journal disagree (:class:`TargetLockedError`)."""
    _still_as_loaded(ckpt)
    applied = applied_in_place(ckpt)
    stack: tuple[list[dict[str, str]], list[str]] = ([], [])
    if applied:
        refuse_applied_twice(patches, applied, ckpt)
        read = pristine_reader(ckpt)
        fits = [
            p
            for p in patches
            if "differs"
            not in base_statuses(p, ckpt, slot_map(p, ckpt.architecture, ckpt.encoders, str(ckpt.path)), read).values()
        ]
        stack = (applied, [p.patch_id for p in fits])
    _still_as_loaded(ckpt)
    return stack


def _still_as_loaded(ckpt: Checkpoint) -> None:
    if ckpt.read_at is not None and (generation(ckpt.path) or NO_JOURNAL) != ckpt.read_at:
        raise TargetLockedError(
            f"patches were applied to or reverted from {ckpt.path} in place while it was loaded",
            "retry, once the other erasekit process is done",
        )


def refuse_applied_twice(patches: Sequence[Patch], applied: Sequence[dict[str, str]], ckpt: Checkpoint) -> None:
    """Refuse to add in memory a patch that is among those ``applied`` to ``ckpt`` in place, or would apply one of
    them twice (a merged patch that contains one, or one a merged patch applied contains)."""
    there = {a["patch_id"] for a in applied}
    parts = {e.patch_id: e.parts for e in journal_of(ckpt).committed}
    stack = [Stacked(a["patch_id"], a["title"], parts.get(a["patch_id"], {})) for a in applied]
    for p in patches:
        clash = applied_twice(Stacked.of(p), stack, f"already applied to {ckpt.path} in place")
        if clash:
            raise ErasekitError(*clash, option="patches")
        if p.patch_id in there:
            raise ErasekitError(
                f"patch '{p.title}' is already applied to {ckpt.path} in place, so the model as loaded "
                "holds it: adding it again would apply it twice, and 'before' would hold it too",
                f"leave it out to use the model as it is, or revert it first (erasekit apply --revert "
                f"{p.path or 'PATCH'} --to {ckpt.path}) to compare without and with it",
                option="patches",
            )
