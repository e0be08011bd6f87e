"""One answer on the chat page, as it grows: the conversation rendered with the model's template and
run on its runners through the API's own chat path (``reply``); what went wrong said in the chat;
the answer's statistics last. The direct chat tab and the side by side and arena tabs all answer so."""

from __future__ import annotations

import logging
import time

from openai_api.chat import prepare_chat
from openai_api.errors import OpenAIError
from openai_api.protocol import ChatCompletionRequest
from openai_api.text_stream import generate_text
from ui import history as chats

logger = logging.getLogger("bentochat.ui")

NO_MODEL = "No chat model is available right now. Reload the page when one is up."
NOTICE = "⚠️ "
STATS = "\n\n*📊 "  # an answer's statistics follow this, at its end; never sent to the model


def notice(text: str) -> dict:
    """An assistant message that tells the user what went wrong; never sent to the model."""
    return {"role": "assistant", "content": NOTICE + text}


def stats_line(model_id: str, tokens: int, seconds: float, first_token_s: float | None) -> str:
    """``STATS`` and what one answer took: model, tokens, tokens/s, time to first token."""
    rate = f"{tokens / seconds:.1f} tokens/s" if seconds > 0 and tokens else "- tokens/s"
    first = f"first token {first_token_s:.2f} s" if first_token_s is not None else "no token"
    return f"{STATS}{model_id} · {tokens} tokens · {rate} · {first}*"


def conversation(history: list[dict]) -> list[dict]:
    """The conversation as chat messages: the model's own turns, without the UI's notices."""
    messages = [{"role": m["role"], "content": chats.text_of(m.get("content")).split(STATS)[0]} for m in history]
    return [m for m in messages if not m["content"].startswith(NOTICE)]


async def reply(registry, model_id: str | None, history: list[dict], system: str = "", temperature: float = 0.7,
                top_p: float = 1.0, max_tokens: int = 512, shown_as: str | None = None, account=None):
    """The conversation ``history`` (ending with a user turn) as the answer of ``model_id`` grows, and
    last with the answer's statistics, which name the model ``shown_as`` (the arena hides it); what goes
    wrong is said in the chat (busy, down, too long, a budget spent). ``account``: the signed-in key's
    (a ``quotas.Account``), whose tenant's quotas admit the answer and count its tokens, as the API's."""
    if not history or history[-1]["role"] != "user":
        yield history
        return
    if not model_id:
        yield history + [notice(NO_MODEL)]
        return
    messages = ([{"role": "system", "content": system}] if (system or "").strip() else []) + conversation(history)
    history = history + [{"role": "assistant", "content": ""}]
    tokens, first, start, status = 0, None, time.monotonic(), 499  # 499 unless it ends: Stop
    try:
        model = registry.get(model_id, "chat")
        request = ChatCompletionRequest(model=model_id, messages=messages, temperature=temperature, top_p=top_p,
                                        max_tokens=max(1, int(max_tokens)))
        # The slider's max_tokens is cut to what the context leaves, rather than refused.
        prompt_ids, params = prepare_chat(model.info, request, fit_context=True)
        if account is not None:
            account.admit(model.id, model.info.id, len(prompt_ids), params.max_tokens)
        start = time.monotonic()
        async for event in generate_text(model, prompt_ids, params, account=account):
            if first is None and event.completion_tokens:
                first = time.monotonic()
            tokens = event.completion_tokens
            history[-1]["content"] += event.text
            yield history
        status = 200
    except Exception as e:  # busy (429), down (503), too long (400), a budget spent (429): said in the chat
        status = e.status if isinstance(e, OpenAIError) else 500
        if not isinstance(e, OpenAIError):
            logger.exception("UI answer with %s failed", model_id)
        if not history[-1]["content"]:
            history = history[:-1]
        yield history + [notice(e.message if isinstance(e, OpenAIError) else "Generation failed; see the server log.")]
        return
    finally:
        if account is not None:
            account.close(status)
    if not history[-1]["content"]:
        history[-1]["content"] = "(empty answer)"
    decoding = time.monotonic() - first if first is not None else 0.0
    history[-1]["content"] += stats_line(shown_as or model_id, tokens, decoding, first - start if first else None)
    yield history
