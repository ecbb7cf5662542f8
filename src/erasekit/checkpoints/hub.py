"""Model ids (``ORG/NAME`` or ``ORG/NAME@REVISION``) resolved through huggingface_hub.

The Hugging Face cache (``HF_HOME``/``HF_HUB_CACHE``) is read with the library's own API; nothing here walks it by
hand. A model that is in the cache is used from there, with no network access. A model that is not is downloaded
(huggingface_hub's progress bars on stderr), only the files the command needs: the pipeline's configs,
tokenizers, ``erasekit.json`` (a model's recommended settings, where it has one) and the UNet, VAE and
text-encoder weights, the fp16 variant where the repo has one (half the bytes;
erasekit computes in float32 or the autocast dtype either way). With ``HF_HUB_OFFLINE=1`` a missing model is an
error that names the command to download it.

Files in the cache are content-addressed blobs shared between snapshots (``snapshots/<commit>/x`` is a link into
``blobs/``), so erasekit never writes through them: ``apply --in-place`` refuses and points to ``-o``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import ErasekitError, InputFileError
from ..families import ENCODER_COMPONENTS, PIPELINES, TOKENIZER_COMPONENTS, not_yet

_ID_RE = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")
_FILE_SUFFIXES = (".safetensors", ".erasepatch", ".ckpt", ".pt", ".pth", ".bin", ".json")
# what each command needs from a pipeline repo: text encoders only (inspect, diff), or all it runs on
TEXT_ENCODERS = ENCODER_COMPONENTS
PIPELINE = (*dict.fromkeys(c for f in PIPELINES for c, _ in f.parts), *TEXT_ENCODERS)
_SMALL = ("scheduler", *TOKENIZER_COMPONENTS)  # components of configs and vocabularies, always fetched whole
_ALWAYS = ("model_index.json", "erasekit.json", *(f"{c}/*" for c in _SMALL))


def parse_model_id(text: str) -> tuple[str, str | None] | None:
    """``"org/name@rev"`` -> ``("org/name", "rev")``; None if ``text`` is not a model id."""
    m = _ID_RE.match(text)
    if m and m.group("repo").lower().endswith(_FILE_SUFFIXES):  # "out/x.erasepatch" is a path, never an id
        return None
    return (m.group("repo"), m.group("rev")) if m else None


def resolve_model(model: str | os.PathLike, components: tuple[str, ...] = PIPELINE) -> Path:
    """A local path as it is; a built-in model's name (``toy-sd``, ``toy-sdxl``) as its folder; a model id as the
    folder of its snapshot in the cache (downloaded if needed). A path that exists always wins over a name or an id
    of the same spelling."""
    from ..toyworld import BUILTIN_MODELS, builtin_model_path

    path = Path(model)
    if path.exists():
        return path
    if str(model) in BUILTIN_MODELS:
        return builtin_model_path(str(model))
    parsed = parse_model_id(str(model))
    if parsed is None:
        raise InputFileError(
            f"{model} does not exist",
            f"check the path (or name a model id: ORG/NAME[@REVISION], or a built-in model: {', '.join(BUILTIN_MODELS)})",
        )
    return snapshot(*parsed, components=components)


def in_hub_cache(path: Path) -> bool:
    """True for a file of a Hugging Face cache: a blob (``models--ORG--NAME/blobs/<hash>``) or a snapshot link to one."""
    try:
        target = Path(path).resolve()
    except OSError:
        return False
    return target.parent.name == "blobs" and target.parent.parent.name.startswith(
        ("models--", "datasets--", "spaces--")
    )


def snapshot(repo: str, revision: str | None, components: tuple[str, ...] = PIPELINE) -> Path:
    """The cached snapshot folder of ``repo`` holding ``components``; downloads what is missing when online."""
    from huggingface_hub import is_offline_mode, snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    folder: Path | None
    try:
        folder = Path(snapshot_download(repo, revision=revision, local_files_only=True))
    except IncompleteSnapshotError as e:  # a partial download (e.g. text encoders only): enough for some commands
        folder = Path(e.snapshot_path)
    except LocalEntryNotFoundError:
        folder = None
    if folder is not None and not _missing(folder, components):
        return folder
    name = repo + (f"@{revision}" if revision else "")
    if is_offline_mode():
        what = f"lacks {', '.join(_missing(folder, components))}" if folder else "is neither a local path nor"
        raise ErasekitError(
            f"{name} {what} in the Hugging Face cache, and downloads are off (HF_HUB_OFFLINE)",
            f"download it once online: {download_command(repo, revision, components)}",
        )
    return _download(repo, revision, components)


def _missing(folder: Path | None, components: tuple[str, ...]) -> list[str]:
    """The parts of a pipeline snapshot that are not there (an index-listed component without weights)."""
    if folder is None or not (folder / "model_index.json").is_file():
        return ["model_index.json"]
    import json

    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError, RecursionError):
        return ["model_index.json"]
    listed = [c for c in components if isinstance(index.get(c), list) and index[c][:1] != [None]]
    listed += [
        c for c in _SMALL if components == PIPELINE and isinstance(index.get(c), list) and index[c][:1] != [None]
    ]
    return [c for c in listed if not (folder / c).is_dir() or not any((folder / c).iterdir())]


def download_command(repo: str, revision: str | None, components: tuple[str, ...] = PIPELINE) -> str:
    """The ``hf download`` command that fetches what erasekit needs (all weight variants: the file list is
    unknown offline)."""
    rev = f" --revision {revision}" if revision else ""
    include = " ".join(f'--include "{p}"' for p in (*_ALWAYS, *(f"{c}/*" for c in components)))
    return f"hf download {repo}{rev} {include}"


_SHARD = re.compile(r"-\d{5}-of-\d{5}(?=\.(?:safetensors|bin)$)")  # model.fp16-00001-of-00002.safetensors
_INDEX = re.compile(r"(?P<name>.+)\.(?P<ext>safetensors|bin)\.index(?:\.(?P<variant>[^./]+))?\.json")


def _as_one_file(name: str) -> str:
    """The one file that a shard or the index of shards stands in for: ``model.fp16.safetensors`` for
    ``model.fp16-00001-of-00002.safetensors`` and for ``model.safetensors.index.fp16.json``."""
    if m := _INDEX.fullmatch(name):
        return f"{m['name']}.{m['variant']}.{m['ext']}" if m["variant"] else f"{m['name']}.{m['ext']}"
    return _SHARD.sub("", name)


def allow_patterns(files: list[str], components: tuple[str, ...]) -> list[str]:
    """The files of a repo listing that erasekit downloads: configs, tokenizers and the model's ``erasekit.json``
    (its recommended settings), and for each component its fp16 weights if the repo has them, else its plain ones
    (safetensors before pickles); weights saved in shards come with their index, and only with it."""
    wanted = [f for f in files if f in ("model_index.json", "erasekit.json") or f.split("/")[0] in _SMALL]
    for comp in components:
        inside = [f for f in files if f.startswith(comp + "/") and f.count("/") == 1]
        wanted += [f for f in inside if f.endswith(".json") and not _INDEX.fullmatch(f)]
        weights = [f for f in inside if f.endswith((".safetensors", ".bin")) or _INDEX.fullmatch(f)]
        for pick in (
            lambda f: ".fp16." in f and f.endswith(".safetensors"),
            lambda f: f.count(".") == 1 and f.endswith(".safetensors"),
            lambda f: ".fp16." in f,
            lambda f: f.count(".") == 1,
        ):
            chosen = [f for f in weights if pick(_as_one_file(f))]
            if chosen:
                wanted += chosen
                break
    return sorted(set(wanted))


def _refuse_not_yet(repo: str, revision: str | None, name: str) -> None:
    """Refuse a pipeline of a model line erasekit does not patch yet by its ``model_index.json`` alone, before its
    weights are downloaded (Qwen-Image's text encoder alone is 16 GB)."""
    from huggingface_hub import hf_hub_download

    from .layouts import not_yet_error, read_json

    index = read_json(Path(hf_hub_download(repo, "model_index.json", revision=revision)))
    class_name = str(index.get("_class_name", ""))
    line = not_yet(class_name)
    if line is not None:
        raise not_yet_error(f"model {name}", line, f"is a {line.line} pipeline ({class_name})")


def _download(repo: str, revision: str | None, components: tuple[str, ...]) -> Path:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
    from huggingface_hub.utils import logging as hub_logging

    name = repo + (f"@{revision}" if revision else "")
    hub_logging.set_verbosity_error()  # its retry warnings would bury the one line erasekit prints; bars stay
    try:
        files = HfApi().list_repo_files(repo, revision=revision)
        if "model_index.json" not in files:
            raise ErasekitError(
                f"model {name} is not a diffusers pipeline (no model_index.json in the repo)",
                "download its single .safetensors file and name that path as the model",
                option="model",
            )
        _refuse_not_yet(repo, revision, name)
        return Path(snapshot_download(repo, revision=revision, allow_patterns=allow_patterns(files, components)))
    except GatedRepoError:
        raise ErasekitError(
            f"model {name} is gated: its licence must be accepted on its Hub page first",
            "accept it there, then log in with `hf auth login` (or set HF_TOKEN)",
        ) from None
    except RepositoryNotFoundError:
        raise ErasekitError(
            f"{name} is neither a local path nor a model on the Hugging Face Hub (or it is private)",
            "check the id; for a private repo log in with `hf auth login`",
        ) from None
    except RevisionNotFoundError:
        raise ErasekitError(f"model {repo} has no revision {revision!r}", "check the branch, tag or commit") from None
    except (HfHubHTTPError, OSError) as e:
        raise ErasekitError(
            f"cannot download {name} ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})",
            "check the connection, or set HF_HUB_OFFLINE=1 to use the cache only",
        ) from None
    except Exception as e:  # httpx transport errors and the like: the network, not erasekit
        if type(e).__module__.split(".")[0] in ("httpx", "httpcore", "httpx2", "httpcore2", "requests", "urllib3"):
            raise ErasekitError(
                f"cannot reach the Hugging Face Hub to download {name} ({type(e).__name__})",
                "check the connection, or set HF_HUB_OFFLINE=1 to use the cache only",
            ) from None
        raise
