"""Settings of every process (service, agent, command line) from flags and the environment.

Each process describes its settings once, as a pydantic-settings model; `options_parser` turns
every field into a flag (`resend_after` -> `--resend-after`) whose environment variable is
`IMAGE_` plus the field's name (`IMAGE_RESEND_AFTER`), in every process. A flag
wins over its variable, which wins over the default. A bad value ends the process with one line
naming the flag and the variable, and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn, TypeVar, get_args, get_origin

from pydantic import AfterValidator, BeforeValidator, Field, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from image_service.protocol.broker import Broker, BrokerConfigError

S = TypeVar("S", bound=BaseSettings)
ENV_PREFIX = "IMAGE_"
USAGE_ERROR = 2
# A queue name is at most 255 bytes, and the longest one is `NS.agent.<32 hex>`.
_NAMESPACE = re.compile(r"^[^\s\x00-\x1f\x7f]{1,200}$")
_USERINFO = re.compile(r"(?<=://)[^/@\s]*@")


def _namespace(value: str) -> str:
    if not _NAMESPACE.match(value) or len(value.encode()) > 200:
        raise ValueError("1 to 200 bytes, without white space or control characters")
    return value


def _amqp_url(value: str) -> str:
    if not value.startswith(("amqp://", "amqps://")):
        raise ValueError("must start with amqp:// or amqps://")
    return value


def split_host_port(value: str) -> tuple[str, int]:
    """`HOST:PORT` (`[::1]:PORT` for IPv6) as (host, port); ValueError says what is wrong."""
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ValueError("HOST:PORT, for example 127.0.0.1:8080 or [::1]:8080")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"port {port!r} is not 0-65535")
    if not host or any(c.isspace() for c in host):
        raise ValueError(f"host {host!r} is not a host name or address")
    return host, int(port)


def _host_port(value: str) -> str:
    split_host_port(value)
    return value


# The types of the settings every process shares.
HostPort = Annotated[str, AfterValidator(_host_port)]
Namespace = Annotated[str, AfterValidator(_namespace)]
AmqpUrl = Annotated[str, AfterValidator(_amqp_url)]
LogLevel = Annotated[
    Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
    BeforeValidator(lambda v: v.upper() if isinstance(v, str) else v),
]


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


class BusSettings(BaseSettings):
    """What every process needs to reach the others. All three read `IMAGE_` plus the flag's
    name from the environment (the contract's convention: `IMAGE_AMQP_URL`, `IMAGE_NAMESPACE`,
    and for the flags it adds later `IMAGE_ALLOW_NETWORKS`, `IMAGE_SERVICE_USER` ...)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")

    amqp_url: AmqpUrl = Field(
        "amqp://guest:guest@127.0.0.1:5672/", description="the RabbitMQ broker"
    )
    namespace: Namespace = Field("image", description="prefix of every queue and exchange")
    amqp_ca_file: Path | None = Field(
        None,
        description="CA certificates that verify the broker's certificate (amqps://; default:"
        " the system's)",
    )
    amqp_cert_file: Path | None = Field(
        None,
        description="client certificate (amqps://); with no user in the url it logs in with"
        " RabbitMQ's EXTERNAL mechanism as the user the certificate names",
    )
    amqp_key_file: Path | None = Field(None, description="the client certificate's key")

    def broker(self, prog: str) -> Broker:
        """How to reach the broker and as whom; a configuration that cannot work ends the
        process with one line (exit 2)."""
        try:
            return Broker.configure(
                self.amqp_url,
                ca_file=self.amqp_ca_file,
                cert_file=self.amqp_cert_file,
                key_file=self.amqp_key_file,
            )
        except BrokerConfigError as exc:
            exit_with(prog, f"{flag_of('amqp_url')}: {exc}", USAGE_ERROR)


def env_of(name: str) -> str:
    return (ENV_PREFIX + name).upper()


def _is_list(info: FieldInfo) -> bool:
    annotation = info.annotation
    if get_origin(annotation) in (list, tuple):
        return True
    return any(get_origin(arg) in (list, tuple) for arg in get_args(annotation))


def options_parser(
    model: type[BaseSettings], *, prog: str, description: str | None
) -> argparse.ArgumentParser:
    """A parser with one option per field of `model` (and no defaults of its own: an option
    not given is left to the environment, then to the model's default)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for name, info in model.model_fields.items():
        env = env_of(name)
        extra = info.json_schema_extra
        if isinstance(extra, dict) and extra.get("env_only"):
            continue  # a secret: from the environment only, never from a visible command line
        # A default computed by a factory (the host's name) is not computed for the help: the
        # parser is built at every start.
        plain_default = not info.is_required() and info.default_factory is None
        default = f"; default {info.default!r}" if plain_default else ""
        help_text = f"{info.description or ''} (env {env}{default})".strip()
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        if info.annotation is bool:
            parser.add_argument(flag_of(name), action="store_true", **kwargs)
        elif _is_list(info):
            parser.add_argument(flag_of(name), action="append", metavar="VALUE", **kwargs)
        else:
            parser.add_argument(flag_of(name), metavar=name.split("_")[-1].upper(), **kwargs)
    return parser


def settings_from(model: type[S], parser: argparse.ArgumentParser, args: argparse.Namespace) -> S:
    """The settings: flags given in `args`, then the environment, then defaults."""
    given = {name: value for name, value in vars(args).items() if name in model.model_fields}
    try:
        return model(**given)
    except ValidationError as exc:
        _fail(parser, model, exc)
    except SettingsError as exc:  # an environment variable that is not valid JSON for a list
        match = re.search(r'field "(\w+)"', str(exc))
        if match is None or match.group(1) not in model.model_fields:
            parser.exit(USAGE_ERROR, f"{parser.prog}: {exc}\n")
        name = match.group(1)
        parser.exit(
            USAGE_ERROR,
            f"{parser.prog}: {flag_of(name)} / {env_of(name)}: the variable must be JSON"
            ' (a list is written ["a", "b"])\n',
        )


def _fail(
    parser: argparse.ArgumentParser, model: type[BaseSettings], exc: ValidationError
) -> NoReturn:
    lines = []
    for error in exc.errors(include_url=False):
        name = str(error["loc"][0]) if error["loc"] else ""
        where = f"{flag_of(name)} / {env_of(name)}" if name in model.model_fields else name
        given = "" if error["type"] == "missing" else f" (got {_redacted(error.get('input'))!r})"
        message = error["msg"].removeprefix("Value error, ")
        lines.append(f"{parser.prog}: {where}: {message}{given}")
    parser.exit(USAGE_ERROR, "\n".join(lines) + "\n")


def _redacted(value: Any) -> Any:
    """A value fit for an error line: no password of a url in it."""
    return _USERINFO.sub("***@", value) if isinstance(value, str) else value


def exit_with(prog: str, message: str, code: int = 1) -> NoReturn:
    print(f"{prog}: {message}", file=sys.stderr)
    raise SystemExit(code)
