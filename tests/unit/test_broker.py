"""How a process reaches the broker and as whom (contract section 8), and which direct
reply-to names are worth a publish: pure functions, no broker."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import pytest

from image_service.protocol.broker import Broker, BrokerConfigError, certificate_user
from image_service.protocol.direct_reply import DirectReplyNodes, Route, node_of

# A real name, as RabbitMQ 3.10 made it for a caller of this machine's broker.
REAL = "amq.rabbitmq.reply-to.g1h2AA1yZXBseUA5MjQ4ODg0AAADXQAAAABrDgl2.MNtGEaEsJm7Iw5uiU+RbsA=="


@pytest.mark.parametrize(
    ("url", "user"),
    [
        ("amqp://guest:guest@127.0.0.1:5672/", "guest"),
        ("amqp://127.0.0.1/", "guest"),
        ("amqp://image%2Dservice:pw@host/images", "image-service"),
        ("amqps://backup-agent-x:pw@broker.example:5671/images", "backup-agent-x"),
    ],
)
def test_the_broker_user_is_the_urls(url: str, user: str) -> None:
    broker = Broker.plain(url)
    assert broker.user == user
    assert broker.url == url
    assert (broker.ssl_context is not None) == url.startswith("amqps://")


def make_cert(tmp_path: Path, common_name: str) -> tuple[Path, Path]:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
         "-subj", f"/O=test/CN={common_name}"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def test_a_client_certificate_without_a_url_user_logs_in_with_external_as_its_cn(
    tmp_path: Path,
) -> None:
    cert, key = make_cert(tmp_path, "backup-agent-0123")
    assert certificate_user(cert) == "backup-agent-0123"
    broker = Broker.configure("amqps://broker:5671/images", cert_file=cert, key_file=key)
    assert broker.user == "backup-agent-0123"
    assert broker.url == "amqps://broker:5671/images?auth=external"
    assert broker.ssl_context is not None
    # A user in the url wins (PLAIN, the certificate only presented).
    with_user = Broker.configure("amqps://u:p@broker/", cert_file=cert, key_file=key)
    assert with_user.user == "u" and "auth=external" not in with_user.url


@pytest.mark.parametrize(
    ("url", "kwargs", "words"),
    [
        ("amqp://h/", {"ca_file": Path("/etc/hostname")}, "amqps"),
        ("amqps://h/", {"cert_file": Path("/etc/hostname")}, "its key"),
        ("amqps://h/", {"key_file": Path("/etc/hostname")}, "its certificate"),
        ("amqps://h/", {"ca_file": Path("/nonexistent/ca.pem")}, "cannot load"),
    ],
)
def test_settings_that_cannot_work_are_refused(
    url: str, kwargs: dict[str, Path], words: str
) -> None:
    with pytest.raises(BrokerConfigError, match=words):
        Broker.configure(url, **kwargs)  # type: ignore[arg-type]


def test_node_of_reads_the_node_alias_of_a_real_name() -> None:
    assert node_of(REAL) == "reply@9248884"


def pid_name(tail: bytes, node: bytes = b"reply@1", tag: int = 88) -> str:
    term = bytes([131, tag, 119, len(node)]) + node + tail
    return f"amq.rabbitmq.reply-to.{base64.b64encode(term).decode()}.key"


@pytest.mark.parametrize(
    "name",
    [
        "amq.rabbitmq.reply-to.garbage.x",  # not base64 of a term
        "amq.rabbitmq.reply-to.nodot",
        "amq.rabbitmq.reply-to.",
        "amq.rabbitmq.reply-to.g1h2AA1yZXBseUA5MjQ4ODg0AAADXQAAAABrAAA=.x",  # cut short
        pid_name(b"\x00" * 11),  # NEW_PID_EXT needs 12 bytes after the node
        pid_name(b"\x00" * 13),
        pid_name(b"\x00" * 12, tag=97),  # not a pid
        pid_name(b"\x00" * 12, node=b""),
    ],
)
def test_names_that_cannot_be_direct_reply_targets_are_refused(name: str) -> None:
    assert node_of(name) is None
    assert DirectReplyNodes().route(name, check_pid=True) is Route.REFUSE


def test_a_node_is_tried_alone_until_a_reply_went_through() -> None:
    nodes = DirectReplyNodes()
    other = pid_name(b"\x00" * 12)  # well formed, another node
    assert nodes.route(REAL, check_pid=True) is Route.ALONE
    nodes.delivered(REAL, check_pid=True)
    assert nodes.route(REAL, check_pid=True) is Route.SHARED
    assert nodes.route(other, check_pid=True) is Route.ALONE
    # With a broker whose format is unknown, nothing is refused unread.
    assert DirectReplyNodes().route("amq.rabbitmq.reply-to.opaque.x", check_pid=False) is (
        Route.ALONE
    )
