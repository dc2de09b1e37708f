#!/usr/bin/env python3
"""Set up and run Switchboard from a fresh clone with nothing but Python 3.11+.

    python3 dev.py up [--external]   create .venv, install the pinned stack, run the gateway
    python3 dev.py test [pytest args] create .venv, install test tools (and Chromium with apt-get when
                                      missing), run lint, types and tests
    python3 dev.py bench [--quick]   create .venv, run the benchmark (see bench/README.md)

The virtual environment is reinstalled only when a lock file or pyproject.toml changes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
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


def ensure_chromium() -> None:
    """The console's browser tests drive the operating system's Chromium through Playwright
    (never `playwright install`: its download hosts may be unreachable). Install it with apt-get
    where we can; elsewhere those tests skip and say why."""
    if Path("/usr/bin/chromium").exists() or not shutil.which("apt-get"):
        return
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    if sudo and not shutil.which("sudo"):
        print("no /usr/bin/chromium and no root: the browser tests will skip", flush=True)
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print("installing chromium for the browser tests (apt-get)", flush=True)
    try:
        subprocess.run([*sudo, "apt-get", "update", "-q"], check=True, env=env)
        subprocess.run(
            [*sudo, "apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"],
            check=True,
            env=env,
        )
    except subprocess.CalledProcessError as exc:
        print(f"could not install chromium ({exc}): the browser tests will skip", flush=True)


def test(args: list[str]) -> int:
    ensure_venv("requirements-dev.lock")
    ensure_chromium()
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
