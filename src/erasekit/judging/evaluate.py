"""``erasekit eval``: did the erase work, and what else did it touch? Images rendered with and without the
patches on the same seeds, and a judge saying what each one shows.

The judge is the built-in toy world's (for its models), or a local CLIP model (``judge``; any model, see
:mod:`erasekit.judging.clip_judge`). With the toy world's judge, every concept of the target's attribute (shape, colour or
pattern) is rendered ``n`` times, the other two attributes cycling across the seeds, so that their accuracy is
measured on the same images: erasing "circle" should leave colours and patterns alone. With CLIP, the labels are
the target, the concepts to keep and the stand-ins, each rendered in a few prompts.

Robustness: the target is also rendered under wordings the erase did not train on (the toy world's built-in
paraphrases, or a file of them), ``n`` images per wording on the same seeds, and reported as its own rate.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ..errors import ErasekitError, InputFileError
from ..families.base import Sampling

Spec = tuple[str, dict[str, str]]  # a prompt and its truth (what the judge should find in its images)


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n: int = Field(16, ge=1)
    seed: int = 1000  # held out: the training data of the built-in model never used these seeds for sampling
    steps: int | None = Field(None, ge=1)  # None: the model's default (see erasekit.judging.sampling.sampling_of)
    guidance: float | None = None  # None: the model's default
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
class Robustness(ConceptScore):
    """The target under wordings the erase did not train on: ``before``/``after`` over all their images
    (``concept`` is the target), and per wording (``concept`` is the prompt)."""

    wordings: list[ConceptScore] = field(default_factory=list)
    source: str = "built-in"  # or the paraphrases file


@dataclass
class EvalReport:
    concept: str
    attribute: str  # what the judge reads: shape, colour or pattern (toy world), "concept" (CLIP)
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
    robustness: Robustness | None = None  # None: no paraphrases (a CLIP-judged model without a paraphrases file)
    judge: str = "toyworld"  # or the CLIP model's folder
    labels: list[str] = field(default_factory=list)  # what the judge chooses among for the attribute
    prompt_texts: list[str] = field(default_factory=list)  # the table's distinct prompts, in order (``prompts`` many)
    notes: list[str] = field(
        default_factory=list
    )  # on the stack of patches (see erasekit.checkpoints.compat.order_notes)
    judge_notes: list[str] = field(default_factory=list)  # why the target's after-rate says nothing (see judge_notes)
    steps: int | None = None  # what it sampled with: the config's, else the model's defaults (see sampling_of)
    guidance: float | None = None
    guidance_kind: str = "cfg"  # what read the guidance: "cfg", "distilled" (FLUX.1 dev) or "none" (FLUX.1 schnell)
    settings: str = ""  # "28 steps, distilled guidance 3.5 (FLUX.1 dev's default steps and guidance)"


def evaluate_model(
    concept: str,
    patches: Sequence[str | os.PathLike],
    *,
    model: str | os.PathLike | None = None,
    config: EvalConfig | None = None,
    prompts_file: str | os.PathLike | None = None,
    paraphrases: str | os.PathLike | None = None,
    judge: str | os.PathLike | None = None,
    keep: Sequence[str] = (),
    stand_ins: Sequence[str] = (),
    grid: str | os.PathLike | None = None,
    config_dir: str | os.PathLike | None = None,
    prediction_type: str | None = None,
    text_encoders: Sequence[str | os.PathLike] = (),
    vae: str | os.PathLike | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> EvalReport:
    """Render with and without ``patches`` on the same seeds and judge both (see the module docstring).

    ``judge``: a local transformers CLIPModel folder; without it only models of the built-in toy world can be
    judged. ``keep``/``stand_ins``: the CLIP judge's other labels (default: those the patches record).
    ``paraphrases``: a file of wordings, one per line, ``{}`` where the concept goes (else a whole prompt), instead
    of the built-in ones. ``config_dir``: for a single-file ``model``, a local diffusers folder of its family.
    ``text_encoders`` and ``vae``: for a transformer file kept apart, its encoder files and VAE file."""
    from ..checkpoints.compat import order_notes
    from ..checkpoints.hub import resolve_model
    from ..checkpoints.in_place import in_place_stack
    from ..checkpoints.parts import detect_model
    from ..checkpoints.pipeline import load_pipeline, model_settings, model_threads, resolve_device, runnable_family
    from ..format.patchfile import load_patch
    from ..toyworld import builtin_model_path
    from .sampling import guidance_notes, sampling_of, settings_line

    t0 = time.perf_counter()
    config = config or EvalConfig()
    loaded = [load_patch(p) for p in patches]
    if not loaded:
        raise ErasekitError(
            "eval compares a model with and without patches, and no patch was given",
            "give a patch file",
            option="patches",
        )
    model = model or builtin_model_path()
    runnable_family(
        detect_model(resolve_model(model), text_encoders, vae, config_dir), config_dir
    )  # before a judge is asked for
    toy = bool(model_settings(model).get("toyworld"))
    prompt_lines = _read_lines(prompts_file, "prompts_file", "prompts") if prompts_file is not None else None
    wordings = _read_lines(paraphrases, "paraphrases", "wordings") if paraphrases is not None else None
    device = resolve_device(config.device)
    if judge is not None:
        judge_fn, key, labels, specs = _clip_setup(
            concept, loaded, judge, keep, stand_ins, toy, prompt_lines, str(prompts_file), config.n, device
        )
        judge_name = str(judge)
    elif not toy:
        raise ErasekitError(
            f"{model} is not a model of the built-in toy world, the only one eval's own judge knows",
            "give a local transformers CLIP model folder to judge its images with",
            option="judge",
        )
    else:
        judge_fn, key, labels, specs = _toy_setup(concept, prompt_lines, str(prompts_file), config.n)
        judge_name = "toyworld"
    if wordings is None and toy:
        from ..toyworld.concepts import paraphrases_of

        wordings = paraphrases_of(concept)
    para = [(w.replace("{}", concept), {key: concept}) for w in wordings or [] for _ in range(config.n)]

    everything = specs + para
    prompts = [p for p, _ in everything]
    seeds = [config.seed + (i % config.n) for i in range(len(everything))]  # every prompt in a block of n
    with model_threads(model):
        pipe, ckpt = load_pipeline(
            model,
            device=device,
            config=config_dir,
            prediction_type=prediction_type,
            text_encoders=text_encoders,
            vae=vae,
        )
        in_place, checked = in_place_stack(loaded, ckpt)
        sampling = sampling_of(pipe, config.steps, config.guidance)
        before, after = _render_both(pipe, loaded, prompts, seeds, config, sampling, progress, checked)
    lb, la = judge_fn(before), judge_fn(after)
    report = _score(
        concept,
        key,
        specs,
        lb[: len(specs)],
        la[: len(specs)],
        labels,
        config.n,
        seeds,
        [p.title for p in loaded],
        judge_name,
    )
    if para:
        report.robustness = _robustness(
            concept,
            key,
            para,
            lb[len(specs) :],
            la[len(specs) :],
            "built-in" if paraphrases is None else str(paraphrases),
        )
    if grid is not None:
        report.grid = str(_write_grid(Path(grid), key, everything, before, after, len(specs), min(config.n, 8)))
    report.notes = [*order_notes(loaded, in_place), *guidance_notes(sampling, config.guidance)]
    report.steps, report.guidance, report.guidance_kind = sampling.steps, sampling.guidance, sampling.guidance_kind
    report.settings = settings_line(sampling, config.steps, config.guidance)
    report.seconds = time.perf_counter() - t0
    return report


def _read_lines(path: str | os.PathLike, option: str, what: str) -> list[str]:
    try:
        lines = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise InputFileError(
            f"cannot read the {what} file {path} ({reason})", "check the path", option=option
        ) from None
    if not lines:
        raise ErasekitError(f"the {what} file {path} is empty", f"write one of the {what} per line", option=option)
    return lines


def _toy_setup(concept: str, lines: list[str] | None, source: str, n: int) -> tuple[Any, str, list[str], list[Spec]]:
    """The toy world's judge, the attribute it reads for ``concept``, its values, and the prompts to render."""
    from ..toyworld.concepts import attribute_of, eval_prompts, truth_of
    from ..toyworld.judge import judge
    from ..toyworld.render import ATTRIBUTES

    attribute = attribute_of(concept)
    if lines is None:
        return judge, attribute, list(ATTRIBUTES[attribute]), eval_prompts(attribute, n)
    specs = [(p, truth_of(p)) for p in lines for _ in range(n)]
    if not any(attribute in t for _, t in specs):
        raise ErasekitError(
            f"no prompt in {source} names a {attribute}",
            f"add prompts that name {concept} or another {attribute}",
            option="prompts_file",
        )
    return judge, attribute, list(ATTRIBUTES[attribute]), specs


def _clip_setup(
    concept: str,
    patches: list[Any],
    folder: str | os.PathLike,
    keep: Sequence[str],
    stand_ins: Sequence[str],
    toy: bool,
    lines: list[str] | None,
    source: str,
    n: int,
    device: Any,
) -> tuple[Any, str, list[str], list[Spec]]:
    """The CLIP judge with its labels (the concept, those to keep, the stand-ins), and the prompts to render."""
    from .clip_judge import (
        KEY,
        judge_labels,
        label_prompts,
        load_clip_judge,
        read_label_prompts,
        recorded_neighbours,
        stand_in_words,
    )

    recorded_keep, recorded_stand = recorded_neighbours(patches, concept)
    keep = list(keep) or recorded_keep
    if not keep and toy:  # the built-in world: the concept's neighbours are the other values of its attribute
        from ..toyworld.render import ATTRIBUTES

        keep = next((list(v) for v in ATTRIBUTES.values() if concept in v), [])
    labels = judge_labels(concept, keep, stand_in_words(stand_ins, concept) or recorded_stand)
    clip = load_clip_judge(folder, labels, device)
    specs = read_label_prompts(lines, labels, n, source) if lines is not None else label_prompts(labels, n)
    return clip, KEY, labels, specs


def _score(
    concept: str,
    key: str,
    specs: list[Spec],
    lb: list[dict[str, str]],
    la: list[dict[str, str]],
    labels: list[str],
    n: int,
    seeds: list[int],
    patches: list[str],
    judge: str,
) -> EvalReport:
    from ..toyworld.judge import accuracy

    truths = [t for _, t in specs]
    texts = list(dict.fromkeys(p for p, _ in specs))

    def score(name: str, attr: str, select: Callable[[dict[str, str]], bool]) -> ConceptScore:
        return ConceptScore(name, accuracy(lb, truths, attr, select), accuracy(la, truths, attr, select))

    def naming(value: str) -> Callable[[dict[str, str]], bool]:
        return lambda t: t.get(key) == value

    target = score(concept, key, naming(concept))
    named = {t[key] for t in truths if key in t}
    others = [score(v, key, naming(v)) for v in labels if v != concept and v in named]
    attributes = {
        a: score(a, a, lambda t: True)
        for a in ("shape", "colour", "pattern")
        if a != key and any(a in t for t in truths)
    }
    elsewhere = {a: score(a, a, lambda t: t.get(key) != concept) for a in attributes}
    drops = [o for o in others if o.change_pp < 0]
    return EvalReport(
        concept,
        key,
        target,
        others,
        attributes,
        elsewhere,
        min(drops, key=lambda o: o.change_pp) if drops else None,
        n,
        sorted(set(seeds)),
        len(texts),
        0.0,
        patches=patches,
        judge=judge,
        labels=labels,
        prompt_texts=texts,
        judge_notes=judge_notes(target, others, len(labels)),
    )


def judge_notes(target: ConceptScore, others: list[ConceptScore], choices: int) -> list[str]:
    """Why the target's after-rate says nothing about the erase: the judge does not find the target in the
    unpatched model's images of it. That is so when its before-rate is no better than chance among the judge's
    ``choices`` labels (1/choices), or under half the mean before-rate of the other labels (the judge and model
    see those, not the target). Empty when neither holds."""
    before = target.before
    seen = [o.before for o in others if o.before == o.before]
    reasons = []
    if choices and before <= 1 / choices:
        reasons.append(f"no better than chance among {choices} labels ({100 / choices:.1f}%)")
    if seen and before < sum(seen) / len(seen) / 2:
        reasons.append(f"under half the other labels' {100 * sum(seen) / len(seen):.1f}%")
    if not reasons:
        return []
    return [
        f"the judge finds {target.concept} in {100 * before:.1f}% of the unpatched model's images of it "
        f"({'; '.join(reasons)}), so its after-rate says nothing about the erase; check that the model draws "
        f"{target.concept} and that the judge knows it (its label's wording, another judge)"
    ]


def _robustness(
    concept: str, key: str, para: list[Spec], lb: list[dict[str, str]], la: list[dict[str, str]], source: str
) -> Robustness:
    from ..toyworld.judge import accuracy

    truths = [t for _, t in para]
    wordings = list(dict.fromkeys(p for p, _ in para))

    def rate(labels: list[dict[str, str]], prompt: str | None) -> float:
        pick = [i for i, (p, _) in enumerate(para) if prompt is None or p == prompt]
        return accuracy([labels[i] for i in pick], [truths[i] for i in pick], key)

    return Robustness(
        concept, rate(lb, None), rate(la, None), [ConceptScore(w, rate(lb, w), rate(la, w)) for w in wordings], source
    )


def _render_both(
    pipe: Any,
    patches: list[Any],
    prompts: list[str],
    seeds: list[int],
    config: EvalConfig,
    sampling: Sampling,
    progress: Callable[[int, int], None] | None,
    checked: list[str],
) -> tuple[list[Any], list[Any]]:
    """The images of ``prompts`` on ``seeds`` without the patches, then with them, sampled with ``sampling``'s steps
    and guidance (``checked``: see :func:`erasekit.checkpoints.memory.patches_applied`)."""
    from ..checkpoints.memory import patches_applied
    from .sampling import render_batch

    total, done = 2 * len(prompts), 0

    def tick(k: int) -> None:
        nonlocal done
        done += k
        if progress:
            progress(done, total)

    def render() -> list[Any]:
        return render_batch(
            pipe,
            prompts,
            seeds,
            steps=sampling.steps,
            guidance=sampling.guidance,
            batch_size=config.batch_size,
            progress=tick,
        )

    before = render()
    with patches_applied(pipe, patches, config.strength, checked):
        return before, render()


def _write_grid(
    path: Path, key: str, specs: list[Spec], before: list[Any], after: list[Any], main: int, k: int
) -> Path:
    """A 'before' and an 'after' row of the first ``k`` seeds per concept judged (the first ``main`` specs), then
    per paraphrase (the rest)."""
    from ..format._st import atomic_write
    from .sampling import make_grid

    groups: dict[str, list[int]] = {}
    for i, (prompt, t) in enumerate(specs):
        name = t.get(key) if i < main else f"'{prompt}'"
        if name is not None:
            groups.setdefault(name, []).append(i)
    rows: list[tuple[str, list[Any]]] = []
    for name, idx in groups.items():
        rows.append((f"before: {name}", [before[i] for i in idx[:k]]))
        rows.append((f"after:  {name}", [after[i] for i in idx[:k]]))
    img = make_grid(rows, [f"#{i}" for i in range(k)])
    with atomic_write(path) as f:
        img.save(f, format="PNG")
    return path
