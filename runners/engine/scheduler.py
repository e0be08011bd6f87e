"""Which sequences take part in the next step: every running sequence decodes one token, and waiting
sequences are admitted and prefilled within a per-step token budget, so a long prompt never stalls
the batch. Admission starts a prompt from the longest prefix in the prefix cache, which keeps the KV
of earlier prompts (as nano-vllm's scheduler owns its block manager)."""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable

from runners.engine.kv_cache import kv_bytes
from runners.engine.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, max_num_seqs: int, max_model_len: int, max_prefill_tokens: int = 512,
                 prefix_cache_tokens: int = 0, can_start: Callable[[Sequence], bool] | None = None):
        self.max_num_seqs = max_num_seqs
        # Whether a waiting sequence may start now (its LoRA adapter has a slot); it waits otherwise.
        self.can_start = can_start or (lambda seq: True)
        self.max_model_len = max_model_len
        self.max_prefill_tokens = max_prefill_tokens
        self.prefix_cache = PrefixCache(prefix_cache_tokens) if prefix_cache_tokens else None
        self.waiting: deque[Sequence] = deque()  # in arrival order; only the first may be partly prefilled
        self.running: list[Sequence] = []  # in the order they joined the batch

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> tuple[list[tuple[Sequence, int]], list[Sequence]]:
        """``(prefills, decodes)``: how many prompt tokens to prefill for which waiting sequences (at
        most ``max_prefill_tokens`` in all, a longer prompt is split over steps), and the running
        sequences, each of which decodes one token. A sequence admitted for the first time starts
        from the longest cached prefix of its prompt."""
        prefills, budget = [], self.max_prefill_tokens
        for seq in list(self.waiting)[: self.max_num_seqs - len(self.running)]:
            if not self.can_start(seq):
                continue
            if self.prefix_cache is not None and seq.num_cached == 0:
                seq.num_cached, seq.cache = self.prefix_cache.lookup(seq.prompt_ids, seq.adapter)
            if budget <= 0:
                continue  # a sequence admitted now keeps its cached prefix until its turn
            n = min(seq.num_prompt_tokens - seq.num_cached, budget)
            if n > 0:  # (the engine admits no empty prompt; should one be here, it holds up no one)
                prefills.append((seq, n))
                budget -= n
        return prefills, list(self.running)

    def postprocess(self, seqs: list[Sequence], tokens: list[int]) -> None:
        """Append each sampled token: a sequence whose prompt was just prefilled joins the running
        batch (and its prompt's KV the prefix cache), one that is done finishes."""
        for seq, token in zip(seqs, tokens):
            if seq.status is SequenceStatus.WAITING:
                self.waiting.remove(seq)
                if self.prefix_cache is not None:
                    self.prefix_cache.store(seq.prompt_ids, seq.cache, seq.adapter)
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
            seq.output_ids.append(token)
            if token in seq.params.stop_token_ids:  # the sampler kept them out before min_tokens
                seq.finish("stop")
            elif seq.num_output_tokens >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len:
                seq.finish("length")
        self.running = [s for s in self.running if s.status is SequenceStatus.RUNNING]

    def abort(self, request_id: str) -> Sequence | None:
        for queue in (self.waiting, self.running):
            for seq in list(queue):
                if seq.request_id == request_id:
                    queue.remove(seq)
                    seq.finish("abort")
                    return seq
        return None

    def drain(self) -> list[Sequence]:
        """Finish and return every sequence (a step that failed as a whole, a dead engine thread)."""
        seqs = [*self.waiting, *self.running]
        for seq in seqs:
            seq.finish("error")
        self.waiting.clear()
        self.running = []
        return seqs


class PrefixCache:
    """Prompt KV kept after prefill, so that a later prompt starting with the same tokens (a chat
    template's system prompt, the earlier turns of a conversation, a shared instruction) skips
    prefilling them.

    Entries are whole prompts; a new prompt reuses the longest common prefix with any entry of the same
    LoRA adapter (``adapter``, None for the base model), since the keys and values of a token depend
    only on the tokens before it and the weights. The cache holds at most ``max_tokens`` tokens and
    forgets the least recently used prompt first.
    """

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        # (adapter, prompt) -> per-layer (key, value)
        self.entries: OrderedDict[tuple[object, tuple[int, ...]], list] = OrderedDict()
        self.num_tokens = 0
        self.num_bytes = 0  # of the keys and values held
        self.hits = 0  # prompt tokens not prefilled thanks to the cache

    def lookup(self, prompt_ids: list[int], adapter=None) -> tuple[int, list | None]:
        """``(n, kv)``: the cached keys and values of the first ``n`` tokens of ``prompt_ids``
        (views, never written to), at most all but the last token, whose logits are needed."""
        best, found = 0, None
        for key in self.entries:
            n = common_prefix(key[1], prompt_ids) if key[0] is adapter else 0
            if n > best:
                best, found = n, key
        best = min(best, len(prompt_ids) - 1)
        if best <= 0:
            return 0, None
        self.entries.move_to_end(found)
        self.hits += best
        return best, [(k[:, :, :best], v[:, :, :best]) for k, v in self.entries[found]]

    def store(self, prompt_ids: list[int], kv: list, adapter=None) -> None:
        """Keep a prompt's keys and values (``[1, heads, len(prompt_ids), head_dim]`` per layer).
        The tensors are kept as they are: the caller must not write to them afterwards."""
        prompt = tuple(prompt_ids)
        key = (adapter, prompt)
        if len(prompt) > self.max_tokens:
            return
        if key in self.entries:
            self.entries.move_to_end(key)
            return
        for other in [k for k in self.entries if k[0] is adapter and len(k[1]) <= len(prompt)
                      and prompt[:len(k[1])] == k[1]]:
            self._drop(other)  # the new prompt covers it
        while self.num_tokens + len(prompt) > self.max_tokens:
            self._drop(next(iter(self.entries)))
        self.entries[key] = kv
        self.num_tokens += len(prompt)
        self.num_bytes += kv_bytes(kv)

    def forget(self, adapter) -> None:
        """Drop every prompt of ``adapter`` (unloaded: its weights are gone)."""
        for key in [k for k in self.entries if k[0] is adapter]:
            self._drop(key)

    def _drop(self, key: tuple) -> None:
        self.num_bytes -= kv_bytes(self.entries.pop(key))
        self.num_tokens -= len(key[1])


def common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
