"""Progress for loops that take more than a few seconds, in a terminal, a log file or a notebook.

``Progress(total, desc, stream=..., enabled=...)`` is a ``tqdm.auto`` bar: a widget in a notebook
with ipywidgets; text elsewhere, redrawn in place in a terminal and in a notebook without
ipywidgets (its output area understands ``\\r``); in a log file or pipe, a line when the loop
starts, one at most every ``LOG_INTERVAL`` seconds and one at the end, each a line of its own.
``keras_verbose()`` is the matching ``verbose`` for Keras' ``fit``.

tqdm imports neither TensorFlow nor anything heavy, so ``data_preprocess.py`` still starts fast.
"""

from __future__ import annotations

import sys
import warnings

LOG_INTERVAL = 10.0  # seconds between progress lines in a log file


def in_notebook() -> bool:
    """True inside an IPython kernel (Jupyter, Colab), whose output area is a live display."""
    ipython = sys.modules.get("IPython")
    try:
        shell = ipython.get_ipython() if ipython is not None else None
        return shell is not None and "IPKernelApp" in shell.config
    except Exception:  # pragma: no cover - an IPython that cannot say
        return False


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def keras_verbose(stream=None) -> int:
    """``verbose`` for ``keras.Model.fit``: 1 (a live bar) in a terminal or a notebook, 2 (one
    line per epoch) when output goes to a file or pipe. Keras alone picks 1 for any POSIX
    process, which fills a log file with a redraw per step."""
    return 1 if in_notebook() or _isatty(stream or sys.stdout) else 2


class _Lines:
    """A log file's view of a tqdm bar: each redraw (``\\r`` + text) becomes a line of its own.
    tqdm has no line mode, and a file full of carriage returns reads as one endless line."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").rstrip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def Progress(total: int | None, desc: str = "", stream=None, enabled: bool = True):
    """A ``tqdm.auto`` bar on ``stream`` (stderr by default); a silent one when not ``enabled``.

    Use it as a context manager (it closes on the way out, also on an error), with
    ``.update(n)`` and ``.close()``.
    """
    with warnings.catch_warnings():
        # Without ipywidgets tqdm.auto warns ("IProgress not found") and falls back to its text
        # bar, which a notebook shows fine and updates in place: the warning is noise to a user.
        warnings.filterwarnings("ignore", message=".*IProgress not found.*")
        from tqdm.auto import tqdm

    stream = stream or sys.stderr
    live = _isatty(stream) or in_notebook()
    return tqdm(total=total, desc=desc, file=stream if live else _Lines(stream), disable=not enabled,
                mininterval=0.1 if live else LOG_INTERVAL, dynamic_ncols=live, ascii=None if live else True)
