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

Phase 2 adds the whole four-stage protocol (2,500 images: 1000 + 1000 sampled, 250 + 250 test)
under ``auto`` vs one float32 forward pass over the same images (target <= 0.5x on AMX): a
``protocol()`` beside ``extraction()``, printing its own ``BENCH precision | ...`` line.

    python bench/bench_precision.py            # full size, batch 16, 3 batches x 3 runs (~2-3 min, 2 cores)
    python bench/bench_precision.py --quick    # width 1/8: checks that it runs
    python bench/bench_precision.py --precision bfloat16   # force a side instead of auto
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
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGET_EXTRACTION = 2.5  # x float32, on a CPU with AMX and oneDNN


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
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.batch, args.batches = 1 / 8, 4, 2
    args.runs = max(3, args.runs)
    return extraction(args)


if __name__ == "__main__":
    sys.exit(main())
