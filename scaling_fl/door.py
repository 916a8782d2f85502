"""The door of a cross-silo run: a site proves it was invited before it learns anything of the run.

A coordinator listens on one TCP port, TLS unless the user says `insecure=True`. A site connects,
and its first message is its hello: the run's join token (FL_JOIN_TOKEN, shared out of band), its
`site_name`, the training keys it set itself and an optional pinned config hash. The coordinator
says nothing before the token has been checked (in constant time); then it refuses the site with a
reason (wrong token, wrong protocol, a key that differs from the run's, a pinned hash that is not
the run's) or sends it the run's config. The site reads its own data with that config (task,
columns, objective all come from the coordinator) and answers `ready` with what it reports at join:
its row count and label histogram, never a row (or `failed` with the one line its data gave). Then
the coordinator refuses it (a name already in, a name not invited, no rows) or admits it and says
how many sites are in. When every expected site is in (or, at `join_timeout_s`, at least
`min_sites`), each admitted site gets its rank (the invite list's order, or the names' sorted
order), where to meet the others and what the coordinator announces from all arrivals (the run's
label names). A site that disconnects before the start frees its name; one that never comes is
named in the coordinator's error.

The door only admits. What follows it (torch.distributed's TCP store and the gloo / NCCL links) is
neither authenticated nor encrypted: a cross-silo run belongs on a private network or a VPN
(README, "Cross-silo").

Wire format: one JSON object per line, UTF-8, at most MAX_MESSAGE_BYTES, so a stranger cannot make
the coordinator hold more than that per connection, nor for longer than HELLO_TIMEOUT_S.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import queue
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from scaling_fl.errors import UserError

log = logging.getLogger("scaling_fl")

PROTOCOL = 2
TOKEN_VARIABLE = "FL_JOIN_TOKEN"
MIN_TOKEN_LENGTH = 16
MAX_MESSAGE_BYTES = 64 * 1024
HELLO_TIMEOUT_S = 10.0
PREPARE_TIMEOUT_S = 900.0  # an invited site reading its data (a large file from s3:// or gs://)
MAX_PENDING_HELLOS = 64  # connections between accept and hello; more are closed at once
RETRY_EVERY_S = 1.0
TLS_HANDSHAKE = b"\x16"  # the first byte of a TLS ClientHello
MAKE_TOKEN = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"


class DoorError(UserError):
    """The door could not be opened or passed; the line says why and what to change."""


class RunFinished(DoorError):
    """The run ended while this site waited at the door: there is no formation left to join."""


@dataclass(frozen=True)
class Arrival:
    """An admitted site, as the coordinator knows it: what the site reported at join."""

    site_name: str
    rows: int
    label_histogram: dict[str, int]
    peer: str  # host:port the site connected from


@dataclass(frozen=True)
class Admission:
    """What a site learns at the start: its place in the run, the run's config, where to meet."""

    rank: int
    site_names: list[str]
    config: dict
    config_hash: str
    rendezvous: str
    announced: dict = field(default_factory=dict)  # from all arrivals: the run's label names


@dataclass
class _Guest:
    """A connection that passed the token check and waits for the start."""

    connection: socket.socket
    arrival: Arrival
    joined_at: float = field(default_factory=time.monotonic)


# ------------------------------------------------------------------------------------------ shared parts


def join_token(environ: dict | None = None) -> str:
    """The run's join token from the environment (cli.py has read ./.env into it)."""
    token = (os.environ if environ is None else environ).get(TOKEN_VARIABLE, "")
    if not token:
        raise DoorError(
            f"{TOKEN_VARIABLE} is not set: put the run's join token in the environment or .env, the same on the "
            f"coordinator and every site (make one with {MAKE_TOKEN})"
        )
    if len(token) < MIN_TOKEN_LENGTH:
        raise DoorError(
            f"{TOKEN_VARIABLE} is shorter than {MIN_TOKEN_LENGTH} characters, too easy to guess: "
            f"make one with {MAKE_TOKEN}"
        )
    return token


def config_hash(config: dict) -> str:
    """The run's fingerprint, shown by the coordinator; a site may pin it (`config_hash=`)."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def parse_address(text: str, key: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise DoorError(f"{key}={text!r} is not HOST:PORT (for example {key}=coordinator.example.org:29400)")
    return host.strip("[]") or "0.0.0.0", int(port)


def server_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    """TLS for the coordinator's door: its certificate and key (scripts/make_test_certs.sh makes a pair)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as error:
        raise DoorError(
            f"cannot load the coordinator's TLS certificate {certfile!r} and key {keyfile!r} ({error}): "
            "check tls_certfile and tls_keyfile (scripts/make_test_certs.sh makes a test pair)"
        ) from error
    return context


def client_context(cafile: str | None) -> ssl.SSLContext:
    """TLS for a site: the coordinator's certificate must chain to `cafile` (or to the system's CAs) and
    name the host in coordinator_address."""
    try:
        return ssl.create_default_context(cafile=cafile or None)
    except (OSError, ssl.SSLError) as error:
        raise DoorError(
            f"cannot read tls_cafile={cafile!r} ({error}): give the CA certificate of the coordinator"
        ) from error


def _send(connection: socket.socket, message: dict) -> None:
    connection.sendall(json.dumps(message).encode("utf-8") + b"\n")


def _receive(reader) -> dict | None:
    """One message, or None when the other side closed the connection."""
    line = reader.readline(MAX_MESSAGE_BYTES + 1)
    if not line:
        return None
    if len(line) > MAX_MESSAGE_BYTES or not line.endswith(b"\n"):
        raise ValueError(f"a message longer than {MAX_MESSAGE_BYTES} bytes")
    message = json.loads(line)
    if not isinstance(message, dict):
        raise ValueError("a message that is not a JSON object")
    return message


# ------------------------------------------------------------------------------------------- coordinator


class Door:
    """The coordinator's side. `open()` binds; `wait_for_sites()` admits until the run can start and
    returns the admitted sites in rank order, each already told its rank."""

    def __init__(
        self,
        listen_address: str,
        token: str,
        config: dict,
        num_sites: int,
        rendezvous: str,
        min_sites: int = 0,
        site_names: Iterable[str] = (),
        tls: ssl.SSLContext | None = None,
        announce: Callable[[list[Arrival]], dict] | None = None,
    ):
        self.host, self.port = parse_address(listen_address, "listen_address")
        self._token = token.encode("utf-8")
        self.config = config
        self.config_hash = config_hash(config)
        self.num_sites = num_sites
        self.min_sites = min_sites or num_sites
        self.invited = list(site_names)
        self.rendezvous = rendezvous
        self._tls = tls
        self._announce = announce or (lambda arrivals: {})
        self._listener: socket.socket | None = None
        self._knocks: queue.Queue = queue.Queue()  # (connection, hello, peer) from the handshake threads
        self._guests: dict[str, _Guest] = {}
        self._pending = threading.BoundedSemaphore(MAX_PENDING_HELLOS)

    def open(self) -> int:
        """Binds the listening port (port 0: any free one) and returns it."""
        try:
            listener = socket.create_server((self.host, self.port), reuse_port=False)
        except OSError as error:
            raise DoorError(
                f"cannot listen on listen_address={self.host}:{self.port} ({error.strerror or error}): "
                "choose a free port, or an address of this machine"
            ) from error
        listener.setblocking(False)
        self._listener = listener
        self.port = listener.getsockname()[1]
        if self._tls is None:
            log.warning("insecure=True: the join token crosses the network in clear text; use it on a trusted network")
        log.info(
            "coordinator listening on %s:%d for %d sites (config hash %s)",
            self.host,
            self.port,
            self.num_sites,
            self.config_hash,
        )
        return self.port

    def close(self) -> None:
        for guest in self._guests.values():
            guest.connection.close()
        self._guests.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def wait_for_sites(
        self, join_timeout_s: float, all_within_s: float | None = None, keep_open: bool = False
    ) -> list[Arrival]:
        """Admits sites until every expected one is in; after `all_within_s` (default: join_timeout_s)
        `min_sites` are enough. Below min_sites at join_timeout_s: DoorError naming the missing.
        keep_open: the door stays open after the start (a cross-silo coordinator's waiting room)."""
        if self._listener is None:
            self.open()
        started = time.monotonic()
        deadline = started + join_timeout_s
        quorum_from = started + (join_timeout_s if all_within_s is None else min(all_within_s, join_timeout_s))
        while len(self._guests) < self.num_sites:
            now = time.monotonic()
            if now >= quorum_from and len(self._guests) >= self.min_sites:
                break
            if now >= deadline:
                line = self._missing_line(join_timeout_s)
                self._cancel(f"the run did not start: too few sites joined within join_timeout_s={join_timeout_s:g}")
                raise DoorError(line)
            self._serve(min(0.1, deadline - now))
        return self._start(keep_open)

    def serve_waiting_room(self, on_waiting: Callable[[list[str]], None]) -> Callable[[], None]:
        """While a formation trains: admits sites (a site back after it left, one that came late) and
        calls `on_waiting(names)` while any waits. Returns the function that stops it; the waiting
        sites stay admitted for the next wait_for_sites."""
        stop = threading.Event()

        def serve() -> None:
            while not stop.is_set():
                self._serve(0.2)
                if self._guests:
                    on_waiting(sorted(self._guests))

        thread = threading.Thread(target=serve, name="waiting-room", daemon=True)
        thread.start()

        def stop_serving() -> None:
            stop.set()
            thread.join()

        return stop_serving

    def _serve(self, timeout: float) -> None:
        """One turn: accept, notice waiting sites that left, admit the knocks that passed the token check."""
        watched = [self._listener, *(guest.connection for guest in self._guests.values())]
        readable, _, _ = select.select(watched, [], [], timeout)
        if self._listener in readable:
            self._accept()
        for name, guest in list(self._guests.items()):
            if guest.connection in readable:  # a waiting site says nothing: this is it leaving
                self._drop(name, "left before the start")
        self._admit_knocks()

    # -- the steps

    def _accept(self) -> None:
        try:
            connection, address = self._listener.accept()
        except BlockingIOError:
            return
        peer = f"{address[0]}:{address[1]}"
        if not self._pending.acquire(blocking=False):
            log.warning("a connection from %s was closed: %d others are still to say hello", peer, MAX_PENDING_HELLOS)
            connection.close()
            return
        threading.Thread(target=self._handshake, args=(connection, peer), daemon=True).start()

    def _handshake(self, connection: socket.socket, peer: str) -> None:
        try:
            invited = self._check_hello(connection, peer)
        finally:
            self._pending.release()
        if invited is not None:
            self._await_ready(*invited, peer)

    def _check_hello(self, connection: socket.socket, peer: str) -> tuple[socket.socket, dict] | None:
        """TLS, then the hello and the token check, off the main loop: a slow stranger holds only its
        own thread, for HELLO_TIMEOUT_S at most. Returns the connection and hello of a site that may
        learn the run's config."""
        connection.setblocking(True)
        connection.settimeout(HELLO_TIMEOUT_S)
        try:
            if self._tls is not None:
                connection = self._tls.wrap_socket(connection, server_side=True)
            elif connection.recv(1, socket.MSG_PEEK) == TLS_HANDSHAKE:
                raise ValueError("it speaks TLS; this coordinator runs with insecure=True, so must the sites")
            with connection.makefile("rb") as reader:
                hello = _receive(reader)
            if hello is None:
                raise ValueError("closed the connection before its hello")
        except (OSError, ValueError) as error:  # ssl.SSLError is an OSError
            log.warning("a connection from %s was dropped before its hello (%s)", peer, error)
            connection.close()
            return None
        token = hello.get("token")
        if not isinstance(token, str) or not hmac.compare_digest(token.encode("utf-8"), self._token):
            self._refuse(connection, peer, hello, f"wrong join token (check {TOKEN_VARIABLE} on this site)")
            return None
        if hello.get("protocol") != PROTOCOL:
            self._refuse(
                connection, peer, hello, f"join protocol {hello.get('protocol')!r}, the coordinator speaks {PROTOCOL}"
            )
            return None
        reason = self._config_differs(hello)
        if reason:
            self._refuse(connection, peer, hello, reason)
            return None
        return connection, hello

    def _await_ready(self, connection: socket.socket, hello: dict, peer: str) -> None:
        """Sends the invited site the run's config and waits while it reads its data with it."""
        try:
            _send(connection, {"type": "config", "config": self.config, "config_hash": self.config_hash})
            connection.settimeout(PREPARE_TIMEOUT_S)
            with connection.makefile("rb") as reader:
                answer = _receive(reader)
        except (OSError, ValueError) as error:
            log.warning("site %r from %s left while reading its data (%s)", hello.get("site_name"), peer, error)
            connection.close()
            return
        if answer is None or answer.get("type") != "ready":
            why = answer.get("reason") if answer else "it closed the connection"
            log.warning("site %r from %s could not take part: %s", hello.get("site_name"), peer, why)
            connection.close()
            return
        connection.settimeout(None)
        reported = {"rows": answer.get("rows"), "label_histogram": answer.get("label_histogram")}
        self._knocks.put((connection, {**hello, **reported}, peer))

    def _admit_knocks(self) -> None:
        while True:
            try:
                connection, hello, peer = self._knocks.get_nowait()
            except queue.Empty:
                return
            reason = self._reason_to_refuse(hello)
            if reason:
                self._refuse(connection, peer, hello, reason)
                continue
            arrival = Arrival(
                hello["site_name"], int(hello.get("rows", 0)), dict(hello.get("label_histogram") or {}), peer
            )
            self._guests[arrival.site_name] = _Guest(connection, arrival)
            joined = len(self._guests)
            try:
                _send(connection, {"type": "admitted", "joined": joined, "expected": self.num_sites})
            except OSError:
                self._drop(arrival.site_name, "left before the start")
                continue
            log.info("waiting for sites: %d/%d joined (%s)", joined, self.num_sites, arrival.site_name)

    def _reason_to_refuse(self, hello: dict) -> str:
        """Why a site that read its data is not admitted ('' when it is)."""
        name = hello["site_name"]
        if name in self._guests:
            return (
                f"site_name {name!r} has already joined (from {self._guests[name].arrival.peer}): "
                "give each site its own name"
            )
        if not isinstance(hello.get("rows"), int) or hello["rows"] < 1:
            return "the site reported no training rows: check its train_path"
        return ""

    def _config_differs(self, hello: dict) -> str:
        """Why a site may not learn the run's config: its name, its own keys or its pinned hash ('' when it may)."""
        name = hello.get("site_name")
        if not isinstance(name, str) or not name.strip():
            return "no site_name: start the site with site_name=<its name>"
        if self.invited and name not in self.invited:
            return f"site_name {name!r} is not invited to this run (invited: {', '.join(self.invited)})"
        for key, value in sorted((hello.get("config") or {}).items()):
            if key not in self.config:
                return f"{key} is not a key of this run"
            if self.config[key] != value:
                return (
                    f"this site set {key}={value!r} but the run has {key}={self.config[key]!r}: every training key "
                    "comes from the coordinator; leave it out on the site"
                )
        pinned = hello.get("config_hash")
        if pinned and pinned != self.config_hash:
            return f"config hash {pinned} is not this run's ({self.config_hash}): is the site pointed at the right run?"
        return ""

    def _refuse(self, connection: socket.socket, peer: str, hello: dict, reason: str) -> None:
        name = hello.get("site_name") if isinstance(hello.get("site_name"), str) else "?"
        log.warning("refused site %r from %s: %s", name, peer, reason)
        try:
            _send(connection, {"type": "refused", "reason": reason})
        except OSError:
            pass
        connection.close()

    def finish(self, reason: str) -> None:
        """The run is over: every site still waiting is told so (it ends without an error), then the door closes."""
        for name, guest in self._guests.items():
            try:
                _send(guest.connection, {"type": "finished", "reason": reason})
            except OSError:
                pass
            log.info("site %s waited to join again; told: %s", name, reason)
        self.close()

    def _drop(self, name: str, why: str) -> None:
        guest = self._guests.pop(name)
        guest.connection.close()
        log.warning("site %s %s: %d/%d joined", name, why, len(self._guests), self.num_sites)

    def _cancel(self, reason: str) -> None:
        for guest in self._guests.values():
            try:
                _send(guest.connection, {"type": "cancelled", "reason": reason})
            except OSError:
                pass
        self.close()

    def _missing_line(self, join_timeout_s: float) -> str:
        joined = sorted(self._guests)
        missing = [name for name in self.invited if name not in self._guests]
        named = f": missing {', '.join(missing)}" if missing else f" (joined: {', '.join(joined) or 'none'})"
        return (
            f"only {len(joined)} of {self.num_sites} sites joined within join_timeout_s={join_timeout_s:g} "
            f"(min_sites={self.min_sites}){named}; start the missing sites or raise join_timeout_s"
        )

    def _start(self, keep_open: bool = False) -> list[Arrival]:
        order = [name for name in self.invited if name in self._guests] or sorted(self._guests)
        arrivals = [self._guests[name].arrival for name in order]
        announced = self._announce(arrivals)
        for rank, name in enumerate(order):
            start = {
                "type": "start",
                "rank": rank,
                "site_names": order,
                "config": self.config,
                "config_hash": self.config_hash,
                "rendezvous": self.rendezvous,
                "announced": announced,
            }
            try:
                _send(self._guests[name].connection, start)
            except OSError as error:  # it left in the last moment: the run meets it missing (collective_timeout_s)
                log.warning("site %s could not be told the start (%s)", name, error)
        log.info("FL starting: %d sites joined (%s)", len(order), ", ".join(order))
        for guest in self._guests.values():
            guest.connection.close()
        self._guests.clear()
        if not keep_open:
            self.close()
        return arrivals


# -------------------------------------------------------------------------------------------------- site


def knock(
    coordinator_address: str,
    token: str,
    site_name: str,
    prepare: Callable[[dict], tuple[int, dict[str, int]]],
    config: dict | None = None,
    pinned_hash: str | None = None,
    tls: ssl.SSLContext | None = None,
    join_timeout_s: float = 600.0,
) -> Admission:
    """A site's side: connects (retrying while the coordinator is not up yet, until join_timeout_s),
    presents its hello, reads its data with the run's config (`prepare(config)` -> its rows and
    label histogram; a UserError it raises is told to the coordinator and raised here), and waits for
    the start."""
    host, port = parse_address(coordinator_address, "coordinator_address")
    deadline = time.monotonic() + join_timeout_s
    hello = {
        "protocol": PROTOCOL,
        "token": token,
        "site_name": site_name,
        "config": config or {},
        "config_hash": pinned_hash,
    }
    connection = _connect(host, port, tls, deadline, join_timeout_s)
    with connection, connection.makefile("rb") as reader:
        _send(connection, hello)
        answered = False
        while True:
            connection.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                message = _receive(reader)
            except TimeoutError:
                raise DoorError(
                    f"admitted, but the run did not start within join_timeout_s={join_timeout_s:g}: "
                    "are the other sites started?"
                ) from None
            except ConnectionResetError as error:
                if answered:
                    raise DoorError(f"the connection to the coordinator at {host}:{port} broke ({error})") from error
                message = None  # dropped at once, as a TLS coordinator drops a plain hello
            except (OSError, ValueError) as error:
                raise DoorError(f"the connection to the coordinator at {host}:{port} broke ({error})") from error
            if message is None and not answered and tls is None:
                raise DoorError(
                    f"the coordinator at {host}:{port} closed the connection without an answer: does it run with "
                    "TLS? Then give this site tls_cafile, not insecure=True"
                )
            if message is None:
                raise DoorError(f"the coordinator at {host}:{port} closed the connection before the start: see its log")
            answered = True
            kind = message.get("type")
            if kind == "config":
                try:
                    rows, histogram = prepare(message["config"])
                except UserError as error:  # the coordinator logs why this site is not coming
                    _send(connection, {"type": "failed", "reason": str(error).splitlines()[0][:1000]})
                    raise
                _send(connection, {"type": "ready", "rows": rows, "label_histogram": histogram})
                deadline = time.monotonic() + join_timeout_s  # reading the data does not eat the wait
                continue
            if kind == "refused":
                raise DoorError(f"the coordinator refused this site: {message.get('reason')}")
            if kind == "cancelled":
                raise DoorError(f"the coordinator cancelled the run: {message.get('reason')}")
            if kind == "finished":
                raise RunFinished(f"the coordinator says: {message.get('reason')}")
            if kind == "admitted":
                log.info(
                    "admitted as %s: %d/%d sites joined, waiting for the start",
                    site_name,
                    message["joined"],
                    message["expected"],
                )
            elif kind == "start":
                return Admission(
                    message["rank"],
                    list(message["site_names"]),
                    message["config"],
                    message["config_hash"],
                    message["rendezvous"],
                    dict(message.get("announced") or {}),
                )


def _connect(host: str, port: int, tls: ssl.SSLContext | None, deadline: float, join_timeout_s: float):
    if tls is None:
        log.warning("insecure=True: the join token crosses the network in clear text; use it on a trusted network")
    waiting_logged = False
    while True:
        try:
            connection = socket.create_connection((host, port), timeout=HELLO_TIMEOUT_S)
        except OSError as error:
            if time.monotonic() + RETRY_EVERY_S > deadline:
                raise DoorError(
                    f"cannot reach the coordinator at {host}:{port} within join_timeout_s={join_timeout_s:g} "
                    f"({error.strerror or error}): is it started, and is the port open to this site?"
                ) from error
            if not waiting_logged:
                log.info("the coordinator at %s:%d is not reachable yet (%s); retrying", host, port, error)
                waiting_logged = True
            time.sleep(RETRY_EVERY_S)
            continue
        if tls is None:
            return connection
        try:
            return tls.wrap_socket(connection, server_hostname=host)
        except ssl.SSLCertVerificationError as error:
            connection.close()
            raise DoorError(
                f"the coordinator's certificate is not trusted ({error.verify_message}): give its CA with "
                "tls_cafile=..., and use the host name the certificate names in coordinator_address"
            ) from error
        except (OSError, ssl.SSLError) as error:
            connection.close()
            raise DoorError(
                f"no TLS with the coordinator at {host}:{port} ({error}): is it started with insecure=True? "
                "Then both sides need it"
            ) from error
