"""Progress of long phases, shown the way training shows it: a tqdm bar on a terminal, status lines in logs.

On a terminal (stderr is a TTY) a bar redraws in place; otherwise (a log file, a pipe, a job scheduler)
a plain status line goes to stderr every ``interval_s`` seconds and once at the end, so logs stay
readable. Only rank 0 reports; stdout is left alone (commands print their results there).
"""

from __future__ import annotations

import os
import sys
import time
from types import TracebackType
from typing import Any, TextIO

from gen.utils import dist


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class Progress:
    """Reports ``done`` out of ``total`` items of one phase.

    Args:
        total: items this process will handle.
        desc: what the phase does, e.g. ``"features of samples.npz"``.
        unit: the item's name in the status line.
        interval_s: seconds between status lines when not on a terminal (default from
            ``GEN_STATUS_INTERVAL``, else 30).
        stream: where to report (default stderr).
        enabled: report at all (default: on rank 0 only).
    """

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str = "img",
        interval_s: float | None = None,
        stream: TextIO | None = None,
        enabled: bool | None = None,
    ) -> None:
        self.total = int(total)
        self.desc = desc
        self.unit = unit
        if interval_s is None:
            interval_s = float(os.environ.get("GEN_STATUS_INTERVAL", 30))
        self.interval_s = interval_s
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = dist.is_main() if enabled is None else enabled
        self.done = 0
        self.start = time.time()
        self._last_line = self.start
        self._bar: Any = None
        self._closed = False
        if not self.enabled:
            return
        isatty = getattr(self.stream, "isatty", None)
        if isatty is not None and isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True, file=self.stream)
        else:
            self._write(f"{desc}: {self.total} {unit} to do")

    def _write(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def status_line(self) -> str:
        """``desc: done/total unit (pct)  elapsed  rate  eta``."""
        elapsed = time.time() - self.start
        pct = 100.0 * self.done / self.total if self.total else 100.0
        parts = [f"{self.desc}: {self.done}/{self.total} {self.unit} ({pct:.0f}%)", f"{_duration(elapsed)}"]
        if elapsed > 0 and self.done:
            rate = self.done / elapsed
            parts.append(f"{rate:.1f} {self.unit}/s")
            if self.done < self.total:
                parts.append(f"eta {_duration((self.total - self.done) / rate)}")
        return "  ".join(parts)

    def update(self, done: int) -> None:
        """Set the number of finished items (absolute, not an increment)."""
        if not self.enabled or self._closed:
            return
        if self._bar is not None:
            self._bar.update(done - self.done)
            self.done = done
            return
        self.done = done
        now = time.time()
        if now - self._last_line >= self.interval_s and done < self.total:
            self._last_line = now
            self._write(self.status_line())

    def advance(self, n: int = 1) -> None:
        """Count ``n`` more finished items."""
        self.update(self.done + n)

    def close(self) -> None:
        """Finish the bar, or print the final status line."""
        if not self.enabled or self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        else:
            self._write(self.status_line())

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        elif self._bar is not None:
            self._bar.close()
        self._closed = True
