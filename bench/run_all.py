"""Run every benchmark script in bench/ and print one table.

Each bench script prints lines of the form
    BENCH <stage> | <figure> | <value> | <baseline> | <ratio> | <target> [| <met>]
and this runner collects them. Usage:

    python bench/run_all.py            # full benchmarks (tens of minutes on 2 cores)
    python bench/run_all.py --quick    # small versions, to check that they run
    python bench/run_all.py --only conversion predict
    python bench/run_all.py --only classifier_size precision
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ["preprocess", "conversion", "train", "predict", "faces", "precision", "classifier_size"]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return f"{os.cpu_count()} cores ({cpu}){mem}, Python {platform.python_version()}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="pass --quick to every bench script")
    parser.add_argument("--only", nargs="+", choices=ORDER, help="run only these")
    args = parser.parse_args(argv)

    rows, failed = [], []
    for name in args.only or ORDER:
        script = HERE / f"bench_{name}.py"
        if not script.exists():
            failed.append(f"{name}: {script.name} not found")
            continue
        cmd = [sys.executable, str(script)] + (["--quick"] if args.quick else [])
        print(f"== {' '.join(cmd)}", file=sys.stderr, flush=True)
        start = time.monotonic()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        sys.stderr.write(proc.stdout)
        print(f"== {name}: exit {proc.returncode} after {time.monotonic() - start:.0f} s", file=sys.stderr)
        if proc.returncode != 0:
            failed.append(f"{name}: exit code {proc.returncode}")
        for line in proc.stdout.splitlines():
            if line.startswith("BENCH "):
                rows.append([cell.strip() for cell in line[len("BENCH "):].split("|")])

    # "met" is filled by the scripts that judge their own target (some only where it applies)
    header = ["stage", "figure", "value", "baseline", "ratio", "target", "met"]
    print(f"\nMachine: {machine()}" + (" (--quick)" if args.quick else ""))
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join((row + [""] * len(header))[: len(header)]) + " |")
    for problem in failed:
        print(f"FAILED {problem}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
