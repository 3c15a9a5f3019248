"""Panel accounts, the login trail, lockouts and the audit log.

Passwords are kept as scrypt hashes (``hashlib.scrypt``: OpenSSL's, memory-hard, no extra dependency) with
a per-user salt; a hash records its own cost parameters so they can be raised later without locking anyone
out. Throttling counts failed logins per account name (whether or not it exists, so failures do not tell an
attacker which names are real) and per address, inside a sliding window; past the limit a lockout row
holds the account or the address until it expires or an admin lifts it.
"""

from __future__ import annotations

import builtins
import hashlib
import hmac
import os
import re
import time
from dataclasses import dataclass
from typing import Any

from appliance.errors import ApplianceError
from appliance.store.index import Index

ROLES = ("admin", "technician", "viewer")
LANGUAGES = ("en", "vi", "ko")

#: scrypt cost: 16 MiB and ~50 ms per hash on a Jetson-class CPU; recorded in each hash.
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
MIN_PASSWORD = 12
MAX_PASSWORD = 1024
_COMMON = {
    "password",
    "passw0rd",
    "123456789012",
    "qwertyuiop",
    "administrator",
    "letmein",
    "welcome",
    "changeme",
    "radiology",
    "hospital",
    "orthanc",
    "appliance",
}


class UserError(ApplianceError):
    """A user could not be added or changed; the message says what to do instead."""


class WeakPasswordError(UserError):
    """The password is too easy to guess."""


@dataclass(frozen=True)
class User:
    name: str
    role: str
    language: str | None
    created_at: float
    disabled: bool


def check_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise UserError(f"user name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
    return name


def check_role(role: str) -> str:
    if role not in ROLES:
        raise UserError(f"role {role!r}: choose one of {', '.join(ROLES)}")
    return role


def password_problem(name: str, password: str) -> str | None:
    """Why ``password`` is too weak for ``name``, or None when it is acceptable."""
    if len(password) < MIN_PASSWORD:
        return f"it has {len(password)} characters; use at least {MIN_PASSWORD} (a short sentence works well)"
    if len(password) > MAX_PASSWORD:
        return f"it is longer than {MAX_PASSWORD} characters"
    lowered = password.lower()
    if name.lower() in lowered:
        return "it contains the user name"
    letters = re.sub(r"[^a-z]", "", lowered)
    if lowered in _COMMON or letters in _COMMON or any(w in lowered for w in ("password", "12345678", "qwerty")):
        return "it is, or contains, a commonly used password"
    if len(set(password)) < 6:
        return "it repeats too few different characters"
    classes = sum(bool(re.search(p, password)) for p in (r"[a-z]", r"[A-Z]", r"[0-9]", r"[^A-Za-z0-9]"))
    if classes < 2 and len(password) < 20:
        return "use at least two of lower case, upper case, digits and symbols, or 20 characters or more"
    return None


def hash_password(password: str) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, maxmem=64 * 1024 * 1024
    )
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt" or int(n) > 2**20 or int(r) > 32 or int(p) > 16:
            return False
        got = hashlib.scrypt(
            password.encode("utf-8")[: MAX_PASSWORD * 4],
            salt=bytes.fromhex(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            maxmem=256 * 1024 * 1024,
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got.hex(), digest)


#: A hash compared when the account does not exist, so a wrong name costs as long as a wrong password.
_DUMMY_HASH = hash_password(os.urandom(8).hex())


@dataclass(frozen=True)
class Throttle:
    """Failed logins allowed per account and per address within ``window`` seconds; a lockout lasts ``lock``."""

    account_failures: int = 10
    address_failures: int = 20
    window: float = 900.0
    lock: float = 900.0


class Users:
    def __init__(self, index: Index) -> None:
        self.index = index

    # -- accounts -----------------------------------------------------------------------------------

    def add(self, name: str, role: str, password: str, language: str | None = None) -> User:
        check_name(name)
        check_role(role)
        problem = password_problem(name, password)
        if problem:
            raise WeakPasswordError(f"password refused: {problem}")
        if language is not None and language not in LANGUAGES:
            raise UserError(f"language {language!r}: choose one of {', '.join(LANGUAGES)}")
        now = time.time()
        with self.index.transaction() as c:
            if c.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone():
                raise UserError(f"user {name!r} exists already; change it with 'appliance users set'")
            c.execute(
                "INSERT INTO users(name, role, password, language, created_at, changed_at) VALUES (?, ?, ?, ?, ?, ?)",
                (name, role, hash_password(password), language, now, now),
            )
        return User(name, role, language, now, False)

    def get(self, name: str) -> User | None:
        r = self.index.conn.execute(
            "SELECT name, role, language, created_at, disabled FROM users WHERE name = ?", (name,)
        ).fetchone()
        return User(r[0], r[1], r[2], r[3], bool(r[4])) if r else None

    def list(self) -> list[User]:
        return [
            User(r[0], r[1], r[2], r[3], bool(r[4]))
            for r in self.index.conn.execute(
                "SELECT name, role, language, created_at, disabled FROM users ORDER BY name"
            )
        ]

    def count(self) -> int:
        return int(self.index.conn.execute("SELECT count(*) FROM users").fetchone()[0])

    def update(
        self,
        name: str,
        *,
        role: str | None = None,
        password: str | None = None,
        language: str | None | bool = False,
        disabled: bool | None = None,
    ) -> None:
        """Change what is given (``language=None`` clears it: the browser's choice; ``False`` leaves it)."""
        sets: dict[str, object] = {}
        if role is not None:
            sets["role"] = check_role(role)
        if password is not None:
            problem = password_problem(name, password)
            if problem:
                raise WeakPasswordError(f"password refused: {problem}")
            sets["password"] = hash_password(password)
        if language is not False:
            if language is not None and language not in LANGUAGES:
                raise UserError(f"language {language!r}: choose one of {', '.join(LANGUAGES)}")
            sets["language"] = language
        if disabled is not None:
            sets["disabled"] = int(disabled)
        if not sets:
            return
        sets["changed_at"] = time.time()
        with self.index.transaction() as c:
            if role is not None and role != "admin" or disabled:
                self._keep_an_admin(c, name)
            cols = ", ".join(f"{k} = ?" for k in sets)
            cur = c.execute(f"UPDATE users SET {cols} WHERE name = ?", (*sets.values(), name))
            if cur.rowcount == 0:
                raise UserError(f"no user {name!r}")

    def remove(self, name: str) -> None:
        with self.index.transaction() as c:
            self._keep_an_admin(c, name)
            if c.execute("DELETE FROM users WHERE name = ?", (name,)).rowcount == 0:
                raise UserError(f"no user {name!r}")

    @staticmethod
    def _keep_an_admin(c: Any, name: str) -> None:
        admins = [
            r[0]
            for r in c.execute("SELECT name FROM users WHERE role = 'admin' AND disabled = 0 AND name != ?", (name,))
        ]
        was_admin = c.execute("SELECT 1 FROM users WHERE name = ? AND role = 'admin'", (name,)).fetchone()
        if was_admin and not admins:
            raise UserError(f"{name!r} is the last admin: make another user admin first")

    # -- logins -------------------------------------------------------------------------------------

    def locked(self, name: str, address: str, now: float | None = None) -> str | None:
        """``"account"`` or ``"address"`` while a lockout holds, else None."""
        now = time.time() if now is None else now
        for kind, key in (("account", name), ("address", address)):
            r = self.index.conn.execute(
                "SELECT until FROM lockouts WHERE kind = ? AND key = ? AND until > ?", (kind, key, now)
            ).fetchone()
            if r:
                return kind
        return None

    def authenticate(
        self, name: str, password: str, address: str, throttle: Throttle, now: float | None = None
    ) -> tuple[User | None, str | None, builtins.list[str]]:
        """Check a login: (user or None, why not, lockouts it started).

        A locked address is refused before anything is hashed or written, so a flood from it costs a lookup
        and leaves no rows. A locked account is refused without hashing too, but the attempt still counts
        against its address: guessing at a locked account locks the guesser. An account's failures are
        counted since its last success (the user who mistyped, then got it right, starts afresh); an
        address's are not reset by a success, so an attacker holding one valid account cannot log in
        between guesses to keep the address unlocked.
        """
        now = time.time() if now is None else now
        name = name[:64]
        lock = self.locked(name, address, now)
        if lock == "address":
            return None, "locked_address", []
        row = None
        ok = False
        if lock is None:
            row = self.index.conn.execute(
                "SELECT name, role, language, created_at, disabled, password FROM users WHERE name = ?", (name,)
            ).fetchone()
            ok = verify_password(password, row["password"] if row else _DUMMY_HASH) and row is not None
            if ok and row["disabled"]:
                ok = False
        started: builtins.list[str] = []
        with self.index.transaction() as c:
            c.execute(
                "INSERT INTO login_attempts(at, username, address, ok) VALUES (?, ?, ?, ?)",
                (now, name, address, int(ok)),
            )
            if not ok:
                checks = [("address", address, "address", throttle.address_failures, False)]
                if lock is None:
                    checks.insert(0, ("account", name, "username", throttle.account_failures, True))
                for kind, key, col, limit, reset_on_success in checks:
                    since = now - throttle.window
                    if reset_on_success:
                        last_ok = c.execute(
                            f"SELECT max(at) FROM login_attempts WHERE {col} = ? AND ok = 1", (key,)
                        ).fetchone()[0]
                        since = max(since, last_ok or 0.0)
                    fails = c.execute(
                        f"SELECT count(*) FROM login_attempts WHERE {col} = ? AND ok = 0 AND at > ?", (key, since)
                    ).fetchone()[0]
                    if fails >= limit:
                        c.execute(
                            "INSERT INTO lockouts(kind, key, since, until) VALUES (?, ?, ?, ?)"
                            " ON CONFLICT(kind, key) DO UPDATE SET since = excluded.since, until = excluded.until",
                            (kind, key, now, now + throttle.lock),
                        )
                        started.append(kind)
            # the trail is for throttling and the audit log keeps the record: keep a bounded window
            c.execute("DELETE FROM login_attempts WHERE at < ?", (now - max(throttle.window, 86400.0),))
        if lock == "account":
            return None, "locked_account", started
        if not ok or row is None:
            return None, "disabled" if row is not None and row["disabled"] else "wrong", started
        return User(row[0], row[1], row[2], row[3], bool(row[4])), None, started

    def lockouts(self, now: float | None = None) -> builtins.list[dict[str, Any]]:
        now = time.time() if now is None else now
        return [
            dict(r)
            for r in self.index.conn.execute(
                "SELECT kind, key, since, until FROM lockouts WHERE until > ? ORDER BY since DESC", (now,)
            )
        ]

    def unlock(self, kind: str, key: str) -> bool:
        """Lift a lockout, and forget the failures that led to it (else the next mistake locks again)."""
        col = {"account": "username", "address": "address"}.get(kind)
        if col is None:
            raise UserError(f"lockout kind {kind!r}: account or address")
        with self.index.transaction() as c:
            lifted = c.execute("DELETE FROM lockouts WHERE kind = ? AND key = ?", (kind, key)).rowcount > 0
            c.execute(f"DELETE FROM login_attempts WHERE {col} = ? AND ok = 0", (key,))
            return lifted


def secret(index: Index, name: str, nbytes: int = 48) -> bytes:
    """The box's secret ``name``, made (random) on first use and kept in the store."""
    with index.transaction() as c:
        c.execute("INSERT OR IGNORE INTO secrets(name, value) VALUES (?, ?)", (name, os.urandom(nbytes)))
        return bytes(c.execute("SELECT value FROM secrets WHERE name = ?", (name,)).fetchone()[0])


class Audit:
    """Who did what, from where, when: logins, lockouts, views of a patient's series, retries, suspends,
    user changes. Append-only for the panel; retention keeps it (it holds no patient data, only UIDs)."""

    ACTIONS = (
        "login",
        "login_failed",
        "logout",
        "lockout",
        "unlock",
        "view_series",
        "retry",
        "suspend",
        "resume",
        "user_add",
        "user_change",
        "user_remove",
        "export_audit",
    )

    def __init__(self, index: Index) -> None:
        self.index = index

    def record(
        self,
        action: str,
        *,
        username: str | None,
        address: str | None,
        target: str | None = None,
        detail: str | None = None,
        now: float | None = None,
    ) -> None:
        if action not in self.ACTIONS:
            raise ValueError(f"unknown audit action {action!r}")
        with self.index.transaction() as c:
            c.execute(
                "INSERT INTO audit(at, username, address, action, target, detail) VALUES (?, ?, ?, ?, ?, ?)",
                (time.time() if now is None else now, username, address, action, target, detail),
            )

    def query(
        self,
        *,
        action: str | None = None,
        username: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> tuple[int, list[dict[str, Any]]]:
        where, args = _audit_where(action, username, since, until)
        total = self.index.conn.execute(f"SELECT count(*) FROM audit{where}", args).fetchone()[0]
        rows = self.index.conn.execute(
            f"SELECT id, at, username, address, action, target, detail FROM audit{where}"
            " ORDER BY at DESC, id DESC LIMIT ? OFFSET ?",
            (*args, limit, offset),
        ).fetchall()
        return int(total), [dict(r) for r in rows]

    def iterate(
        self,
        *,
        action: str | None = None,
        username: str | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> Any:
        """Every matching row, oldest first, streamed (the CSV export of a year's log stays in bounded memory)."""
        where, args = _audit_where(action, username, since, until)
        cur = self.index.conn.execute(
            f"SELECT id, at, username, address, action, target, detail FROM audit{where} ORDER BY at, id", args
        )
        for r in cur:
            yield dict(r)


def _audit_where(
    action: str | None, username: str | None, since: float | None, until: float | None
) -> tuple[str, list[object]]:
    where: list[str] = []
    args: list[object] = []
    for cond, value in (("action = ?", action), ("username = ?", username), ("at >= ?", since), ("at < ?", until)):
        if value not in (None, ""):
            where.append(cond)
            args.append(value)
    return (" WHERE " + " AND ".join(where) if where else ""), args
