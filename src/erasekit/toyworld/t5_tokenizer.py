"""A small T5 tokenizer made offline: a Unigram vocabulary trained on a fixed corpus (the toy world's prompts and a
few generic sentences) by counting, with T5's special tokens (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2) and no sentinel tokens.

For tiny FLUX.1 and SD3.x pipelines (:func:`erasekit.testing.make_tiny_pipeline`) and a FLUX toy world: the same
corpus and settings give the same vocabulary, piece for piece and score for score. Torch-free.
"""

from __future__ import annotations

import math
import string
from collections import Counter
from pathlib import Path
from typing import Any

from .captions import PREFIXES, full_prompts

SPECIAL = ("<pad>", "</s>", "<unk>")  # T5's ids 0, 1, 2
ALPHABET = string.ascii_letters + string.digits + string.punctuation
MAX_LENGTH = 512  # FLUX.1's T5 tokenizer's model_max_length
GENERIC = (
    "a photo of a cat",
    "a photo of a dog",
    "a painting in the style of van gogh",
    "the quick brown fox jumps over the lazy dog",
    "a bird sitting on a tree branch at sunset",
    "an astronaut riding a horse on the moon, 4k, highly detailed",
    "0 1 2 3 4 5 6 7 8 9",
)


def corpus() -> list[str]:
    """The sentences the vocabulary is trained on, in a fixed order."""
    return [p for p, _ in full_prompts()] + list(PREFIXES) + list(GENERIC)


def unigram_vocab() -> list[tuple[str, float]]:
    """(piece, log-probability) of a Unigram model of :func:`corpus`: every word as one piece (``▁photo``), and
    every ASCII letter, digit and punctuation mark on its own (``z``) and after a space (``▁z``) so that any ASCII word
    still tokenizes, each scored by its count (plus one) over all counts. The special tokens come first (score 0),
    then the most probable pieces. Counted rather than trained with ``tokenizers``' UnigramTrainer, whose
    vocabulary changes from run to run (its hash maps are seeded per process)."""
    counts: Counter[str] = Counter()
    for sentence in corpus():
        words = sentence.replace(",", " ,").split()
        counts.update("\u2581" + w for w in words)
        counts.update(c for w in words for c in w)
    counts.update(c for c in ALPHABET)
    counts.update("\u2581" + c for c in ALPHABET)
    counts["\u2581"] += 1
    total = sum(counts.values())
    scored = sorted(((p, round(math.log(n / total), 6)) for p, n in counts.items()), key=lambda ps: (-ps[1], ps[0]))
    return [(p, 0.0) for p in SPECIAL] + scored


def t5_tokenizer(folder: str | Path | None = None) -> Any:
    """A ``T5Tokenizer`` on :func:`unigram_vocab`, saved into ``folder`` (with ``save_pretrained``) when given."""
    from transformers import T5Tokenizer

    tokenizer = T5Tokenizer(vocab=unigram_vocab(), extra_ids=0, model_max_length=MAX_LENGTH)
    if folder is not None:
        tokenizer.save_pretrained(str(folder))
    return tokenizer
