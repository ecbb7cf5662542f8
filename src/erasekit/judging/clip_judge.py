"""The CLIP judge of ``erasekit eval --judge FOLDER``: which of a few labels each generated image shows, by
zero-shot classification with a local transformers ``CLIPModel``, so that any Stable Diffusion model erasekit
loads gets the before/after table the built-in toy world gets from its own judge.

The labels are the erased concept, the concepts the erase should keep and its stand-ins. An image shows label X
when, of the texts ``"a photo of a {label}"``, CLIP finds X's the most similar to the image (argmax of the
cosine similarity; CLIP's logit scale does not change it). The prompts to render name one label each: by default
``PROMPT_TEMPLATES`` with every label; each image's truth is the label its prompt names.

    judge = load_clip_judge("clip-vit-base-patch32/", ["Snoopy", "dog", "cat"])
    judge(images)     # [{"concept": "dog"}, ...]: what toyworld.judge.accuracy scores
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ErasekitError, InputFileError

LABEL_TEXT = "a photo of a {}"  # the text each label is classified by
PROMPT_TEMPLATES = ("a photo of a {}", "a picture of a {}")  # the default prompts rendered per label
KEY = "concept"  # the key of a CLIP-judged image's label, in the truths and labels eval scores


class ClipJudge:
    """A loaded CLIP model and its processor, classifying images among fixed ``labels``."""

    def __init__(self, folder: Path, model: Any, processor: Any, labels: list[str], batch_size: int = 32) -> None:
        self.folder = folder
        self.model = model
        self.processor = processor
        self.labels = labels
        self.batch_size = batch_size
        self._text: Any = None

    def _features(self, out: Any) -> Any:
        # transformers 5 returns a model output with the projected features as its pooler_output; 4.x a tensor
        feats = out if hasattr(out, "norm") else out.pooler_output
        return feats / feats.norm(dim=-1, keepdim=True)

    def classify(self, images: Sequence[Any]) -> list[str]:
        """The label each image (PIL) shows: the argmax of its similarity to every label's text."""
        import torch

        device = next(self.model.parameters()).device
        with torch.no_grad():
            if self._text is None:
                tokens = self.processor.tokenizer(
                    [LABEL_TEXT.format(x) for x in self.labels], padding=True, return_tensors="pt"
                ).to(device)
                self._text = self._features(self.model.get_text_features(**tokens))
            out: list[str] = []
            for i in range(0, len(images), self.batch_size):
                pixels = self.processor.image_processor(list(images[i : i + self.batch_size]), return_tensors="pt")
                feats = self._features(
                    self.model.get_image_features(pixel_values=pixels["pixel_values"].to(device, self.model.dtype))
                )
                out += [self.labels[int(k)] for k in (feats @ self._text.T).argmax(-1)]
        return out

    def __call__(self, images: Sequence[Any]) -> list[dict[str, str]]:
        return [{KEY: label} for label in self.classify(images)]


def load_clip_judge(folder: str | os.PathLike, labels: Sequence[str], device: Any = "cpu") -> ClipJudge:
    """The CLIP model and processor of a local transformers folder (nothing is downloaded)."""
    path = Path(folder)
    if not path.exists():
        raise InputFileError(
            f"the CLIP folder {path} does not exist",
            "give a local folder of a transformers CLIPModel with its processor (saved with save_pretrained)",
            option="judge",
        )
    try:
        config = json.loads((path / "config.json").read_text()) if path.is_dir() else None
    except (OSError, ValueError, RecursionError):
        config = None
    kind = config.get("model_type") if isinstance(config, dict) else None
    if kind != "clip":
        what = (
            "is not a folder"
            if not path.is_dir()
            else ("has no readable config.json" if kind is None else f"holds a {kind!r} model")
        )
        raise InputFileError(
            f"{path} {what}, not a transformers CLIPModel",
            "give a folder saved with "
            "CLIPModel.save_pretrained and CLIPProcessor.save_pretrained (such as a download of "
            "openai/clip-vit-base-patch32)",
            option="judge",
        )
    from ..checkpoints.pipeline import quiet_libraries

    quiet_libraries()
    import warnings

    from transformers import CLIPModel, CLIPProcessor

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = CLIPModel.from_pretrained(path, local_files_only=True)
            processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputFileError(
            f"cannot load the CLIP model and processor in {path} ({first})",
            "the folder needs the model's config and weights, its tokenizer and its image processor's "
            "settings (CLIPModel and CLIPProcessor save_pretrained)",
            option="judge",
        ) from None
    return ClipJudge(path, model.to(device).eval(), processor, list(labels))


def judge_labels(concept: str, keep: Sequence[str], stand_ins: Sequence[str]) -> list[str]:
    """The labels images are classified among: the concept first, then the concepts to keep and the stand-ins,
    each once (case-insensitively)."""
    labels: list[str] = []
    for label in (concept, *keep, *stand_ins):
        label = " ".join(label.split())
        if label and label.lower() not in {x.lower() for x in labels}:
            labels.append(label)
    if len(labels) < 2:
        raise ErasekitError(
            f"the CLIP judge has only {concept!r} to choose from, so every image would show it",
            "name the concepts the erase should keep or its stand-ins (the patch records none)",
            option="keep",
        )
    return labels


def stand_in_words(items: Sequence[str], concept: str) -> list[str]:
    """Stand-ins as given: ``WORD`` or, as erase takes them, ``CONCEPT=WORD[,WORD]`` for the evaluated concept."""
    words: list[str] = []
    for item in items:
        named, sep, rest = item.partition("=")
        if sep and named.strip().lower() != concept.lower():
            raise ErasekitError(
                f"stand-in {item!r} is for {named.strip()!r}, and eval judges {concept!r}",
                f"give the stand-ins of {concept} (WORD or {concept}=WORD)",
                option="stand_ins",
            )
        words += [w.strip() for w in (rest if sep else item).split(",") if w.strip()]
    return words


def recorded_neighbours(patches: Sequence[Any], concept: str) -> tuple[list[str], list[str]]:
    """The concepts to keep and the stand-ins of ``concept`` that the patches' manifests record (anchored recipe)."""
    keep: list[str] = []
    stand: list[str] = []
    for p in patches:
        hp = p.manifest.method.hyperparameters
        keep += [k for k in hp.get("keep") or [] if isinstance(k, str)]
        for name, words in (hp.get("stand_ins") or {}).items():
            if name.lower() == concept.lower():
                stand += [w for w in ([words] if isinstance(words, str) else words) if isinstance(w, str)]
    return keep, stand


Spec = tuple[str, dict[str, str]]  # a prompt and its truth


def label_prompts(labels: Sequence[str], n: int, templates: Sequence[str] = PROMPT_TEMPLATES) -> list[Spec]:
    """Every label in every template, ``n`` times each, with the label as its truth."""
    return [(t.replace("{}", label), {KEY: label}) for label in labels for t in templates for _ in range(n)]


def label_named(prompt: str, labels: Sequence[str]) -> str | None:
    """The one label a prompt names (as whole words, any case; a label inside a longer named label does not
    count); None when it names none. Naming several is an error: the image's truth would be ambiguous."""
    spans = []
    for label in labels:
        words = r"\s+".join(re.escape(w) for w in label.split())
        spans += [(m.start(), m.end(), label) for m in re.finditer(rf"(?<!\w){words}(?!\w)", prompt, re.IGNORECASE)]
    found = {lab for s, e, lab in spans if not any(s2 <= s and e <= e2 and (s2, e2) != (s, e) for s2, e2, _ in spans)}
    if len(found) > 1:
        raise ErasekitError(
            f"the prompt {prompt!r} names {' and '.join(sorted(found))}, so its images have no one "
            "truth for the CLIP judge",
            "name one label per prompt",
            option="prompts_file",
        )
    return found.pop() if found else None


def read_label_prompts(lines: Sequence[str], labels: Sequence[str], n: int, source: str) -> list[Spec]:
    """The prompts of a prompts file, ``n`` times each, each with the label it names as its truth."""
    specs = []
    for line in lines:
        label = label_named(line, labels)
        if label is None:
            raise ErasekitError(
                f"the prompt {line!r} in {source} names none of the CLIP judge's labels ({', '.join(labels)})",
                "name one label in every prompt, or add the label as a concept to keep",
                option="prompts_file",
            )
        specs += [(line, {KEY: label})] * n
    if not any(t[KEY] == labels[0] for _, t in specs):
        raise ErasekitError(
            f"no prompt in {source} names {labels[0]}", f"add prompts that name {labels[0]}", option="prompts_file"
        )
    return specs
