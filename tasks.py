"""One command to set up and run imagegen, or to set up and run its tests; needs only Python 3.11+.

    python3 tasks.py run  [server.py arguments...]   # create .venv if needed, start the service
    python3 tasks.py test [pytest arguments...]      # the same, plus Chromium and PostgreSQL (apt-get,
                                                     # as root) where missing, then run the test suite
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import venv
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PYTHON = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
STAMP = VENV / ".imagegen-installed"
APT_ENV = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}

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
    apt_install("chromium", "the browser tests need Chromium")


def ensure_postgresql() -> None:
    """The tests start a private PostgreSQL server of their own (tests/pgserver.py), so they need its
    programs, not a running server: install Debian's `postgresql` where they are missing. Not needed
    when IMAGEGEN_TEST_DATABASE_URL names a server to use instead."""
    if os.environ.get("IMAGEGEN_TEST_DATABASE_URL") or have_postgresql_server():
        return
    # The package would also create and start a `main` cluster on the default port, which the tests
    # never use: a drop-in that postgresql-common's createcluster.conf includes tells its postinst not
    # to create one, so there is nothing to start. Removed afterwards, to leave /etc as it was.
    dropin = Path("/etc/postgresql-common/createcluster.d/imagegen-no-main-cluster.conf")
    why = "the tests need PostgreSQL's server programs (initdb, pg_ctl, postgres)"
    try:
        apt_install("postgresql", why, before=lambda: write_file(dropin, "create_main_cluster = off\n"))
    finally:
        dropin.unlink(missing_ok=True)


def have_postgresql_server() -> bool:
    """initdb and pg_ctl in PATH or in Debian's /usr/lib/postgresql/<version>/bin (not in PATH).
    A copy of tests/pgserver.py's find_pg_bin(): this runs before .venv exists."""
    dirs = [Path(found).resolve().parent for found in [shutil.which("pg_ctl")] if found]
    dirs += Path("/usr/lib/postgresql").glob("*/bin")
    return any((d / "initdb").exists() and (d / "pg_ctl").exists() for d in dirs)


def apt_install(package: str, why: str, before: Callable[[], None] = lambda: None) -> None:
    """Install a Debian package with apt-get (as root; otherwise say what to install), after `before`."""
    if not (shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0):
        sys.exit(f"{why}: install Debian's `{package}` package (apt-get install {package})")
    print(f"installing {package} (apt-get): {why} ...", flush=True)
    apt_get_update()
    before()
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", package]
    subprocess.run(install, check=True, env=APT_ENV)


@functools.cache
def apt_get_update() -> None:
    """Refresh the package lists once per run, however many packages are missing."""
    subprocess.run(["apt-get", "update", "-q"], check=True, env=APT_ENV)


def write_file(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in EXTRAS:
        print(__doc__, file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    ensure_env(EXTRAS[command])
    if command == "test":
        ensure_chromium()
        ensure_postgresql()
    if command == "run":
        args = [str(PYTHON), "server.py", *rest]
    else:
        args = [str(PYTHON), "-m", "pytest", *rest]
    return subprocess.run(args, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
