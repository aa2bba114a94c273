"""A response cache for paid or slow LVLM calls: SQLite in WAL mode, shared between runs.

The key is the SHA-256 of a canonical JSON of what determines an answer (backend kind, model,
template version, the SHA-256 of each image, prompt text, generation parameters); it never holds
an API key or a server address, so a cache can be shared and moved between machines. Only
answers that passed their checks are stored as answers (:meth:`ResponseCache.get`): critic
answers that are whole and discuss every cluster colour, judge answers that passed validation.
An answer that was paid for but is unusable is stored apart with its text
(:meth:`ResponseCache.unusable`), never read as an answer: its count bounds how often a request is
asked again over all runs. A request whose last attempt got no answer is marked
(:meth:`ResponseCache.unanswered`), without the failure's text (it names the server). Several
threads and processes may use one file at once.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["ResponseCache", "FORBIDDEN_KEY_PARTS", "sha256_hex", "open_response_cache"]

#: parts that must never enter a cache key (secrets, and addresses that do not change answers)
FORBIDDEN_KEY_PARTS = frozenset(
    {"api_key", "apikey", "key", "token", "authorization", "password", "secret", "base_url", "url"}
)

# ``responses`` holds good answers only (the one table older versions read); unusable answers
# and unanswered requests have tables of their own, which older versions never look at.
_SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    answer TEXT NOT NULL,
    meta TEXT NOT NULL,
    created REAL NOT NULL
)
""",
    """
CREATE TABLE IF NOT EXISTS unusable (
    key TEXT NOT NULL,
    answer TEXT NOT NULL,
    meta TEXT NOT NULL,
    created REAL NOT NULL
)
""",
    "CREATE INDEX IF NOT EXISTS unusable_key ON unusable (key)",
    "CREATE TABLE IF NOT EXISTS unanswered (key TEXT PRIMARY KEY, created REAL NOT NULL)",
)


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of ``data`` (how images enter keys and transcripts)."""
    return hashlib.sha256(data).hexdigest()


def _canonical(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        # Raw image bytes are allowed in a key: they enter it as their hash.
        return {"sha256": sha256_hex(bytes(value))}
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cache key part of type {type(value).__name__} is not JSON-able: {value!r}")


class ResponseCache:
    """SQLite-backed map from request key to the raw answer text.

    One connection per thread (SQLite connections must not cross threads); WAL journal and a
    busy timeout let concurrent runs read and write the same file.
    """

    def __init__(self, path: Path, busy_timeout_s: float = 60.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._busy_timeout_s = float(busy_timeout_s)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        conn = self._conn()
        with conn:
            for statement in _SCHEMA:
                conn.execute(statement)

    # -- keys ----------------------------------------------------------------------------------
    @staticmethod
    def key(**parts: Any) -> str:
        """SHA-256 hex of the canonical JSON of ``parts``.

        Pass what determines the answer: ``backend``, ``model``, ``template_version``,
        ``images`` (SHA-256 strings, or bytes which are hashed), ``prompt``, ``params``. Parts
        named like a secret or a server address are refused.
        """
        bad = sorted(k for k in parts if k.lower() in FORBIDDEN_KEY_PARTS)
        if bad:
            raise ValueError(f"cache keys must not contain {', '.join(bad)} (secrets or addresses)")
        blob = json.dumps(
            _canonical(parts), sort_keys=True, separators=(",", ":"), ensure_ascii=False
        )
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    # -- access --------------------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            # check_same_thread=False only so that close() may run from any thread; each thread
            # still uses its own connection.
            conn = sqlite3.connect(
                self.path,
                timeout=self._busy_timeout_s,
                isolation_level=None,
                check_same_thread=False,
            )
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_s * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def get(self, key: str) -> str | None:
        """The stored answer for ``key``, or ``None``."""
        row = self._conn().execute("SELECT answer FROM responses WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def get_meta(self, key: str) -> dict[str, Any] | None:
        """The metadata stored with ``key`` (usage, model, when), or ``None``."""
        row = self._conn().execute("SELECT meta FROM responses WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, answer: str, meta: dict[str, Any] | None = None) -> None:
        """Store ``answer`` under ``key`` (a later put of the same key replaces it).

        Empty answers are refused: a failure is never cached as a success.
        """
        if not isinstance(answer, str) or not answer.strip():
            raise ValueError(f"refusing to cache an empty answer under key {key[:12]}...")
        blob = json.dumps(meta or {}, sort_keys=True, default=str)
        conn = self._conn()
        conn.execute(
            "INSERT OR REPLACE INTO responses (key, answer, meta, created) VALUES (?, ?, ?, ?)",
            (key, answer, blob, time.time()),
        )
        conn.execute("DELETE FROM unanswered WHERE key = ?", (key,))

    def delete(self, key: str) -> None:
        """Forget the good answer under ``key`` (no error when absent)."""
        self._conn().execute("DELETE FROM responses WHERE key = ?", (key,))

    # -- answers that cannot be used, requests that got none -----------------------------------
    def add_unusable(self, key: str, answer: str, meta: dict[str, Any] | None = None) -> int:
        """Store an answer to ``key`` that was had but cannot be used (an empty text too), and
        return how many such answers ``key`` has now. It is never returned by :meth:`get`."""
        blob = json.dumps(meta or {}, sort_keys=True, default=str)
        conn = self._conn()
        conn.execute(
            "INSERT INTO unusable (key, answer, meta, created) VALUES (?, ?, ?, ?)",
            (key, answer, blob, time.time()),
        )
        conn.execute("DELETE FROM unanswered WHERE key = ?", (key,))
        return int(conn.execute("SELECT COUNT(*) FROM unusable WHERE key = ?", (key,)).fetchone()[0])

    def unusable(self, key: str) -> list[tuple[str, dict[str, Any]]]:
        """The unusable answers stored under ``key`` with their metadata, oldest first."""
        rows = self._conn().execute(
            "SELECT answer, meta FROM unusable WHERE key = ? ORDER BY created, rowid", (key,)
        )
        return [(answer, json.loads(meta)) for answer, meta in rows]

    def mark_unanswered(self, key: str) -> None:
        """Note that the last request for ``key`` got no answer (a transport failure)."""
        self._conn().execute(
            "INSERT OR REPLACE INTO unanswered (key, created) VALUES (?, ?)", (key, time.time())
        )

    def unanswered(self, key: str) -> bool:
        """Whether the last request for ``key`` got no answer (cleared by any answer)."""
        row = self._conn().execute("SELECT 1 FROM unanswered WHERE key = ?", (key,)).fetchone()
        return row is not None

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def __len__(self) -> int:
        """Good answers stored."""
        return int(self._conn().execute("SELECT COUNT(*) FROM responses").fetchone()[0])

    def close(self) -> None:
        """Close every connection this object opened (from any thread)."""
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()

    def __enter__(self) -> ResponseCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_response_cache(
    enabled: bool, cache_dir: Path | None, run_cache_dir: Path
) -> ResponseCache | None:
    """The shared ``responses.sqlite`` of a backend: in the plugin's ``cache_dir`` option when
    set, else in the run's cache folder; ``None`` when the plugin's ``cache`` option is off."""
    if not enabled:
        return None
    return ResponseCache(Path(cache_dir or run_cache_dir) / "responses.sqlite")
