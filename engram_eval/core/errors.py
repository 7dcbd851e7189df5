class EngramEvalError(Exception):
    """A problem with the user's input or environment.

    The CLI prints the message as one line on stderr and exits non-zero, without a traceback;
    library callers catch this one type.
    """


class EngramEvalWarning(UserWarning):
    """Something that makes numbers misleading without making them wrong (a bank mistake, a dominated engram).

    The CLI prints the message as one `warning:` line on stderr; `--strict` turns warnings about the bank into errors.
    """


def first_line(exc: BaseException) -> str:
    """The first line of a library's exception message (its type's name when it has none), for a one-line error."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, like Ctrl-C's KeyboardInterrupt: runs stop as they do on Ctrl-C (their
    finished work kept, run.json saying `terminated`) and the command exits 143."""


def raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()
