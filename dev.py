#!/usr/bin/env python3
"""Set up and run Switchboard from a fresh clone with nothing but Python 3.11+.

    python3 dev.py up [--external]   create .venv, install the pinned stack, run the gateway
    python3 dev.py test [pytest args] create .venv, install test tools, run lint, types and tests
    python3 dev.py bench [--quick]   create .venv, run the benchmark (see bench/README.md)

The virtual environment is reinstalled only when a lock file or pyproject.toml changes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("SWITCHBOARD_VENV", ROOT / ".venv"))
BIN = VENV / "bin"


def run(*argv: str | Path) -> None:
    print("$", " ".join(str(a) for a in argv), flush=True)
    subprocess.run([str(a) for a in argv], cwd=ROOT, check=True)


def ensure_venv(lock: str) -> None:
    inputs = [ROOT / "pyproject.toml", ROOT / "requirements.lock", ROOT / lock]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in inputs)).hexdigest()
    stamp = VENV / f".installed-{lock}"
    if stamp.exists() and stamp.read_text() == digest:
        return
    if not (BIN / "python").exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    pip = [BIN / "python", "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    run(*pip, "-r", ROOT / lock)
    run(*pip, "--no-deps", "-e", ROOT)
    stamp.write_text(digest)


def test(args: list[str]) -> int:
    ensure_venv("requirements-dev.lock")
    checks = [
        [BIN / "ruff", "check", "."],
        [BIN / "ruff", "format", "--check", "."],
        [BIN / "mypy"],
        [BIN / "lint-imports"],
    ]
    for check in checks:
        run(*check)
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    return subprocess.run([str(BIN / "python"), "-m", "pytest", *args], cwd=ROOT).returncode


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        return 0 if len(sys.argv) >= 2 else 2
    command, args = sys.argv[1], sys.argv[2:]
    try:
        if command == "test":
            return test(args)
        ensure_venv("requirements.lock")
        if command == "bench":
            return subprocess.run([str(BIN / "python"), "-m", "bench", *args], cwd=ROOT).returncode
    except subprocess.CalledProcessError as exc:
        return exc.returncode or 1
    os.execv(BIN / "switchboard", [str(BIN / "switchboard"), command, *args])


if __name__ == "__main__":
    sys.exit(main())
