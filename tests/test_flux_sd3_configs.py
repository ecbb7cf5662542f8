"""FLUX.1 and SD3.x single files with nothing beside them: erasekit's bundled configs (FLUX.1 dev and schnell, SD3
medium, SD3.5 medium and large), the variant told from the transformer's keys and shown by inspect, T5's tokenizer from
the Hugging Face cache, and erase and generate of such a file; and Black Forest Labs' transformer file with the encoder
files and VAE kept beside it (``--text-encoders``, ``--vae``) (issue 21).

As in tests/test_model_configs.py, the real configs are checked by building each model on the meta device; the
end-to-end tests point erasekit at tiny "bundled" configs (the tiny pipelines' own JSON files) and load single files
made from those pipelines (:func:`erasekit.testing.flow_single_files`), with T5's tokenizer (erasekit's counted test
tokenizer) in a Hugging Face cache as a download of FLUX.1-schnell's ``tokenizer_2/`` leaves it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import snapshot
from PIL import Image
from safetensors.numpy import load_file, save_file
from safetensors.torch import save_file as torch_save_file
from typer.testing import CliRunner

from erasekit.checkpoints import model_configs
from erasekit.checkpoints.model_configs import CONFIGS_DIR
from erasekit.checkpoints.pipeline import load_pipeline
from erasekit.cli import app
from erasekit.format.patchfile import load_patch
from erasekit.testing import (
    add_to_hub_cache,
    convert_flux_any_width,
    flow_single_files,
    make_checkpoint,
    make_tiny_pipeline,
)

runner = CliRunner()

# parameter counts of the published models as diffusers and transformers build them from these configs
CLIP_L, CLIP_L_PROJECTED, CLIP_G, T5_XXL, VAE = 123_060_480, 123_650_304, 694_659_840, 4_762_310_656, 83_819_683
PUBLISHED = {
    "flux-dev": {"transformer": 11_901_408_320, "text_encoder": CLIP_L, "text_encoder_2": T5_XXL},
    "flux-schnell": {"transformer": 11_891_178_560, "text_encoder": CLIP_L, "text_encoder_2": T5_XXL},
    "sd3-medium": {"transformer": 2_028_328_000},
    "sd3.5-medium": {"transformer": 2_243_171_520},
    "sd3.5-large": {"transformer": 8_056_627_520},
}
SD3_ENCODERS = {"text_encoder": CLIP_L_PROJECTED, "text_encoder_2": CLIP_G, "text_encoder_3": T5_XXL}


def run(*args: object):  # type: ignore[no-untyped-def]
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_bundled_configs_build_the_published_models(name: str) -> None:
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    folder = CONFIGS_DIR / name
    index = json.loads((folder / "model_index.json").read_text())
    want = PUBLISHED[name] | {"vae": VAE} | ({} if name.startswith("flux") else SD3_ENCODERS)
    assert {c for c in index if not c.startswith(("_", "tokenizer", "scheduler"))} == set(want)
    with torch.device("meta"):
        for comp, count in want.items():
            cfg = json.loads((folder / comp / "config.json").read_text())
            cls = index[comp][1]
            if cls == "T5EncoderModel":
                model = T5EncoderModel(T5Config(**cfg))
            elif cls.startswith("CLIP"):
                model = (CLIPTextModelWithProjection if cls.endswith("Projection") else CLIPTextModel)(
                    CLIPTextConfig(**cfg)
                )
            else:
                model = {"AutoencoderKL": AutoencoderKL, "FluxTransformer2DModel": FluxTransformer2DModel}.get(
                    cls, SD3Transformer2DModel
                ).from_config(cfg)
            assert sum(p.numel() for p in model.parameters()) == count, (name, comp)
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert scheduler["shift"] == (1.0 if name == "flux-schnell" else 3.0)


# transformer keys at the published shapes (below model.diffusion_model.): what tells each variant, and its sizes
FLUX_BLOCKS = [f"double_blocks.{i}.img_mod.lin.bias" for i in range(19)] + [
    f"single_blocks.{i}.linear1.bias" for i in range(38)
]
SD3_BLOCKS = [f"joint_blocks.{i}.x_block.attn.qkv.bias" for i in range(24)]
VARIANTS = {
    "flux-dev": ("single-flux", {"img_in.weight": (3072, 64), "guidance_in.in_layer.bias": (3072,)}, FLUX_BLOCKS),
    "flux-schnell": ("single-flux", {"img_in.weight": (3072, 64)}, FLUX_BLOCKS),
    "sd3-medium": ("single-sd3", {"x_embedder.proj.weight": (1536, 16, 2, 2)}, SD3_BLOCKS),
    "sd3.5-medium": (
        "single-sd3",
        {
            "x_embedder.proj.weight": (1536, 16, 2, 2),
            "joint_blocks.0.x_block.attn2.qkv.bias": (4608,),
            "joint_blocks.0.x_block.attn.ln_q.weight": (64,),
        },
        SD3_BLOCKS,
    ),
    "sd3.5-large": (
        "single-sd3",
        {"x_embedder.proj.weight": (2432, 16, 2, 2), "joint_blocks.0.x_block.attn.ln_q.weight": (64,)},
        [f"joint_blocks.{i}.x_block.attn.qkv.bias" for i in range(38)],
    ),
}


def variant_file(path: Path, layout: str, shaped: dict[str, tuple[int, ...]], blocks: list[str]) -> Path:
    """A single file of ``layout`` whose transformer holds ``shaped`` tensors (zeros) and ``blocks`` (one number
    each): enough for the header, which is all the choice reads."""
    make_checkpoint(path, layout, "F16")
    sd = {k: v for k, v in load_file(str(path)).items() if not k.startswith("model.diffusion_model.")}
    sd |= {f"model.diffusion_model.{k}": np.zeros(shape, np.float16) for k, shape in shaped.items()}
    sd |= {f"model.diffusion_model.{k}": np.zeros(1, np.float16) for k in blocks}
    save_file(sd, str(path))
    return path


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_inspect_shows_the_variant_told_from_the_transformer_keys(tmp_path: Path, name: str) -> None:
    path = variant_file(tmp_path / "model.safetensors", *VARIANTS[name])
    r = run("inspect", path, "--json")
    assert r.exit_code == 0, r.output
    says = {
        "flux-dev": "a guidance embedding (guidance_in): FLUX.1-dev",
        "flux-schnell": "no guidance embedding: FLUX.1-schnell",
        "sd3-medium": "neither QK norms nor dual attention: SD3 medium",
        "sd3.5-medium": "dual-attention blocks (attn2): SD3.5 medium",
        "sd3.5-large": "QK norms (ln_q) without dual attention: SD3.5 large or large turbo",
    }[name]
    assert json.loads(r.stdout)["config"] == f"{name} (flow matching; from its transformer's keys: {says})"
    assert f"configs       {name} (flow matching; " in run("inspect", path).stdout


def test_a_transformer_the_bundled_configs_do_not_describe_is_refused_in_one_line(tmp_path: Path) -> None:
    """FLUX.1 Fill takes 384 input channels: its file is shown without configs, and erase asks for a config folder
    before anything is read."""
    layout, shaped, blocks = VARIANTS["flux-dev"]
    path = variant_file(tmp_path / "fill.safetensors", layout, shaped | {"img_in.weight": (3072, 384)}, blocks)
    problem = (
        "fill.safetensors is a FLUX.1 Fill model (width 3072, 384 input channels, depth 19+38); erasekit's bundled "
        "flux-dev config has width 3072, 64 input channels, depth 19+38"
    )
    assert json.loads(run("inspect", path, "--json").stdout)["config"] == f"none ({problem})"
    images = tmp_path / "images"
    images.mkdir()
    before = snapshot(tmp_path)
    r = run("erase", "--model", path, "--concept", "cat", "--images", images, "-o", tmp_path / "p.erasepatch")
    assert (
        r.exit_code == 4
        and r.stderr == f"error: {problem}; give a config: a local diffusers folder of this model (--config)\n"
    )
    assert snapshot(tmp_path) == before


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny FLUX.1-dev and SD3 pipelines, their single files, their configs laid out as erasekit's bundled ones, and a
    Hugging Face cache holding T5's tokenizer as a FLUX.1-schnell download leaves it."""
    root = tmp_path_factory.mktemp("flow-files")
    out: dict[str, Path] = {"configs": root / "configs", "hub": root / "hub"}
    for arch, name in (("flux", "flux-dev"), ("sd3", "sd3-medium")):
        out[arch] = folder = make_tiny_pipeline(root / arch, arch)
        files = flow_single_files(folder, root / f"{arch}-files")
        out[f"{arch}-file"] = files.pop("all-in-one")
        # the files kept apart: FLUX.1's transformer, vae, clip_l, t5; SD3's sd3-transformer, sd3-clip_l, ...
        out |= {(k if arch == "flux" else f"{arch}-{k}"): v for k, v in files.items()}
        shutil.copytree(folder, out["configs"] / name, ignore=shutil.ignore_patterns("*.safetensors", "tokenizer*"))
    add_to_hub_cache(out["hub"], "black-forest-labs/FLUX.1-schnell", out["flux"], only=("tokenizer_2",))
    return out


def offline_cache(monkeypatch: pytest.MonkeyPatch, hub: Path) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture()
def bundled(world: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """The tiny configs as erasekit's bundled ones, the cache, and diffusers' FLUX.1 conversion at tiny widths."""
    import diffusers.loaders.single_file_model as single_file_model

    monkeypatch.setattr(model_configs, "CONFIGS_DIR", world["configs"])
    flux = single_file_model.SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"]
    monkeypatch.setitem(flux, "checkpoint_mapping_fn", convert_flux_any_width)
    offline_cache(monkeypatch, world["hub"])
    return world


@pytest.mark.parametrize(("arch", "name"), [("flux", "flux-dev"), ("sd3", "sd3-medium")])
def test_a_single_file_loads_with_the_bundled_configs_as_its_folder_does(
    bundled: dict[str, Path], arch: str, name: str
) -> None:
    reference, _ = load_pipeline(bundled[arch])
    pipe, ckpt = load_pipeline(bundled[f"{arch}-file"])
    assert ckpt.config is not None and ckpt.config.startswith(f"{name} (flow matching; from its transformer's keys")
    components = ["transformer", "vae", "text_encoder", "text_encoder_2"] + (
        ["text_encoder_3"] if arch == "sd3" else []
    )
    for comp in components:
        got, want = getattr(pipe, comp).state_dict(), getattr(reference, comp).state_dict()
        assert set(got) == set(want), comp
        # diffusers takes SD3.x's CLIP-L projection of a single file as the identity, as Stability's code does
        differ = {k for k in want if not torch.equal(got[k], want[k])}
        assert differ == ({"text_projection.weight"} if (arch, comp) == ("sd3", "text_encoder") else set()), comp
    t5 = pipe.tokenizer_2 if arch == "flux" else pipe.tokenizer_3
    want_t5 = reference.tokenizer_2 if arch == "flux" else reference.tokenizer_3
    assert t5("a photo of a zebra").input_ids == want_t5("a photo of a zebra").input_ids
    assert pipe.tokenizer("a photo of a zebra").input_ids == reference.tokenizer("a photo of a zebra").input_ids


def test_an_sd3_single_file_without_its_t5_loads_without_it(bundled: dict[str, Path], tmp_path: Path) -> None:
    """SD3 medium's "incl_clips" files hold the two CLIPs only: the pipeline runs without T5 (and its tokenizer)."""
    no_t5 = tmp_path / "sd3_medium_incl_clips.safetensors"
    whole = load_file(str(bundled["sd3-file"]))
    save_file({k: v for k, v in whole.items() if not k.startswith("text_encoders.t5xxl.")}, str(no_t5))
    pipe, ckpt = load_pipeline(no_t5)
    assert sorted(ckpt.encoders) == ["te1", "te2"] and (pipe.text_encoder_3, pipe.tokenizer_3) == (None, None)
    assert pipe.text_encoder_2 is not None


def training_images(folder: Path) -> Path:
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            folder / f"{i}.png"
        )
    return folder


def test_erase_a_flux_single_file_with_nothing_beside_it_and_apply_the_patch_to_it(
    bundled: dict[str, Path], tmp_path: Path
) -> None:
    model = Path(shutil.copy(bundled["flux-file"], tmp_path / "flux1-dev-all-in-one.safetensors"))
    out = tmp_path / "cat.erasepatch"
    images = training_images(tmp_path / "cats")
    r = run(
        "erase", "--model", model, "--concept", "cat", "--images", images, "--steps", "2", "--rank", "dense", "-o", out
    )
    assert r.exit_code == 0, r.output
    patch = load_patch(out)
    assert patch.manifest.base.config is not None and patch.manifest.base.config.startswith("flux-dev (flow matching")
    assert sorted(patch.manifest.base.encoders) == ["te1", "te3"]
    before = snapshot(model)
    r = run("apply", out, "--to", model, "--in-place")
    assert r.exit_code == 0 and "base fingerprint exact" in r.stdout and snapshot(model) != before, r.output
    r = run("apply", "--revert", out, "--to", model)
    assert r.exit_code == 0 and snapshot(model) == before, r.output


def test_generate_renders_an_sd3_single_file(bundled: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = run("generate", "--model", bundled["sd3-file"], "a cat", "-n", "1", "--steps", "2", "-o", out)
    assert r.exit_code == 0, r.output
    assert np.asarray(Image.open(out / "a-cat_0.png")).shape == (32, 32, 3)  # the transformer's size, as the folder's


def test_without_t5s_tokenizer_offline_erase_says_what_to_do_in_one_line(
    bundled: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    offline_cache(monkeypatch, tmp_path / "empty-hub")
    images = training_images(tmp_path / "cats")
    before = snapshot(tmp_path)
    r = run(
        "erase",
        "--model",
        bundled["flux-file"],
        "--concept",
        "cat",
        "--images",
        images,
        "-o",
        tmp_path / "p.erasepatch",
    )
    assert r.exit_code == 1 and r.stderr == (
        "error: FLUX.1 needs T5's tokenizer, which erasekit does not ship and the Hugging Face cache does not hold "
        "(downloads are off: HF_HUB_OFFLINE); go online once (erasekit then downloads it from "
        "black-forest-labs/FLUX.1-schnell, about 3 MB), or give --config DIR: a diffusers folder of the model with its "
        "tokenizer_2/ folder\n"
    ), r.output
    assert snapshot(tmp_path) == before
    assert run("inspect", bundled["flux-file"]).exit_code == 0  # torch-free commands need no tokenizer


def header_only(path: Path, shapes: dict[str, tuple[str, tuple[int, ...]]]) -> Path:
    """A safetensors file of ``shapes`` (name -> (dtype, shape)) whose data is a hole: real sizes, a header to read."""
    header, offset = {}, 0
    for name, (dtype, shape) in sorted(shapes.items()):
        size = int(np.prod(shape, dtype=np.int64)) * {"F16": 2, "F32": 4}[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        f.truncate(8 + len(text) + offset)
    return path


def real_size_flux_file(path: Path, tiny: Path) -> Path:
    """A FLUX.1 all-in-one file whose CLIP-L and T5-XXL have the published sizes (headers only), beside the tiny
    file's transformer and VAE."""
    from safetensors import safe_open
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with safe_open(str(tiny), "np") as f:
        shapes = {k: ("F16", tuple(f.get_slice(k).get_shape())) for k in f.keys() if not k.startswith("text_encoders.")}
    clip = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    t5 = T5Config(d_model=4096, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu")
    with torch.device("meta"):
        encoders = {"clip_l": CLIPTextModel(clip), "t5xxl": T5EncoderModel(t5)}
    for name, model in encoders.items():
        root = "text_model." if name == "clip_l" else ""  # as the files spell CLIP's keys, whatever transformers says
        for key, tensor in model.state_dict().items():
            if key != "encoder.embed_tokens.weight":  # tied to shared.weight, which the files hold
                key = root + key.removeprefix(root)
                shapes[f"text_encoders.{name}.transformer.{key}"] = ("F16", tuple(tensor.shape))
    return header_only(path, shapes)


def test_a_config_folder_of_the_flux_file_with_its_t5_is_taken_and_one_of_other_sizes_refused(
    world: dict[str, Path], tmp_path: Path
) -> None:
    """--config checks each text encoder by its kind's config keys (T5's d_model, d_ff, num_layers), at tiny and
    published sizes: erasekit's own flux-dev folder fits a real-size FLUX.1 file."""
    from erasekit.checkpoints.layouts import detect
    from erasekit.errors import LayoutError

    assert not model_configs.user_choice(detect(world["flux-file"]), world["flux"]).bundled
    real = real_size_flux_file(tmp_path / "flux1-dev-aio.safetensors", world["flux-file"])
    assert (
        model_configs.user_choice(detect(real), CONFIGS_DIR / "flux-dev").name == f"config {CONFIGS_DIR / 'flux-dev'}"
    )
    other = Path(shutil.copytree(CONFIGS_DIR / "flux-dev", tmp_path / "t5-xl"))
    t5_config = other / "text_encoder_2" / "config.json"
    t5_config.write_text(json.dumps(json.loads(t5_config.read_text()) | {"d_model": 2048, "d_ff": 5120}))
    with pytest.raises(LayoutError) as refused:
        model_configs.user_choice(detect(real), other)
    assert str(refused.value) == (
        f"config {other} describes a text encoder of 2048x5120x24 (hidden x FFN x layers) but flux1-dev-aio.safetensors "
        "holds 4096x10240x24; give as config the diffusers folder of the model this file was made from"
    )
    tiny = tmp_path / "tiny"  # apart from the real-size file, a hole of gigabytes that a snapshot would read
    tiny_other = Path(shutil.copytree(world["flux"], tiny / "other", ignore=shutil.ignore_patterns("*.safetensors")))
    t5_config = tiny_other / "text_encoder_2" / "config.json"
    t5 = json.loads(t5_config.read_text())
    t5_config.write_text(json.dumps(t5 | {"d_ff": t5["d_ff"] * 2}))
    flux_file = Path(shutil.copy(world["flux-file"], tiny / "flux.safetensors"))
    tiny_t5 = "x".join(map(str, detect(flux_file).encoders["te3"].dims))
    other_t5 = f"{t5['d_model']}x{t5['d_ff'] * 2}x{t5['num_layers']}"
    before = snapshot(tiny)
    r = run("generate", "--model", flux_file, "--config", tiny_other, "a cat", "-o", tiny / "out")
    assert (r.exit_code, r.stderr) == (
        4,
        f"error: config {tiny_other} describes a text encoder of {other_t5} (hidden x FFN x layers) but "
        f"flux.safetensors holds {tiny_t5}; give as config the diffusers folder of the model this file was made "
        "from (--config)\n",
    ), r.output
    assert snapshot(tiny) == before


def kept_apart(world: dict[str, Path], root: Path) -> tuple[Path, Path, Path, Path]:
    """Copies of the transformer, CLIP-L, T5 and VAE files of the tiny FLUX.1-dev, as a ComfyUI user keeps them."""
    root.mkdir(exist_ok=True)
    names = ("transformer", "clip_l", "t5", "vae")
    return tuple(Path(shutil.copy(world[n], root / world[n].name)) for n in names)  # type: ignore[return-value]


def test_erase_a_transformer_file_with_its_encoder_files_and_apply_the_patch_to_each(
    bundled: dict[str, Path], tmp_path: Path
) -> None:
    """The encoder files in any order (each to the slot of its kind); the patch is FLUX.1's (te1 and te3), made for
    the files as stored, and applies to each file its part, in place and back bit for bit."""
    transformer, clip_l, t5, vae = kept_apart(bundled, tmp_path / "models")
    out = tmp_path / "cat.erasepatch"
    images = training_images(tmp_path / "cats")
    r = run(
        "erase", "--model", transformer, "--text-encoders", f"{t5},{clip_l}", "--vae", vae, "--concept", "cat",
        "--images", images, "--steps", "2", "--rank", "dense", "-o", out,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    patch = load_patch(out)
    assert (patch.manifest.base.architecture, sorted(patch.manifest.base.encoders)) == ("flux", ["te1", "te3"])
    assert patch.manifest.base.config is not None and patch.manifest.base.config.startswith("flux-dev (flow matching")
    from test_clip_judge import make_colour_clip

    judge = make_colour_clip(tmp_path / "clip")
    files = ("--model", transformer, "--text-encoders", f"{clip_l},{t5}", "--vae", vae)
    r = run(
        "eval",
        *files,
        "-p",
        out,
        "--concept",
        "red",
        "--judge",
        judge,
        "--keep",
        "green",
        "-n",
        "1",
        "--steps",
        "2",
        "--json",
    )
    assert r.exit_code == 0 and json.loads(r.stdout)["labels"][0] == "red", r.output
    before = snapshot(tmp_path / "models")
    r = run("apply", out, "--to", t5, "--in-place")
    assert r.exit_code == 0 and "base fingerprint exact" in r.stdout, r.output
    assert "te1 (CLIP ViT-L/14) part is left for clip_l.safetensors" in r.stderr
    r = run("apply", out, "--to", clip_l, "--in-place")
    assert r.exit_code == 0 and "base fingerprint exact" in r.stdout, r.output
    changed = {n for n, digest in snapshot(tmp_path / "models").items() if before[n] != digest}
    assert changed == {"clip_l.safetensors", "t5xxl_fp16.safetensors"}
    for target in (t5, clip_l):
        assert run("apply", "--revert", out, "--to", target).exit_code == 0
    assert snapshot(tmp_path / "models") == before


def test_generate_from_the_files_kept_apart_draws_what_the_all_in_one_file_draws(
    bundled: dict[str, Path], tmp_path: Path
) -> None:
    transformer, clip_l, t5, vae = kept_apart(bundled, tmp_path / "models")
    apart, whole = tmp_path / "apart", tmp_path / "whole"
    args = ("a cat", "-n", "1", "--steps", "2")
    r = run("generate", "--model", transformer, "--text-encoders", f"{clip_l},{t5}", "--vae", vae, *args, "-o", apart)
    assert r.exit_code == 0, r.output
    assert run("generate", "--model", bundled["flux-file"], *args, "-o", whole).exit_code == 0
    drawn = np.asarray(Image.open(apart / "a-cat_0.png")).astype(int)
    # the same weights: the same picture, but for a unit of rounding (two runs of one file differ as much on CPU)
    assert drawn.std() > 10 and np.abs(drawn - np.asarray(Image.open(whole / "a-cat_0.png"))).max() <= 2


def test_files_kept_apart_load_each_in_its_own_dtype_whatever_the_encoder_files_are_stored_in(
    bundled: dict[str, Path], tmp_path: Path
) -> None:
    """As Black Forest Labs and ComfyUI keep FLUX.1-dev: the transformer stored in bf16, the VAE in fp32 and the
    encoders in fp16. An erase's load (a bf16 transformer, fp32 encoders and VAE) gives the transformer and the VAE
    the values stored, as from files that are all fp32 (the transformer's rounded to bf16 alike): neither goes
    through the encoder files' fp16."""
    transformer, clip_l, t5, vae = kept_apart(bundled, tmp_path / "models")
    for path, dtype in ((transformer, torch.bfloat16), (clip_l, torch.float16), (t5, torch.float16)):
        tensors = {k: torch.from_numpy(v) for k, v in load_file(str(path)).items()}
        torch_save_file({k: v.to(dtype) for k, v in tensors.items()}, str(path))
    dtypes = {"torch_dtype": torch.bfloat16, "text_encoder_dtype": torch.float32, "vae_dtype": torch.float32}
    pipe, _ = load_pipeline(transformer, text_encoders=[clip_l, t5], vae=vae, **dtypes)  # type: ignore[arg-type]
    fp32_files = [bundled["clip_l"], bundled["t5"]]
    reference, _ = load_pipeline(bundled["transformer"], text_encoders=fp32_files, vae=vae, **dtypes)  # type: ignore[arg-type]
    for comp in ("transformer", "vae"):
        got, want = getattr(pipe, comp).state_dict(), getattr(reference, comp).state_dict()
        assert [k for k in want if not torch.equal(got[k], want[k])] == [], comp


def test_files_that_do_not_make_the_model_are_refused_in_one_line(bundled: dict[str, Path], tmp_path: Path) -> None:
    transformer, clip_l, t5, vae = kept_apart(bundled, tmp_path / "models")
    other_clip = Path(shutil.copy(clip_l, tmp_path / "models" / "clip_l_copy.safetensors"))
    sd1 = make_checkpoint(tmp_path / "models" / "sd15.safetensors", "single-sd1")
    cases = [
        (
            (transformer, f"{clip_l}", vae),
            4,
            "FLUX.1 needs its T5 v1.1 XXL text encoder too; add t5xxl_fp16.safetensors to --text-encoders "
            "(--text-encoders)",
        ),
        (
            (transformer, f"{clip_l},{t5},{other_clip}", vae),
            4,
            "clip_l.safetensors and clip_l_copy.safetensors are both CLIP ViT-L/14 text encoders (te1); give one file "
            "per text encoder: FLUX.1 reads CLIP ViT-L/14 (clip_l.safetensors) and T5 v1.1 XXL (t5xxl_fp16.safetensors) "
            "(--text-encoders)",
        ),
        (
            (transformer, f"{sd1},{t5}", vae),
            4,
            "sd15.safetensors is a whole SD1.x checkpoint, not one text encoder's file; give each text encoder's own "
            "file (clip_l.safetensors, t5xxl_fp16.safetensors) (--text-encoders)",
        ),
        (
            (transformer, f"{clip_l},{t5}", None),
            1,
            "flux1-dev.safetensors holds no VAE; give its VAE file as well: --vae ae.safetensors (--vae)",
        ),
        (
            (transformer, f"{clip_l},{t5}", clip_l),
            4,
            "clip_l.safetensors is not a VAE file (no encoder.conv_in.weight); give the model's VAE file as --vae "
            "(FLUX.1's is ae.safetensors) (--vae)",
        ),
        (
            (bundled["flux-file"], f"{clip_l},{t5}", vae),
            4,
            "flux-all-in-one.safetensors holds its text encoders itself; leave --text-encoders and --vae out "
            "(--text-encoders)",
        ),
        (
            (transformer, "", None),
            4,
            "flux1-dev.safetensors holds a FLUX.1 transformer but no text encoders; give its encoder files and VAE: "
            "--text-encoders clip_l.safetensors,t5xxl_fp16.safetensors --vae ae.safetensors (--text-encoders)",
        ),
        (
            (bundled["flux-file"], "", vae),
            1,
            "--vae is for a transformer file kept apart from its encoders; give its encoder files too "
            "(--text-encoders), or leave --vae out (--vae)",
        ),
    ]
    before = snapshot(tmp_path)
    for (model, encoders, vae_file), code, message in cases:
        args = ("generate", "--model", model, "--text-encoders", encoders, "a cat", "-o", tmp_path / "out")
        r = run(*args, *(("--vae", vae_file) if vae_file else ()))
        assert (r.exit_code, r.stderr) == (code, f"error: {message}\n"), r.output
    assert snapshot(tmp_path) == before


def test_a_part_given_in_the_wrong_option_or_missing_is_refused_saying_where_it_goes(
    bundled: dict[str, Path], tmp_path: Path
) -> None:
    """The VAE or the transformer among the encoder files, an encoder file as the model; a missing file exits 2
    (an input file missing, as elsewhere) for --text-encoders and --vae alike."""
    transformer, clip_l, t5, vae = kept_apart(bundled, tmp_path / "models")
    missing = tmp_path / "models" / "nope.safetensors"
    cases = [
        (
            (transformer, f"{clip_l},{t5},{vae}", vae),
            4,
            "ae.safetensors is a VAE file, not a text encoder's; give it as --vae instead (--text-encoders)",
        ),
        (
            (transformer, f"{clip_l},{transformer}", vae),
            4,
            "flux1-dev.safetensors is a FLUX.1 transformer file: the model (--model), not a text encoder; leave it out "
            "of --text-encoders (--text-encoders)",
        ),
        (
            (clip_l, f"{clip_l},{t5}", vae),
            4,
            "clip_l.safetensors is a text encoder's file, not a transformer; --model takes the transformer file "
            "(flux1-dev.safetensors) and the encoder files go in --text-encoders (--model)",
        ),
        (
            (transformer, f"{clip_l},{missing}", vae),
            2,
            f"text-encoder file {missing} does not exist; check the path (--text-encoders)",
        ),
        ((transformer, f"{clip_l},{t5}", missing), 2, f"VAE file {missing} does not exist; check the path (--vae)"),
    ]
    before = snapshot(tmp_path)
    for (model, encoders, vae_file), code, message in cases:
        args = ("--model", model, "--text-encoders", encoders, "--vae", vae_file)
        r = run("generate", *args, "a cat", "-o", tmp_path / "out")
        assert (r.exit_code, r.stderr) == (code, f"error: {message}\n"), r.output
    assert snapshot(tmp_path) == before


def test_an_encoder_file_of_other_sizes_than_its_slot_is_refused_naming_it(
    bundled: dict[str, Path], tmp_path: Path
) -> None:
    """CLIP-G given as FLUX.1's CLIP-L, a smaller T5 as its T5-XXL: refused before anything loads, by the file's
    sizes against its slot's in the bundled configs or the --config folder's."""
    transformer, clip_l, t5, vae = kept_apart(bundled, tmp_path / "models")
    clip_g = make_checkpoint(tmp_path / "models" / "clip_g.safetensors", "clip-g-file", "F16")
    t5_small = make_checkpoint(tmp_path / "models" / "t5_small.safetensors", "t5-file", "F16")
    clip_g_says = (
        "clip_g.safetensors is a CLIP text encoder of 40x80x2 (hidden x FFN x layers), but FLUX.1's CLIP ViT-L/14 (te1) "
        "is 32x64x2 in erasekit's bundled flux-dev config; give its CLIP ViT-L/14 file (clip_l.safetensors) instead"
    )
    t5_says = (
        "t5_small.safetensors is a T5 text encoder of 32x64x2 (hidden x FFN x layers), but FLUX.1's T5 v1.1 XXL (te3) "
        f"is 80x96x2 in config {bundled['flux']}; give its T5 v1.1 XXL file (t5xxl_fp16.safetensors) instead"
    )
    cases = [((f"{clip_g},{t5}",), clip_g_says), ((f"{clip_l},{t5_small}", "--config", bundled["flux"]), t5_says)]
    before = snapshot(tmp_path)
    for (encoders, *config), message in cases:
        args = ("--model", transformer, "--text-encoders", encoders, "--vae", vae, *config)
        r = run("generate", *args, "a cat", "-o", tmp_path / "out")
        assert (r.exit_code, r.stderr) == (4, f"error: {message} (--text-encoders)\n"), r.output
    assert snapshot(tmp_path) == before


def kept_apart_sd3(world: dict[str, Path], root: Path) -> dict[str, Path]:
    """Copies of the tiny SD3 medium's files as Stability AI ships them and ComfyUI users keep them: the transformer
    and VAE (``sd3_medium.safetensors``, below ``model.diffusion_model.`` and ``first_stage_model.``), and
    ``clip_l``, ``clip_g`` and ``t5xxl_fp16.safetensors`` with Hugging Face key names."""
    root.mkdir(exist_ok=True)
    return {n: Path(shutil.copy(world[f"sd3-{n}"], root)) for n in ("transformer", "clip_l", "clip_g", "t5")}


def test_erase_an_sd3_transformer_file_with_its_three_encoder_files_and_apply_the_patch_to_each(
    bundled: dict[str, Path], tmp_path: Path
) -> None:
    """No --vae (the file holds it); the encoder files in any order, CLIP-L and CLIP-G told by their widths; the
    patch is SD3's (te1, te2, te3), generate draws, and each encoder file takes its part in place and reverts bit for
    bit."""
    files = kept_apart_sd3(bundled, tmp_path / "models")
    model, clip_l, clip_g, t5 = files["transformer"], files["clip_l"], files["clip_g"], files["t5"]
    out = tmp_path / "cat.erasepatch"
    images = training_images(tmp_path / "cats")
    r = run(
        "erase", "--model", model, "--text-encoders", f"{t5},{clip_g},{clip_l}", "--concept", "cat",
        "--images", images, "--steps", "2", "-o", out,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    patch = load_patch(out)
    assert (patch.manifest.base.architecture, sorted(patch.manifest.base.encoders)) == ("sd3", ["te1", "te2", "te3"])
    assert patch.manifest.base.config is not None and patch.manifest.base.config.startswith("sd3-medium (flow matching")
    encoders = f"{clip_g},{t5},{clip_l}"
    r = run(
        "generate", "--model", model, "--text-encoders", encoders, "a cat", "-n", "1", "--steps", "2", "-o", tmp_path
    )
    assert r.exit_code == 0 and np.asarray(Image.open(tmp_path / "a-cat_0.png")).std() > 10, r.output
    r = run("inspect", out, "--against", clip_g)
    assert r.exit_code == 0 and "(encoder te2 -> te)" in r.stdout, r.output
    left = "te1 (CLIP ViT-L/14) and te3 (T5 v1.1 XXL) parts are left for clip_l.safetensors and t5xxl_fp16.safetensors"
    assert left in " ".join(r.stdout.split())
    before = snapshot(tmp_path / "models")
    for target in (t5, clip_g, clip_l):
        r = run("apply", out, "--to", target, "--in-place")
        assert r.exit_code == 0 and "base fingerprint exact" in r.stdout, r.output
    changed = {n for n, digest in snapshot(tmp_path / "models").items() if before[n] != digest}
    assert changed == {"clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors"}
    for target in (clip_l, t5, clip_g):
        assert run("apply", "--revert", out, "--to", target).exit_code == 0
    assert snapshot(tmp_path / "models") == before


@pytest.mark.parametrize("form", ["as Stability AI ships it", "the transformer alone, with --vae"])
def test_an_sd3_model_of_separate_files_loads_the_weights_of_its_all_in_one_file(
    bundled: dict[str, Path], tmp_path: Path, form: str
) -> None:
    """sd3_medium.safetensors (the transformer and the VAE, prefixed) with no --vae, or the transformer alone
    (unprefixed, as ComfyUI's models/diffusion_models/ holds one) with a VAE file: every component's tensors are the
    all-in-one file's, bit for bit."""
    files = kept_apart_sd3(bundled, tmp_path)
    vae = None
    if form != "as Stability AI ships it":
        whole = load_file(str(files["transformer"]))
        for part, prefix in (("transformer", "model.diffusion_model."), ("vae", "first_stage_model.")):
            save_file(
                {k[len(prefix) :]: v for k, v in whole.items() if k.startswith(prefix)},
                str(tmp_path / f"{part}.safetensors"),
            )
        files["transformer"], vae = tmp_path / "transformer.safetensors", tmp_path / "vae.safetensors"
    encoders = [files["t5"], files["clip_l"], files["clip_g"]]
    pipe, ckpt = load_pipeline(files["transformer"], text_encoders=encoders, vae=vae)
    reference, _ = load_pipeline(bundled["sd3-file"])
    assert ckpt.config is not None and ckpt.config.startswith("sd3-medium (flow matching")
    for comp in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        got, want = getattr(pipe, comp).state_dict(), getattr(reference, comp).state_dict()
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want), comp


def test_an_sd3_transformer_file_runs_with_its_two_clips_alone_and_a_config_folder(
    world: dict[str, Path], tmp_path: Path
) -> None:
    """SD3.x runs without T5, as its pipeline and ComfyUI's DualCLIPLoader do: the patch is CLIP-L's and CLIP-G's.
    With --config (a folder of the tiny model, which erasekit's own configs do not describe), erase and eval take the
    CLIPs' widths from that folder."""
    files = kept_apart_sd3(world, tmp_path / "models")
    model, encoders = files["transformer"], f"{files['clip_g']},{files['clip_l']}"
    out = tmp_path / "cat.erasepatch"
    r = run(
        "erase", "--model", model, "--text-encoders", encoders, "--config", world["sd3"], "--concept", "cat",
        "--images", training_images(tmp_path / "cats"), "--steps", "2", "--rank", "dense", "-o", out,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert sorted(load_patch(out).manifest.base.encoders) == ["te1", "te2"]
    r = run(
        "eval", "--model", model, "--text-encoders", encoders, "--config", world["sd3"], "-p", out, "--concept", "cat"
    )
    assert (r.exit_code, r.stderr) == (
        1,
        f"error: {model} is not a model of the built-in toy world, the only one eval's own judge knows; give a local "
        "transformers CLIP model folder to judge its images with (--judge)\n",
    ), r.output
    nowhere = tmp_path / "nowhere"
    r = run("generate", "--model", model, "--text-encoders", encoders, "--config", nowhere, "a cat", "-o", tmp_path)
    assert (r.exit_code, r.stderr) == (
        2,
        f"error: config {nowhere} is not a folder; name a local diffusers pipeline folder (--config)\n",
    ), r.output


def clip_header(path: Path, hidden: int, ffn: int) -> Path:
    """A CLIP text encoder's file of ``hidden`` x ``ffn`` (2 layers), Hugging Face key names, header only."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=2, num_attention_heads=2)
    with torch.device("meta"):
        sd = CLIPTextModel(config).state_dict()
    return header_only(
        path, {f"text_model.{k.removeprefix('text_model.')}": ("F16", tuple(v.shape)) for k, v in sd.items()}
    )


SD3_READS = (
    "SD3.x reads CLIP ViT-L/14 (clip_l.safetensors) and OpenCLIP ViT-bigG/14 (clip_g.safetensors), and T5 v1.1 XXL "
    "(t5xxl_fp16.safetensors) where given"
)


def test_sd3_encoder_files_of_the_wrong_widths_are_refused_in_one_line(
    bundled: dict[str, Path], tmp_path: Path
) -> None:
    """CLIP-G given twice, a CLIP-L in CLIP-G's place (a copy of clip_l named clip_g.safetensors), CLIP-G left out and
    a CLIP of widths neither slot has: each refused in one line before anything loads, every file as it was."""
    files = kept_apart_sd3(bundled, tmp_path / "models")
    model, clip_l, clip_g, t5 = files["transformer"], files["clip_l"], files["clip_g"], files["t5"]
    clip_g_copy = Path(shutil.copy(clip_g, tmp_path / "models" / "clip_g_copy.safetensors"))
    (tmp_path / "renamed").mkdir()
    clip_l_as_g = Path(shutil.copy(clip_l, tmp_path / "renamed" / "clip_g.safetensors"))
    clip_h = clip_header(tmp_path / "models" / "clip_h.safetensors", 48, 96)
    cases = [
        (
            f"{clip_l},{clip_g},{clip_g_copy},{t5}",
            "clip_g.safetensors and clip_g_copy.safetensors are both OpenCLIP ViT-bigG/14 text encoders (te2); give one "
            f"file per text encoder: {SD3_READS}",
        ),
        (
            f"{clip_l},{clip_l_as_g},{t5}",
            "clip_l.safetensors and clip_g.safetensors are both CLIP ViT-L/14 text encoders (te1); give one file per text "
            f"encoder: {SD3_READS}",
        ),
        (
            f"{clip_l},{t5}",
            "SD3.x needs its OpenCLIP ViT-bigG/14 text encoder too; add clip_g.safetensors to --text-encoders",
        ),
        (
            f"{clip_h},{clip_g},{t5}",
            f"clip_h.safetensors is a CLIP text encoder of 48 x 96 (hidden x FFN), which no SD3.x slot takes; {SD3_READS}",
        ),
    ]
    before = snapshot(tmp_path)
    for encoders, message in cases:
        r = run("generate", "--model", model, "--text-encoders", encoders, "a cat", "-o", tmp_path / "out")
        assert (r.exit_code, r.stderr) == (4, f"error: {message} (--text-encoders)\n"), r.output
    assert snapshot(tmp_path) == before


def real_size_parts(root: Path, vae: Path) -> dict[str, Path]:
    """FLUX.1-dev's transformer and SD3 medium's with its VAE (their first tensors and block counts), CLIP-L, CLIP-G,
    T5-XXL and T5 v1.1 base files at their published sizes, headers only, and a copy of ``vae``."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    root.mkdir()
    blocks = [f"double_blocks.{i}.img_attn.qkv.weight" for i in range(19)]
    blocks += [f"single_blocks.{i}.linear1.weight" for i in range(38)]
    shapes = {"img_in.weight": (3072, 64), "guidance_in.in_layer.bias": (3072,)} | {b: (1,) for b in blocks}
    out = {"transformer": header_only(root / "flux1-dev.safetensors", {k: ("F16", s) for k, s in shapes.items()})}
    sd3 = {"x_embedder.proj.weight": (1536, 16, 2, 2)} | {
        f"joint_blocks.{i}.x_block.attn.qkv.bias": (1,) for i in range(24)
    }
    sd3 = {f"model.diffusion_model.{k}": v for k, v in sd3.items()}
    sd3 |= {f"first_stage_model.{k}": (1,) for k in ("encoder.conv_in.weight", "decoder.conv_out.weight")}
    out["sd3_medium"] = header_only(root / "sd3_medium.safetensors", {k: ("F16", s) for k, s in sd3.items()})
    clips = {"clip_l": (768, 3072, 12, 12), "clip_g": (1280, 5120, 32, 20)}
    t5s = {"t5xxl_fp16": (4096, 10240, 24, 64), "t5_base": (768, 2048, 12, 12)}
    with torch.device("meta"):
        models = {
            n: CLIPTextModel(
                CLIPTextConfig(
                    hidden_size=d[0], intermediate_size=d[1], num_hidden_layers=d[2], num_attention_heads=d[3]
                )
            )
            for n, d in clips.items()
        }
        models |= {
            n: T5EncoderModel(
                T5Config(d_model=d[0], d_ff=d[1], num_layers=d[2], num_heads=d[3], feed_forward_proj="gated-gelu")
            )
            for n, d in t5s.items()
        }
    for name, model in models.items():
        root_key = "text_model." if name.startswith("clip") else ""
        sd = {root_key + k.removeprefix(root_key): ("F16", tuple(v.shape)) for k, v in model.state_dict().items()}
        sd.pop("encoder.embed_tokens.weight", None)
        out[name] = header_only(root / f"{name}.safetensors", sd)
    out["vae"] = Path(shutil.copy(vae, root / "ae.safetensors"))
    return out


def test_encoder_files_of_other_sizes_at_published_sizes_are_refused_by_the_bundled_config(
    world: dict[str, Path], tmp_path: Path
) -> None:
    from erasekit.checkpoints.parts import detect_model
    from erasekit.checkpoints.pipeline import runnable_family
    from erasekit.errors import LayoutError

    files = real_size_parts(tmp_path / "models", world["vae"])
    model, vae = files["transformer"], files["vae"]
    assert runnable_family(detect_model(model, [files["clip_l"], files["t5xxl_fp16"]], vae)).name == "flux"
    cases = [
        (
            "clip_g",
            "t5xxl_fp16",
            "clip_g.safetensors is a CLIP text encoder of 1280x5120x32 (hidden x FFN x layers), but FLUX.1's CLIP "
            "ViT-L/14 (te1) is 768x3072x12 in erasekit's bundled flux-dev config; give its CLIP ViT-L/14 file "
            "(clip_l.safetensors) instead",
        ),
        (
            "clip_l",
            "t5_base",
            "t5_base.safetensors is a T5 text encoder of 768x2048x12 (hidden x FFN x layers), but FLUX.1's T5 v1.1 XXL "
            "(te3) is 4096x10240x24 in erasekit's bundled flux-dev config; give its T5 v1.1 XXL file "
            "(t5xxl_fp16.safetensors) instead",
        ),
    ]
    for clip, t5, message in cases:
        with pytest.raises(LayoutError) as refused:
            runnable_family(detect_model(model, [files[clip], files[t5]], vae))
        assert str(refused.value) == message


def test_sd3_encoder_files_at_published_sizes_go_to_the_slots_of_the_bundled_config(
    world: dict[str, Path], tmp_path: Path
) -> None:
    """SD3 medium's file (its VAE inside) with CLIP-G, T5-XXL and CLIP-L in that order: CLIP-L and CLIP-G go to te1 and
    te2 by the widths of erasekit's bundled sd3-medium config; a T5 v1.1 base is refused by it."""
    from erasekit.checkpoints.parts import detect_model
    from erasekit.checkpoints.pipeline import runnable_family
    from erasekit.errors import LayoutError

    files = real_size_parts(tmp_path / "models", world["vae"])
    ckpt = detect_model(files["sd3_medium"], [files["clip_g"], files["t5xxl_fp16"], files["clip_l"]])
    assert runnable_family(ckpt).name == "sd3"
    slots = {slot: wf.path.name for wf in ckpt.files for slot in wf.encoders}
    assert slots == {"te1": "clip_l.safetensors", "te2": "clip_g.safetensors", "te3": "t5xxl_fp16.safetensors"}
    with pytest.raises(LayoutError) as refused:
        runnable_family(detect_model(files["sd3_medium"], [files["clip_g"], files["t5_base"], files["clip_l"]]))
    assert str(refused.value) == (
        "t5_base.safetensors is a T5 text encoder of 768x2048x12 (hidden x FFN x layers), but SD3.x's T5 v1.1 XXL "
        "(te3) is 4096x10240x24 in erasekit's bundled sd3-medium config; give its T5 v1.1 XXL file "
        "(t5xxl_fp16.safetensors) instead"
    )


def test_a_batch_erases_a_flux_transformer_file_with_its_encoder_files(
    bundled: dict[str, Path], tmp_path: Path
) -> None:
    """A manifest gives text_encoders (as --text-encoders writes them, or a list) and vae per model entry, relative to
    its folder: the job erases FLUX.1's te1 and te3 from the files as stored, and a rerun skips it."""
    from erasekit.erasing.batch_manifest import plan_batch

    kept_apart(bundled, tmp_path / "models")
    training_images(tmp_path / "cats")
    manifest = tmp_path / "jobs.toml"
    manifest.write_text(
        "model = 'models/flux1-dev.safetensors'\n"
        "text_encoders = 'models/t5xxl_fp16.safetensors, models/clip_l.safetensors'\n"
        "vae = 'models/ae.safetensors'\nimages = 'cats'\nsteps = 2\nrank = 'dense'\n"
        "[[jobs]]\nconcept = 'cat'\noutput = 'out/cat.erasepatch'\n"
    )
    r = runner.invoke(app, ["erase", "--manifest", str(manifest), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["counts"]["done"] == 1, r.output
    patch = load_patch(tmp_path / "out" / "cat.erasepatch")
    assert (patch.manifest.base.architecture, sorted(patch.manifest.base.encoders)) == ("flux", ["te1", "te3"])
    r = run("apply", tmp_path / "out" / "cat.erasepatch", "--to", tmp_path / "models" / "clip_l.safetensors", "-o",
            tmp_path / "clip_l_erased.safetensors")  # fmt: skip
    assert r.exit_code == 0 and "base fingerprint exact" in r.stdout, r.output
    again = runner.invoke(app, ["erase", "--manifest", str(manifest), "--json"])
    assert again.exit_code == 0 and json.loads(again.stdout)["counts"]["skipped"] == 1, again.output
    listed = manifest.read_text().replace(
        "'models/t5xxl_fp16.safetensors, models/clip_l.safetensors'",
        "['models/clip_l.safetensors', 'models/t5xxl_fp16.safetensors']",
    )
    manifest.write_text(listed)
    job = plan_batch(manifest)[0].job
    models = tmp_path / "models"
    assert job.text_encoders == (models / "clip_l.safetensors", models / "t5xxl_fp16.safetensors")
    assert job.vae == models / "ae.safetensors"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            "text_encoders = 'models/clip_l.safetensors'",
            "field text_encoders: FLUX.1 needs its T5 v1.1 XXL text encoder too; add t5xxl_fp16.safetensors to "
            "--text-encoders",
        ),
        (
            "text_encoders = ['models/clip_l.safetensors', 'models/clip_l.safetensors', 'models/t5xxl_fp16.safetensors']",
            "field text_encoders: clip_l.safetensors and clip_l.safetensors are both CLIP ViT-L/14 text encoders (te1)",
        ),
        (
            "text_encoders = 'models/clip_g.safetensors,models/t5xxl_fp16.safetensors'",
            "field text_encoders: clip_g.safetensors is a CLIP text encoder of 40x80x2 (hidden x FFN x layers), but "
            "FLUX.1's CLIP ViT-L/14 (te1) is 32x64x2 in erasekit's bundled flux-dev config",
        ),
        ("vae = 'models/clip_l.safetensors'", "field vae: clip_l.safetensors is not a VAE file"),
        ("vae = 'models/nope.safetensors'", "field vae: VAE file "),
        (
            "text_encoders = 'models/clip_l.safetensors,models/t5_gone.safetensors'",
            "field text_encoders: text-encoder file ",
        ),
        (
            "model = 'models/clip_l.safetensors'",
            "field model: clip_l.safetensors is a text encoder's file, not a transformer",
        ),
    ],
)
def test_a_batch_entry_with_wrong_encoder_files_is_refused_before_anything_runs(
    bundled: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entry: str, message: str
) -> None:
    """The second job's files are wrong: the manifest is refused in one line naming the entry and the field, with
    the line --text-encoders and --vae get, before the first job runs; nothing is written."""
    import erasekit.checkpoints.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_pipeline", lambda *a, **kw: pytest.fail("a model was loaded"))
    kept_apart(bundled, tmp_path / "models")
    make_checkpoint(tmp_path / "models" / "clip_g.safetensors", "clip-g-file", "F16")
    training_images(tmp_path / "cats")
    (tmp_path / "jobs.toml").write_text(
        "model = 'models/flux1-dev.safetensors'\n"
        "text_encoders = 'models/clip_l.safetensors,models/t5xxl_fp16.safetensors'\n"
        "vae = 'models/ae.safetensors'\nimages = 'cats'\nsteps = 2\n"
        "[[jobs]]\nconcept = 'cat'\noutput = 'out/cat.erasepatch'\n"
        f"[[jobs]]\nconcept = 'dog'\noutput = 'out/dog.erasepatch'\n{entry}\n"
    )
    before = snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["erase", "--manifest", "jobs.toml"])
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith(f"error: jobs.toml: jobs[1] (out/dog.erasepatch), {message}"), r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.endswith(" (--manifest)\n"), r.stderr
    assert snapshot(tmp_path) == before
