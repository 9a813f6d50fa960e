"""The installed package (a wheel, as the container images and the systemd unit install it)
holds every module of the source tree and the bundled weights."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_holds_every_module_and_the_weights(tmp_path):
    """The package list named only `streamer` and `models`: a wheel left out models/logs, and the
    daemon installed from it failed at start (the editable install used here hid it)."""
    # From a copy of the sources, as the Dockerfile copies them: a build/ folder left in the
    # checkout by an earlier build would hide a missing package.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for top in ("streamer", "models"):
        shutil.copytree(ROOT / top, src / top, ignore=shutil.ignore_patterns("__pycache__"))
    # (--no-build-isolation: setuptools is already in the environment, torch depends on it.)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(src)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("streamer-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {p.relative_to(ROOT).as_posix() for top in ("streamer", "models") for p in (ROOT / top).rglob("*.py")}
    assert sources and sources <= names, sorted(sources - names)
    assert "models/weights/default.pt" in names
