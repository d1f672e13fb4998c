"""Test sessions, one per supported Python: ``nox`` runs them all, ``nox -s tests-3.12`` one.

Each session makes a fresh virtual environment, installs ``.[test]`` and runs
the suite.  The 3.11 session also installs the CPU build of torch 2.13.0 that
this machine kind keeps on disk (a wheel for Python 3.11 only), so the
reference decoder's CPU tests run there and skip in the other sessions.
Interpreters are found on ``PATH`` or, failing that, in pyenv's versions folder.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess

import nox

PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
#: The Python whose session also runs the reference decoder's torch tests.
TORCH_PYTHON = "3.11"
TORCH = "torch==2.13.0"

nox.options.default_venv_backend = "venv"


def _works(exe: str | None) -> bool:
    """Whether ``exe`` starts (a pyenv shim for a version not selected does not)."""
    if exe is None:
        return False
    return subprocess.run([exe, "-c", "pass"], capture_output=True).returncode == 0


def _add_pyenv_to_path() -> None:
    """Put pyenv's ``versions/X.Y.*/bin`` on ``PATH`` for every version not found there."""
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    for version in PYTHONS:
        if _works(shutil.which(f"python{version}")):
            continue
        found = sorted(glob.glob(os.path.join(root, "versions", f"{version}.*", "bin")))
        if found:
            os.environ["PATH"] = found[-1] + os.pathsep + os.environ.get("PATH", "")


_add_pyenv_to_path()


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The README's test command, ``pip install -e '.[test]' && python -m pytest -q``."""
    session.install("-e", ".[test]")
    if session.python == TORCH_PYTHON:
        try:
            session.install(TORCH)
        except nox.command.CommandFailed:
            session.warn(f"{TORCH} not installed: reference-decoder tests will be skipped")
    session.run("python", "-m", "pytest", "-q", *session.posargs)
