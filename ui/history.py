"""The chat page's history: every conversation kept in the browser's local storage (Gradio's
``BrowserState``), newest first, to reopen, rename, delete and export as JSON or Markdown. The server
keeps none of it.

A store is ``{"chats": [{"id", "title", "model", "messages", "updated"}, ...]}``, the newest first.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
import uuid
from pathlib import Path

from ui.links import markdown_block, markdown_line

EMPTY: dict = {"chats": []}
TITLE_CHARS = 40
MAX_CHATS = 200  # the oldest beyond are forgotten: local storage holds a few MB


def text_of(content) -> str:
    """A chatbot message's text: Gradio gives a string or a list of typed parts."""
    if isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else [content]
    return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in parts)


def title_of(messages: list[dict]) -> str:
    """A chat's default title: its first user message, cut short."""
    first = next((text_of(m.get("content")) for m in messages if m["role"] == "user"), "")
    first = " ".join(first.split())
    return (first[:TITLE_CHARS - 1] + "…" if len(first) > TITLE_CHARS else first) or "New chat"


def find(store: dict | None, chat_id: str | None) -> dict | None:
    return next((c for c in (store or EMPTY)["chats"] if c["id"] == chat_id), None)


def save(store: dict | None, chat_id: str | None, model: str | None, messages: list[dict]) -> tuple[dict, str | None]:
    """The store with chat ``chat_id`` holding ``messages`` (a new chat when ``chat_id`` is None), moved
    first; and the chat's id. A chat with no messages is not kept."""
    chats = [c for c in (store or EMPTY)["chats"] if c["id"] != chat_id]
    if not messages:
        return {"chats": chats}, chat_id
    old = find(store, chat_id)
    chat = {"id": chat_id or uuid.uuid4().hex[:12], "title": old["title"] if old else title_of(messages),
            "model": model, "messages": messages, "updated": time.time()}
    return {"chats": [chat, *chats][:MAX_CHATS]}, chat["id"]


def rename(store: dict | None, chat_id: str | None, title: str) -> dict:
    title = " ".join((title or "").split())[:200]
    chats = [dict(c, title=title or c["title"]) if c["id"] == chat_id else c for c in (store or EMPTY)["chats"]]
    return {"chats": chats}


def delete(store: dict | None, chat_id: str | None) -> dict:
    return {"chats": [c for c in (store or EMPTY)["chats"] if c["id"] != chat_id]}


def choices(store: dict | None) -> list[tuple[str, str]]:
    """(title, id) of every chat, newest first, for the history list."""
    return [(c["title"], c["id"]) for c in (store or EMPTY)["chats"]]


def to_markdown(chat: dict) -> str:
    """The chat as Markdown; a message with a link other than http(s) or mailto (or raw HTML) as its source."""
    lines = [f"# {markdown_line(chat['title'])}", "", markdown_line(f"Model: `{chat.get('model') or '-'}`"), ""]
    for m in chat["messages"]:
        lines += [f"**{markdown_line(m['role'])}**", "", markdown_block(text_of(m.get("content"))), ""]
    return "\n".join(lines)


def export(chat: dict, kind: str) -> str:
    """A file of ``chat`` as JSON (OpenAI's message shape) or Markdown, for the page to offer; its path."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", chat["title"]).strip("-")[:60] or "chat"
    path = Path(tempfile.mkdtemp(prefix="bentochat-export-")) / f"{name}.{'json' if kind == 'json' else 'md'}"
    if kind == "json":
        body = {"title": chat["title"], "model": chat.get("model"), "messages": chat["messages"]}
        path.write_text(json.dumps(body, ensure_ascii=False, indent=2), encoding="utf-8")
    else:
        path.write_text(to_markdown(chat), encoding="utf-8")
    return str(path)
