"""Outputs appear whole or not at all: write into a hidden sibling folder, then rename."""

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from .errors import FqError


def check_writable(out: Path, force: bool, marker: str) -> None:
    """Refuse an existing output unless --force; never replace a folder we did not write."""
    if out.exists():
        if not force:
            raise FqError(f"{out} already exists (use --force to overwrite it)")
        if not out.is_dir() or (any(out.iterdir()) and not (out / marker).is_file()):
            raise FqError(f"refusing to overwrite {out}: it is not an output of fqcompile")


@contextlib.contextmanager
def atomic_dir(out: Path, force: bool, marker: str):
    """Yield a temporary folder that becomes `out` only if the block completes.

    `marker` is the file every complete output holds (written last by the caller); an
    existing `out` is replaced only with `force` and only if it holds that marker.
    A killed process leaves at most a hidden `.NAME.partial-*` folder behind (or, if
    killed between the two renames of a --force replacement, a `.NAME.old-*` one holding
    the previous output); never a half-written `out`.
    """
    out = Path(out)
    check_writable(out, force, marker)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if not (tmp / marker).is_file():
            raise RuntimeError(f"internal error: output finished without {marker}")
        _apply_umask(tmp)
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _apply_umask(folder: Path) -> None:
    """mkdtemp and some writers create owner-only files; give outputs the usual modes."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
