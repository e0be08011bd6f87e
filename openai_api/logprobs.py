"""Token log-probabilities from the runner (``TokenEvent``s) in OpenAI's two shapes: chat's ``content`` list and
the legacy completions' parallel lists. Values are the model's own distribution, before penalties
and temperature."""

from __future__ import annotations

from openai_api.objects import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob
from runners.engine.sequence import TokenEvent


def _text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def chat_logprobs(tokenizer, entries: list[TokenEvent]) -> ChatLogprobs:
    def top(token_id, logprob):
        text = _text(tokenizer, token_id)
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

    return ChatLogprobs(content=[
        TokenLogprob(**top(e.token_id, e.logprob).model_dump(),
                     top_logprobs=[top(t, lp) for t, lp in e.top_logprobs])
        for e in entries
    ])


def completion_logprobs(tokenizer, entries: list[TokenEvent], offset: int = 0) -> CompletionLogprobs:
    """``offset``: where the first of ``entries`` starts in the choice's text (for streamed chunks)."""
    tokens = [_text(tokenizer, e.token_id) for e in entries]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return CompletionLogprobs(
        tokens=tokens, token_logprobs=[e.logprob for e in entries], text_offset=offsets,
        top_logprobs=[{_text(tokenizer, t): lp for t, lp in e.top_logprobs} for e in entries],
    )
