"""Running a batch manifest (``erasekit erase --manifest jobs.toml``): every job writes its own patch, a job that
fails does not stop the others, and a rerun skips the jobs whose patch already holds the same settings.

Each process loads a model once and reuses it for all its jobs (the erase gives the pipeline back exactly as it
found it). Under ``accelerate launch`` (or ``torchrun``) the jobs left to do are split between the processes with
Hugging Face Accelerate, one device each, and every process gets the whole summary back; without it, one process
runs them all.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from ..errors import ErasekitError
from .batch_manifest import PlannedJob, plan_batch

Status = Literal["done", "skipped", "failed"]


@dataclass
class JobResult:
    index: int  # the job's place in the manifest
    output: str  # as the manifest writes it
    concepts: list[str]
    status: Status
    loop_seconds: float | None = None  # skipped: the loop time the patch recorded
    load_seconds: float = 0.0  # the model load this job waited for (0 when the process had it loaded)
    loss_start: float | None = None
    loss_end: float | None = None
    patch_bytes: int | None = None
    error: str | None = None  # failed: the one-line error
    note: str | None = None  # why a job ran although its patch existed
    process: int = 0
    path: str = ""  # the absolute path the job writes (see PlannedJob.path)


@dataclass
class BatchReport:
    manifest: str
    jobs: list[JobResult]
    processes: int
    total_seconds: float
    notes: list[str] = field(default_factory=list)  # about how the batch was launched
    counts: dict[str, int] = field(default_factory=dict)  # status -> number of jobs

    def __post_init__(self) -> None:
        self.counts = {s: sum(j.status == s for j in self.jobs) for s in ("done", "skipped", "failed")}


def run_batch(
    manifest: str | os.PathLike,
    *,
    on_plan: Callable[[list[PlannedJob]], None] | None = None,
    on_job: Callable[[JobResult], None] | None = None,
) -> BatchReport:
    """Run every job of ``manifest`` that has no up-to-date patch yet (see :mod:`erasekit.erasing.batch_manifest` for the
    file); ``on_plan`` hears of the checked jobs (each with the absolute path it writes) before any runs, ``on_job``
    of each job this process finishes. The manifest is checked whole before any model is loaded
    (:class:`~erasekit.erasing.batch_manifest.ManifestError`)."""
    t0 = time.perf_counter()
    planned = plan_batch(manifest)
    if on_plan:
        on_plan(planned)
    with _processes() as state:
        settled, todo = _decide(planned)
        ran = _run_shares(todo, state, on_job)
        processes = state.num_processes if state else 1
    results = sorted(settled + ran, key=lambda r: r.index)
    return BatchReport(str(manifest), results, processes, time.perf_counter() - t0, launch_notes())


def _decide(planned: list[PlannedJob]) -> tuple[list[JobResult], list[tuple[PlannedJob, str | None]]]:
    """The results of the jobs that need not run, and the jobs to run (each with why, when its output exists). Every
    process decides the same, before any of them writes."""
    settled, todo = [], []
    checked: dict[Any, Any] = {}  # what _resume_status has read of each model, for the jobs after
    for p in planned:
        result, note = _resume_status(p, checked)
        if result is None:
            todo.append((p, note))
        else:
            settled.append(result)
    return settled, todo


def _run_shares(
    todo: list[tuple[PlannedJob, str | None]], state: Any, on_job: Callable[[JobResult], None] | None
) -> list[JobResult]:
    """This process's share of ``todo`` run (all of it without accelerate), and every process's results."""
    if state is None:
        return _run_jobs(todo, 0, None, on_job)
    state.wait_for_everyone()
    with state.split_between_processes(todo) as mine:
        ran = _run_jobs(mine, state.process_index, "cpu" if state.device.type == "cpu" else state.device, on_job)
    return [JobResult(**r) for part in _gather(state, [asdict(r) for r in ran]) for r in part]


@contextlib.contextmanager
def _processes() -> Iterator[Any]:
    """accelerate's process state when this process is one of several (``accelerate launch``, ``torchrun``), else
    None; on a machine without GPUs the processes share the CPU (gloo). A process group this call starts is ended
    with it: left to interpreter exit, its gloo threads still run there and can abort the process (std::terminate).

    ``torch.distributed.nn`` is imported before the group starts: its functions take the default group as a default
    argument, read when the module is first imported, which the jobs' libraries do (diffusers, through
    ``torch._dynamo``). Imported while the group exists, they hold it, and ``destroy_process_group`` leaves it and
    its threads alive."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield None
        return
    import torch
    import torch.distributed.nn  # noqa: F401  (before the group: see above)
    from accelerate import PartialState

    started = not torch.distributed.is_initialized()
    state = PartialState(cpu=not torch.cuda.is_available())
    try:
        yield state
    finally:
        if started and torch.distributed.is_initialized():
            state.destroy_process_group()


def launch_notes() -> list[str]:
    """What to tell a user whose launcher asked for several processes but started one."""
    if (
        os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true"
        and "MASTER_ADDR" in os.environ
        and "WORLD_SIZE" not in os.environ
    ):
        return [
            "accelerate launch --cpu started one process (accelerate starts several CPU processes only through "
            "mpirun): every job runs in this one; for several processes on one machine use accelerate launch "
            "--multi_gpu --num_processes N (on a machine without GPUs they share the CPU) or torchrun"
        ]
    return []


def _gather(state: Any, results: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Every process's results, in process order (sent as JSON text)."""
    from accelerate.utils import gather_object

    return [json.loads(text) for text in gather_object([json.dumps(results)])]


def _resume_status(p: PlannedJob, checked: dict[Any, Any]) -> tuple[JobResult | None, str | None]:
    """(the job's result when it need not run, why it runs although its output exists). Skipped: the patch there
    holds the same settings. Failed: the file there is not a patch (never replaced). Run, with a note: the patch
    there differs and is redone."""
    from ..format.patchfile import load_patch

    job = p.job
    if not job.output.exists():
        return None, None
    try:
        patch = load_patch(job.output)
    except ErasekitError as e:
        return JobResult(
            p.index,
            p.name,
            job.concepts,
            "failed",
            error=f"{p.name} exists and is not a patch ({e.problem}); delete it or choose another output",
            path=p.path,
        ), None
    differs = settings_differ(job, patch, checked)
    if differs is not None:
        return None, f"redone: {differs}"
    return JobResult(
        p.index,
        p.name,
        job.concepts,
        "skipped",
        loop_seconds=patch.manifest.method.duration_s,
        patch_bytes=job.output.stat().st_size,
        note=f"patch {patch.patch_id[:12]} holds these settings",
        path=p.path,
    ), None


def settings_differ(job: Any, patch: Any, checked: dict[Any, Any] | None = None) -> str | None:
    """What differs between the patch an :class:`~erasekit.erasing.erase_job.EraseJob` would write and ``patch``, as the
    patch's manifest records it (concepts, seed, settings, earlier patches, training images, base model); None when
    nothing does. ``checked``: what was already read of the models (see :func:`_base_differs`, :func:`_in_place`)."""
    checked = {} if checked is None else checked
    m = patch.manifest
    hp = m.method.hyperparameters
    if [c.name for c in m.concepts] != job.concepts:
        return "its concepts differ"
    if m.method.seed != job.config.seed:
        return f"its seed was {m.method.seed}"
    wanted = json.loads(json.dumps(job.config.hyperparameters()))
    if hp.get("algorithm") != wanted.pop("algorithm"):
        return "an earlier version of erasekit made it (the same settings now erase otherwise)"
    wanted.setdefault("train", "dense")  # recorded only where factors trained
    changed = [k for k, v in wanted.items() if hp.get(k, "dense" if k == "train" else None) != v]
    if changed:
        return f"its {', '.join(changed)} differed"
    earlier = (
        [a.get("patch_id") for a in hp.get("after", []) if isinstance(a, dict)]
        if isinstance(hp.get("after"), list)
        else []
    )
    if earlier != [a["patch_id"] for a in _in_place(job, checked)] + [p.patch_id for p in job.after]:
        return "it was made after other patches (--after, or applied to the model in place)"
    digest = job.images_digest()
    if digest is not None and digest != m.method.images_sha256:
        return "its training images differ"
    if digest is None and m.method.num_images != job.num_images * len(job.concepts):
        return f"it was made from {m.method.num_images} images"
    if job.prediction_type and hp.get("prediction_type") != job.prediction_type:
        return f"its prediction type was {hp.get('prediction_type')}"
    return _base_differs(job, patch, checked)


def _in_place(job: Any, checked: dict[Any, Any]) -> list[dict[str, str]]:
    """The patches applied in place to the job's model, which an erase of it records as made after."""
    from ..checkpoints.in_place import applied_in_place

    key = ("in place", *_model_files(job))
    if key not in checked:
        checked[key] = applied_in_place(_detected(job))
    return checked[key]


def _model_files(job: Any) -> tuple[str, ...]:
    """The job's model as the files it is read from: the model, and a transformer file's encoder files."""
    return (str(job.model), *map(str, job.text_encoders))


def _detected(job: Any) -> Any:
    """The job's model detected as its erase detects it (a transformer file with its encoder files and VAE)."""
    from ..checkpoints.parts import detect_model

    return detect_model(job.model, job.text_encoders, job.vae, job.config_dir)


def _base_differs(job: Any, patch: Any, checked: dict[Any, Any]) -> str | None:
    """Whether ``patch`` fits the job's model (exactly or at another precision). ``checked`` remembers the answer
    per model and base: the patches of a batch share their base, and reading it is most of a resume check."""
    from ..checkpoints.compat import base_statuses, slot_map
    from ..checkpoints.in_place import pristine_reader

    key = (*_model_files(job), tuple(sorted((name, fp.sha256) for name, fp in patch.manifest.base.tensors.items())))
    if key not in checked:
        ckpt = _detected(job)
        try:
            mapping = slot_map(patch, ckpt.architecture, ckpt.encoders, str(job.model))
            checked[key] = "differs" not in base_statuses(patch, ckpt, mapping, pristine_reader(ckpt)).values()
        except ErasekitError:
            checked[key] = False
    return None if checked[key] else "it was made for another model"


def _run_jobs(
    todo: list[tuple[PlannedJob, str | None]], rank: int, device: Any, on_job: Callable[[JobResult], None] | None
) -> list[JobResult]:
    """This process's jobs, in manifest order, one loaded pipeline reused while the model stays the same.
    ``device``: the process's own device under accelerate (for jobs that leave it to ``auto``)."""
    from ..checkpoints.pipeline import model_threads
    from .erase_job import import_libraries, load_for, run_erase
    from .unlearn import Clock

    if todo:
        import_libraries()
    loaded: tuple[Any, Any, Any] | None = None  # (load key, pipeline, checkpoint)
    results = []
    for p, note in todo:
        job, clock = p.job, Clock()
        if device is not None and job.config.device == "auto":
            job.config = job.config.model_copy(update={"device": str(device)})
        result = JobResult(p.index, p.name, job.concepts, "done", note=note, process=rank, path=p.path)
        try:
            with model_threads(job.model):
                if loaded is None or loaded[0] != job.load_key():
                    loaded = None  # the last model goes before the next one loads
                    loaded = (job.load_key(), *load_for(job, clock))
                report = run_erase(job, loaded[1], loaded[2], clock)
            result.loop_seconds, result.loss_start, result.loss_end = (
                report.loop_seconds,
                report.loss_start,
                report.loss_end,
            )
            result.patch_bytes, result.load_seconds = report.patch_bytes, clock.seconds.get("load", 0.0)
        except ErasekitError as e:
            result.status, result.error = "failed", str(e)
        except Exception as e:  # a bug in one job: reported with it, and the model is loaded afresh for the next
            result.status, result.error = "failed", f"internal error ({type(e).__name__}: {e})"
            loaded = None
        results.append(result)
        if on_job:
            on_job(result)
    return results
