"""A private RabbitMQ node with a TLS listener, for the tests of certificate logins.

The shared broker of the integration tests (rabbit@localhost:5672) speaks plain AMQP only, and
reconfiguring it for TLS would disturb every other test and everyone else on the machine. So
this module starts a throwaway node of its own: its own name, ports, cookie, data and log
directories and configuration, all under a pytest temporary directory, listening on 127.0.0.1
only, with a throwaway CA that signs its server certificate and the client certificates. The
node authenticates a client by its certificate (RabbitMQ's EXTERNAL mechanism, the user being
the certificate's common name), as the production broker does (see image_service.protocol.broker).

Use the module-scoped fixture `tls_broker` (import its function, `tls_broker_fixture`, into a test
module, or name this module in the root conftest's `pytest_plugins`), or the context manager
`running_tls_broker(directory)` for another scope.

Things learned the hard way on Debian's RabbitMQ 3.10.8 / OTP 25, run as root:

* /usr/sbin/rabbitmq-server and /usr/sbin/rabbitmqctl are wrappers that `su` to the rabbitmq
  user when run as root; that user can neither read pytest's temporary directories (mode 0700)
  nor use any cookie but /var/lib/rabbitmq/.erlang.cookie. The real scripts are in
  /usr/lib/rabbitmq/bin, and run as the invoking user.
* The main node runs as the rabbitmq user; root has no ~/.erlang.cookie. Rather than share the
  main node's cookie (which would let a test's CLI call reach it), the private node and its CLI
  calls get a HOME of their own holding a cookie of their own.
* /etc/rabbitmq/rabbitmq-env.conf names the main node (NODENAME=rabbit@localhost); pointing
  RABBITMQ_CONF_ENV_FILE at an empty file keeps it out of the private node's environment. What
  else it says is repeated here: ERL_EPMD_ADDRESS, and ERL_FLAGS keeping Erlang distribution on
  127.0.0.1, for the CLI calls too (without it each listens on 0.0.0.0:35672 while it runs).
* `rabbitmqctl await_startup` fails at once (exit 69) while the node has not yet registered
  with epmd, instead of waiting; so the node's distribution port is polled first.
* RabbitMQ 3.10 completes its boot when a listener cannot bind its port (it logs eaddrinuse and
  carries on without it), so the node's listeners are checked once it is up.
* With TLS 1.3 the server verifies a client's certificate after the client has finished its
  side of the handshake, so a client whose certificate is refused sees a connection reset, not
  an alert; the broker's log says why ("Unknown CA", "Certificate required").
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlencode

import pytest

# Debian installs the real scripts here; the ones on PATH (/usr/sbin) `su` to the rabbitmq user.
RABBITMQ_SCRIPTS = Path("/usr/lib/rabbitmq/bin")
DIAG = "rabbitmq-diagnostics"
START_TIMEOUT = 60.0  # seconds for the node to boot (it takes about 5)
CTL_TIMEOUT = 30.0  # seconds for one rabbitmqctl call (each takes about 0.4)
STOP_TIMEOUT = 20.0  # seconds for the node to halt after `rabbitmqctl stop` or SIGTERM
CERT_DAYS = 7
LOG_TAIL_LINES = 60
# The private node enables this plugin alone: the main node's plugins (management, prometheus)
# would try to bind the same fixed ports.
PLUGINS = ("rabbitmq_auth_mechanism_ssl",)
# Prime256v1 keys: generating them takes milliseconds (RSA 2048 takes up to a second each).
_EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
_CA_EXTENSIONS = (
    "basicConstraints=critical,CA:TRUE",
    "keyUsage=critical,keyCertSign,cRLSign",
    "subjectKeyIdentifier=hash",
)
# Python 3.13 verifies with VERIFY_X509_STRICT, which wants key identifiers and key usages;
# Erlang's ssl checks the extended key usage against the side of the connection.
_SERVER_EXTENSIONS = (
    "basicConstraints=critical,CA:FALSE",
    "keyUsage=critical,digitalSignature",
    "extendedKeyUsage=serverAuth",
    "subjectAltName=DNS:localhost,IP:127.0.0.1",
    "subjectKeyIdentifier=hash",
    "authorityKeyIdentifier=keyid",
)
_CLIENT_EXTENSIONS = (
    "basicConstraints=critical,CA:FALSE",
    "keyUsage=critical,digitalSignature",
    "extendedKeyUsage=clientAuth",
    "subjectKeyIdentifier=hash",
    "authorityKeyIdentifier=keyid",
)


class BrokerStartError(RuntimeError):
    """The node did not come up; the message carries the tail of its output and log."""


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=CTL_TIMEOUT
    )
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {result.stderr.strip()}")


def _cn(name: str) -> str:
    """A subject for `openssl -subj`, whose `/`, `,`, `+` and `=` are separators."""
    escaped = "".join(f"\\{c}" if c in "/,+=\\" else c for c in name)
    return f"/CN={escaped}"


@dataclass(frozen=True)
class CertificateAuthority:
    """A throwaway CA made with the openssl command line, which signs certificates on demand."""

    cert: Path
    key: Path

    @classmethod
    def create(cls, directory: Path, stem: str, common_name: str) -> CertificateAuthority:
        directory.mkdir(parents=True, exist_ok=True)
        cert, key = directory / f"{stem}.pem", directory / f"{stem}.key"
        extensions = [arg for ext in _CA_EXTENSIONS for arg in ("-addext", ext)]
        _openssl(
            "req", "-x509", *_EC_KEY, "-keyout", str(key), "-out", str(cert),
            "-days", str(CERT_DAYS), "-subj", _cn(common_name), *extensions,
            cwd=directory,
        )  # fmt: skip
        return cls(cert, key)

    def issue(
        self, directory: Path, stem: str, common_name: str, extensions: Sequence[str]
    ) -> tuple[Path, Path]:
        """A key and a certificate for `common_name` signed by this CA: (cert path, key path)."""
        cert, key = directory / f"{stem}.pem", directory / f"{stem}.key"
        csr, ext = directory / f"{stem}.csr", directory / f"{stem}.ext"
        ext.write_text("".join(f"{line}\n" for line in extensions))
        _openssl(
            "req", "-new", *_EC_KEY, "-keyout", str(key), "-out", str(csr),
            "-subj", _cn(common_name),
            cwd=directory,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(self.cert), "-CAkey", str(self.key),
            "-set_serial", str(secrets.randbits(63)), "-days", str(CERT_DAYS),
            "-extfile", str(ext), "-out", str(cert),
            cwd=directory,
        )  # fmt: skip
        csr.unlink()
        ext.unlink()
        return cert, key


def _free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now, all different (the sockets are open together)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"({path}: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def _script(name: str) -> str:
    path = RABBITMQ_SCRIPTS / name
    if path.is_file():
        return str(path)
    found = shutil.which(name)
    if found is None:
        raise BrokerStartError(f"{name} is not installed (looked in {RABBITMQ_SCRIPTS} and PATH)")
    return found


class TlsBroker:
    """A private RabbitMQ node with a plain and a TLS listener on 127.0.0.1, and its certificates.

    `start()` writes everything under `directory` and boots the node; `stop()` halts it and
    never leaves it running. The TLS listener requires a client certificate signed by `ca_cert`
    (verify_peer, fail_if_no_peer_cert) and offers EXTERNAL before PLAIN, EXTERNAL logging the
    client in as its certificate's common name. The plain listener (`amqp_url`) keeps guest.
    """

    host = "localhost"  # the name the server certificate is for (it also names 127.0.0.1)

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.node = ""
        self.amqp_port = self.amqps_port = self.dist_port = 0
        self._allocate()
        self.certs_dir = directory / "certs"
        self.home = directory / "home"  # holds the node's own Erlang cookie
        self.mnesia_base = directory / "mnesia"
        self.log_base = directory / "log"
        self.config_file = directory / "rabbitmq.conf"
        self.env_file = directory / "rabbitmq-env.conf"
        self.enabled_plugins_file = directory / "enabled_plugins"
        self.stdout_path = directory / "server.out"
        self._ca: CertificateAuthority | None = None
        self._untrusted_ca: CertificateAuthority | None = None
        self._server: tuple[Path, Path] | None = None
        self._clients: dict[str, tuple[Path, Path]] = {}
        self._untrusted_clients: dict[str, tuple[Path, Path]] = {}
        self._process: subprocess.Popen[bytes] | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None

    def _allocate(self) -> None:
        """A fresh node name and three fresh ports (plain AMQP, TLS, distribution)."""
        self.node = f"tls{secrets.token_hex(4)}@localhost"
        self.amqp_port, self.amqps_port, self.dist_port = _free_ports(3)

    # --- certificates ----------------------------------------------------------------------

    @property
    def ca(self) -> CertificateAuthority:
        if self._ca is None:
            self._ca = CertificateAuthority.create(self.certs_dir, "ca", "tls-broker test CA")
        return self._ca

    @property
    def untrusted_ca(self) -> CertificateAuthority:
        """Another CA, which the node does not trust: its certificates must be refused."""
        if self._untrusted_ca is None:
            self._untrusted_ca = CertificateAuthority.create(
                self.certs_dir / "untrusted", "ca", "tls-broker untrusted CA"
            )
        return self._untrusted_ca

    @property
    def ca_cert(self) -> Path:
        return self.ca.cert

    @property
    def untrusted_ca_cert(self) -> Path:
        return self.untrusted_ca.cert

    @property
    def server_cert(self) -> Path:
        return self._server_pair()[0]

    @property
    def server_key(self) -> Path:
        return self._server_pair()[1]

    def _server_pair(self) -> tuple[Path, Path]:
        if self._server is None:
            self._server = self.ca.issue(self.certs_dir, "server", "localhost", _SERVER_EXTENSIONS)
        return self._server

    def client_cert(self, name: str) -> tuple[Path, Path]:
        """(cert path, key path) of a client certificate from the trusted CA whose common name
        is `name`, the broker user it logs in as with EXTERNAL. Made once per name."""
        if name not in self._clients:
            stem = f"client-{len(self._clients)}"
            self._clients[name] = self.ca.issue(self.certs_dir, stem, name, _CLIENT_EXTENSIONS)
        return self._clients[name]

    def untrusted_client_cert(self, name: str) -> tuple[Path, Path]:
        """(cert path, key path) like `client_cert`, but signed by `untrusted_ca`: the same
        common name, refused all the same, which shows the CA is checked and not the name."""
        if name not in self._untrusted_clients:
            stem = f"client-{len(self._untrusted_clients)}"
            self._untrusted_clients[name] = self.untrusted_ca.issue(
                self.certs_dir / "untrusted", stem, name, _CLIENT_EXTENSIONS
            )
        return self._untrusted_clients[name]

    def ssl_context(
        self, client: tuple[Path, Path] | None = None, *, trust_ca: bool = True
    ) -> ssl.SSLContext:
        """A client context that verifies the server (against `ca_cert` when `trust_ca`, else
        against the system's CAs, which fails) and presents `client`, a (cert, key) pair."""
        context = ssl.create_default_context(cafile=str(self.ca_cert) if trust_ca else None)
        if client is not None:
            context.load_cert_chain(str(client[0]), str(client[1]))
        return context

    # --- URLs -----------------------------------------------------------------------------

    def amqps_url(
        self,
        user: str | None = None,
        password: str | None = None,
        *,
        client: str | tuple[Path, Path] | None = None,
        trust_ca: bool = True,
        vhost: str = "/",
    ) -> str:
        """The TLS listener's URL, e.g. amqps://localhost:PORT/?auth=external.

        Without a user it asks for EXTERNAL (auth=external), so that the client certificate
        names the user: aiormq would otherwise log in as guest with PLAIN, and succeed. Pass
        `ssl_context=broker.ssl_context(...)` to connect, or give `client` (a user name, for
        `client_cert(name)`, or a (cert, key) pair) for the query parameters aiormq builds its
        own context from: certfile, keyfile and cafile (unless not `trust_ca`; then it verifies
        the server against the system's CAs, and fails).
        """
        path = quote(vhost, safe="") if vhost != "/" else ""
        url = f"amqps://{self._userinfo(user, password)}{self.host}:{self.amqps_port}/{path}"
        query = {"auth": "external"} if user is None else {}
        if client is not None:
            cert, key = self.client_cert(client) if isinstance(client, str) else client
            if trust_ca:
                query["cafile"] = str(self.ca_cert)
            query.update(certfile=str(cert), keyfile=str(key))
        return f"{url}?{urlencode(query)}" if query else url

    def amqp_url(self, user: str = "guest", password: str = "guest", vhost: str = "/") -> str:
        """The plain listener's URL (127.0.0.1), e.g. for setting things up as guest."""
        path = quote(vhost, safe="") if vhost != "/" else ""
        return f"amqp://{self._userinfo(user, password)}127.0.0.1:{self.amqp_port}/{path}"

    @staticmethod
    def _userinfo(user: str | None, password: str | None) -> str:
        if user is None:
            return ""
        secret = f":{quote(password, safe='')}" if password is not None else ""
        return f"{quote(user, safe='')}{secret}@"

    # --- users and vhosts, through rabbitmqctl ----------------------------------------------

    def add_user(self, name: str, password: str | None = None, *, tags: Sequence[str] = ()) -> None:
        """Create a user. Without a password the user can log in with a certificate only
        (EXTERNAL): it is created with a random one, which is then cleared."""
        initial = password if password is not None else secrets.token_hex(16)
        self.rabbitmqctl("add_user", "--", name, initial)
        if password is None:
            self.rabbitmqctl("clear_password", "--", name)
        if tags:
            self.rabbitmqctl("set_user_tags", "--", name, *tags)

    def set_permissions(
        self, name: str, configure: str, write: str, read: str, *, vhost: str = "/"
    ) -> None:
        self.rabbitmqctl("set_permissions", "-p", vhost, "--", name, configure, write, read)

    def delete_user(self, name: str) -> None:
        self.rabbitmqctl("delete_user", "--", name)

    def add_vhost(self, name: str) -> None:
        self.rabbitmqctl("add_vhost", "--", name)

    def rabbitmqctl(self, *args: str, timeout: float = CTL_TIMEOUT) -> str:
        """Run `rabbitmqctl -n NODE -q ARGS` against this node; its output, or RuntimeError.

        Blocking (about 0.4 s a call): fine in setup code, and in async tests that can wait."""
        result = self._ctl(*args, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(
                f"rabbitmqctl {' '.join(args)} failed ({result.returncode}): "
                f"{(result.stderr or result.stdout).strip()}"
            )
        return result.stdout

    def ctl_env(self) -> dict[str, str]:
        """The environment for rabbitmqctl (or a script calling it) to reach this node with
        `-n NODE`: its cookie, none of the main node's settings, distribution on loopback."""
        return {
            **self._clean_environ(),
            "HOME": str(self.home),
            "RABBITMQ_CONF_ENV_FILE": str(self.env_file),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    def _ctl(
        self, *args: str, timeout: float, tool: str = "rabbitmqctl"
    ) -> subprocess.CompletedProcess[str]:
        command = [_script(tool), "-n", self.node, "-q", *args]
        try:
            return subprocess.run(
                command, env=self.ctl_env(), capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(command, 124, "", f"timed out after {timeout}s")

    @staticmethod
    def _clean_environ() -> dict[str, str]:
        # A RABBITMQ_* or ERL_* variable of the caller's (say RABBITMQ_NODENAME) would aim the
        # private node, or the CLI, at the main node's settings.
        return {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}

    # --- the node ---------------------------------------------------------------------------

    @property
    def log_path(self) -> Path:
        return self.log_base / f"{self.node}.log"

    def log_text(self) -> str:
        """The node's log so far (where it says why it refused a TLS client, for instance)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _write_files(self) -> None:
        for path in (self.home, self.mnesia_base, self.log_base):
            path.mkdir(parents=True, exist_ok=True)
        cookie = self.home / ".erlang.cookie"
        cookie.unlink(missing_ok=True)  # read-only once written
        cookie.write_text(secrets.token_hex(20).upper())
        cookie.chmod(0o400)  # Erlang refuses a cookie file others can read
        self.env_file.write_text("# empty: keeps /etc/rabbitmq/rabbitmq-env.conf out\n")
        self.enabled_plugins_file.write_text(f"[{','.join(PLUGINS)}].\n")
        settings = {
            "listeners.tcp.1": f"127.0.0.1:{self.amqp_port}",
            "listeners.ssl.1": f"127.0.0.1:{self.amqps_port}",
            "ssl_options.cacertfile": self.ca_cert,
            "ssl_options.certfile": self.server_cert,
            "ssl_options.keyfile": self.server_key,
            "ssl_options.verify": "verify_peer",
            "ssl_options.fail_if_no_peer_cert": "true",
            "auth_mechanisms.1": "EXTERNAL",
            "auth_mechanisms.2": "PLAIN",
            "ssl_cert_login_from": "common_name",
            "loopback_users": "none",
            "log.console": "false",
            "log.file.level": "info",
        }
        self.config_file.write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))

    def _server_env(self) -> dict[str, str]:
        return {
            **self.ctl_env(),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.mnesia_base),
            "RABBITMQ_LOG_BASE": str(self.log_base),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.enabled_plugins_file),
            "RABBITMQ_CONFIG_FILE": str(self.config_file),
        }

    def start(self, timeout: float = START_TIMEOUT, attempts: int = 3) -> None:
        """Boot the node and wait until it serves on its ports (BrokerStartError with its log if
        not). A port that another process took between `_free_ports` and the node binding it
        costs another try with new ports and a new name, not a failure."""
        if self._process is not None:
            raise RuntimeError("already started")
        deadline = time.monotonic() + timeout
        for attempt in range(1, attempts + 1):
            try:
                self._launch()
                self._await_startup(deadline)
                self._check_listeners()
                return
            except BrokerStartError:
                said = _tail(self.stdout_path) + self.log_text()
                clash = "eaddrinuse" in said or "dist_port_already_used" in said
                self.stop()
                if not clash or attempt == attempts or time.monotonic() >= deadline:
                    raise
            shutil.rmtree(self.mnesia_base, ignore_errors=True)
            shutil.rmtree(self.log_base, ignore_errors=True)
            self._allocate()

    def _launch(self) -> None:
        self._write_files()
        with open(self.stdout_path, "wb") as out:
            # A session of its own: stop() can signal the node's whole process group (the
            # script, erl, beam.smp and its helpers) and nothing else.
            self._process = subprocess.Popen(
                [_script("rabbitmq-server")],
                cwd=self.directory,
                env=self._server_env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._watchdog = _start_watchdog(self._process.pid)

    def _await_startup(self, deadline: float) -> None:
        assert self._process is not None
        said = "(not asked yet: its distribution port never opened)"
        while True:
            code = self._process.poll()
            if code is not None:
                raise self._start_error(f"rabbitmq-server exited (status {code}) before it served")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._start_error(f"the node did not start in time; await_startup: {said}")
            # Until the node listens for distribution it is not registered with epmd, and
            # await_startup would fail at once rather than wait.
            if _port_open(self.dist_port):
                wait = max(1, int(remaining))
                result = self._ctl("await_startup", "--timeout", str(wait), timeout=wait + 5)
                if result.returncode == 0:
                    return
                said = (result.stderr or result.stdout).strip()[-2000:]
            time.sleep(0.1)

    def _check_listeners(self) -> None:
        """RabbitMQ 3.10 completes its boot even when a listener cannot bind its port (it logs
        eaddrinuse and carries on without it): check the node listens where it was told to,
        and on 127.0.0.1 only."""
        result = self._ctl("listeners", "--formatter", "json", timeout=CTL_TIMEOUT, tool=DIAG)
        expected = {
            ("127.0.0.1", self.dist_port, "clustering"),
            ("127.0.0.1", self.amqp_port, "amqp"),
            ("127.0.0.1", self.amqps_port, "amqp/ssl"),
        }
        try:
            listeners = json.loads(result.stdout)["listeners"]
            found = {(item["interface"], item["port"], item["protocol"]) for item in listeners}
        except (ValueError, KeyError, TypeError):
            raise self._start_error(f"cannot list its listeners: {result!r}") from None
        if found != expected:
            raise self._start_error(f"listens on {sorted(found)}, not {sorted(expected)}")

    def _start_error(self, what: str) -> BrokerStartError:
        errors = [line for line in self.log_text().splitlines() if "[error]" in line]
        return BrokerStartError(
            f"private RabbitMQ node {self.node} (amqp {self.amqp_port}, amqps {self.amqps_port}, "
            f"dist {self.dist_port}): {what}\n"
            f"--- {self.stdout_path} ---\n{_tail(self.stdout_path)}\n"
            f"--- {self.log_path}, errors ---\n" + "\n".join(errors[:LOG_TAIL_LINES]) + "\n"
            f"--- {self.log_path}, tail ---\n{_tail(self.log_path)}"
        )

    def stop(self) -> None:
        """Halt the node: `rabbitmqctl stop`, then SIGTERM, then SIGKILL to its process group,
        each bounded. Safe to call more than once, and when the start failed half way."""
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                self._ctl("stop", timeout=STOP_TIMEOUT)
            # The script may be gone while beam.smp, in the same group, is not: wait for the group.
            if not _wait_group_gone(process, STOP_TIMEOUT):
                _signal_group(process.pid, signal.SIGTERM)
                if not _wait_group_gone(process, STOP_TIMEOUT):
                    _signal_group(process.pid, signal.SIGKILL)
                    _wait_group_gone(process, STOP_TIMEOUT)
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            watchdog.kill()
            watchdog.wait(timeout=STOP_TIMEOUT)

    def remove_files(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _wait_group_gone(process: subprocess.Popen[bytes], timeout: float) -> bool:
    """Whether every process of the node's group (led by `process`) has exited in time."""
    deadline = time.monotonic() + timeout
    while True:
        process.poll()  # reaps the script once it exits, so that its pid stops counting
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


# The watchdog outlives a test process that dies without tearing down (killed, os._exit by a
# timeout): when its parent is gone it stops the node's process group, TERM then KILL.
_WATCHDOG = """
import os, signal, sys, time
parent, group = int(sys.argv[1]), int(sys.argv[2])
while os.getppid() == parent:
    time.sleep(1)
for sig in (signal.SIGTERM, signal.SIGKILL):
    for tick in range(150):  # send sig, then watch the group for 15 s
        try:
            os.killpg(group, 0 if tick else sig)
        except ProcessLookupError:
            sys.exit()
        time.sleep(0.1)
"""


def _start_watchdog(group: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(group)],
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # not in the test process's group, which a runner may kill
    )


@contextlib.contextmanager
def running_tls_broker(directory: Path) -> Iterator[TlsBroker]:
    """A started TlsBroker in `directory`, stopped and removed on exit; fails the test (with the
    node's log) if it cannot start."""
    broker = TlsBroker(directory)
    try:
        try:
            broker.start()
        except BrokerStartError as exc:
            pytest.fail(str(exc), pytrace=False)
        yield broker
    finally:
        broker.stop()
        broker.remove_files()


@pytest.fixture(scope="module", name="tls_broker")
def tls_broker_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    """A private TLS RabbitMQ node for the module (about 5 s to start); see the module docstring.
    Its users are the module's to add (`add_user`, `set_permissions`); guest exists, for the
    plain listener."""
    with running_tls_broker(tmp_path_factory.mktemp("tls_broker")) as broker:
        yield broker


__all__ = [
    "BrokerStartError",
    "CertificateAuthority",
    "TlsBroker",
    "running_tls_broker",
    "tls_broker_fixture",
]
