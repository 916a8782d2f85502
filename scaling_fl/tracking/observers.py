"""Which Sacred observer records a run, configured from the environment (.env).

MongoDB when `SACRED_URL` or `SACRED_HOST` is set, the embedded file store otherwise;
the config key `tracking` (auto | mongo | file | none) forces one. Credentials live
only in the environment: they are URL-escaped into the connection string here and
never appear in a message, the config, or the run record.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import quote_plus

from scaling_fl.errors import UserError

TRACKING_MODES = ("auto", "mongo", "file", "none")
MONGO_TIMEOUT_S = 5


class TrackingError(UserError, RuntimeError):
    """A one-line, secret-free description of why tracking cannot start, and the fix."""


@dataclass(frozen=True)
class MongoTarget:
    url: str  # carries credentials: never print it
    database: str
    hosts: str  # host:port list, safe to print

    def __repr__(self) -> str:  # keep the URL out of tracebacks and logs
        return f"MongoTarget(hosts={self.hosts!r}, database={self.database!r})"


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def mongo_target_from_env(env: dict | None = None) -> MongoTarget | None:
    """SACRED_URL (a full mongodb:// or mongodb+srv:// URL), or SACRED_USER / SACRED_PASSWORD /
    SACRED_HOST / SACRED_DATABASE (+ SACRED_AUTH_SOURCE, SACRED_TLS); None when nothing is set."""
    from pymongo.uri_parser import parse_uri

    env = os.environ if env is None else env
    url = env.get("SACRED_URL", "").strip()
    database = env.get("SACRED_DATABASE", "").strip()
    if not url:
        host = env.get("SACRED_HOST", "").strip()
        if not host:
            return None
        user, password = env.get("SACRED_USER", ""), env.get("SACRED_PASSWORD", "")
        credentials = f"{quote_plus(user)}:{quote_plus(password)}@" if user else ""
        options = []
        if user and env.get("SACRED_AUTH_SOURCE"):
            options.append(f"authSource={quote_plus(env['SACRED_AUTH_SOURCE'])}")
        if _truthy(env.get("SACRED_TLS")):
            options.append("tls=true")
        url = f"mongodb://{credentials}{host}/" + (f"?{'&'.join(options)}" if options else "")
    if not url.startswith(("mongodb://", "mongodb+srv://")):
        raise TrackingError("SACRED_URL must start with mongodb:// or mongodb+srv://")
    try:
        parsed = parse_uri(url, connect_timeout=MONGO_TIMEOUT_S) if url.startswith("mongodb+srv://") else parse_uri(url)
    except Exception as error:  # the message may echo the URL: report only the kind of problem
        raise TrackingError(
            f"the MongoDB address (SACRED_URL / SACRED_HOST) is not valid ({type(error).__name__}); "
            "escape special characters in user and password or set SACRED_USER / SACRED_PASSWORD"
        ) from None
    hosts = ",".join(f"{host}:{port}" for host, port in parsed["nodelist"]) or "?"
    return MongoTarget(url=url, database=database or parsed.get("database") or "sacred", hosts=hosts)


def mongo_client(target: MongoTarget, timeout_s: float = MONGO_TIMEOUT_S):
    import pymongo

    millis = int(timeout_s * 1000)
    return pymongo.MongoClient(
        target.url,
        serverSelectionTimeoutMS=millis,
        connectTimeoutMS=millis,
        socketTimeoutMS=max(millis, 30_000),
        appname="scaling-fl",
    )


def check_mongo(target: MongoTarget, timeout_s: float = MONGO_TIMEOUT_S) -> None:
    """Fails within about `timeout_s` with one line when the server is unreachable or refuses us."""
    import pymongo.errors

    client = mongo_client(target, timeout_s)
    try:
        client[target.database].list_collection_names()  # needs a connection and, if enabled, authentication
    except pymongo.errors.OperationFailure as error:
        what = "authentication failed" if error.code in (18, 8000) else f"the server refused access (code {error.code})"
        raise TrackingError(
            f"MongoDB at {target.hosts} (database {target.database!r}): {what}; "
            "check SACRED_USER / SACRED_PASSWORD (or SACRED_URL) and SACRED_AUTH_SOURCE"
        ) from None
    except Exception as error:  # PyMongoError, or a server that breaks the auth handshake (KeyError)
        cause = _unreachable_cause(error)
        if cause not in _NETWORK_CAUSES and _answers_without_credentials(target, min(timeout_s, PROBE_TIMEOUT_S)):
            # It answers, so it is reachable: what failed is logging in (a server without authentication,
            # such as nx-27017, or one that breaks the handshake, makes pymongo fail with a KeyError).
            raise TrackingError(
                f"MongoDB at {target.hosts} (database {target.database!r}): authentication failed "
                "(the server did not complete the login handshake); check SACRED_USER / "
                "SACRED_PASSWORD (or SACRED_URL) and SACRED_AUTH_SOURCE"
            ) from None
        raise TrackingError(
            f"MongoDB at {target.hosts} is not reachable within {timeout_s:g} s ({cause}); "
            "check SACRED_HOST / SACRED_URL and that the server is up, or run with tracking=file"
        ) from None
    finally:
        client.close()


PROBE_TIMEOUT_S = 2
_NETWORK_CAUSES = ("connection refused", "host name not found", "no answer, timed out")
_AUTH_OPTIONS = ("authsource", "authmechanism", "authmechanismproperties")
_OWN_OPTIONS = ("serverselectiontimeoutms", "connecttimeoutms", "sockettimeoutms", "appname")


def _answers_without_credentials(target: MongoTarget, timeout_s: float) -> bool:
    """Whether the target's servers answer a ping when no credentials are given: False for a URL
    without credentials (nothing to leave out), or when anything goes wrong. The probe is built
    from the parsed URL (hosts and options, the user, password and auth options left out), so no
    secret can reach a message through it."""
    import pymongo
    from pymongo.uri_parser import parse_uri

    client = None
    try:
        parsed = (
            parse_uri(target.url, connect_timeout=timeout_s)
            if target.url.startswith("mongodb+srv://")
            else parse_uri(target.url)
        )
        if not parsed.get("username") or not parsed["nodelist"]:
            return False
        hosts = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}" for host, port in parsed["nodelist"]]
        options = {
            name: value for name, value in parsed["options"].items() if name.lower() not in _AUTH_OPTIONS + _OWN_OPTIONS
        }
        millis = int(timeout_s * 1000)
        client = pymongo.MongoClient(
            hosts,
            serverSelectionTimeoutMS=millis,
            connectTimeoutMS=millis,
            socketTimeoutMS=millis,
            appname="scaling-fl-probe",
            **options,
        )
        return bool(client.admin.command("ping").get("ok"))
    except Exception:  # unreachable after all, or an address the probe cannot use: not an authentication problem
        return False
    finally:
        if client is not None:
            client.close()


def _unreachable_cause(error: Exception) -> str:
    """Why no server answered, in a few words (pymongo's message may quote the address, never shown)."""
    text = str(error).lower()
    if "refused" in text:
        return "connection refused"
    if any(
        sign in text
        for sign in (
            "name or service not known",
            "nodename nor servname",
            "name resolution",
            "getaddrinfo",
            "no address associated",
        )
    ):
        return "host name not found"
    if "timed out" in text or "no servers found yet" in text:
        return "no answer, timed out"
    return type(error).__name__


def choose_tracking(mode: str, env: dict | None = None) -> tuple[str, MongoTarget | None]:
    """Resolves `tracking=auto` against the environment; returns ('mongo'|'file'|'none', target)."""
    target = mongo_target_from_env(env)
    if mode == "auto":
        return ("mongo", target) if target else ("file", None)
    if mode == "mongo" and target is None:
        raise TrackingError(
            "tracking=mongo needs SACRED_URL or SACRED_HOST (+ SACRED_USER, SACRED_PASSWORD, "
            "SACRED_DATABASE) in the environment or .env"
        )
    return mode, target if mode == "mongo" else None
