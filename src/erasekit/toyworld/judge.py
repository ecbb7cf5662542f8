"""The toy world's judge: a small CNN that reads shape, colour and pattern off a 32x32 image.

    from erasekit.toyworld.judge import load_judge, judge
    labels = judge(images)            # [{"shape": "circle", "colour": "red", "pattern": "solid"}, ...]
    labels, probs = judge(images, return_probs=True)

``images`` may be a list of PIL images, a uint8 numpy array [n, 32, 32, 3], or a float tensor
[n, 3, 32, 32] in [0, 1]. The shipped weights are ``erasekit/toyworld/judge.safetensors``; they are
trained by ``python -m erasekit.toyworld.train`` (fresh renders with blur/noise augmentation, plus
VAE reconstructions of renders).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .render import ATTRIBUTES

HEADS = tuple(ATTRIBUTES)  # ("shape", "colour", "pattern")
DEFAULT_PATH = Path(__file__).with_name("judge.safetensors")


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class Judge(nn.Module):
    """Three conv blocks (32x32 -> 16 -> 8 -> 4), global average pooling, one linear head per attribute."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_conv(3, w),
            nn.MaxPool2d(2),
            *_conv(w, 2 * w),
            *_conv(2 * w, 2 * w),
            nn.MaxPool2d(2),
            *_conv(2 * w, 4 * w),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.heads = nn.ModuleDict({k: nn.Linear(4 * w, len(v)) for k, v in ATTRIBUTES.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``x``: float [n, 3, 32, 32] in [0, 1]; returns logits per head."""
        h = self.features(x * 2.0 - 1.0)
        return {k: head(h) for k, head in self.heads.items()}


def to_tensor(images: Any) -> torch.Tensor:
    """PIL list / uint8 array [n,32,32,3] / float tensor [n,3,32,32] in [0,1] -> float tensor [n,3,32,32]."""
    if isinstance(images, torch.Tensor):
        return images.float()
    if isinstance(images, np.ndarray):
        arr = images
    else:
        arr = np.stack([np.asarray(im.convert("RGB")) for im in images])
    arr = arr.astype(np.float32)
    if arr.max() > 1.5:
        arr = arr / 255.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def load_judge(path: str | Path | None = None, device: str | torch.device = "cpu") -> Judge:
    """The judge in eval mode, with the shipped weights (or those at ``path``)."""
    from safetensors.torch import load_file

    model = Judge()
    model.load_state_dict(load_file(str(path or DEFAULT_PATH)))
    return model.to(device).eval()


_CACHED: Judge | None = None


@torch.no_grad()
def judge(images: Any, model: Judge | None = None, return_probs: bool = False, batch_size: int = 256) -> Any:
    """Label each image: a list of ``{"shape": ..., "colour": ..., "pattern": ...}``.

    With ``return_probs=True`` returns ``(labels, probs)`` where ``probs[head]`` is a numpy array
    [n, classes] (classes in the order of ``render.SHAPES``, ``COLOURS``, ``PATTERNS``)."""
    global _CACHED
    if model is None:
        if _CACHED is None:
            _CACHED = load_judge()
        model = _CACHED
    x = to_tensor(images)
    dev = next(model.parameters()).device
    probs: dict[str, list[np.ndarray]] = {k: [] for k in HEADS}
    for i in range(0, len(x), batch_size):
        out = model(x[i : i + batch_size].to(dev))
        for k in HEADS:
            probs[k].append(out[k].softmax(-1).cpu().numpy())
    p = {k: np.concatenate(v) if v else np.zeros((0, len(ATTRIBUTES[k]))) for k, v in probs.items()}
    labels = [{k: ATTRIBUTES[k][int(p[k][i].argmax())] for k in HEADS} for i in range(len(x))]
    return (labels, p) if return_probs else labels


def accuracy(
    labels: Sequence[dict[str, str]],
    truths: Sequence[dict[str, str]],
    attr: str,
    select: Callable[[dict[str, str]], bool] = lambda t: True,
) -> float:
    """The share of images whose judged ``attr`` is the true one, over the images whose truth names ``attr`` and
    passes ``select``; NaN if there are none. The one scoring rule of ``erasekit eval`` and of measuring a model."""
    hits = [lab[attr] == t[attr] for lab, t in zip(labels, truths) if attr in t and select(t)]
    return sum(hits) / len(hits) if hits else float("nan")
