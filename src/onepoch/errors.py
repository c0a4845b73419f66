"""Errors that a user can cause and fix; the CLI prints them as one line and exits non-zero."""


class OnepochError(Exception):
    """Base class: the message is shown to the user as-is, without a traceback."""


class DataError(OnepochError):
    """A dataset source or prepared dataset is missing, malformed or inconsistent."""


class ConfigError(OnepochError):
    """A configuration key or value is unknown or invalid."""


def one_line(e: BaseException) -> str:
    """An exception's message on one line (whitespace collapsed), or its class name when empty."""
    return " ".join(str(e).split()) or type(e).__name__


def warn(message: str) -> None:
    """One line ``onepoch: warning: MESSAGE`` on stderr: something the user should know that does not stop
    the command (e.g. a damaged checkpoint skipped for an older intact one)."""
    import sys

    print(f"onepoch: warning: {' '.join(message.split())}", file=sys.stderr, flush=True)
