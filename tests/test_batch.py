"""erase --manifest: a batch of erases, one patch each, resumable, split between processes by accelerate."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import snapshot
from typer.testing import CliRunner

from erasekit.cli import app
from erasekit.format.patchfile import load_patch

# Six jobs on the built-in model: shapes, colours, a pattern, a two-concept patch, images the model draws itself,
# a dense patch, two recipes.
SIX = """\
steps = 4
recipe = "anchored"

[[jobs]]
concept = "circle"
output = "out/circle.erasepatch"

[[jobs]]
concept = "red"
output = "out/red.erasepatch"
seed = 1
keep = "purple"

[[jobs]]
concept = "striped"
output = "out/striped.erasepatch"
recipe = "paper"

[[jobs]]
concept = ["square", "blue"]
output = "out/square-blue.erasepatch"

[[jobs]]
concept = "star"
output = "out/star.erasepatch"
images = "auto"
num_images = 2

[[jobs]]
concept = "green"
output = "out/green.erasepatch"
rank = "dense"
stand_in = {green = "yellow"}
"""
REPRODUCIBLE = {"SOURCE_DATE_EPOCH": "1700000000", "OMP_NUM_THREADS": "1"}  # the same bytes from the same erase
runner = CliRunner()


def write(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "jobs.toml").write_text(text)
    return folder / "jobs.toml"


def erasekit(
    *args: object,
    cwd: Path,
    launcher: list[str] | None = None,
    env: dict[str, str] | None = None,
    program: list[str] | None = None,
) -> subprocess.Popen[str]:
    """``program`` (default ``-m erasekit``) run with ``args`` by ``launcher`` (default this Python)."""
    command = [*(launcher or [sys.executable]), *(program or ["-m", "erasekit"]), *map(str, args)]
    return subprocess.Popen(
        command,
        cwd=cwd,
        env=os.environ | REPRODUCIBLE | (env or {}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def finished(p: subprocess.Popen[str]) -> tuple[int, dict, str]:
    stdout, stderr = p.communicate(timeout=600)
    return p.returncode, (json.loads(stdout) if stdout.strip() else {}), stderr


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The six jobs in one process, killed once two patches are written, then run again to the end."""
    folder = tmp_path_factory.mktemp("single")
    write(folder, SIX)
    out = folder / "out"
    first = erasekit("erase", "--manifest", "jobs.toml", "--json", cwd=folder)
    deadline = time.monotonic() + 300
    while len(list(out.glob("*.erasepatch"))) < 2 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.communicate()
    before = snapshot(out)
    code, summary, stderr = finished(erasekit("erase", "--manifest", "jobs.toml", "--json", cwd=folder))
    return {"folder": folder, "before": before, "code": code, "summary": summary, "stderr": stderr}


def test_a_killed_batch_finishes_only_the_missing_jobs(killed_and_resumed: dict) -> None:
    run = killed_and_resumed
    written = [name for name in run["before"] if name.endswith(".erasepatch")]
    assert 2 <= len(written) < 6, run["before"]  # killed in the middle
    for name in written:  # a patch at an output's name is whole (atomic writes)
        load_patch(run["folder"] / "out" / name)
    assert run["code"] == 0, run["stderr"]
    jobs = run["summary"]["jobs"]
    assert [j["index"] for j in jobs] == list(range(6))
    skipped = {Path(j["output"]).name for j in jobs if j["status"] == "skipped"}
    assert skipped == set(written)
    assert all(j["status"] == "done" for j in jobs if Path(j["output"]).name not in skipped)
    assert run["summary"]["counts"] == {"done": 6 - len(written), "skipped": len(written), "failed": 0}
    after = snapshot(run["folder"] / "out")
    assert {n: after[n] for n in written} == {n: run["before"][n] for n in written}  # untouched
    assert sorted(n for n in after if n.endswith(".erasepatch")) == sorted(Path(j["output"]).name for j in jobs)
    red = load_patch(run["folder"] / "out" / "red.erasepatch").manifest
    assert (red.method.seed, red.method.hyperparameters["keep"], red.method.hyperparameters["steps"]) == (
        1,
        ["purple"],
        4,
    )
    assert load_patch(run["folder"] / "out" / "square-blue.erasepatch").manifest.title == "square + blue erased"


def test_accelerate_splits_the_jobs_between_two_processes(killed_and_resumed: dict, tmp_path: Path) -> None:
    """Two CPU processes (accelerate's torchrun launcher; ``--cpu`` starts several only through mpirun): every job
    runs once, and the patches are byte for byte those of one process with the same thread count. Neither process
    runs a thread of the process group at exit (a group left alive there can abort the process as it exits:
    ``terminate called without an active exception``)."""
    write(tmp_path, SIX)
    launcher = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
    ]
    code, summary, stderr = finished(
        erasekit(
            "erase",
            "--manifest",
            "jobs.toml",
            "--json",
            cwd=tmp_path,
            launcher=launcher,
            env={"CUDA_VISIBLE_DEVICES": ""},
            program=[str(Path(__file__).parent / "exit_threads.py")],
        )
    )
    assert code == 0, stderr
    at_exit = [
        json.loads(line.removeprefix("threads at exit: "))
        for line in stderr.splitlines()
        if line.startswith("threads at exit: ")
    ]
    assert len(at_exit) == 2, stderr
    assert [[name for name in names if "gloo" in name] for names in at_exit] == [[], []], stderr
    assert summary["processes"] == 2
    assert sorted(j["index"] for j in summary["jobs"]) == list(range(6))
    assert {j["status"] for j in summary["jobs"]} == {"done"}
    assert {j["process"] for j in summary["jobs"]} == {0, 1}
    reference = snapshot(killed_and_resumed["folder"] / "out")
    assert snapshot(tmp_path / "out") == reference


def test_a_patch_an_earlier_erase_algorithm_made_is_redone(tmp_path: Path) -> None:
    """The same settings recorded by an erasekit that held and stored otherwise (no ``algorithm`` then) do not make
    a patch current: a rerun redoes it, saying why."""
    from erasekit.format.patchfile import save_patch

    manifest = write(tmp_path, "steps = 2\n[[jobs]]\nconcept = 'circle'\noutput = 'out/c.erasepatch'\n")
    assert runner.invoke(app, ["erase", "--manifest", str(manifest)]).exit_code == 0
    patch = load_patch(tmp_path / "out" / "c.erasepatch")
    assert patch.manifest.method.hyperparameters.pop("algorithm") == 2
    save_patch(patch, tmp_path / "out" / "c.erasepatch")
    r = runner.invoke(app, ["erase", "--manifest", str(manifest), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["jobs"][0]["note"] == (
        "redone: an earlier version of erasekit made it (the same settings now erase otherwise)"
    )
    assert load_patch(tmp_path / "out" / "c.erasepatch").manifest.method.hyperparameters["algorithm"] == 2


def test_accelerate_cpu_flag_says_it_started_one_process(tmp_path: Path) -> None:
    manifest = write(tmp_path, "steps = 2\n[[jobs]]\nconcept = 'circle'\noutput = 'out/c.erasepatch'\n")
    r = subprocess.run(
        [
            str(Path(sys.executable).parent / "accelerate"),
            "launch",
            "--cpu",
            "--num_processes",
            "2",
            "-m",
            "erasekit",
            "erase",
            "--manifest",
            manifest.name,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert "warning: accelerate launch --cpu started one process" in r.stderr
    assert "1 jobs on 1 process" in r.stdout


def test_changed_settings_redo_that_job_and_a_failure_spares_the_others(tmp_path: Path) -> None:
    text = (
        "steps = 3\n[[jobs]]\nconcept = 'circle'\noutput = 'out/a.erasepatch'\n"
        "[[jobs]]\nconcept = 'red'\noutput = 'out/b.erasepatch'\n"
    )
    manifest = write(tmp_path, text)
    assert runner.invoke(app, ["erase", "--manifest", str(manifest)]).exit_code == 0
    first = snapshot(tmp_path / "out")
    # job 1 now asks for more steps; job 2 is new and cannot run (one image, batches of two)
    manifest.write_text(
        text.replace("output = 'out/b.erasepatch'", "output = 'out/b.erasepatch'\nsteps = 4")
        + "[[jobs]]\nconcept = 'blue'\noutput = 'out/c.erasepatch'\nnum_images = 1\n"
    )
    r = runner.invoke(app, ["erase", "--manifest", str(manifest), "--json"])
    assert r.exit_code == 1
    jobs = json.loads(r.stdout)["jobs"]
    assert [j["status"] for j in jobs] == ["skipped", "done", "failed"]
    assert jobs[1]["note"] == "redone: its steps differed"
    assert jobs[2]["error"] == "1 training images but a batch size of 2; add images or lower the batch size"
    assert "error: 1 of 3 jobs failed" in r.stderr
    now = snapshot(tmp_path / "out")
    assert now["a.erasepatch"] == first["a.erasepatch"] and now["b.erasepatch"] != first["b.erasepatch"]
    assert load_patch(tmp_path / "out" / "b.erasepatch").manifest.method.hyperparameters["steps"] == 4
    assert not (tmp_path / "out" / "c.erasepatch").exists()


def test_a_file_that_is_not_a_patch_is_never_replaced(tmp_path: Path) -> None:
    manifest = write(tmp_path, "steps = 2\n[[jobs]]\nconcept = 'circle'\noutput = 'out/a.erasepatch'\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.erasepatch").write_bytes(b"my notes")
    r = runner.invoke(app, ["erase", "--manifest", str(manifest), "--json"])
    assert r.exit_code == 1
    assert json.loads(r.stdout)["jobs"][0]["error"].startswith("out/a.erasepatch exists and is not a patch (")
    assert (tmp_path / "out" / "a.erasepatch").read_bytes() == b"my notes"


def test_jobs_share_one_pipeline_and_leave_it_exactly_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job's patch is the same whether it runs first or after another job on the same loaded model, and the
    pipeline's weights, dtypes and flags are bit for bit what they were."""
    import torch

    import erasekit.checkpoints.pipeline as pipeline
    from erasekit.checkpoints.pipeline import model_threads
    from erasekit.erasing.batch_manifest import plan_batch
    from erasekit.erasing.erase_job import load_for, run_erase
    from erasekit.erasing.unlearn import Clock

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    loads = []
    real = pipeline.load_pipeline
    monkeypatch.setattr(pipeline, "load_pipeline", lambda *a, **kw: loads.append(a) or real(*a, **kw))
    text = (
        "steps = 3\nrecipe = 'anchored'\n[[jobs]]\nconcept = 'circle'\noutput = 'out/a.erasepatch'\n"
        "[[jobs]]\nconcept = 'red'\noutput = 'out/b.erasepatch'\n"
    )
    planned = plan_batch(write(tmp_path / "both", text))
    pipe, ckpt = load_for(planned[0].job, Clock())
    state = {
        k: (v.dtype, v.clone()) for k, v in [*pipe.unet.state_dict().items(), *pipe.text_encoder.state_dict().items()]
    }
    flags = [(m.training, [p.requires_grad for p in m.parameters()]) for m in (pipe.unet, pipe.text_encoder, pipe.vae)]
    with model_threads(planned[0].job.model):  # as a batch runs them: the model's thread count
        for p in planned:
            run_erase(p.job, pipe, ckpt, Clock())
    for k, v in [*pipe.unet.state_dict().items(), *pipe.text_encoder.state_dict().items()]:
        assert v.dtype == state[k][0] and torch.equal(v, state[k][1]), k
    assert flags == [
        (m.training, [p.requires_grad for p in m.parameters()]) for m in (pipe.unet, pipe.text_encoder, pipe.vae)
    ]
    alone = write(
        tmp_path / "alone", "steps = 3\nrecipe = 'anchored'\n[[jobs]]\nconcept = 'red'\noutput = 'out/b.erasepatch'\n"
    )
    r = runner.invoke(app, ["erase", "--manifest", str(alone)])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "alone" / "out" / "b.erasepatch").read_bytes() == (
        tmp_path / "both" / "out" / "b.erasepatch"
    ).read_bytes()
    two = write(tmp_path / "two", text)
    loads.clear()
    assert runner.invoke(app, ["erase", "--manifest", str(two)]).exit_code == 0
    assert len(loads) == 1  # one model, loaded once for both jobs


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "stepz = 3\n[[jobs]]\nconcept = 'circle'\noutput = 'a.erasepatch'\n",
            "jobs.toml: top level, field stepz: unknown field; name erase's long options with underscores",
        ),
        (
            "[[jobs]]\nconcept = 'circle'\noutput = 'a.erasepatch'\n[[jobs]]\nconcept = 'red'\noutput = 'b.erasepatch'\nlrr = 1\n",
            "jobs.toml: jobs[1] (b.erasepatch), field lrr: unknown field;",
        ),
        (
            "[[jobs]]\nconcept = 'circle'\noutput = 'a.erasepatch'\nsteps = 'ten'\n",
            "jobs.toml: jobs[0] (a.erasepatch), field steps: input should be a valid integer",
        ),
        (
            "[[jobs]]\nconcept = 'circle'\n",
            "jobs.toml: jobs[0], field output: field required; every [[jobs]] table needs concept and output",
        ),
        ("steps = 3\n", "jobs.toml: top level, field jobs: field required; add [[jobs]] tables"),
        (
            "[[jobs]]\nconcept = 'circle'\noutput = 'a.erasepatch'\nimages = 'nowhere'\n",
            "jobs.toml: jobs[0] (a.erasepatch), field images: image folder",
        ),
        (
            "[[jobs]]\nconcept = 'circle'\noutput = 'a.erasepatch'\n[[jobs]]\nconcept = 'red'\noutput = './a.erasepatch'\n",
            "jobs.toml: jobs[1] (./a.erasepatch), field output: jobs[0] writes the same file; give every job its own output",
        ),
        (
            "[[jobs]]\nconcept = 'circle'\noutput = 'a.erasepatch'\n[[jobs]]\nconcept = 'red'\noutput = 'A.erasepatch'\n",
            "jobs.toml: jobs[1] (A.erasepatch), field output: jobs[0] writes the same file",
        ),
        (
            "[[jobs]]\nconcept = 'circle'\noutput = 'a.erasepatch'\nrecipe = 'magic'\n",
            "jobs.toml: jobs[0] (a.erasepatch), field recipe: invalid recipe: Input should be 'paper', 'anchored' or 'doco'",
        ),
        (
            "[[jobs]]\nconcept = 'circle'\noutput = 'a.erasepatch'\nafter = 'earlier.erasepatch'\n",
            "jobs.toml: jobs[0] (a.erasepatch)",
        ),
        (
            "[[jobs]]\nconcept = 'circle'\noutput = 'jobs.toml/a.erasepatch'\n",
            "jobs.toml: jobs[0] (jobs.toml/a.erasepatch), field output: jobs.toml is not a folder",
        ),
        ("[[jobs]\nconcept = 'circle'\n", "jobs.toml is not valid TOML ("),
        (
            "[[jobs]]\nconcept = 'circle'\noutput = 'a.erasepatch'\n[[jobs]]\nconcept = 'red'\noutput = 'run.sh'\n",
            "jobs.toml: jobs[1] (run.sh), field output: a patch file's name must end in .erasepatch or .safetensors; name "
            "the output NAME.erasepatch (or NAME.safetensors) (--manifest)",
        ),
        (
            "[[jobs]]\nconcept = 'circle'\noutput = 'out/.erasepatch'\n",
            "jobs.toml: jobs[0] (out/.erasepatch), field output: a patch file's name must end in .erasepatch or .safetensors",
        ),
        (
            "[[jobs]]\nconcept = 'circle'\noutput = 'a.erasepatch.bak'\n",
            "jobs.toml: jobs[0] (a.erasepatch.bak), field output: a patch file's name must end in .erasepatch or .safetensors",
        ),
        (
            "[[jobs]]\nconcept = 'circle'\noutput = 'a.erasepatch'\nconcept_template = {cirle = 'a {} shape'}\n",
            "jobs.toml: jobs[0] (a.erasepatch), field concept_template: templates are given for 'cirle', which this erase "
            "neither erases nor keeps",
        ),
    ],
)
def test_a_bad_manifest_is_refused_before_any_model_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, message: str
) -> None:
    import erasekit.checkpoints.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_pipeline", lambda *a, **kw: pytest.fail("a model was loaded"))
    manifest = write(tmp_path, text)
    before = snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["erase", "--manifest", "jobs.toml"])
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith(f"error: {message}") and r.stderr.count("\n") == 1, r.stderr
    assert snapshot(tmp_path) == before and manifest.exists()


def test_the_plan_shows_where_every_job_writes_before_any_runs(tmp_path: Path) -> None:
    """A manifest from someone else cannot write elsewhere under a familiar name unseen: before the first job runs,
    stderr lists each job's absolute path, with ``..`` and linked folders resolved, flagged when it lies outside
    the manifest's folder; the JSON summary carries the same paths."""
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "link").symlink_to(tmp_path / "elsewhere")
    manifest = write(
        tmp_path / "m",
        "steps = 2\n[[jobs]]\nconcept = 'circle'\noutput = 'out/a.erasepatch'\n"
        "[[jobs]]\nconcept = 'red'\noutput = '../up.erasepatch'\n"
        "[[jobs]]\nconcept = 'blue'\noutput = 'link/b.safetensors'\n",
    )
    root = Path(os.path.realpath(tmp_path))
    r = runner.invoke(app, ["erase", "--manifest", str(manifest)])
    assert r.exit_code == 0, r.output
    plan = (
        f"3 jobs write:\n  jobs[0] circle -> {root / 'm' / 'out' / 'a.erasepatch'}\n"
        f"  jobs[1] red -> {root / 'up.erasepatch'}  (outside the manifest's folder)\n"
        f"  jobs[2] blue -> {root / 'elsewhere' / 'b.safetensors'}  (outside the manifest's folder)\n"
    )
    assert r.stderr.startswith(plan), r.stderr
    assert (tmp_path / "up.erasepatch").is_file() and (tmp_path / "elsewhere" / "b.safetensors").is_file()
    r = runner.invoke(app, ["erase", "--manifest", str(manifest), "--json"])
    jobs = json.loads(r.stdout)["jobs"]
    assert [j["path"] for j in jobs] == [
        str(root / "m" / "out" / "a.erasepatch"),
        str(root / "up.erasepatch"),
        str(root / "elsewhere" / "b.safetensors"),
    ]
    assert [j["output"] for j in jobs] == ["out/a.erasepatch", "../up.erasepatch", "link/b.safetensors"]


def test_erase_options_are_refused_next_to_a_manifest(tmp_path: Path) -> None:
    manifest = write(tmp_path, "[[jobs]]\nconcept = 'circle'\noutput = 'a.erasepatch'\n")
    r = runner.invoke(app, ["erase", "--manifest", str(manifest), "--steps", "3"])
    assert r.exit_code == 1
    assert r.stderr == (
        "error: --steps cannot be given with --manifest; set it in the manifest (top level for every "
        "job, or in a [[jobs]] table) (--manifest)\n"
    )
    r = runner.invoke(app, ["erase", "-o", str(tmp_path / "x.erasepatch")])
    assert r.exit_code == 1 and r.stderr.startswith(
        "error: erase needs --concept and -o (or a batch of jobs: --manifest)"
    )


def test_paths_are_relative_to_the_manifest(tmp_path: Path) -> None:
    from erasekit.erasing.batch_manifest import plan_batch
    from erasekit.toyworld import builtin_model_path
    from erasekit.toyworld.concepts import render_concept

    (tmp_path / "imgs").mkdir()
    render_concept("circle", 0)[0].save(tmp_path / "imgs" / "c0.png")
    render_concept("circle", 1)[0].save(tmp_path / "imgs" / "c1.png")
    shutil.copytree(builtin_model_path(), tmp_path / "model")
    planned = plan_batch(
        write(
            tmp_path,
            "model = 'model'\n[[jobs]]\nconcept = 'circle'\noutput = 'out/a.erasepatch'\n"
            "images = 'imgs'\ntemplates = ['a {} shape']\nlayers = '0-1'\n"
            "[[jobs]]\nconcept = 'circle'\noutput = 'b.erasepatch'\nimages = 'imgs'\n"
            "concept_template = ['circle=a {} shape', 'circle=one {}']\n"
            "[[jobs]]\nconcept = 'circle'\noutput = 'c.erasepatch'\nimages = 'imgs'\n"
            "concept_template = {circle = ['a {} shape', 'one {}']}\n",
        )
    )
    job = planned[0].job
    assert job.model == tmp_path / "model" and job.output == tmp_path / "out" / "a.erasepatch"
    assert job.groups == [[tmp_path / "imgs" / "c0.png", tmp_path / "imgs" / "c1.png"]]
    assert (job.config.templates, job.config.layers) == (["a {} shape"], [0, 1])
    for p in planned[1:]:  # CONCEPT=TEMPLATE strings, or a table of lists
        assert p.job.config.concept_templates == {"circle": ["a {} shape", "one {}"]}


def test_the_example_manifest_is_valid() -> None:
    from erasekit.erasing.batch_manifest import plan_batch

    planned = plan_batch(Path(__file__).parent.parent / "examples" / "jobs.toml")
    assert [p.job.concepts for p in planned] == [["circle"], ["red"], ["striped", "triangle"]]
    assert [p.job.config.recipe for p in planned] == ["anchored"] * 3
    assert planned[2].job.config.steps == 60 and planned[1].job.config.keep == ["purple"]


def test_a_patch_made_from_another_model_is_redone(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from erasekit.checkpoints.apply import apply_to_checkpoint
    from erasekit.toyworld import builtin_model_path

    shutil.copytree(builtin_model_path(), tmp_path / "model")
    manifest = write(tmp_path, "model = 'model'\nsteps = 2\n[[jobs]]\nconcept = 'circle'\noutput = 'a.erasepatch'\n")
    assert runner.invoke(app, ["erase", "--manifest", str(manifest)]).exit_code == 0
    again = runner.invoke(app, ["erase", "--manifest", str(manifest), "--json"])
    assert json.loads(again.stdout)["counts"]["skipped"] == 1

    other = tmp_path / "other"  # the same model with its encoder changed by another program
    shutil.copytree(builtin_model_path(), other)
    weights = load_file(other / "text_encoder" / "model.safetensors")
    fc2 = next(k for k in weights if k.endswith("layers.1.mlp.fc2.weight"))
    weights[fc2] = weights[fc2] + 0.01
    save_file(weights, other / "text_encoder" / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(tmp_path / "a.erasepatch", tmp_path / "b.erasepatch")
    elsewhere = tmp_path / "other.toml"
    elsewhere.write_text(manifest.read_text().replace("'model'", "'other'").replace("a.erasepatch", "b.erasepatch"))
    r = runner.invoke(app, ["erase", "--manifest", str(elsewhere), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["jobs"][0]["note"] == "redone: it was made for another model"

    apply_to_checkpoint([tmp_path / "a.erasepatch"], tmp_path / "model", in_place=True)
    r = runner.invoke(app, ["erase", "--manifest", str(manifest), "--json"])
    assert (
        json.loads(r.stdout)["jobs"][0]["note"]
        == "redone: it was made after other patches (--after, or applied to the model in place)"
    )
    again = runner.invoke(app, ["erase", "--manifest", str(manifest), "--json"])
    assert json.loads(again.stdout)["counts"]["skipped"] == 1, "made after the patch in place: the same settings"


def test_a_broken_model_file_is_refused_with_the_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "weights.safetensors").write_bytes(b"junk\n")
    write(
        tmp_path, "model = 'weights.safetensors'\nimages = 'auto'\n[[jobs]]\nconcept = 'x'\noutput = 'x.erasepatch'\n"
    )
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["erase", "--manifest", "jobs.toml"])
    assert r.exit_code == 2
    assert r.stderr.startswith("error: jobs.toml: jobs[0] (x.erasepatch): checkpoint weights.safetensors is truncated")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jobs.toml", "weights.safetensors"]
