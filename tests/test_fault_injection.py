"""Every write, fsync, rename and copy of the commands that write (``apply`` in place, with one patch and two,
``--revert`` of one of two patches and of the only one, ``apply -o``, ``merge``, ``export``, ``erase``'s patch)
failing in turn (ENOSPC from there on: a full disk; EIO once) or the process dying there (``os._exit`` in a child):
after the next command every file is as before the command or as after it, the undo journal says which, no
temporary is left, and a failure was one line with a non-zero exit (harness: tests/faults.py).

A sample of k per case by default; ``ERASEKIT_FAULTS=all`` runs every k (minutes).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faults
import pytest
from conftest import snapshot

from erasekit.checkpoints.journal import SET_ASIDE, Journal, JournalFile, journal_dir
from erasekit.errors import ErasekitError

ENV = {"SOURCE_DATE_EPOCH": "1700000000"}  # merge and erase write the same bytes every run


def journal_state(ckpt: Path) -> dict[str, Any]:
    """What the undo journal beside ``ckpt`` says, and whether its undo records are there."""
    try:
        journal = Journal(ckpt, {})
    except ErasekitError as e:
        return {"unreadable": str(e)}
    folder = journal_dir(ckpt)
    return {
        "committed": [e.patch_title for e in journal.committed],
        "interrupted": [f"{e.patch_title} ({e.state})" for e in journal.interrupted()],
        "records missing": [e.undo_file for e in journal.entries if not (folder / e.undo_file).is_file()],
    }


def unnamed_records(root: Path) -> list[str]:
    """Undo records below ``root`` that no journal entry names (what a writer killed between writing one and the
    journal leaves; the next command that writes removes them). Journals set aside are not looked into."""
    found = []
    for folder in {p.parent for p in root.rglob("*.undo") if not p.parent.name.startswith(SET_ASIDE)}:
        listed = folder / "journal.json"
        entries = JournalFile.model_validate_json(listed.read_bytes()).entries if listed.is_file() else []
        named = {e.undo_file for e in entries}
        found += [str(p.relative_to(root)) for p in folder.glob("*.undo") if p.name not in named]
    return sorted(found)


@dataclass
class Case:
    """A command that writes, and what of its folder is compared with the states before and after it."""

    name: str
    argv: Callable[[Path], list[str]]
    state: Callable[[Path], dict[str, Any]]
    in_place: bool  # the next command is `inspect PATCH --against CKPT`, then the same command again


def in_place_state(ckpt: str) -> Callable[[Path], dict[str, Any]]:
    return lambda root: {"weights": snapshot(root / ckpt), **journal_state(root / ckpt)}


def output_state(out: str, source: str = "base.safetensors") -> Callable[[Path], dict[str, Any]]:
    def state(root: Path) -> dict[str, Any]:
        found = {
            "output": snapshot(root / out) if (root / out).exists() else None,
            "source": snapshot(root / source),
            "source journal": journal_state(root / source),
        }
        if journal_dir(root / out).exists():  # an undo journal of the output, whether or not the output is there
            found["output journal"] = journal_state(root / out)
        return found

    return state


CASES = [
    Case(
        "apply",
        lambda r: ["apply", f"{r}/p1.erasepatch", "--to", f"{r}/base.safetensors", "--in-place"],
        in_place_state("base.safetensors"),
        in_place=True,
    ),
    Case(
        "apply-two",
        lambda r: ["apply", f"{r}/p1.erasepatch", f"{r}/p2.erasepatch", "--to", f"{r}/base.safetensors", "--in-place"],
        in_place_state("base.safetensors"),
        in_place=True,
    ),
    Case(
        "apply-folder",
        lambda r: ["apply", f"{r}/pf.erasepatch", "--to", f"{r}/folder", "--in-place"],
        in_place_state("folder"),
        in_place=True,
    ),
    Case(
        "revert",
        lambda r: ["apply", "--revert", f"{r}/p1.erasepatch", "--to", f"{r}/applied.safetensors"],
        in_place_state("applied.safetensors"),
        in_place=True,
    ),
    Case(  # the journal left empty: nothing but the next reader deletes an undo record left behind
        "revert-last",
        lambda r: ["apply", "--revert", f"{r}/p2.erasepatch", "--to", f"{r}/below.safetensors"],
        in_place_state("below.safetensors"),
        in_place=True,
    ),
    Case(
        "apply-o",
        lambda r: ["apply", f"{r}/p1.erasepatch", "--to", f"{r}/below.safetensors", "-o", f"{r}/out.safetensors"],
        output_state("out.safetensors", "below.safetensors"),
        in_place=False,
    ),
    Case(
        "apply-o-folder",
        lambda r: ["apply", f"{r}/pf.erasepatch", "--to", f"{r}/folder", "-o", f"{r}/out"],
        output_state("out", "folder"),
        in_place=False,
    ),
    Case(
        "merge",
        lambda r: ["merge", f"{r}/p1.erasepatch", f"{r}/p2.erasepatch", "-o", f"{r}/merged.erasepatch"],
        output_state("merged.erasepatch"),
        in_place=False,
    ),
    Case(
        "export",
        lambda r: ["export", f"{r}/p1.erasepatch", "--ui", "comfyui", "-o", f"{r}/exported.safetensors"],
        output_state("exported.safetensors"),
        in_place=False,
    ),
    Case(
        "erase",
        lambda r: ["erase", "--concept", "circle", "--num-images", "1", "-o", f"{r}/erased.erasepatch"],
        output_state("erased.erasepatch"),
        in_place=False,
    ),
]
MODES = {"enospc": (faults.ENOSPC, True), "eio": (faults.EIO, False), "killed": (None, False)}
CALLS_PER_RUN = 8  # the default run tries one call in 8 (at least 4 per command) and the last rename


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The inputs every case starts from: a tiny SD1 file, two patches for it (p1: layer 1, p2: layer 0), the file
    with both applied in place (to revert p1), the file with p2 applied in place (``apply -o`` of p1 copies its
    journal), a diffusers folder with two weight variants and a patch for it, and the patch ``erase`` "trains"."""
    from erasekit.checkpoints.apply import apply_to_checkpoint
    from erasekit.checkpoints.diff import diff_checkpoints
    from erasekit.testing import make_checkpoint

    root = tmp_path_factory.mktemp("pristine")
    work = tmp_path_factory.mktemp("inputs")
    base = make_checkpoint(root / "base.safetensors", "single-sd1", "F16")
    for name, layer, seed in (("p1", 1, 0), ("p2", 0, 1)):
        edited = make_checkpoint(work / f"{name}.safetensors", "single-sd1", "F16", edit_layers=[layer], edit_seed=seed)
        diff_checkpoints(base, edited, output=root / f"{name}.erasepatch", title=name)
    applied = shutil.copyfile(base, root / "applied.safetensors")
    apply_to_checkpoint([root / "p2.erasepatch", root / "p1.erasepatch"], applied, in_place=True)
    below = shutil.copyfile(base, root / "below.safetensors")
    apply_to_checkpoint([root / "p2.erasepatch"], below, in_place=True)
    folder = make_checkpoint(root / "folder", "diffusers-sd1-fp16-variant", "F32")
    edited = make_checkpoint(work / "folder", "diffusers-sd1-fp16-variant", "F32", edit_layers=[1])
    diff_checkpoints(folder, edited, output=root / "pf.erasepatch", title="pf")
    shutil.copyfile(root / "p1.erasepatch", root / "trained.erasepatch")
    return root


def fresh(pristine: Path, work: Path) -> Path:
    shutil.copytree(pristine, work, symlinks=True)
    return work


def stubs_for(case: Case, root: Path) -> faults.Stubs | None:
    return (
        faults.Stubs("faults.erase_without_training", (str(root / "trained.erasepatch"),))
        if case.name == "erase"
        else None
    )


def changes(found: dict[str, Any], before: dict[str, Any], after: dict[str, Any]) -> str:
    """Each part of a state: as before, as after, or what it is instead."""

    def part(key: str) -> str:
        if found.get(key) == before.get(key) == after.get(key):
            return ""
        if found.get(key) in (before.get(key), after.get(key)):
            return f"{key} as {'before' if found.get(key) == before.get(key) else 'after'}"
        return f"{key}: {found.get(key)!r}"

    return "; ".join(filter(None, map(part, sorted(set(found) | set(before) | set(after)))))


def seen(state: dict[str, Any], mode: str) -> dict[str, Any]:
    """The parts of a state checked before the command runs again: a killed ``apply -o`` of a file may leave the
    output's journal (renamed into place just before the output) for that run to remove."""
    return {k: v for k, v in state.items() if not (mode == "killed" and k == "output journal")}


class Violations(list):
    def add(self, case: str, mode: str, k: int, call: faults.Call | None, what: str) -> None:
        self.append(f"{case} {mode} k={k} ({call}): {what}")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_fault_at_any_call_leaves_the_files_before_or_after(
    case: Case, pristine: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    before_root = fresh(pristine, tmp_path / "before")
    before = case.state(before_root)
    counted, calls = faults.count_calls(case.argv(before_root), before_root, stubs_for(case, before_root))
    assert counted.exit_code == 0, counted.stderr
    after = case.state(before_root)
    assert after != before and calls, "the command under test changes nothing"

    found = Violations()
    for k, mode in faults.plan(calls, list(MODES), CALLS_PER_RUN, every=faults.every_k()):
        root = fresh(pristine, tmp_path / f"{mode}-{k}")
        call = _run_with_fault(case, mode, k, calls, root, after, found)
        if call is not None:
            _check_next(case, mode, k, call, root, before, after, found)
    assert not found, f"{len(found)} violations:\n" + "\n".join(found)


def _run_with_fault(
    case: Case, mode: str, k: int, calls: list[faults.Call], root: Path, after: dict[str, Any], found: Violations
) -> faults.Call | None:
    """The command with call k failing (or dying there); the call (None if the run went otherwise than counted)."""
    argv, stubs = case.argv(root), stubs_for(case, root)
    code, persistent = MODES[mode]
    if code is None:
        status = faults.die_at(argv, root, k, stubs, ENV)
        if status != faults.DIED:
            found.add(case.name, mode, k, calls[k - 1], f"the child exited {status}, not at the call")
            return None
        return calls[k - 1]
    outcome, seen = faults.fail_at(argv, root, k, code, persistent, stubs)
    if len(seen) < k or seen[k - 1].kind != calls[k - 1].kind:
        found.add(case.name, mode, k, calls[k - 1], "the run made other calls than the counted one")
        return None
    if outcome.exit_code == 0 and case.state(root) != after:
        found.add(case.name, mode, k, seen[k - 1], "reported success, but the files are not as after")
    elif outcome.exit_code != 0 and (problem := faults.one_line_error(outcome)):
        found.add(case.name, mode, k, seen[k - 1], problem)
    if left := faults.temporaries(root):
        found.add(case.name, mode, k, seen[k - 1], f"the failed command left its temporaries: {left}")
    return seen[k - 1]


def _check_next(
    case: Case,
    mode: str,
    k: int,
    call: faults.Call,
    root: Path,
    before: dict[str, Any],
    after: dict[str, Any],
    found: Violations,
) -> None:
    """The next commands: for an in-place target, ``inspect PATCH --against CKPT`` (which rolls an interrupted entry
    back first); then the same command again, which completes it (or is refused: it is done) and removes what a
    killed run left (temporaries, undo records no entry names). The invariants after each."""
    argv = case.argv(root)
    if case.in_place:
        patch, ckpt = next(a for a in argv if a.endswith(".erasepatch")), argv[argv.index("--to") + 1]
        nxt = faults.run_cli(["inspect", patch, "--against", ckpt])
        if nxt.exit_code != 0:
            found.add(case.name, mode, k, call, f"the next inspect --against failed: {nxt.stderr.strip()}")
    state, before_, after_ = (seen(s, mode) for s in (case.state(root), before, after))
    if state not in (before_, after_):
        found.add(case.name, mode, k, call, "neither before nor after: " + changes(state, before_, after_))
        return
    again = faults.run_cli(argv, stubs=stubs_for(case, root))
    if state == before_ and again.exit_code != 0:
        found.add(case.name, mode, k, call, f"running it again failed: {again.stderr.strip()}")
    elif case.state(root) != after:
        found.add(case.name, mode, k, call, "not as after once run again: " + changes(case.state(root), before, after))
    if left := faults.temporaries(root) + unnamed_records(root):
        found.add(case.name, mode, k, call, f"left after running it again: {left}")


def test_a_revert_killed_after_its_journal_leaves_no_undo_record_that_a_reader_uses(
    pristine: Path, tmp_path: Path
) -> None:
    """Revert saves the journal without its entry, then deletes the entry's undo record: killed in between (at the
    fsync of the folder after the journal's rename), the record is left. No reader takes it for an entry's (a copy
    leaves it out), and the next command that reads the checkpoint deletes it."""
    argv = ["apply", "--revert", f"{tmp_path}/p2.erasepatch", "--to", f"{tmp_path}/below.safetensors"]
    counted = tmp_path / "counted"
    _, calls = faults.count_calls([a.replace(str(tmp_path), str(counted)) for a in argv], fresh(pristine, counted))
    saved = max(k for k, c in enumerate(calls, 1) if c.kind == "replace" and c.target.endswith("journal.json"))
    assert calls[saved].kind == "fsync" and saved + 1 == len(calls)  # the last call: the folder's fsync
    root = fresh(pristine, tmp_path / "killed")
    argv = [a.replace(str(tmp_path), str(root)) for a in argv]
    assert faults.die_at(argv, root, saved + 1, env=ENV) == faults.DIED
    assert unnamed_records(root) == [".erasekit/below.safetensors/0001.undo"]
    copy = faults.run_cli(
        ["apply", f"{root}/p1.erasepatch", "--to", f"{root}/below.safetensors", "-o", f"{root}/out.safetensors"]
    )
    assert copy.exit_code == 0, copy.stderr
    assert unnamed_records(root) == [".erasekit/below.safetensors/0001.undo"]  # not copied to the output's journal
    assert faults.run_cli(["inspect", f"{root}/below.safetensors"]).exit_code == 0
    assert unnamed_records(root) == [] and journal_state(root / "below.safetensors")["committed"] == []
