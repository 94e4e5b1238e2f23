"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class QuantdiagError(Exception):
    """Bad input or an environment problem the user can fix; never a bug in quantdiag."""
