"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class QuantdiagError(Exception):
    """Bad input or an environment problem the user can fix; never a bug in quantdiag."""


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line (its type's name if it has none), for one-line errors."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
