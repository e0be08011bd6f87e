"""Rendering a chat into prompt token ids.

The tokenizer's own Jinja ``chat_template`` comes first; a model without one gets a plain
role-prefixed fallback, logged so the operator knows the prompt is not the authors' format.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("bentochat.templates")

FALLBACK_NAME = "generic"


def template_name(tokenizer) -> str:
    return "tokenizer" if getattr(tokenizer, "chat_template", None) else FALLBACK_NAME


def render_chat(tokenizer, messages: list[dict]) -> list[int]:
    """``messages`` are ``{"role", "content"}`` dicts; returns the prompt ids ending in the assistant's turn."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # The template writes BOS and role tokens itself; encoding must not add them again.
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"
    return tokenizer(text)["input_ids"]


def warn_if_fallback(model_id: str, tokenizer) -> None:
    if template_name(tokenizer) == FALLBACK_NAME:
        logger.warning("model %s has no chat template; using the generic 'Role: text' fallback", model_id)
