"""Benchmark the size of the classifier files against base.keras (issue 10).

Target: with the default config and the full VGG-Face, ``classifier.keras`` + ``classifier.json``
(what train.py writes: the trained head alone, plus its description) are <= 5% of ``base.keras``.

Setting: a MatConvNet file with VGG-Face's exact structure at full size (``synthetic.
write_vggface_mat``: 39 layers, 2622 classes, He-scaled random weights; the sizes are those of the
real network, the weights are not a face model), converted by the conversion stage; a handful of
generated images split by the data stage; the head trained by the training stage (the stage
functions, through ``bench_predict.build_classifier``) with the
repository's ``config.yaml`` (``train.hidden_units``, ``model.embedding_layer``, ...), only the
data (counts, root) and the number of epochs overridden: neither changes what is saved. Then the
same again with ``train.trainable_from: fc7`` (the head then includes fc7: information, no target).

Sizes are file sizes, not timings: one run, no baseline timing. The extraction pass costs most of
the time (~5 images/s at full size in float32 on a 2-core CPU), so few images are used.

    python bench/bench_classifier_size.py              # full size, 8 + 8 images (~1 minute)
    python bench/bench_classifier_size.py --quick      # width 1/8 (smoke test; the target is for full size)
    python bench/bench_classifier_size.py --per-class 4 --no-trainable-from
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
# the repository's config.yaml: its defaults are what the target is stated for
CONFIG = ROOT / "config.yaml"

TARGET = 0.05  # classifier files / base.keras


def classifier_bytes(work: Path) -> tuple[int, int]:
    model = work / "model"
    return (model / "classifier.keras").stat().st_size, (model / "classifier.json").stat().st_size


def train_and_measure(label: str, work: Path, data: Path, base_bytes: int, epochs: int,
                      trainable_from: str | None, quick: bool) -> float:
    from vggface_gender import stages

    start = time.perf_counter()
    if trainable_from is not None:  # the default config's head is already trained by build_classifier
        with contextlib.redirect_stdout(sys.stderr):  # the stage's report is not the bench's output
            stages.train(work, data_root=data, max_epochs=epochs, trainable_from=trainable_from, config=CONFIG)
    keras_bytes, json_bytes = classifier_bytes(work)
    ratio = (keras_bytes + json_bytes) / base_bytes
    print(f"# {label}, trainable_from {trainable_from}: {time.perf_counter() - start:.0f} s; classifier.keras "
          f"{keras_bytes / 1e6:.2f} MB + classifier.json {json_bytes / 1e3:.1f} KB; base.keras "
          f"{base_bytes / 1e6:.1f} MB", flush=True)
    if trainable_from is None:
        met = "yes" if ratio <= TARGET else "**no**"
        target = f"<= {TARGET:.0%}" + (" (full size only)" if quick else "")
        print(f"BENCH classifier size | classifier.keras + classifier.json vs base.keras, MB, default "
              f"config ({label}) | {(keras_bytes + json_bytes) / 1e6:.2f} | {base_bytes / 1e6:.1f} | "
              f"{ratio:.2%} | {target} | {met if not quick else '—'}", flush=True)
    else:
        print(f"BENCH classifier size | same, train.trainable_from: {trainable_from} ({label}) | "
              f"{(keras_bytes + json_bytes) / 1e6:.2f} | {base_bytes / 1e6:.1f} | {ratio:.2%} | info | —",
              flush=True)
    return ratio


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="width 1/8, 4 + 4 images (smoke test)")
    parser.add_argument("--width", type=float, default=None, help="VGG-Face width (default 1 = full size)")
    parser.add_argument("--per-class", type=int, default=None, help="training images per class (default 8)")
    parser.add_argument("--epochs", type=int, default=2,
                        help="training epochs (the saved files' size does not depend on it)")
    parser.add_argument("--no-trainable-from", action="store_true", help="skip the trainable_from: fc7 run")
    args = parser.parse_args(argv)
    width = args.width or (1 / 8 if args.quick else 1.0)
    per_class = args.per_class or (4 if args.quick else 8)

    from bench_predict import build_classifier

    with tempfile.TemporaryDirectory(prefix="bench_classifier_size_") as tmp:
        work = Path(tmp) / "work"
        start = time.perf_counter()
        # all 2622 classes of fc8, as the real base.keras holds them; the repository's config.yaml
        data = build_classifier(work, width, n_classes=2622, per_class=per_class, epochs=args.epochs,
                                config=CONFIG)
        base_bytes = (work / "model" / "base.keras").stat().st_size
        label = f"width {width:g}, {per_class} + {per_class} images"
        print(f"# VGG-Face structure, {label}; written, converted and trained in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        train_and_measure(label, work, data, base_bytes, args.epochs, None, args.quick)
        if not args.no_trainable_from:
            train_and_measure(label, work, data, base_bytes, args.epochs, "fc7", args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
