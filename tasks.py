"""One command to set up and run imagegen, or to set up and run its tests; needs only Python 3.11+.

    python3 tasks.py run  [server.py arguments...]   # create .venv if needed, start the service
    python3 tasks.py test [pytest arguments...]      # the same, plus Chromium (apt-get, as root) where
                                                     # missing, then run the test suite
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PYTHON = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
STAMP = VENV / ".imagegen-installed"

EXTRAS = {"run": "", "test": "[test]"}


def ensure_env(extras: str) -> None:
    """Create .venv and install the project (with `extras`) unless pyproject.toml is unchanged."""
    if sys.version_info < (3, 11):
        sys.exit("imagegen needs Python 3.11 or newer")
    if not PYTHON.exists():
        print("creating .venv ...", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    wanted = f"{extras}:{(ROOT / 'pyproject.toml').stat().st_mtime_ns}"
    if STAMP.exists() and STAMP.read_text() in (wanted, f"[test]:{wanted.split(':', 1)[1]}"):
        return  # already installed for this pyproject.toml ([test] includes everything run needs)
    print(f"installing imagegen{extras} into .venv ...", flush=True)
    subprocess.run(
        [str(PYTHON), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-e", f".{extras}"],
        cwd=ROOT,
        check=True,
    )
    STAMP.write_text(wanted)


def ensure_chromium() -> None:
    """The browser tests drive Debian's headless Chromium: install it where it is missing."""
    if shutil.which("chromium"):
        return
    if not (shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0):
        sys.exit("the browser tests need Chromium: install Debian's `chromium` package (apt-get install chromium)")
    print("installing chromium (apt-get) for the browser tests ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"], check=True, env=env)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in EXTRAS:
        print(__doc__, file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    ensure_env(EXTRAS[command])
    if command == "test":
        ensure_chromium()
    if command == "run":
        args = [str(PYTHON), "server.py", *rest]
    else:
        args = [str(PYTHON), "-m", "pytest", *rest]
    return subprocess.run(args, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
