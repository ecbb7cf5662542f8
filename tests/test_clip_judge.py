"""erasekit eval --judge CLIP_FOLDER: zero-shot labels from a local transformers CLIPModel, on any model.

The CLIP model is built here, tiny, by hand so that it reads colours: its vision tower passes the image's mean
colour differences (red-green, green-blue, blue-red) through to the pooled output, and its visual projection maps
each colour's mean feature onto that colour's text feature. Nothing is downloaded and nothing is monkeypatched.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from erasekit.cli import app
from erasekit.errors import ErasekitError, InputFileError
from erasekit.judging.clip_judge import (
    judge_labels,
    label_named,
    label_prompts,
    load_clip_judge,
    read_label_prompts,
    stand_in_words,
)
from erasekit.toyworld import builtin_model_path
from erasekit.toyworld.concepts import paraphrases_of, render_concept

runner = CliRunner()
COLOURS = ["red", "green", "blue"]


def make_colour_clip(folder: Path, labels: list[str] = COLOURS, drawn: list[str] | None = None) -> Path:
    """A tiny CLIPModel (with its processor) whose zero-shot argmax over 'a photo of a {colour}' is the colour of
    the toy world's objects; ``drawn``: the colour each label's text is taken to show instead (a judge that
    confuses them)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=49408,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
        ),
        vision_config=dict(
            image_size=32,
            patch_size=32,
            hidden_size=16,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=1,
        ),
        projection_dim=8,
    )
    model = CLIPModel(config).eval()
    tokenizer = CLIPTokenizer.from_pretrained(builtin_model_path() / "tokenizer")
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    vision = model.vision_model
    with torch.no_grad():
        # one patch = the whole image; the class token sees it through uniform attention and an identity value path
        vision.embeddings.position_embedding.weight.zero_()
        vision.embeddings.class_embedding.zero_()
        w = torch.zeros_like(vision.embeddings.patch_embedding.weight)
        for k in range(3):
            w[k, k], w[k, (k + 1) % 3] = 10 / 32**2, -10 / 32**2
        vision.embeddings.patch_embedding.weight.copy_(w)
        layer = vision.encoder.layers[0]
        for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.mlp.fc2):
            lin.weight.zero_()
            lin.bias.zero_()
        for lin in (layer.self_attn.v_proj, layer.self_attn.out_proj):
            lin.weight.copy_(torch.eye(16))
            lin.bias.zero_()
        text = model.get_text_features(
            **tokenizer([f"a photo of a {x}" for x in labels], padding=True, return_tensors="pt")
        ).pooler_output
        text = text / text.norm(dim=-1, keepdim=True)
        shots = [[render_concept(c, s)[0] for s in range(10)] for c in drawn or labels]
        pooled = [
            vision(
                pixel_values=processor.image_processor(imgs, return_tensors="pt")["pixel_values"]
            ).pooler_output.mean(0)
            for imgs in shots
        ]
        centroids = torch.stack(pooled)
        # text @ W = centroids - their mean: an image's similarity to each label is its dot with that centroid
        model.visual_projection.weight.copy_(torch.linalg.pinv(text) @ (centroids - centroids.mean(0)))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def noise_patch(model: Path, out: Path) -> Path:
    """A patch of random FFN noise for ``model``'s text encoder (made with diff: no erase needed)."""
    from safetensors.torch import load_file, save_file

    from erasekit.checkpoints.diff import diff_checkpoints

    edited = out.parent / f"{out.stem}-encoder"
    shutil.copytree(model / "text_encoder", edited)
    weights = load_file(edited / "model.safetensors")
    key = next(k for k in weights if k.endswith("layers.1.mlp.fc2.weight"))
    noise = 0.05 * torch.randn(weights[key].shape, generator=torch.Generator().manual_seed(0))
    weights[key] = (weights[key].float() + noise).to(weights[key].dtype)
    save_file(weights, edited / "model.safetensors", metadata={"format": "pt"})
    diff_checkpoints(model / "text_encoder", edited, output=out, title="noise")
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clip")
    return {
        "clip": make_colour_clip(root / "clip"),
        "patch": noise_patch(builtin_model_path(), root / "noise.erasepatch"),
    }


def test_labels_stand_ins_and_prompts() -> None:
    assert judge_labels("Snoopy", ["dog", "snoopy", "Dog "], ["cat", "dog"]) == ["Snoopy", "dog", "cat"]
    with pytest.raises(ErasekitError, match="only 'Snoopy' to choose from") as e:
        judge_labels("Snoopy", ["snoopy"], [])
    assert e.value.option == "keep"
    assert stand_in_words(["cat", "Snoopy=dog, wolf", "snoopy="], "Snoopy") == ["cat", "dog", "wolf"]
    with pytest.raises(ErasekitError, match="is for 'circle'") as e:
        stand_in_words(["circle=square"], "Snoopy")
    assert e.value.option == "stand_ins"
    labels = ["dog", "hot dog", "Van Gogh"]
    assert label_named("a HOT  dog on a plate", labels) == "hot dog"  # the longer label, any case and spacing
    assert label_named("a dog in a park", labels) == "dog"
    assert label_named("a painting by Van Gogh", labels) == "Van Gogh"
    assert label_named("a dogma", labels) is None  # whole words only
    with pytest.raises(ErasekitError, match="names Van Gogh and dog"):
        label_named("a dog by Van Gogh", labels)
    specs = label_prompts(["dog", "cat"], 2)
    assert specs[:2] == [("a photo of a dog", {"concept": "dog"})] * 2 and len(specs) == 2 * 2 * 2
    assert read_label_prompts(["a dog", "two cats and a cat"], ["dog", "cat"], 1, "f") == [
        ("a dog", {"concept": "dog"}),
        ("two cats and a cat", {"concept": "cat"}),
    ]
    with pytest.raises(ErasekitError, match="'a horse' in f names none"):
        read_label_prompts(["a dog", "a horse"], ["dog", "cat"], 1, "f")
    with pytest.raises(ErasekitError, match="no prompt in f names dog"):
        read_label_prompts(["a cat"], ["dog", "cat"], 1, "f")


def test_the_judge_classifies_as_clip_does(world: dict[str, Path]) -> None:
    """Its labels are CLIP's own argmax over the label texts, the same every time, and right for colours."""
    judge = load_clip_judge(world["clip"], COLOURS)
    images = [render_concept(c, 500 + s)[0] for c in COLOURS for s in range(8)]
    truth = [c for c in COLOURS for _ in range(8)]
    labels = judge.classify(images)
    assert judge.classify(images) == labels and judge(images) == [{"concept": x} for x in labels]
    assert sum(x == t for x, t in zip(labels, truth)) >= 0.8 * len(truth), labels
    # the reference: transformers' own forward pass of the whole model
    inputs = judge.processor(
        text=[f"a photo of a {c}" for c in COLOURS], images=images, return_tensors="pt", padding=True
    )
    with torch.no_grad():
        reference = judge.model(**inputs).logits_per_image.argmax(-1).tolist()
    assert labels == [COLOURS[i] for i in reference]
    # another label order: the same classes (the argmax follows the labels, not their positions)
    assert load_clip_judge(world["clip"], COLOURS[::-1]).classify(images) == labels


def test_eval_with_the_clip_judge(tmp_path: Path, world: dict[str, Path]) -> None:
    """The built-in model as the generator, CLIP as the judge: labels from --keep and --stand-in, the toy world's
    paraphrases, strict JSON; with strength 0 the patched images are the unpatched ones."""
    r = runner.invoke(
        app,
        [
            "eval",
            "--patch",
            str(world["patch"]),
            "--concept",
            "red",
            "--judge",
            str(world["clip"]),
            "--keep",
            "green",
            "--stand-in",
            "red=blue",
            "-n",
            "2",
            "--strength",
            "0",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert (rep["judge"], rep["labels"], rep["attribute"]) == (str(world["clip"]), COLOURS, "concept")
    assert [o["concept"] for o in rep["others"]] == ["green", "blue"] and rep["attributes"] == {}
    assert rep["prompts"] == 3 * 2 and rep["images_per_prompt"] == 2
    assert rep["prompt_texts"][:2] == ["a photo of a red", "a picture of a red"], "what --record lists"
    assert len(rep["prompt_texts"]) == rep["prompts"]
    rb = rep["robustness"]
    assert [w["concept"] for w in rb["wordings"]] == [w.replace("{}", "red") for w in paraphrases_of("red")]
    assert rb["source"] == "built-in"
    scores = [rep["target"], *rep["others"], rb, *rb["wordings"]]
    assert all(0 <= s["before"] <= 1 and s["before"] == s["after"] for s in scores), scores
    assert rep["largest_drop"] is None
    assert rep["target"]["before"] >= 0.75 and rb["before"] >= 0.75, "CLIP sees the red of the model's red images"
    assert rep["judge_notes"] == [], "so its after-rate means what it says"


def test_a_judge_blind_to_the_target_is_noted(tmp_path: Path, world: dict[str, Path]) -> None:
    """A judge that takes red things for blue and blue things for red finds red in almost none of the unpatched
    model's red images: the after-rate then says nothing, and the JSON and the table say so. A judge that sees the
    target leaves no note."""
    blind = make_colour_clip(tmp_path / "blind", COLOURS, drawn=["blue", "green", "red"])
    prompts = write_lines(tmp_path / "prompts.txt", [f"a photo of a {c}" for c in COLOURS])
    args = [
        "eval",
        "--patch",
        str(world["patch"]),
        "--concept",
        "red",
        "--keep",
        "green",
        "--stand-in",
        "blue",
        "-n",
        "2",
        "--steps",
        "8",
        "--prompts",
        str(prompts),
        "--paraphrases",
        str(write_lines(tmp_path / "p.txt", ["one {}"])),
    ]
    r = runner.invoke(app, [*args, "--judge", str(blind), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["target"]["before"] <= 0.25 and rep["others"][0]["before"] >= 0.75, rep
    assert rep["judge_notes"] == [
        f"the judge finds red in {100 * rep['target']['before']:.1f}% of the unpatched model's images of it (no "
        f"better than chance among 3 labels (33.3%); under half the other labels' "
        f"{50 * (rep['others'][0]['before'] + rep['others'][1]['before']):.1f}%), so its after-rate says nothing "
        "about the erase; check that the model draws red and that the judge knows it (its label's wording, another "
        "judge)"
    ]
    text = runner.invoke(app, [*args, "--judge", str(blind)])
    assert text.exit_code == 0, text.output
    assert "target: red rate (see the note)" in text.stdout
    assert f"\nnote: {rep['judge_notes'][0]}\n" in text.stdout


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_eval_with_the_clip_judge_on_another_model(tmp_path: Path, world: dict[str, Path]) -> None:
    """A model other than the built-in one: refused without a judge, judged with one (labels from --keep)."""
    from erasekit.testing import make_tiny_pipeline

    model = make_tiny_pipeline(tmp_path / "tiny", "sd1", clip_vocab=True)
    patch = noise_patch(model, tmp_path / "tiny.erasepatch")
    args = ["eval", "--model", str(model), "--patch", str(patch), "--concept", "Snoopy", "-n", "1", "--steps", "2"]
    r = runner.invoke(app, [*args, "--grid", str(tmp_path / "g.png")])
    assert r.exit_code == 1, r.output
    assert r.stderr.count("\n") == 1 and r.stderr.strip().endswith("(--judge)") and "CLIP" in r.stderr, r.stderr
    assert not (tmp_path / "g.png").exists()
    r = runner.invoke(app, [*args, "--judge", str(world["clip"]), "--keep", "dog", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["labels"] == ["Snoopy", "dog"] and rep["robustness"] is None  # no paraphrases for other models
    assert rep["prompts"] == 4 and all(
        0 <= s["before"] <= 1 and 0 <= s["after"] <= 1 for s in (rep["target"], *rep["others"])
    )


def test_bad_judges_are_one_line_and_write_nothing(tmp_path: Path, world: dict[str, Path]) -> None:
    not_clip = tmp_path / "text-encoder"  # a CLIPTextModel folder: model_type clip_text_model
    shutil.copytree(builtin_model_path() / "text_encoder", not_clip)
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(world["clip"] / "config.json", no_weights / "config.json")
    grid = tmp_path / "out" / "grid.png"
    grid.parent.mkdir()
    cases = [
        (tmp_path / "missing", 2, "does not exist"),
        (not_clip, 2, "holds a 'clip_text_model' model"),
        (no_weights, 2, "cannot load the CLIP model"),
        (tmp_path / "out", 2, "has no readable config.json"),
    ]
    for folder, code, message in cases:
        r = runner.invoke(
            app,
            ["eval", "--patch", str(world["patch"]), "--concept", "red", "--judge", str(folder), "--grid", str(grid)],
        )
        assert r.exit_code == code, (folder, r.output)
        assert r.stderr.count("\n") == 1 and message in r.stderr and r.stderr.strip().endswith("(--judge)"), r.stderr
        assert list(grid.parent.iterdir()) == [], "nothing is written"
    with pytest.raises(InputFileError, match="not a folder"):
        load_clip_judge(world["patch"], COLOURS)
    # a concept with nothing to tell it from (the patch records no neighbours, the toy world has no 'Snoopy')
    r = runner.invoke(
        app, ["eval", "--patch", str(world["patch"]), "--concept", "Snoopy", "--judge", str(world["clip"])]
    )
    assert r.exit_code == 1 and r.stderr.strip().endswith("(--keep)"), r.output
