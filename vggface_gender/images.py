"""The one image loader, used by preprocessing, training and prediction.

Imports neither TensorFlow nor matplotlib, so ``data_preprocess.py`` starts fast.

``load_image(path, policy)`` returns an ``(H, W, 3)`` uint8 RGB array at the network's input
size: EXIF orientation applied, any mode converted to 8-bit RGB, then resized by the policy's
rule (stretch, centre-crop or pad) with the policy's interpolation. Large JPEGs are decoded at
a reduced DCT scale first (Pillow's ``draft``), never below the size the resize needs.

Broken input is an ``ImageError`` whose message is one line, ``<path>: <what is wrong>``: an
empty file, a file that is not an image (or in a format we do not read), a truncated or
corrupt image. Truncated files are errors, never silently padded: this module relies on
Pillow's default ``ImageFile.LOAD_TRUNCATED_IMAGES = False`` and forces the full decode.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
# Register exactly the decoders DECODE_FORMATS names (Image.open(formats=...) needs them loaded).
from PIL import (BmpImagePlugin, GifImagePlugin, JpegImagePlugin, PngImagePlugin,  # noqa: F401
                 TiffImagePlugin, WebPImagePlugin)

from .errors import ImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
RESIZE_MODES = ("stretch", "crop", "pad")
_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
# Only the formats our extensions name. Anything else is "not an image" to us; this also keeps
# Pillow from handing, say, an EPS file named .jpg to an external program.
DECODE_FORMATS = ("JPEG", "PNG", "BMP", "DIB", "GIF", "WEBP", "TIFF")
_JPEG_FORMATS = ("JPEG", "MPO")  # the JPEG decoder opens cameras' multi-picture files as MPO

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")

# We convert palette transparency to RGBA ourselves; Pillow's advice to do so is noise here.
warnings.filterwarnings("ignore", message="Palette images with Transparency", category=UserWarning)


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
        if len(self.size) != 2 or not all(int(s) > 0 for s in self.size):
            raise ValueError(f"size must be (height, width) > 0, got {self.size!r}")

    def to_dict(self) -> dict:
        return {"size": list(self.size), "resize": self.resize, "interpolation": self.interpolation}


def resolve_policy(cfg, model_info: dict) -> ImagePolicy:
    """The one rule for the image policy: size from the model, resize from the config,
    interpolation from the config, else the model file's, else bilinear."""
    interpolation = cfg.images.interpolation or (model_info.get("interpolation") or "bilinear")
    interpolation = str(interpolation).lower()
    if interpolation not in _RESAMPLE:  # e.g. a model file naming something Pillow lacks
        interpolation = "bilinear"
    height, width = model_info["input_size"][:2]
    return ImagePolicy((int(height), int(width)), cfg.images.resize, interpolation)


def is_image_file(path: str | os.PathLike) -> bool:
    """True for a visible file whose name ends in one of ``IMAGE_EXTENSIONS`` (any case)."""
    name = os.path.basename(path)
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def load_image(path: str | os.PathLike, policy: ImagePolicy | None = None,
               sha256: str | None = None) -> np.ndarray:
    """Decode ``path`` to uint8 RGB ``(H, W, 3)``; resize to ``policy.size`` when a policy is given.

    With ``sha256`` (the hash a split manifest lists), the bytes decoded must have that hash.
    Raises ``ImageError`` (one line, naming the file) for anything unreadable or changed.
    """
    img = _open(path, policy, grey=False, sha256=sha256)
    try:
        if policy is not None:
            img = resize(img, policy)
        return np.asarray(img, dtype=np.uint8)
    except Exception as exc:  # pragma: no cover - resize of a decoded RGB image should not fail
        raise ImageError(f"{path}: cannot resize image ({_exc_text(exc)})") from None


def verify_image(path: str | os.PathLike) -> tuple[int, int]:
    """Decode ``path`` completely, as ``load_image`` would; return its upright ``(width, height)``.

    Raises ``ImageError`` exactly where ``load_image`` would.
    """
    return open_rgb(path).size


def open_rgb(path: str | os.PathLike, policy: ImagePolicy | None = None,
             sha256: str | None = None) -> Image.Image:
    """The decoded, upright, 8-bit RGB Pillow image, before resizing.

    With a policy, a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that still
    leaves at least the pixels the policy's resize needs. With ``sha256``, as ``load_image``.
    """
    return _open(path, policy, grey=False, sha256=sha256)


def open_grey(path: str | os.PathLike, policy: ImagePolicy | None = None) -> Image.Image:
    """``open_rgb`` then greyscale (``L``); a JPEG is decoded straight to grey (cheaper).

    Same errors as ``open_rgb``. For perceptual hashing (``grouping``), not for the network.
    """
    return _open(path, policy, grey=True)


def _open(path, policy: ImagePolicy | None, grey: bool, sha256: str | None = None) -> Image.Image:
    try:
        with open(path, "rb") as f:
            data = f.read()  # in memory: the bytes hashed are the bytes decoded
        if not data:
            raise ImageError(f"{path}: empty file")
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            raise ImageError(f"{path}: changed since the split was made; re-run `python data_preprocess.py`")
        try:
            img = Image.open(io.BytesIO(data), formats=DECODE_FORMATS)
        except UnidentifiedImageError:
            raise ImageError(f"{path}: not an image file "
                             f"(not JPEG, PNG, BMP, GIF, WebP or TIFF data)") from None
        orientation = _orientation(img)
        if policy is not None and img.format in _JPEG_FORMATS:
            img.draft("L" if grey else "RGB",
                      _draft_size(img.size, policy, swap=orientation in (5, 6, 7, 8)))
        # Image.open is lazy: load() decodes every byte now, so a truncated file raises
        # here (LOAD_TRUNCATED_IMAGES is False) instead of yielding grey padding.
        img.load()
        if orientation != 1:
            ImageOps.exif_transpose(img, in_place=True)
        if grey:
            return img if img.mode == "L" else to_rgb(img).convert("L")
        return to_rgb(img)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a folder, not an image file") from None
    except PermissionError:
        raise ImageError(f"{path}: cannot read (permission denied)") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{path}: image too large ({_exc_text(exc)})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Pillow reports broken data as OSError ("image file is truncated", "broken data
        # stream"), SyntaxError (bad headers) or ValueError/EOFError (bad sizes, short reads).
        text = _exc_text(exc)
        kind = "truncated image" if "truncated" in text.lower() else "corrupt image"
        raise ImageError(f"{path}: {kind} ({text})") from None
    except Exception as exc:  # any other decoder failure is still a broken file, not a crash
        raise ImageError(f"{path}: cannot decode image ({_exc_text(exc)})") from None


def _exc_text(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation (1 = upright). A damaged EXIF block is ignored: the pixels are fine."""
    try:
        value = img.getexif().get(ExifTags.Base.Orientation, 1)
        return int(value) if int(value) in range(1, 9) else 1
    except Exception:
        return 1


def _draft_size(size: tuple[int, int], policy: ImagePolicy, swap: bool = False) -> tuple[int, int]:
    """The smallest ``(width, height)`` of the stored image that the policy's resize needs.

    ``swap``: the image is stored rotated by 90 degrees (EXIF orientation 5-8), so the target's
    width applies to the stored height.
    """
    h, w = policy.size
    if swap:
        h, w = w, h
    if policy.resize == "stretch":
        return (w, h)
    # crop scales the image to cover the target, pad to fit inside it: keep that many pixels
    sw, sh = size
    scale = max(w / sw, h / sh) if policy.resize == "crop" else min(w / sw, h / sh)
    return (max(1, math.ceil(sw * scale)), max(1, math.ceil(sh * scale)))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB.

    Transparency (RGBA, LA, palette with a transparent index or per-entry alpha) is composited
    on black, the colour ``pad`` uses. 16-bit greyscale maps 0..65535 to 0..255 by its mode,
    never by the image's own range, so a dark 16-bit image stays dark.
    """
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in _SIXTEEN_BIT_MODES:
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8), "L")
    elif img.mode in ("I", "F"):
        # 32-bit integer or float greyscale has no fixed range: 16-bit files opened this way
        # (0..65535) are the common case; larger values clip.
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError as exc:
        raise ValueError(f"unsupported image mode {img.mode!r} ({exc})") from None


def resize(img: Image.Image, policy: ImagePolicy) -> Image.Image:
    """Bring an RGB image to ``policy.size``: stretch, centre-crop (cover) or pad (fit, black)."""
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

