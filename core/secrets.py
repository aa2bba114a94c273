"""Secrets a run must never write: a process-wide registry of secret values and :func:`redact`.

A plugin that reads a credential (an API key from the environment, a token) registers the value
as soon as it has read it, before anything can fail with the value in a message::

    import os
    from lvlmva.secrets import register_secret

    raw = os.environ.get(name, "")
    register_secret(raw)          # as read: "sk-...\\r\\n" from a CRLF .env file
    key = raw.strip()
    register_secret(key)          # as sent

Every text that lvlmva stores or prints passes through :func:`redact`: failure texts in
``results.json``, ``report.md`` and ``transcripts.jsonl``, traceback files, the command line's
messages. A plugin that writes text of its own (its failure texts, the message of an exception it
raises) passes it through ``redact`` too, and a record it writes as JSON (a transcript line)
through :func:`redact_json`.

:func:`redact` replaces each registered value with ``[redacted]`` in every form in which
libraries print it: as given and stripped of surrounding whitespace; each of these as Python's
``repr`` writes a str or a bytes value (``sk-1\\r\\n``, the way HTTP libraries quote an illegal
header value in their exceptions), as ``json.dumps`` writes it (ASCII or not), percent-encoded;
and each of those escaped once more (a repr written into JSON). The longest form that matches
is replaced, so no tail of a value (an escaped line break) is left beside the marker.

Every value is registered however short: a short key is as secret as a long one, and a text
that happens to contain its characters loses them. Only a value that is empty or whitespace
after stripping is ignored: it is no secret, and redacting it would blank out every space or
line break. Registering and redacting are thread-safe; a registered value stays registered for
the life of the process. ``redact`` is idempotent, and the marker never says which secret it
replaced.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

__all__ = ["REDACTED", "redact", "redact_json", "register_secret"]

#: what every form of a registered secret is replaced with
REDACTED = "[redacted]"

_lock = threading.Lock()
_values: set[str] = set()
#: the compiled alternation of every form, or None while nothing is registered; replaced whole
#: (never changed in place) so that redact() reads it without the lock
_pattern: re.Pattern[str] | None = None


def _repr_str(value: str) -> str:
    return repr(value)[1:-1]


def _repr_str_single_quoted(value: str) -> str:
    # repr quotes with " when the value holds ' but no "; inside a longer text quoted with '
    # (a header line) the ' is escaped instead. Both quotes appended force the ' quoting.
    return repr(value + "'\"")[1:-4]


def _repr_bytes(value: str) -> str:
    return repr(value.encode("utf-8", "surrogatepass"))[2:-1]


def _repr_bytes_single_quoted(value: str) -> str:
    return repr(value.encode("utf-8", "surrogatepass") + b"'\"")[2:-4]


def _json_ascii(value: str) -> str:
    return json.dumps(value)[1:-1]


def _json_unicode(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)[1:-1]


def _percent(value: str) -> str:
    return quote(value, safe="", errors="surrogatepass")


_ESCAPES: tuple[Callable[[str], str], ...] = (
    _repr_str,
    _repr_str_single_quoted,
    _repr_bytes,
    _repr_bytes_single_quoted,
    _json_ascii,
    _json_unicode,
    _percent,
)


def _forms(value: str) -> set[str]:
    """Every form of ``value`` that :func:`redact` replaces (two levels of escaping)."""
    base = {value, value.strip()}
    once = {escape(form) for form in base for escape in _ESCAPES}
    twice = {escape(form) for form in once for escape in _ESCAPES}
    return {form for form in base | once | twice if form.strip()}


def _compile(values: set[str]) -> re.Pattern[str] | None:
    forms = set().union(*(_forms(v) for v in values)) if values else set()
    if not forms:
        return None
    # The marker first: a secret that is part of the marker leaves a redacted text as it is.
    # Then the longest forms first: at one position the regex takes the first that matches.
    ordered = [REDACTED, *sorted(forms, key=lambda f: (-len(f), f))]
    return re.compile("|".join(map(re.escape, ordered)))


def register_secret(value: str) -> None:
    """Remember ``value`` as a secret: from now on :func:`redact` replaces it, in every form,
    in any text of this process. A value that is empty or whitespace only is ignored."""
    global _pattern
    if not isinstance(value, str):
        raise TypeError(f"register_secret takes a str, got {type(value).__name__}")
    if not value.strip():
        return
    with _lock:
        if value in _values:
            return
        _values.add(value)
        _pattern = _compile(_values)


def redact(text: str) -> str:
    """``text`` with every form of every registered secret replaced by ``[redacted]``."""
    pattern = _pattern
    if pattern is None or not text:
        return text
    return pattern.sub(REDACTED, text)


def redact_json(value: Any) -> Any:
    """``value`` (a JSON-able record: dicts, lists, tuples, strings, numbers) with :func:`redact`
    applied to every string in it, keys included; redact before serialising, so that JSON's
    escapes are written over the marker, not over a half-replaced secret."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact_json(k): redact_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_json(v) for v in value)
    return value
