"""From a stream of token ids to the text a client sees: incremental detokenizing, stop strings."""

from __future__ import annotations

PROMPT_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    """Decodes one token at a time without breaking multi-byte characters.

    A window of recent ids is decoded and only the part after the previous window is emitted;
    text ending in U+FFFD (an incomplete UTF-8 sequence) waits for the next token. Written here
    rather than with tokenizers' ``DecodeStream`` because one path must serve fast and slow
    (sentencepiece, remote-code) tokenizers alike, and the window is seeded with the prompt's last
    tokens so the first generated word keeps its leading space under sentencepiece.
    """

    def __init__(self, tokenizer, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def step(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            if not full.endswith("\ufffd"):  # a special or empty token: move on
                self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix):]


class StopStrings:
    """Holds back text that could still become a stop string; the stop string itself is never shown."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to show now, whether a stop string was reached)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out
