class EngramEvalError(Exception):
    """A problem with the user's input or environment.

    The CLI prints the message as one line on stderr and exits non-zero, without a traceback;
    library callers catch this one type.
    """
