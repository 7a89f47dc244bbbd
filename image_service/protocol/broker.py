"""How a process reaches the broker, and as whom (contract section 8).

The broker user matters beyond logging in: every message a process publishes carries it as the
`user_id` property, which RabbitMQ validates (it refuses a message whose `user_id` is not the
publishing connection's user), so receivers can tell who sent it. The user is the one of the
URL; with a client certificate and no user in the URL, the process logs in with RabbitMQ's
EXTERNAL mechanism as the user its certificate names (its common name: the broker runs with
`ssl_cert_login_from = common_name`, see deploy/README.md).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from cryptography import x509
from cryptography.x509.oid import NameOID

# What RabbitMQ (and aiormq) take when a URL names no user.
DEFAULT_USER = "guest"


class BrokerConfigError(ValueError):
    """The TLS files or the URL cannot work together; the message says which and why."""


@dataclass(frozen=True, slots=True)
class Broker:
    url: str
    user: str
    ssl_context: ssl.SSLContext | None = None

    @classmethod
    def of(cls, target: Broker | str) -> Broker:
        return target if isinstance(target, Broker) else cls.plain(target)

    @classmethod
    def plain(cls, url: str) -> Broker:
        """A URL alone: its user (guest when it names none), the system's CAs for amqps."""
        return cls.configure(url)

    @classmethod
    def configure(
        cls,
        url: str,
        *,
        ca_file: Path | None = None,
        cert_file: Path | None = None,
        key_file: Path | None = None,
    ) -> Broker:
        parts = urlsplit(url)
        tls = parts.scheme == "amqps"
        if not tls and (ca_file or cert_file or key_file):
            raise BrokerConfigError("certificate files need an amqps:// url")
        if (cert_file is None) != (key_file is None):
            raise BrokerConfigError("a client certificate needs its key, and a key its certificate")
        context: ssl.SSLContext | None = None
        if tls:
            try:
                # Verifies the broker's certificate and host name, against ca_file when given.
                context = ssl.create_default_context(
                    cafile=str(ca_file) if ca_file is not None else None
                )
                if cert_file is not None and key_file is not None:
                    context.load_cert_chain(str(cert_file), str(key_file))
            except (OSError, ssl.SSLError) as exc:
                raise BrokerConfigError(f"cannot load the TLS files: {exc}") from None
        user = unquote(parts.username) if parts.username else None
        if user is None and cert_file is not None:
            user = certificate_user(cert_file)
            url = _with_query(url, "auth=external")
        return cls(url=url, user=user or DEFAULT_USER, ssl_context=context)


def certificate_user(cert_file: Path) -> str:
    """The broker user a client certificate logs in as: its subject's common name."""
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except (OSError, ValueError) as exc:
        raise BrokerConfigError(f"cannot read the client certificate {cert_file}: {exc}") from None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise BrokerConfigError(f"the client certificate {cert_file} has no common name")
    value = names[0].value
    return value.decode() if isinstance(value, bytes) else value


def _with_query(url: str, item: str) -> str:
    """`url` with the query parameter `item` (name=value), replacing one of the same name."""
    parts = urlsplit(url)
    name = item.split("=", 1)[0]
    kept = [p for p in parts.query.split("&") if p and p.split("=", 1)[0] != name]
    return parts._replace(query="&".join([*kept, item])).geturl()
