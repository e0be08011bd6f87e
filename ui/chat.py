"""The Gradio chat page: pick a model, chat with streamed answers, stop, regenerate, edit a sent
message and resend it, clear; each answer with its statistics; past chats kept in the browser to
reopen, rename, delete and export (``history.py``); how to call the model from the openai client.

The page keeps the conversation in the browser (the chatbot's messages); every answer renders the
whole history with the model's chat template, as an API client sending the same messages would get.
While an answer streams, the input is disabled and Stop is the one thing to press.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from pathlib import Path

import gradio as gr
from fastapi import FastAPI
from starlette.routing import Mount

from middleware import FailedAttempts, UiSignIn
from models.tenants import key_digest
from quotas import Sessions
from ui import arena
from ui import history as chats
from ui.answer import conversation, reply
from ui.links import PAGE_SCRIPT

WAITING = "Wait for the answer, or stop it"
PLACEHOLDER = "Type a message and press Enter"
# The chatbot fills the window but for the page's top (title, tabs, history, model: about 270 px) and the
# input row below it, so the input and Stop are in view without scrolling down to them (1280x800 too);
# never smaller than CHATBOT_MIN_HEIGHT (a short window scrolls instead).
CHATBOT_HEIGHT = "calc(100vh - 370px)"
CHATBOT_MIN_HEIGHT = 240
FAVICON = Path(__file__).with_name("favicon.svg")
# Gradio's index.html links no icon (a browser would ask the server's root /favicon.ico, not the page's):
# the page's head links its own /favicon.ico route (serving FAVICON, and let through by
# middleware.UiSignIn without a session), relative to the page (its <base> is the page's own path).
FAVICON_LINK = '<link rel="icon" type="image/svg+xml" href="favicon.ico">'


def api_snippet(model_id: str | None) -> str:
    """How to call ``model_id`` from the openai client, for the page's "Use via API" box."""
    return (f"""The chat above runs on BentoChat's OpenAI-compatible API at `/v1` of this server:

```python
from openai import OpenAI

client = OpenAI(base_url="http://<this server>/v1", api_key="<your key, or anything when none is set>")
answer = client.chat.completions.create(
    model="{model_id or '<model>'}",
    messages=[{{"role": "user", "content": "Hello!"}}],
    stream=True,
)
for chunk in answer:
    print(chunk.choices[0].delta.content or "", end="")
```

`GET /v1/models` lists the models; `/v1/openapi.json` describes every route.""")


def build_chat_ui(registry: Callable[[], object], chat_models: list[str], model_list_mode: str,
                  log_dir: str | None = None, sessions: Sessions | None = None) -> gr.Blocks:
    """``registry()`` gives the gateway's model registry once it is up; ``chat_models`` are the
    configured chat model ids and their adapters' (the list in ``once`` mode); votes and the side by
    side and arena tabs' answers are logged in ``log_dir`` (None: not logged). ``sessions``: with keys,
    the signed-in sessions, whose answers count to their key's tenant, which sees its budget left."""
    log = arena.ConversationLog(log_dir)

    def account(request: gr.Request | None):
        """A new account of the signed-in key's tenant, for one answer; None without keys."""
        return sessions.account(request.headers.get("cookie")) if sessions and request else None

    def budget(request: gr.Request):
        """The signed-in tenant's budgets left, where it has any."""
        text = (acc := account(request)) and acc.budget_text()
        return gr.Markdown(f"Budget of `{acc.tenant.name}`: {text}" if text else "", visible=bool(text))

    def available_models() -> list[str]:
        if model_list_mode == "once":
            return chat_models
        # reload: the models whose runners answer the gateway's health polls now, with the adapters
        # they serve (those loaded at run time too)
        up = [m.id for m in registry().models() if m.kind == "chat"] + [a.name for a in registry().adapters()]
        return [m for m in chat_models if m in up] + [m for m in up if m not in chat_models]

    async def on_load(current: str | None):
        models = available_models()
        value = current if current in models else (models[0] if models else None)
        return gr.Dropdown(choices=models, value=value), gr.Chatbot(label=value or "no model"), api_snippet(value)

    def add_user_turn(text: str, history: list[dict]):
        if not text.strip():
            return "", history
        return "", history + [{"role": "user", "content": text}]

    def edit_user_turn(history: list[dict], edit: gr.EditData):
        """The conversation up to the edited message, which is now the last, with its new text."""
        text = edit.value if isinstance(edit.value, str) else chats.text_of(edit.value)
        return history[:edit.index] + [{"role": "user", "content": text}]

    def busy():
        """While an answer streams: no new message (it would be lost), Stop active."""
        return (gr.Textbox(interactive=False, placeholder=WAITING), gr.Button(interactive=False),
                gr.Button(interactive=True))

    def idle():
        return (gr.Textbox(interactive=True, placeholder=PLACEHOLDER), gr.Button(interactive=True),
                gr.Button(interactive=False))

    async def answer(model_id: str | None, system: str, temperature: float, top_p: float, max_tokens: int,
                     history: list[dict], request: gr.Request):
        async for updated in reply(registry(), model_id, history, system, temperature, top_p, max_tokens,
                                   account=account(request)):
            yield updated

    def drop_last_answer(history: list[dict]) -> list[dict]:
        """For regenerate: back to the last user turn."""
        while history and history[-1]["role"] != "user":
            history = history[:-1]
        return history

    def remember(store: dict, chat_id: str | None, model_id: str | None, messages: list[dict]):
        """Keep the open chat in the browser's history (a new entry for a new chat)."""
        store, chat_id = chats.save(store, chat_id, model_id, messages)
        chat = chats.find(store, chat_id)
        return store, chat_id, gr.Dropdown(choices=chats.choices(store), value=chat_id), chat["title"] if chat else ""

    def reopen(store: dict, chat_id: str | None, current_model: str | None):
        """The chat picked in the history list, in the chatbot (on its model, if that is still served)."""
        chat = chats.find(store, chat_id)
        if chat is None:
            return [], None, current_model, ""
        model_id = chat.get("model") if chat.get("model") in available_models() else current_model
        return chat["messages"], chat_id, model_id, chat["title"]

    def restore(store: dict, current_model: str | None, shown: list[dict]):
        """At page load: the list of past chats, and the newest one open, unless a chat began already
        (a message sent before the page had loaded)."""
        newest = (store or chats.EMPTY)["chats"][:1]
        if shown or not newest:  # left as it is: a chat under way (maybe streaming), or nothing to restore
            return gr.Dropdown(choices=chats.choices(store)), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        messages, chat_id, model_id, title = reopen(store, newest[0]["id"] if newest else None, current_model)
        return gr.Dropdown(choices=chats.choices(store), value=chat_id), messages, chat_id, model_id, title

    def forget(store: dict, chat_id: str | None):
        store = chats.delete(store, chat_id)
        return store, None, [], gr.Dropdown(choices=chats.choices(store), value=None), ""

    def retitle(store: dict, chat_id: str | None, title: str):
        store = chats.rename(store, chat_id, title)
        return store, gr.Dropdown(choices=chats.choices(store), value=chat_id)

    def export(store: dict, chat_id: str | None, kind: str):
        chat = chats.find(store, chat_id)
        if chat is None:
            gr.Warning("Open a chat from the history first.")
            return gr.File(visible=False)
        if kind == "json":  # the conversation as a client would send it: no statistics, no notices
            chat = dict(chat, messages=conversation(chat["messages"]))
        return gr.File(value=chats.export(chat, kind), visible=True)

    with gr.Blocks(title="BentoChat") as blocks:
        gr.Markdown("## BentoChat")
        with gr.Tabs(elem_id="tabs"):
            with gr.Tab("Direct chat", id="direct", elem_id="tab-direct"):
                # Every chat, in this browser's local storage (the server keeps none).
                store = gr.BrowserState(chats.EMPTY, storage_key="bentochat-history", secret="bentochat-history")
                current = gr.State(None)  # the open chat's id in the history; None: a new chat
                with gr.Accordion("History", open=False, elem_id="history"):
                    with gr.Row():
                        history_list = gr.Dropdown(choices=[], value=None, label="Past chats", elem_id="history-list",
                                                   scale=3, interactive=True)
                        title = gr.Textbox(label="Title (Enter renames)", elem_id="chat-title", scale=3)
                    with gr.Row():
                        delete = gr.Button("Delete chat", elem_id="delete-chat", size="sm")
                        export_json = gr.Button("Export JSON", elem_id="export-json", size="sm")
                        export_md = gr.Button("Export Markdown", elem_id="export-md", size="sm")
                    exported = gr.File(label="Exported chat", elem_id="exported", interactive=False, visible=False)
                with gr.Row():
                    model = gr.Dropdown(choices=chat_models, value=chat_models[0] if chat_models else None,
                                        label="Model", elem_id="chat-model", interactive=True)
                left = gr.Markdown("", visible=False, elem_id="budget")  # the signed-in tenant's budgets
                chatbot = gr.Chatbot(label=chat_models[0] if chat_models else "no model", elem_id="chatbot",
                                     height=CHATBOT_HEIGHT, min_height=CHATBOT_MIN_HEIGHT,
                                     buttons=["copy"], editable="user")
                # The input and every button of a chat in one row, so Stop is in view while an answer
                # streams (on a narrow screen the row wraps).
                with gr.Row(equal_height=True):
                    text = gr.Textbox(placeholder=PLACEHOLDER, show_label=False, container=False, scale=8,
                                      min_width=280, elem_id="chat-input", autofocus=True)
                    send = gr.Button("Send", variant="primary", scale=1, min_width=130, elem_id="send")
                    stop = gr.Button("Stop", scale=1, min_width=130, elem_id="stop", interactive=False)
                    regenerate = gr.Button("Regenerate", scale=1, min_width=130, elem_id="regenerate")
                    clear = gr.Button("New chat", scale=1, min_width=130, elem_id="clear")
                with gr.Accordion("Parameters", open=False):
                    system = gr.Textbox(label="System prompt", lines=2, elem_id="system-prompt")
                    temperature = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature")
                    top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top p")
                    max_tokens = gr.Slider(16, 2048, value=512, step=16, label="Max new tokens", elem_id="max-tokens")
                with gr.Accordion("Use via API", open=False, elem_id="use-via-api"):
                    snippet = gr.Markdown(api_snippet(chat_models[0] if chat_models else None), elem_id="api-snippet")

                settings = [model, system, temperature, top_p, max_tokens]
                controls = [text, send, stop]
                kept, kept_out = [store, current, model, chatbot], [store, current, history_list, title]
                running = []
                for event, prepare, inputs in ((text.submit, add_user_turn, [text, chatbot]),
                                               (send.click, add_user_turn, [text, chatbot]),
                                               (regenerate.click, drop_last_answer, [chatbot]),
                                               (chatbot.edit, edit_user_turn, [chatbot])):
                    outputs = [text, chatbot] if prepare is add_user_turn else [chatbot]
                    answering = (event(prepare, inputs, outputs, queue=False).then(busy, None, controls, queue=False)
                                 .then(answer, settings + [chatbot], chatbot))
                    answering.then(budget, None, left, queue=False)
                    # Kept in the history first: once the input is back, a reload finds the chat.
                    answering.then(remember, kept, kept_out, queue=False).then(idle, None, controls, queue=False)
                    running.append(answering)
                # Cancelling the answer's event closes its generator, which aborts the sequence in the engine.
                stop.click(remember, kept, kept_out, cancels=running, queue=False).then(idle, None, controls,
                                                                                       queue=False)
                # Clear starts a new chat; the one before stays in the history.
                clear.click(lambda: ([], None, gr.Dropdown(value=None), ""), None,
                            [chatbot, current, history_list, title],
                            cancels=running, queue=False).then(idle, None, controls, queue=False)
                history_list.input(reopen, [store, history_list, model], [chatbot, current, model, title],
                                   cancels=running,
                                   queue=False).then(idle, None, controls, queue=False)
                title.submit(retitle, [store, current, title], [store, history_list], queue=False)
                delete.click(forget, [store, current], [store, current, chatbot, history_list, title], cancels=running,
                             queue=False).then(idle, None, controls, queue=False)
                export_json.click(lambda s, c: export(s, c, "json"), [store, current], exported, queue=False)
                export_md.click(lambda s, c: export(s, c, "md"), [store, current], exported, queue=False)
                model.change(lambda m: (gr.Chatbot(label=m or "no model"), api_snippet(m)), model, [chatbot, snippet],
                             queue=False)
            with gr.Tab("Side by side", id="side-by-side", elem_id="tab-side-by-side"):
                arena.build_battle(registry, available_models, chat_models, log, anonymous=False, account=account)
            with gr.Tab("Arena", id="arena", elem_id="tab-arena"):
                arena.build_battle(registry, available_models, chat_models, log, anonymous=True, account=account)
            with gr.Tab("Leaderboard", id="leaderboard", elem_id="tab-leaderboard"):
                arena.build_leaderboard(log)
        blocks.load(budget, None, left, queue=False)
        blocks.load(on_load, model, [model, chatbot, snippet]).then(
            restore, [store, model, chatbot], [history_list, chatbot, current, model, title], queue=False)
    blocks.queue(default_concurrency_limit=None)  # the engine batches; the UI must not serialize
    # Gradio's queue looks for work every millisecond and for progress to send every 10 ms, with nobody on
    # the page too: 840 wake-ups a second in the gateway's event loop, 7 % of a core (2-core Xeon), time
    # that its streams and the engine's thread wait for. Every 20 and 100 ms: no wait a person sees.
    blocks._queue.sleep_when_free, blocks._queue.progress_update_sleep_when_free = 0.02, 0.1
    return blocks


def chat_ui_app(blocks: gr.Blocks, path: str, api_keys: Collection[str] = frozenset(),
                attempts: FailedAttempts | None = None, sessions: Sessions | None = None) -> FastAPI:
    """The page as an ASGI app to mount at ``path``. Gradio's own mounting is used (BentoML 1.4's
    ``bentoml.gradio`` predates Gradio 6's app set-up); BentoML runs the app's lifespan, which starts
    the Gradio queue. With API keys configured, the page asks for one at sign-in, as the API does,
    and failed sign-ins count in ``attempts`` with the API's wrong keys (``api_keys``: their SHA-256). The page's script keeps the
    links of its messages to http, https and mailto (``ui/links.py``)."""
    auth = (lambda _user, password: key_digest(password) in api_keys) if api_keys else None
    app = gr.mount_gradio_app(FastAPI(), blocks, path="/", root_path=path, ssr_mode=False,
                              footer_links=["gradio", "settings"], show_error=True, auth=auth,
                              favicon_path=str(FAVICON), head=FAVICON_LINK, js=PAGE_SCRIPT,
                              auth_message="Sign in with any user name and one of this server's API keys.")
    if api_keys:
        gradio_app = next(route.app for route in app.routes if isinstance(route, Mount))
        app.add_middleware(UiSignIn, gradio_app=gradio_app, attempts=attempts or FailedAttempts(), sessions=sessions)
    return app
