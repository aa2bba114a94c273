"""Response cache: keys, storage, refusal of failures, threads and processes sharing a file."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from lvlmva.plugins.lvlm import cache as cache_module
from lvlmva.plugins.lvlm.cache import ResponseCache, sha256_hex


def test_key_is_order_independent_and_sensitive_to_every_part():
    base = dict(
        backend="openai",
        model="m",
        template_version="v1",
        images=["a", "b"],
        prompt="p",
        params={"t": 0},
    )
    k = ResponseCache.key(**base)
    assert k == ResponseCache.key(**dict(reversed(list(base.items()))))
    assert len(k) == 64 and int(k, 16) >= 0
    for name, other in [
        ("backend", "transformers"),
        ("model", "m2"),
        ("template_version", "v2"),
        ("images", ["b", "a"]),
        ("prompt", "p2"),
        ("params", {"t": 1}),
    ]:
        assert ResponseCache.key(**{**base, name: other}) != k, name


def test_image_bytes_enter_as_their_hash():
    assert ResponseCache.key(images=[b"png"]) == ResponseCache.key(
        images=[{"sha256": sha256_hex(b"png")}]
    )


@pytest.mark.parametrize("secret", ["api_key", "base_url", "Authorization"])
def test_secrets_and_addresses_are_refused(secret):
    with pytest.raises(ValueError, match=secret):
        ResponseCache.key(model="m", **{secret: "x"})


def test_put_get_meta_and_replace(tmp_path: Path):
    with ResponseCache(tmp_path / "c" / "r.sqlite") as cache:
        assert cache.get("k") is None and "k" not in cache
        cache.put("k", "answer one", {"prompt_tokens": 3})
        assert cache.get("k") == "answer one" and cache.get_meta("k") == {"prompt_tokens": 3}
        cache.put("k", "answer two")
        assert cache.get("k") == "answer two" and len(cache) == 1
        cache.delete("k")
        assert cache.get("k") is None


def test_empty_answers_are_never_cached(tmp_path: Path):
    with ResponseCache(tmp_path / "r.sqlite") as cache:
        for bad in ["", "   "]:
            with pytest.raises(ValueError, match="empty answer"):
                cache.put("k", bad)
        assert len(cache) == 0


def test_unusable_answers_are_counted_apart_and_never_read_as_answers(tmp_path: Path):
    with ResponseCache(tmp_path / "r.sqlite") as cache:
        assert cache.unusable("k") == [] and not cache.unanswered("k")
        cache.mark_unanswered("k")
        assert cache.unanswered("k")
        assert cache.add_unusable("k", "", {"finish_reason": "stop"}) == 1  # an empty answer too
        assert not cache.unanswered("k")  # an answer came, if an unusable one
        assert cache.add_unusable("k", "Sure! Here is my analysis", {"finish_reason": "length"}) == 2
        assert cache.add_unusable("other", "x") == 1
        assert cache.get("k") is None and "k" not in cache and len(cache) == 0
        assert cache.unusable("k") == [
            ("", {"finish_reason": "stop"}),
            ("Sure! Here is my analysis", {"finish_reason": "length"}),
        ]
        cache.mark_unanswered("k")
        cache.put("k", "a good answer")
        assert cache.get("k") == "a good answer" and not cache.unanswered("k")
    with ResponseCache(tmp_path / "r.sqlite") as again:  # kept on disk
        assert len(again.unusable("k")) == 2


def test_a_cache_written_before_the_unusable_table_existed_opens_and_reads(tmp_path: Path):
    import sqlite3

    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:  # the one table older versions wrote
        db.execute("CREATE TABLE responses (key TEXT PRIMARY KEY, answer TEXT NOT NULL, meta TEXT NOT NULL, created REAL NOT NULL)")
        db.execute("INSERT INTO responses VALUES ('k', 'old answer', '{}', 0)")
    db.close()
    with ResponseCache(path) as cache:
        assert cache.get("k") == "old answer" and cache.unusable("k") == []
        assert cache.add_unusable("j", "bad") == 1


def test_wal_mode_and_persistence(tmp_path: Path):
    path = tmp_path / "r.sqlite"
    with ResponseCache(path) as cache:
        cache.put("k", "v")
        mode = cache._conn().execute("PRAGMA journal_mode").fetchone()[0]
    assert mode.lower() == "wal"
    with ResponseCache(path) as again:
        assert again.get("k") == "v"


def test_threads_share_one_cache(tmp_path: Path):
    cache = ResponseCache(tmp_path / "r.sqlite")
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(50):
                cache.put(f"{t}-{i}", f"answer {t} {i}")
                assert cache.get(f"{t}-{i}") == f"answer {t} {i}"
        except BaseException as exc:  # collected and re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert len(cache) == 200
    cache.close()


def test_processes_share_one_cache(tmp_path: Path):
    path = tmp_path / "r.sqlite"
    # The module is loaded from its file so that the writers start fast (no torch import).
    script = (
        "import sys, importlib.util; from pathlib import Path\n"
        "spec = importlib.util.spec_from_file_location('cache', sys.argv[3])\n"
        "mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)\n"
        "c = mod.ResponseCache(Path(sys.argv[1])); p = sys.argv[2]\n"
        "for i in range(100): c.put(f'{p}-{i}', f'v{i}')\n"
    )
    source = cache_module.__file__
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(path), str(p), source])
        for p in range(3)
    ]
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0]
    with ResponseCache(path) as cache:
        assert len(cache) == 300 and cache.get("2-99") == "v99"
