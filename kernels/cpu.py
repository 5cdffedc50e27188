"""Build (once per machine, cached) and load the C++ CPU kernels (SOURCES, with HEADERS).

torch's cpp_extension compiles them with -march=native on first use, so the cache folder
is keyed by this CPU's feature flags, the compiler, torch's version and install, and the
sources' text (not their path: every checkout of the same code on one venv shares one
build); a later process just loads the shared library (ninja finds nothing to do).
"""

import hashlib
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from fqcompile.files import cache_dir, write_text

SOURCES = [Path(__file__).with_name(name) for name in ("cpu_nested.cpp", "cpu_packed.cpp", "cpu_decode.cpp",
                                                      "cpu_stack.cpp")]
HEADERS = [Path(__file__).with_name(name) for name in ("cpu_ops.h", "cpu_simd.h", "cpu_dots_float.h", "cpu_dots_int8.h",
                                                      "cpu_activations.h")]
FLAGS = ["-O3", "-march=native", "-fopenmp"] + os.environ.get("FQCOMPILE_CXXFLAGS", "").split()
STALE_DAYS = 30  # other builds unused this long are removed when a new one is made


def cpu_flags() -> str:
    """This CPU's feature flags (the /proc/cpuinfo line), or the platform's processor name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def build_dir() -> Path:
    compiler = os.environ.get("CXX", "c++")
    # The sources' text, not their path: they are built from copies inside the folder
    # (load), so every checkout of the same code shares one build. torch's location is in
    # the key because the build commands name its headers: another venv would rebuild the
    # library in place, silently, on every switch.
    key = "\n".join([cpu_flags(), compiler, " ".join(FLAGS), torch.__version__, str(Path(torch.__file__).parent),
                     sys.version, *(f"{path.name}\n{path.read_text()}" for path in SOURCES + HEADERS)])
    tag = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / "kernels" / f"cpu-{tag}"


def _ensure_ninja() -> None:
    """cpp_extension runs `ninja`; the PyPI wheel's binary is not on PATH outside an activated venv."""
    if shutil.which("ninja"):
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def load() -> None:
    """Compile if needed and load; registers the CPU kernels of the fqcompile ops (kernels/ops.py).

    Raises whatever the build raises (no compiler, no ninja, compile error).
    """
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if not shutil.which(compiler):
        raise RuntimeError(f"no C++ compiler ({compiler}) on PATH")
    _ensure_ninja()
    folder = build_dir()
    (folder / "src").mkdir(parents=True, exist_ok=True)
    first = not any(folder.glob("*.so"))
    if first:
        print("fqcompile: compiling the CPU kernels (once per venv, about a minute)...", file=sys.stderr)
    sources = [_copy(path, folder / "src") for path in SOURCES + HEADERS][:len(SOURCES)]
    start = time.perf_counter()
    cpp_extension.load(
        name="fqcompile_cpu", sources=[str(path) for path in sources], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
        build_directory=str(folder), is_python_module=False, verbose=False,
    )
    if first:
        print(f"fqcompile: CPU kernels compiled in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    os.utime(folder)  # marks it in use, for prune() in other checkouts and versions
    if first:
        prune(folder)


def _copy(source: Path, folder: Path) -> Path:
    """`source` copied into `folder` (written whole: another process may be building from it)."""
    target = folder / source.name
    text = source.read_text()
    if not target.is_file() or target.read_text() != text:
        write_text(target, text)
    return target


def prune(keep: Path) -> None:
    """Remove the other builds beside `keep` that no load has touched for STALE_DAYS.

    Each source edit, torch or compiler upgrade makes a new build folder; without this they
    pile up (~1 MB each). A build still in use by another checkout is touched at every load.
    """
    cutoff = time.time() - STALE_DAYS * 86400
    for other in keep.parent.glob("cpu-*"):
        if other != keep and other.is_dir() and other.stat().st_mtime < cutoff:
            shutil.rmtree(other, ignore_errors=True)
