"""Measured evidence inside a patch: ``erasekit eval --record``.

An evaluation (:class:`~erasekit.judging.evaluate.EvalReport`) becomes an :class:`~erasekit.format.patchfile.Evaluation`: the
judge, the model, the prompts, seeds and sampler settings, and the rates before and after. ``record_evaluation``
writes it into the patch's manifest (``evaluations``), rewriting the file atomically with its tensor bytes as they
were, so the patch id does not change. Recording the same measurement again (same settings, see
``Evaluation.settings_key``) replaces the earlier record; any other measurement is appended.

Only an evaluation of one patch alone is recorded: the rates of several patches applied together belong to none
of them. Torch-free, except where the evaluation itself runs (``evaluate_and_record``).
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, cast

from .._version import __version__
from ..errors import ErasekitError, InputFileError, PatchFormatError, TargetNotWritableError
from ..format import _st
from ..format.patchfile import (
    PROMPTS_LISTED,
    EvaluatedModel,
    Evaluation,
    JudgeInfo,
    Patch,
    PromptSet,
    Rates,
    Robustness,
    compare_fingerprint,
    fingerprint,
    load_patch,
    manifest_json,
    now_iso,
    parse_manifest,
    prompts_sha256,
)
from ..toyworld import BUILTIN_MODELS, DEFAULT_MODEL, builtin_model_path
from .evaluate import ConceptScore, EvalConfig, EvalReport

BUILTIN_MODEL_NAME = "built-in toy world"  # toy-sd's, the default model's; toy-sdxl is "built-in toy world (toy-sdxl)"
_CHUNK = 1 << 20


@dataclass
class Recording:
    """Where an evaluation was recorded."""

    path: str
    patch_id: str
    evaluations: int  # how many the patch now records; the new one is the last
    replaced: bool  # an earlier record of the same measurement was replaced


@dataclass
class RecordedEvalReport(EvalReport):
    """An :class:`EvalReport` and where it was recorded."""

    recorded: Recording | None = None


# -- what was measured --------------------------------------------------------------------------------------------


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def weights_sha256(path: str | os.PathLike) -> str:
    """A file's sha256; for a folder, the sha256 of the lines ``<relative path> <sha256>\\n`` of its weight files
    (every ``*.safetensors`` below it, else every ``*.bin``), in sorted order."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    files = sorted(path.rglob("*.safetensors")) or sorted(path.rglob("*.bin"))
    h = hashlib.sha256()
    for f in sorted(files, key=lambda p: p.relative_to(path).as_posix()):
        h.update(f"{f.relative_to(path).as_posix()} {file_sha256(f)}\n".encode())
    return h.hexdigest()


def judge_info(judge: str | os.PathLike | None) -> JudgeInfo:
    """The judge as recorded: ``None``/``"toyworld"`` is the built-in toy world's CNN; anything else a CLIP folder."""
    try:
        if judge is None or str(judge) == "toyworld":
            from ..toyworld import builtin_judge_path

            path = builtin_judge_path()
            return JudgeInfo(kind="toyworld-cnn", name=path.name, sha256=file_sha256(path))
        path = Path(judge)
        return JudgeInfo(kind="clip", name=path.resolve().name or str(path), sha256=weights_sha256(path))
    except OSError as e:
        raise InputFileError(
            f"cannot read the judge's weights ({e.strerror}: {e.filename})", "check the judge's folder", option="judge"
        ) from None


def evaluated_model_name(model: str | os.PathLike | None) -> str:
    """How a record names the model: a built-in model's name (none: the default one) as :data:`BUILTIN_MODEL_NAME`,
    with the name in brackets but for the default; a path's last part; a model id as given."""
    if model is None or (str(model) in BUILTIN_MODELS and not Path(model).exists()):
        builtin = DEFAULT_MODEL if model is None else str(model)
        return BUILTIN_MODEL_NAME if builtin == DEFAULT_MODEL else f"{BUILTIN_MODEL_NAME} ({builtin})"
    return Path(model).resolve().name if Path(model).exists() else str(model)


def evaluated_model(patch: Patch, model: str | os.PathLike | None) -> EvaluatedModel:
    """The model as recorded: its name (as ``base.source`` names one; a model id as given), whether the tensors the
    patch changes are those of the base it was made for, and the sha256 of their fingerprints."""
    from ..checkpoints.compat import slot_map, touches
    from ..checkpoints.hub import TEXT_ENCODERS, resolve_model
    from ..checkpoints.layouts import detect

    path = builtin_model_path() if model is None else resolve_model(model, TEXT_ENCODERS)
    name = evaluated_model_name(model)
    ckpt = detect(path)
    mapping = slot_map(patch, ckpt.architecture, ckpt.encoders, f"{ckpt.path} [{ckpt.describe()}]")
    lines, statuses = [], []
    for t in touches(patch, mapping):
        wf = next(f for f in ckpt.files if t.slot in f.encoders)  # the first variant: the one a pipeline loads
        key = wf.encoders[t.slot].key(t.layer, t.proj, t.kind)
        dtype, shape = wf.tensor_info()[key]
        expected = patch.manifest.base.tensors[f"{t.module}.{t.kind}"]
        fp = fingerprint(wf.read_raw(key), dtype, shape, sketch=dtype != expected.dtype)
        statuses.append(compare_fingerprint(expected, fp))
        lines.append(f"{t.module}.{t.kind} {fp.sha256}\n")
    match: Literal["exact", "approx", "differs"] = (
        "differs" if "differs" in statuses else "approx" if "approx" in statuses else "exact"
    )
    return EvaluatedModel(name=name, match=match, sha256=hashlib.sha256("".join(sorted(lines)).encode()).hexdigest())


def prompt_set(texts: Sequence[str]) -> PromptSet:
    texts = list(texts)
    return PromptSet(
        count=len(texts), sha256=prompts_sha256(texts), texts=texts if len(texts) <= PROMPTS_LISTED else None
    )


def _rate(x: float | None) -> float | None:
    return None if x is None or x != x else float(x)


def _resolved(report: EvalReport, config: EvalConfig, setting: str) -> Any:
    """The steps or guidance the evaluation sampled with: the report's (the model's defaults resolved), else the
    config's (a report built by hand)."""
    value = getattr(report, setting, None)
    return value if value is not None else getattr(config, setting)


def _rates(s: ConceptScore) -> Rates:
    return Rates(before=_rate(s.before), after=_rate(s.after))


def evaluation_from_report(
    report: EvalReport,
    *,
    patch_id: str,
    config: EvalConfig,
    model: EvaluatedModel,
    judge: JudgeInfo,
    prompts: Sequence[str],
    recorded_at: str | None = None,
    erasekit_version: str | None = None,
) -> Evaluation:
    """The record of ``report``, an evaluation of the patch ``patch_id`` alone. ``config``: the settings it ran
    with (its steps and guidance where the report has none); ``prompts``: the distinct prompts of its table
    (``report.prompt_texts``). NaN rates (no image had that truth) become null."""
    robust = report.robustness
    robustness = None
    if robust is not None:
        wordings = [w.concept for w in robust.wordings]
        robustness = Robustness(wordings=prompt_set(wordings), before=_rate(robust.before), after=_rate(robust.after))
    labels = list(report.labels)
    if not labels and report.judge == "toyworld":
        from ..toyworld.render import ATTRIBUTES

        labels = list(ATTRIBUTES.get(report.attribute, []))
    try:
        return Evaluation(
            version=1,
            recorded_at=recorded_at or now_iso(),
            erasekit_version=erasekit_version or __version__,
            patch_id=patch_id,
            concept=report.concept,
            attribute=report.attribute,
            labels=labels,
            judge=judge,
            model=model,
            strength=float(config.strength),
            prompts=prompt_set(prompts),
            seeds=list(report.seeds),
            images_per_prompt=report.images_per_prompt,
            steps=_resolved(report, config, "steps"),
            guidance=float(_resolved(report, config, "guidance")),
            target=_rates(report.target),
            others={o.concept: _rates(o) for o in report.others},
            attributes={k: _rates(v) for k, v in report.attributes.items()},
            attributes_elsewhere={k: _rates(v) for k, v in report.attributes_elsewhere.items()},
            robustness=robustness,
        )
    except ValueError as e:  # pydantic's ValidationError: a setting the record cannot hold (an infinite strength)
        first = e.errors()[0] if hasattr(e, "errors") else {"loc": (), "msg": str(e)}
        where = ".".join(str(x) for x in first["loc"]) or "evaluation"
        raise ErasekitError(
            f"the evaluation cannot be recorded: {where}: {first['msg']}", "evaluate with finite settings"
        ) from None


# -- writing it into the patch ------------------------------------------------------------------------------------


def _identity(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


def check_recordable(patches: Sequence[str | os.PathLike]) -> Path:
    """The one patch an evaluation can be recorded into, checked before anything is rendered."""
    if len(patches) != 1:
        raise ErasekitError(
            f"an evaluation of {len(patches)} patches applied together cannot be recorded: its rates "
            "belong to none of them alone",
            "evaluate each patch alone to record it",
            option="record",
        )
    path = Path(patches[0])
    real = Path(os.path.realpath(path))
    load_patch(real)  # a patch that does not load is reported now, not after the rendering
    _check_writable(path, real)
    return path


def check_measured_on_its_base(patch: Patch, model: str | os.PathLike | None) -> None:
    """Refuse to record rates measured on a model with patches applied in place that ``patch`` was not made after
    (its ``after``, in order): they would be the rates of a stack, not of the patch on the model it is for."""
    from ..checkpoints.hub import resolve_model
    from ..checkpoints.in_place import applied_in_place, refuse_applied_twice
    from ..checkpoints.layouts import detect

    ckpt = detect(resolve_model(model if model is not None else builtin_model_path()))
    in_place = applied_in_place(ckpt)
    refuse_applied_twice([patch], in_place, ckpt)
    after = patch.manifest.method.hyperparameters.get("after")
    made_after = [a.get("patch_id") for a in after if isinstance(a, dict)] if isinstance(after, list) else []
    if in_place and [a["patch_id"] for a in in_place] != made_after:
        raise ErasekitError(
            f"{ckpt.path} has patches applied in place ({', '.join(repr(a['title']) for a in in_place)}) "
            f"that '{patch.title}' was not made after, so its rates would be those of a stack",
            "record it on the model without them (a copy, or revert them first), or evaluate without recording",
            option="record",
        )


def _check_writable(path: Path, real: Path) -> None:
    mode = os.stat(real).st_mode
    if not os.access(real, os.W_OK) or not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
        raise TargetNotWritableError(
            f"{path} is read-only, so the evaluation cannot be recorded in it",
            "make it writable (chmod u+w), or evaluate without recording",
        )
    if not os.access(real.parent, os.W_OK | os.X_OK):
        raise TargetNotWritableError(
            f"cannot write in {real.parent} (permission denied), where {path} is rewritten",
            "make the folder writable, or evaluate without recording",
        )


class _Sized:
    """A tensor's byte count for ``_st.build_header``, which needs only the length of each tensor's data."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


def record_evaluation(patch_path: str | os.PathLike, evaluation: Evaluation) -> Recording:
    """Write ``evaluation`` into the manifest of the patch at ``patch_path``: atomically, with the tensor bytes as
    they were (so its patch id stays), every other metadata key kept. An earlier record of the same measurement
    (``Evaluation.settings_key``) is replaced, and the new one goes last. On any error the file is left as it was."""
    path = Path(patch_path)
    real = Path(os.path.realpath(path))  # a link stays a link; the file it names is rewritten
    seen = _identity(real) if real.is_file() else None
    patch = load_patch(real)
    if evaluation.patch_id != patch.patch_id:
        raise ErasekitError(
            f"the evaluation was measured on patch {evaluation.patch_id[:16]}, and {path} is patch "
            f"{patch.patch_id[:16]}",
            "record it in the patch that was evaluated",
        )
    _check_writable(path, real)
    old = list(patch.manifest.evaluations)
    kept = [ev for ev in old if not (isinstance(ev, Evaluation) and ev.settings_key() == evaluation.settings_key())]
    manifest = patch.manifest.model_copy(update={"evaluations": [*kept, evaluation]})
    text = manifest_json(manifest)
    parse_manifest(text, str(path))  # what every reader will check
    header = _st.read_header(real, err=PatchFormatError, what="patch")
    meta = dict(header.metadata, erasekit=text)
    if "modelspec.hash_sha256" in meta:  # the data is written in name order, whose hash is the patch id
        meta["modelspec.hash_sha256"] = "0x" + patch.patch_id
    names = sorted(header.entries)
    head = _st.build_header(
        {
            n: (header.entries[n].dtype, header.entries[n].shape, cast(bytes, _Sized(header.entries[n].nbytes)))
            for n in names
        },
        meta,
    )
    try:
        with _st.atomic_write(real) as out, open(real, "rb") as src:
            out.write(head)
            digest = hashlib.sha256()
            for n in names:
                ent = header.entries[n]
                src.seek(ent.begin)
                left = ent.nbytes
                while left:
                    chunk = src.read(min(left, _CHUNK))
                    if not chunk:
                        break
                    digest.update(chunk)
                    out.write(chunk)
                    left -= len(chunk)
            if digest.hexdigest() != patch.patch_id or _identity(real) != seen:
                raise ErasekitError(
                    f"{path} changed while the evaluation was being recorded; it was left as it is now",
                    "run eval --record again",
                )
    except OSError as e:
        raise TargetNotWritableError(
            f"cannot rewrite {path} ({e.strerror}); it was left as it was", "check free disk space and permissions"
        ) from None
    return Recording(str(path), patch.patch_id, len(kept) + 1, replaced=len(kept) < len(old))


def evaluate_and_record(
    concept: str,
    patches: Sequence[str | os.PathLike],
    *,
    model: str | os.PathLike | None = None,
    config: EvalConfig | None = None,
    prompts_file: str | os.PathLike | None = None,
    recorded_at: str | None = None,
    **kwargs: Any,
) -> RecordedEvalReport:
    """:func:`~erasekit.judging.evaluate.evaluate_model` (same arguments) of one patch, then :func:`record_evaluation` of
    its result into that patch. The patch is checked (it loads, it is writable) before anything is rendered."""
    from .evaluate import evaluate_model

    if kwargs.get("text_encoders"):
        raise ErasekitError(
            "--record does not yet take a model of separate files (--text-encoders)",
            "record the evaluation on the model's diffusers folder or all-in-one file, or evaluate without recording",
            option="record",
        )
    path = check_recordable(patches)
    check_measured_on_its_base(load_patch(path), model)
    config = config or EvalConfig()
    report = evaluate_model(concept, [path], model=model, config=config, prompts_file=prompts_file, **kwargs)
    patch = load_patch(path)
    evaluation = evaluation_from_report(
        report,
        patch_id=patch.patch_id,
        config=config,
        model=evaluated_model(patch, model),
        judge=judge_info(report.judge),
        prompts=report.prompt_texts,
        recorded_at=recorded_at,
    )
    recording = record_evaluation(path, evaluation)
    return RecordedEvalReport(**{f.name: getattr(report, f.name) for f in fields(report)}, recorded=recording)


__all__ = [
    "Recording",
    "RecordedEvalReport",
    "check_recordable",
    "evaluate_and_record",
    "evaluated_model",
    "evaluation_from_report",
    "judge_info",
    "record_evaluation",
    "weights_sha256",
]
