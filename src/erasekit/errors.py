"""Every exception erasekit raises on purpose.

Each error carries a one-line ``problem`` and a one-line ``fix``; ``str(err)`` is
``"<problem>; <fix>"``. The CLI prints exactly that line and exits with the error's
``exit_code``. Anything that is not an :class:`ErasekitError` is a bug in erasekit.
"""

from __future__ import annotations


def one_line(text: str) -> str:
    """``text`` with every non-printable character escaped (``\\n``, ``\\x06``): an error stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class ErasekitError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""

    exit_code = 1

    def __init__(self, problem: str, fix: str = "", option: str | None = None) -> None:
        self.problem = one_line(problem)  # names from files may hold newlines or control characters
        self.fix = one_line(fix)
        # the setting at fault, by its name in the library ("layers", "force"): messages name settings in words,
        # never a command line's flags, and a front end (the CLI) adds its own name for it
        self.option = option
        super().__init__(f"{self.problem}; {self.fix}" if fix else self.problem)


class InputFileError(ErasekitError):
    """A path the user named is missing, is of the wrong kind, or cannot be read."""

    exit_code = 2


class PatchFormatError(ErasekitError):
    """A file is not a valid ``.erasepatch``: truncated, corrupt header, bad manifest,
    tensors that disagree with the manifest, or non-finite values."""

    exit_code = 3


class PatchVersionError(PatchFormatError):
    """A patch was written by a newer erasekit with a ``format_version`` this one cannot read."""


class LayoutError(ErasekitError):
    """A checkpoint's layout is not one erasekit knows, or it lacks tensors its layout needs."""

    exit_code = 4


class IncompatiblePatchError(ErasekitError):
    """A patch was made for another architecture, or its tensors do not fit the checkpoint's shapes."""

    exit_code = 5


class FingerprintMismatchError(IncompatiblePatchError):
    """The checkpoint's tensors are not the ones the patch was made from (``force`` applies it anyway)."""

    def __init__(self, problem: str, fix: str, differing: int, total: int) -> None:
        self.differing = differing
        self.total = total
        super().__init__(problem, fix, option="force")


class NotAppliedError(ErasekitError):
    """A revert was asked for a patch that the target's undo journal does not list."""

    exit_code = 6


class RevertOrderError(NotAppliedError):
    """A patch cannot be reverted yet because patches applied after it change the same tensors."""


class UndoRecordError(ErasekitError):
    """An undo record is missing, corrupt, or no longer matches the checkpoint, so a bit-exact revert is impossible."""

    exit_code = 6


class ForeignBytesError(UndoRecordError):
    """A tensor holds neither the bytes an undo journal entry left nor those it found: the journal describes
    another file (the file was replaced, or changed by another program)."""


class TargetNotWritableError(ErasekitError):
    """The output or in-place target cannot be written (read-only file or folder, ``.ckpt`` in place, exists)."""

    exit_code = 7


class NonFiniteError(ErasekitError):
    """A computation produced NaN or infinite values; nothing was written."""

    exit_code = 8


class TargetLockedError(ErasekitError):
    """Another erasekit process is writing to the same checkpoint."""

    exit_code = 9


def invalid_setting(error: Exception, fix: str = "") -> ErasekitError:
    """The one-line error for a settings model (pydantic) that refused a value: its first complaint, naming the
    setting (as ``option``)."""
    first = error.errors()[0]  # type: ignore[attr-defined]
    name = str(first["loc"][0]) if first["loc"] else "settings"
    return ErasekitError(f"invalid {name}: {first['msg']}", fix, option=name if first["loc"] else None)


class ErasekitWarning(UserWarning):
    """Something the user should know that did not stop the command (a journal set aside); the CLI prints each as
    one ``warning:`` line on stderr. ``option``: the setting that would settle it, as in :class:`ErasekitError`."""

    def __init__(self, message: str, option: str | None = None) -> None:
        self.option = option
        super().__init__(message)
