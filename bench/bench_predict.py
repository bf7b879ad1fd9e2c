"""Benchmark `predict.py --images` against a bare predict on pre-decoded images.

Two settings, each timed as the median of >= 3 interleaved runs after a warm-up:

  faces   the full-width VGG-Face structure (fc7 + a 512-unit head) on 200x200 JPEG face crops
  photos  a reduced-width VGG-Face on 12-megapixel (4000x3000) JPEG photos, where decoding would
          dominate if the loader did not decode large JPEGs at reduced size (Pillow's draft)

"ours" is `evaluation.classify` (what `predict.py --images FOLDER --out FILE` runs once the model
is loaded): folder scan, parallel decode + resize through the project's one loader, prediction
batch by batch, CSV written. The baseline ("bare") is the model on the same images already
decoded into one in-memory float32 array, batch by batch (`predict_on_batch`): pure compute.
Figures are throughputs (images/s); the target is ours >= 0.9 x bare. `model.predict` on the
array is timed too, as information: it wraps the array in a tf.data pipeline whose iterator
teardown sometimes waits for tf.data's autotuner (seconds), which makes it an unsteady baseline.

Without an accelerator, decoding and the model share the CPU: when the bare predict keeps every
core busy, even a perfect overlap is bounded by (bare CPU time) / (ours CPU time), printed for
each setting. `--model-threads 1` confines the model's kernels to one core (TensorFlow's
intra-op threads), leaving the other cores to decoding, as when an accelerator does the
compute: it shows whether decoding overlaps with compute.

The classifier is made by the pipeline's own stage functions (`build_classifier`): a MatConvNet
file with VGG-Face's layer structure and He-scaled random weights, converted to `base.keras`, a
512-unit head trained for one epoch on a few generated images (the head-only `classifier.keras` +
`classifier.json` that train.py writes), loaded back with `evaluation.load_classifier`
(`Classifier.load`: base and head composed, in the precision training used).
Generated images live in a temporary folder (12-MP photos are cached in
$TMPDIR/vggface_bench_predict between runs).

    python bench/bench_predict.py                      # faces: 96 images, photos: 128 (~10 minutes)
    python bench/bench_predict.py --only photos --model-threads 1
    python bench/bench_predict.py --quick              # small versions, to check that it runs
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from vggface_gender import images, synthetic  # noqa: E402
from vggface_gender.config import load_config  # noqa: E402
from vggface_gender.workdir import WorkDir  # noqa: E402

PHOTO_CACHE = Path(tempfile.gettempdir()) / "vggface_bench_predict"


# --------------------------------------------------------------------------- inputs
def face_crops(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` distinct 200x200 JPEGs (two generated classes; the size of UTKFace's crops)."""
    synthetic.write_image_folders(folder, (n + 1) // 2, size=200, seed=seed)
    return images.find_images(folder)[:n]


def photos_12mp(n: int, seed: int = 0) -> Path:
    """``n`` distinct 4000x3000 JPEGs, photo-like (smooth content + sensor-like noise, ~3 MB)."""
    from PIL import Image

    folder = PHOTO_CACHE / f"photos_{n}_{seed}"
    marker = folder / ".complete"
    if marker.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    noise = rng.integers(-6, 7, (3000 + 64, 4000 + 64, 1), dtype=np.int16)
    start = time.monotonic()
    for i in range(n):
        base = Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).resize((4000, 3000),
                                                                                        Image.BICUBIC)
        dy, dx = rng.integers(0, 64, 2)
        pixels = np.asarray(base, np.int16) + noise[dy:dy + 3000, dx:dx + 4000]
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"photo_{i:04d}.jpg", quality=90)
    marker.write_text("complete\n")
    print(f"# wrote {n} 12-MP photos to {folder} in {time.monotonic() - start:.0f} s", flush=True)
    return folder


# --------------------------------------------------------------------------- the classifier
def build_classifier(work: Path, width: float, input_size: int = 224, seed: int = 0, *, n_classes: int = 16,
                     per_class: int = 4, epochs: int = 1, config: str | os.PathLike | None = None) -> Path:
    """A trained classifier in ``work`` as the pipeline makes it; returns the images' folder.

    A MatConvNet file with VGG-Face's structure (``synthetic.write_vggface_mat``, He-scaled random
    weights, ``width`` x the real channel counts; fc8 cut to ``n_classes``, since only relu7 runs
    unless the base's size matters) is converted, ``per_class`` generated images per class are
    split and the head is trained for ``epochs``, each by its stage function (``stages``): the
    files are exactly what model_conversion.py and train.py write (``base.keras`` + a head-only
    ``classifier.keras``), and ``Classifier.load(work)`` composes them. The head's weights hardly
    matter here: the cost of a prediction is the network's.
    """
    from vggface_gender import stages

    data = work.with_name(work.name + "_images")
    mat = synthetic.write_vggface_mat(work.with_name(work.name + ".mat"), width=width, n_classes=n_classes,
                                      input_size=input_size, seed=seed)
    # the stages' reports (and Keras' epoch lines) are not the bench's output: stdout is for results
    with contextlib.redirect_stdout(sys.stderr):
        stages.convert(mat, work, config=config)
        mat.unlink()  # up to ~0.6 GB at full size: not needed once converted
        # one spare image per class: the data stage draws a test image per class first
        synthetic.write_image_folders(data, per_class + 1, size=200, seed=seed)
        stages.make_splits(data, work, sample_per_class=per_class, test_per_class=1, dedup="exact",
                           seed=seed, config=config, quiet=True)
        stages.train(work, data_root=data, max_epochs=epochs, seed=seed, config=config)
    return data


# --------------------------------------------------------------------------- timing
def interleaved(runs: int, **timed) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Run each callable once per round, alternating which goes first.

    Returns wall-clock and CPU seconds (this process, all threads) per run. CPU time is
    reported beside the wall time because it hardly moves when other jobs share the machine.
    """
    wall = {name: [] for name in timed}
    cpu = {name: [] for name in timed}
    names = list(timed)
    for r in range(runs):
        for name in (names if r % 2 == 0 else names[::-1]):
            start, start_cpu = time.perf_counter(), time.process_time()
            timed[name]()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu


def bench_setting(label: str, folder: Path, width: float, tmp: Path, runs: int, whole_process: bool,
                  model_threads: int | None = None) -> None:
    from vggface_gender import evaluation

    if model_threads:
        label = f"{label}, model on {model_threads} core{'s' if model_threads > 1 else ''}"
    work = tmp / f"work_{label}"
    start = time.monotonic()
    build_classifier(work, width)
    config = tmp / f"config_{label}.yaml"
    config.write_text(f"work_dir: {work}\nevaluate:\n  batch_size: 32\n")
    cfg = load_config(config)
    classifier = evaluation.load_classifier(WorkDir(work))
    files, _ = evaluation.expand_inputs([folder])
    n = len(files)
    decoded = np.stack([images.load_image(f, classifier.policy) for f in files]).astype(np.float32)
    print(f"# {label}: width {width:g}, {n} images, model {classifier.model.count_params() / 1e6:.1f} M "
          f"parameters, set up in {time.monotonic() - start:.0f} s", flush=True)
    out = tmp / f"{label}.csv"

    def ours():
        evaluation.classify(cfg, [folder], out, stderr=io.StringIO(), classifier=classifier)

    def bare():
        for i in range(0, n, 32):
            classifier.model.predict_on_batch(decoded[i:i + 32])

    def keras_predict():
        classifier.model.predict(decoded, batch_size=32, verbose=0)

    ours(), bare(), keras_predict()  # warm-up: traces the predict functions, fills the page cache
    times, cpu = interleaved(runs, ours=ours, bare=bare, keras_predict=keras_predict)
    ours_rate, bare_rate = n / statistics.median(times["ours"]), n / statistics.median(times["bare"])
    print(f"# {label}: wall s: ours {[round(t, 2) for t in times['ours']]}, bare "
          f"{[round(t, 2) for t in times['bare']]}; CPU s: ours {[round(t, 1) for t in cpu['ours']]}, "
          f"bare {[round(t, 1) for t in cpu['bare']]}", flush=True)
    # decoding alone (one thread), to show what the overlap hides
    start = time.perf_counter()
    for f in files[: min(n, 32)]:
        images.load_image(f, classifier.policy)
    decode_ms = (time.perf_counter() - start) / min(n, 32) * 1000
    print(f"# {label}: decode + resize {decode_ms:.1f} ms/image on one core; bare predict "
          f"{1000 / bare_rate:.1f} ms/image", flush=True)
    print(f"BENCH predict | --images {label} ({n} images, width {width:g}) img/s | {ours_rate:.2f} | "
          f"{bare_rate:.2f} | {ours_rate / bare_rate:.2f} | >= 0.9", flush=True)
    keras_rate = n / statistics.median(times["keras_predict"])
    print(f"# {label}: wall s: model.predict {[round(t, 2) for t in times['keras_predict']]}", flush=True)
    print(f"BENCH predict | --images {label} img/s vs model.predict on the array | {ours_rate:.2f} | "
          f"{keras_rate:.2f} | {ours_rate / keras_rate:.2f} | info", flush=True)
    ours_cpu, bare_cpu = statistics.median(cpu["ours"]), statistics.median(cpu["bare"])
    # Without an accelerator, decoding and the model share the CPU cores: when the bare predict
    # already keeps every core busy, even a perfect overlap cannot beat bare CPU / ours CPU.
    busy = statistics.median(c / w for c, w in zip(cpu["bare"], times["bare"]))
    print(f"# {label}: CPU per image: ours {ours_cpu / n * 1000:.0f} ms, bare {bare_cpu / n * 1000:.0f} ms; "
          f"the bare predict keeps {busy:.1f} of {os.cpu_count()} cores busy; if it kept them all busy, "
          f"ours would be bounded by {bare_cpu / ours_cpu:.2f} x bare", flush=True)
    print(f"BENCH predict | --images {label} CPU s per image (median) | {ours_cpu / n:.3f} | "
          f"{bare_cpu / n:.3f} | {ours_cpu / bare_cpu:.2f} | info", flush=True)

    if whole_process:
        # the whole `predict.py --images` process once: start-up and model load included (info only)
        start = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "predict.py"), "--config", str(config), "--images",
                        str(folder), "--out", str(tmp / f"{label}_process.csv")], check=True,
                       stderr=subprocess.DEVNULL, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        wall = time.perf_counter() - start
        print(f"BENCH predict | predict.py --images {label} whole process (1 run) s | {wall:.1f} | "
              f"{n / bare_rate:.1f} | {wall / (n / bare_rate):.2f} | info", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small models and few images (smoke test)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per side (median)")
    parser.add_argument("--faces", type=int, default=None, help="number of 200x200 crops (default 96)")
    parser.add_argument("--photos", type=int, default=None, help="number of 12-MP photos (default 128)")
    parser.add_argument("--photo-width", type=float, default=0.5, help="width of the photos model")
    parser.add_argument("--only", choices=("faces", "photos"), default=None)
    parser.add_argument("--model-threads", type=int, default=None,
                        help="confine the model's kernels to this many cores (TensorFlow intra-op threads)")
    args = parser.parse_args(argv)
    if args.model_threads:
        import tensorflow as tf  # must be set before TensorFlow runs anything

        tf.config.threading.set_intra_op_parallelism_threads(args.model_threads)

    faces = args.faces or (16 if args.quick else 96)
    photos = args.photos or (16 if args.quick else 128)
    face_width = 0.25 if args.quick else 1.0
    photo_width = 0.125 if args.quick else args.photo_width
    with tempfile.TemporaryDirectory(prefix="bench_predict_") as tmp:
        tmp = Path(tmp)
        if args.only in (None, "faces"):
            bench_setting("faces", tmp / "faces" if face_crops(tmp / "faces", faces) else None,
                          face_width, tmp, args.runs, whole_process=not args.quick and not args.model_threads,
                          model_threads=args.model_threads)
        if args.only in (None, "photos"):
            bench_setting("photos", photos_12mp(photos), photo_width, tmp, args.runs,
                          whole_process=not args.quick and not args.model_threads,
                          model_threads=args.model_threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
