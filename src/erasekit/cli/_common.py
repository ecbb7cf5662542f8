"""What every command shares: option types, the error table, and output helpers.

Results go to stdout (tables, or JSON with ``--json``); warnings and hints go to stderr.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from ..errors import ErasekitError, ErasekitWarning, invalid_setting

# markup=False: paths and layouts like "[single-file-sd1]" are data, not rich markup. Piped output gets
# a wide virtual terminal so that tables are not truncated in logs.
out = Console(highlight=False, markup=False, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, markup=False)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout (for scripts).")]
ModelOpt = Annotated[
    Optional[str],
    typer.Option(
        "--model",
        "-m",
        metavar="MODEL",
        help="A single .safetensors/.ckpt "
        "file, a diffusers folder, or a model id ORG/NAME[@REVISION] (from "
        "the Hugging Face cache, downloaded if missing): SD1.x, SD2.x, SDXL, "
        "FLUX.1, SD3.x; "
        "or a built-in toy-world model: toy-sd, toy-sdxl, toy-flux. "
        "[default: toy-sd]",
    ),
]
ConfigOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--config",
        metavar="DIR",
        help="For a single-file MODEL: "
        "a local diffusers folder of the same model, instead of "
        "erasekit's bundled configs of its architecture.",
    ),
]
PredictionOpt = Annotated[
    Optional[str],
    typer.Option(
        "--prediction-type",
        metavar="TYPE",
        help="epsilon or "
        "v_prediction, overriding the model's (SD2.x 512 vs 768-v "
        "single files are told apart from their weights).",
    ),
]
TextEncodersOpt = Annotated[
    Optional[str],
    typer.Option(
        "--text-encoders",
        metavar="FILES",
        help="For a transformer file kept apart from its encoders (Black Forest Labs' flux1-dev.safetensors, "
        "Stability AI's sd3_medium.safetensors): its text-encoder files, comma-separated "
        "(clip_l.safetensors,t5xxl_fp16.safetensors), in any order, each taken for the encoder of its kind.",
    ),
]
VaeOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--vae",
        metavar="FILE",
        help="With --text-encoders: the VAE file (FLUX.1: ae.safetensors), where the transformer's file holds none.",
    ),
]


def file_list(text: str | None) -> tuple[Path, ...]:
    """``"a.safetensors,b.safetensors"`` -> the paths, blanks dropped."""
    return tuple(Path(p.strip()) for p in (text or "").split(",") if p.strip())


DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Proceed although the base fingerprints do not match.")]


def _sampling_defaults() -> str:
    """``"25 steps, CFG scale 7.5 for SD1.x, SD2.x and SDXL; FLUX.1 schnell 4 steps, no guidance; ..."``: what
    generate and eval sample each model with unless told (``Family.sampling``)."""
    from ..families import PIPELINES, listing
    from ..families.base import Sampling

    runnable = [f for f in PIPELINES if f.pipeline]
    own = [f.line or f.title for f in runnable if not f.sampling[-1].title]
    named = [f"{s.title} {s.describe()}" for f in runnable for s in f.sampling if s.title]
    return "; ".join([f"{Sampling().describe()} for {listing(own)}", *named])


StepsOpt = Annotated[
    Optional[int],
    typer.Option(
        "--steps",
        help=f"Sampling steps. [default: the model's, with its guidance: {_sampling_defaults()}]",
        show_default=False,
    ),
]
GuidanceOpt = Annotated[
    Optional[float],
    typer.Option(
        "--guidance",
        help="Guidance scale: classifier-free, or the guidance a guidance-distilled "
        "model reads (FLUX.1 dev; FLUX.1 schnell reads none). [default: the "
        "model's, see --steps]",
        show_default=False,
    ),
]

INTERNAL_ERROR = 70
# the library's name of a setting -> this command line's flag, where they differ (else --name-with-dashes)
OPTION_FLAGS = {
    "concepts": "--concept",
    "patches": "--patch",
    "prompts_file": "--prompts",
    "output": "-o",
    "in_place": "--in-place",
    "config_dir": "--config",
    "stand_ins": "--stand-in",
    "concept_templates": "--concept-template",
}


def debug() -> bool:
    return os.environ.get("ERASEKIT_DEBUG", "") not in ("", "0")


def flag_of(option: str | None) -> str:
    """`` (--flag)`` for a library setting's name (``""`` for none): how a message names the option to change."""
    return f" ({OPTION_FLAGS.get(option, '--' + option.replace('_', '-'))})" if option else ""


def _flag_for_warning(option: str | None) -> str:
    """`` (--flag of erase, eval, generate)``: the option a warning names, with the commands that take it (the
    command that warns may not: ``inspect`` warns of a guessed prediction type that ``erase`` is told)."""
    if not option:
        return ""
    import typer

    from . import app

    flag = flag_of(option)[2:-1]
    group = typer.main.get_command(app)
    takers = sorted(
        name
        for name, cmd in group.commands.items()  # type: ignore[attr-defined]
        if any(flag in param.opts for param in cmd.params)
    )
    return f" ({flag} of {', '.join(takers)})" if takers else ""


@contextlib.contextmanager
def errors() -> Iterator[None]:
    """Turn known errors into one line on stderr and an exit code; tracebacks only with ERASEKIT_DEBUG=1. The
    library's warnings (:class:`ErasekitWarning`) become ``warning:`` lines as they happen, each line once."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", ErasekitWarning)
        shown = warnings.showwarning
        lines: set[str] = set()

        def show(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
            if issubclass(category, ErasekitWarning):
                line = str(message) + _flag_for_warning(getattr(message, "option", None))
                if line not in lines:  # a check the command makes twice (a single file's configs) warns once
                    warn([line])
                    lines.add(line)
            else:
                shown(message, category, *args, **kwargs)

        warnings.showwarning = show
        with _errors_as_lines():
            yield


@contextlib.contextmanager
def _errors_as_lines() -> Iterator[None]:
    try:
        yield
    except (typer.Exit, typer.Abort):
        raise
    except ErasekitError as e:
        if debug():
            raise
        print(f"error: {e}{flag_of(e.option)}", file=sys.stderr)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        print(
            "error: interrupted; files are left as they were or will be rolled back by the next erasekit command",
            file=sys.stderr,
        )
        raise typer.Exit(130) from None
    except OSError as e:
        if debug():
            raise
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: {e.strerror or e}{where}; check the path, free disk space and permissions", file=sys.stderr)
        raise typer.Exit(1) from None
    except Exception as e:
        if debug():
            raise
        print(
            f"error: internal error ({type(e).__name__}: {e}); rerun with ERASEKIT_DEBUG=1 for a traceback and "
            "report it",
            file=sys.stderr,
        )
        raise typer.Exit(INTERNAL_ERROR) from None


def make_config(cls: Any, command: str, **values: Any) -> Any:
    """``cls(**values)`` (a pydantic settings model), a refused value becoming a one-line error naming its option."""
    try:
        return cls(**values)
    except ValueError as e:
        raise invalid_setting(e, f"see erasekit {command} --help") from None


def print_json(obj: Any) -> None:
    """``obj`` as strict JSON: NaN and infinities (a loss that never ran, a ratio over zero) become null."""
    data = dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) and not isinstance(obj, type) else obj
    sys.stdout.write(json.dumps(_finite(data), indent=2, sort_keys=False, allow_nan=False) + "\n")


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def warn(lines: list[str]) -> None:
    for line in lines:
        print(f"warning: {line}", file=sys.stderr)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def norm_or_dash(value: float | None) -> str:
    """A norm as tables show it; "-" where there is none (a bias delta of a projection without a bias)."""
    return "-" if value is None else f"{value:.3g}"


def bar(value: float, top: float, width: int = 16) -> str:
    """A horizontal bar for tables: which layers changed is obvious at a glance."""
    if top <= 0 or value <= 0:
        return ""
    cells = value / top * width
    full = int(cells)
    return "█" * full + ("▌" if cells - full >= 0.5 else "") or "▏"


def ranges(nums: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    nums = sorted(set(nums))
    parts, i = [], 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        parts.append(str(nums[i]) if i == j else f"{nums[i]}-{nums[j]}")
        i = j + 1
    return ", ".join(parts) or "none"


# what a list or dict setting holds, counted where it is too long to read at a glance: (one, several)
COUNTED = {
    "anchor_prompts": ("prompt", "prompts"),
    "templates": ("template", "templates"),
    "stand_ins": ("pair", "pairs"),
    "concept_templates": ("concept", "concepts"),
    "keep": ("concept", "concepts"),
    "patches": ("patch", "patches"),
    "after": ("patch", "patches"),
}
SHOWN_WHOLE = 30  # characters: the longest list or dict a summary shows as it is


def brief(name: str, value: Any) -> str:
    """A setting as a summary shows it, ``name value``: numbers to 3 significant digits, layers as ranges, a longer
    list or dict as a count ("anchor_prompts 91 prompts", "stand_ins 13 pairs")."""
    if name == "layers" and isinstance(value, list) and all(isinstance(v, int) for v in value):
        return f"layers {ranges(value).replace(', ', ',')}"
    shown = _shown(value)
    if isinstance(value, (list, dict)) and len(shown) > SHOWN_WHOLE:
        one, several = COUNTED.get(name, ("entry", "entries") if isinstance(value, dict) else ("item", "items"))
        return f"{name} {len(value)} {one if len(value) == 1 else several}"
    return f"{name} {shown}"


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_shown(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    return str(value)


def packed(label: str, items: list[str], indent: int | None = None, width: int = 108) -> list[str]:
    """``label`` then ``items``, comma-separated, as lines of at most ``width`` characters (an item longer than that
    alone on its line), the later lines indented by ``indent`` (default: under the first item)."""
    margin = " " * (len(label) if indent is None else indent)
    lines = [label]
    for i, item in enumerate(items):
        text = item + ("," if i < len(items) - 1 else "")
        fresh = lines[-1] in (label, margin)
        if not fresh and len(lines[-1]) + 1 + len(text) > width:
            lines.append(margin)
            fresh = True
        lines[-1] += text if fresh else " " + text
    return lines


@contextlib.contextmanager
def progress_bar(label: str, enabled: bool = True) -> Iterator[Any]:
    """A progress bar on stderr, shown from the first update on; yields ``update(done, total, text)``."""
    if not enabled:
        yield lambda *a: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=err,
    )
    task = None

    def update(done: int, total: int, info: str) -> None:
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task(label, total=total, info="")
        bar.update(task, completed=done, total=total, info=info)

    try:
        yield update
    finally:
        if task is not None:
            bar.stop()
