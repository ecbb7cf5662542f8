"""A deterministic procedural world: one coloured, patterned shape on a light background.

Every image is 32x32 RGB, drawn at 4x (128x128) and box-downsampled. Three attributes:

* shape   -- ``SHAPES``:   circle, square, triangle, star, cross
* colour  -- ``COLOURS``:  red, green, blue, yellow, purple (each channel jittered by +-25)
* pattern -- ``PATTERNS``: solid, hollow (a thick outline), striped (bold diagonal stripes,
  the colour alternating with a dark shade of it)

The radius is 0.22-0.42 of the image side, the position is random (the shape always fits), the
background is a light grey (215-255) with a small tint. All randomness comes from the numpy
``Generator`` passed in, so the same seed gives the same images on every machine.

This module needs only numpy and Pillow (no torch).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32
SCALE = 4
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 75, 220),
    "yellow": (235, 200, 25),
    "purple": (145, 50, 190),
}
PATTERNS: tuple[str, ...] = ("solid", "hollow", "striped")
ATTRIBUTES: dict[str, tuple[str, ...]] = {"shape": SHAPES, "colour": tuple(COLOURS), "pattern": PATTERNS}

RADIUS_RANGE = (0.22, 0.42)
COLOUR_JITTER = 25
STRIPE_PERIOD = 8  # pixels at 32x32 (4 px in the colour, 4 px in a dark shade of it), diagonal
STRIPE_SHADE = 0.40  # the dark stripes are this fraction of the colour
HOLLOW_BORDER = 0.30  # outline thickness as a fraction of the radius (at least 2 px)


_DIAG = np.add.outer(np.arange(SIZE * SCALE), np.arange(SIZE * SCALE)).astype(np.float32)


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    if shape == "square":
        k, rr = 4, r * 0.92
        return [
            (
                cx + rr * math.cos(rot + math.pi / 4 + i * math.pi / 2),
                cy + rr * math.sin(rot + math.pi / 4 + i * math.pi / 2),
            )
            for i in range(k)
        ]
    if shape == "triangle":
        # centroid-centred equilateral triangle, pointing up, slightly enlarged so its area is comparable
        rr = r * 1.05
        return [
            (
                cx + rr * math.cos(rot - math.pi / 2 + i * 2 * math.pi / 3),
                cy + rr * math.sin(rot - math.pi / 2 + i * 2 * math.pi / 3),
            )
            for i in range(3)
        ]
    if shape == "star":
        pts = []
        for i in range(10):
            rr = r if i % 2 == 0 else r * 0.5
            a = rot - math.pi / 2 + i * math.pi / 5
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    if shape == "cross":
        w = r * 0.38  # half arm width
        base = [
            (-w, -r),
            (w, -r),
            (w, -w),
            (r, -w),
            (r, w),
            (w, w),
            (w, r),
            (-w, r),
            (-w, w),
            (-r, w),
            (-r, -w),
            (-w, -w),
        ]
        c, s = math.cos(rot), math.sin(rot)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in base]
    raise ValueError(f"unknown shape {shape!r}")


def _erode(mask: np.ndarray, k: int) -> np.ndarray:
    """Grey erosion with a k x k square (same as PIL's MinFilter(k)), done separably in numpy."""
    h = k // 2
    p = np.pad(mask, h, constant_values=0.0)
    rows = np.lib.stride_tricks.sliding_window_view(p, k, axis=0).min(axis=-1)
    return np.lib.stride_tricks.sliding_window_view(rows, k, axis=1).min(axis=-1)


def _mask(shape: str, cx: float, cy: float, r: float, rot: float, size: int) -> Image.Image:
    m = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(m)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        d.polygon(_polygon(shape, cx, cy, r, rot), fill=255)
    return m


def render(
    shape: str, colour: str, pattern: str = "solid", rng: np.random.Generator | int | None = None
) -> Image.Image:
    """Draw one 32x32 RGB image of ``shape`` in ``colour`` with fill ``pattern``.

    Size, position, colour jitter and background come from ``rng`` (a numpy Generator or an int seed).
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; expected one of {tuple(COLOURS)}")
    if pattern not in PATTERNS:
        raise ValueError(f"unknown pattern {pattern!r}; expected one of {PATTERNS}")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    big = SIZE * SCALE
    r = rng.uniform(*RADIUS_RANGE) * big
    cx, cy = rng.uniform(r, big - r), rng.uniform(r, big - r)
    rot = rng.uniform(-0.25, 0.25) if shape in ("square", "cross", "star", "triangle") else 0.0
    grey = rng.uniform(215, 255)
    bg = np.clip(grey + rng.uniform(-8, 8, 3), 0, 255)
    fg = np.clip(np.array(COLOURS[colour], float) + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, 3), 0, 255)

    mask_img = _mask(shape, cx, cy, r, rot, big)
    mask = np.asarray(mask_img, np.float32) / 255.0
    if pattern == "hollow":
        border = max(2.0 * SCALE, HOLLOW_BORDER * r)
        k = int(round(border)) * 2 + 1
        inner = _erode(mask, k)
        mask = mask * (1.0 - inner)
    img = bg[None, None, :] * (1 - mask[..., None]) + fg[None, None, :] * mask[..., None]
    if pattern == "striped":
        # the silhouette stays whole: stripes alternate the colour and a dark shade of it
        period = STRIPE_PERIOD * SCALE
        phase = rng.uniform(0, period)
        dark = ((_DIAG + phase) % period) < period / 2
        img = img - (mask * dark)[..., None] * (fg * (1 - STRIPE_SHADE))[None, None, :]
    small = img.reshape(SIZE, SCALE, SIZE, SCALE, 3).mean(axis=(1, 3))
    return Image.fromarray(np.clip(np.round(small), 0, 255).astype(np.uint8), "RGB")


def sample(rng: np.random.Generator | int | None = None) -> tuple[Image.Image, dict[str, str]]:
    """A uniformly random (shape, colour, pattern) image and its attributes."""
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    attrs = {
        "shape": SHAPES[int(rng.integers(len(SHAPES)))],
        "colour": tuple(COLOURS)[int(rng.integers(len(COLOURS)))],
        "pattern": PATTERNS[int(rng.integers(len(PATTERNS)))],
    }
    return render(attrs["shape"], attrs["colour"], attrs["pattern"], rng), attrs


def dataset(n: int, seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``n`` random renders as a uint8 array [n, 32, 32, 3] and integer labels per attribute."""
    rng = np.random.default_rng(seed)
    images = np.empty((n, SIZE, SIZE, 3), np.uint8)
    labels = {k: np.empty(n, np.int64) for k in ATTRIBUTES}
    for i in range(n):
        img, attrs = sample(rng)
        images[i] = np.asarray(img)
        for k, v in attrs.items():
            labels[k][i] = ATTRIBUTES[k].index(v)
    return images, labels


def grid(images: list[Image.Image], cols: int = 8, scale: int = 2) -> Image.Image:
    """Tile images into one picture (for looking at samples)."""
    rows = (len(images) + cols - 1) // cols
    out = Image.new("RGB", (cols * SIZE, rows * SIZE), (255, 255, 255))
    for i, im in enumerate(images):
        out.paste(im, ((i % cols) * SIZE, (i // cols) * SIZE))
    return out.resize((out.width * scale, out.height * scale), Image.Resampling.NEAREST)
