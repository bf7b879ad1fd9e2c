"""Whole photos composed from the shared UTKFace crops (tests/test_faces.py,
tests/test_faces_preprocess.py, bench/bench_faces_training.py).

Faces are pasted at known places and scales on face-free backgrounds (scikit-image's sample
photos and noise); the crops stay in ../shared/data/faces and are never copied into the project.
"""

from __future__ import annotations

import math
import random
import numpy as np
from PIL import Image, ImageFilter

from conftest import FACES

have_faces = (FACES / "male").is_dir() and (FACES / "female").is_dir()


def iou(a, b) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    iw = max(0.0, min(ax + aw, bx + bw) - max(ax, bx))
    ih = max(0.0, min(ay + ah, by + bh) - max(ay, by))
    inter = iw * ih
    return inter / (aw * ah + bw * bh - inter)


def backgrounds():
    """Face-free photos: scikit-image's samples (no people) and noise, seeded."""
    import skimage.data as skdata  # a test requirement (requirements-test.txt): a broken install fails
    names = ["coffee", "chelsea", "rocket", "coins", "moon", "page", "horse", "hubble_deep_field",
             "grass", "gravel", "brick", "text", "retina", "immunohistochemistry", "logo", "cell",
             "colorwheel", "clock", "microaneurysms"]
    out = []
    for name in names:
        arr = np.asarray(getattr(skdata, name)())
        if arr.dtype != np.uint8:
            arr = (arr.astype(np.float64) / max(1, arr.max()) * 255).astype(np.uint8)
        img = Image.fromarray(arr)
        out.append((name, img.convert("RGB")))
    rng = np.random.default_rng(0)
    for i, (name, img) in enumerate(list(out)):  # other views: a random crop, rescaled, mirrored
        cw, ch = (int(v * rng.uniform(0.5, 0.8)) for v in img.size)
        x, y = int(rng.integers(0, img.width - cw + 1)), int(rng.integers(0, img.height - ch + 1))
        view = img.crop((x, y, x + cw, y + ch))
        scale = rng.uniform(600, 1024) / max(cw, ch)
        view = view.resize((round(cw * scale), round(ch * scale)), Image.Resampling.BICUBIC)
        out.append((f"{name}_view", view.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if i % 2 else view))
    for i in range(10):
        h, w = int(rng.integers(400, 900)), int(rng.integers(500, 1200))
        if i % 2:
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        else:  # smooth coloured noise, closer to a photo's statistics
            arr = rng.normal(128, 60, (h // 16 + 1, w // 16 + 1, 3)).clip(0, 255).astype(np.uint8)
            arr = np.asarray(Image.fromarray(arr).resize((w, h), Image.Resampling.BICUBIC))
        out.append((f"noise{i}", Image.fromarray(arr)))
    return out


def compose(backgrounds, face_files, n_photos, seed=0):
    """Photos with 1-6 pasted faces (24-400 px, some blurred, some rotated up to 20 degrees).

    Returns ``[(photo, [(square (x, y, s, s), face file, blurred, angle), ...]), ...]``.
    """
    rng = random.Random(seed)
    files = list(face_files)
    rng.shuffle(files)
    photos = []
    for k in range(n_photos):
        _, bg = backgrounds[k % len(backgrounds)]
        n = 1 + k % 6
        longest = rng.choice([800, 1000, 1200])
        w, h = longest, int(longest * 0.75)
        canvas = bg.resize((w, h), Image.Resampling.BILINEAR)
        if k % 2:
            canvas = canvas.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        placed = []
        tries = 0
        while len(placed) < n and tries < 500 and files:
            tries += 1
            hi = 400 if n <= 2 else 220
            s = int(round(math.exp(rng.uniform(math.log(24), math.log(hi)))))
            x, y = rng.randint(0, w - s), rng.randint(0, h - s)
            if any(not (x + s + 8 < px or px + ps + 8 < x or y + s + 8 < py or py + ps + 8 < y)
                   for (px, py, ps, _), *_ in placed):
                continue
            path = files.pop()
            face = Image.open(path).convert("RGB").resize((s, s), Image.Resampling.BICUBIC)
            blurred = rng.random() < 0.25
            if blurred:
                face = face.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5) * s / 100))
            angle = rng.uniform(-20, 20) if rng.random() < 0.4 else 0.0
            mask = Image.new("L", (s, s), 255)
            if angle:
                face = face.rotate(angle, resample=Image.Resampling.BICUBIC)
                mask = mask.rotate(angle, resample=Image.Resampling.BICUBIC)
            canvas.paste(face, (x, y), mask)
            placed.append(((x, y, s, s), path, blurred, angle))
        photos.append((canvas, placed))
    return photos


def face_files(n, seed=1):
    rng = random.Random(seed)
    files = sorted((FACES / "male").glob("*.jpg")) + sorted((FACES / "female").glob("*.jpg"))
    return rng.sample(files, n)


def match(square, found, margin):
    """The detection whose crop square best overlaps the pasted square, and that IoU."""
    best, best_iou = None, 0.0
    for f in found:
        cx, cy, side = f.square(margin)
        overlap = iou((cx - side / 2, cy - side / 2, side, side), square)
        if overlap > best_iou:
            best, best_iou = f, overlap
    return best, best_iou


def gender(path) -> int:
    """UTKFace names are AGE_GENDER_RACE_...: 0 male, 1 female."""
    return int(path.name.split("_")[1])


def photo_with_face(face_path, background: Image.Image, size=(240, 180), side=None, rng=None):
    """A small photo: ``background`` resized to ``size`` with the face pasted unaltered (a square
    of ``side`` px, by default 40-60% of the height) at a random place. Returns ``(photo, square)``."""
    rng = rng or random.Random(0)
    w, h = size
    side = side or rng.randint(int(0.4 * h), int(0.6 * h))
    x, y = rng.randint(0, w - side), rng.randint(0, h - side)
    canvas = background.convert("RGB").resize((w, h), Image.Resampling.BILINEAR)
    canvas.paste(Image.open(face_path).convert("RGB").resize((side, side), Image.Resampling.BICUBIC), (x, y))
    return canvas, (x, y, side, side)
