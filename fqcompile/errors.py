"""User-facing errors: the CLI prints the message on one line and exits non-zero."""


class FqError(Exception):
    """Bad input or an unusable environment, explained in one line."""
