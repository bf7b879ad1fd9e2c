"""Benchmark ``model.precision``: feature extraction in the precision ``auto`` picks vs float32.

Setting: a MatConvNet file with VGG-Face's exact structure (default full size, 224x224, He-scaled
random weights; fc8 cut to 16 classes since only relu7 runs), converted by ``conversion.convert``
as stage 2 does; the base cut at ``relu7`` and run as ``features.extract`` runs it (a
``tf.function`` of ``model(images, training=False)``) on batches of pre-decoded image-like
arrays, so only the network is timed. Two sides, interleaved, after one warm-up batch each;
median of ``--runs`` (>= 3) runs of ``--batches`` batches:

  auto      ``precision.with_precision(cut, resolve_precision("auto"))``
  float32   the cut as loaded

Prints the CPU's relevant flags (amx_bf16, amx_tile, avx512_bf16, amx_fp16), whether oneDNN is
on, the GPUs, what ``auto`` picked and why, the relu7 relative L2 difference between the two
sides, and whether the target applies: extraction >= 2.5x float32 on a CPU with AMX and oneDNN
(measured 3.2-3.4x on such a CPU); without AMX ``auto`` is float32 and the target does not apply.

``--protocol --images N`` (issue 13) times the whole four-stage protocol instead: the four scripts
as a user runs them, each a fresh process (``data_preprocess.py``, ``model_conversion.py``,
``train.py``, ``predict.py``; start-up, imports, checksums, reports and plots included), with
``model.precision: auto`` and the rest of the default config, on N images: N x 0.4 sampled per
class and N x 0.1 held out per class (N = 2500: 1000 + 1000 sampled, 250 + 250 test, as the issue
states it). The images are the UTKFace faces of ``../shared/data/faces/{male,female}`` where that
folder exists (``data.root`` points there: read, never copied), else generated 200x200 JPEGs
(``--data DIR`` / ``--generated`` choose). The model is a full-size VGG-Face-structured file with
the real file's ``momentum`` (~1.16 GB, as ``vgg_face.mat``). Each protocol run gets a fresh work
folder (no feature cache, no converted model from an earlier run).
The baseline: one float32 forward pass of the same base (converted once beforehand, cut at
``relu7``) over the same N images, in its own process: decoding through the project's loader
(``tf_images.image_dataset``) + ``predict_on_batch``, batch 16, timed after imports and model
load (the least any protocol must spend). Warm-up: every input file read once (page cache) and
one baseline pass over 16 images (TensorFlow's libraries into the page cache); then the median
of ``--runs`` interleaved runs of each side. Target: protocol <= 0.5 x baseline on a CPU with AMX
(where ``auto`` runs the base in bfloat16); without AMX ``auto`` is float32, the protocol does
the baseline's work and more, and the target does not apply.

    python bench/bench_precision.py            # full size, batch 16, 3 batches x 3 runs (~2-3 min, 2 cores)
    python bench/bench_precision.py --quick    # width 1/8: checks that it runs
    python bench/bench_precision.py --precision bfloat16   # force a side instead of auto
    python bench/bench_precision.py --protocol --images 2500          # issue 13's figure (AMX CPU)
    python bench/bench_precision.py --protocol --images 40 --quick    # smoke test (width 1/8)
"""

from __future__ import annotations

import argparse
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

TARGET_EXTRACTION = 2.5  # x float32, on a CPU with AMX and oneDNN
TARGET_PROTOCOL = 0.5  # protocol / one float32 pass, on a CPU with AMX and oneDNN
FACES = ROOT.parent / "shared" / "data" / "faces"  # real UTKFace crops, where this checkout has them
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
CONFIG = ROOT / "config.yaml"  # the default protocol
STAGES = ("data_preprocess.py", "model_conversion.py", "train.py", "predict.py")


def build_cut(tmp: Path, width: float, input_size: int, layer: str):
    import keras

    import vggface_gender.layers  # noqa: F401
    from vggface_gender import synthetic
    from vggface_gender.conversion import convert

    mat = synthetic.write_vggface_mat(tmp / "vgg_face_bench.mat", width=width, n_classes=16,
                                      input_size=input_size, seed=0)
    convert(mat, tmp / "model")
    mat.unlink()
    base = keras.saving.load_model(tmp / "model" / "base.keras")
    return keras.Model(base.inputs, base.get_layer(layer).output, name="frozen_base")


def images(n: int, size: int, seed: int = 0):
    """Image-like float32 RGB 0-255: coarse random blocks plus noise (what extraction sees)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    block = max(1, size // 14)
    coarse = rng.uniform(0, 255, (n, -(-size // block), -(-size // block), 3)).astype(np.float32)
    x = np.repeat(np.repeat(coarse, block, axis=1), block, axis=2)[:, :size, :size]
    return np.clip(x + rng.normal(0, 8, x.shape), 0, 255).astype(np.float32)


def step_of(model):
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec((None, *model.inputs[0].shape[1:]), tf.float32)])
    def step(x):
        return model(x, training=False)

    return step


def extraction(args) -> int:
    import numpy as np

    from vggface_gender.precision import detect_hardware, resolve_precision, with_precision

    hw = detect_hardware()
    resolved = resolve_precision(args.precision, hardware=hw)
    print(f"hardware: {hw.describe()}")
    print(f"precision {args.precision}: {resolved.name} ({resolved.reason})")
    applies = hw.amx_bf16 and hw.onednn and not hw.gpus
    print("target >= 2.5x float32: " + ("applies (CPU with AMX, oneDNN on)" if applies else
                                         "does not apply here (needs a CPU with AMX and oneDNN on, no GPU)"))

    with tempfile.TemporaryDirectory(prefix="bench_precision_") as tmp:
        start = time.perf_counter()
        cut = build_cut(Path(tmp), args.width, args.input_size, "relu7")
        print(f"model: VGG-Face structure, width {args.width:g}, {args.input_size}x{args.input_size}, "
              f"cut at relu7 ({time.perf_counter() - start:.0f} s to write and convert)", flush=True)
        sides = {"float32": step_of(cut), "auto": step_of(with_precision(cut, resolved))}
        batch = images(args.batch, args.input_size)
        outputs = {name: step(batch).numpy() for name, step in sides.items()}  # warm-up (traces)
        error = float(np.linalg.norm(outputs["auto"] - outputs["float32"]) / np.linalg.norm(outputs["float32"]))
        times = {name: [] for name in sides}
        for run in range(args.runs):
            for name, step in (sides.items() if run % 2 == 0 else reversed(sides.items())):
                t0 = time.perf_counter()
                for _ in range(args.batches):
                    step(batch).numpy()
                times[name].append(time.perf_counter() - t0)
            print(f"run {run + 1}: " + ", ".join(f"{n} {args.batches * args.batch / times[n][-1]:.2f} img/s"
                                                 for n in sides), flush=True)

    n = args.batches * args.batch
    rate = {name: n / statistics.median(t) for name, t in times.items()}
    ratio = rate["auto"] / rate["float32"]
    print(f"relu7 relative L2 difference, {resolved.name} vs float32: {error:.4f}")
    target = f">= {TARGET_EXTRACTION}x (AMX)" if applies else "n/a (no AMX)"
    met = ("yes" if ratio >= TARGET_EXTRACTION else "**no**") if applies else "—"
    print(f"BENCH precision | extraction img/s, {args.precision} ({resolved.name}) vs float32, width "
          f"{args.width:g}, batch {args.batch}, relu7 | {rate['auto']:.2f} | {rate['float32']:.2f} | "
          f"{ratio:.2f}x | {target} | {met}")
    return 0


# --------------------------------------------------------------------------- the four-stage protocol
def protocol_counts(n: int) -> tuple[int, int]:
    """(sampled, test) per class for N images: 1000 + 250 per class at N = 2500."""
    sample, test = round(n * 1000 / 2500), round(n * 250 / 2500)
    if sample < 5 or test < 1:
        raise SystemExit(f"--images {n}: too few for a train/validation/test split (at least 13)")
    return sample, test


def overrides_for(work: Path, data: Path, mat: Path, sample: int, test: int) -> list[str]:
    """``--set`` values on the repository's config.yaml (the default protocol): this run's folders
    and counts, and ``model.precision: auto`` whatever the file says."""
    values = {"work_dir": work, "data.root": data, "model.mat_path": mat, "model.precision": "auto",
              "data.sample_per_class": sample, "data.test_per_class": test}
    return [f"{key}={value}" for key, value in values.items()]


def run_script(script: str, overrides: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(ROOT / script), "--config", str(CONFIG),
                           *(f"--set={o}" for o in overrides)], env=ENV, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{script} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def run_protocol(overrides: list[str], work: Path) -> dict:
    """The four scripts, one process each, on a fresh work folder; seconds per stage."""
    shutil.rmtree(work, ignore_errors=True)
    seconds = {script: run_script(script, overrides) for script in STAGES}
    summary = json.loads((work / "reports" / "train_summary.json").read_text())
    seconds["precision"] = summary.get("precision", "?")  # what train.py's base ran in
    shutil.rmtree(work, ignore_errors=True)  # ~0.6 GB of base.keras per run
    return seconds


def child_forward(overrides: list[str], limit: int | None) -> dict:
    """The baseline, in its own process: one float32 pass of the base (cut at the embedding layer)
    over every image of the protocol's manifests, decode + forward, batch 16."""
    import numpy as np

    from vggface_gender import features, training
    from vggface_gender.keras_model import load_saved_model
    from vggface_gender.images import resolve_policy
    from vggface_gender.tf_images import image_dataset
    from vggface_gender.workdir import WorkDir

    cfg, paths = protocol_images(overrides)
    paths = paths[:limit] if limit else paths
    work = WorkDir(cfg.work_dir)
    policy = resolve_policy(cfg, training.read_base_info(work))
    base = load_saved_model(work.base_model, "base model", "model_conversion.py", compile=False)
    model = features.frozen_model(features.cut_base(base, cfg.model.embedding_layer))  # float32 as loaded
    start = time.perf_counter()
    n = 0
    for images, _errors in image_dataset(paths, policy, 16):
        n += len(np.asarray(model.predict_on_batch(images)))
    return {"seconds": time.perf_counter() - start, "images": n, "dtype": model.dtype_policy.name}


def protocol_images(overrides: list[str]):
    """The config and every image of the data stage's train, val and test manifests."""
    from vggface_gender import training
    from vggface_gender.config import load_config
    from vggface_gender.workdir import WorkDir

    cfg = load_config(CONFIG, overrides)
    work = WorkDir(cfg.work_dir)
    return cfg, [p for name in ("train", "val", "test") for p in training.read_split(cfg, work, name).paths]


def run_forward(overrides: list[str], limit: int | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child-forward"]
    cmd += [f"--override={o}" for o in overrides] + ([f"--limit={limit}"] if limit else [])
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the float32 pass failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def protocol(args) -> int:
    from vggface_gender import synthetic
    from vggface_gender.precision import detect_hardware, resolve_precision

    hw = detect_hardware()
    resolved = resolve_precision("auto", hardware=hw)
    applies = hw.amx_bf16 and hw.onednn and not hw.gpus
    print(f"hardware: {hw.describe()}")
    print(f"precision auto: {resolved.name} ({resolved.reason})")
    print(f"target <= {TARGET_PROTOCOL}x one float32 pass: " + (
        "applies (CPU with AMX, oneDNN on)" if applies else
        "does not apply here (needs a CPU with AMX (amx_bf16) and oneDNN on, no GPU)"), flush=True)
    sample, test = protocol_counts(args.images)
    n = 2 * (sample + test)

    with tempfile.TemporaryDirectory(prefix="bench_protocol_") as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        if args.generated or not (args.data or FACES.is_dir()):
            data, source = tmp / "images", "generated 200x200 JPEGs"
            # 10% spare: the data stage may set aside near-duplicates of generated images
            synthetic.write_image_folders(data, -(-(sample + test) * 11 // 10), size=200, seed=0)
        else:
            data = Path(args.data) if args.data else FACES
            source = f"the faces of {data} (read in place)"
        mat = synthetic.write_vggface_mat(tmp / "vgg_face_bench.mat", width=args.width, momentum=True, seed=0)
        print(f"# {n} images ({sample} + {sample} sampled, {test} + {test} test) from {source}; model "
              f"{mat.stat().st_size / 1e9:.2f} GB (width {args.width:g}, momentum)", flush=True)
        # the baseline's work folder: the same splits (same config and seed) and the same base
        base_overrides = overrides_for(tmp / "baseline", data, mat, sample, test)
        for script in STAGES[:2]:
            run_script(script, base_overrides)
        overrides = overrides_for(tmp / "work", data, mat, sample, test)
        print(f"# set up in {time.perf_counter() - start:.0f} s", flush=True)

        # warm-up: the inputs into the page cache; TensorFlow's libraries and the base loaded once
        for path in [mat] + protocol_images(base_overrides)[1]:
            with open(path, "rb") as f:
                while f.read(64 << 20):
                    pass
        run_forward(base_overrides, limit=16)

        times = {"protocol": [], "float32": []}
        stages = []
        for run in range(args.runs):
            for side in (("protocol", "float32") if run % 2 == 0 else ("float32", "protocol")):
                if side == "protocol":
                    stages.append(run_protocol(overrides, tmp / "work"))
                    times[side].append(sum(v for k, v in stages[-1].items() if k in STAGES))
                else:
                    forward = run_forward(base_overrides)
                    assert forward["images"] == n, forward
                    times[side].append(forward["seconds"])
            print(f"run {run + 1}: protocol {times['protocol'][-1]:.1f} s ("
                  + ", ".join(f"{k} {stages[-1][k]:.1f}" for k in STAGES)
                  + f"; base in {stages[-1]['precision']}), float32 pass {times['float32'][-1]:.1f} s", flush=True)

    ours, base = statistics.median(times["protocol"]), statistics.median(times["float32"])
    ratio = ours / base
    target = f"<= {TARGET_PROTOCOL}x (AMX)" if applies else "n/a (no AMX)"
    met = ("yes" if ratio <= TARGET_PROTOCOL else "**no**") if applies else "—"
    print(f"BENCH precision | four-stage protocol s, precision auto ({stages[-1]['precision']}), {n} images, "
          f"width {args.width:g} vs one float32 pass (decode + forward, batch 16) | {ours:.1f} | {base:.1f} | "
          f"{ratio:.2f}x | {target} | {met}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="width 1/8, batch 4, 2 batches (smoke test)")
    parser.add_argument("--precision", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="the side compared with float32 (default auto)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per side (median), >= 3")
    parser.add_argument("--batches", type=int, default=3, help="batches per timed run")
    parser.add_argument("--batch", type=int, default=16, help="images per batch")
    parser.add_argument("--width", type=float, default=1.0, help="channel width (1 = full-size VGG-Face)")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--protocol", action="store_true",
                        help="time the whole four-stage protocol vs one float32 pass (issue 13)")
    parser.add_argument("--images", type=int, default=2500, help="--protocol: number of images (default 2500)")
    parser.add_argument("--data", default=None,
                        help=f"--protocol: folder with male/ and female/ (default {FACES} if it exists)")
    parser.add_argument("--generated", action="store_true", help="--protocol: generated images, not real faces")
    parser.add_argument("--child-forward", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--override", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_forward:
        print(json.dumps(child_forward(args.override, args.limit)), flush=True)
        return 0
    if args.quick:
        args.width, args.batch, args.batches = 1 / 8, 4, 2
    args.runs = max(3, args.runs)
    return protocol(args) if args.protocol else extraction(args)


if __name__ == "__main__":
    sys.exit(main())
