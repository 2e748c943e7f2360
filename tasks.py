#!/usr/bin/env python3
"""The project's two commands, needing nothing but Python 3.10+:

    python3 tasks.py demo   # set up .venv if needed, then run jobs/demo.yaml on local Ray
    python3 tasks.py test   # set up .venv if needed, then ruff, mypy and the tests

Extra arguments are passed on: `python3 tasks.py demo --weights none`,
`python3 tasks.py test -k tiling`.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / "bin"
EXTRAS = "dev,geo,s3,medical"


def sh(*cmd: str | Path) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], cwd=ROOT, check=True)


def ensure_env() -> None:
    """Create .venv and install the project with its extras, again whenever pyproject changes."""
    if sys.version_info < (3, 10):  # noqa: UP036 - this file runs before any install
        sys.exit("segbatch needs Python 3.10 or newer")
    if not (BIN / "python").exists():
        print(f"creating {VENV}", flush=True)
        venv.create(VENV, with_pip=True)
    stamp = VENV / ".segbatch-installed"
    inputs = (ROOT / "pyproject.toml").read_bytes() + (ROOT / "constraints.txt").read_bytes()
    digest = hashlib.sha256(inputs).hexdigest()
    if stamp.exists() and stamp.read_text() == digest:
        return
    # constraints.txt: one known-good set of versions, so pip's resolver has nothing to search
    # (unconstrained, it can backtrack into a dead end among s3fs, aiobotocore and boto3).
    sh(BIN / "python", "-m", "pip", "install", "-q", "-c", "constraints.txt", "-e", f".[{EXTRAS}]")
    stamp.write_text(digest)


def demo(args: list[str]) -> None:
    ensure_env()
    sh(BIN / "segbatch", "run", "jobs/demo.yaml", *args)


def test(args: list[str]) -> None:
    ensure_env()
    sh(BIN / "ruff", "check", ".")
    sh(BIN / "ruff", "format", "--check", ".")
    sh(BIN / "mypy")
    sh(BIN / "python", "-m", "pytest", *args)


def main() -> None:
    commands = {"demo": demo, "test": test}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        sys.exit(__doc__)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        commands[sys.argv[1]](sys.argv[2:])
    except subprocess.CalledProcessError as exc:
        sys.exit(exc.returncode)


if __name__ == "__main__":
    main()
