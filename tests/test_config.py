"""Settings: config.toml defaults, environment overrides, and clear errors for bad values."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from pydantic import BaseModel

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
            "IMAGEGEN_PROVIDER__OPENAI__BASE_URL": "http://127.0.0.1:8080/",
            "IMAGEGEN_PROVIDER__OPENAI__MAX_N_PER_REQUEST": "4",
            "IMAGEGEN_PROVIDER__AUTOMATIC1111__NEGATIVE_PROMPT": "blurry, text",
        },
    )
    assert settings.server.port == 9000
    assert str(settings.storage.data_dir) == "/srv/imagegen"
    assert settings.provider.delay_s == 2.0
    assert settings.jobs.animals == ("cat", "owl")
    # A sub-section's key: IMAGEGEN_<SECTION>__<SUBSECTION>__<KEY>; its other keys keep config.toml's values.
    assert settings.provider.openai.base_url == "http://127.0.0.1:8080"
    assert settings.provider.openai.max_n_per_request == 4
    assert settings.provider.openai.model == "dall-e-3"
    assert settings.provider.automatic1111.negative_prompt == "blurry, text"


def test_config_toml_shows_every_key() -> None:
    from imagegen.config import Settings

    def missing(model: type[BaseModel], table: dict, where: str) -> list[str]:
        gaps = []
        for name, field in model.model_fields.items():
            if name not in table:
                gaps.append(f"{where}{name}")
            elif isinstance(field.default, BaseModel):
                gaps += missing(type(field.default), table[name], f"{where}{name}.")
        return gaps

    shipped = tomllib.loads((ROOT / "config.toml").read_text(encoding="utf-8"))
    assert missing(Settings, shipped, "") == []


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
        ({"IMAGEGEN_PROVIDER__OPENAI__MODLE": "dall-e-2"}, "provider.openai.modle"),
        ({"IMAGEGEN_PROVIDER__OPENAI__BASE_URL": "https://api.openai.com/v1"}, "provider.openai.base_url"),
        ({"IMAGEGEN_PROVIDER__OPENAI__RESPONSE_FORMAT": "png"}, "provider.openai.response_format"),
        ({"IMAGEGEN_PROVIDER__AUTOMATIC1111__BASE_URL": "localhost:7860"}, "provider.automatic1111.base_url"),
        ({"IMAGEGEN_PROVIDER__AUTOMATIC1111__USERNAME": "me"}, "provider.automatic1111"),
        ({"IMAGEGEN_PROVIDER__MAX_CONCURRENCY": "-1"}, "provider.max_concurrency"),
        ({"IMAGEGEN_PROVIDER__READ_TIMEOUT_S": "0"}, "provider.read_timeout_s"),
        ({"IMAGEGEN_PROVIDER__NAME__X": "1"}, "[provider.name] is not a section"),
        ({"IMAGEGEN_PROVIDER____MODEL": "1"}, "IMAGEGEN_PROVIDER____MODEL"),
    ],
)
def test_bad_settings_name_the_key(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_settings(ROOT / "config.toml", environ=env)


@pytest.mark.parametrize(
    "origin",
    ["https://app.example.com/", "https://app.example.com/path", "app.example.com", "*", "https://",
     "http://a.test:70000", "https://app.example.com?x=1", "https://ex ample.com"],
)
def test_an_origin_that_is_not_scheme_host_port_names_the_key(origin: str) -> None:
    env = {"IMAGEGEN_SERVER__CORS_ORIGINS": f'["https://ok.test", "{origin}"]'}
    message = r"^server\.cors_origins\.1: .*is not an origin: scheme://host\[:port\]"
    with pytest.raises(ConfigError, match=message):
        load_settings(ROOT / "config.toml", environ=env)


def test_origins_are_kept_as_browsers_send_them() -> None:
    written = ["HTTPS://App.Example.COM:443", "http://a.test:80", "http://a.test:8080", "http://[::1]:5173"]
    env = {"IMAGEGEN_SERVER__CORS_ORIGINS": json.dumps(written)}  # a JSON list of strings is TOML too
    settings = load_settings(ROOT / "config.toml", environ=env)
    assert settings.server.cors_origins == (
        "https://app.example.com", "http://a.test", "http://a.test:8080", "http://[::1]:5173"
    )


@pytest.mark.parametrize(
    ("network", "why"),
    [("10.0.0.1/8", "has host bits set"), ("localhost", "does not appear to be"), ("10.0.0.0/33", ""),
     ("127.0.0.1 ", "")],
)
def test_a_malformed_proxy_network_names_the_key(network: str, why: str) -> None:
    env = {"IMAGEGEN_SERVER__TRUSTED_PROXIES": json.dumps(["::1", network])}
    message = rf"^server\.trusted_proxies\.1: .*not an address or a network.*{why}"
    with pytest.raises(ConfigError, match=message):
        load_settings(ROOT / "config.toml", environ=env)


def test_proxies_are_addresses_or_networks() -> None:
    env = {"IMAGEGEN_SERVER__TRUSTED_PROXIES": '["127.0.0.1", "10.0.0.0/8", "::1", "fd00::/8"]'}
    settings = load_settings(ROOT / "config.toml", environ=env)
    assert [str(network) for network in settings.server.trusted_proxies] == [
        "127.0.0.1/32", "10.0.0.0/8", "::1/128", "fd00::/8"
    ]


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("[workers]\ncount = 'many'\n", "workers.count"),
        ("[server]\ntrusted_proxies = ['10.0.0.0/33']\n", "server.trusted_proxies.0"),
        ("[server]\ncors_origins = ['https://app.example.com/']\n", "server.cors_origins.0"),
    ],
)
def test_server_refuses_bad_config_with_one_line_and_nonzero_exit(tmp_path: Path, toml: str, key: str) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(toml)
    result = subprocess.run(
        [sys.executable, "server.py", "--config", str(bad)], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0], lines
