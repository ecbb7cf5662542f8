"""A model id erasekit cannot use is refused from its model_index.json, its configs and its file list, before any
weights are downloaded: a FLUX.2 or Qwen-Image pipeline, a text encoder of another kind, a FLUX.1 repo without its
T5 (issue 21).

The cache is laid out as huggingface_hub lays out a download. Offline, a partial snapshot (configs only) is refused
without naming a download command. Online, only the two calls that reach the network are replaced: the repo's file
list and the download itself, which lays the files it is asked for into the same cache; every cache read is
huggingface_hub's own."""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from erasekit.checkpoints.hub import PIPELINE, TEXT_ENCODERS, resolve_model
from erasekit.cli import app
from erasekit.errors import ErasekitError
from erasekit.testing import add_to_hub_cache, make_tiny_pipeline

COMMIT = "5" * 40


@pytest.fixture(scope="module")
def flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_pipeline(tmp_path_factory.mktemp("flux") / "flux", "flux")


def variant(root: Path, flux: Path, name: str, **index: object) -> Path:
    """A copy of the tiny FLUX.1 folder with its model_index.json changed (``None``: that entry removed)."""
    folder = shutil.copytree(flux, root / name)
    data = json.loads((folder / "model_index.json").read_text())
    data.update({k: v for k, v in index.items() if v is not None})
    for k in [k for k, v in index.items() if v is None]:
        data.pop(k)
    (folder / "model_index.json").write_text(json.dumps(data))
    return folder


def qwen_like(root: Path) -> Path:
    """A pipeline of a class erasekit does not know whose text_encoder is no CLIP (its weights: bytes never read)."""
    folder = root / "mystery"
    index = {"_class_name": "MysteryPipeline", "text_encoder": ["transformers", "Qwen2Model"]}
    index |= {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    for component, config in (("text_encoder", {"architectures": ["Qwen2Model"]}), ("unet", {}), ("vae", {})):
        (folder / component).mkdir(parents=True)
        (folder / component / "config.json").write_text(json.dumps(config))
        (folder / component / "model.safetensors").write_bytes(b"\0" * 4096)
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture()
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture()
def offline(hub: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hub


def configs_only(folder: Path) -> tuple[str, ...]:
    return tuple(p.name for p in folder.iterdir() if p.is_dir() or p.name == "model_index.json")


def cache_configs(hub: Path, repo: str, folder: Path) -> None:
    """A partial snapshot of ``folder``: model_index.json and every component's JSON files, no weights."""
    staged = hub.parent / "staged" / repo.replace("/", "--")
    for f in folder.rglob("*.json"):
        (staged / f.relative_to(folder)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, staged / f.relative_to(folder))
    add_to_hub_cache(hub, repo, staged, commit=COMMIT)


def test_offline_a_cached_flux2_index_is_refused_as_not_supported_yet(
    tmp_path: Path, flux: Path, offline: Path
) -> None:
    cache_configs(offline, "org/flux2", variant(tmp_path, flux, "flux2", _class_name="Flux2Pipeline"))
    with pytest.raises(ErasekitError) as e:
        resolve_model("org/flux2")
    assert str(e.value).startswith(
        "model org/flux2 is a FLUX.2 pipeline (Flux2Pipeline), which erasekit does not patch yet: FLUX.2 encodes "
        "prompts with "
    )
    r = CliRunner().invoke(app, ["generate", "--model", "org/flux2", "a cat", "-o", str(tmp_path / "out")])
    assert r.exit_code != 0 and "is a FLUX.2 pipeline (Flux2Pipeline)" in r.output and "hf download" not in r.output
    assert not (tmp_path / "out").exists()


def test_offline_a_flux_index_without_its_t5_and_a_foreign_text_encoder_are_refused(
    tmp_path: Path, flux: Path, offline: Path
) -> None:
    cache_configs(offline, "org/no-t5", variant(tmp_path, flux, "no-t5", text_encoder_2=[None, None]))
    with pytest.raises(ErasekitError, match=r"^model org/no-t5 is a FLUX.1 pipeline without the weights of its "):
        resolve_model("org/no-t5", TEXT_ENCODERS)
    cache_configs(offline, "org/mystery", qwen_like(tmp_path))
    with pytest.raises(ErasekitError) as e:
        resolve_model("org/mystery")
    assert str(e.value) == (
        "model org/mystery's text_encoder is a Qwen2 language model, as Qwen-Image's Qwen2.5-VL is (Qwen2Model), not "
        "the CLIP text encoder of an SD1.x pipeline (its weights were not downloaded); erasekit patches CLIP and T5 "
        "v1.1 text encoders; name a repo whose text_encoder is a CLIP text encoder (CLIPTextModel)"
    )


def with_t5_config(root: Path, flux: Path, name: str, architectures: list[str]) -> Path:
    """A copy of the tiny FLUX.1 folder whose text_encoder_2/config.json names ``architectures``."""
    folder = shutil.copytree(flux, root / name)
    config = json.loads((folder / "text_encoder_2" / "config.json").read_text())
    (folder / "text_encoder_2" / "config.json").write_text(json.dumps({**config, "architectures": architectures}))
    return folder


def test_offline_a_t5_saved_as_another_t5_class_is_used_and_a_clip_where_the_t5_goes_is_refused(
    tmp_path: Path, flux: Path, offline: Path
) -> None:
    """diffusers loads a component by model_index.json's class: a T5 whose config names T5ForConditionalGeneration
    (as a T5 saved whole says) is FLUX.1's T5 all the same; a CLIP there is positively not, and says what it is."""
    folder = with_t5_config(tmp_path, flux, "t5-whole", ["T5ForConditionalGeneration"])
    add_to_hub_cache(offline, "org/t5-whole", folder, commit=COMMIT)
    assert (resolve_model("org/t5-whole", TEXT_ENCODERS) / "text_encoder_2" / "config.json").is_file()
    cache_configs(offline, "org/clip-t5", with_t5_config(tmp_path, flux, "clip-t5", ["CLIPTextModel"]))
    with pytest.raises(ErasekitError) as e:
        resolve_model("org/clip-t5", TEXT_ENCODERS)
    assert str(e.value) == (
        "model org/clip-t5's text_encoder_2 is a CLIP text encoder (CLIPTextModel), not the T5 v1.1 text encoder of "
        "a FLUX.1 pipeline (its weights were not downloaded); erasekit patches CLIP and T5 v1.1 text encoders; name "
        "a repo whose text_encoder_2 is a T5 v1.1 text encoder (T5EncoderModel)"
    )


class FakeHub:
    """The repos of a hub, each a local folder: its file list, and downloads of the files asked for into the cache."""

    def __init__(self, hub: Path, repos: dict[str, Path]) -> None:
        self.hub, self.repos, self.asked = hub, repos, []  # type: ignore[var-annotated]

    def list_repo_files(self, repo: str, revision: str | None = None) -> list[str]:
        root = self.repos[repo]
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    def download(self, repo: str, revision: str | None = None, allow_patterns: list[str] | None = None) -> str:
        self.asked.append(list(allow_patterns or []))
        root = self.repos[repo]
        staged = self.hub.parent / "staged" / f"{repo.replace('/', '--')}-{len(self.asked)}"
        have = self.hub / ("models--" + repo.replace("/", "--")) / "snapshots" / COMMIT
        for f in self.list_repo_files(repo):
            if any(fnmatch.fnmatch(f, p) for p in allow_patterns or ["*"]) and not (have / f).exists():
                (staged / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(root / f, staged / f)
        return str(add_to_hub_cache(self.hub, repo, staged, commit=COMMIT))


@pytest.fixture()
def online(hub: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """The hub's network calls answered from local folders (``fake.repos``); what was asked for in ``fake.asked``."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    fake = FakeHub(hub, {})
    real = huggingface_hub.snapshot_download

    def snapshot_download(repo: str, revision: str | None = None, **kw: object) -> str:
        if kw.get("local_files_only"):
            return str(real(repo, revision=revision, **kw))  # type: ignore[arg-type]
        return fake.download(repo, revision, kw.get("allow_patterns"))  # type: ignore[arg-type]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(
        huggingface_hub.HfApi, "list_repo_files", lambda _self, repo, revision=None: fake.list_repo_files(repo)
    )
    return fake


def weights_asked(asked: list[list[str]]) -> list[str]:
    return [f for call in asked for f in call if f.endswith((".safetensors", ".bin"))]


def test_online_a_flux2_repo_is_refused_after_its_configs_only(tmp_path: Path, flux: Path, online: FakeHub) -> None:
    online.repos["org/flux2"] = variant(tmp_path, flux, "flux2", _class_name="Flux2Pipeline")
    with pytest.raises(ErasekitError, match=r"^model org/flux2 is a FLUX.2 pipeline \(Flux2Pipeline\)"):
        resolve_model("org/flux2", PIPELINE)
    assert len(online.asked) == 1 and "model_index.json" in online.asked[0]
    assert weights_asked(online.asked) == []
    snapshot = online.hub / "models--org--flux2" / "snapshots" / COMMIT
    assert (snapshot / "transformer" / "config.json").is_file() and not list(snapshot.rglob("*.safetensors"))


def test_online_a_flux_repo_without_t5_weights_is_refused_before_any_weights(
    tmp_path: Path, flux: Path, online: FakeHub
) -> None:
    folder = variant(tmp_path, flux, "no-t5-weights")
    (folder / "text_encoder_2" / "model.safetensors").unlink()
    online.repos["org/no-t5-weights"] = folder
    with pytest.raises(ErasekitError) as e:
        resolve_model("org/no-t5-weights", PIPELINE)
    assert str(e.value) == (
        "model org/no-t5-weights is a FLUX.1 pipeline without the weights of its text_encoder_2 (nothing more was "
        "downloaded); name a complete diffusers repo of it (every component in its model_index.json, each with "
        "weights), or a local folder"
    )
    assert weights_asked(online.asked) == []


def test_online_a_complete_flux_repo_downloads_its_configs_then_its_weights(
    tmp_path: Path, flux: Path, online: FakeHub
) -> None:
    from erasekit.checkpoints.layouts import detect

    online.repos["org/flux"] = flux
    folder = resolve_model("org/flux", PIPELINE)
    assert len(online.asked) == 2 and weights_asked(online.asked[:1]) == []
    assert sorted(weights_asked(online.asked[1:])) == [
        "text_encoder/model.safetensors",
        "text_encoder_2/model.safetensors",
        "transformer/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    assert detect(folder).architecture == "flux"
    assert resolve_model("org/flux", PIPELINE) == folder and len(online.asked) == 2, "the cache serves it now"


def test_offline_a_snapshot_of_configs_alone_is_not_taken_for_the_model(flux: Path, offline: Path) -> None:
    """What a download stopped between a repo's configs and its weights leaves: the weights are named as missing,
    with the command that fetches them."""
    cache_configs(offline, "org/flux", flux)
    with pytest.raises(ErasekitError) as e:
        resolve_model("org/flux")
    assert str(e.value).startswith(
        "org/flux lacks vae, transformer, text_encoder, text_encoder_2 in the Hugging Face cache, and downloads are "
        "off (HF_HUB_OFFLINE); download it once online: hf download org/flux "
    )
