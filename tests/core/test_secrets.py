"""The secret registry: every form of a registered value is redacted, however short, and only
the registered values are."""

from __future__ import annotations

import json
import threading
from urllib.parse import quote

import pytest

import lvlmva.secrets as secrets
from lvlmva.secrets import REDACTED, redact, redact_json, register_secret


@pytest.fixture(autouse=True)
def own_registry(monkeypatch):
    """Each test starts with no secrets and leaves the process's registry as it was."""
    monkeypatch.setattr(secrets, "_values", set())
    monkeypatch.setattr(secrets, "_pattern", None)


def test_nothing_registered_leaves_text_alone():
    text = "Illegal header value b'Bearer sk-test-123\\r\\n'"
    assert redact(text) == text
    assert redact("") == ""


def test_a_crlf_key_in_every_form_libraries_print_it():
    raw = "sk-test-123\r\n"
    register_secret(raw)
    header = b"Bearer " + raw.encode()
    message = f"Illegal header value {header!r}"  # as h11 words it
    texts = [
        f"key {raw} end",
        f"key {raw.strip()} end",
        message,
        repr(message),
        json.dumps({"failure": message}),
        json.dumps({"errors": [repr(message)]}),
        f"https://example.test/v1?k={quote(raw, safe='')}",
        f"{raw!r} and {raw.encode()!r}",
    ]
    for text in texts:
        out = redact(text)
        assert "sk-test-123" not in out, out
        assert REDACTED in out
    # the longest form is replaced: no escaped line break is left beside the marker
    assert redact(message) == f"Illegal header value b'Bearer {REDACTED}'"
    assert redact(f"a {raw}b") == f"a {REDACTED}b"
    assert redact(json.dumps({"failure": message})) == json.dumps(
        {"failure": f"Illegal header value b'Bearer {REDACTED}'"}
    )


def test_the_message_of_a_real_http_library_error_is_redacted():
    h11 = pytest.importorskip("h11")
    raw = "sk-live-abcDEF987\n"
    register_secret(raw)
    with pytest.raises(h11.LocalProtocolError) as info:
        h11.Request(
            method="POST",
            target="/v1",
            headers=[("Host", "x"), ("Authorization", b"Bearer " + raw.encode())],
        )
    assert "sk-live-abcDEF987" in str(info.value)  # the library does quote it
    for text in (str(info.value), repr(info.value), json.dumps(str(info.value))):
        assert "sk-live-abcDEF987" not in redact(text) and REDACTED in redact(text)


def test_quotes_and_non_ascii_characters_in_a_secret():
    value = "pa'ss\"wörd-42"
    register_secret(value)
    texts = [
        value,
        repr(value),
        repr(value.encode()),
        repr("x'" + value),
        repr("'" + value + '"'),
        json.dumps(value),
        json.dumps(value, ensure_ascii=False),
        quote(value, safe=""),
    ]
    for text in texts:
        out = redact(text)
        assert "pa" not in out and "rd-42" not in out and REDACTED in out, (text, out)
    # a value with ' but no " quoted inside a text with " in it: the ' is escaped there
    register_secret("it's-key-7")
    for text in (repr('say "it\'s-key-7"'), repr(b'say "it\'s-key-7"')):
        assert "s-key-7" not in redact(text) and REDACTED in redact(text), (text, redact(text))


def test_short_secrets_are_redacted_and_whitespace_is_no_secret():
    register_secret("ab1")
    assert redact("xab1y ab1") == f"x{REDACTED}y {REDACTED}"
    for blank in ("", " ", "\r\n", "\t"):
        register_secret(blank)
    assert redact("a b\r\nc\td") == "a b\r\nc\td"
    with pytest.raises(TypeError):
        register_secret(b"bytes-key")  # type: ignore[arg-type]


def test_redact_is_idempotent_also_for_a_secret_inside_the_marker():
    register_secret("dact")
    register_secret("sk-1")
    once = redact("sk-1 and dact")
    assert once == f"{REDACTED} and {REDACTED}"
    assert redact(once) == once


def test_only_registered_values_are_redacted():
    register_secret("sk-one-111")
    assert redact("sk-one-111 sk-two-222") == f"{REDACTED} sk-two-222"
    register_secret("sk-two-222")
    assert redact("sk-one-111 sk-two-222") == f"{REDACTED} {REDACTED}"


def test_concurrent_registering_and_redacting():
    values = [f"sk-thread-{i:03d}-secret" for i in range(64)]
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def work(part: list[str]) -> None:
        try:
            start.wait()
            for value in part:
                register_secret(value)
                # a value is redacted as soon as its registration has returned
                assert redact(f"<{value}>") == f"<{REDACTED}>"
        except BaseException as exc:  # handed to the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(values[i::8],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert redact(" ".join(values)) == " ".join([REDACTED] * len(values))


def test_redact_json_reaches_every_string_of_a_record():
    register_secret("sk-rec-9876\r\n")
    record = {
        "failure": "Illegal header value b'Bearer sk-rec-9876\\r\\n'",
        "errors": ["attempt 1: sk-rec-9876", ("sk-rec-9876",)],
        "nested": {"sk-rec-9876": {"n": 3, "ok": True, "none": None}},
        "latency_s": 0.5,
    }
    out = redact_json(record)
    assert "sk-rec-9876" not in json.dumps(out)
    assert out["failure"] == f"Illegal header value b'Bearer {REDACTED}'"
    assert out["errors"] == [f"attempt 1: {REDACTED}", (REDACTED,)]
    assert out["nested"] == {REDACTED: {"n": 3, "ok": True, "none": None}}
    assert out["latency_s"] == 0.5
