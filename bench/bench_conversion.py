"""Benchmark: model_conversion against a bare scipy.io.loadmat of the same file.

Writes a full-size VGG-Face-structured MatConvNet file (145M weights + the same again of
``momentum``, as in the real ~1 GB vgg_face.mat; uncompressed unless --compress) into a temporary
folder outside the project, warms the page cache, then runs, each in its own fresh Python
process and interleaved: (a) ``scipy.io.loadmat(file)``, (b) ``conversion.convert(file, out)``.
One warm-up run of each, then the median of --runs runs. Before each run the previous output is
removed and written data is flushed (``sync``), so no run pays for another's disk writes.

Figures (targets from issue 2):
- time: the converter's work after imports (load + build + weight transfer + checksum wait +
  save) vs the bare load's time: <= 4x
- memory: whole-process peak RSS (ru_maxrss) of the converter's process vs the bare load's: <= 2.5x

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
TIME_TARGET = 4.0
MEMORY_TARGET = 2.5


# --------------------------------------------------------------------------- child processes
def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def child_load(mat: str) -> dict:
    start = time.perf_counter()
    from scipy.io import loadmat

    imported = time.perf_counter()
    content = loadmat(mat)
    loaded = time.perf_counter()
    del content
    return {"import": imported - start, "load": loaded - imported, "peak": _peak_rss_bytes()}


def child_convert(mat: str, out: str) -> dict:
    start = time.perf_counter()
    sys.path.insert(0, str(ROOT))
    from vggface_gender import conversion, keras_model  # noqa: F401  (TensorFlow and Keras)

    imported = time.perf_counter()
    timings: dict = {}
    conversion.convert(mat, out, timings=timings)
    done = time.perf_counter()
    return {"import": imported - start, "work": done - imported, **timings, "peak": _peak_rss_bytes()}


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
    parser.add_argument("--child", choices=("load", "convert"), help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child == "load":
        print(json.dumps(child_load(args.file)))
        return 0
    if args.child == "convert":
        print(json.dumps(child_convert(args.file, args.out)))
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
        bare, conv = [], []
        for i in range(runs + 1):  # run 0 is the warm-up
            results = {}
            for kind in (("load", "convert") if i % 2 == 0 else ("convert", "load")):
                results[kind] = run_child(kind, mat, folder / "out")
            if i > 0:
                bare.append(results["load"])
                conv.append(results["convert"])
            print(f"  {'warm-up' if i == 0 else f'run {i}/{runs}'}: bare load {results['load']['load']:.2f} s, "
                  f"{results['load']['peak'] / 1e9:.2f} GB; converter work {results['convert']['work']:.2f} s, "
                  f"{results['convert']['peak'] / 1e9:.2f} GB", flush=True)
        report(bare, conv, size, args)
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(folder, ignore_errors=True)
        elif not args.keep:
            mat.unlink(missing_ok=True)
            shutil.rmtree(folder / "out", ignore_errors=True)
    return 0


def report(bare: list[dict], conv: list[dict], size: int, args) -> None:
    def med(rows, key):
        return statistics.median(r[key] for r in rows)

    bare_load, bare_peak = med(bare, "load"), med(bare, "peak")
    work, peak = med(conv, "work"), med(conv, "peak")
    print()
    print(f"file: {size / 1e9:.2f} GB ({'compressed' if args.compress else 'uncompressed'}), "
          f"median of {len(conv)} interleaved runs after a warm-up, warm page cache, "
          f"{os.cpu_count()} CPUs (other jobs may share them)")
    print(f"{'step':<28}{'converter':>12}{'bare loadmat':>14}")
    print(f"{'import':<28}{med(conv, 'import'):>11.2f}s{med(bare, 'import'):>13.2f}s")
    print(f"{'load (parse .mat)':<28}{med(conv, 'load'):>11.2f}s{bare_load:>13.2f}s")
    print(f"{'build Keras layers':<28}{med(conv, 'build'):>11.2f}s")
    print(f"{'weight transfer (reorder)':<28}{med(conv, 'transfer'):>11.2f}s")
    print(f"{'checksum (in parallel)':<28}{med(conv, 'checksum'):>11.2f}s   "
          f"(then waited {med(conv, 'checksum_wait'):.2f}s)")
    print(f"{'save base.keras/json':<28}{med(conv, 'save'):>11.2f}s")
    print(f"{'work after imports':<28}{work:>11.2f}s{bare_load:>13.2f}s   x{work / bare_load:.2f} (target <= {TIME_TARGET})")
    print(f"{'whole-process peak RSS':<28}{peak / 1e9:>10.2f}GB{bare_peak / 1e9:>12.2f}GB   "
          f"x{peak / bare_peak:.2f} (target <= {MEMORY_TARGET})")
    paired = statistics.median(c["work"] / b["load"] for c, b in zip(conv, bare))
    print(f"(median of the per-run time ratios, each run paired with its interleaved bare load: x{paired:.2f})")
    stage = "conversion" + ("-quick" if args.quick else "")
    print(f"BENCH {stage} | work after imports (s) | {work:.2f} | {bare_load:.2f} | "
          f"{work / bare_load:.2f} | <= {TIME_TARGET}")
    print(f"BENCH {stage} | peak memory (GB) | {peak / 1e9:.2f} | {bare_peak / 1e9:.2f} | "
          f"{peak / bare_peak:.2f} | <= {MEMORY_TARGET}")


if __name__ == "__main__":
    sys.exit(main())
