"""Prompt KV kept after prefill, so that a later prompt starting with the same tokens (a chat template's
system prompt, the earlier turns of a conversation, a shared instruction) skips prefilling them.

Entries are whole prompts; a new prompt reuses the longest common prefix with any entry, since
the keys and values of a token depend only on the tokens before it. The cache holds at most
``max_tokens`` tokens and forgets the least recently used prompt first.
"""

from __future__ import annotations

from collections import OrderedDict

from runners.engine.kv_cache import KV, kv_bytes


class PrefixCache:
    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        self.entries: OrderedDict[tuple[int, ...], KV] = OrderedDict()
        self.num_tokens = 0
        self.num_bytes = 0  # of the keys and values held
        self.hits = 0  # prompt tokens not prefilled thanks to the cache

    def lookup(self, prompt_ids: list[int]) -> tuple[int, KV | None]:
        """``(n, kv)``: the cached keys and values of the first ``n`` tokens of ``prompt_ids``
        (views, never written to), at most all but the last token, whose logits are needed."""
        best, found = 0, None
        for key in self.entries:
            n = common_prefix(key, prompt_ids)
            if n > best:
                best, found = n, key
        best = min(best, len(prompt_ids) - 1)
        if best <= 0:
            return 0, None
        self.entries.move_to_end(found)
        self.hits += best
        return best, [(k[:, :, :best], v[:, :, :best]) for k, v in self.entries[found]]

    def store(self, prompt_ids: list[int], kv: KV) -> None:
        """Keep a prompt's keys and values (``[1, heads, len(prompt_ids), head_dim]`` per layer).
        The tensors are kept as they are: the caller must not write to them afterwards."""
        key = tuple(prompt_ids)
        if len(key) > self.max_tokens:
            return
        if key in self.entries:
            self.entries.move_to_end(key)
            return
        for other in [k for k in self.entries if len(k) <= len(key) and key[:len(k)] == k]:
            self._drop(other)  # the new prompt covers it
        while self.num_tokens + len(key) > self.max_tokens:
            self._drop(next(iter(self.entries)))
        self.entries[key] = kv
        self.num_tokens += len(key)
        self.num_bytes += kv_bytes(kv)

    def _drop(self, key: tuple[int, ...]) -> None:
        self.num_bytes -= kv_bytes(self.entries.pop(key))
        self.num_tokens -= len(key)


def common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
