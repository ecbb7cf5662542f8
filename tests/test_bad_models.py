"""Models erasekit does not erase: one line naming what the file looks like and what is supported, a non-zero
exit, nothing written. Also the Hub's answers for ids that cannot be had (the Hub is simulated: no network)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file
from typer.testing import CliRunner

from erasekit.cli import app
from erasekit.errors import ErasekitError
from erasekit.testing import make_checkpoint

runner = CliRunner()
Z = np.zeros((2, 2), np.float32)
KINDS = {  # FLUX.1 and SD3.x transformers without their encoders: tests/test_flux_sd3.py
    "lora": (
        {
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": Z,
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": Z,
        },
        "a LoRA/LyCORIS network",
    ),
    "unet": (
        {"model.diffusion_model.input_blocks.0.0.weight": Z, "model.diffusion_model.out.2.weight": Z},
        "a UNet on its own",
    ),
    "vae": ({"encoder.conv_in.weight": Z, "decoder.conv_out.weight": Z}, "a VAE on its own"),
}


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("imgs")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "a.png")
    return folder


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_other_model_kinds_get_one_line_naming_what_they_look_like(kind: str, tmp_path: Path, images: Path) -> None:
    tensors, looks = KINDS[kind]
    model = tmp_path / f"{kind}.safetensors"
    save_file(tensors, str(model))
    before = model.read_bytes()
    for args in (
        [
            "erase",
            "--model",
            str(model),
            "--concept",
            "x",
            "--images",
            str(images),
            "-o",
            str(tmp_path / "o.erasepatch"),
        ],
        ["generate", "--model", str(model), "-o", str(tmp_path / "gen"), "a cat"],
        ["inspect", str(model)],
    ):
        r = runner.invoke(app, args)
        assert r.exit_code == 4, (args, r.output)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0] == (
            f"error: {model.name} looks like {looks}"
            + (", not a whole model" if kind == "lora" else "")
            + ", which erasekit does not erase or patch; erasekit supports SD1.x, SD2.x, SDXL, FLUX.1 and SD3.x "
            "checkpoints: one .safetensors/.ckpt file, a diffusers folder or a model id"
        ), r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [model.name] and model.read_bytes() == before


def test_a_patch_given_as_a_model_points_to_apply(tmp_path: Path, images: Path, sd1: tuple[Path, Path]) -> None:
    from erasekit.checkpoints.diff import diff_checkpoints

    patch = tmp_path / "edit.safetensors"  # as written for a UI's LoRA folder
    diff_checkpoints(*sd1, output=patch)
    r = runner.invoke(
        app,
        [
            "erase",
            "--model",
            str(patch),
            "--concept",
            "x",
            "--images",
            str(images),
            "-o",
            str(tmp_path / "o.erasepatch"),
        ],
    )
    assert r.exit_code == 4 and "looks like an erasekit patch (apply it to a checkpoint: erasekit apply" in r.stderr


def test_a_text_encoder_on_its_own_cannot_be_erased_but_can_be_patched(tmp_path: Path, images: Path) -> None:
    te = make_checkpoint(tmp_path / "te", "transformers-clip")
    r = runner.invoke(
        app,
        ["erase", "--model", str(te), "--concept", "x", "--images", str(images), "-o", str(tmp_path / "o.erasepatch")],
    )
    assert r.exit_code == 4 and r.stderr.startswith(f"error: {te} is a CLIP text encoder on its own (no UNet or VAE)")
    assert "erasekit apply" in r.stderr and not (tmp_path / "o.erasepatch").exists()


def _http_error(cls: type, status: int) -> Exception:
    import httpx2

    response = httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/org/x"))
    return cls("the Hub says no", response=response)


@pytest.mark.parametrize(
    "error, message",
    [
        (
            "RepositoryNotFoundError",
            "org/x is neither a local path nor a model on the Hugging Face Hub (or it is private); "
            "check the id; for a private repo log in with `hf auth login`",
        ),
        (
            "GatedRepoError",
            "model org/x is gated: its licence must be accepted on its Hub page first; accept it there, then "
            "log in with `hf auth login` (or set HF_TOKEN)",
        ),
    ],
)
def test_unknown_or_gated_repos_online_are_one_line(
    error: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub
    from huggingface_hub import constants, errors

    from erasekit.checkpoints.hub import resolve_model

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    def refuse(self: object, repo_id: str, **kw: object) -> list[str]:
        raise _http_error(getattr(errors, error), 404 if error == "RepositoryNotFoundError" else 403)

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", refuse)
    with pytest.raises(ErasekitError) as e:
        resolve_model("org/x")
    assert str(e.value) == message
    assert not (tmp_path / "hub").exists() or not any((tmp_path / "hub").rglob("*.safetensors"))


@pytest.mark.parametrize("name", ["model_index.json", "text_encoder/config.json"])
def test_a_model_json_nested_200000_deep_is_a_layout_error(tmp_path: Path, name: str) -> None:
    folder = make_checkpoint(tmp_path / "m", "diffusers-sd1")
    (folder / name).write_text("[" * 200_000 + "]" * 200_000)
    r = CliRunner().invoke(app, ["inspect", str(folder)])
    assert r.exit_code == 4 and r.stderr.count("\n") == 1 and "is not readable JSON (RecursionError)" in r.stderr, (
        r.output
    )


SUPPORTED = "erasekit patches CLIP and T5 v1.1 text encoders, those of SD1.x, SD2.x, SDXL, FLUX.1 and SD3.x"


def _language_model(*extra: str, vocab: int = 64) -> dict[str, np.ndarray]:
    """A tiny Llama-style language model's tensors (2 layers) and ``extra`` tensors, what tells one from another
    (with its vocabulary, the rows of ``embed_tokens``)."""
    names = [
        f"model.layers.{i}.{part}.weight"
        for i in range(2)
        for part in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "self_attn.q_proj", "self_attn.k_proj")
    ]
    return {"model.embed_tokens.weight": np.zeros((vocab, 2), np.float16)} | {n: Z for n in (*names, *extra)}


LANGUAGE_MODELS = {  # file -> (its tensors, what erasekit says it is)
    "qwen_2.5_vl_7b.safetensors": (
        _language_model("model.layers.0.self_attn.q_proj.bias", "visual.blocks.0.mlp.gate_proj.weight"),
        "Qwen2.5-VL, Qwen-Image's text encoder (a vision tower beside a language model with attention biases)",
    ),
    "qwen_3_4b.safetensors": (
        _language_model("model.layers.0.self_attn.q_norm.weight"),
        "a Qwen3 language model, as Z-Image and FLUX.2 [klein] use (query and key norms in its attention)",
    ),
    "gemma_2_2b.safetensors": (
        _language_model("model.layers.0.pre_feedforward_layernorm.weight"),
        "a Gemma language model, as Lumina 2 and Sana use (layer norms before and after each FFN)",
    ),
    "mistral_3_small_flux2.safetensors": (
        _language_model(vocab=131072),
        "a Mistral language model, as FLUX.2 [dev] uses (a vocabulary of 131072 tokens, Mistral Small 3.1's)",
    ),
    "llama_3.1_8b_instruct.safetensors": (
        _language_model(vocab=128256),
        "a Llama 3 language model, as HiDream uses (a vocabulary of 128256 tokens, Llama 3.1's)",
    ),
    "llava_llama3.safetensors": (
        _language_model(vocab=128320),
        "a language model, as Qwen-Image, HiDream, Lumina 2 and FLUX.2 encode prompts with (decoder layers with "
        "gated FFNs, layers.N.mlp.gate_proj)",
    ),
}


@pytest.mark.parametrize("name", list(LANGUAGE_MODELS))
def test_the_language_model_of_a_line_not_patched_yet_is_named(
    name: str, tmp_path: Path, images: Path, sd1_patch: Path
) -> None:
    """Qwen-Image, HiDream, Lumina 2 and FLUX.2 encode prompts with language models: a file of one is named (not
    "no text encoder"), for every command that reads a model."""
    tensors, what = LANGUAGE_MODELS[name]
    model = tmp_path / name
    save_file(tensors, str(model))
    patch = sd1_patch
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for args in (
        ["inspect", str(model)],
        ["apply", str(patch), "--to", str(model), "--in-place"],
        ["apply", str(patch), "--to", str(model), "-o", str(tmp_path / "copy.safetensors")],
        ["diff", str(model), str(model), "-o", str(tmp_path / "d.erasepatch")],
        [
            "erase",
            "--model",
            str(model),
            "--concept",
            "x",
            "--images",
            str(images),
            "-o",
            str(tmp_path / "e.erasepatch"),
        ],
    ):
        r = runner.invoke(app, args)
        assert r.exit_code == 4 and r.stderr == (
            f"error: {name} is {what}, which erasekit does not patch yet; {SUPPORTED}\n"
        ), (args, r.output)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def _placeholders(*names: str, sizes: dict[str, tuple[int, ...]] | None = None) -> dict[str, np.ndarray]:
    sizes = sizes or {}
    return {n: np.zeros(sizes.get(n, (2, 2)), np.float16) for n in names}


DENOISERS = {  # file -> (its tensors, what erasekit says it holds and of which line, what the line encodes with)
    "flux2-dev.safetensors": (
        _placeholders(
            "double_blocks.0.img_attn.qkv.weight",
            "single_blocks.0.linear1.weight",
            "double_stream_modulation_img.lin.weight",
            "img_in.weight",
        ),
        "a FLUX.2 transformer (modulation shared by its blocks)",
        "FLUX.2 encodes prompts with Mistral Small 3.1 ([dev]) or Qwen3 ([klein]), no CLIP or T5",
    ),
    "chroma-unlocked-v50.safetensors": (
        _placeholders(
            "double_blocks.0.img_attn.qkv.weight",
            "single_blocks.0.linear1.weight",
            "distilled_guidance_layer.in_proj.weight",
        ),
        "a Chroma transformer (a distilled guidance layer)",
        "Chroma encodes prompts with T5 v1.1 XXL alone",
    ),
    "qwen_image_fp8.safetensors": (
        _placeholders(
            "model.diffusion_model.txt_norm.weight", "model.diffusion_model.transformer_blocks.0.img_mod.1.weight"
        ),
        "a Qwen-Image transformer (img_mod and txt_norm)",
        "Qwen-Image encodes prompts with Qwen2.5-VL",
    ),
    "hidream_i1_full.safetensors": (
        _placeholders(
            "double_stream_blocks.0.block.attn1.to_q.weight", "single_stream_blocks.0.block.attn1.to_q.weight"
        ),
        "a HiDream transformer (double- and single-stream blocks)",
        "HiDream encodes prompts with Llama 3.1 8B beside T5 v1.1 XXL and two CLIPs",
    ),
    "z_image_turbo.safetensors": (
        _placeholders(
            "cap_embedder.1.weight",
            "noise_refiner.0.attention.qkv.weight",
            "context_refiner.0.attention.qkv.weight",
            sizes={"cap_embedder.1.weight": (3840, 2)},
        ),
        "a Z-Image transformer (a caption embedder and refiners, 3840 wide)",
        "Z-Image encodes prompts with Qwen3",
    ),
    "lumina_2.safetensors": (
        _placeholders(
            "cap_embedder.1.weight", "noise_refiner.0.attention.qkv.weight", "context_refiner.0.attention.qkv.weight"
        ),
        "a Lumina transformer (a caption embedder and refiners)",
        "Lumina encodes prompts with Gemma",
    ),
    "wan2.1_t2v_1.3B.safetensors": (
        _placeholders("head.modulation", "blocks.0.cross_attn.q.weight"),
        "a Wan transformer (head.modulation)",
        "Wan encodes prompts with umT5-XXL",
    ),
}


@pytest.mark.parametrize("name", list(DENOISERS))
def test_a_denoiser_of_a_line_not_patched_yet_is_named_with_its_text_encoders(name: str, tmp_path: Path) -> None:
    """A FLUX.2 or Chroma transformer has FLUX.1's double and single blocks: it is never taken for FLUX.1's (whose
    message would send the user to clip_l and t5xxl files)."""
    tensors, holds, encodes = DENOISERS[name]
    model = tmp_path / name
    save_file(tensors, str(model))
    before = model.read_bytes()
    for args in (["inspect", str(model)], ["diff", str(model), str(model)]):
        r = runner.invoke(app, args)
        assert r.exit_code == 4 and r.stderr == (
            f"error: {name} holds {holds}, which erasekit does not patch yet: {encodes}; {SUPPORTED}, or such an "
            "encoder's own file or folder\n"
        ), (args, r.output)
    assert model.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [name]


def _pipeline_folder(root: Path, class_name: str, text_encoder: str) -> Path:
    """A diffusers folder of ``class_name`` whose text_encoder is a transformers ``text_encoder`` class."""
    (root / "text_encoder").mkdir(parents=True)
    (root / "text_encoder" / "config.json").write_text(json.dumps({"architectures": [text_encoder]}))
    save_file(_language_model(), str(root / "text_encoder" / "model.safetensors"))
    index = {"_class_name": class_name, "text_encoder": ["transformers", text_encoder]}
    (root / "model_index.json").write_text(json.dumps(index))
    return root


@pytest.mark.parametrize(
    "class_name, text_encoder, line, encodes",
    [
        ("QwenImagePipeline", "Qwen2_5_VLForConditionalGeneration", "Qwen-Image", "Qwen2.5-VL"),
        ("WanPipeline", "UMT5EncoderModel", "Wan", "umT5-XXL"),
        ("HiDreamImagePipeline", "LlamaForCausalLM", "HiDream", "Llama 3.1 8B beside T5 v1.1 XXL and two CLIPs"),
    ],
)
def test_a_pipeline_folder_of_a_line_not_patched_yet_names_its_text_encoders(
    class_name: str, text_encoder: str, line: str, encodes: str, tmp_path: Path
) -> None:
    folder = _pipeline_folder(tmp_path / "m", class_name, text_encoder)
    r = runner.invoke(app, ["inspect", str(folder)])
    assert r.exit_code == 4 and r.stderr == (
        f"error: diffusers folder {folder} is a {line} pipeline ({class_name}), which erasekit does not patch yet: "
        f"{line} encodes prompts with {encodes}; {SUPPORTED}, or such an encoder's own file or folder\n"
    ), r.output
    r = runner.invoke(app, ["inspect", str(folder / "text_encoder")])  # the text encoder's folder alone
    assert r.exit_code == 4 and r.stderr.startswith(f"error: {folder / 'text_encoder'} is "), r.output
    assert f"(its config.json names {text_encoder}), which erasekit does not patch" in r.stderr


def test_a_model_id_of_a_line_not_patched_yet_is_refused_before_its_weights_are_downloaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Qwen-Image's text encoder alone is 16 GB: its model_index.json is all that is fetched (the Hub is simulated)."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    index = tmp_path / "fetched" / "model_index.json"
    fetched: list[object] = []

    def list_files(self: object, repo_id: str, **kw: object) -> list[str]:
        return ["model_index.json", "text_encoder/config.json", "text_encoder/model-00001-of-00004.safetensors"]

    def download_one(repo_id: str, filename: str, **kw: object) -> str:
        index.parent.mkdir(exist_ok=True)
        index.write_text(json.dumps({"_class_name": "QwenImagePipeline", "text_encoder": ["transformers", "X"]}))
        fetched.append(filename)
        return str(index)

    def download_all(repo_id: str, **kw: object) -> str:
        if kw.get("local_files_only"):
            raise LocalEntryNotFoundError("not in the cache")
        patterns = list(kw.get("allow_patterns") or ["*"])  # type: ignore[call-overload]
        if any(not p.endswith(".json") for p in patterns):
            fetched.append("weights")
            raise OSError("the weights were asked for")
        fetched.extend(patterns)
        return download_one(repo_id, "model_index.json").removesuffix("/model_index.json")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", list_files)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download_one)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", download_all)
    r = runner.invoke(app, ["inspect", "Qwen/Qwen-Image"])
    assert r.exit_code == 4 and r.stderr == (
        "error: model Qwen/Qwen-Image is a Qwen-Image pipeline (QwenImagePipeline), which erasekit does not patch "
        f"yet: Qwen-Image encodes prompts with Qwen2.5-VL; {SUPPORTED}, or such an encoder's own file or folder\n"
    ), r.output
    assert "weights" not in fetched and "model_index.json" in fetched, fetched
