"""The one image loader, used by preprocessing, training and prediction.

Imports neither TensorFlow nor matplotlib, so ``data_preprocess.py`` starts fast.

``load_image(path, policy)`` returns an ``(H, W, 3)`` uint8 RGB array at the network's input
size: EXIF orientation applied, any mode converted to 8-bit RGB, then resized by the policy's
rule (stretch, centre-crop or pad) with the policy's interpolation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .errors import ImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
RESIZE_MODES = ("stretch", "crop", "pad")
_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class ImagePolicy:
    """How every image reaches the network: target ``(height, width)``, resize rule, filter."""

    size: tuple[int, int]
    resize: str = "stretch"
    interpolation: str = "bilinear"

    def __post_init__(self):
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {tuple(_RESAMPLE)}, got {self.interpolation!r}")

    def to_dict(self) -> dict:
        return {"size": list(self.size), "resize": self.resize, "interpolation": self.interpolation}


def resolve_policy(cfg, model_info: dict) -> ImagePolicy:
    """The one rule for the image policy: size from the model, resize from the config,
    interpolation from the config, else the model file's, else bilinear."""
    interpolation = cfg.images.interpolation or (model_info.get("interpolation") or "bilinear")
    if interpolation not in _RESAMPLE:  # e.g. a model file naming something Pillow lacks
        interpolation = "bilinear"
    height, width = model_info["input_size"][:2]
    return ImagePolicy((int(height), int(width)), cfg.images.resize, interpolation)


def is_image_file(path: str | os.PathLike) -> bool:
    name = os.path.basename(path)
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def load_image(path: str | os.PathLike, policy: ImagePolicy | None = None) -> np.ndarray:
    """Decode ``path`` to uint8 RGB; resize to ``policy.size`` when a policy is given.

    Raises ``ImageError`` (one line, naming the file) for anything unreadable.
    """
    try:
        with Image.open(path) as img:
            if policy is not None and img.format == "JPEG":
                # Decode large JPEGs at reduced size (a power-of-two DCT scale, never below target).
                img.draft("RGB", _draft_size(img.size, policy))
            img = ImageOps.exif_transpose(img)
            img = to_rgb(img)
            if policy is not None:
                img = resize(img, policy)
            return np.asarray(img, dtype=np.uint8)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found") from None
    except Exception as exc:  # Pillow raises many types for broken files
        raise ImageError(f"{path}: cannot decode image ({type(exc).__name__}: {exc})") from None


def _draft_size(size: tuple[int, int], policy: ImagePolicy) -> tuple[int, int]:
    h, w = policy.size
    if policy.resize == "stretch":
        return (w, h)
    # crop keeps the shorter side at the target; pad the longer one: ask for enough pixels
    sw, sh = size
    scale = max(w / sw, h / sh) if policy.resize == "crop" else min(w / sw, h / sh)
    return (max(1, int(sw * scale)), max(1, int(sh * scale)))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB (transparency composited on black)."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(np.round(arr * (255.0 / peak)), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def resize(img: Image.Image, policy: ImagePolicy) -> Image.Image:
    h, w = policy.size
    resample = _RESAMPLE[policy.interpolation]
    if img.size == (w, h):
        return img
    if policy.resize == "stretch":
        return img.resize((w, h), resample)
    if policy.resize == "crop":
        return ImageOps.fit(img, (w, h), method=resample, centering=(0.5, 0.5))
    return ImageOps.pad(img, (w, h), method=resample, color=(0, 0, 0), centering=(0.5, 0.5))


def find_images(folder: str | os.PathLike) -> list[Path]:
    """Image files below ``folder``, recursively, sorted, hidden files and folders skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / name for name in filenames if is_image_file(name))
    return sorted(found)
