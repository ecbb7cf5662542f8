"""A batch manifest (``erasekit erase --manifest jobs.toml``): reading and checking it, down to a list of
:class:`~erasekit.erasing.erase_job.EraseJob` ready to run, before any model is loaded.

The file's top-level keys are defaults for every job, named like ``erase``'s long options with underscores
(``steps = 10``, ``recipe = "anchored"``, ``model = "..."``, ``images = "auto"``); each ``[[jobs]]`` table has
``concept`` (a string, or a list for one multi-concept patch), ``output`` and any option that overrides a default.
Paths are relative to the manifest's folder. A transformer file kept apart from its encoders (``flux1-dev.safetensors``)
is a ``model`` with ``text_encoders`` (a comma-separated string, as ``--text-encoders`` writes it, or a list) and
``vae``. Every refusal is one line naming the entry and the field.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import ErasekitError, InputFileError


class ManifestError(InputFileError):
    """A batch manifest that cannot run as written."""


class JobOptions(BaseModel):
    """What a job may set, as ``erase``'s long options; values are checked again as erase settings."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None  # a path (relative to the manifest's folder) or a model id
    text_encoders: str | list[str] | None = None  # a transformer file's encoder files: "a,b" or ["a", "b"]
    vae: str | None = None  # and its VAE file, where the transformer's file holds none
    config: str | None = None  # a single-file model's diffusers folder (erase --config)
    prediction_type: str | None = None
    images: str | list[str] | None = None  # "auto", a folder, or one folder per concept
    num_images: int | None = Field(None, ge=1)
    kind: str | None = None
    templates: list[str] | None = None
    templates_file: str | None = None
    concept_template: dict[str, str | list[str]] | list[str] | None = None  # {"Van Gogh" = "..."} or ["C=T"]
    recipe: str | None = None
    surgery: float | None = None
    after: str | list[str] | None = None
    keep: str | list[str] | None = None
    stand_in: dict[str, str | list[str]] | list[str] | None = None  # {circle = "square"} or ["circle=square"]
    anchor_weight: float | None = None
    no_early_stop: bool | None = None
    lr: float | None = None
    epochs: int | None = None
    steps: int | None = None
    batch_size: int | None = None
    flip: bool | None = None
    draws: int | None = None
    resolution: int | None = None
    layers: str | list[int] | None = None  # "0-11" or [0, 1, 2]
    encoders: str | list[str] | None = None  # "te1,te2" or ["te1", "te2"]
    seed: int | None = None
    device: str | None = None
    dtype: str | None = None
    rank: int | str | None = None
    rank_tol: float | None = None
    max_rank: int | None = None
    patch_dtype: str | None = None
    no_cache: bool | None = None
    forget_check: bool | None = None
    checkpointing: bool | None = None
    offload: str | None = None


class JobEntry(JobOptions):
    concept: str | list[str] = Field(min_length=1)
    output: str = Field(min_length=1)


class ManifestFile(JobOptions):
    jobs: list[JobEntry] = Field(min_length=1)


@dataclass
class PlannedJob:
    """One ``[[jobs]]`` entry: its place in the file, the output as written there, and the checked job."""

    index: int
    name: str
    job: Any  # an EraseJob
    path: str = ""  # the absolute path the job writes, its folders' links resolved
    outside: bool = False  # that path is not under the manifest's folder


def read_manifest(path: str | os.PathLike) -> ManifestFile:
    """The manifest's tables, validated; a syntax error or a refused value is one :class:`ManifestError` line."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ManifestError(
            f"cannot read the manifest {path} ({e.strerror})", "check the path", option="manifest"
        ) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path} is not valid TOML ({e})", "fix the file's syntax", option="manifest") from None
    try:
        return ManifestFile.model_validate(data)
    except ValidationError as e:
        raise ManifestError(f"{path}: {_where(data, e.errors()[0])}", _fix(e.errors()[0]), option="manifest") from None


def _where(data: dict[str, Any], error: Any) -> str:
    """'jobs[2] (out/red.erasepatch), field steps: input should be a valid integer' for a pydantic complaint."""
    loc = list(error["loc"])
    entry = "top level"
    if loc[:1] == ["jobs"] and len(loc) > 1 and isinstance(loc[1], int):
        job = data["jobs"][loc[1]]
        output = job.get("output") if isinstance(job, dict) else None
        entry = f"jobs[{loc[1]}]" + (f" ({output})" if isinstance(output, str) else "")
        loc = loc[2:]
    field = ".".join(str(part) for part in loc if not isinstance(part, int) and part not in _UNION_TAGS) or "jobs"
    msg = "unknown field" if error["type"] == "extra_forbidden" else error["msg"][:1].lower() + error["msg"][1:]
    return f"{entry}, field {field}: {msg}"


# pydantic names the member of a union it tried ("steps.int"); the user wrote "steps"
_UNION_TAGS = {"str", "int", "float", "bool", "list[str]", "list[int]", "dict[str,union[str,list[str]]]"}


def _fix(error: Any) -> str:
    if error["type"] == "extra_forbidden":
        return "name erase's long options with underscores (steps, recipe, stand_in, ...); see erasekit erase --help"
    if error["type"] == "missing":
        return (
            "add [[jobs]] tables"
            if tuple(error["loc"]) == ("jobs",)
            else "every [[jobs]] table needs concept and output"
        )
    return "fix the manifest"


def plan_batch(path: str | os.PathLike) -> list[PlannedJob]:
    """Every job of the manifest checked (settings, image folders, earlier patches, outputs), no model loaded."""
    from .erase_job import prepare_erase

    path = Path(path)
    manifest = read_manifest(path)
    folder = path.parent
    defaults = manifest.model_dump(exclude_unset=True, exclude={"jobs"})
    planned, home = [], Path(os.path.realpath(folder))
    seen: dict[str, int] = {}  # each output (as _check_unique compares them) -> the first job writing it
    for i, entry in enumerate(manifest.jobs):
        where = f"{path}: jobs[{i}] ({entry.output})"
        _check_suffix(entry.output, where)
        output = folder / entry.output
        _check_unique(output, seen, where, i)
        options = defaults | entry.model_dump(exclude_unset=True, exclude={"concept", "output"})
        try:
            settings, call = _erase_arguments(options, folder)
            concepts = [entry.concept] if isinstance(entry.concept, str) else list(entry.concept)
            job = prepare_erase(
                call.pop("model"),
                concepts,
                call.pop("images"),
                output,
                settings,
                replace=True,
                make_folder=True,
                **call,
            )
        except ErasekitError as e:
            field = f", field {_FIELDS.get(e.option, e.option)}" if e.option else ""
            raise ManifestError(
                f"{where}{field}: {e.problem}", e.fix or "fix the manifest", option="manifest"
            ) from None
        written = _written_path(output)
        planned.append(PlannedJob(i, entry.output, job, str(written), not written.is_relative_to(home)))
    return planned


OUTPUT_SUFFIXES = (".erasepatch", ".safetensors")


def _check_suffix(output: str, where: str) -> None:
    """A job writes a patch: an output named like any other file (a script, a config, a dotfile) is refused."""
    if not output.endswith(OUTPUT_SUFFIXES) or Path(output).name in OUTPUT_SUFFIXES:
        raise ManifestError(
            f"{where}, field output: a patch file's name must end in .erasepatch or .safetensors",
            "name the output NAME.erasepatch (or NAME.safetensors)",
            option="manifest",
        )


def _written_path(output: Path) -> Path:
    """Where a write to ``output`` lands: absolute, with the links of its folders resolved (a link at the name
    itself is replaced by the write, not followed)."""
    return Path(os.path.realpath(output.parent)) / output.name


# the library's name of a setting -> the manifest's, where they differ
_FIELDS = {
    "stand_ins": "stand_in",
    "config_dir": "config",
    "concepts": "concept",
    "stop_ratio": "no_early_stop",
    "concept_templates": "concept_template",
}


def _check_unique(output: Path, seen: dict[str, int], where: str, index: int) -> None:
    """Two jobs may not write one file; names that differ only in case are one file on macOS and Windows."""
    key = os.path.normcase(os.path.abspath(output)).casefold()
    if key in seen:
        raise ManifestError(
            f"{where}, field output: jobs[{seen[key]}] writes the same file",
            "give every job its own output",
            option="manifest",
        )
    seen[key] = index


def _per_concept(value: dict[str, str | list[str]] | list[str], parse: Any) -> dict[str, list[str]]:
    """A per-concept option as a table (``{circle = "square"}``, a string or a list each) or as a list of
    ``"concept=value"`` strings (``parse``, erase's own parser of the option)."""
    if isinstance(value, list):
        return parse(value)
    return {c: [v] if isinstance(v, str) else v for c, v in value.items()}


def _erase_arguments(options: dict[str, Any], folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A job's options as erase settings (for :class:`~erasekit.format.erase_config.EraseConfig`) and the other
    arguments of :func:`~erasekit.erasing.erase_job.prepare_erase`."""
    from ..format.erase_config import parse_concept_templates, parse_layers, parse_stand_ins, read_templates_file

    o = dict(options)
    here = lambda p: folder / p  # noqa: E731
    listed = lambda v: [v] if isinstance(v, str) else v  # noqa: E731
    if "keep" in o:
        o["keep"] = listed(o["keep"])
    settings: dict[str, Any] = {
        k: o.pop(k)
        for k in (
            "kind",
            "recipe",
            "surgery",
            "keep",
            "anchor_weight",
            "lr",
            "epochs",
            "steps",
            "batch_size",
            "flip",
            "draws",
            "resolution",
            "seed",
            "device",
            "dtype",
            "rank",
            "rank_tol",
            "max_rank",
            "forget_check",
            "checkpointing",
            "offload",
        )
        if k in o
    }
    templates = list(o.pop("templates", None) or [])
    if "templates_file" in o:
        templates += read_templates_file(here(o.pop("templates_file")))
    if templates:
        settings["templates"] = templates
    for key, name, parse in (
        ("concept_template", "concept_templates", parse_concept_templates),
        ("stand_in", "stand_ins", parse_stand_ins),
    ):
        if key in o:
            settings[name] = _per_concept(o.pop(key), parse)
    if "layers" in o:
        layers = o.pop("layers")
        settings["layers"] = parse_layers(layers) if isinstance(layers, str) else layers
    if "encoders" in o:
        encoders = o.pop("encoders")
        settings["encoders"] = [e.strip() for e in encoders.split(",")] if isinstance(encoders, str) else encoders
    if "patch_dtype" in o:
        settings["patch_dtype"] = o.pop("patch_dtype").upper()
    if o.pop("no_early_stop", False):
        settings["stop_ratio"] = None
    if o.pop("no_cache", False):
        settings["cache"] = False
    images = o.pop("images", None)
    if images is not None and images != "auto":
        images = [here(d) for d in listed(images)]
    model = o.pop("model", None)
    if model is not None and here(model).exists():
        model = here(model)
    encoder_files = o.pop("text_encoders", None) or []
    if isinstance(encoder_files, str):
        encoder_files = [e for e in map(str.strip, encoder_files.split(",")) if e]
    call = {
        "model": model,
        "text_encoders": [here(e) for e in encoder_files],
        "vae": here(o.pop("vae")) if "vae" in o else None,
        "images": images,
        "after": [here(p) for p in listed(o.pop("after", []))],
        "config_dir": here(o.pop("config")) if "config" in o else None,
        "prediction_type": o.pop("prediction_type", None),
    }
    if "num_images" in o:
        call["num_images"] = o.pop("num_images")
    assert not o, f"options not handled: {sorted(o)}"
    return settings, call
