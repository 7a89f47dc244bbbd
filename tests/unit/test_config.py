"""Settings of the three processes: every flag has an environment variable; a flag wins over
its variable; a bad value is one line naming both, and exit code 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from backup_agent.config import AgentSettings
from backup_agent.main import parse_args as agent_args
from image_service.cli import CliSettings
from image_service.config import ServiceSettings
from image_service.main import parse_args as service_args
from image_service.protocol.config import env_of, flag_of, options_parser


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("IMAGE_"):
            monkeypatch.delenv(name)


@pytest.mark.parametrize("model", [ServiceSettings, AgentSettings, CliSettings])
def test_every_field_is_a_flag_with_an_environment_variable(model) -> None:  # type: ignore[no-untyped-def]
    parser = options_parser(model, prog="x", description=None)
    flags = {a.option_strings[0] for a in parser._actions if a.option_strings[1:2] != ["--help"]}
    for name, info in model.model_fields.items():
        assert env_of(name) == "IMAGE_" + name.upper()
        secret = isinstance(info.json_schema_extra, dict) and info.json_schema_extra.get("env_only")
        # A secret is read from the environment only: a command line is visible to every user.
        assert (flag_of(name) in flags) is not secret, name


def test_the_admin_password_comes_from_the_environment_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert service_args([]).settings.admin_password.get_secret_value() == "password"
    monkeypatch.setenv("IMAGE_ADMIN_PASSWORD", "from-env")
    assert service_args([]).settings.admin_password.get_secret_value() == "from-env"
    with pytest.raises(SystemExit):
        service_args(["--admin-password", "visible"])


def test_every_process_follows_the_contract_naming_of_variables() -> None:
    for model in (ServiceSettings, AgentSettings, CliSettings):
        assert {"amqp_url", "namespace"} <= set(model.model_fields)
    assert env_of("amqp_url") == "IMAGE_AMQP_URL"
    assert env_of("namespace") == "IMAGE_NAMESPACE"
    assert env_of("database_url") == "IMAGE_DATABASE_URL"
    assert env_of("resend_after") == "IMAGE_RESEND_AFTER"
    assert env_of("root") == "IMAGE_ROOT"


def test_defaults_environment_and_flags_in_that_order(monkeypatch: pytest.MonkeyPatch) -> None:
    run = service_args([])
    assert (run.command, run.settings.resend_after, run.settings.namespace) == (
        "run",
        30.0,
        "image",
    )
    monkeypatch.setenv("IMAGE_RESEND_AFTER", "5")
    monkeypatch.setenv("IMAGE_NAMESPACE", "fromenv")
    settings = service_args([]).settings
    assert (settings.resend_after, settings.namespace) == (5.0, "fromenv")
    run = service_args(["migrate", "--resend-after", "7.5"])
    assert (run.command, run.settings.resend_after, run.settings.namespace) == (
        "migrate",
        7.5,
        "fromenv",
    )
    run = service_args(["set-password", "admin", "--create"])
    assert (run.command, run.account, run.create) == ("set-password", "admin", True)


@pytest.mark.parametrize(
    "argv", [["set-password"], ["run", "admin"], ["migrate", "--create"], ["--create"]]
)
def test_set_password_takes_an_account_and_only_it_does(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        service_args(argv)
    assert caught.value.code == 2


def test_agent_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("IMAGE_AMQP_URL", "amqp://a:b@host:5672/")
    settings = agent_args(
        [
            "--root",
            str(tmp_path),
            "--name",
            "bs1",
            "--volume-root",
            "/a",
            "--volume-root",
            "/b",
            "--trust-on-first-use",
            "--capacity",
            "1000",
        ]
    )
    assert settings.amqp_url == "amqp://a:b@host:5672/"
    assert [str(p) for p in settings.volume_root] == ["/a", "/b"]
    assert settings.fetch.trust_on_first_use is True
    assert settings.capacity == 1000
    monkeypatch.setenv("IMAGE_ROOT", str(tmp_path))
    monkeypatch.setenv("IMAGE_NAME", "bs2")
    assert agent_args([]).name == "bs2"


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [
        (["--resend-after", "soon"], {}, "--resend-after / IMAGE_RESEND_AFTER"),
        ([], {"IMAGE_RESEND_AFTER": "soon"}, "--resend-after / IMAGE_RESEND_AFTER"),
        (["--monitor-interval", "-1"], {}, "--monitor-interval / IMAGE_MONITOR_INTERVAL"),
        (["--namespace", "a b"], {}, "--namespace / IMAGE_NAMESPACE"),
        ([], {"IMAGE_AMQP_URL": "http://x"}, "--amqp-url / IMAGE_AMQP_URL"),
        (["--log-level", "LOUD"], {}, "--log-level / IMAGE_LOG_LEVEL"),
        (["--namespace", "x" * 201], {}, "--namespace / IMAGE_NAMESPACE"),
    ],
)
def test_a_bad_value_is_one_line_and_exit_2(
    argv: list[str],
    env: dict[str, str],
    named: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as excinfo:
        service_args(argv)
    assert excinfo.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"image-service: {named}: "), err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_agent_needs_root_and_name(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        agent_args(["--name", "bs1"])
    assert excinfo.value.code == 2
    assert "--root / IMAGE_ROOT: Field required" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command",
    [
        ["image_service.main", "--resend-after", "abc"],
        ["backup_agent.main", "--root", "/tmp", "--name", "x", "--heartbeat-interval", "0"],
        ["image_service.cli", "--timeout", "never", "QueryImage"],
    ],
)
def test_the_real_commands_exit_2_without_a_traceback(command: list[str]) -> None:
    env = {"PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", *command], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 2, done
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr


def test_log_levels_in_any_case(monkeypatch: pytest.MonkeyPatch) -> None:
    assert service_args(["--log-level", "debug"]).settings.log_level == "DEBUG"
    monkeypatch.setenv("IMAGE_LOG_LEVEL", "warning")
    assert service_args([]).settings.log_level == "WARNING"


def test_namespaces_beyond_letters_are_kept() -> None:
    assert service_args(["--namespace", "tenant/a:b"]).settings.namespace == "tenant/a:b"


def test_errors_never_print_a_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("IMAGE_DATABASE_URL", "mysql://user:SECRET@db/images")
    with pytest.raises(SystemExit):
        service_args(["--amqp-url", "http://user:SECRET@broker/"])
    err = capsys.readouterr().err
    assert "SECRET" not in err and err.count("***@") == 2, err
    with pytest.raises(SystemExit):
        agent_args(["--name", "n", "--amqp-url", "amqp://user:SECRET@broker/"])
    err = capsys.readouterr().err
    assert "SECRET" not in err and "--root / IMAGE_ROOT: Field required" in err


def test_a_list_variable_that_is_not_json_names_its_flag(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("IMAGE_VOLUME_ROOT", "/a")
    with pytest.raises(SystemExit) as excinfo:
        agent_args(["--root", str(tmp_path), "--name", "n"])
    assert excinfo.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("backup-agent: --volume-root / IMAGE_VOLUME_ROOT: "), err
    monkeypatch.setenv("IMAGE_VOLUME_ROOT", '["/a", "/b"]')
    settings = agent_args(["--root", str(tmp_path), "--name", "n"])
    assert [str(p) for p in settings.volume_root] == ["/a", "/b"]
