"""A small progress bar (stderr) for loops that take more than a few seconds.

Dependency-free on purpose: ``data_preprocess.py`` must start fast and import neither
TensorFlow nor anything heavy. Redraws at most ~10 times a second; prints a single final
line when stderr is not a terminal (logs, CI), so logs stay short.
"""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int | None, desc: str = "", stream=None, enabled: bool = True):
        self.total = total
        self.desc = desc
        self.n = 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.start = time.monotonic()
        self._last_draw = 0.0
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.enabled and self._tty:
            now = time.monotonic()
            if now - self._last_draw >= 0.1 or (self.total and self.n >= self.total):
                self._last_draw = now
                self.stream.write("\r" + self._line())
                self.stream.flush()

    def _line(self) -> str:
        elapsed = time.monotonic() - self.start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        if self.total:
            frac = min(1.0, self.n / self.total)
            bar = "#" * int(frac * 24)
            eta = (self.total - self.n) / rate if rate > 0 else 0.0
            return (f"{self.desc}: [{bar:<24}] {self.n}/{self.total} "
                    f"{rate:.1f}/s eta {eta:.0f}s ")
        return f"{self.desc}: {self.n} {rate:.1f}/s "

    def close(self) -> None:
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.start
        end = f"{self.desc}: {self.n}" + (f"/{self.total}" if self.total else "") + f" in {elapsed:.1f}s"
        self.stream.write(("\r" if self._tty else "") + end + " " * 10 + "\n")
        self.stream.flush()
        self.enabled = False
