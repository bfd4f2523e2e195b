"""Who may call: the operator's users-and-tokens file, and checking an `Authorization` value against it.

MLflow's client conventions decide the wire: `Bearer <token>` (MLFLOW_TRACKING_TOKEN) and `Basic
base64(user:password)` (MLFLOW_TRACKING_USERNAME/PASSWORD). HTTP sends them in the `Authorization` header,
gRPC in the `authorization` call metadata; both edges ask one `Authenticator`.

The file stores scrypt hashes with a per-entry salt, never a secret. A token is `th_<id>_<secret>`: the id
names its entry, so checking one costs one hash, not one per entry. A verified credential is remembered by its
SHA-256 (bounded), so steady traffic costs a dictionary lookup instead of a deliberately slow scrypt.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trackhouse.ingest.errors import PermanentError

ROLES = ("read", "write")
TOKEN_PREFIX = "th_"
REALM = "trackhouse"
#: scrypt cost: about 16 MiB and tens of milliseconds per check on a cache miss (OWASP's minimum is n=2**17 for
#: passwords typed by people; tokens are 256-bit random, and a verified credential is cached).
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}
_CACHE_ENTRIES = 4096
#: The file is looked at again at most this often, so `trackhouse auth add-user` takes effect without a restart.
_RELOAD_S = 2.0
_MAX_HEADER = 8192


class AuthError(PermanentError):
    """No usable credentials (UNAUTHENTICATED / 401)."""


class AuthFileError(PermanentError):
    """The users-and-tokens file is unreadable or malformed."""


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    role: str

    @property
    def can_write(self) -> bool:
        return self.role == "write"


def hash_secret(secret: str) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(secret.encode(), salt=salt, **_SCRYPT)
    return f"scrypt${_SCRYPT['n']}${_SCRYPT['r']}${_SCRYPT['p']}${salt.hex()}${digest.hex()}"


def verify_secret(secret: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        computed = hashlib.scrypt(
            secret.encode(), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p), maxmem=64 * 1024 * 1024
        )
    except (ValueError, UnicodeEncodeError):
        return False
    return hmac.compare_digest(computed, bytes.fromhex(digest))


@dataclass(frozen=True, slots=True)
class _Entry:
    name: str
    role: str
    hash: str


@dataclass(frozen=True, slots=True)
class Credentials:
    """The parsed file: users by name (Basic) and tokens by id (Bearer)."""

    users: dict[str, _Entry]
    tokens: dict[str, _Entry]

    @staticmethod
    def load(path: Path) -> Credentials:
        try:
            document = json.loads(path.read_text()) if path.exists() else {}
        except (OSError, ValueError) as exc:
            raise AuthFileError(f"cannot read the auth file {path}: {exc}") from None
        try:
            users = {name: _entry(name, e) for name, e in document.get("users", {}).items()}
            tokens = {tid: _entry(e.get("name", tid), e) for tid, e in document.get("tokens", {}).items()}
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise AuthFileError(f"the auth file {path} is malformed: {exc}") from None
        return Credentials(users, tokens)


def _entry(name: str, raw: dict[str, Any]) -> _Entry:
    role, hashed = raw["role"], raw["hash"]
    if role not in ROLES or not isinstance(hashed, str):
        raise ValueError(f"entry {name!r} needs a role in {ROLES} and a hash")
    return _Entry(str(name), role, hashed)


def _parse_document(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"users": {}, "tokens": {}}
    document: dict[str, Any] = json.loads(path.read_text())
    document.setdefault("users", {})
    document.setdefault("tokens", {})
    return document


def _write_document(path: Path, document: dict[str, Any]) -> None:
    """Atomically, and readable by its owner only: hashes are not secrets, but they need not be public."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(document, out, indent=2, sort_keys=True)
        out.write("\n")
    os.replace(tmp, path)


def add_user(path: Path, name: str, password: str, role: str) -> None:
    if role not in ROLES:
        raise AuthFileError(f"role must be one of {', '.join(ROLES)}")
    if not name or ":" in name:
        raise AuthFileError("a user name must be non-empty and contain no ':' (Basic auth splits on it)")
    if not password:
        raise AuthFileError("the password must not be empty")
    Credentials.load(path)  # refuse to rewrite a malformed file
    document = _parse_document(path)
    document["users"][name] = {"role": role, "hash": hash_secret(password)}
    _write_document(path, document)


def add_token(path: Path, name: str, role: str) -> str:
    """Create a token, store its hash, and return the token: the only time anyone sees it."""
    if role not in ROLES:
        raise AuthFileError(f"role must be one of {', '.join(ROLES)}")
    Credentials.load(path)
    document = _parse_document(path)
    token_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    document["tokens"][token_id] = {"name": name, "role": role, "hash": hash_secret(secret)}
    _write_document(path, document)
    return f"{TOKEN_PREFIX}{token_id}_{secret}"


def remove(path: Path, name: str) -> int:
    """Remove the user and every token with this name; returns how many entries went."""
    document = _parse_document(path)
    removed = int(document["users"].pop(name, None) is not None)
    for token_id, entry in list(document["tokens"].items()):
        if entry.get("name") == name:
            del document["tokens"][token_id]
            removed += 1
    _write_document(path, document)
    return removed


class Authenticator:
    """Checks `Authorization` values against the file. Thread-safe; `check` may run in a worker thread."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        if not path.exists():
            raise AuthFileError(f"the auth file {path} does not exist: create it with `trackhouse auth add-user`")
        self._credentials = Credentials.load(path)  # fail fast on a malformed file
        self._stamp = self._file_stamp()
        self._checked_at = time.monotonic()
        self._verified: OrderedDict[bytes, Principal] = OrderedDict()

    def cached(self, authorization: str | None) -> Principal | None:
        """The principal for an already-verified value, without hashing; None when it needs `check`."""
        if not authorization:
            return None
        self._maybe_reload()
        key = hashlib.sha256(authorization.encode(errors="surrogateescape")).digest()
        with self._lock:
            principal = self._verified.get(key)
            if principal is not None:
                self._verified.move_to_end(key)
            return principal

    def check(self, authorization: str | None) -> Principal:
        """The principal behind an `Authorization` value; raises AuthError. Costs one scrypt on a cache miss."""
        principal = self.cached(authorization)
        if principal is not None:
            return principal
        if not authorization:
            raise AuthError("authentication required: send a Bearer token or Basic credentials")
        if len(authorization) > _MAX_HEADER:
            raise AuthError("the Authorization value is too long")
        try:
            principal = self._verify(authorization)
        except AuthError:
            # A credential added a moment ago works at once: on a refusal the file is looked at again now, not
            # after the reload interval. Refusals already queue for the hashing slots, so the stat is cheap.
            if not self._reload():
                raise
            principal = self._verify(authorization)
        key = hashlib.sha256(authorization.encode(errors="surrogateescape")).digest()
        with self._lock:
            self._verified[key] = principal
            while len(self._verified) > _CACHE_ENTRIES:
                self._verified.popitem(last=False)
        return principal

    def _verify(self, authorization: str) -> Principal:
        scheme, _, value = authorization.strip().partition(" ")
        credentials = self._credentials
        if scheme.lower() == "bearer":
            token = value.strip()
            token_id, _, secret = token.removeprefix(TOKEN_PREFIX).partition("_")
            entry = credentials.tokens.get(token_id) if token.startswith(TOKEN_PREFIX) else None
            if entry is not None and verify_secret(secret, entry.hash):
                return Principal(entry.name, entry.role)
            raise AuthError("invalid token")
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                raise AuthError("malformed Basic credentials") from None
            entry = credentials.users.get(user)
            if entry is not None and verify_secret(password, entry.hash):
                return Principal(entry.name, entry.role)
            raise AuthError("invalid user name or password")
        raise AuthError("unsupported authorization scheme: use Bearer or Basic")

    def _file_stamp(self) -> tuple[int, int]:
        try:
            stat = self._path.stat()
        except OSError:
            return (0, 0)
        return (stat.st_mtime_ns, stat.st_size)

    def _maybe_reload(self) -> None:
        """Pick up edits (and removals) within a few seconds."""
        now = time.monotonic()
        if now - self._checked_at >= _RELOAD_S:
            self._checked_at = now
            self._reload()

    def _reload(self) -> bool:
        """Load the file again if it changed; True if it did. A malformed edit keeps the last good file."""
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return False
        try:
            credentials = Credentials.load(self._path)
        except AuthFileError:
            return False
        with self._lock:
            self._credentials, self._stamp = credentials, stamp
            self._verified.clear()
        return True
