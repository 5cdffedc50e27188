"""Files: outputs appear whole or not at all (written beside, then renamed), and the cache folder."""

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import FqError


def check_writable(out: Path, force: bool, marker: str) -> None:
    """Refuse an existing output unless `force`; never replace a folder we did not write."""
    if out.exists():
        if not force:
            raise FqError(f"{out} already exists (use `force=True` to overwrite it)")
        if not out.is_dir() or (any(out.iterdir()) and not (out / marker).is_file()):
            raise FqError(f"refusing to overwrite {out}: it is not an output of fqcompile")


@contextlib.contextmanager
def atomic_dir(out: Path, force: bool, marker: str):
    """Yield a temporary folder that becomes `out` only if the block completes.

    `marker` is the file every complete output holds (written last by the caller); an
    existing `out` is replaced only with `force` and only if it holds that marker.
    A killed process leaves at most a hidden `.NAME.partial-*` folder behind (or, if
    killed between the two renames of a forced replacement, a `.NAME.old-*` one holding
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


@contextlib.contextmanager
def atomic_file(path: Path, keep_existing: bool = False):
    """Yield a hidden temporary path beside `path` (for a file or a folder the block makes)
    that becomes `path` only if the block completes. `keep_existing`: if `path` appeared
    meanwhile (another process made the same cache entry), keep it and drop ours."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        yield tmp
        try:
            os.replace(tmp, path)
        except OSError:
            if not (keep_existing and path.exists()):
                raise
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    """Write `text` to `path` whole or not at all."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, data, sort_keys: bool = False) -> None:
    """`data` as indented JSON with a trailing newline, written whole or not at all."""
    write_text(path, json.dumps(data, indent=1, sort_keys=sort_keys) + "\n")


def cache_dir() -> Path:
    """Where converted models and kernel builds live; FQCOMPILE_CACHE overrides ~/.cache/fqcompile."""
    root = os.environ.get("FQCOMPILE_CACHE") or Path.home() / ".cache" / "fqcompile"
    return Path(root)
