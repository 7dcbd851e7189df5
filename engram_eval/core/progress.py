"""Progress of a long job: a bar with rate and ETA on a terminal, plain lines when stderr is piped (a log, CI, make),
nothing with --quiet. Every long command draws it through `progress_bar`."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from typing import IO

from tqdm import tqdm

SILENT: ContextVar[bool] = ContextVar("engram_eval_progress_silent", default=False)
PLAIN_EVERY_SECONDS = 10.0  # piped: nothing for a job shorter than this; then a line at most this often, and one at the end
PLAIN_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit}s ({percentage:.0f}%), {rate_fmt}, {elapsed} elapsed, ETA {remaining}{postfix}"


class PlainLines:
    """A text stream for tqdm that turns its carriage-return redraws into whole lines, one per count (a redraw of the
    same count, its rate or postfix refreshed, is dropped)."""

    def __init__(self, stream: IO[str]):
        self.stream, self.last = stream, None

    def write(self, text: str) -> None:
        for line in text.replace("\r", "\n").split("\n"):
            line = " ".join(line.split())
            if line and line.split(",")[0] != self.last:
                self.stream.write(line + "\n")
                self.last = line.split(",")[0]

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(total: int | None, desc: str, unit: str, enabled: bool = True, initial: int = 0, leave: bool = True,
                 stream: IO[str] | None = None) -> tqdm:
    """A tqdm bar (update, set_postfix, close, a context manager): on a terminal the usual bar with rate and ETA;
    piped, plain lines ("sweep: 40/192 cells (21%), 3.10cell/s, 00:13 elapsed, ETA 00:49") every
    PLAIN_EVERY_SECONDS once the job has run that long, and the last one at the end; not enabled, or inside
    `silenced()` (--quiet), silent."""
    stream = stream or sys.stderr
    if not enabled or SILENT.get():
        return tqdm(total=total, initial=initial, disable=True)
    if stream.isatty():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=stream, dynamic_ncols=True, leave=leave)
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=PlainLines(stream), bar_format=PLAIN_FORMAT,
                mininterval=PLAIN_EVERY_SECONDS, maxinterval=PLAIN_EVERY_SECONDS, delay=PLAIN_EVERY_SECONDS, ascii=True)


@contextlib.contextmanager
def silenced(quiet: bool = True) -> Iterator[None]:
    """Every progress bar drawn inside stays silent (a command's --quiet, down to the bars deep in the library: a
    learned engram's steps inside a sweep)."""
    token = SILENT.set(quiet or SILENT.get())
    try:
        yield
    finally:
        SILENT.reset(token)
