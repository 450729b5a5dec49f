"""tools/venv.sh (behind `make demo` / `make test`): clear stops, and never a half-built .venv.

Each case runs the script in a scratch copy of the files it reads, so the project's own
.venv is never touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from launch import REPO


def scratch_repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    for name in ("tools", "requirements"):
        shutil.copytree(REPO / name, root / name)
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def venv_sh(root: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "tools/venv.sh"], cwd=root, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})


def test_no_python_312_names_what_to_install(tmp_path):
    root = scratch_repo(tmp_path)
    proc = venv_sh(root, PATH="/usr/bin:/bin", PYENV_ROOT=str(tmp_path / "no-pyenv"), HOME=str(tmp_path),
                   PYTHON=str(tmp_path / "no-python"))
    if proc.returncode == 0:  # a system python3.12 exists on this machine: nothing to check here
        assert "ready" in proc.stdout or "up to date" in proc.stdout
        return
    assert "ERROR: no Python 3.12" in proc.stderr and "pyenv install 3.12" in proc.stderr
    assert not (root / ".venv").exists()


def test_too_little_disk_stops_before_installing(tmp_path):
    root = scratch_repo(tmp_path)
    proc = venv_sh(root, BRIDGE_SFT_VENV_MIN_GB="100000000")
    assert proc.returncode != 0
    assert "GB free" in proc.stderr and "Free some space" in proc.stderr
    assert not (root / ".venv").exists()


def test_a_failed_pip_step_removes_the_partial_venv_and_says_which_step(tmp_path):
    root = scratch_repo(tmp_path)
    proc = venv_sh(root, PIP_NO_INDEX="1", PIP_FIND_LINKS="")  # every download fails
    assert proc.returncode != 0
    assert "setting up .venv failed (step: " in proc.stderr and "The partial .venv was removed" in proc.stderr
    assert not (root / ".venv").exists()  # nothing a later run could trust
