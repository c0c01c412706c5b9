"""The demo model answering about an uploaded picture in the web chat, in a real headless
browser (conftest's `browser`); its screenshot is the README's (`VILASERVE_UPDATE_DOCS=1` writes
it to docs/)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from servers import ApiStack

DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.mark.demo
def test_the_demo_model_answers_about_an_uploaded_picture_in_the_web_chat(
    browser: Any, demo_stack: ApiStack, tmp_path: Path
) -> None:
    """The README's picture, uploaded in the page and asked about, answered by the W4A16 demo."""
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 900, "height": 700})
    page.goto(demo_stack.api_url + "/")
    expect(page.get_by_test_id("model-select")).to_have_value("vila-demo-4bit-AWQ")
    page.get_by_test_id("temperature").fill("0")
    page.get_by_test_id("image-input").set_input_files(str(DOCS / "demo-example.png"))
    page.get_by_test_id("prompt").fill("What shape is this?")
    page.get_by_test_id("send-button").click()
    reply = page.get_by_test_id("message-assistant").first
    expect(reply).to_have_attribute("data-state", "done", timeout=60_000)
    answer = reply.get_by_test_id("assistant-text").text_content() or ""
    assert answer.strip().lower().rstrip(".") == "star", answer
    shot = tmp_path / "web-chat-demo.png"
    page.screenshot(path=str(shot))
    page.close()
    if os.environ.get("VILASERVE_UPDATE_DOCS") == "1":
        (DOCS / "web-chat-demo.png").write_bytes(shot.read_bytes())
