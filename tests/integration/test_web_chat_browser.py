"""The web chat in a real headless browser (Debian's chromium, driven by Playwright; the
`browser` fixture is conftest's): upload an image, ask, watch the answer stream in; a follow-up
turn; an error shown inline. The demo model in the page: test_web_chat_demo_browser.py."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from servers import ApiStack

from vilaserve.adapters.offline.checkpoints.tiny_vila import make_png

RECORD_LENGTHS = """() => {
  window.__lengths = [];
  new MutationObserver(() => {
    const texts = document.querySelectorAll('[data-testid="assistant-text"]');
    if (texts.length) window.__lengths.push(texts[texts.length - 1].textContent.length);
  }).observe(document.getElementById('messages'),
             {subtree: true, childList: true, characterData: true});
}"""


@pytest.fixture
def page(browser: Any, api_stack: ApiStack) -> Iterator[Any]:
    from playwright.sync_api import expect

    page = browser.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    # Console errors count, except the browser's own note on a refused request (an error
    # response is part of the error test; the page itself must show it).
    page.on(
        "console",
        lambda m: (
            problems.append(m.text)
            if m.type == "error"
            and not m.text.startswith(
                "Failed to load resource: the server responded with a status of 400"
            )
            else None
        ),
    )
    page.goto(api_stack.api_url + "/")
    expect(page.get_by_test_id("model-select")).to_have_value(api_stack.model)
    yield page
    page.close()
    assert not problems, problems


def api_answer(stack: ApiStack, messages: list[dict[str, Any]], max_tokens: int) -> str:
    client = openai.OpenAI(base_url=stack.api_url + "/v1", api_key="x", max_retries=0)
    reply = client.chat.completions.create(
        model=stack.model,
        messages=messages,
        temperature=0,
        max_tokens=max_tokens,  # type: ignore[arg-type]
    )
    return reply.choices[0].message.content or ""


def test_upload_an_image_ask_and_see_the_answer_stream_in(
    page: Any, api_stack: ApiStack, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    png = make_png(40, 30, "red")
    picture = tmp_path / "red.png"
    picture.write_bytes(png)
    page.get_by_test_id("temperature").fill("0")
    page.get_by_test_id("max-tokens").fill("24")
    page.get_by_test_id("image-input").set_input_files(str(picture))
    expect(page.get_by_test_id("attachment-thumb")).to_have_count(1)
    page.evaluate(RECORD_LENGTHS)
    page.get_by_test_id("prompt").fill("What colour is it?")
    page.get_by_test_id("send-button").click()

    reply = page.get_by_test_id("message-assistant").last
    expect(reply).to_have_attribute("data-state", "done", timeout=60_000)
    shown = reply.get_by_test_id("assistant-text").text_content()
    lengths = [n for n in page.evaluate("window.__lengths") if n > 0]
    assert len(set(lengths)) >= 2, f"the answer did not grow while streaming: {lengths}"
    assert lengths == sorted(lengths)
    expect(page.get_by_test_id("attachment-thumb")).to_have_count(0)
    expect(page.get_by_test_id("message-user").locator("img")).to_have_count(1)
    expect(page.get_by_test_id("message-error")).to_have_count(0)
    expect(page.get_by_test_id("status")).to_contain_text("generated tokens")

    data_url = "data:image/png;base64," + base64.b64encode(png).decode()
    first_turn = {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": data_url}},
            {"type": "text", "text": "What colour is it?"},
        ],
    }
    assert shown == api_answer(api_stack, [first_turn], 24)

    # A follow-up turn carries the whole conversation, image included.
    page.get_by_test_id("prompt").fill("Are you sure?")
    page.get_by_test_id("prompt").press("Enter")
    second = page.get_by_test_id("message-assistant").nth(1)
    expect(second).to_have_attribute("data-state", "done", timeout=60_000)
    history = [
        first_turn,
        {"role": "assistant", "content": shown},
        {"role": "user", "content": "Are you sure?"},
    ]
    assert second.get_by_test_id("assistant-text").text_content() == api_answer(
        api_stack, history, 24
    )


def test_errors_show_inline_and_the_chat_goes_on(page: Any) -> None:
    from playwright.sync_api import expect

    page.get_by_test_id("max-tokens").fill("100000")  # beyond the tiny model's context
    page.get_by_test_id("prompt").fill("hello")
    page.get_by_test_id("send-button").click()
    error = page.get_by_test_id("message-error")
    expect(error).to_have_count(1)
    expect(error).to_contain_text("max_tokens")
    expect(page.get_by_test_id("message-assistant")).to_have_count(0)
    expect(page.get_by_test_id("send-button")).to_be_enabled()

    page.get_by_test_id("max-tokens").fill("200")
    page.get_by_test_id("prompt").fill("hello again")
    page.get_by_test_id("send-button").click()
    reply = page.get_by_test_id("message-assistant")
    expect(reply).to_have_count(1)
    # Stop lands mid-stream or, if the tiny model was quicker, after the end (a no-op then).
    page.evaluate("document.getElementById('stop-button').click()")
    expect(reply).to_have_attribute("data-state", re.compile("^(stopped|done)$"), timeout=60_000)
    expect(page.get_by_test_id("send-button")).to_be_enabled()
    expect(page.get_by_test_id("stop-button")).to_be_disabled()
