"""Training images: finding and loading them, and their latents through the frozen VAE, cached on disk by
image bytes (least recently used entries pruned past ``ERASEKIT_CACHE_MB``)."""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from pathlib import Path
from typing import Any

from ..errors import ErasekitError, ErasekitWarning, InputFileError
from ..format.erase_config import EraseConfig

SKIPPED_NAMED = 3  # files a warning names before "and N more"


def find_images(folder: str | os.PathLike) -> list[Path]:
    """The images in ``folder`` by name (or ``folder`` itself, a file): every file of a format Pillow reads. Hidden
    files and subfolders are passed over; other files are skipped with a warning naming them."""
    folder = Path(folder)
    if not folder.exists():
        raise InputFileError(f"image folder {folder} does not exist", "check the images path", option="images")
    if folder.is_file():
        return [folder]
    readable = pillow_suffixes()
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_file())
    files = [p for p in entries if p.suffix.lower() in readable]
    skipped = [p.name for p in entries if p.suffix.lower() not in readable]
    not_images = f"{_named(skipped)} (not {'an image' if len(skipped) == 1 else 'images'} Pillow reads)"
    if not files:
        raise InputFileError(
            f"no images found in {folder}" + (f": only {not_images}" if skipped else ""),
            "put a few photos of the concept there (PNG, JPEG, WebP, TIFF or another format Pillow "
            "reads), or let the model draw them (images 'auto')",
            option="images",
        )
    if skipped:
        warnings.warn(ErasekitWarning(f"{folder}: skipped {not_images}"), stacklevel=2)
    return files


def pillow_suffixes() -> set[str]:
    """The file extensions of the formats Pillow opens (lower case, with the dot)."""
    from PIL import Image

    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def _named(names: list[str]) -> str:
    """``a.txt, b.md, c.doc and 4 more``."""
    more = len(names) - SKIPPED_NAMED
    return ", ".join(names[:SKIPPED_NAMED]) + (f" and {more} more" if more > 0 else "")


def training_image(img: Any, resolution: int) -> Any:
    """RGB, resized bicubic to resolution x resolution without cropping, as the reference does."""
    from PIL import Image

    return img.convert("RGB").resize((resolution, resolution), Image.Resampling.BICUBIC)


def load_image(path: Path, resolution: int) -> tuple[Any, bytes]:
    """The training image and the file's bytes (which key the latents cache)."""
    from PIL import Image, UnidentifiedImageError

    try:
        data = path.read_bytes()
        img = Image.open(io.BytesIO(data))
        img.load()
    except (OSError, UnidentifiedImageError) as e:
        raise InputFileError(
            f"{path} is not a readable image ({type(e).__name__})", "remove it or replace it"
        ) from None
    return training_image(img, resolution), data


def training_item(item: Any, resolution: int) -> tuple[Any, bytes]:
    """An image given as a path or a PIL image: the training image and :func:`image_key`'s bytes."""
    if isinstance(item, (str, os.PathLike)):
        return load_image(Path(item), resolution)
    img = training_image(item, resolution)
    return img, img.tobytes()


def image_key(item: Any, resolution: int) -> bytes:
    """The bytes an image is known by, which key the latents cache and the patch's ``images_sha256``: a file's own
    bytes (read, not decoded), a drawn image's pixels at the training resolution."""
    if isinstance(item, (str, os.PathLike)):
        return Path(item).read_bytes()
    return training_image(item, resolution).tobytes()


def images_digest(data: list[bytes]) -> str:
    """What a patch records as ``images_sha256``: the hash of the images' hashes (of a file's bytes, of a drawn
    image's pixels), in order."""
    return hashlib.sha256(b"".join(hashlib.sha256(d).digest() for d in data)).hexdigest()


# -- latents cache --------------------------------------------------------------------------------


def cache_dir() -> Path:
    import platformdirs

    return Path(os.environ.get("ERASEKIT_CACHE_DIR") or platformdirs.user_cache_dir("erasekit")) / "latents"


CACHE_LIMIT_BYTES = int(float(os.environ.get("ERASEKIT_CACHE_MB", "512")) * 1e6)


def vae_id(vae: Any) -> str:
    """Identity of a VAE: its config plus the bytes of its first and last parameters."""
    from .._torch import tensor_bytes

    h = hashlib.sha256(vae.config.__repr__().encode())
    params = list(vae.parameters())
    for p in (params[0], params[-1]):
        h.update(tensor_bytes(p.float()))
    return h.hexdigest()[:16]


def _prune(folder: Path, limit: int) -> None:
    """Delete least recently used entries until the cache is under ``limit`` bytes."""
    files = sorted(folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
    total = sum(p.stat().st_size for p in files)
    for p in files:
        if total <= limit:
            break
        total -= p.stat().st_size
        p.unlink(missing_ok=True)


# in every cache key: entries from before the VAE encoded in float32 are never read (it encoded in its loaded dtype,
# and :func:`vae_id` cannot tell a half-precision VAE from the float32 one when the weights are half-precision
# values, as fp16 downloads are)
ENCODED_IN = "f32"


def encode_images(pipe: Any, images: list[tuple[Any, bytes]], config: EraseConfig, flips: list[bool]) -> Any:
    """Latent distribution (mean, std) of each image, through the frozen VAE once, cached on disk. The VAE encodes
    in float32 whatever dtype it was loaded in (fp16 overflows in SDXL's VAE, which its config marks
    ``force_upcast``), and is given back as found."""
    import torch

    from .._torch import kept_as_found

    vae = pipe.vae
    vid = vae_id(vae)
    with kept_as_found([vae]):
        vae.to(torch.float32)
        return _encode_all(vae, vid, images, config, flips)


def _encode_all(vae: Any, vid: str, images: list[tuple[Any, bytes]], config: EraseConfig, flips: list[bool]) -> Any:
    """:func:`encode_images` with the VAE in float32: each image from the cache, else encoded and cached."""
    import numpy as np
    import torch

    from ..format import _st

    folder = cache_dir()
    means, stds = [], []
    for (img, data), flip in zip(images, flips):
        key = hashlib.sha256(data + f"|{config.resolution}|{int(flip)}|{vid}|{ENCODED_IN}".encode()).hexdigest()
        path = folder / f"{key}.safetensors"
        if config.cache and path.exists():
            try:
                h = _st.read_header(path)
                with open(path, "rb") as f:
                    mean = torch.from_numpy(_st.read_array(f, h.entries["mean"]).copy())
                    std = torch.from_numpy(_st.read_array(f, h.entries["std"]).copy())
                os.utime(path)
                means.append(mean)
                stds.append(std)
                continue
            except ErasekitError:
                path.unlink(missing_ok=True)  # a damaged entry is recomputed
        from PIL import Image

        arr = (
            np.asarray(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else img, dtype=np.float32) / 127.5 - 1.0
        )
        x = torch.from_numpy(arr).permute(2, 0, 1)[None].to(vae.device, torch.float32)
        with torch.no_grad():
            dist = vae.encode(x).latent_dist
        mean, std = dist.mean[0].float().cpu(), dist.std[0].float().cpu()
        if config.cache:
            folder.mkdir(parents=True, exist_ok=True)
            _st.write_safetensors(
                path,
                {
                    "mean": ("F32", tuple(mean.shape), mean.numpy().tobytes()),
                    "std": ("F32", tuple(std.shape), std.numpy().tobytes()),
                },
                {"vae": vid},
            )
            _prune(folder, CACHE_LIMIT_BYTES)
        means.append(mean)
        stds.append(std)
    return torch.stack(means), torch.stack(stds)
