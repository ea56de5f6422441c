"""Settings: config.toml defaults, environment overrides, and clear errors for bad values."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from imagegen.config import ConfigError, load_settings

ROOT = Path(__file__).resolve().parent.parent


def test_config_toml_holds_the_defaults() -> None:
    from imagegen.config import Settings

    assert load_settings(ROOT / "config.toml", environ={}) == Settings()


def test_environment_overrides_config() -> None:
    settings = load_settings(
        ROOT / "config.toml",
        environ={
            "IMAGEGEN_SERVER__PORT": "9000",
            "IMAGEGEN_STORAGE__DATA_DIR": "/srv/imagegen",
            "IMAGEGEN_PROVIDER__DELAY_S": "2",
            "IMAGEGEN_JOBS__ANIMALS": '["cat", "owl"]',
        },
    )
    assert settings.server.port == 9000
    assert str(settings.storage.data_dir) == "/srv/imagegen"
    assert settings.provider.delay_s == 2.0
    assert settings.jobs.animals == ("cat", "owl")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"IMAGEGEN_SERVER__PORT": "70000"}, "server.port"),
        ({"IMAGEGEN_SERVER__PROT": "1"}, "server.prot"),
        ({"IMAGEGEN_WORKERS__COUNT": "0"}, "workers.count"),
        ({"IMAGEGEN_PROVIDER__NAME": "dalle9"}, "provider.name"),
        ({"IMAGEGEN_JOBS__ANIMALS": "[]"}, "jobs.animals"),
        ({"IMAGEGEN_SERVER__PUBLIC_URL": "example.com"}, "server.public_url"),
        ({"IMAGEGEN_NOSECTION": "1"}, "IMAGEGEN_NOSECTION"),
        ({"IMAGEGEN_PROVIDER__PROMPT_TEMPLATE": "a {dog}"}, "provider.prompt_template"),
    ],
)
def test_bad_settings_name_the_key(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_settings(ROOT / "config.toml", environ=env)


def test_server_refuses_bad_config_with_one_line_and_nonzero_exit(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[workers]\ncount = 'many'\n")
    result = subprocess.run(
        [sys.executable, "server.py", "--config", str(bad)], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "workers.count" in lines[0]
