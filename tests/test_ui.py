"""The chat UI at /ui, driven in headless Debian chromium: a streamed answer, stop (in the engine too),
regenerate, clear, a busy model said in the chat. Saves tests/artifacts/ui.png."""

from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest
from playwright.sync_api import sync_playwright

from conftest import ARTIFACTS, CHAT, LORA_ALL, LORA_BASE, ONE_SLOT, TINY_LONG, process_tree

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
BOT = "#chatbot .message-row.bot-row"  # assistant turns
USER = "#chatbot .message-row.user-row"


@pytest.fixture(scope="module")
def page(server):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.set_default_timeout(60_000)
        page.goto(server.base_url + "/ui/")
        yield page
        browser.close()


def running(server, model: str) -> int:
    return httpx.get(server.v1 + "/stats").json()["data"][model]["running"]


def texts(page, selector: str) -> list[str]:
    return [t.strip() for t in page.locator(selector).all_inner_texts()]


def send(page, message: str) -> None:
    box = page.locator("#chat-input textarea")
    box.fill(message)
    box.press("Enter")


def set_max_tokens(page, n: int, slider_id: str = "max-tokens") -> None:
    """Type ``n`` into the slider's number field until the slider itself shows it: on a loaded machine
    the page may still be wiring its inputs when the test first types."""
    if not page.locator(f"#{slider_id}").is_visible():
        page.get_by_text("Parameters").click()  # the direct chat's, in an accordion
    field = page.locator(f"#{slider_id} input[type=number]")
    slider = page.locator(f"#{slider_id} input[type=range]")
    for _ in range(20):
        field.fill(str(n))
        field.press("Enter")
        time.sleep(0.3)
        if abs(float(slider.input_value()) - n) < 16 and field.input_value() == str(n):  # the slider steps by 16
            return
    raise AssertionError(f"the max tokens slider did not take {n}")


def choose_model(page, model: str) -> None:
    page.locator("#chat-model input").click()
    page.get_by_role("option", name=model).click()
    page.locator("#chatbot").get_by_text(model).first.wait_for()  # the chatbot is labelled with it


def wait_until_still(page, selector: str, quiet_s: float = 2.0, limit_s: float = 60.0) -> str:
    """The last matching element's text once it stops changing."""
    last, since, deadline = None, time.monotonic(), time.monotonic() + limit_s
    while time.monotonic() < deadline:
        now = texts(page, selector)[-1:] or [""]
        if now[0] != last:
            last, since = now[0], time.monotonic()
        elif last and time.monotonic() - since >= quiet_s:
            return last
        time.sleep(0.2)
    raise AssertionError(f"{selector} kept changing or stayed empty: {last!r}")


def test_model_list_and_a_streamed_answer(page, server):
    page.locator("#chat-model input").wait_for()
    page.locator("#chatbot").get_by_text(CHAT).first.wait_for()  # the page's load event has run
    assert page.locator("#chat-model input").input_value() == CHAT
    set_max_tokens(page, 24)
    send(page, "Hi! What is the capital of France? 你好 👋")
    page.locator(BOT).first.wait_for()
    answer = wait_until_still(page, BOT)
    assert answer and "⚠️" not in answer
    assert texts(page, USER) == ["Hi! What is the capital of France? 你好 👋"]  # Chinese and emoji intact
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "ui.png"), full_page=True)


def test_the_message_box_and_stop_are_in_view_on_a_laptop_and_the_page_has_an_icon(page, server):
    """On a 1280x800 window the message box, Stop, Regenerate and New chat are in view without scrolling
    (Stop was below the fold: a user scrolled to stop an answer); the page links an icon it serves."""
    width, height = 1280, 800
    laptop = page.context.browser.new_page(viewport={"width": width, "height": height})
    try:
        laptop.set_default_timeout(60_000)
        laptop.goto(server.base_url + "/ui/")
        laptop.locator("#chatbot").get_by_text(CHAT).first.wait_for()  # the page's load event has run
        assert laptop.evaluate("window.scrollY") == 0  # not scrolled to the focused message box either
        for control in ("#chat-input", "#send", "#stop", "#regenerate", "#clear"):
            box = laptop.locator(control).bounding_box()
            assert box and box["x"] >= 0 and box["y"] >= 0, (control, box)
            assert box["x"] + box["width"] <= width and box["y"] + box["height"] <= height, (control, box)
        icon = laptop.locator("link[rel~=icon]")
        icon.wait_for(state="attached")  # Gradio adds the page's head once its config is in
        href = laptop.evaluate("document.querySelector('link[rel~=icon]').href")
        assert href.startswith(server.base_url + "/ui/")  # the page's own route, not the server's /favicon.ico
        response = httpx.get(href, timeout=10)
        assert response.status_code == 200 and response.headers["content-type"].startswith("image/"), href
        ARTIFACTS.mkdir(exist_ok=True)
        laptop.screenshot(path=str(ARTIFACTS / "ui-1280x800.png"))
    finally:
        laptop.close()


def test_the_icon_needs_no_sign_in():
    """With API keys the page asks for one at sign-in (``middleware.UiSignIn``); its icon is served before."""
    from starlette.testclient import TestClient

    from ui.chat import build_chat_ui, chat_ui_app

    ui = TestClient(chat_ui_app(build_chat_ui(lambda: None, [CHAT], "once"), "/ui", {"a key"}))
    icon = ui.get("/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"] == "image/svg+xml"
    assert b"<svg" in icon.content
    assert ui.get("/gradio_api/heartbeat/abc").status_code == 401  # while the rest waits for the sign-in


def test_an_idle_gateway_is_not_woken_every_millisecond(server):
    """Gradio's queue looked for work every millisecond, with nobody on the page: some 840 wake-ups (context
    switches) a second in the gateway's event loop, and 7 % of a core."""
    gateway = next(p for p in process_tree(server) if "bentochat" in p.cmdline())  # --service-name bentochat
    time.sleep(1.0)  # what an earlier test left under way
    before, start = gateway.num_ctx_switches().voluntary, time.monotonic()
    time.sleep(3.0)
    assert (gateway.num_ctx_switches().voluntary - before) / (time.monotonic() - start) < 300


def test_multi_turn_regenerate_and_clear(page, server):
    send(page, "And what is your name?")
    page.locator(BOT).nth(1).wait_for()
    wait_until_still(page, BOT)
    assert len(texts(page, USER)) == 2 and len(texts(page, BOT)) == 2  # the history is kept
    page.locator("#regenerate").click()
    time.sleep(0.5)
    wait_until_still(page, BOT)
    assert len(texts(page, USER)) == 2 and len(texts(page, BOT)) == 2  # the last answer replaced, not added
    page.locator("#clear").click()
    page.wait_for_function("() => document.querySelectorAll('#chatbot .message-row').length === 0")


def test_stop_ends_the_generation_in_the_engine(page, server):
    set_max_tokens(page, 2048)
    send(page, "Write a very long story about a dragon who learns to bake bread, in ten chapters.")
    page.locator(BOT).first.wait_for()
    page.wait_for_function("s => (document.querySelector(s)?.innerText || '').trim().length > 0", arg=BOT)
    assert running(server, CHAT) == 1
    page.locator("#stop").click()
    deadline = time.monotonic() + 10
    while running(server, CHAT) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert running(server, CHAT) == 0  # the sequence left the engine, not only the screen
    stopped = texts(page, BOT)[-1]
    time.sleep(1.5)
    assert texts(page, BOT)[-1] == stopped
    page.locator("#clear").click()


def test_a_busy_model_is_said_in_the_chat(page, server):
    """The one-slot model with one request running and one waiting: the UI's request gets a 429."""
    client = openai.OpenAI(base_url=server.v1, api_key="x", max_retries=0, timeout=120)
    hold = threading.Event()
    long = dict(model=ONE_SLOT, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=400,
                stream=True, extra_body={"min_tokens": 400})

    def occupy():
        stream = client.chat.completions.create(**long)
        next(iter(stream))
        hold.wait(120)
        stream.close()

    threads = [threading.Thread(target=occupy) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            stats = httpx.get(server.v1 + "/stats").json()["data"][ONE_SLOT]
            if stats["running"] == 1 and stats["waiting"] == 1:
                break
            time.sleep(0.2)
        choose_model(page, ONE_SLOT)
        send(page, "Hello?")
        notice = page.locator("#chatbot").get_by_text("at capacity")
        notice.wait_for()
        assert page.locator("#chatbot code", has_text=ONE_SLOT).count() >= 1  # Markdown rendered
    finally:
        hold.set()
        for t in threads:
            t.join(60)
        client.close()
    send(page, "Hello again?")  # the page keeps working
    page.locator(BOT).nth(1).wait_for()


def test_adapters_are_in_the_model_list_and_answer(page, server):
    """The page lists the LoRA adapters beside the models (the shared server lists in reload mode)."""
    page.locator("#clear").click()
    choose_model(page, LORA_ALL)
    send(page, "Hello")
    page.locator(BOT).first.wait_for()
    assert "⚠️" not in wait_until_still(page, BOT)
    assert httpx.get(server.v1 + "/stats").json()["data"][LORA_BASE]["adapters"][LORA_ALL]["tokens_generated"] > 0


def idle(page) -> None:
    """Until no answer runs: the input takes text again."""
    page.wait_for_function("() => !document.querySelector('#chat-input textarea').disabled", timeout=120_000)


def test_no_message_is_lost_while_an_answer_streams(page, server):
    """During a stream the input and Send are disabled (a message sent then used to vanish) and Stop is
    the one active button; after it, the next message is sent and answered."""
    page.locator("#clear").click()
    choose_model(page, CHAT)
    set_max_tokens(page, 2048)
    send(page, "Write a very long story about a lighthouse keeper, in ten chapters.")
    page.wait_for_function("s => (document.querySelector(s)?.innerText || '').trim().length > 0", arg=BOT)
    box = page.locator("#chat-input textarea")
    assert box.is_disabled() and page.locator("#send").is_disabled() and page.locator("#stop").is_enabled()
    assert box.get_attribute("placeholder") == "Wait for the answer, or stop it"
    page.locator("#stop").click()
    idle(page)
    assert page.locator("#stop").is_disabled() and page.locator("#send").is_enabled()
    set_max_tokens(page, 24)
    send(page, "Thanks! And in one sentence?")
    page.locator(BOT).nth(1).wait_for()
    idle(page)
    assert texts(page, USER) == ["Write a very long story about a lighthouse keeper, in ten chapters.",
                                 "Thanks! And in one sentence?"]
    assert "tokens/s" in texts(page, BOT)[-1] and CHAT in texts(page, BOT)[-1]  # the answer's statistics


def test_edit_a_sent_message_and_get_a_new_answer(page, server):
    page.locator("#clear").click()
    send(page, "What is the capital of France?")
    page.locator(BOT).first.wait_for()
    idle(page)
    page.locator(USER).first.hover()
    page.locator("#chatbot button[aria-label=Edit]").first.click()
    page.locator("#chatbot textarea").fill("What is the capital of Germany?")
    page.locator("#chatbot button[aria-label=Submit]").first.click()
    page.wait_for_function("() => document.querySelector('#chat-input textarea').disabled", timeout=30_000)
    idle(page)
    assert texts(page, USER) == ["What is the capital of Germany?"]  # the edited turn replaced the old one
    assert len(texts(page, BOT)) == 1 and "⚠️" not in texts(page, BOT)[0]


def test_use_via_api_shows_the_openai_client_for_the_chosen_model(page, server):
    page.get_by_text("Use via API").click()
    snippet = page.locator("#api-snippet")
    snippet.get_by_text("base_url").wait_for()
    assert f'model="{CHAT}"' in snippet.inner_text()
    choose_model(page, LORA_ALL)
    page.wait_for_function("m => document.querySelector('#api-snippet').innerText.includes(m)",
                           arg=f'model="{LORA_ALL}"')
    assert "/v1" in snippet.inner_text()


def test_statistics_and_notices_never_reach_the_model():
    from ui.answer import conversation, notice, stats_line

    history = [{"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Hello!" + stats_line(CHAT, 3, 0.1, 0.05)},
               {"role": "user", "content": "Again"}, notice("busy")]
    assert conversation(history) == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                                     {"role": "user", "content": "Again"}]
    assert stats_line(CHAT, 3, 0.1, 0.05).endswith("3 tokens · 30.0 tokens/s · first token 0.05 s*")


def option_texts(page) -> list[str]:
    """The open dropdown's options (the chosen one marked with a check, left out here)."""
    return [t.replace("✓", "").strip() for t in page.get_by_role("option").all_inner_texts()]


def test_history_survives_a_reload_and_chats_reopen_rename_export_and_delete(page, server):
    page.locator("#clear").click()  # "New chat": the chat before stays in the history
    choose_model(page, CHAT)
    stored = "() => localStorage.getItem('bentochat-history')"
    before = page.evaluate(stored)
    send(page, "Name a river in Europe.")
    page.locator(BOT).first.wait_for()
    idle(page)
    # The browser writes its local storage once the page has the new history: then reload.
    page.wait_for_function(f"b => ({stored})() !== b", arg=before)
    page.reload()
    page.locator(USER).first.wait_for()  # the newest chat is open again
    assert texts(page, USER) == ["Name a river in Europe."] and "tokens/s" in texts(page, BOT)[0]
    page.get_by_text("History").first.click()
    title = page.locator("#chat-title textarea")
    assert title.input_value() == "Name a river in Europe."
    title.fill("Rivers")
    title.press("Enter")
    page.wait_for_function("() => document.querySelector('#history-list input').value === 'Rivers'")

    page.locator("#export-json").click()
    link = page.locator("#exported a").first
    link.wait_for()
    exported = httpx.get(link.get_attribute("href"), timeout=30).json()
    assert exported["title"] == "Rivers" and exported["model"] == CHAT
    assert exported["messages"][0] == {"role": "user", "content": "Name a river in Europe."}
    assert "📊" not in exported["messages"][1]["content"]  # as a client would send it back
    page.locator("#export-md").click()
    page.wait_for_function("() => (document.querySelector('#exported a')?.href || '').endsWith('.md')")
    markdown = httpx.get(page.locator("#exported a").first.get_attribute("href"), timeout=30).text
    assert markdown.startswith("# Rivers") and "Name a river in Europe." in markdown

    # An older chat of this page reopens from the list; the one deleted leaves it.
    page.locator("#history-list input").click()
    options = option_texts(page)
    assert options[0] == "Rivers" and len(options) > 1
    page.get_by_role("option", name=options[1], exact=True).click()
    page.wait_for_function("t => document.querySelector('#chat-title textarea').value === t", arg=options[1])
    assert texts(page, USER) and texts(page, USER) != ["Name a river in Europe."]
    page.locator("#delete-chat").click()
    page.wait_for_function("() => document.querySelectorAll('#chatbot .message-row').length === 0")
    page.locator("#history-list input").click()
    assert options[1] not in option_texts(page)
    page.keyboard.press("Escape")


def test_history_store_keeps_the_newest_first():
    from ui import history

    store, first = history.save(None, None, CHAT, [{"role": "user", "content": "one " * 20}])
    store, second = history.save(store, None, CHAT, [{"role": "user", "content": [{"type": "text", "text": "two"}]}])
    assert [c for c, _ in history.choices(store)] == ["two", "one one one one one one one one one one…"]
    turns = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "1"}]
    store, _ = history.save(store, first, CHAT, turns)
    assert history.choices(store)[0] == ("one one one one one one one one one one…", first)  # its title kept, first
    assert history.choices(history.rename(store, second, " Two  "))[1] == ("Two", second)
    assert [i for _, i in history.choices(history.delete(store, first))] == [second]


def wait_for_both_answers(page, prefix: str) -> None:
    page.wait_for_function(f"() => document.querySelector('#{prefix}-input textarea').disabled", timeout=30_000)
    page.wait_for_function(f"() => !document.querySelector('#{prefix}-input textarea').disabled", timeout=120_000)


def test_side_by_side_streams_two_models_at_once(page, server):
    page.get_by_role("tab", name="Side by side").click()
    page.locator("#sbs-model-b input").click()
    page.get_by_role("option", name=TINY_LONG, exact=True).click()
    set_max_tokens(page, 48, "sbs-max-tokens")
    box = page.locator("#sbs-input textarea")
    box.fill("Tell me about mountains and rivers.")
    box.press("Enter")
    page.wait_for_function("() => document.querySelector('#sbs-input textarea').disabled", timeout=30_000)
    # Both answers show while the round still runs (the slower one growing): they stream at once.
    page.wait_for_function("""() => document.querySelector('#sbs-input textarea').disabled
        && ['a', 'b'].every(s => (document.querySelector(`#sbs-chatbot-${s} .bot-row`)?.innerText || '').trim())""",
                           timeout=60_000)
    wait_for_both_answers(page, "sbs")
    for side in ("a", "b"):
        answers = texts(page, f"#sbs-chatbot-{side} .bot-row")
        assert answers and "tokens/s" in answers[0]
    page.locator("#sbs-tievote").click()
    page.wait_for_function("() => document.querySelector('#sbs-tievote').disabled")
    votes = [r for r in conversation_records(server) if r["type"] == "tievote"]
    assert votes and votes[-1]["models"] == [CHAT, TINY_LONG] and votes[-1]["anony"] is False


def conversation_records(server) -> list[dict]:
    import json

    return [json.loads(line) for path in sorted(server.ui_log_dir.glob("conv-*.json"))
            for line in path.read_text(encoding="utf-8").splitlines()]


def test_arena_hides_the_names_until_the_vote_and_the_leaderboard_counts_it(page, server):
    page.get_by_role("tab", name="Arena").click()
    set_max_tokens(page, 24, "arena-max-tokens")
    names = page.locator("#arena-names")
    assert "hidden" in names.inner_text()
    assert page.locator("#arena-leftvote").is_disabled()  # nothing to vote on yet
    box = page.locator("#arena-input textarea")
    box.fill("Say hello.")
    box.press("Enter")
    wait_for_both_answers(page, "arena")
    assert "hidden" in names.inner_text()
    answers = texts(page, "#arena-chatbot-a .bot-row") + texts(page, "#arena-chatbot-b .bot-row")
    assert "Model A ·" in answers[0] and "Model B ·" in answers[1]  # the statistics do not name them either
    page.locator("#arena-leftvote").click()
    page.wait_for_function("() => document.querySelector('#arena-names').innerText.includes('Model A:')")
    vote = [r for r in conversation_records(server) if r["type"] == "leftvote" and r["anony"]][-1]
    shown = names.inner_text()
    assert f"Model A: {vote['models'][0]}" in shown and f"Model B: {vote['models'][1]}" in shown
    assert box.is_disabled()  # no more blind votes on a known pair: a new round first
    assert [s["messages"][0]["content"] for s in vote["states"]] == ["Say hello.", "Say hello."]
    assert not any("key" in k.lower() for r in conversation_records(server) for k in r)  # never API keys

    page.get_by_role("tab", name="Leaderboard").click()
    page.locator("#leaderboard-refresh").click()
    page.wait_for_function("models => models.every(m => document.querySelector('#leaderboard').innerText.includes(m))",
                           arg=vote["models"])
    page.screenshot(path=str(ARTIFACTS / "ui-leaderboard.png"), full_page=True)
    page.get_by_role("tab", name="Arena").click()
    page.locator("#arena-new").click()
    idle_box = "() => !document.querySelector('#arena-input textarea').disabled"
    page.wait_for_function(idle_box)
    assert "hidden" in names.inner_text() and not texts(page, "#arena-chatbot-a .bot-row")
    page.get_by_role("tab", name="Direct chat").click()


def test_elo_follows_fastchat():
    from ui.arena import compute_elo, leaderboard

    rating = compute_elo([("a", "b", "model_a")])
    assert rating == {"a": 1002.0, "b": 998.0}  # K=4, from 1000: half of K each way
    assert compute_elo([("a", "b", "tie")]) == {"a": 1000.0, "b": 1000.0}
    records = [{"type": "leftvote", "anony": True, "models": ["a", "b"]},
               {"type": "rightvote", "anony": True, "models": ["c", "a"]},
               {"type": "leftvote", "anony": False, "models": ["b", "a"]}]  # side by side: not rated
    assert [row[1] for row in leaderboard(records)] == ["a", "c", "b"]  # c lost to a stronger a than b did
    assert leaderboard(records)[0][3:] == [2, 2]  # a: two votes, two wins



# Links a model, a pasted prompt or a planted history could put one click away; and two the page keeps.
SCRIPTED = ("[click me](javascript:alert(1)) <a href=\"javascript:alert(2)\">html link</a> "
            "$$\\href{javascript:alert(3)}{tex link}$$ [file](file:///etc/passwd) [app](ms-msdt:x) "
            "![pixel](data:image/png;base64,iVBORw0KGgo=)\n\n"
            '<svg width="90" height="20"><a href="javascript:alert(4)"><text x="0" y="15">svg link</text></a></svg>'
            "\n\n[ok](https://example.com/) [mail](mailto:a@example.com) [ref][1]\n\n[1]: javascript:alert(5)")
WEB = ("http:", "https:", "mailto:")


def unsafe_urls(page) -> list[str]:
    """Every link, image or other URL in the page's messages that is not http, https or mailto."""
    return page.evaluate("""web => [...document.querySelectorAll('.message *')].flatMap(e => [...e.attributes]
        .filter(a => ['href', 'xlink:href', 'src', 'srcset', 'poster', 'action', 'formaction'].includes(a.name))
        .filter(a => !web.includes(new URL(a.value, document.baseURI).protocol))
        .map(a => `${e.tagName} ${a.name}=${a.value}`))""", list(WEB))


def rendered_urls(markdown: str) -> list[str]:
    """The links and images of ``markdown`` as a viewer that trusts every URL and raw HTML renders it."""
    import re

    from markdown_it import MarkdownIt

    viewer = MarkdownIt("commonmark", {"html": True})
    viewer.validateLink = lambda url: True
    return re.findall(r"(?:href|src)=\"([^\"]*)\"", viewer.render(markdown))


def browser_state(value, secret: str) -> str:
    """``value`` as Gradio's BrowserState keeps it in local storage: an unused IV, then crypto-js AES
    with the SHA-256 of the secret as passphrase (key and IV derived as OpenSSL's EVP_BytesToKey does)."""
    import base64
    import hashlib
    import json
    import os

    from cryptography.hazmat.primitives import padding
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    passphrase, salt, derived = hashlib.sha256(secret.encode()).hexdigest().encode(), os.urandom(8), b""
    while len(derived) < 48:
        derived += hashlib.md5(derived[-16:] + passphrase + salt).digest()
    padder = padding.PKCS7(128).padder()
    plain = padder.update(json.dumps(value).encode()) + padder.finalize()
    encryptor = Cipher(algorithms.AES(derived[:32]), modes.CBC(derived[32:48])).encryptor()
    sealed = b"Salted__" + salt + encryptor.update(plain) + encryptor.finalize()
    return base64.b64encode(os.urandom(16)).decode() + ":" + base64.b64encode(sealed).decode()


def assert_links_only_to_the_web(page, message) -> None:
    """``message`` (a locator) shows SCRIPTED, its web links kept; the page's messages link nowhere else,
    and a click on each of SCRIPTED's other links runs no script."""
    assert message.locator("svg").count() == 1 and message.locator(".katex").count() == 1  # HTML, LaTeX rendered
    assert message.locator("a[href='https://example.com/']").count() == 1
    assert message.locator("a[href='mailto:a@example.com']").count() == 1
    assert unsafe_urls(page) == []
    ran = []

    def dismiss(dialog):
        ran.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", dismiss)
    try:
        for target in [message.get_by_text(text, exact=True) for text in ("click me", "html link", "svg link", "file",
                                                                          "app", "ref")] + [message.locator(".katex")]:
            target.first.click()
        time.sleep(1)
    finally:
        page.remove_listener("dialog", dismiss)
    assert ran == [] and len(page.context.pages) == 1


def exported(page, button: str) -> httpx.Response:
    """The file that a click on the export ``button`` offers (a new one: each export is a file of its own)."""
    before = page.evaluate("() => document.querySelector('#exported a')?.href || ''")
    page.locator(button).click()
    page.wait_for_function("b => (document.querySelector('#exported a')?.href || b) !== b", arg=before)
    return httpx.get(page.locator("#exported a").first.get_attribute("href"), timeout=30)


def test_messages_history_and_exports_link_only_to_the_web(page, server):
    """A user message and a model answer (a planted history, reopened) with javascript:, file:, an app's
    scheme, an SVG link, KaTeX's \\href and a data: image: in the chat, the history, side by side and the
    Markdown export, only http, https and mailto links remain, and no click runs a script."""
    page.get_by_role("tab", name="Direct chat").click()
    page.locator("#clear").click()
    choose_model(page, CHAT)
    set_max_tokens(page, 16)
    send(page, SCRIPTED)
    page.locator(BOT).first.wait_for()
    idle(page)
    assert_links_only_to_the_web(page, page.locator(USER).last)

    if not page.locator("#export-md").is_visible():
        page.get_by_text("History").first.click()
    markdown = exported(page, "#export-md").text
    assert SCRIPTED in markdown  # as its source
    assert [url for url in rendered_urls(markdown) if not url.startswith(WEB)] == []
    assert exported(page, "#export-json").json()["messages"][0]["content"] == SCRIPTED  # data, as the API takes it

    # The model's answer, as the page shows it from the history in the browser's local storage.
    planted = {"chats": [{"id": "planted", "title": "Planted", "model": CHAT, "updated": time.time(),
                          "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": SCRIPTED}]}]}
    page.evaluate("v => localStorage.setItem('bentochat-history', v)", browser_state(planted, "bentochat-history"))
    page.reload()
    page.locator(BOT).get_by_text("svg link").wait_for()
    assert_links_only_to_the_web(page, page.locator(BOT).last)
    if not page.locator("#export-md").is_visible():
        page.get_by_text("History").first.click()
    markdown = exported(page, "#export-md").text
    assert markdown.startswith("# Planted")
    assert [url for url in rendered_urls(markdown) if not url.startswith(WEB)] == []

    page.get_by_role("tab", name="Side by side").click()
    set_max_tokens(page, 16, "sbs-max-tokens")
    box = page.locator("#sbs-input textarea")
    box.fill(SCRIPTED)
    box.press("Enter")
    wait_for_both_answers(page, "sbs")
    for side in ("a", "b"):
        assert_links_only_to_the_web(page, page.locator(f"#sbs-chatbot-{side} .user-row").last)
    page.get_by_role("tab", name="Direct chat").click()


def test_the_markdown_export_writes_other_links_as_source():
    from ui.history import to_markdown

    risky = [SCRIPTED, "[x](&#106;avascript:alert(1))", "<javascript:alert(1)>", "[x]( <file:///etc>)",
             "[x][a]\n\n[a]: data:text/html,x", "![x](data:image/png;base64,iVBORw0KGgo=)", "<img src=x>",
             "```\n[x](javascript:alert(1))\n```", "` ``` `[x](javascript:alert(1))"]
    for text in risky:
        markdown = to_markdown({"title": text, "model": "`[m](javascript:alert(1))`",  # a history can be planted
                                "messages": [{"role": text, "content": text}]})
        assert [url for url in rendered_urls(markdown) if not url.startswith(WEB)] == [], text
    safe = "**Yes**: see [the docs](https://example.com/a_(b)) or [mail](mailto:a@example.com), `a < b`, a [1]."
    assert to_markdown({"title": safe, "model": CHAT, "messages": [{"role": "user", "content": safe}]}) == (
        f"# {safe}\n\nModel: `{CHAT}`\n\n**user**\n\n{safe}\n")
