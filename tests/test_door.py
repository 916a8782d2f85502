"""The cross-silo door (scaling_fl/door.py) on loopback, in-process: a real listening socket, real TLS
with a CA made by scripts/make_test_certs.sh, sites as threads started in a scrambled order."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import threading
import time

import pytest

from scaling_fl import door
from scaling_fl.data.dataset import DataError
from tests.cli import ROOT

TOKEN = "a-join-token-of-the-test-run-0123456789"
CONFIG = {"model": "tiny-bert", "learning_rate": 0.001, "num_rounds": 3}


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return _make_certs(tmp_path_factory.mktemp("certs"))


def _make_certs(folder):
    subprocess.run(["bash", str(ROOT / "scripts" / "make_test_certs.sh"), str(folder)], check=True, capture_output=True)
    return folder


def _door(certs, num_sites=3, **options) -> door.Door:
    tls = None if certs is None else door.server_context(str(certs / "coordinator.crt"), str(certs / "coordinator.key"))
    opened = door.Door("127.0.0.1:0", TOKEN, CONFIG, num_sites, rendezvous="127.0.0.1:29500", tls=tls, **options)
    opened.open()
    return opened


class Background(threading.Thread):
    """Runs `call` and keeps its result or its exception."""

    def __init__(self, call, delay: float = 0.0):
        super().__init__(daemon=True)
        self.call, self.delay, self.result, self.error = call, delay, None, None
        self.start()

    def run(self):
        time.sleep(self.delay)
        try:
            self.result = self.call()
        except Exception as error:  # noqa: BLE001 - the test looks at it
            self.error = error

    def outcome(self, timeout: float = 30.0):
        self.join(timeout)
        assert not self.is_alive(), "still running"
        return self.result, self.error


def _reading(rows: int = 10, label_histogram: dict | None = None, seen: list | None = None):
    """A site's `prepare`: what it reports of its data; keeps the config it was given in `seen`."""

    def prepare(config: dict) -> tuple[int, dict]:
        if seen is not None:
            seen.append(config)
        return rows, label_histogram or {}

    return prepare


def _site(
    address: str, name: str, certs, token: str = TOKEN, delay: float = 0.0, rows=10, label_histogram=None, **hello
) -> Background:
    tls = None if certs is None else door.client_context(str(certs / "ca.crt"))
    prepare = hello.pop("prepare", None) or _reading(rows, label_histogram)
    timeout = hello.pop("join_timeout_s", 20)
    return Background(
        lambda: door.knock(address, token, name, prepare, tls=tls, join_timeout_s=timeout, **hello), delay
    )


def test_sites_started_in_any_order_join_over_tls_and_the_run_starts_when_all_are_in(certs, caplog):
    caplog.set_level(logging.INFO, logger="scaling_fl")
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    free = port.getsockname()[1]
    port.close()
    address = f"localhost:{free}"
    # site c knocks before the coordinator listens (it retries), b and a come later, a last
    sites = {
        "hospital-c": _site(address, "hospital-c", certs, rows=7, label_histogram={"pos": 3, "neg": 4}),
        "hospital-b": _site(address, "hospital-b", certs, delay=1.5, rows=5, config={"learning_rate": 0.001}),
        "hospital-a": _site(address, "hospital-a", certs, delay=2.5, rows=9),
    }
    time.sleep(0.5)
    tls = door.server_context(str(certs / "coordinator.crt"), str(certs / "coordinator.key"))
    coordinator = door.Door(
        f"127.0.0.1:{free}",
        TOKEN,
        CONFIG,
        3,
        rendezvous="10.0.0.1:29500",
        tls=tls,
        announce=lambda arrivals: {"label_names": sorted({n for a in arrivals for n in a.label_histogram})},
    )
    arrivals = coordinator.wait_for_sites(join_timeout_s=20)

    assert [arrival.site_name for arrival in arrivals] == ["hospital-a", "hospital-b", "hospital-c"]
    assert [arrival.rows for arrival in arrivals] == [9, 5, 7]
    assert arrivals[2].label_histogram == {"pos": 3, "neg": 4}
    for rank, name in enumerate(["hospital-a", "hospital-b", "hospital-c"]):
        admission, error = sites[name].outcome()
        assert error is None, error
        assert admission.rank == rank and admission.site_names == ["hospital-a", "hospital-b", "hospital-c"]
        assert admission.config == CONFIG and admission.rendezvous == "10.0.0.1:29500"
        assert admission.config_hash == door.config_hash(CONFIG) == coordinator.config_hash
        assert admission.announced == {"label_names": ["neg", "pos"]}
    lines = [record.getMessage() for record in caplog.records]
    waiting = [line for line in lines if line.startswith("waiting for sites")]
    assert waiting == [
        "waiting for sites: 1/3 joined (hospital-c)",
        "waiting for sites: 2/3 joined (hospital-b)",
        "waiting for sites: 3/3 joined (hospital-a)",
    ]
    assert "FL starting: 3 sites joined (hospital-a, hospital-b, hospital-c)" in lines
    assert lines.index(waiting[-1]) < lines.index("FL starting: 3 sites joined (hospital-a, hospital-b, hospital-c)")
    assert not any(TOKEN in line for line in lines)


def test_a_wrong_token_config_hash_or_key_and_a_duplicate_name_are_refused_while_the_right_sites_join(certs, caplog):
    caplog.set_level(logging.INFO, logger="scaling_fl")
    coordinator = _door(certs, num_sites=2, site_names=["site-a", "site-b"])
    address = f"localhost:{coordinator.port}"
    running = Background(lambda: coordinator.wait_for_sites(join_timeout_s=20))
    first = _site(address, "site-a", certs)
    time.sleep(0.5)
    wrong_token = "an-other-token-not-the-runs-0000000"
    seen = {what: [] for what in ("token", "hash", "stranger", "duplicate")}  # configs they were shown

    def reading(what):
        return {"prepare": _reading(seen=seen[what])}

    def unreadable(config):
        raise DataError(f"/data/b.csv: no column 'text' (task {config['model']})")

    refused = {
        "token": _site(address, "site-b", certs, token=wrong_token, **reading("token")),
        "hash": _site(address, "site-b", certs, pinned_hash="0123456789abcdef", **reading("hash")),
        "key": _site(address, "site-b", certs, config={"learning_rate": 0.1}),
        "unknown key": _site(address, "site-b", certs, config={"not_a_key": 1}),
        "duplicate": _site(address, "site-a", certs, **reading("duplicate")),
        "stranger": _site(address, "site-x", certs, **reading("stranger")),
        "no rows": _site(address, "site-b", certs, rows=0),
        "bad data": _site(address, "site-b", certs, prepare=unreadable),
    }
    reasons = {}
    for what, site in refused.items():
        _, error = site.outcome()
        assert isinstance(error, DataError if what == "bad data" else door.DoorError), (what, error)
        reasons[what] = str(error)
    assert reasons["token"] == "the coordinator refused this site: wrong join token (check FL_JOIN_TOKEN on this site)"
    assert "config hash 0123456789abcdef is not this run's" in reasons["hash"]
    assert "this site set learning_rate=0.1 but the run has learning_rate=0.001" in reasons["key"]
    assert "not_a_key is not a key of this run" in reasons["unknown key"]
    assert "site_name 'site-a' has already joined" in reasons["duplicate"]
    assert "site_name 'site-x' is not invited to this run (invited: site-a, site-b)" in reasons["stranger"]
    assert "no training rows" in reasons["no rows"]
    assert reasons["bad data"] == "/data/b.csv: no column 'text' (task tiny-bert)"  # its own error, raised
    assert seen["token"] == seen["hash"] == seen["stranger"] == []  # refused before they learn the run
    assert seen["duplicate"] == [CONFIG]  # invited: it read its data, then found its name taken

    second = _site(address, "site-b", certs, pinned_hash=door.config_hash(CONFIG))  # the right one still gets in
    arrivals, error = running.outcome()
    assert error is None, error
    assert [arrival.site_name for arrival in arrivals] == ["site-a", "site-b"]
    assert first.outcome()[0].rank == 0 and second.outcome()[0].rank == 1
    messages = [record.getMessage() for record in caplog.records]
    refusals = [message for message in messages if message.startswith("refused site")]
    assert len(refusals) == len(refused) - 1  # both sides say it
    assert any("'site-b' from" in m and "could not take part: /data/b.csv: no column" in m for m in messages)
    assert not any(wrong_token in record.getMessage() or TOKEN in record.getMessage() for record in caplog.records)


def test_a_site_that_never_comes_is_named_after_join_timeout_and_the_waiting_sites_are_told(certs):
    coordinator = _door(certs, num_sites=3, site_names=["a", "b", "c"])
    address = f"localhost:{coordinator.port}"
    present = [_site(address, "a", certs), _site(address, "c", certs)]
    started = time.monotonic()
    with pytest.raises(door.DoorError) as failure:
        coordinator.wait_for_sites(join_timeout_s=2)
    assert 2 <= time.monotonic() - started < 5
    assert str(failure.value).startswith("only 2 of 3 sites joined within join_timeout_s=2 (min_sites=3): missing b;")
    for site in present:
        _, error = site.outcome()
        assert "the coordinator cancelled the run" in str(error)


def test_with_min_sites_the_run_starts_at_join_timeout_with_those_present(certs):
    coordinator = _door(certs, num_sites=3, min_sites=2)
    address = f"localhost:{coordinator.port}"
    present = [_site(address, "x", certs), _site(address, "y", certs)]
    arrivals = coordinator.wait_for_sites(join_timeout_s=2)
    assert [arrival.site_name for arrival in arrivals] == ["x", "y"]
    assert [site.outcome()[0].site_names for site in present] == [["x", "y"], ["x", "y"]]


def test_a_site_that_leaves_before_the_start_frees_its_name(certs, caplog):
    caplog.set_level(logging.INFO, logger="scaling_fl")
    coordinator = _door(None, num_sites=2)
    running = Background(lambda: coordinator.wait_for_sites(join_timeout_s=20))
    # a site that joins by hand and then goes away
    raw = socket.create_connection(("127.0.0.1", coordinator.port))
    raw.sendall(json.dumps({"protocol": 2, "token": TOKEN, "site_name": "one"}).encode() + b"\n")
    replies = raw.makefile("rb")
    assert json.loads(replies.readline())["type"] == "config"
    raw.sendall(json.dumps({"type": "ready", "rows": 3, "label_histogram": {}}).encode() + b"\n")
    assert json.loads(replies.readline())["type"] == "admitted"
    replies.close()
    raw.close()
    time.sleep(0.5)
    again = _site(f"127.0.0.1:{coordinator.port}", "one", None)  # the same name is welcome again
    other = _site(f"127.0.0.1:{coordinator.port}", "two", None)
    arrivals, error = running.outcome()
    assert error is None and [arrival.site_name for arrival in arrivals] == ["one", "two"]
    assert again.outcome()[0].rank == 0 and other.outcome()[0].rank == 1
    assert any(record.getMessage() == "site one left before the start: 0/2 joined" for record in caplog.records)
    assert any("insecure=True" in record.getMessage() for record in caplog.records)


def test_strangers_that_say_nothing_or_too_much_hold_no_one_up(monkeypatch):
    monkeypatch.setattr(door, "MAX_PENDING_HELLOS", 2)
    coordinator = _door(None, num_sites=1)
    running = Background(lambda: coordinator.wait_for_sites(join_timeout_s=20))
    flood = socket.create_connection(("127.0.0.1", coordinator.port))
    flood.sendall(b"x" * (door.MAX_MESSAGE_BYTES + 10))
    assert flood.recv(1) == b""  # dropped at the limit, nothing answered
    silent = [socket.create_connection(("127.0.0.1", coordinator.port)) for _ in range(2)]  # never say hello
    time.sleep(0.3)
    one_too_many = socket.create_connection(("127.0.0.1", coordinator.port))
    assert one_too_many.recv(1) == b""  # closed at once: two others are still to say hello
    for connection in silent:
        connection.close()
    time.sleep(0.3)
    site = _site(f"127.0.0.1:{coordinator.port}", "only", None)
    arrivals, error = running.outcome()
    assert error is None and arrivals[0].site_name == "only" and site.outcome()[0].rank == 0
    flood.close()
    one_too_many.close()


def test_tls_refuses_an_untrusted_coordinator_and_a_plain_one(certs, tmp_path):
    _make_certs(tmp_path)
    other_ca = door.client_context(str(tmp_path / "ca.crt"))  # a CA that did not sign the coordinator's certificate
    trusted_ca = door.client_context(str(certs / "ca.crt"))
    for coordinator, tls, message in (
        (_door(certs, num_sites=1), other_ca, "certificate is not trusted .* tls_cafile"),
        (_door(None, num_sites=1), trusted_ca, "no TLS with the coordinator .* insecure=True"),
    ):
        running = Background(lambda coordinator=coordinator: coordinator.wait_for_sites(join_timeout_s=1.5))
        with pytest.raises(door.DoorError, match=message):
            door.knock(f"localhost:{coordinator.port}", TOKEN, "s", _reading(), tls=tls, join_timeout_s=5)
        _, error = running.outcome()
        assert "only 0 of 1 sites joined" in str(error)  # the coordinator kept waiting for a site it could admit
    tls_door = _door(certs, num_sites=1)
    running = Background(lambda: tls_door.wait_for_sites(join_timeout_s=1.5))
    with pytest.raises(door.DoorError, match="without an answer: does it run with TLS"):
        door.knock(f"localhost:{tls_door.port}", TOKEN, "s", _reading(), tls=None, join_timeout_s=5)
    assert "only 0 of 1 sites joined" in str(running.outcome()[1])


def test_no_coordinator_is_one_line_after_join_timeout():
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    unreachable = f"cannot reach the coordinator at 127.0.0.1:{port} within join_timeout_s=1"
    with pytest.raises(door.DoorError, match=unreachable):
        door.knock(f"127.0.0.1:{port}", TOKEN, "s", _reading(), join_timeout_s=1)


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({}, "FL_JOIN_TOKEN is not set: put the run's join token in the environment or .env"),
        ({"FL_JOIN_TOKEN": "short"}, "FL_JOIN_TOKEN is shorter than 16 characters"),
    ],
)
def test_the_join_token_must_be_set_and_long(environ, message):
    with pytest.raises(door.DoorError, match=message):
        door.join_token(environ)
    assert door.join_token({"FL_JOIN_TOKEN": TOKEN}) == TOKEN


def test_addresses_and_certificates_fail_with_the_key_to_change(tmp_path):
    with pytest.raises(door.DoorError, match="coordinator_address='nohost' is not HOST:PORT"):
        door.parse_address("nohost", "coordinator_address")
    assert door.parse_address(":29400", "listen_address") == ("0.0.0.0", 29400)
    with pytest.raises(door.DoorError, match="check tls_certfile and tls_keyfile"):
        door.server_context(str(tmp_path / "missing.crt"), str(tmp_path / "missing.key"))
    with pytest.raises(door.DoorError, match="tls_cafile"):
        door.client_context(str(tmp_path / "missing-ca.crt"))


def test_an_open_door_keeps_a_returning_site_waiting_and_a_new_formation_starts_without_the_missing(certs):
    coordinator = _door(certs, num_sites=3, min_sites=2, site_names=["a", "b", "c"])
    address = f"localhost:{coordinator.port}"
    first = [_site(address, name, certs) for name in ("a", "b", "c")]
    assert [a.site_name for a in coordinator.wait_for_sites(join_timeout_s=20, keep_open=True)] == ["a", "b", "c"]
    assert [site.outcome()[0].rank for site in first] == [0, 1, 2]

    # b comes back while the others train: it waits in the open door, and the coordinator hears of it
    waiting: list[list[str]] = []
    stop = coordinator.serve_waiting_room(waiting.append)
    back = _site(address, "b", certs)
    deadline = time.monotonic() + 20
    while not waiting and time.monotonic() < deadline:
        time.sleep(0.05)
    stop()
    assert waiting[0] == ["b"]
    # a and c knock again; everyone is in: a new formation of three, b keeping its place
    again = [_site(address, name, certs) for name in ("a", "c")]
    arrivals = coordinator.wait_for_sites(join_timeout_s=20, all_within_s=5, keep_open=True)
    assert [arrival.site_name for arrival in arrivals] == ["a", "b", "c"]
    assert back.outcome()[0].rank == 1 and [site.outcome()[0].rank for site in again] == [0, 2]

    # c is gone for good: after all_within_s the two others are enough (min_sites=2)
    started = time.monotonic()
    last = [_site(address, name, certs) for name in ("a", "b")]
    arrivals = coordinator.wait_for_sites(join_timeout_s=20, all_within_s=1.5, keep_open=True)
    assert [arrival.site_name for arrival in arrivals] == ["a", "b"] and 1.5 <= time.monotonic() - started < 10
    assert [site.outcome()[0].site_names for site in last] == [["a", "b"], ["a", "b"]]

    # c comes back while the last formation trains, and the run ends before it could join: c is told so
    stop = coordinator.serve_waiting_room(waiting.append)
    late = _site(address, "c", certs)
    deadline = time.monotonic() + 20
    while waiting[-1] != ["c"] and time.monotonic() < deadline:
        time.sleep(0.05)
    stop()
    coordinator.finish("the run finished after round 20")
    result, error = late.outcome()
    assert result is None and isinstance(error, door.RunFinished)
    assert str(error) == "the coordinator says: the run finished after round 20"
