"""``erasekit eval``: did the erase work, and what else did it touch? Judged on the built-in toy world.

For the target concept's attribute (shape, colour or pattern), every concept of that attribute is rendered
``n`` times, with and without the patches on the same seeds, and the toy world's judge says what each
image shows. The other two attributes cycle across the seeds, so their accuracy is measured on the same
images: erasing "circle" should leave colours and patterns alone.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .errors import ErasekitError, InputFileError


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n: int = Field(16, ge=1)
    seed: int = 1000  # held out: the training data of the built-in model never used these seeds for sampling
    steps: int = Field(25, ge=1)
    guidance: float = 7.5
    strength: float = 1.0
    device: str = "auto"
    batch_size: int = Field(64, ge=1)


@dataclass
class ConceptScore:
    concept: str
    before: float  # fraction of its images judged as it, without the patches
    after: float  # ... with the patches

    @property
    def change_pp(self) -> float:
        return 100 * (self.after - self.before)


@dataclass
class EvalReport:
    concept: str
    attribute: str
    target: ConceptScore
    others: list[ConceptScore]
    attributes: dict[str, ConceptScore]  # accuracy of each other attribute over all images
    attributes_elsewhere: dict[str, ConceptScore]  # ... over the other concepts' images only
    largest_drop: ConceptScore | None
    images_per_prompt: int
    seeds: list[int]
    prompts: int
    seconds: float
    grid: str | None = None
    patches: list[str] = field(default_factory=list)


def evaluate_model(concept: str, patches: Sequence[str | os.PathLike], *, model: str | os.PathLike | None = None,
                   config: EvalConfig | None = None, prompts_file: str | os.PathLike | None = None,
                   grid: str | os.PathLike | None = None, config_dir: str | os.PathLike | None = None,
                   prediction_type: str | None = None,
                   progress: Callable[[int, int], None] | None = None) -> EvalReport:
    """Render with and without ``patches`` on the same seeds and judge both (see the module docstring).
    ``config_dir``: for a single-file ``model``, a local diffusers folder of its family."""
    from .patchfile import load_patch
    from .pipeline import load_pipeline, model_threads, resolve_device
    from .toyworld import builtin_model_path
    from .toyworld.concepts import attribute_of, eval_prompts, truth_of
    from .toyworld.judge import accuracy, judge

    t0 = time.perf_counter()
    config = config or EvalConfig()
    attribute = attribute_of(concept)
    loaded = [load_patch(p) for p in patches]
    if not loaded:
        raise ErasekitError("eval compares a model with and without patches, and no patch was given",
                            "give a patch file", option="patches")
    if prompts_file is not None:
        try:
            lines = [ln.strip() for ln in Path(prompts_file).read_text().splitlines() if ln.strip()]
        except OSError as e:
            raise InputFileError(f"cannot read the prompts file {prompts_file} ({e.strerror})", "check the path",
                                 option="prompts_file") from None
        specs = [(p, truth_of(p)) for p in lines for _ in range(config.n)]
        if not any(attribute in t for _, t in specs):
            raise ErasekitError(f"no prompt in {prompts_file} names a {attribute}", f"add prompts that name {concept} "
                                f"or another {attribute}")
    else:
        specs = eval_prompts(attribute, config.n)
    prompts = [p for p, _ in specs]
    seeds = [config.seed + (i % config.n) for i in range(len(specs))]
    model = model or builtin_model_path()
    with model_threads(model):
        pipe, _ = load_pipeline(model, device=resolve_device(config.device), config=config_dir,
                                prediction_type=prediction_type)
        before, after = _render_both(pipe, loaded, prompts, seeds, config, progress)
    lb, la = judge(before), judge(after)
    truths = [t for _, t in specs]

    def score(name: str, attr: str, select: Callable[[dict[str, str]], bool]) -> ConceptScore:
        return ConceptScore(name, accuracy(lb, truths, attr, select), accuracy(la, truths, attr, select))

    target = score(concept, attribute, lambda t: t.get(attribute) == concept)
    values = sorted({t[attribute] for _, t in specs if attribute in t} - {concept})
    others = [score(v, attribute, lambda t, v=v: t.get(attribute) == v) for v in values]
    attributes = {a: score(a, a, lambda t: True) for a in ("shape", "colour", "pattern")
                  if a != attribute and any(a in t for _, t in specs)}
    elsewhere = {a: score(a, a, lambda t: t.get(attribute) != concept) for a in attributes}
    drops = [o for o in others if o.change_pp < 0]
    report = EvalReport(concept, attribute, target, others, attributes, elsewhere, min(drops, key=lambda o: o.change_pp) if drops else None,
                        config.n, sorted(set(seeds)), len(set(prompts)), 0.0, patches=[p.title for p in loaded])
    if grid is not None:
        report.grid = str(_write_grid(Path(grid), specs, before, after, attribute, min(config.n, 8)))
    report.seconds = time.perf_counter() - t0
    return report


def _render_both(pipe: Any, patches: list[Any], prompts: list[str], seeds: list[int], config: EvalConfig,
                 progress: Callable[[int, int], None] | None) -> tuple[list[Any], list[Any]]:
    """The images of ``prompts`` on ``seeds`` without the patches, then with them."""
    from .memory import patches_applied
    from .toyworld.measure import render_batch

    total, done = 2 * len(prompts), 0

    def tick(k: int) -> None:
        nonlocal done
        done += k
        if progress:
            progress(done, total)

    def render() -> list[Any]:
        return render_batch(pipe, prompts, seeds, steps=config.steps, guidance=config.guidance,
                            batch_size=config.batch_size, progress=tick)

    before = render()
    with patches_applied(pipe, patches, config.strength):
        return before, render()


def _write_grid(path: Path, specs: list[tuple[str, dict[str, str]]], before: list[Any], after: list[Any],
                attribute: str, k: int) -> Path:
    """Per concept of the attribute: a 'before' row and an 'after' row of its first ``k`` seeds."""
    from ._st import atomic_write
    from .sampling import make_grid

    rows: list[tuple[str, list[Any]]] = []
    seen: list[str] = []
    for (_, t), _img in zip(specs, before):
        if attribute in t and t[attribute] not in seen:
            seen.append(t[attribute])
    for value in seen:
        idx = [i for i, (_, t) in enumerate(specs) if t.get(attribute) == value][:k]
        rows.append((f"before: {value}", [before[i] for i in idx]))
        rows.append((f"after:  {value}", [after[i] for i in idx]))
    img = make_grid(rows, [f"#{i}" for i in range(k)])
    with atomic_write(path) as f:
        img.save(f, format="PNG")
    return path
