"""The web chat page at `/`, on a real uvicorn server (free local port, `tiny-random` model).

Without a browser: the page and its script and style sheet come with the right content types and
load nothing from outside this server. With Debian's headless Chromium driven by Playwright: a real
PNG is uploaded, a question sent, the answer seen growing chunk by chunk, and a second question sent in
the same conversation. The oracle for both answers is vlmkit.generate run directly (greedy) on the
conversation the page should have sent, and the request bodies the browser sent are checked against
OpenAI's message format with the history (image included) resent. Also in the browser: an API error's
message shown on the page, the API key sent as the bearer token, the reset button, dropped and pasted
images. A missing /usr/bin/chromium fails these tests (it is not a reason to skip them).
"""

from __future__ import annotations

import base64
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from test_serve import KEY, SHAPES, SHAPES_URL, Server, request
from vlmkit.generate import generate
from vlmkit.image.load import load_image
from vlmkit.load import LoadedModel, load_model
from vlmkit.sampling import GenerationConfig
from vlmkit.serve import create_app

CHROMIUM = Path("/usr/bin/chromium")  # Debian's package; Playwright downloads no browser of its own
MODEL = "tiny-random"
MAX_TOKENS = 48
STEP_DELAY = 0.02  # seconds added to each forward pass, so that streamed chunks are apart in time

# Records [length, time in ms] of the newest answer each time the conversation list changes: one
# entry per update the page made while the answer streamed in.
WATCH_ANSWER = """() => {
    window.answerUpdates = [];
    if (window.answerWatcher) window.answerWatcher.disconnect();
    window.answerWatcher = new MutationObserver(() => {
        const answers = document.querySelectorAll(".message.assistant .text");
        const length = answers.length ? answers[answers.length - 1].textContent.length : 0;
        const seen = window.answerUpdates;
        if (length > 0 && (!seen.length || seen[seen.length - 1][0] !== length)) {
            seen.push([length, performance.now()]);
        }
    });
    const everything = {childList: true, subtree: true, characterData: true};
    window.answerWatcher.observe(document.getElementById("messages"), everything);
}"""


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return load_model(MODEL)


@pytest.fixture(scope="module")
def server(loaded) -> Iterator[Server]:
    # The tiny model decodes a token in well under a millisecond: without a pause the whole answer
    # could reach the browser in one network read, and "it grew over time" would not be observable.
    pace = loaded.model.register_forward_hook(lambda *_: time.sleep(STEP_DELAY))
    s = Server(create_app(loaded, model_name=MODEL))
    yield s
    s.stop()
    pace.remove()


def get(url: str) -> tuple[int, dict[str, str], str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, dict(response.headers), response.read().decode()


def test_page_files_are_served_and_load_nothing_from_outside(server):
    status, headers, html = get(server.url + "/")
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert "connect-src 'self'" in headers["content-security-policy"]
    assert "default-src 'none'" in headers["content-security-policy"]
    _, js_headers, js = get(server.url + "/static/chat.js")
    _, css_headers, css = get(server.url + "/static/style.css")
    assert js_headers["content-type"] == "text/javascript; charset=utf-8"
    assert css_headers["content-type"] == "text/css; charset=utf-8"
    assert "/v1/chat/completions" in js and "stream: true" in js

    for text in (html, js, css):
        assert not re.search(r"https?:", text), "the page must not name any http(s) URL"
    # Every resource the HTML loads is a path on this server (or the empty data: favicon).
    refs = re.findall(r'\b(?:src|href)="([^"]*)"', html)
    assert sorted(refs) == ["/static/chat.js", "/static/style.css", "data:,"]
    # The script talks only to paths on this server; the style sheet imports nothing.
    assert re.findall(r"fetch\(([^,)]*)", js) == ['"/v1/models"', '"/v1/chat/completions"', '"/health"']
    assert "url(" not in css and "@import" not in css

    with pytest.raises(urllib.error.HTTPError) as missing:
        get(server.url + "/static/other.js")
    assert missing.value.code == 404


def oracle(loaded: LoadedModel, messages: list[dict]) -> tuple[str, int]:
    """The greedy answer of vlmkit.generate, without the server, to OpenAI-format messages, and how many
    tokens it took."""
    images, converted = [], []
    for message in messages:
        if isinstance(message["content"], str):
            converted.append(message)
            continue
        parts = []
        for part in message["content"]:
            if part["type"] == "image_url":
                assert part["image_url"]["url"] == SHAPES_URL
                images.append(load_image(SHAPES))
                parts.append({"type": "image"})
            else:
                parts.append(part)
        converted.append({"role": message["role"], "content": parts})
    plans = loaded.plan_images(images)
    result = generate(loaded.model, [loaded.prompt_ids(converted, plans)],
                      GenerationConfig(max_new_tokens=MAX_TOKENS, temperature=0.0),
                      prefill_inputs=loaded.image_inputs(plans), tokenizer=loaded.tokenizer)
    return result.texts[0], len(result.token_ids[0])


def ask(page: Page, question: str, turn: int) -> tuple[dict, str, list[list[float]]]:
    """Send question on the page; (the request body, the finished answer, its [length, ms] updates)."""
    page.evaluate(WATCH_ANSWER)
    page.fill("#question", question)
    with page.expect_request("**/v1/chat/completions") as sent:
        page.click("#send")
    page.wait_for_selector(f".message.assistant:nth-child({2 * turn})[aria-busy=false]", timeout=10_000)
    answer = page.text_content(f".message.assistant:nth-child({2 * turn}) .text")
    return sent.value.post_data_json, answer, page.evaluate("window.answerUpdates")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's browser for the web page tests with "
                    "`apt-get install -y chromium` (the README's Set-up line; .ci/run does)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield browser
        browser.close()


def open_page(browser: Browser, url: str, problems: list[str], model_shown: str = MODEL) -> Page:
    """The chat page at url, connected (showing model_shown as the model), with greedy settings; console
    errors and warnings go to problems."""
    page = browser.new_page()
    page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.goto(url + "/")
    expect(page.locator("#model-name")).to_have_text(model_shown)  # from GET /health
    page.click("summary")  # open the settings
    page.fill("#max-tokens", str(MAX_TOKENS))
    page.fill("#temperature", "0")
    return page


def test_browser_uploads_an_image_streams_and_continues(server, loaded, browser):
    problems: list[str] = []
    page = open_page(browser, server.url, problems)
    page.set_input_files("#image-input", SHAPES)
    page.wait_for_selector("#attachments img")

    first = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": SHAPES_URL}},
                                         {"type": "text", "text": "What shapes are here?"}]}
    body, answer, updates = ask(page, "What shapes are here?", turn=1)
    assert body == {"model": MODEL, "messages": [first], "stream": True, "max_tokens": MAX_TOKENS,
                    "temperature": 0}
    expected, steps = oracle(loaded, [first])
    assert answer == expected and answer
    lengths, times = [n for n, _ in updates], [t for _, t in updates]
    assert lengths == sorted(lengths) and lengths[-1] == len(answer) and len(lengths) >= 2, updates
    # Streamed: part of the answer was on the page well before all of it (steps - 1 pauses between the first
    # token and the last; the answer ends at the model's end of turn, before MAX_TOKENS).
    assert steps >= 4 and times[-1] - times[0] > 0.5 * (steps - 1) * STEP_DELAY * 1000, updates

    second = {"role": "user", "content": [{"type": "text", "text": "Which one is red?"}]}
    body, answer2, _ = ask(page, "Which one is red?", turn=2)
    history = [first, {"role": "assistant", "content": answer}, second]
    assert body["messages"] == history  # the image and the first answer are sent again
    assert answer2 == oracle(loaded, history)[0]
    assert page.locator(".message").count() == 4 and page.is_hidden("#error")
    assert not problems, f"the page logged errors: {problems}"
    page.close()


def test_browser_shows_api_errors_sends_the_key_and_resets(loaded, browser):
    keyed = Server(create_app(loaded, model_name=MODEL, api_key=KEY))
    try:
        # A keyed server's /health names no model: the page asks /v1/models once it has the key.
        page = open_page(browser, keyed.url, [], model_shown="(shown once the API key in Settings is accepted)")
        # (the refused requests are logged by Chromium: not checked)
        page.fill("#max-tokens", "8")  # the answers are not looked at here
        page.fill("#question", "Hello?")
        page.click("#send")
        shown = page.wait_for_selector("#error:not([hidden])").text_content()
        status, refusal = request(keyed.url + "/v1/chat/completions", {"model": MODEL, "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Hello?"}]}], "stream": True})
        assert status == 401 and refusal["error"]["message"] in shown
        # The failed turn is taken back and the question given back for another try.
        assert page.locator(".message").count() == 0 and page.input_value("#question") == "Hello?"

        page.fill("#api-key", KEY)
        with page.expect_request("**/v1/chat/completions") as sent:
            page.click("#send")
        assert sent.value.headers["authorization"] == f"Bearer {KEY}"
        assert sent.value.post_data_json["model"] == MODEL
        expect(page.locator("#model-name")).to_have_text(MODEL)
        page.wait_for_selector(".message.assistant[aria-busy=false]")
        assert page.is_hidden("#error") and page.locator(".message").count() == 2

        page.click("#reset")
        assert page.locator(".message").count() == 0
        body, _, _ = ask(page, "Hi again", turn=1)
        assert body["messages"] == [{"role": "user", "content": [{"type": "text", "text": "Hi again"}]}]
        page.close()
    finally:
        keyed.stop()


# Drops a PNG and a text file on the page, then pastes the PNG: the two ways in besides the file input.
DROP_AND_PASTE = """(png) => {
    const bytes = Uint8Array.from(atob(png), (c) => c.charCodeAt(0));
    const transfer = (...files) => {
        const t = new DataTransfer();
        files.forEach((f) => t.items.add(f));
        return t;
    };
    const image = new File([bytes], "shapes.png", {type: "image/png"});
    const text = new File(["hello"], "notes.txt", {type: "text/plain"});
    const how = {bubbles: true, cancelable: true};
    document.dispatchEvent(new DragEvent("drop", {dataTransfer: transfer(image, text), ...how}));
    document.dispatchEvent(new ClipboardEvent("paste", {clipboardData: transfer(image), ...how}));
}"""


def test_browser_takes_dropped_and_pasted_images(server, browser):
    page = open_page(browser, server.url, [])
    page.evaluate(DROP_AND_PASTE, base64.b64encode(SHAPES.read_bytes()).decode())
    thumbnails = page.locator("#attachments img")
    expect(thumbnails).to_have_count(2)
    assert [thumbnails.nth(i).get_attribute("src") for i in range(2)] == [SHAPES_URL, SHAPES_URL]
    assert "notes.txt is not an image" in page.text_content("#error")
    page.click("#attachments button >> nth=0")  # remove one
    expect(thumbnails).to_have_count(1)
    page.close()
