"""The review page over a real small run stopped at the judge (DecoyMNIST, scripted critic with
three answers per sample): cards in uncertainty order, the write protections (token, Host,
read-only, JSON), toggles and resets saved in review/overrides.json, the mask they give, and
run directories that cannot be reviewed."""

from __future__ import annotations

import http.client
import io
import json
import re
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest

from lvlmva.cli import EXIT_BAD_INPUT, main
from lvlmva.overrides import read_overrides
from lvlmva.pipeline import open_run
from lvlmva.review.server import MAX_BODY_BYTES, ReviewError, ReviewRun, create_app, make_server

pytest.importorskip("mlxtend")
pytest.importorskip("flask")

@pytest.fixture(scope="module")
def judged_run(tmp_path_factory: pytest.TempPathFactory, module_torch_state, compose_until_judge) -> Path:
    """A run directory whose stages up to the judge are finished (built once per module)."""
    run, _, _ = compose_until_judge(tmp_path_factory.mktemp("judged"), "--quiet")
    return run


@pytest.fixture
def run_dir(judged_run: Path, tmp_path: Path) -> Path:
    """A copy of the judged run for one test to write overrides into."""
    return Path(shutil.copytree(judged_run, tmp_path / "run"))


def _token(client) -> str:
    html = client.get("/").get_data(as_text=True)
    (token,) = re.findall(r'<meta name="review-token" content="([^"]+)">', html)
    return token


def _post(client, path: str, body: dict, token: str | None, **kw):
    headers = {} if token is None else {"X-Review-Token": token}
    return client.post(path, json=body, headers=headers, **kw)


def _request(port: int, method: str, path: str, body: dict | None = None, host: str | None = None, token: str = ""):
    """``method path`` to the server on ``port`` over a real socket: the status and the body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Content-Type": "application/json", "X-Review-Token": token}
    if host is not None:
        headers["Host"] = host
    conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data


def _png(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)))


def test_the_page_shows_every_sample_most_uncertain_first(run_dir: Path):
    run = open_run(run_dir)
    chosen = run.load("select").indices.tolist()
    judged = {v.sample_id: v for v in run.load("judge")}
    rendered = run.load("render")
    client = create_app(run_dir).test_client()
    response = client.get("/")
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    cards = re.findall(r'data-sample="(\d+)" data-row="(\d+)" data-uncertainty="([^"]+)"', html)
    ids = [int(s) for s, _, _ in cards]
    assert sorted(ids) == sorted(chosen)
    expected = sorted(chosen, key=lambda sid: (-judged[sid].uncertainty, chosen.index(sid)))
    assert ids == expected
    assert [float(u) for _, _, u in cards] == [judged[sid].uncertainty for sid in ids]
    assert len({float(u) for _, _, u in cards}) > 1  # the critic disagreed with itself somewhere
    assert "(3 answers)" in html and html.count('class="toggle"') == sum(len(r.colors) for r in rendered)
    assert response.headers["Content-Security-Policy"].startswith("default-src 'self'")

    states = client.get("/api/samples").get_json()
    assert [s["sample"] for s in states] == expected
    first = states[0]
    assert first["answers"] == 3 and len(first["critiques"]) == 3
    assert all(len(c["votes"]) == 3 for c in first["colours"])

    # the three images the critic saw, as rendered
    by_id = {r.sample_id: r for r in rendered}
    for kind, data in zip(("original", "clusters", "overlay"), by_id[ids[0]].images, strict=True):
        image = client.get(f"/image/{ids[0]}/{kind}.png")
        assert image.status_code == 200 and image.mimetype == "image/png" and image.data == data
    assert client.get(f"/image/{ids[0]}/other.png").status_code == 404
    assert client.get("/image/999999/original.png").status_code == 404
    assert client.get("/mask/999999.png").status_code == 404


def test_changes_need_the_pages_token(run_dir: Path):
    client = create_app(run_dir).test_client()
    token = _token(client)
    sid = ReviewRun(run_dir).ordered()[0]
    body = {"sample": sid, "colour": "red"}
    missing = _post(client, "/api/toggle", body, None)
    assert missing.status_code == 403 and "token" in missing.get_json()["error"]
    assert _post(client, "/api/toggle", body, token[:-1] + "x").status_code == 403
    assert _post(client, "/api/reset", {"sample": sid}, "").status_code == 403
    assert not (run_dir / "review").exists()
    # JSON only: a form post (what another site's page can send) is refused even with the token
    form = client.post("/api/toggle", data=body, headers={"X-Review-Token": token})
    assert form.status_code == 415
    assert _post(client, "/api/toggle", body, token).status_code == 200


def test_requests_for_another_host_are_refused(run_dir: Path):
    client = create_app(run_dir, allowed_hosts={"127.0.0.1:8765"}).test_client()
    # reads too: a rebinding page must not see the run's images and answers
    for path in ("/", "/api/samples"):
        read = client.get(path, headers={"Host": "evil.example:8765"})
        assert read.status_code == 403 and "evil.example" in read.get_json()["error"]
    html = client.get("/", headers={"Host": "127.0.0.1:8765"}).get_data(as_text=True)
    (token,) = re.findall(r'<meta name="review-token" content="([^"]+)">', html)
    sid = ReviewRun(run_dir).ordered()[0]
    body = {"sample": sid, "colour": "red"}
    refused = client.post("/api/toggle", json=body, headers={"X-Review-Token": token, "Host": "evil.example:8765"})
    assert refused.status_code == 403 and "evil.example" in refused.get_json()["error"]
    assert not (run_dir / "review").exists()
    ok = client.post("/api/toggle", json=body, headers={"X-Review-Token": token, "Host": "127.0.0.1:8765"})
    assert ok.status_code == 200


def test_a_read_only_page_changes_nothing(run_dir: Path):
    client = create_app(run_dir, read_only=True).test_client()
    html = client.get("/").get_data(as_text=True)
    assert "Read-only" in html and 'class="toggle"' not in html
    token = _token(client)
    sid = ReviewRun(run_dir).ordered()[0]
    for path, body in (("/api/toggle", {"sample": sid, "colour": "red"}), ("/api/reset", {"sample": sid})):
        response = _post(client, path, body, token)
        assert response.status_code == 403 and "read-only" in response.get_json()["error"]
    assert not (run_dir / "review").exists()


def test_toggles_are_saved_at_once_and_a_toggle_back_removes_the_entry(run_dir: Path):
    client = create_app(run_dir, reviewer="default-name").test_client()
    token = _token(client)
    review = ReviewRun(run_dir)
    sid = review.ordered()[0]
    sample = review.samples[sid]
    first, second = sample.colors[0], sample.colors[1]
    was = "yes" if sample.judged.relevant[0] else "no"
    flipped = "no" if was == "yes" else "yes"

    state = _post(client, "/api/toggle", {"sample": sid, "colour": first, "reviewer": "ana", "comment": "on the digit"}, token).get_json()
    assert state["overridden"] and state["colours"][0]["verdict"] == flipped and state["colours"][0]["source"] == "person"
    (o,) = read_overrides(run_dir / "review" / "overrides.json")
    assert (o.sample, o.colour, o.verdict, o.reviewer, o.comment) == (sid, first, flipped, "ana", "on the digit")
    assert o.when  # a timestamp

    # the reviewer named on the command line when the page sends none
    _post(client, "/api/toggle", {"sample": sid, "colour": second}, token)
    saved = {x.colour: x for x in read_overrides(run_dir / "review" / "overrides.json")}
    assert set(saved) == {first, second} and saved[second].reviewer == "default-name"

    # a new ReviewRun (a restarted server) shows what the file holds
    again = ReviewRun(run_dir).state(sid)
    assert [c["source"] for c in again["colours"]][:2] == ["person", "person"]

    # back to the judge's verdict: the entry goes
    back = _post(client, "/api/toggle", {"sample": sid, "colour": first}, token).get_json()
    assert back["colours"][0]["verdict"] == was and back["colours"][0]["source"] == "judge"
    assert [x.colour for x in read_overrides(run_dir / "review" / "overrides.json")] == [second]

    reset = _post(client, "/api/reset", {"sample": sid}, token).get_json()
    assert not reset["overridden"]
    assert read_overrides(run_dir / "review" / "overrides.json") == []
    assert json.loads((run_dir / "review" / "overrides.json").read_text())["overrides"] == []


def test_unknown_samples_and_colours_are_not_found(run_dir: Path):
    client = create_app(run_dir).test_client()
    token = _token(client)
    sid = ReviewRun(run_dir).ordered()[0]
    assert _post(client, "/api/toggle", {"sample": 999999, "colour": "red"}, token).status_code == 404
    no_colour = _post(client, "/api/toggle", {"sample": sid, "colour": "chartreuse"}, token)
    assert no_colour.status_code == 404 and "chartreuse" in no_colour.get_json()["error"]
    assert _post(client, "/api/toggle", {"sample": str(sid), "colour": "red"}, token).status_code == 404
    assert _post(client, "/api/reset", {"sample": 999999}, token).status_code == 404
    assert client.post("/api/toggle", data="[1]", content_type="application/json", headers={"X-Review-Token": token}).status_code == 400
    assert not (run_dir / "review").exists()


def test_the_mask_follows_the_toggles(run_dir: Path):
    client = create_app(run_dir).test_client()
    token = _token(client)
    review = ReviewRun(run_dir)
    sid = review.ordered()[0]
    sample = review.samples[sid]
    labels = review.segmentation.labels[sample.row].numpy()

    def expected(relevant) -> np.ndarray:
        out = np.zeros(labels.shape, dtype=np.uint8)
        for j, r in enumerate(relevant):
            out[labels == j] = 0 if r else 255
        return out

    before = client.get(f"/mask/{sid}.png")
    assert before.headers["Cache-Control"] == "no-store"
    assert np.array_equal(_png(before.data), expected(sample.judged.relevant))
    _post(client, "/api/toggle", {"sample": sid, "colour": sample.colors[0]}, token)
    after = _png(client.get(f"/mask/{sid}.png").data)
    flipped = (not sample.judged.relevant[0], *sample.judged.relevant[1:])
    assert np.array_equal(after, expected(flipped))
    assert (after != _png(before.data)).any()


def test_a_run_without_a_finished_judge_cannot_be_reviewed(run_dir: Path, tmp_path: Path, capsys):
    shutil.rmtree(run_dir / "judge")
    with pytest.raises(ReviewError, match=r"no finished judge stage.*--until judge"):
        ReviewRun(run_dir)
    assert main(["review", str(run_dir), "--port", "0", "--no-browser"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "lvlmva: error:" in err and "no finished judge stage" in err

    (tmp_path / "empty").mkdir()
    with pytest.raises(ReviewError, match="not an lvlmva run directory"):
        ReviewRun(tmp_path / "empty")


def test_a_server_for_a_run_that_cannot_be_reviewed_leaves_the_port_free(run_dir: Path):
    shutil.rmtree(run_dir / "judge")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ReviewError, match="no finished judge stage") as info:
        make_server(run_dir, port=port)
    # the failed call's frames are still alive (info holds them): its socket must be closed
    assert info.value is not None
    with socket.socket() as again:
        again.bind(("127.0.0.1", port))


def test_a_stale_overrides_file_is_named_before_the_page_opens(run_dir: Path):
    path = run_dir / "review" / "overrides.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"format": "lvlmva-overrides", "version": 1, "overrides": [
        {"sample": 999999, "colour": "red", "verdict": "no", "when": "2026-12-02T04:10:00+00:00"}]}))  # fmt: skip
    with pytest.raises(ReviewError, match=r"overrides.json names what this run does not have.*sample 999999"):
        ReviewRun(run_dir)


def test_the_server_answers_on_a_free_port_and_only_for_its_own_host(run_dir: Path, serving):
    with serving(make_server(run_dir, port=0)) as server:
        assert server.port > 0

        def request(method: str, path: str, body: dict | None = None, host: str | None = None, token: str = ""):
            return _request(server.port, method, path, body, host, token)

        status, html = request("GET", "/")
        assert status == 200
        (token,) = re.findall(rb'<meta name="review-token" content="([^"]+)">', html)
        sid = int(re.findall(rb'data-sample="(\d+)"', html)[0])
        body = {"sample": sid, "colour": "red"}
        # a page served from another name (DNS rebinding) that somehow has the token
        status, _ = request("POST", "/api/toggle", body, host=f"rebound.example:{server.port}", token=token.decode())
        assert status == 403
        assert not (run_dir / "review" / "overrides.json").exists()
        status, _ = request("POST", "/api/toggle", body, host=f"localhost:{server.port}", token=token.decode())
        assert status == 200
        assert len(read_overrides(run_dir / "review" / "overrides.json")) == 1


def test_a_server_bound_beyond_loopback_serves_any_host_name_with_the_token(run_dir: Path, serving):
    # a colleague reaches the page by this machine's name or address: only the token guards
    with serving(make_server(run_dir, host="0.0.0.0", port=0)) as server:

        def request(method: str, path: str, body: dict | None = None, token: str = ""):
            return _request(server.port, method, path, body, host=f"labhost.example:{server.port}", token=token)

        status, html = request("GET", "/")
        assert status == 200
        (token,) = re.findall(rb'<meta name="review-token" content="([^"]+)">', html)
        sid = int(re.findall(rb'data-sample="(\d+)"', html)[0])
        assert request("POST", "/api/toggle", {"sample": sid, "colour": "red"})[0] == 403  # no token
        assert request("POST", "/api/toggle", {"sample": sid, "colour": "red"}, token=token.decode())[0] == 200


def test_a_second_review_server_on_the_same_run_is_refused(run_dir: Path):
    # two pages writing the same overrides.json would overwrite each other's work
    first = make_server(run_dir, port=0)
    try:
        with pytest.raises(ReviewError, match="being reviewed by another lvlmva review"):
            make_server(run_dir, port=0)
        make_server(run_dir, port=0, read_only=True).server_close()  # showing only is fine
    finally:
        first.server_close()
    make_server(run_dir, port=0).server_close()  # released with the first server


def test_overrides_made_on_other_clusters_are_refused(run_dir: Path):
    run = ReviewRun(run_dir)
    sid = run.ordered()[0]
    colour = run.samples[sid].colors[0]
    run.toggle(sid, colour)
    (entry,) = read_overrides(run_dir / "review" / "overrides.json")
    assert entry.clusters == run.clusters[sid]
    # the same colour name over another region (a re-segmentation): not applied silently
    doc = json.loads((run_dir / "review" / "overrides.json").read_text())
    doc["overrides"][0]["clusters"] = "0" * 16
    (run_dir / "review" / "overrides.json").write_text(json.dumps(doc))
    with pytest.raises(ReviewError, match=rf"sample {sid}: its clusters changed since the review"):
        ReviewRun(run_dir)


def test_a_boolean_sample_is_not_taken_for_an_index(run_dir: Path):
    client = create_app(run_dir).test_client()
    token = _token(client)
    assert _post(client, "/api/toggle", {"sample": False, "colour": "red"}, token).status_code == 404
    assert not (run_dir / "review" / "overrides.json").exists()


def test_an_overrides_file_edited_elsewhere_is_not_written_over(run_dir: Path):
    client = create_app(run_dir).test_client()
    token = _token(client)
    sid = ReviewRun(run_dir).ordered()[0]
    assert _post(client, "/api/toggle", {"sample": sid, "colour": "red"}, token).status_code == 200
    path = run_dir / "review" / "overrides.json"
    edited = path.read_text().replace('"comment": ""', '"comment": "by hand"')
    path.write_text(edited)  # a person edits the file while the page is open
    refused = _post(client, "/api/toggle", {"sample": sid, "colour": "blue"}, token)
    assert refused.status_code == 409 and "changed outside this page" in refused.get_json()["error"]
    assert path.read_text() == edited


def _toggled_once(run_dir: Path):
    """A test client, its token, the first sample and a colour not yet toggled, after one toggle
    saved review/overrides.json (so that an unchanged file can be compared byte for byte)."""
    client = create_app(run_dir).test_client()
    token = _token(client)
    review = ReviewRun(run_dir)
    sid = review.ordered()[0]
    first, second = review.samples[sid].colors[:2]
    assert _post(client, "/api/toggle", {"sample": sid, "colour": first}, token).status_code == 200
    return client, token, sid, second


def _toggle_of_size(sid: int, colour: str, size: int) -> bytes:
    """A well-formed toggle of exactly ``size`` bytes (its comment padded): a body cut off
    anywhere after ``size`` bytes would still be this toggle."""
    bare = len(json.dumps({"sample": sid, "colour": colour, "comment": ""}))
    body = json.dumps({"sample": sid, "colour": colour, "comment": "x" * (size - bare)}).encode()
    assert len(body) == size
    return body


def _raw_toggle(run_dir: Path):
    """After one toggle: a function that posts raw bytes to the toggle endpoint with the
    page's token, overrides.json's path, and the sample and colour toggled."""
    client, token, sid, colour = _toggled_once(run_dir)
    headers = {"X-Review-Token": token}

    def post(data: bytes):
        return client.post("/api/toggle", data=data, content_type="application/json", headers=headers)

    return post, run_dir / "review" / "overrides.json", sid, colour


def test_a_body_over_the_size_limit_is_refused(run_dir: Path):
    post, path, sid, colour = _raw_toggle(run_dir)
    saved = path.read_bytes()

    for size in (8 << 20, MAX_BODY_BYTES + 1):
        response = post(_toggle_of_size(sid, colour, size))
        assert response.status_code == 413 and "larger than" in response.get_json()["error"]
        assert path.read_bytes() == saved
    assert post(_toggle_of_size(sid, colour, MAX_BODY_BYTES)).status_code == 200  # the limit itself
    assert path.read_bytes() != saved


def test_a_chunked_body_over_the_size_limit_is_refused_by_the_real_server(run_dir: Path, serving):
    # no Content-Length to check beforehand: the body is read up to the limit and refused there
    path = run_dir / "review" / "overrides.json"
    with serving(make_server(run_dir, port=0)) as server:
        status, html = _request(server.port, "GET", "/")
        (token,) = re.findall(rb'<meta name="review-token" content="([^"]+)">', html)
        sid = int(re.findall(rb'data-sample="(\d+)"', html)[0])

        def chunked(body: bytes) -> tuple[int, bytes]:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            chunks = iter([body[i : i + 65536] for i in range(0, len(body), 65536)])
            headers = {"Content-Type": "application/json", "X-Review-Token": token.decode()}
            conn.request("POST", "/api/toggle", body=chunks, headers=headers, encode_chunked=True)
            response = conn.getresponse()
            data = response.read()
            conn.close()
            return response.status, data

        # one byte over (a trailing space): what the first MAX_BODY_BYTES bytes hold is a
        # valid toggle, so a body cut off at the limit would be applied
        status, data = chunked(_toggle_of_size(sid, "red", MAX_BODY_BYTES) + b" ")
        assert status == 413 and "larger than" in json.loads(data)["error"], data
        assert not path.exists()
        status, data = chunked(_toggle_of_size(sid, "red", MAX_BODY_BYTES))
        assert status == 200, data
        assert len(read_overrides(path)) == 1


def test_a_deeply_nested_or_malformed_body_is_refused_without_writing(run_dir: Path):
    post, path, sid, colour = _raw_toggle(run_dir)
    saved = path.read_bytes()

    head = json.dumps({"sample": sid, "colour": colour})[:-1]
    deep = post(f'{head}, "comment": {"[" * 100_000}{"]" * 100_000}}}'.encode())
    assert deep.status_code == 400 and "deeper than" in deep.get_json()["error"]
    # a bracket inside a string is text, not nesting
    fine = post(f'{head}, "comment": "{"[" * 100}"}}'.encode())
    assert fine.status_code == 200 and path.read_bytes() != saved
    saved = path.read_bytes()
    for body in (f"{head},".encode(), b'{"sample": 1', "{}".encode("utf-16"), b"\xff\xfe{}"):
        response = post(body)
        assert response.status_code == 400 and response.get_json()["error"]
    assert path.read_bytes() == saved


# -- a run with several segmenters and critics: one page per branch ---------------------------------

#: the toy pipeline with two segmenters x two critic/judge pairs: four branches a.x, a.y, b.x,
#: b.y; the strict judge (of critic y) fails the even samples
AFTER_THE_BRANCHES = """

[aligner]
plugin = "toy"

[evaluators.toy]
plugin = "toy"

[report]
enabled = false
"""

KEYS = ["a.x", "a.y", "b.x", "b.y"]


@pytest.fixture(scope="module")
def toy_registry():
    from lvlmva.registry import PluginRegistry

    from . import pipeline_toys

    registry = PluginRegistry()
    pipeline_toys.lvlmva_register(registry=registry)
    return registry


def _compose_toys(settings: Path, run_dir: Path, registry) -> dict[str, str]:
    """The toy pipeline of ``settings`` run into ``run_dir``: stage name -> computed | reused."""
    from lvlmva.pipeline import Pipeline
    from lvlmva.settings import load_settings

    pipe = Pipeline(load_settings(settings, environ={}, registry=registry), run_dir, registry=registry, echo=lambda _m: None)
    pipe.run()
    return {name: o.status for name, o in pipe.outcomes.items()}


@pytest.fixture(scope="module")
def branches_run(tmp_path_factory: pytest.TempPathFactory, module_torch_state, toy_registry) -> Path:
    """A finished toy run with four branches (built once per module)."""
    root = tmp_path_factory.mktemp("branches")
    settings = root / "branches.toml"
    from . import pipeline_toys

    settings.write_text(pipeline_toys.toy_branches((root / "cache").as_posix(), list(range(0, 200, 2)), n=8) + AFTER_THE_BRANCHES)
    _compose_toys(settings, root / "run", toy_registry)
    return root / "run"


@pytest.fixture
def branches_dir(branches_run: Path, tmp_path: Path) -> Path:
    """A copy of the branches run for one test, its settings file beside it."""
    (tmp_path / "branches").mkdir()
    shutil.copy(branches_run.parent / "branches.toml", tmp_path / "branches" / "branches.toml")
    return Path(shutil.copytree(branches_run, tmp_path / "branches" / "run"))


def _branch_token(client, branch: str) -> str:
    html = client.get(f"/?branch={branch}").get_data(as_text=True)
    (token,) = re.findall(r'<meta name="review-token" content="([^"]+)">', html)
    return token


def test_the_branches_of_a_run_are_listed_with_their_segmenter_and_critic(branches_dir: Path):
    from lvlmva.review.server import run_branches

    branches = run_branches(branches_dir)
    assert [b.key for b in branches] == KEYS
    by_key = {b.key: b for b in branches}
    assert by_key["b.y"].label == "b segmenter x toy critic (b.y)"
    assert dict(by_key["b.y"].stages) == {"segment": "segment.b", "render": "render.b", "critic": "critic.b.y", "judge": "judge.b.y"}
    assert by_key["b.y"].overrides == Path("review/b.y/overrides.json")

    client = create_app(branches_dir).test_client()
    listing = client.get("/api/branches").get_json()
    assert listing["opened"] == "a.x"
    assert [(b["key"], b["label"], b["judged"], b["overrides"]) for b in listing["branches"]] == [
        (b.key, b.label, True, f"review/{b.key}/overrides.json") for b in branches
    ]
    # the page's selector: every branch, the one shown selected
    html = client.get("/?branch=b.x").get_data(as_text=True)
    options = re.findall(r'<option value="([^"]+)"( selected)?>([^<]+)</option>', html)
    assert [(key, text) for key, _, text in options] == [(b.key, b.label) for b in branches]
    assert [key for key, selected, _ in options if selected] == ["b.x"]
    assert 'data-branch="b.x"' in html and "review/b.x/overrides.json" in html
    assert "/image/" in html and all(src.endswith("?branch=b.x") for src in re.findall(r'<img[^>]* src="([^"]+)"', html))


def test_each_branch_shows_its_own_verdicts_and_images(branches_dir: Path):
    run = open_run(branches_dir)
    client = create_app(branches_dir).test_client()
    for key in KEYS:
        judged = {v.sample_id: v for v in run.load(f"judge.{key}")}
        states = client.get(f"/api/samples?branch={key}").get_json()
        assert sorted(s["sample"] for s in states) == sorted(judged)
        for s in states:
            v = judged[s["sample"]]
            assert s["judge_failure"] == v.failure
            assert [c["judge"] for c in s["colours"]] == [None if v.relevant is None else ("yes" if r else "no") for r in v.relevant or v.colors]
    # the strict judge of critic y failed the even samples; x's did not
    failed = {key: {s["sample"] for s in client.get(f"/api/samples?branch={key}").get_json() if s["failure"]} for key in KEYS}
    assert failed["a.x"] == failed["b.x"] == set()
    assert failed["a.y"] == failed["b.y"] == {sid for sid in run.load("select").indices.tolist() if sid % 2 == 0} != set()
    # the images the critic of the branch saw: its segmenter's rendering
    sid = run.load("select").indices.tolist()[0]
    rendered = {r.sample_id: r for r in run.load("render.b")}
    image = client.get(f"/image/{sid}/clusters.png?branch=b.y")
    assert image.status_code == 200 and image.data == rendered[sid].images[1]
    assert client.get(f"/mask/{sid}.png?branch=b.y").status_code == 200
    # a read of a branch the run does not have names the branches
    unknown = client.get("/api/samples?branch=c.z")
    assert unknown.status_code == 404 and "no branch 'c.z'" in unknown.get_json()["error"] and "b.y (b segmenter x toy critic)" in unknown.get_json()["error"]
    assert client.get(f"/image/{sid}/clusters.png?branch=c.z").status_code == 404
    page = client.get("/?branch=c.z")
    assert page.status_code == 404 and "This run has no branch &#39;c.z&#39;" in page.get_data(as_text=True)


def test_a_toggle_on_one_branch_writes_only_its_file_and_compose_recomputes_only_its_stages(
    branches_dir: Path, toy_registry, torch_global_state
):
    client = create_app(branches_dir, branch="b.x").test_client()
    token = _branch_token(client, "a.y")
    review = ReviewRun(branches_dir, "a.y")
    sid = next(s for s in review.ordered() if review.samples[s].judged.ok)
    colour = review.samples[sid].colors[0]
    response = _post(client, "/api/toggle", {"branch": "a.y", "sample": sid, "colour": colour}, token)
    assert response.status_code == 200 and response.get_json()["overridden"]
    files = sorted(p.relative_to(branches_dir).as_posix() for p in (branches_dir / "review").rglob("*.json"))
    assert files == ["review/a.y/overrides.json"]
    (entry,) = read_overrides(branches_dir / "review" / "a.y" / "overrides.json")
    assert (entry.sample, entry.colour) == (sid, colour) and entry.clusters == review.clusters[sid]
    # the other branches show the judge's verdicts still
    for key in ("a.x", "b.x", "b.y"):
        assert not any(s["overridden"] for s in client.get(f"/api/samples?branch={key}").get_json())
    assert [s["overridden"] for s in client.get("/api/samples?branch=a.y").get_json() if s["sample"] == sid] == [True]

    status = _compose_toys(branches_dir.parent / "branches.toml", branches_dir, toy_registry)
    computed = {name for name, s in status.items() if s == "computed"}
    assert computed == {"data", "overrides.a.y", "masks.a.y", "align.a.y", "evaluate.toy", "results", "report"}
    assert all(status[f"{base}.{key}"] == "reused" for base in ("overrides", "masks", "align") for key in KEYS if key != "a.y")
    verdicts = {v.sample_id: v for v in open_run(branches_dir).load("overrides.a.y")}
    assert verdicts[sid].sources[0] == "person"
    assert json.loads((branches_dir / "results.json").read_text())["branches"]["a.y"]["review"]["overrides"] == 1


def test_a_change_names_its_branch(branches_dir: Path):
    client = create_app(branches_dir).test_client()
    token = _branch_token(client, "a.x")
    sid = ReviewRun(branches_dir, "a.x").ordered()[0]
    # without the branch a change could land in another file than the one looked at
    missing = _post(client, "/api/toggle", {"sample": sid, "colour": "red"}, token)
    assert missing.status_code == 400 and "name the branch" in missing.get_json()["error"]
    assert _post(client, "/api/reset", {"sample": sid}, token).status_code == 400
    assert _post(client, "/api/toggle", {"branch": ["a.x"], "sample": sid, "colour": "red"}, token).status_code == 400
    unknown = _post(client, "/api/toggle", {"branch": "c.z", "sample": sid, "colour": "red"}, token)
    assert unknown.status_code == 404 and "no branch 'c.z'" in unknown.get_json()["error"]
    assert not (branches_dir / "review").exists()
    # the token, the read-only mode and the Host check hold on every branch
    for key in KEYS:
        assert _post(client, "/api/toggle", {"branch": key, "sample": sid, "colour": "red"}, None).status_code == 403
    read_only = create_app(branches_dir, read_only=True).test_client()
    refused = _post(read_only, "/api/toggle", {"branch": "b.y", "sample": sid, "colour": "red"}, _branch_token(read_only, "b.y"))
    assert refused.status_code == 403 and "read-only" in refused.get_json()["error"]
    hosted = create_app(branches_dir, allowed_hosts={"127.0.0.1:8765"}).test_client()
    assert hosted.get("/api/samples?branch=b.y", headers={"Host": "evil.example:8765"}).status_code == 403
    assert not (branches_dir / "review").exists()


def test_an_unknown_branch_is_refused_naming_the_branches(branches_dir: Path, run_dir: Path, capsys):
    with pytest.raises(ReviewError, match=r"has no branch 'c\.z'; its branches: a\.x \(a segmenter x toy critic\), a\.y"):
        ReviewRun(branches_dir, "c.z")
    assert main(["review", str(branches_dir), "--branch", "c.z", "--port", "0", "--no-browser"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "lvlmva: error:" in err and "no branch 'c.z'" in err and all(key in err for key in KEYS)
    # the refused server left neither the port nor the run's review lock held
    make_server(branches_dir, port=0).server_close()
    # a run without branches has none to choose
    assert main(["review", str(run_dir), "--branch", "a.x", "--port", "0", "--no-browser"]) == EXIT_BAD_INPUT
    assert "has no branch 'a.x'; it has one branch, named by no key" in capsys.readouterr().err


def test_the_server_opens_on_the_branch_asked_for_and_locks_them_all(branches_dir: Path, serving):
    with serving(make_server(branches_dir, branch="b.y", port=0)) as server:
        assert server.reviews.default == "b.y"
        status, html = _request(server.port, "GET", "/")
        assert status == 200 and b'data-branch="b.y"' in html and b'<option value="b.y" selected>' in html
        # one server per run: its lock covers every branch
        for key in (None, "a.x"):
            with pytest.raises(ReviewError, match="being reviewed by another lvlmva review"):
                make_server(branches_dir, branch=key, port=0)
        (token,) = re.findall(rb'<meta name="review-token" content="([^"]+)">', html)
        sid = int(re.findall(rb'data-sample="(\d+)"', html)[0])
        status, _ = _request(server.port, "POST", "/api/toggle", {"branch": "b.y", "sample": sid, "colour": "red"}, token=token.decode())
        assert status == 200
    assert [o.sample for o in read_overrides(branches_dir / "review" / "b.y" / "overrides.json")] == [sid]


def test_a_branch_not_judged_yet_or_with_a_stale_file_is_named_and_the_others_served(branches_dir: Path):
    shutil.rmtree(branches_dir / "judge.a.x")
    stale = branches_dir / "review" / "b.x" / "overrides.json"
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"format": "lvlmva-overrides", "version": 1, "overrides": [
        {"sample": 999999, "colour": "red", "verdict": "no", "when": "2026-12-02T04:10:00+00:00"}]}))  # fmt: skip
    with pytest.raises(ReviewError, match=r"no finished judge\.a\.x stage.*--until judge\.a\.x"):
        ReviewRun(branches_dir, "a.x")
    client = create_app(branches_dir).test_client()  # opens on the first branch judged
    listing = client.get("/api/branches").get_json()
    assert listing["opened"] == "a.y"
    assert [b["judged"] for b in listing["branches"]] == [False, True, True, True]
    html = client.get("/").get_data(as_text=True)
    assert re.search(r'<option value="a.x" disabled>[^<]*not judged yet</option>', html)
    # each branch's own file is checked when it is opened: b.x's names a sample the run lacks
    page = client.get("/?branch=b.x")
    assert page.status_code == 409 and "sample 999999" in page.get_data(as_text=True) and 'class="card' not in page.get_data(as_text=True)
    assert client.get("/api/samples?branch=a.x").status_code == 409
    assert client.get("/api/samples?branch=b.y").status_code == 200


def test_branches_are_read_from_the_recorded_settings_without_the_plugins(tmp_path: Path):
    from lvlmva.review.server import run_branches

    # one segmenter in its singular section, two critics, one of them an LVLM's: the plugins
    # named need not be installed to read their names
    (tmp_path / "settings.resolved.toml").write_text(
        '[segmenter]\nplugin = "ppeps-wgm"\nnum_clusters = 5\n\n'
        '[critics.gpt4o]\nplugin = "not-installed-lvlm"\nmodel = "gpt-4o"\n\n[critics.oracle]\nplugin = "oracle"\n\n'
        '[judge]\nplugin = "rules"\n'
    )
    branches = run_branches(tmp_path)
    assert [(b.key, b.label, b.judge) for b in branches] == [
        ("gpt4o", "ppeps-wgm x not-installed-lvlm critic gpt-4o (gpt4o)", "rules"),
        ("oracle", "ppeps-wgm x oracle critic (oracle)", "rules"),
    ]
    assert dict(branches[0].stages) == {"segment": "segment", "render": "render", "critic": "critic.gpt4o", "judge": "judge.gpt4o"}
    assert branches[0].overrides == Path("review/gpt4o/overrides.json")
