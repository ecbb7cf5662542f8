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
from typing import Any

from ..errors import ErasekitError, InputFileError
from ..families import (
    ENCODER_COMPONENTS,
    ENCODER_KINDS,
    PIPELINES,
    TOKENIZER_COMPONENTS,
    by_components,
    lines,
    listing,
    not_yet,
    patched_encoders,
    unpatched_encoder,
    with_article,
)
from ..families.base import EncoderKind, Family

_ID_RE = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")
_FILE_SUFFIXES = (".safetensors", ".erasepatch", ".ckpt", ".pt", ".pth", ".bin", ".json")
# what each command needs from a pipeline repo: text encoders only (inspect, diff), or all it runs on
TEXT_ENCODERS = ENCODER_COMPONENTS
PIPELINE = (*dict.fromkeys(c for f in PIPELINES for c, _ in f.parts), *TEXT_ENCODERS)
_SMALL = ("scheduler", *TOKENIZER_COMPONENTS)  # components of configs and vocabularies, always fetched whole
_ALWAYS = ("model_index.json", "erasekit.json", *(f"{c}/*" for c in _SMALL))
_WEIGHTS = (".safetensors", ".bin")  # the files of a component that are its weights (whole, or shards)


def parse_model_id(text: str) -> tuple[str, str | None] | None:
    """``"org/name@rev"`` -> ``("org/name", "rev")``; None if ``text`` is not a model id."""
    m = _ID_RE.match(text)
    if m and m.group("repo").lower().endswith(_FILE_SUFFIXES):  # "out/x.erasepatch" is a path, never an id
        return None
    return (m.group("repo"), m.group("rev")) if m else None


def resolve_model(model: str | os.PathLike, components: tuple[str, ...] = PIPELINE) -> Path:
    """A local path as it is; a built-in model's name (``toy-sd``, ``toy-sdxl``, ``toy-flux``) as its folder; a model id as the
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
    if folder is not None and (folder / "model_index.json").is_file():
        check_repo(name, folder, None, components)  # a pipeline erasekit cannot use: no download command to name
    if is_offline_mode():
        what = f"lacks {', '.join(_missing(folder, components))}" if folder else "is neither a local path nor"
        raise ErasekitError(
            f"{name} {what} in the Hugging Face cache, and downloads are off (HF_HUB_OFFLINE)",
            f"download it once online: {download_command(repo, revision, components)}",
        )
    return _download(repo, revision, components)


def _missing(folder: Path | None, components: tuple[str, ...]) -> list[str]:
    """The parts of a pipeline snapshot that are not there: an index-listed component without weights (its configs
    alone, as a download stopped before its weights leaves it) or without a shard its index names (one stopped
    between shards), a scheduler or tokenizer without files."""
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
    return [c for c in listed if not (_has_weights(folder / c) if c in components else _has_files(folder / c, ("",)))]


def _has_files(folder: Path, suffixes: tuple[str, ...]) -> bool:
    return folder.is_dir() and any(f.name.endswith(suffixes) for f in folder.iterdir())


def _has_weights(folder: Path) -> bool:
    """Whether a component's weights are all there: a weight file, and every shard that each index of shards there
    names (a download cut off between two shards leaves the index and the first)."""
    if not _has_files(folder, _WEIGHTS):
        return False
    indexes = [f for f in folder.iterdir() if _INDEX.fullmatch(f.name)]
    return all((folder / shard).is_file() for index in indexes for shard in _shards_named(index))


def _shards_named(index: Path) -> set[str]:
    """The shard files an index of shards names (none where it is unreadable: detection says so, with its path)."""
    import json

    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (OSError, ValueError, RecursionError, AttributeError):
        return set()
    if not isinstance(weight_map, dict):
        return set()
    return {v for v in weight_map.values() if isinstance(v, str) and "/" not in v and "\\" not in v}


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


def check_repo(name: str, folder: Path, files: list[str] | None, components: tuple[str, ...]) -> None:
    """Refuse a pipeline repo erasekit cannot use, from what is small (its ``model_index.json``, its components'
    configs in ``folder``, and ``files``, the repo's file list, where known) before any weights are downloaded: a
    pipeline of a family erasekit does not patch yet (FLUX.2, Qwen-Image), one whose text encoders are of no
    family it knows or not of the kind their slot holds, and one without the weights of a component that
    ``components`` (what the command needs) asks for."""
    import json

    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError, RecursionError):
        return  # unreadable: detection says so, with the file's path
    if not isinstance(index, dict):
        return
    class_name = str(index.get("_class_name", ""))
    line = not_yet(class_name)
    if line is not None:
        from .layouts import not_yet_error

        raise not_yet_error(f"model {name}", line, f"is {with_article(line.line)} pipeline ({class_name})")
    fam = _family_of_repo(name, folder, index, class_name)
    for slot in fam.slots:
        _check_encoder_kind(name, folder, fam, slot.component, slot.encoder.kind)
    listed = {c for c, v in index.items() if isinstance(v, list) and v[:1] != [None]}
    needed = [c for c, _ in fam.parts] + [s.component for s in fam.slots if not s.optional or s.component in listed]
    missing = [
        c
        for c in needed
        if c in components and (c not in listed or (files is not None and not any(_is_weight_of(f, c) for f in files)))
    ]
    if missing:
        raise ErasekitError(
            f"model {name} is {with_article(fam.title)} pipeline without the weights of its {', '.join(missing)} (nothing "
            "more was downloaded)",
            "name a complete diffusers repo of it (every component in its model_index.json, each with weights), "
            "or a local folder",
            option="model",
        )


def _family_of_repo(name: str, folder: Path, index: dict[str, Any], class_name: str) -> Family:
    """The family of a repo's pipeline: the one its class names (FLUX.1 by ``FluxPipeline``, even without its
    encoders), else the one of the text encoders its ``model_index.json`` lists."""
    named = next((f for f in PIPELINES if f.diffusers_classes and class_name.startswith(f.diffusers_classes)), None)
    if named is not None:
        return named
    present = [c for c in ENCODER_COMPONENTS if isinstance(index.get(c), list) and index[c][:1] != [None]]
    fam = by_components(present, lambda c, key: _config(folder, c).get(key), class_name)
    if fam is None:
        what = f"text encoders ({', '.join(present)}) of no family erasekit knows" if present else "no text encoder"
        raise ErasekitError(
            f"model {name} ({class_name or 'a diffusers pipeline'}) has {what} (its weights were not downloaded)",
            f"erasekit edits the text encoders of {listing(lines(), 'and')} pipelines; name one of those",
            option="model",
        )
    return fam


def _check_encoder_kind(name: str, folder: Path, fam: Family, component: str, kind: EncoderKind) -> None:
    """Refuse a text encoder whose config's ``architectures`` say it is positively not of the kind its slot holds: a
    class of another kind erasekit knows (a CLIP where a T5 goes), or of a model it recognises and does not patch (a
    Qwen or Gemma language model, umT5). Other classes (``T5ForConditionalGeneration``, which diffusers loads by
    model_index.json's class) and a component without a config.json here are left to detection."""
    archs = _config(folder, component).get("architectures")
    if not isinstance(archs, list) or set(map(str, archs)) & set(kind.transformers_classes):
        return
    for cls in map(str, archs):
        other = next((k for k in ENCODER_KINDS.values() if cls in k.transformers_classes), None)
        model = unpatched_encoder({}, [cls])
        what = f"{with_article(other.title)} text encoder" if other else model.what if model else None
        if what is not None:
            wanted = f"{kind.supported or kind.title} text encoder"
            raise ErasekitError(
                f"model {name}'s {component} is {what} ({cls}), not the {wanted} of {with_article(fam.title)} pipeline (its "
                "weights were not downloaded)",
                f"erasekit patches {patched_encoders()}; name a repo whose {component} is a {wanted} "
                f"({kind.transformers_classes[0]})",
                option="model",
            )


def _config(folder: Path, component: str) -> dict[str, Any]:
    """A component's config.json in ``folder`` (empty where it is not there or not a JSON object)."""
    import json

    try:
        config = json.loads((folder / component / "config.json").read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return config if isinstance(config, dict) else {}


def _is_weight_of(file: str, component: str) -> bool:
    return file.startswith(component + "/") and file.count("/") == 1 and file.endswith(_WEIGHTS)


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
        wanted = allow_patterns(files, components)
        small = [f for f in wanted if not f.endswith(_WEIGHTS)]  # configs, tokenizers, indexes of shards
        check_repo(name, Path(snapshot_download(repo, revision=revision, allow_patterns=small)), files, components)
        return Path(snapshot_download(repo, revision=revision, allow_patterns=wanted))
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
