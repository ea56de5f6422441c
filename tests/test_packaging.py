"""Packaging: tasks.py's install recipe, applied to a fresh virtualenv with a real (non-editable) install.

One virtualenv for the module (about 20-40 s: `python -m venv`, then the project and its pinned
dependencies from the package index, most from pip's cache): a copy of the checkout is installed
with exactly the pip commands tasks.py runs (`tasks.install_commands`: the lock file with
--require-hashes --no-deps, then the project), except that the project itself is installed as a
wheel rather than editable, so the installed package must stand alone.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import tomllib
import venv
from pathlib import Path

import pytest

from .serverproc import ROOT

# Never copied: environments, build output, data, caches, and the version control.
IGNORED = shutil.ignore_patterns(
    ".git", ".venv", "build", "data", "__pycache__", "*.egg-info", ".pytest_cache", "bench"
)


def load_tasks():
    spec = importlib.util.spec_from_file_location("imagegen_tasks", ROOT / "tasks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_in(python: Path, code: str, cwd: Path) -> str:
    done = subprocess.run([str(python), "-c", code], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The python of a fresh virtualenv into which tasks.py's recipe installed a copy of the project."""
    base = tmp_path_factory.mktemp("packaging")
    project = base / "project"
    shutil.copytree(ROOT, project, ignore=IGNORED, symlinks=True)
    env_dir = base / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    for command in load_tasks().install_commands(python, "", project=project, editable=False):
        subprocess.run(command, cwd=base, check=True, timeout=600)
    shutil.rmtree(project)  # the installed package must not need the copy it was built from
    return python


@pytest.mark.timeout(900)
def test_install_brings_no_django_but_the_documentation_files(installed: Path, tmp_path: Path) -> None:
    found = json.loads(run_in(installed, """if True:
        import importlib.metadata, importlib.util, json
        from imagegen.api import docs
        names = sorted(d.metadata["Name"].lower() for d in importlib.metadata.distributions())
        assets = {name: (docs._assets_dir() / relative).is_file() for name, (relative, _) in docs.ASSETS.items()}
        print(json.dumps({"names": names, "assets": assets}))
    """, cwd=tmp_path))
    assert "django" not in found["names"]
    assert "drf-spectacular-sidecar" in found["names"] and "imagegen" in found["names"]
    assert found["assets"] and all(found["assets"].values()), found["assets"]


def locked(name: str) -> dict[str, str]:
    """A lock file's entries: `name==version` to its hash options, as written."""
    text = (ROOT / name).read_text(encoding="utf-8")
    found = re.findall(r"^([A-Za-z0-9._-]+==\S+)((?: \\\n +--hash=sha256:[0-9a-f]{64})+)", text, re.M)
    return {pin.lower(): hashes for pin, hashes in found}


def test_the_locks_pin_everything_pyproject_asks_for_with_hashes_and_no_django() -> None:
    with open(ROOT / "pyproject.toml", "rb") as file:
        project = tomllib.load(file)
    asked = project["project"]["dependencies"] + project["tool"]["imagegen"]["no-deps-dependencies"]
    for lock, wanted in (("requirements.lock", asked), ("requirements-test.lock", asked + project["project"]["optional-dependencies"]["test"])):
        entries = locked(lock)
        pins = {re.sub(r"\[.*\]", "", pin).lower() for pin in wanted}
        assert pins <= set(entries), f"{lock} is stale: python3 tasks.py lock ({sorted(pins - set(entries))})"
        assert not any(pin.startswith("django==") for pin in entries)
        # Every requirement line of the file was parsed: each one is pinned with a hash.
        lines = [line for line in (ROOT / lock).read_text().splitlines() if re.match(r"[A-Za-z0-9]", line)]
        assert len(lines) == len(entries)
    # What runs is what was tested: each distribution the run lock pins, the test lock pins alike.
    run, test = locked("requirements.lock"), locked("requirements-test.lock")
    assert {pin: test.get(pin) for pin in run} == run


def test_the_recipe_installs_exactly_the_lock_then_the_project() -> None:
    locks, project = load_tasks().install_commands(Path("python"), "[test]")
    assert locks[-4:] == ["--require-hashes", "--no-deps", "-r", str(ROOT / "requirements-test.lock")]
    assert project[-3:] == ["--no-deps", "-e", str(ROOT)]




@pytest.mark.timeout(900)
def test_the_installed_package_runs_outside_the_checkout(installed: Path, tmp_path: Path) -> None:
    out = run_in(installed, "from imagegen.store.sqlite import migrations; print(len(migrations()))", cwd=tmp_path)
    assert int(out) == len(list((ROOT / "imagegen" / "store" / "migrations" / "sqlite").glob("*.sql"))) + 1


@pytest.mark.timeout(900)
def test_the_wheel_carries_the_license(installed: Path, tmp_path: Path) -> None:
    out = run_in(installed, """if True:
        import importlib.metadata as m
        d = m.distribution("imagegen")
        print(d.metadata.get("License-Expression"))
        print(any(str(f).endswith("LICENSE") for f in d.files))
    """, cwd=tmp_path)
    assert out.split() == ["MIT", "True"]
