"""Organizations and their access tokens.

Kept in a small SQLite file beside the DuckDB store, not in DuckDB: DuckDB allows one process per
file, and `meterline token create|revoke` must work while the server runs. Tokens are stored only
as HMAC-SHA256 hashes keyed by the data dir's secret; the token text is shown once. Lookups are
cached for `cache_seconds`, so a revoked token stops working within that time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aggregator.errors import NotFound, UsageError

TOKEN_PREFIX = "mlt_oat_"  # noqa: S105 - not a secret
CUSTOMER_TOKEN_PREFIX = "mlt_cst_"  # noqa: S105 - not a secret
SECRET_FILE = "secret.key"  # noqa: S105 - a file name
AUTH_FILE = "auth.sqlite3"
# Fewer bytes than this is no secret: the one a data dir makes is 32 random bytes.
_SECRET_MIN_BYTES = 16
_SCHEMA = """
CREATE TABLE IF NOT EXISTS organizations (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    organization_id TEXT NOT NULL REFERENCES organizations(id),
    token_hash TEXT NOT NULL UNIQUE,
    label TEXT NOT NULL,
    created_at TEXT NOT NULL,
    revoked_at TEXT
);
-- Customer sessions (Polar's): a token that reads one customer's portal, until it expires.
CREATE TABLE IF NOT EXISTS customer_sessions (
    id TEXT PRIMARY KEY,
    organization_id TEXT NOT NULL REFERENCES organizations(id),
    customer_id TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    return_url TEXT,
    created_at TEXT NOT NULL,
    expires_at TEXT NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class Organization:
    id: str
    name: str


@dataclass(frozen=True, slots=True)
class TokenInfo:
    id: str
    organization: Organization
    label: str
    created_at: str
    revoked_at: str | None


@dataclass(frozen=True, slots=True)
class OrganizationInfo:
    organization: Organization
    created_at: str
    active_tokens: int
    revoked_tokens: int


@dataclass(frozen=True, slots=True)
class CustomerSession:
    id: str
    organization_id: str
    customer_id: str
    return_url: str | None
    created_at: datetime
    expires_at: datetime


def load_secret(data_dir: Path) -> bytes:
    """The data dir's HMAC key, created (mode 0600) on first use."""
    path = data_dir / SECRET_FILE
    if not path.exists():
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise UsageError(
                f"cannot make the cluster secret {path} ({exc.strerror}): pass a writable"
                " --data-dir (or METERLINE_DATA_DIR)"
            ) from None
        with os.fdopen(fd, "wb") as handle:
            handle.write(secrets.token_bytes(32))
    return read_secret(path)


def token_hash(secret: bytes, token: str) -> str:
    """How a token is kept and compared: keyed with the cluster secret (`load_secret`)."""
    return hmac.new(secret, token.encode(), hashlib.sha256).hexdigest()


def read_secret(path: Path) -> bytes:
    """An existing cluster secret (`secret.key`); UsageError naming the file if there is none
    (a process that only checks tokens must never make a new one), or if it cannot be read or
    holds no secret."""
    return _checked(path, _read(path))


def _read(path: Path) -> bytes:
    copy = f"copy the core's {SECRET_FILE} there (the cluster secret that tokens are hashed with)"
    try:
        secret = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist: {copy}") from None
    except IsADirectoryError:
        raise UsageError(f"{path} is a folder, not a cluster secret: {copy}") from None
    except OSError as exc:
        raise UsageError(
            f"cannot read the cluster secret {path} ({exc.strerror}): run as a user who may read"
            f" it, or {copy}"
        ) from None
    return secret


def _checked(path: Path, secret: bytes) -> bytes:
    """`secret` as read from `path`, if it can be a cluster secret (UsageError if not)."""
    if len(secret.strip()) < _SECRET_MIN_BYTES:
        held = "is empty" if not secret.strip() else f"holds only {len(secret)} bytes"
        raise UsageError(
            f"{path} {held}, not a cluster secret (a data dir's {SECRET_FILE} holds 32 random"
            f" bytes): copy the core's {SECRET_FILE} there, or for a new cluster make one with"
            f" `openssl rand 32 > {path}`"
        )
    return secret


def cluster_secret(data_dir: Path, secret_file: Path | None, *, create: bool) -> bytes:
    """The cluster secret: `secret_file` if given (a data dir with a secret.key of its own must
    hold the same: tokens are hashed with it), else the data dir's secret.key (made if `create`,
    else UsageError)."""
    kept = data_dir / SECRET_FILE
    if secret_file is None:
        return load_secret(data_dir) if create else read_secret(kept)
    secret = _read(secret_file)
    if kept.exists() and _read(kept) != secret:
        raise UsageError(
            f"{secret_file} is not the {kept} this data dir's tokens are hashed with: make the"
            f" secret file a copy of it, or pass no --secret-file"
        )
    return _checked(secret_file, secret)


def _opened(path: Path) -> sqlite3.Connection:
    """The token registry's database, made if new (UsageError if it cannot be)."""
    db = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(_SCHEMA)
    except (OSError, sqlite3.OperationalError) as exc:  # the file or its folder: no query fails
        if db is not None:
            db.close()
        raise UsageError(
            f"cannot open the token registry {path} ({exc}): pass a --data-dir this user may"
            " write in (or METERLINE_DATA_DIR)"
        ) from None
    return db


@dataclass(frozen=True, slots=True)
class TokenRow:
    """A token as kept and as its records carry it: never its text."""

    id: str
    organization_id: str
    token_hash: str
    label: str
    created_at: str
    revoked_at: str | None


class TokenRegistry:
    """Create, list, revoke and verify organization access tokens."""

    def __init__(
        self, data_dir: Path, *, cache_seconds: float = 2.0, secret: bytes | None = None
    ) -> None:
        """`secret`: the cluster secret, when not the data dir's (`cluster_secret`); the data
        dir's is read when a token is first hashed (made if missing), so that listing or
        revoking never makes one."""
        self._data_dir = data_dir
        self._given_secret = secret
        self._db = _opened(data_dir / AUTH_FILE)
        self._lock = threading.Lock()
        self._cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, Organization | None]] = {}
        self._known: set[str] = set()

    def close(self) -> None:
        self._db.close()

    @property
    def _secret(self) -> bytes:
        if self._given_secret is None:
            self._given_secret = load_secret(self._data_dir)
        return self._given_secret

    def _hash(self, token: str) -> str:
        return token_hash(self._secret, token)

    def snapshot(self) -> tuple[list[tuple[Organization, str]], list[TokenRow]]:
        """Every organization (with its creation time) and every token, as stored."""
        with self._lock:
            orgs = self._db.execute("SELECT id, name, created_at FROM organizations").fetchall()
            tokens = self._db.execute(
                "SELECT id, organization_id, token_hash, label, created_at, revoked_at FROM tokens"
            ).fetchall()
        return [(Organization(r[0], r[1]), r[2]) for r in orgs], [TokenRow(*r) for r in tokens]

    def keep(
        self,
        orgs: list[tuple[Organization, str]],
        tokens: list[TokenRow],
        revoked: list[tuple[str, str]],
    ) -> None:
        """Store organizations, tokens and revocations (token id, when) made elsewhere (the
        control topic's records); what is here already is left as it is."""
        with self._lock:
            for org, created_at in orgs:
                self._db.execute(
                    "INSERT INTO organizations (id, name, created_at) VALUES (?, ?, ?)"
                    " ON CONFLICT DO NOTHING",
                    (org.id, org.name, created_at),
                )
            for t in tokens:
                self._db.execute(
                    "INSERT INTO tokens (id, organization_id, token_hash, label, created_at,"
                    " revoked_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET"
                    " revoked_at = coalesce(tokens.revoked_at, excluded.revoked_at)",
                    (t.id, t.organization_id, t.token_hash, t.label, t.created_at, t.revoked_at),
                )
            for token_id, at in revoked:
                self._db.execute(
                    "UPDATE tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                    (at, token_id),
                )
        self._cache.clear()

    def organization(self, name: str) -> Organization:
        """Get or create the organization called `name`."""
        with self._lock:
            row = self._db.execute(
                "SELECT id, name FROM organizations WHERE name = ?", (name,)
            ).fetchone()
            if row is None:
                row = (str(uuid.uuid4()), name)
                self._db.execute(
                    "INSERT INTO organizations (id, name, created_at) VALUES (?, ?, ?)",
                    (*row, _now()),
                )
        return Organization(*row)

    def create_token(self, org: Organization, label: str, token: str | None = None) -> str:
        """Register a token for `org` and return its text (the only time it is visible)."""
        token = token or TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self._lock:
            self._db.execute(
                "INSERT INTO tokens (id, organization_id, token_hash, label, created_at)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (token_hash) DO NOTHING",
                (str(uuid.uuid4()), org.id, self._hash(token), label, _now()),
            )
        return token

    def development_token(self, org: Organization) -> str | None:
        """A token derived from the data dir's secret, so `meterline up` can print the same
        one on every start without storing its text. None once it has been revoked."""
        token, row = self._development_row()
        if row is not None:
            return None if row[0] else token
        return self.create_token(org, "development (meterline up)", token)

    def development_token_active(self) -> bool:
        """Whether a development token was created and not revoked (never creates one)."""
        row = self._development_row()[1]
        return row is not None and row[0] is None

    def _development_row(self) -> tuple[str, tuple[str | None] | None]:
        digest = hmac.new(self._secret, b"meterline development token", hashlib.sha256).digest()
        token = TOKEN_PREFIX + "dev_" + base64.urlsafe_b64encode(digest[:24]).decode()
        with self._lock:
            row = self._db.execute(
                "SELECT revoked_at FROM tokens WHERE token_hash = ?", (self._hash(token),)
            ).fetchone()
        return token, row

    def list_tokens(self) -> list[TokenInfo]:
        with self._lock:
            rows = self._db.execute(
                "SELECT t.id, o.id, o.name, t.label, t.created_at, t.revoked_at"
                " FROM tokens t JOIN organizations o ON o.id = t.organization_id"
                " ORDER BY t.created_at"
            ).fetchall()
        return [TokenInfo(r[0], Organization(r[1], r[2]), r[3], r[4], r[5]) for r in rows]

    def list_organizations(self) -> list[OrganizationInfo]:
        """Every organization, oldest first, with how many of its tokens are active and
        revoked (never creates one, unlike `organization`)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT o.id, o.name, o.created_at, count(t.id) - count(t.revoked_at),"
                " count(t.revoked_at) FROM organizations o"
                " LEFT JOIN tokens t ON t.organization_id = o.id"
                " GROUP BY o.id, o.name, o.created_at ORDER BY o.created_at, o.name"
            ).fetchall()
        return [OrganizationInfo(Organization(r[0], r[1]), r[2], r[3], r[4]) for r in rows]

    def revoke(self, token_id: str) -> None:
        with self._lock:
            cursor = self._db.execute(
                "UPDATE tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (_now(), token_id),
            )
        if cursor.rowcount == 0:
            raise NotFound(f"No active token with id {token_id}")

    def with_created_at(self, organization_id: str) -> tuple[Organization, str] | None:
        """The organization and when it was created (ISO 8601), or None if there is none."""
        with self._lock:
            row = self._db.execute(
                "SELECT id, name, created_at FROM organizations WHERE id = ?", (organization_id,)
            ).fetchone()
        return None if row is None else (Organization(row[0], row[1]), str(row[2]))

    def organization_exists(self, organization_id: str) -> bool:
        """Whether the organization exists. Organizations are never deleted, so a yes is
        remembered."""
        if organization_id in self._known:
            return True
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM organizations WHERE id = ?", (organization_id,)
            ).fetchone()
        if row is not None:
            self._known.add(organization_id)
        return row is not None

    def organization_id(self, token: str) -> str | None:
        """The id of the organization owning `token` (`ingest.http.Authenticate`)."""
        org = self.authenticate(token)
        return org.id if org else None

    def authenticate(self, token: str) -> Organization | None:
        """The organization owning `token`, or None if it is unknown or revoked."""
        digest = self._hash(token)
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            return cached[1]
        with self._lock:
            row = self._db.execute(
                "SELECT t.token_hash, o.id, o.name FROM tokens t"
                " JOIN organizations o ON o.id = t.organization_id"
                " WHERE t.token_hash = ? AND t.revoked_at IS NULL",
                (digest,),
            ).fetchone()
        org = None
        # The equality lookup above is on a keyed hash; the final check is constant time.
        if row is not None and hmac.compare_digest(row[0], digest):
            org = Organization(row[1], row[2])
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[digest] = (now + self._cache_seconds, org)
        return org

    def create_customer_session(
        self,
        organization_id: str,
        customer_id: str,
        return_url: str | None,
        now: datetime,
        lifetime: timedelta,
    ) -> tuple[str, CustomerSession]:
        """A new session of the customer, and its token text (the only time it is visible).
        Expired sessions are deleted here, so the table holds only live ones."""
        token = CUSTOMER_TOKEN_PREFIX + secrets.token_urlsafe(32)
        found = CustomerSession(
            str(uuid.uuid4()), organization_id, customer_id, return_url, now, now + lifetime
        )
        with self._lock:
            self._db.execute("DELETE FROM customer_sessions WHERE expires_at <= ?", (_iso(now),))
            self._db.execute(
                "INSERT INTO customer_sessions (id, organization_id, customer_id, token_hash,"
                " return_url, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    found.id,
                    organization_id,
                    customer_id,
                    self._hash(token),
                    return_url,
                    _iso(found.created_at),
                    _iso(found.expires_at),
                ),
            )
        return token, found

    def customer_sessions(self, now: datetime) -> list[tuple[CustomerSession, str]]:
        """Every unexpired customer session, with its token's hash."""
        with self._lock:
            rows = self._db.execute(
                "SELECT token_hash, id, organization_id, customer_id, return_url, created_at,"
                " expires_at FROM customer_sessions WHERE expires_at > ?",
                (_iso(now),),
            ).fetchall()
        return [(_session(row), row[0]) for row in rows]

    def keep_customer_sessions(self, sessions: list[tuple[CustomerSession, str]]) -> None:
        """Store customer sessions (with their tokens' hashes) made elsewhere (the control
        topic's records); one here already is left as it is."""
        with self._lock:
            for found, digest in sessions:
                self._db.execute(
                    "INSERT INTO customer_sessions (id, organization_id, customer_id, token_hash,"
                    " return_url, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT DO NOTHING",
                    (
                        found.id,
                        found.organization_id,
                        found.customer_id,
                        digest,
                        found.return_url,
                        _iso(found.created_at),
                        _iso(found.expires_at),
                    ),
                )

    def customer_session(self, token: str, now: datetime) -> CustomerSession | None:
        """The unexpired customer session of `token`, or None. Not cached: a session's end
        is exact, and portal reads are few."""
        if not token.startswith(CUSTOMER_TOKEN_PREFIX):
            return None
        digest = self._hash(token)
        with self._lock:
            row = self._db.execute(
                "SELECT token_hash, id, organization_id, customer_id, return_url, created_at,"
                " expires_at FROM customer_sessions WHERE token_hash = ? AND expires_at > ?",
                (digest, _iso(now)),
            ).fetchone()
        if row is None or not hmac.compare_digest(row[0], digest):
            return None
        return _session(row)


def _session(row: tuple[Any, ...]) -> CustomerSession:
    """A `customer_sessions` row read as (token_hash, id, …, expires_at)."""
    created_at, expires_at = datetime.fromisoformat(row[5]), datetime.fromisoformat(row[6])
    return CustomerSession(row[1], row[2], row[3], row[4], created_at, expires_at)


def _iso(moment: datetime) -> str:
    # Fixed width, UTC: the text compares as the time does.
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f+00:00")


def _now() -> str:
    return datetime.now(UTC).isoformat()
