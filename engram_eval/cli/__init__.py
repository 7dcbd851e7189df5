"""The engram-eval command line: a thin layer over the library (model -> engram -> store -> sweep -> report).

One module per command (or command group); `app` holds the group, its error handling and the shared options."""

from . import bank, bench, build, check, compare, generate, models, report, store, sweep, vectors  # noqa: F401  (each registers its commands)
from .app import cli


def main() -> None:
    import signal

    from ..core.errors import raise_terminated

    signal.signal(signal.SIGTERM, raise_terminated)  # stop as on Ctrl-C: work kept, run.json says so, exit 143
    cli(prog_name="engram-eval")


__all__ = ["cli", "main"]
