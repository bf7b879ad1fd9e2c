"""Benchmark face detection + classification per image against classification alone.

Two settings, each timed as the median of >= 3 interleaved runs after a warm-up:

  photos  12-megapixel (4000x3000) JPEG photos, one face each (the astronaut of tests/data,
          pasted at ~700 px on smooth noise)
  crops   200x200 JPEG face crops (the size of UTKFace's), cut from the same photograph

"ours" is what prediction on whole photos will run per file: `faces.faces_in_file` (full
decode, EXIF orientation, MTCNN on a copy downscaled to `faces.detect_size`), `crop_face` for
every face from the full-resolution image, resize to the input size, the classifier. "alone" is
the classifier on the file through the project's loader (`images.load_image`, which decodes a
large JPEG at reduced size), as predict.py does without detection. Both run one image at a
time (batch 1), so the figures are per-image costs; the detector's share is the time inside
`detect_faces` over ours.

The classifier is VGG-Face's structure up to relu7 (He-scaled random weights, converted) + a
512-unit head trained for one epoch on generated images by the pipeline's stage functions
(`bench_predict.build_classifier`), loaded with `Classifier.load`: the cost is the real one's.

    python bench/bench_faces.py           # 6 photos, 24 crops, full-width VGG-Face
    python bench/bench_faces.py --quick   # 2 photos, 4 crops, width 1/4 (smoke test)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from vggface_gender import faces, images  # noqa: E402

ASTRONAUT = ROOT / "tests" / "data" / "astronaut.jpg"


def make_inputs(folder: Path, n_photos: int, n_crops: int, seed: int = 0) -> tuple[list[Path], list[Path]]:
    rng = np.random.default_rng(seed)
    astro = Image.open(ASTRONAUT).convert("RGB")
    photos, crops = [], []
    for i in range(n_photos):
        small = rng.normal(128, 50, (48, 64, 3)).clip(0, 255).astype(np.uint8)
        canvas = Image.fromarray(small).resize((4000, 3000), Image.Resampling.BICUBIC)
        arr = np.asarray(canvas, dtype=np.int16) + rng.integers(-6, 7, (3000, 4000, 1), dtype=np.int16)
        canvas = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
        side = 1400 + 40 * i
        canvas.paste(astro.resize((side, side), Image.Resampling.BICUBIC),
                     (int(rng.integers(0, 4000 - side)), int(rng.integers(0, 3000 - side))))
        path = folder / f"photo_{i}.jpg"
        canvas.save(path, quality=90)
        photos.append(path)
    for i in range(n_crops):  # the face region of the astronaut, jittered
        dx, dy = (int(v) for v in rng.integers(-12, 13, 2))
        crop = astro.crop((150 + dx, 50 + dy, 280 + dx, 180 + dy)).resize((200, 200), Image.Resampling.BICUBIC)
        if i % 2:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        path = folder / f"crop_{i}.jpg"
        crop.save(path, quality=90)
        crops.append(path)
    return photos, crops


def run_ours(model, paths, policy, img_policy, detect_time: list) -> int:
    n_faces = 0
    for p in paths:
        image = images.open_rgb(p)
        t = time.perf_counter()
        found = faces.detect_faces(image, policy)
        detect_time[0] += time.perf_counter() - t
        if not found:
            continue
        n_faces += len(found)
        x = np.stack([np.asarray(images.resize(faces.crop_face(image, f, policy), img_policy), np.float32)
                      for f in found])
        model.predict_on_batch(x)
    return n_faces


def run_alone(model, paths, img_policy) -> None:
    for p in paths:
        model.predict_on_batch(images.load_image(p, img_policy).astype(np.float32)[None])


def bench(label, model, paths, policy, img_policy, runs) -> None:
    from bench_predict import interleaved

    detect_time, found = [0.0], [0]
    run_ours(model, paths[:1], policy, img_policy, detect_time)  # warm-up (builds the detector)
    run_alone(model, paths[:1], img_policy)
    shares = []

    def ours():
        detect_time[0] = 0.0
        start = time.perf_counter()
        found[0] = run_ours(model, paths, policy, img_policy, detect_time)
        shares.append(detect_time[0] / (time.perf_counter() - start))

    wall, _cpu = interleaved(runs, ours=ours, alone=lambda: run_alone(model, paths, img_policy))
    n = len(paths)
    o, a = n / statistics.median(wall["ours"]), n / statistics.median(wall["alone"])
    print(f"BENCH faces | {label}: detection + classification vs classification alone, img/s "
          f"({n} images, {found[0]} faces found) | {o:.2f} | {a:.2f} | {o / a:.2f} | (info)", flush=True)
    print(f"BENCH faces | {label}: detector's share of detection + classification time | "
          f"{statistics.median(shares):.2f} | | | (info)", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few images, a small model (smoke test)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per side (median)")
    parser.add_argument("--width", type=float, default=None, help="VGG-Face width (default 1; --quick 0.25)")
    args = parser.parse_args(argv)
    n_photos, n_crops = (2, 4) if args.quick else (6, 24)
    width = args.width or (0.25 if args.quick else 1.0)

    from bench_predict import build_classifier

    from vggface_gender import Classifier

    with tempfile.TemporaryDirectory(prefix="bench_faces_") as tmp:
        tmp = Path(tmp)
        photos, crops = make_inputs(tmp, n_photos, n_crops)
        build_classifier(tmp / "work", width)
        classifier = Classifier.load(tmp / "work")
        model, img_policy = classifier.model, classifier.policy
        policy = faces.FacePolicy(detect="mtcnn")
        bench("12-MP photos", model, photos, policy, img_policy, args.runs)
        bench("200x200 crops", model, crops, policy, img_policy, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
