"""Benchmark: model_conversion against a naive converter and a bare scipy.io.loadmat.

Writes a full-size VGG-Face-structured MatConvNet file (145M weights + the same again of
``momentum``, as in the real ~1 GB vgg_face.mat; uncompressed unless --compress) into a temporary
folder outside the project, warms the page cache, then runs, each in its own fresh Python
process and interleaved (the order rotates from run to run):

(a) ``load``: a bare ``scipy.io.loadmat(file)``;
(b) ``naive``: the converter anyone would write first, here in this file: ``loadmat``, build the
    same Keras network with default (random) initializers, ``set_weights``, ``model.save``;
(c) ``ours``: ``vggface_gender.conversion.convert(file, out)`` (which also hashes the file, in a
    thread beside its work: the ``checksum`` step printed is what is left to wait for after saving).

Each is timed *after its imports* (TensorFlow's start-up is the same for every converter). One
warm-up run of each, then the median of --runs runs. Before each run the previous output is
removed and written data is flushed (``sync``), so no run pays for another's disk writes.

Figures (targets from the issue):
- time: ours / naive, work after imports: <= 0.6
- memory: ours / bare loadmat, whole-process peak RSS (ru_maxrss of the child): <= 2.0

Usage: python bench/bench_conversion.py [--quick] [--runs 3] [--compress] [--dir DIR] [--keep]
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

ROOT = Path(__file__).resolve().parent.parent
TIME_TARGET = 0.6  # ours / naive
MEMORY_TARGET = 2.0  # ours / bare loadmat
KINDS = ("load", "naive", "ours")


# --------------------------------------------------------------------------- child processes
def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def child_load(mat: str, out: str) -> dict:
    from scipy.io import loadmat

    start = time.perf_counter()
    content = loadmat(mat)
    work = time.perf_counter() - start
    del content
    return {"work": work}


def naive_convert(mat: str, out: str) -> None:
    """loadmat, build VGG-Face with default initializers, set_weights, model.save."""
    import keras
    import numpy as np
    from scipy.io import loadmat

    net = loadmat(mat)["net"][0, 0]
    norm = net["normalization"][0, 0]
    height, width = (int(v) for v in norm["imageSize"].ravel()[:2])
    mean = norm["averageImage"].ravel().astype(np.float32)
    inputs = keras.Input((height, width, 3), name="input")
    x = keras.layers.Normalization(mean=mean, variance=np.ones_like(mean), name="subtract_mean")(inputs)
    weights = []
    for cell in net["layers"].ravel():
        layer = cell[0, 0]
        kind, name = str(layer["type"][0]), str(layer["name"][0])
        if kind == "conv":
            kernel, bias = layer["weights"].ravel()
            kh, kw, cin, cout = kernel.shape
            if name.startswith("fc"):  # fc6 on the 7x7 map, then fc7/fc8: Dense on the C-order flattening
                if len(x.shape) == 4:
                    x = keras.layers.Flatten(name=name + "_flatten")(x)
                keras_layer = keras.layers.Dense(cout, name=name)
                kernel = kernel.reshape(kh * kw * cin, cout)
            else:
                padding = "same" if int(layer["pad"].ravel()[0]) else "valid"
                keras_layer = keras.layers.Conv2D(cout, (kh, kw), padding=padding, name=name)
            x = keras_layer(x)
            weights.append((keras_layer, [kernel, bias.ravel()]))
        elif kind == "relu":
            x = keras.layers.ReLU(name=name)(x)
        elif kind == "pool":
            x = keras.layers.MaxPooling2D(tuple(int(v) for v in layer["pool"].ravel()),
                                          int(layer["stride"].ravel()[0]), name=name)(x)
        elif kind == "softmax":
            x = keras.layers.Softmax(name=name)(x)
    model = keras.Model(inputs, x)
    for keras_layer, values in weights:
        keras_layer.set_weights(values)
    del net, weights
    os.makedirs(out, exist_ok=True)
    model.save(os.path.join(out, "base.keras"))


def child_naive(mat: str, out: str) -> dict:
    import keras  # noqa: F401  (TensorFlow)
    import scipy.io  # noqa: F401

    start = time.perf_counter()
    naive_convert(mat, out)
    return {"work": time.perf_counter() - start}


def child_ours(mat: str, out: str) -> dict:
    sys.path.insert(0, str(ROOT))
    from vggface_gender import conversion, keras_model  # noqa: F401  (TensorFlow and Keras)

    timings: dict = {}
    start = time.perf_counter()
    conversion.convert(mat, out, timings=timings)
    return {"work": time.perf_counter() - start, **timings}


def run_child(kind: str, mat: Path, out: Path) -> dict:
    # Each run starts alike: no output of an earlier run to replace (a first conversion), and no
    # earlier run's written files still being flushed to disk beside it.
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, __file__, "--child", kind, "--file", str(mat), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{kind} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- the benchmark
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 1/4-width network (smoke test)")
    parser.add_argument("--runs", type=int, default=3, help="measured runs of each (median; >= 3)")
    parser.add_argument("--compress", action="store_true", help="write a compressed MAT-file")
    parser.add_argument("--dir", default=None, help="folder for the generated file (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the generated file")
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        result = {"load": child_load, "naive": child_naive, "ours": child_ours}[args.child](args.file, args.out)
        print(json.dumps({**result, "peak": _peak_rss_bytes()}))
        return 0

    sys.path.insert(0, str(ROOT))
    from vggface_gender import synthetic

    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_conversion_"))
    folder.mkdir(parents=True, exist_ok=True)
    mat = folder / "vgg_face_bench.mat"
    width = 0.25 if args.quick else 1.0
    try:
        start = time.perf_counter()
        print(f"writing {mat} (width {width}, momentum, {'compressed' if args.compress else 'uncompressed'})...",
              flush=True)
        synthetic.write_vggface_mat(mat, width=width, momentum=True, compress=args.compress, seed=0)
        size = mat.stat().st_size
        print(f"  {size / 1e9:.2f} GB in {time.perf_counter() - start:.0f} s", flush=True)
        with open(mat, "rb") as f:  # warm the page cache
            while f.read(64 << 20):
                pass

        runs = max(1, args.runs)
        rows = {kind: [] for kind in KINDS}
        for i in range(runs + 1):  # run 0 is the warm-up
            order = KINDS[i % 3:] + KINDS[:i % 3]
            results = {kind: run_child(kind, mat, folder / "out") for kind in order}
            if i > 0:
                for kind in KINDS:
                    rows[kind].append(results[kind])
            print(f"  {'warm-up' if i == 0 else f'run {i}/{runs}'}: "
                  + "; ".join(f"{kind} {results[kind]['work']:.2f} s, {results[kind]['peak'] / 1e9:.2f} GB"
                              for kind in KINDS), flush=True)
        report(rows, size, args)
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(folder, ignore_errors=True)
        elif not args.keep:
            mat.unlink(missing_ok=True)
            shutil.rmtree(folder / "out", ignore_errors=True)
    return 0


def report(rows: dict, size: int, args) -> None:
    def med(kind, key):
        return statistics.median(r[key] for r in rows[kind])

    load, naive, ours = (med(kind, "work") for kind in KINDS)
    load_peak, naive_peak, ours_peak = (med(kind, "peak") for kind in KINDS)
    time_ratio, memory_ratio = ours / naive, ours_peak / load_peak
    print()
    print(f"file: {size / 1e9:.2f} GB ({'compressed' if args.compress else 'uncompressed'}), "
          f"median of {len(rows['ours'])} interleaved runs after a warm-up, warm page cache, "
          f"{os.cpu_count()} CPUs (other jobs may share them)")
    print(f"{'work after imports':<34}{'time':>8}{'peak RSS':>11}")
    print(f"{'(a) bare loadmat':<34}{load:>7.2f}s{load_peak / 1e9:>9.2f}GB")
    print(f"{'(b) naive converter':<34}{naive:>7.2f}s{naive_peak / 1e9:>9.2f}GB")
    print(f"{'(c) ours':<34}{ours:>7.2f}s{ours_peak / 1e9:>9.2f}GB")
    for step in ("load", "build", "save", "checksum"):
        label = "checksum (wait after saving)" if step == "checksum" else step
        print(f"{'      ' + label:<34}{med('ours', step):>7.2f}s")
    paired = statistics.median(o["work"] / n["work"] for o, n in zip(rows["ours"], rows["naive"]))
    print(f"time   ours/naive   x{time_ratio:.2f} (per-run pairs: x{paired:.2f}), target <= {TIME_TARGET}: "
          f"{'PASS' if time_ratio <= TIME_TARGET else 'FAIL'}")
    print(f"memory ours/loadmat x{memory_ratio:.2f}, target <= {MEMORY_TARGET}: "
          f"{'PASS' if memory_ratio <= MEMORY_TARGET else 'FAIL'}")
    stage = "conversion" + ("-quick" if args.quick else "")
    print(f"BENCH {stage} | work after imports vs naive converter (s) | {ours:.2f} | {naive:.2f} | "
          f"{time_ratio:.2f} | <= {TIME_TARGET}")
    print(f"BENCH {stage} | peak memory vs bare loadmat (GB) | {ours_peak / 1e9:.2f} | {load_peak / 1e9:.2f} | "
          f"{memory_ratio:.2f} | <= {MEMORY_TARGET}")


if __name__ == "__main__":
    sys.exit(main())
