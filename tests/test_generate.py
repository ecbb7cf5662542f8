"""generate: files, PNG metadata, the grid, and --compare's same-seed before/after."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from erasekit.erasing.erase_job import erase_model
from erasekit.errors import ErasekitError, PatchFormatError
from erasekit.format.erase_config import EraseConfig
from erasekit.judging.sampling import GenerateConfig, generate_model
from erasekit.testing import make_tiny_pipeline


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("gen")
    model = make_tiny_pipeline(root / "tiny")
    patch = root / "p.erasepatch"
    erase_model(model, ["circle"], "auto", patch, EraseConfig(resolution=32, lr=1e-2, steps=4), num_images=2)
    return model, patch


def test_writes_images_with_metadata_and_grid(tmp_path: Path, setup: tuple[Path, Path]) -> None:
    model, patch = setup
    cfg = GenerateConfig(n=2, steps=3, seed=5)
    r = generate_model(model, ["a red circle", "a square"], tmp_path / "out", cfg, patches=[patch])
    names = sorted(Path(i.path).name for i in r.images)
    assert names == ["a-red-circle_5.png", "a-red-circle_6.png", "a-square_5.png", "a-square_6.png"]
    img = Image.open(tmp_path / "out" / "a-red-circle_6.png")
    assert img.text["prompt"] == "a red circle" and img.text["seed"] == "6"
    meta = json.loads(img.text["erasekit"])
    assert meta["patches"][0]["title"] == "circle erased" and meta["steps"] == 3
    assert "Seed: 6" in img.text["parameters"]
    grid = Image.open(r.grid)
    assert grid.size[0] > 2 * 128 and grid.size[1] > 2 * 128


def test_compare_uses_the_same_seeds(tmp_path: Path, setup: tuple[Path, Path]) -> None:
    model, patch = setup
    r = generate_model(
        model, ["a circle"], tmp_path / "cmp", GenerateConfig(n=1, steps=3, compare=True), patches=[patch]
    )
    before = np.asarray(Image.open(tmp_path / "cmp" / "a-circle_0_before.png"))
    after = np.asarray(Image.open(tmp_path / "cmp" / "a-circle_0_after.png"))
    plain = generate_model(model, ["a circle"], tmp_path / "plain", GenerateConfig(n=1, steps=3))
    assert np.array_equal(before, np.asarray(Image.open(plain.images[0].path))), "before == no patch, same seed"
    assert not np.array_equal(before, after), "the patch changes the picture"
    assert [i.patched for i in r.images] == [False, True]


def test_a_batch_of_seeds_gives_the_images_of_one_seed_at_a_time(tmp_path: Path, setup: tuple[Path, Path]) -> None:
    """--batch-size renders a prompt's seeds in one pipeline call; each keeps its own noise, so the pictures are those
    of batch 1 (up to a last-bit difference of the batched arithmetic: at most 2 levels of 255)."""
    model, patch = setup
    one = generate_model(model, ["a circle"], tmp_path / "one", GenerateConfig(n=3, steps=3), patches=[patch])
    three = generate_model(
        model, ["a circle"], tmp_path / "three", GenerateConfig(n=3, steps=3, batch_size=3), patches=[patch]
    )
    assert [Path(i.path).name for i in three.images] == [Path(i.path).name for i in one.images]
    for a, b in zip(one.images, three.images):
        x, y = (np.asarray(Image.open(i.path)).astype(int) for i in (a, b))
        assert np.abs(x - y).max() <= 2
    first, second = (np.asarray(Image.open(i.path)) for i in three.images[:2])
    assert not np.array_equal(first, second), "every seed its own picture"


def test_every_image_has_its_own_file(tmp_path: Path, setup: tuple[Path, Path]) -> None:
    """Prompts whose slugs coincide (case and punctuation, text without ASCII letters, the same first 60 characters)
    each get the slug and a hash of their exact text; a prompt alone with its slug keeps the plain name."""
    import hashlib

    model, _ = setup
    long = "a very long prompt about a red circle drawn on a white page, seen from far away"
    twins = ["a photo of a cat.", "A photo of a CAT!", "猫の写真", "犬の写真", long + " (1)", long + " (2)"]
    prompts = [*twins, "a photo of a dog"]
    r = generate_model(model, prompts, tmp_path / "out", GenerateConfig(n=1, steps=1))
    paths = [i.path for i in r.images]
    assert len(set(paths)) == len(paths) == len(prompts)
    on_disk = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert on_disk == sorted(["grid.png", *(Path(p).name for p in paths)])
    for image in r.images:  # no file was overwritten by another prompt's image
        assert Image.open(image.path).text["prompt"] == image.prompt
    digest = hashlib.sha256(b"A photo of a CAT!").hexdigest()[:8]
    assert Path(paths[1]).name == f"a-photo-of-a-cat_{digest}_0.png"
    assert Path(paths[-1]).name == "a-photo-of-a-dog_0.png", "an ordinary prompt keeps its readable name"
    assert {Path(p).name.rsplit("_", 2)[0] for p in paths[2:4]} == {"prompt"}
    with pytest.raises(ErasekitError, match="^the prompt 'a dog' is given twice; give each prompt once"):
        generate_model(model, ["a dog", "a cat", "a dog"], tmp_path / "again", GenerateConfig(n=1, steps=1))
    assert not (tmp_path / "again").exists()


def test_bad_inputs(tmp_path: Path, setup: tuple[Path, Path]) -> None:
    model, _ = setup
    with pytest.raises(ErasekitError, match="compare needs at least one patch"):
        generate_model(model, ["x"], tmp_path / "o", GenerateConfig(compare=True))
    bad = tmp_path / "bad.erasepatch"
    bad.write_bytes(b"\x00" * 4)
    with pytest.raises(PatchFormatError, match="truncated"):
        generate_model(model, ["x"], tmp_path / "o2", patches=[bad])
    assert not (tmp_path / "o2").exists()
