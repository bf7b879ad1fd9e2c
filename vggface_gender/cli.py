"""What the four scripts share: ``--config``/``--set`` parsing and one-line errors.

Each script's ``main(argv=None)`` builds its parser with ``make_parser`` and hands its body
to ``run``. ``run`` never raises ``SystemExit``: it returns the exit code, so the scripts
behave the same from a shell (``sys.exit(main())``) and from a notebook cell
(``train.main([...])`` returns 0 on success).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Callable, Sequence

from .config import Config, load_config
from .errors import PipelineError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = "config.yaml"


def make_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--config", metavar="PATH", default=None,
        help=f"config file (default: {DEFAULT_CONFIG} in the current folder, "
             f"else the project's own)")
    parser.add_argument(
        "--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
        help="override a config key, e.g. --set data.class_dirs.male=man (repeatable)")
    return parser


def default_config_path() -> Path:
    """``config.yaml`` in the current folder, else the one beside the scripts."""
    here = Path.cwd() / DEFAULT_CONFIG
    return here if here.exists() else PROJECT_ROOT / DEFAULT_CONFIG


def config_from_args(args: argparse.Namespace) -> Config:
    path = Path(args.config) if args.config else default_config_path()
    return load_config(path, args.overrides)


def run(parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace], int | None],
        argv: Sequence[str] | None) -> int:
    """Parse ``argv`` and call ``body(args)``; turn user errors into one line on stderr.

    Returns the exit code: 0 on success, 1 for a ``PipelineError`` (bad input), 2 for
    bad command-line arguments, 130 when interrupted.
    """
    try:
        args = parser.parse_args(None if argv is None else list(argv))
    except SystemExit as exc:  # --help, or argparse's own usage error (already printed)
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    try:
        code = body(args)
        return int(code or 0)
    except PipelineError as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: outputs already written are complete; partial ones were discarded",
              file=sys.stderr)
        return 130


def one_line(text: str) -> str:
    return " ".join(text.split())


# TensorFlow's C++ start-up log lines (glog format, written before absl is initialised, so
# TF_CPP_MIN_LOG_LEVEL does not reach them) and the CUDA probe's complaint on CPU-only machines.
_TF_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog|[IW]\d{4} \d\d:\d\d:\d\d|"
    r"E\d{4} .*(cuInit|cuda|CUDA)|To enable the following instructions:)")


def import_tensorflow_quietly() -> None:
    """Import TensorFlow and probe its devices with its start-up chatter filtered out.

    The C++ runtime writes straight to file descriptor 2, so it is captured there for the
    import; every line that is not known noise is written back, so real problems still show.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules:
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, AttributeError, ValueError):  # no real fd 2 (some notebook front-ends)
        import tensorflow as tf
        tf.config.list_physical_devices()
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            import tensorflow as tf
            tf.config.list_physical_devices()  # the CUDA probe logs now, not mid-run
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode("utf-8", "replace").splitlines()
                    if line.strip() and not _TF_NOISE.match(line)]
            if kept:
                print("\n".join(kept), file=sys.stderr)
