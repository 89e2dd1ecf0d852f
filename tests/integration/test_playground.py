"""The playground page in a real browser (Debian's Chromium, headless, driven by Playwright)
against the real stack: send a message, move a steering slider, see the steered and
unsteered replies side by side with the probe's heat-map; screenshots are saved."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
#: Where the screenshots go (kept after the run): NDIF_SCREENSHOTS, else the test's tmp folder.
SHOTS = os.environ.get("NDIF_SCREENSHOTS")


@pytest.fixture
def page(production_stack):
    if not Path(CHROMIUM).exists():
        pytest.fail(
            "Chromium is needed for the browser test: `make browser` (which `make test` runs) installs Debian's chromium"
        )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        try:
            yield browser.new_page(viewport={"width": 1400, "height": 900})
        finally:
            browser.close()


def test_chat_steer_and_watch_the_heat_map(production_stack, page, tmp_path):
    shots = Path(SHOTS) if SHOTS else tmp_path
    shots.mkdir(parents=True, exist_ok=True)
    key = production_stack.key("playground")
    page.goto(f"{production_stack.url}/playground#key={key}&model=tiny-llama")
    page.wait_for_selector("#steer-joy")  # the model's artifacts are listed: a slider per vector
    assert page.input_value("#heat") == "probe:mood"

    page.fill("#max-tokens", "8")
    page.fill("#message", "Tell me about the sea")
    page.click("#send")
    page.wait_for_function("document.querySelectorAll('.turn.assistant[data-done=true]').length === 2", timeout=120_000)
    before = page.inner_text("#steered .turn.assistant")
    assert before == page.inner_text("#plain .turn.assistant")  # no steering yet: the same reply
    page.screenshot(path=str(shots / "playground-unsteered.png"))

    page.fill("#steer-joy", "6")  # move the slider
    page.dispatch_event("#steer-joy", "input")
    assert page.inner_text("#steer-joy-value") == "6"
    page.fill("#message", "Tell me about the sea")
    page.click("#send")
    page.wait_for_function("document.querySelectorAll('.turn.assistant[data-done=true]').length === 4", timeout=120_000)
    steered = page.locator("#steered .turn.assistant").nth(1).inner_text()
    plain = page.locator("#plain .turn.assistant").nth(1).inner_text()
    assert steered != plain  # the slider's steering reached the model, for the steered pane only

    # The heat-map: every token of the reply is coloured by the probe's score.
    tokens = page.locator("#steered .turn.assistant").nth(1).locator(".tok")
    assert tokens.count() >= 1
    colours = {tokens.nth(i).evaluate("t => getComputedStyle(t).backgroundColor") for i in range(tokens.count())}
    assert all(colour.startswith("rgba(220, 60, 40") for colour in colours), colours
    tokens.first.hover()
    details = page.inner_text("#details")
    assert "mood:" in details
    prompt = page.locator("#steered .prompt").nth(1).locator(".tok")  # what the model read, coloured too
    assert prompt.count() > tokens.count()
    assert prompt.first.evaluate("t => getComputedStyle(t).backgroundColor").startswith("rgba(220, 60, 40")
    prompt.last.hover()
    assert "(prompt)" in page.inner_text("#details")
    page.screenshot(path=str(shots / "playground-steered.png"))
    assert (shots / "playground-steered.png").stat().st_size > 10_000

    # An SAE feature as the heat-map, clamped in the steered pane; the logit lens on hover.
    page.select_option("#heat", "sae:res-2")
    page.fill("#feature", "3")
    page.fill("#feature-value", "9")
    page.dispatch_event("#feature-value", "input")
    page.select_option("#lens-layer", "2")
    page.fill("#message", "And the mountains?")
    page.click("#send")
    page.wait_for_function("document.querySelectorAll('.turn.assistant[data-done=true]').length === 6", timeout=120_000)
    tokens = page.locator("#steered .turn.assistant").nth(2).locator(".tok")
    assert tokens.count() >= 1
    tokens.first.hover()
    details = page.inner_text("#details")
    assert "feature:" in details and "logit lens:" in details
    page.screenshot(path=str(shots / "playground-feature.png"))
