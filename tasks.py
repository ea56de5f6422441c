"""One command to set up and run imagegen, or to set up and run its tests; needs only Python 3.11+.

    python3 tasks.py run  [server.py arguments...]   # create .venv if needed, start the service
    python3 tasks.py test [pytest arguments...]      # the same, plus Chromium and PostgreSQL (apt-get,
                                                     # as root) where missing, then run the test suite
    python3 tasks.py lock [pip-compile options...]   # refresh requirements.lock and requirements-test.lock
                                                     # from pyproject.toml (e.g. --upgrade: newest allowed)
    python3 tasks.py new-key NAME [MAX_PENDING]      # a new random API key for [auth] keys, and the line to paste
    python3 tasks.py new-secret                      # a new random secret for [auth] secret_env's variable
    python3 tasks.py new-webhook-secret              # a new whsec_ secret for [webhooks] secret_env's variable
    python3 tasks.py --help                          # this text

What is installed is what the lock files name, every transitive dependency pinned with its hashes,
so the versions tested are the versions run. They are made for Linux x86_64 and CPython 3.11.

After the set-up, the command replaces this process (exec): the service (or pytest) runs as this
very process, so Ctrl-C and SIGTERM reach it alone and stop it as they stop server.py.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import venv
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PYTHON = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
STAMP = VENV / ".imagegen-installed"
APT_ENV = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}

EXTRAS = {"run": "", "test": "[test]"}
# What each set of extras installs: every distribution, pinned, with its hashes (python3 tasks.py lock).
LOCKS = {"": "requirements.lock", "[test]": "requirements-test.lock"}
PIP_TOOLS = "pip-tools==7.6.2"


def ensure_env(extras: str) -> None:
    """Create .venv and install the project (with `extras`) unless pyproject.toml and the locks are unchanged."""
    if sys.version_info < (3, 11):
        sys.exit("imagegen needs Python 3.11 or newer")
    if not PYTHON.exists():
        print("creating .venv ...", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    wanted = f"{extras}:{install_digest()}"
    if STAMP.exists() and STAMP.read_text() in (wanted, f"[test]:{wanted.split(':', 1)[1]}"):
        return  # already installed from these files ([test] includes everything run needs)
    print(f"installing imagegen{extras} into .venv ...", flush=True)
    for command in install_commands(PYTHON, extras):
        subprocess.run(command, cwd=ROOT, check=True)
    STAMP.write_text(wanted)


def install_digest() -> str:
    """What an install depends on: pyproject.toml and the lock files."""
    digest = hashlib.sha256()
    for name in ("pyproject.toml", *LOCKS.values()):
        path = ROOT / name
        digest.update(path.read_bytes() if path.exists() else b"")
    return digest.hexdigest()[:16]


def install_commands(python: Path, extras: str, project: Path = ROOT, editable: bool = True) -> list[list[str]]:
    """The pip commands that install the project (with `extras`) into the environment of `python`.

    First exactly the lock file's distributions (--require-hashes), with --no-deps: the lock already
    holds every dependency, and nothing else may come in (drf-spectacular-sidecar declares Django,
    which imagegen never imports; see pyproject.toml's [tool.imagegen]). Then the project itself,
    whose dependencies are all installed by then.
    """
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    return [
        [*pip, "--require-hashes", "--no-deps", "-r", str(project / LOCKS[extras])],
        [*pip, "--no-deps", *(["-e", str(project)] if editable else [str(project)])],
    ]


def no_deps_dependencies(project: Path = ROOT) -> list[str]:
    """pyproject.toml's [tool.imagegen] no-deps-dependencies: needed, but installed without theirs."""
    import tomllib  # here, not at the top: on Python < 3.11 ensure_env says what is wrong first

    with open(project / "pyproject.toml", "rb") as file:
        return list(tomllib.load(file)["tool"]["imagegen"]["no-deps-dependencies"])


def lock(options: list[str]) -> int:
    """Write requirements-test.lock (the project with [test]), then requirements.lock (without), each
    pinning every transitive dependency with its hashes, from pyproject.toml, with pip-compile. The
    run lock is constrained by the test lock, so each distribution they share has the same version.
    The no-deps dependencies are appended to both, pinned with hashes but without their dependencies.
    pip-tools runs from a throw-away virtualenv: nothing is installed into .venv."""
    if sys.version_info < (3, 11):
        sys.exit("imagegen needs Python 3.11 or newer")
    with tempfile.TemporaryDirectory(prefix="imagegen-lock-") as scratch:
        tools = Path(scratch) / "venv"
        venv.EnvBuilder(with_pip=True).create(tools)
        python = tools / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
        quiet = ["--quiet", "--disable-pip-version-check"]
        subprocess.run([str(python), "-m", "pip", "install", *quiet, PIP_TOOLS], check=True)
        compile_ = [
            str(python), "-m", "piptools", "compile", "--quiet", "--generate-hashes", "--allow-unsafe",
            "--strip-extras", "--no-emit-index-url", "--no-emit-find-links", *options,
        ]
        env = {**os.environ, "CUSTOM_COMPILE_COMMAND": "python3 tasks.py lock"}
        test_lock, run_lock = LOCKS["[test]"], LOCKS[""]
        for command in (
            [*compile_, "--extra", "test", "--output-file", test_lock, "pyproject.toml"],
            [*compile_, "--constraint", test_lock, "--output-file", run_lock, "pyproject.toml"],
        ):
            subprocess.run(command, cwd=ROOT, env=env, check=True)
        pinned = [pin_with_hashes(python, requirement, Path(scratch)) for requirement in no_deps_dependencies()]
        for name in (test_lock, run_lock):
            with open(ROOT / name, "a", encoding="utf-8") as file:
                file.write(
                    "# [tool.imagegen] no-deps-dependencies of pyproject.toml: needed, installed without\n"
                    "# their dependencies (tasks.py installs this whole file with --no-deps)\n"
                )
                file.writelines(pinned)
    print(f"wrote {test_lock} and {run_lock}", flush=True)
    return 0


def pin_with_hashes(python: Path, requirement: str, scratch: Path) -> str:
    """`requirement` (name==version) as a lock entry, with the hash of the wheel pip downloads for it."""
    into = scratch / "download" / requirement
    subprocess.run(
        [str(python), "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
         "--only-binary", ":all:", "--dest", str(into), requirement],
        check=True,
    )
    hashes = [f"    --hash=sha256:{hashlib.sha256(f.read_bytes()).hexdigest()}" for f in sorted(into.iterdir())]
    return " \\\n".join([requirement, *hashes]) + "\n"


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


def new_key(argv: list[str]) -> int:
    """Print a new API key (shown once: only its hash is kept) and its [auth] keys entry.

    The same key format and hash as imagegen/auth.py (new_key, key_hash), written out here because
    this runs without .venv; tests/test_tasks.py checks that the printed entry authenticates the key.
    """
    if len(argv) not in (1, 2) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", argv[0]) or (
        len(argv) == 2 and not (argv[1].isdigit() and int(argv[1]) >= 1)
    ):
        print("usage: python3 tasks.py new-key NAME [MAX_PENDING]  (NAME: letters, digits, . _ -; up to 64)",
              file=sys.stderr)
        return 2
    key = "ig_" + secrets.token_urlsafe(32)
    limit = f", max_pending = {int(argv[1])}" if len(argv) == 2 else ""
    entry = f'{{ name = "{argv[0]}", hash = "sha256:{hashlib.sha256(key.encode()).hexdigest()}"{limit} }}'
    print(f"key (give it to the client; it is not stored anywhere): {key}")
    print(f"add to [auth] keys in config.toml:  {entry}")
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    if argv[:1] == ["new-key"]:
        return new_key(argv[1:])
    if argv[:1] == ["new-secret"]:
        print(secrets.token_urlsafe(32))
        return 0
    if argv[:1] == ["new-webhook-secret"]:
        # Standard Webhooks' form: whsec_ and the base64 of 32 random bytes (imagegen/webhooks).
        print("whsec_" + base64.b64encode(secrets.token_bytes(32)).decode())
        return 0
    if argv[:1] == ["lock"]:
        return lock(argv[1:])
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
    return replace_process(args)


def replace_process(args: list[str]) -> int:
    """Become `args` (exec, in ROOT): no parent stays behind to be signalled, orphaned or to signal
    twice. Windows has no exec that keeps the process (os.execv there starts a new one and exits,
    which a console's Ctrl-C would not follow), so there it runs `args` as a child and waits."""
    os.chdir(ROOT)
    if os.name == "nt":
        return subprocess.run(args).returncode
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(args[0], args)
    raise AssertionError("unreachable: os.execv returns only by raising")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
