"""The review page in a real browser: Debian's headless Chromium driven by Playwright (its own
browser download is never used). A small real DecoyMNIST run stopped at the judge is served
with ``make_server``; one verdict is toggled by a click and one with the keyboard, both are
still there after a reload, and the next ``compose`` builds the mask from them. A run with two
segmenters x two critics: the page switches branches with its selector, the address keeps the
branch through a reload, and each branch's toggle lands in its own file and its own masks.

Skipped without Chromium or Playwright, unless ``LVLMVA_REQUIRE_BROWSER=1`` (CI) makes that a
failure."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from lvlmva.cli import EXIT_OK
from lvlmva.masks import masks_from_verdicts
from lvlmva.overrides import read_overrides
from lvlmva.pipeline import open_run
from lvlmva.review.server import ReviewRun, make_server

CHROMIUM = Path("/usr/bin/chromium")

pytestmark = pytest.mark.browser


def _need_browser() -> None:
    missing = []
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    if importlib.util.find_spec("playwright") is None:
        missing.append("the playwright package (pip install playwright)")
    if importlib.util.find_spec("mlxtend") is None:
        missing.append("mlxtend (pip install -e '.[dev]')")
    if missing:
        reason = "the browser test needs " + " and ".join(missing)
        if os.environ.get("LVLMVA_REQUIRE_BROWSER") == "1":
            pytest.fail(reason + " (LVLMVA_REQUIRE_BROWSER=1)")
        pytest.skip(reason)


def test_toggle_reload_and_compose_in_a_real_browser(tmp_path: Path, torch_global_state, compose_until_judge, compose, serving):
    _need_browser()
    from playwright.sync_api import expect, sync_playwright

    run_dir, _, _ = compose_until_judge(tmp_path, "--quiet", seed=1, n=5)
    settings = tmp_path / "settings.toml"

    review = ReviewRun(run_dir)
    order = review.ordered()
    first, second = order[0], order[1]
    labels = review.segmentation.labels
    row = review.samples[first].row
    # the first card's largest cluster: toggled by a click, its mask must change
    j = int(torch.bincount(labels[row].flatten(), minlength=len(review.samples[first].colors)).argmax())
    clicked = review.samples[first].colors[j]
    keyed = review.samples[second].colors[0]

    errors: list[str] = []
    with serving(make_server(run_dir, port=0, reviewer="ana")) as server:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
            try:
                page = browser.new_page()
                page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
                page.on("console", lambda msg: errors.append(f"console: {msg.text}") if msg.type == "error" else None)
                page.goto(f"http://127.0.0.1:{server.port}/")
                cards = page.locator("article.card")
                expect(cards).to_have_count(len(order))
                assert [int(x) for x in cards.evaluate_all("cs => cs.map(c => c.dataset.sample)")] == order

                # a click on a toggle button
                with page.expect_response(lambda r: r.url.endswith("/api/toggle") and r.status == 200):
                    page.locator(f"#sample-{first} button.toggle[data-colour='{clicked}']").click()
                expect(page.locator(f"#sample-{first} tr[data-colour='{clicked}'] td.verdict")).to_contain_text("(person)")
                expect(page.locator("#status")).to_contain_text(f"saved: sample {first}, {clicked}")

                # the keyboard: the clicked card is focused; j moves to the next, 1 toggles its first colour
                page.keyboard.press("j")
                expect(page.locator(f"#sample-{second}")).to_have_class("card current")
                with page.expect_response(lambda r: r.url.endswith("/api/toggle") and r.status == 200):
                    page.keyboard.press("1")
                expect(page.locator(f"#sample-{second} tr[data-colour='{keyed}'] td.verdict")).to_contain_text("(person)")
                expect(page.locator("#count-overridden")).to_have_text("2")

                saved = {(o.sample, o.colour): o for o in read_overrides(run_dir / "review" / "overrides.json")}
                assert set(saved) == {(first, clicked), (second, keyed)}
                assert all(o.reviewer == "ana" for o in saved.values())

                # after a reload both are still there, marked as the person's
                page.reload()
                expect(page.locator("article.card")).to_have_count(len(order))
                for sid, colour in ((first, clicked), (second, keyed)):
                    cell = page.locator(f"#sample-{sid} tr[data-colour='{colour}']")
                    expect(cell).to_have_class("person")
                    expect(cell.locator("td.verdict .by")).to_have_text("(person)")
                expect(page.locator("article.card.overridden")).to_have_count(2)
                # f: failed (none), f again: overridden (the two)
                page.keyboard.press("f")
                expect(page.locator("article.card:not(.hidden)")).to_have_count(0)
                page.keyboard.press("f")
                expect(page.locator("article.card:not(.hidden)")).to_have_count(2)
                browser.close()
            finally:
                if browser.is_connected():
                    browser.close()
    assert errors == []

    # the next compose builds the masks from the person's verdicts
    code, _, err = compose(settings, run_dir, "--quiet", "--until", "masks")
    assert code == EXIT_OK, err
    run = open_run(run_dir)
    judge_masks, _ = masks_from_verdicts(labels, run.load("judge"))
    masks = run.load("masks")["masks"]
    assert torch.equal(masks[row] != judge_masks[row], labels[row] == j)
    assert [v.sources for v in run.load("overrides") if v.sample_id == first][0][j] == "person"


def test_switching_branches_in_a_real_browser(tmp_path: Path, torch_global_state, review_settings, compose, serving):
    _need_browser()
    from playwright.sync_api import expect, sync_playwright

    settings = review_settings(tmp_path, seed=1, n=4, branches=True)
    run_dir = tmp_path / "run"
    code, _, err = compose(settings, run_dir, "--quiet", "--until", "judge.j4.oracle")
    assert code == EXIT_OK, err
    first = ReviewRun(run_dir, "j3.scripted")
    other = ReviewRun(run_dir, "j4.oracle")
    sid = first.ordered()[0]
    clicked = first.samples[sid].colors[0]
    keyed_sid = other.ordered()[0]
    keyed = other.samples[keyed_sid].colors[0]
    labels = ["J=3 x scripted critic (j3.scripted)", "J=3 x oracle critic (j3.oracle)", "J=4 x scripted critic (j4.scripted)", "J=4 x oracle critic (j4.oracle)"]

    errors: list[str] = []
    with serving(make_server(run_dir, port=0, reviewer="ana")) as server:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
            try:
                page = browser.new_page()
                page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
                page.on("console", lambda msg: errors.append(f"console: {msg.text}") if msg.type == "error" else None)
                page.goto(f"http://127.0.0.1:{server.port}/")
                # the first branch judged; the address names it, so that a reload keeps it
                expect(page).to_have_url(f"http://127.0.0.1:{server.port}/?branch=j3.scripted")
                select = page.locator("select#branch")
                expect(select).to_have_value("j3.scripted")
                assert select.locator("option").all_inner_texts() == labels
                expect(page.locator("#branch-show")).to_be_hidden()  # choosing is enough
                expect(page.locator(f"#sample-{sid} tbody tr")).to_have_count(3)  # J=3
                with page.expect_response(lambda r: r.url.endswith("/api/toggle") and r.status == 200):
                    page.locator(f"#sample-{sid} button.toggle[data-colour='{clicked}']").click()
                expect(page.locator(f"#sample-{sid} tr[data-colour='{clicked}'] td.verdict")).to_contain_text("(person)")

                # another branch: its own cards (four colours), its own verdicts, its own file
                with page.expect_navigation():
                    select.select_option("j4.oracle")
                expect(page).to_have_url(f"http://127.0.0.1:{server.port}/?branch=j4.oracle")
                expect(page.locator(f"#sample-{keyed_sid} tbody tr")).to_have_count(4)
                expect(page.locator("article.card.overridden")).to_have_count(0)
                expect(page.locator(".where")).to_contain_text("review/j4.oracle/overrides.json")
                page.locator(f"#sample-{keyed_sid}").click(position={"x": 5, "y": 5})
                with page.expect_response(lambda r: r.url.endswith("/api/toggle") and r.status == 200):
                    page.keyboard.press("1")
                expect(page.locator(f"#sample-{keyed_sid} tr[data-colour='{keyed}'] td.verdict")).to_contain_text("(person)")
                assert all("branch=j4.oracle" in src for src in page.locator("img").evaluate_all("is => is.map(i => i.src)"))

                # a reload stays on the branch; the first one still shows its toggle
                page.reload()
                expect(select).to_have_value("j4.oracle")
                expect(page.locator("article.card.overridden")).to_have_count(1)
                with page.expect_navigation():
                    select.select_option("j3.scripted")
                expect(page.locator(f"#sample-{sid} tr[data-colour='{clicked}']")).to_have_class("person")
                expect(page.locator("article.card.overridden")).to_have_count(1)
                browser.close()
            finally:
                if browser.is_connected():
                    browser.close()
    assert errors == []
    assert [(o.sample, o.colour, o.reviewer) for o in read_overrides(run_dir / "review" / "j3.scripted" / "overrides.json")] == [(sid, clicked, "ana")]
    assert [(o.sample, o.colour) for o in read_overrides(run_dir / "review" / "j4.oracle" / "overrides.json")] == [(keyed_sid, keyed)]
    assert not (run_dir / "review" / "overrides.json").exists()

    # the next compose takes each branch's file into that branch alone
    code, _, err = compose(settings, run_dir, "--quiet", "--until", "masks.j4.oracle")
    assert code == EXIT_OK, err
    run = open_run(run_dir)
    for key, (sample, colour) in (("j3.scripted", (sid, clicked)), ("j4.oracle", (keyed_sid, keyed))):
        (v,) = [v for v in run.load(f"overrides.{key}") if v.sample_id == sample]
        assert v.sources[v.colors.index(colour)] == "person"
    for key in ("j3.oracle", "j4.scripted"):
        assert all(v.sources == () for v in run.load(f"overrides.{key}"))
