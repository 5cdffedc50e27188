"""Both an editable and a normal wheel install import the subpackages under fqcompile only."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_editable_install_maps_top_level_folders():
    import fqcompile.calibration.data
    import fqcompile.formats.nested
    import fqcompile.kernels

    assert Path(fqcompile.kernels.__file__).parent == REPO / "kernels"
    assert Path(fqcompile.formats.nested.__file__).parent == REPO / "formats"
    assert Path(fqcompile.calibration.data.__file__).parent == REPO / "calibration"


@pytest.mark.slow
def test_wheel_installs_and_runs(tmp_path):
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("fqcompile-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert all(n.startswith(("fqcompile/", "fqcompile-")) for n in names), names
    for module in ("fqcompile/kernels/__init__.py", "fqcompile/kernels/cpu_nested.cpp", "fqcompile/formats/nested.py",
                   "fqcompile/calibration/data.py"):
        assert module in names
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    assert not (target / "kernels").exists() and not (target / "formats").exists()
    # run from an unrelated folder with the wheel's copy first on the path
    code = (
        "import fqcompile, fqcompile.kernels, fqcompile.formats.checkpoint, fqcompile.calibration.data, sys;"
        "assert fqcompile.__file__.startswith(sys.argv[1]), fqcompile.__file__;"
        "assert fqcompile.kernels.__file__.startswith(sys.argv[1]);"
        "from fqcompile.cli import app; print('ok')"
    )
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr
    cli = subprocess.run([sys.executable, "-m", "fqcompile.cli", "--help"], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=300)
    assert cli.returncode == 0 and "export" in cli.stdout
