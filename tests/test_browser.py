"""The review page in a real browser: Debian's headless Chromium driven by Playwright (its own
browser download is never used). A small real DecoyMNIST run stopped at the judge is served
with ``make_server``; one verdict is toggled by a click and one with the keyboard, both are
still there after a reload, and the next ``compose`` builds the mask from them.

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
