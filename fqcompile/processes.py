"""Python child processes that import fqcompile as installed, whatever the working folder."""

import sys


def python_command(*args: str) -> list[str]:
    """`python -P ARGS` with this interpreter.

    -P keeps the working folder off the child's sys.path: started from a checkout, the
    `kernels/` folder would otherwise import as the top-level module `kernels`, which
    transformers takes for the PyPI package of that name (and fails on).
    """
    return [sys.executable, "-P", *args]
