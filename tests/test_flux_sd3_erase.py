"""FLUX.1 and SD3.x run: tiny local pipelines of both, generate with them, the conditioning and the flow-matching
objective an erase trains with, and erase through the CLI (issue 21)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from erasekit.testing import make_tiny_pipeline
from erasekit.toyworld.t5_tokenizer import t5_tokenizer, unigram_vocab


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flow")
    return {arch: make_tiny_pipeline(root / arch, arch) for arch in ("flux", "sd3")}


def test_the_t5_tokenizer_is_the_same_each_time_and_reads_back(tmp_path: Path) -> None:
    assert unigram_vocab() == unigram_vocab()
    made = t5_tokenizer(tmp_path / "t5")
    from transformers import T5Tokenizer

    read = T5Tokenizer.from_pretrained(tmp_path / "t5")
    ids = read("a photo of a Zebra").input_ids
    assert ids == made("a photo of a Zebra").input_ids and ids[-1] == 1  # </s>
    assert read.unk_token_id not in ids, "any ASCII word tokenizes"
    assert (read.pad_token_id, read.eos_token_id, read.unk_token_id, read.model_max_length) == (0, 1, 2, 512)


@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_a_tiny_pipeline_runs_offline(tiny: dict[str, Path], arch: str) -> None:
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    cls = FluxPipeline if arch == "flux" else StableDiffusion3Pipeline
    pipe = cls.from_pretrained(tiny[arch], local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a photo of a cat", num_inference_steps=2, height=32, width=32, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert image.size == (32, 32)
    assert np.asarray(image).std() > 0
