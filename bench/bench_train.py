"""Benchmark `train.py` against one bare extraction pass and against the naive `model.fit`.

Setting: a MatConvNet file with VGG-Face's exact structure at reduced width (default 1/2, 224x224
input, He-scaled random weights), converted by `model_conversion.py`; a few hundred generated
250x250 JPEGs (80% train, 20% validation). Three timed sides, interleaved, median of >= 3 runs
after a warm-up (train.py and (a) once each; they also fill the page cache for (b)):

  train.py  the whole process, `python train.py --no-early-stopping` for E epochs (default 10),
            with the feature cache removed before each run: start-up, imports, model load,
            checksums, one extraction pass, E epochs of head training, saving and plots.
  (a)       one bare extraction pass: `model.predict` of the base up to relu7 over a `tf.data`
            pipeline of the same images (the project's loader), in-process, timed after imports
            and model load: the least any cached approach must spend.
  (b)       the naive way: `model.fit` of the frozen base + the same head for E epochs with
            validation, the images decoded and run through the base every epoch; timed after
            imports and model load.

Targets: train.py <= 1.2 x (a) + 10 s, and (b) / train.py >= 5 at 10 epochs. A train.py run
that reuses its cache is also timed (information). (a) and (b) get the same tf.data options as
train.py (`tf_images.pipeline_options`: autotuning off), without which TensorFlow's iterator
teardown waits for the autotuner's next wake-up and adds up to ~10 s per pass to them.

    python bench/bench_train.py            # width 1/2, 300 images, 10 epochs, 3 runs (~20 min)
    python bench/bench_train.py --quick    # small version, to check that it runs
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}


# --------------------------------------------------------------------------- set-up
def prepare(tmp: Path, n_images: int, width: float, input_size: int, epochs: int) -> Path:
    """Model file, converted base, images, manifests and config under ``tmp``; returns the config."""
    from vggface_gender import synthetic

    data, work = tmp / "data", tmp / "work"
    mat = synthetic.write_vggface_mat(tmp / "vgg_face_bench.mat", width=width, n_classes=10,
                                      input_size=input_size, seed=0)
    synthetic.write_image_folders(data, (n_images + 1) // 2, size=250, seed=0)
    rows = {"train": [], "val": []}
    for label in ("female", "male"):
        files = sorted((data / label).iterdir())[: n_images // 2]
        cut = len(files) // 5
        for split, chosen in (("val", files[:cut]), ("train", files[cut:])):
            rows[split] += [(f.relative_to(data).as_posix(), label, hashlib.sha256(f.read_bytes()).hexdigest())
                            for f in chosen]
    (work / "splits").mkdir(parents=True)
    for split, split_rows in rows.items():
        with open(work / "splits" / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(("path", "label", "sha256"))
            writer.writerows(split_rows)
    from vggface_gender.workdir import WorkDir, commit_set  # train.py reads only a committed set
    commit_set(WorkDir(work).splits_record, sorted((work / "splits").glob("*.csv")), "data_preprocess.py")
    config = tmp / "config.yaml"
    config.write_text(f"work_dir: {work}\nmodel:\n  mat_path: {mat}\ndata:\n  root: {data}\n"
                      f"train:\n  max_epochs: {epochs}\n", encoding="utf-8")
    subprocess.run([sys.executable, str(ROOT / "model_conversion.py"), "--config", str(config)],
                   check=True, env=ENV, stdout=subprocess.DEVNULL)
    return config


# --------------------------------------------------------------------------- the baselines (children)
def _load(config: str):
    from vggface_gender import training
    from vggface_gender.config import load_config
    from vggface_gender.images import resolve_policy
    from vggface_gender.workdir import WorkDir

    cfg = load_config(config)
    work = WorkDir(cfg.work_dir)
    splits = [training.read_split(cfg, work, "train"), training.read_split(cfg, work, "val")]
    policy = resolve_policy(cfg, training.read_base_info(work))
    return cfg, work, splits, policy


def child_extract(config: str) -> dict:
    """(a): one `model.predict` pass of the base up to relu7 over every train and val image."""
    import keras

    import vggface_gender.layers  # noqa: F401
    from vggface_gender.tf_images import image_dataset, pipeline_options

    cfg, work, splits, policy = _load(config)
    base = keras.saving.load_model(work.base_model, compile=False)
    model = keras.Model(base.inputs, base.get_layer(cfg.model.embedding_layer).output)
    paths = [p for s in splits for p in s.paths]
    start = time.perf_counter()
    dataset = image_dataset(paths, policy, cfg.train.batch_size).map(lambda images, errors: images)
    features = model.predict(dataset.with_options(pipeline_options()), verbose=0)
    seconds = time.perf_counter() - start
    assert len(features) == len(paths)
    return {"seconds": seconds, "images": len(paths)}


def child_naive(config: str) -> dict:
    """(b): `model.fit` of the frozen base + the head, through every image every epoch."""
    import keras
    import numpy as np

    import vggface_gender.layers  # noqa: F401
    from vggface_gender import features, tf_images, training
    from vggface_gender.tf_images import image_dataset

    cfg, work, (train, val), policy = _load(config)
    base = keras.saving.load_model(work.base_model, compile=False)
    cut = features.cut_base(base, cfg.model.embedding_layer)
    head = training.build_head(cfg.train.hidden_units, cfg.train.dropout, 2, cfg.seed, flatten=False)
    images = keras.Input(cut.input_shape)
    model = keras.Model(images, features.apply_layers(images, cut.frozen + head))
    model.compile(optimizer=keras.optimizers.Adam(cfg.train.learning_rate),
                  loss="categorical_crossentropy", metrics=["accuracy"])

    def dataset(split):
        labels = np.eye(2, dtype=np.float32)[split.labels]
        ds = image_dataset(split.paths, policy, cfg.train.batch_size, labels).map(lambda x, y, e: (x, y))
        return ds.with_options(tf_images.pipeline_options())

    start = time.perf_counter()
    model.fit(dataset(train).shuffle(64, seed=0), validation_data=dataset(val),
              epochs=cfg.train.max_epochs, verbose=0)
    return {"seconds": time.perf_counter() - start}


def run_child(kind: str, config: Path) -> float:
    out = subprocess.run([sys.executable, __file__, "--child", kind, "--config", str(config)],
                         env=ENV, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"the {kind} run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def run_train(config: Path, keep_cache: bool = False) -> float:
    work = Path(load_work(config))
    if not keep_cache:
        shutil.rmtree(work / "features", ignore_errors=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(config), "--no-early-stopping"],
                   check=True, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    summary = json.loads((work / "reports" / "train_summary.json").read_text())
    assert summary["cache"]["status"] == ("reused" if keep_cache else "built"), summary["cache"]
    return seconds


def load_work(config: Path) -> str:
    from vggface_gender.config import load_config

    return str(load_config(config).work_dir)


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small model, few images, one run")
    parser.add_argument("--runs", type=int, default=None, help="timed runs per side (default 3)")
    parser.add_argument("--images", type=int, default=None, help="number of images (default 300)")
    parser.add_argument("--width", type=float, default=None, help="width of VGG-Face (default 1/2)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--child", choices=("extract", "naive"), help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        result = child_extract(args.config) if args.child == "extract" else child_naive(args.config)
        print(json.dumps(result), flush=True)
        return 0

    runs = args.runs or (1 if args.quick else 3)
    n_images = args.images or (64 if args.quick else 300)
    width = args.width or (1 / 16 if args.quick else 1 / 2)
    input_size = 96 if args.quick else 224
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        start = time.monotonic()
        config = prepare(Path(tmp), n_images, width, input_size, args.epochs)
        print(f"# VGG-Face structure at width {width:g}, {input_size}x{input_size} input; {n_images} images "
              f"(250x250 JPEG, 80/20 train/val); {args.epochs} epochs; set up in {time.monotonic() - start:.0f} s",
              flush=True)
        run_train(config), run_child("extract", config)  # warm-up
        sides = {"train": lambda: run_train(config), "extract": lambda: run_child("extract", config),
                 "naive": lambda: run_child("naive", config)}
        times = {name: [] for name in sides}
        names = list(sides)
        for r in range(runs):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                times[name].append(sides[name]())
            print(f"# run {r + 1}: " + ", ".join(f"{n} {times[n][-1]:.1f} s" for n in names), flush=True)
        warm = run_train(config, keep_cache=True)
        summary = json.loads((Path(load_work(config)) / "reports" / "train_summary.json").read_text())

    t, a, b = (statistics.median(times[n]) for n in ("train", "extract", "naive"))
    if args.quick:  # start-up dominates a tiny model: the targets say nothing here
        print("# --quick: a smoke test; the targets apply to the full-size run", flush=True)
    print(f"# medians: train.py {t:.1f} s, (a) bare extraction {a:.1f} s, (b) naive fit {b:.1f} s; "
          f"train.py with its cache reused {warm:.1f} s (head training {summary['train_seconds']:.1f} s)", flush=True)
    print(f"BENCH train | train.py whole process s ({n_images} images, {args.epochs} epochs) vs (a) bare "
          f"extraction | {t:.1f} | {a:.1f} | {t / a:.2f} | <= 1.2 x (a) + 10 s = {1.2 * a + 10:.1f} s "
          f"({'met' if t <= 1.2 * a + 10 else 'NOT met'})", flush=True)
    print(f"BENCH train | train.py whole process s vs (b) naive model.fit s, {args.epochs} epochs (speed-up) | "
          f"{t:.1f} | {b:.1f} | {b / t:.2f} | >= 5 ({'met' if b / t >= 5 else 'NOT met'})", flush=True)
    print(f"BENCH train | train.py whole process s, cache reused | {warm:.1f} | {a:.1f} | {warm / a:.2f} | info",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
