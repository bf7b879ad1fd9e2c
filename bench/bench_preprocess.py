"""Benchmark `data_preprocess.py` against a bare Pillow decode loop, and its memory as folders grow.

Time. A folder of 6000 distinct 200x200 RGB JPEGs (3000 per class; UTKFace's crop size; quality
90, ~10 KB each where UTKFace's average ~8 KB) is sampled with the default config (1000 + 250 per
class: 2500 images drawn; ``data.dedup: near``).
"ours" is the stage's whole process (`python data_preprocess.py --quiet`: interpreter start,
imports, scan, SHA-256 of all 6000 files, the perceptual hash of every candidate (each decoded at
a reduced DCT scale), near-duplicate search, decode-check of the 2500 drawn, manifests written).
The baseline is a bare loop, also a whole `python` process, that opens and fully decodes every
candidate file once with Pillow (`Image.open(p).load()`), one thread. Both read from the page
cache (a warm-up run of each comes first); median of --runs interleaved runs. Target: <= 2.5x.
For information a second figure repeats "ours" with `data.dedup: exact` (no perceptual hashing).

Memory. The stage's peak RSS on the 6000-file folder against a 60000-file folder of distinct
files (10 copies of each original, each with its own JPEG comment segment, so every file hashes
differently but decodes the same: 6000 near-duplicate groups of 10). Target: the 60k peak
<= 1.25x the 6k peak (flat: file contents and decoded images are never held; ~200 bytes of
bookkeeping per file, mostly its path, plus 64 bytes of perceptual hashes), with the bytes per
extra file and the 60k run's wall time as information.

Images are generated in a temporary folder outside the repository and removed afterwards.

    python bench/bench_preprocess.py            # 6000 / 60000 files (about 4 minutes on 2 cores)
    python bench/bench_preprocess.py --quick    # 600 / 6000 files, to check that it runs
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

# Peak RSS must be read inside the measured process: a child's ru_maxrss also counts the parent's
# pages at fork time, carried across exec. VmHWM belongs to the process's own address space.
PEAK_RSS_WRAPPER = """
import atexit, runpy, sys
def report():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            sys.stderr.write("PEAK_RSS_KB " + line.split()[1] + "\\n")
atexit.register(report)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

BARE_LOOP = """
import sys
from PIL import Image
for line in open(sys.argv[1], encoding="utf-8"):
    with Image.open(line.rstrip("\\n")) as img:
        img.load()
"""


# --------------------------------------------------------------------------- inputs
def write_faces(root: Path, per_class: int, size: int = 200, seed: int = 0) -> None:
    """``per_class`` distinct JPEGs per class: windows of a smooth random texture, tinted, noisy."""
    rng = np.random.default_rng(seed)
    big = 1024
    # A smooth colour field (sum of a few random sinusoids) gives JPEG sizes like real photos.
    yy, xx = np.mgrid[0:big, 0:big] / big
    field = np.zeros((big, big, 3))
    for _ in range(12):
        fx, fy, phase = rng.uniform(1, 12), rng.uniform(1, 12), rng.uniform(0, 2 * np.pi, 3)
        field += np.sin(2 * np.pi * (fx * xx + fy * yy)[..., None] + phase)
    field = (field - field.min()) / (field.max() - field.min()) * 200 + 25
    for cls in ("female", "male"):
        folder = root / cls
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            y, x = rng.integers(0, big - size, 2)
            tint = rng.uniform(0.8, 1.2, 3)
            img = field[y:y + size, x:x + size] * tint + rng.normal(0, 6, (size, size, 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
                folder / f"{cls}_{i:05d}.jpg", quality=90)


def comment_copies(src: Path, dst: Path, copies: int) -> int:
    """``copies`` versions of every JPEG under ``src``, each with its own COM segment after SOI."""
    n = 0
    for path in sorted(src.rglob("*.jpg")):
        data = path.read_bytes()
        target = dst / path.parent.relative_to(src)
        target.mkdir(parents=True, exist_ok=True)
        for k in range(copies):
            comment = f"copy {k}".encode()
            segment = b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment
            (target / f"{path.stem}_c{k}.jpg").write_bytes(data[:2] + segment + data[2:])
            n += 1
    return n


def write_config(path: Path, data_root: Path, work_dir: Path) -> Path:
    path.write_text(f"work_dir: {work_dir}\ndata:\n  root: {data_root}\n")
    return path


# --------------------------------------------------------------------------- measuring
def run_process(cmd: list[str]) -> tuple[float, str]:
    """Wall seconds and stderr of one child process."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    wall = time.perf_counter() - start
    err = proc.stderr.decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{err}")
    return wall, err


def peak_rss_mib(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB, the process's own VmHWM) of a Python command."""
    wall, err = run_process([cmd[0], "-c", PEAK_RSS_WRAPPER, *cmd[1:]])
    kb = [int(line.split()[1]) for line in err.splitlines() if line.startswith("PEAK_RSS_KB ")]
    return wall, kb[-1] / 1024


def stage_cmd(config: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "data_preprocess.py"), "--quiet", "--config", str(config), *extra]


def selected_files(work_dir: Path, data_root: Path, listing: Path) -> int:
    from vggface_gender.dataset import read_manifest
    paths = [e.path for split in ("train", "val", "test")
             for e in read_manifest(work_dir / "splits" / f"{split}.csv", data_root)]
    listing.write_text("".join(f"{p}\n" for p in paths), encoding="utf-8")
    return len(paths)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="600 / 6000 files, 200 + 50 drawn per class")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per side, interleaved (median)")
    parser.add_argument("--keep", metavar="DIR", help="generate into DIR and keep it (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.runs < 3:
        parser.error("--runs must be >= 3")

    per_class = 300 if args.quick else 3000
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="vggface_bench_preprocess_"))
    try:
        small, large = tmp / "files_6k", tmp / "files_60k"
        start = time.perf_counter()
        if not small.exists():
            write_faces(small, per_class)
        if not large.exists():
            comment_copies(small, large, copies=10)
        n_small = sum(1 for _ in small.rglob("*.jpg"))
        n_large = sum(1 for _ in large.rglob("*.jpg"))
        mean_kb = sum(p.stat().st_size for p in small.rglob("*.jpg")) / n_small / 1024
        print(f"# generated {n_small} + {n_large} JPEGs (200x200, mean {mean_kb:.1f} KB) in "
              f"{time.perf_counter() - start:.0f} s under {tmp}", flush=True)

        extra = ["--set", "data.sample_per_class=200", "--set", "data.test_per_class=50"] if args.quick else []
        config_small = write_config(tmp / "small.yaml", small, tmp / "work_small")
        config_large = write_config(tmp / "large.yaml", large, tmp / "work_large")

        # warm-up: caches the files, writes the manifests that name the baseline's files
        run_process(stage_cmd(config_small, *extra))
        listing = tmp / "selected.txt"
        n_drawn = selected_files(tmp / "work_small", small, tmp / "drawn.txt")
        candidates = sorted(small.rglob("*.jpg"))
        listing.write_text("".join(f"{p}\n" for p in candidates), encoding="utf-8")
        bare = [sys.executable, "-c", BARE_LOOP, str(listing)]
        run_process(bare)

        exact = ["--set", "data.dedup=exact"]
        times: dict[str, list[float]] = {"ours": [], "ours_exact": [], "bare": []}
        for _ in range(args.runs):
            times["ours"].append(run_process(stage_cmd(config_small, *extra))[0])
            times["bare"].append(run_process(bare)[0])
            times["ours_exact"].append(run_process(stage_cmd(config_small, *exact, *extra))[0])
        med = {k: statistics.median(v) for k, v in times.items()}
        for k, v in times.items():
            print(f"# {k}: {[round(t, 3) for t in v]} s", flush=True)

        # memory: one warm-up each (page cache), then the peak of --runs runs
        run_process(stage_cmd(config_large, *extra))
        rss_small = max(peak_rss_mib(stage_cmd(config_small, *extra))[1] for _ in range(3))
        large_runs = [peak_rss_mib(stage_cmd(config_large, *extra)) for _ in range(3)]
        rss_large = max(r[1] for r in large_runs)
        wall_large = statistics.median(r[0] for r in large_runs)

        label = f"{n_small} JPEGs 200x200, {n_drawn} drawn, dedup near"
        print(f"BENCH preprocess | whole process s ({label}) vs bare Pillow decode loop over all "
              f"{len(candidates)} candidates | {med['ours']:.2f} | {med['bare']:.2f} | "
              f"{med['ours'] / med['bare']:.2f} | <= 2.5", flush=True)
        print(f"BENCH preprocess | same, data.dedup: exact | {med['ours_exact']:.2f} | {med['bare']:.2f} | "
              f"{med['ours_exact'] / med['bare']:.2f} | info", flush=True)
        print(f"BENCH preprocess | peak RSS MiB, {n_large} vs {n_small} files | {rss_large:.0f} | "
              f"{rss_small:.0f} | {rss_large / rss_small:.2f} | <= 1.25", flush=True)
        per_file = (rss_large - rss_small) * 2**20 / (n_large - n_small)
        print(f"BENCH preprocess | peak RSS growth, bytes per extra file | {per_file:.0f} | - | - | info",
              flush=True)
        print(f"BENCH preprocess | whole process s, {n_large} files (hash all, dedup near) | "
              f"{wall_large:.2f} | {med['ours']:.2f} | {wall_large / med['ours']:.2f} | info", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
