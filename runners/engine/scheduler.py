"""Which sequences take part in the next step: every running sequence decodes one token, and waiting
sequences are admitted and prefilled within a per-step token budget, so a long prompt never stalls
the batch. A prompt starts, when its turn comes, from the longest prefix in the prefix cache, which
keeps the KV of the tenant's earlier prompts (as nano-vllm's scheduler owns its block manager); one that shares a
block or more beyond that with a prompt being prefilled in the same step waits for that one to be
cached instead of computing the same keys and values again.

On the paged cache (``block_manager.py``) the scheduler also hands out its blocks: a running sequence
gets a block for its next token first, and a waiting one is admitted only as far as free blocks hold
its prompt, so the KV cache never outgrows its budget. When the running batch needs more blocks than
are free, the prefix cache gives up its oldest prompts, then the sequence that joined last is
preempted: its blocks are freed and it waits again, first in line, to be prefilled with what it had
generated (``Sequence.prefill_ids``) and go on where it left off, token for token.

Tenants share the batch by weight, by virtual token counting (VTC, Sheng et al., "Fairness in Serving
Large Language Models", OSDI'24): each tenant has a counter of the tokens served to it divided by its
weight (a prefilled token counts ``PROMPT_COST``, a generated one ``OUTPUT_COST``, the paper's costs;
prompt tokens from the prefix cache cost nothing), and a free slot and the prefill budget go, one
sequence at a time, to the first waiting sequence of the tenant whose counter is lowest; within a tenant,
first come, first served. It counts what the batch spends, tokens, whatever the requests' lengths; a
weighted deficit round robin would need a quantum sized to them. It is work-conserving: a tenant alone
takes every slot. A tenant that starts asking gets no credit for its idle time: its counter is lifted to
the lowest of the tenants with work (all start over when the engine is idle), so a waiting tenant's
counter is soon the lowest while the others' grow with every step, and it never starves. On the paged
cache, a tenant whose turn comes while the batch is full, holding fewer slots than its share by weight,
does not wait for one to free: the tenant served most of those that would still hold their share gives
up the sequence that joined last (preempted, it resumes token for token; its prompt from the prefix
cache); the KV cache running out preempts from the tenant served most too. The prompts that end in a
step are grouped by tenant, in turn order (``passes``): the engine prefills the first group in a pass of
its own and streams its first tokens before the rest of the step (on the native forward pass, one more
pass; on the others, a pass a group, then the decode). With ``fair=False`` every sequence is first come,
first served, and a step's prompts are one pass."""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterator

from runners.engine.block_manager import BLOCK, BlockPool, blocks_for
from runners.engine.kv_cache import kv_bytes
from runners.engine.sequence import Sequence, SequenceStatus

PROMPT_COST, OUTPUT_COST = 1.0, 2.0  # virtual tokens per prefilled and per generated token (VTC's w_p, w_q)


class Scheduler:
    def __init__(self, max_num_seqs: int, max_model_len: int, max_prefill_tokens: int = 512,
                 prefix_cache_tokens: int = 0, can_start: Callable[[Sequence], bool] | None = None,
                 pool: BlockPool | None = None, fair: bool = True):
        self.max_num_seqs = max_num_seqs
        # Whether a waiting sequence may start now (its LoRA adapter has a slot); it waits otherwise.
        self.can_start = can_start or (lambda seq: True)
        self.max_model_len = max_model_len
        self.max_prefill_tokens = max_prefill_tokens
        self.pool = pool  # the paged cache's blocks, or None: each sequence's cache is the model runner's
        self.prefix_cache = None
        if prefix_cache_tokens:
            self.prefix_cache = PagedPrefixCache(prefix_cache_tokens, pool) if pool else PrefixCache(prefix_cache_tokens)
        self.waiting: deque[Sequence] = deque()  # in arrival order, the preempted first
        self.running: list[Sequence] = []  # in the order they joined the batch
        self.preemptions = 0
        self.fair = fair  # tenants share the batch by weight; else first come, first served
        self.served: dict[str | None, float] = {}  # tenant -> virtual tokens (tokens served / weight)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        active = {s.tenant for s in (*self.waiting, *self.running)} if self.fair else {seq.tenant}
        if seq.tenant not in active:  # no credit for the time it asked for nothing
            if not active:
                self.served.clear()  # idle: nobody's past counts
            floor = min((self.served.get(t, 0.0) for t in active), default=0.0)
            self.served[seq.tenant] = max(self.served.get(seq.tenant, 0.0), floor)
        self.waiting.append(seq)

    def _charge(self, seq: Sequence, tokens: float) -> None:
        if self.fair:
            self.served[seq.tenant] = self.served.get(seq.tenant, 0.0) + tokens / seq.weight

    def _turns(self) -> Iterator[Sequence]:
        """The waiting sequences in the order they get slots and prefill budget: each time the first
        waiting one of the tenant with the lowest counter (as charged so far, so the caller's charges
        between two turns count). On a tie (a tenant that starts asking is lifted to the lowest
        counter), the tenant with fewer sequences for its weight first, so that the one asking for less
        is not put behind the flood it ties with; then the one that came first. Arrival order when not
        fair."""
        if not self.fair:
            yield from list(self.waiting)
            return
        queues: dict[str | None, deque[tuple[int, Sequence]]] = {}
        demand: dict[str | None, float] = {}
        for i, seq in enumerate(self.waiting):
            queues.setdefault(seq.tenant, deque()).append((i, seq))
        for seq in (*self.waiting, *self.running):
            demand[seq.tenant] = demand.get(seq.tenant, 0.0) + 1 / seq.weight
        while queues:
            tenant = min(queues, key=lambda t: (self.served.get(t, 0.0), demand[t], queues[t][0][0]))
            yield queues[tenant].popleft()[1]
            if not queues[tenant]:
                del queues[tenant]

    def schedule(self) -> tuple[list[tuple[Sequence, int]], list[Sequence]]:
        """``(prefills, decodes)``: how many tokens to prefill for which waiting sequences (at most
        ``max_prefill_tokens`` in all, a longer prompt is split over steps; a prompt whose rest exceeds
        what is left of it by an eighth or less takes it whole), and the running
        sequences, each of which decodes one token. A sequence admitted for the first time starts
        from the longest cached prefix of its prompt."""
        if self.pool is not None:
            self._grow_running()
        for seq in self.running:
            self._charge(seq, OUTPUT_COST)  # its token of this step
        prefills, budget, taken = [], self.max_prefill_tokens, 0
        for seq in self._turns():
            if len(self.running) + taken >= self.max_num_seqs and not (budget > 0 and self._make_room(seq)):
                break
            taken += 1
            if not self.can_start(seq) or budget <= 0:
                continue
            if self.prefix_cache is not None and seq.num_cached == 0:  # (a preempted one's prompt too)
                cached, entry = self.prefix_cache.longest(seq.prefill_ids, seq.adapter, seq.tenant)
                if any(other.adapter == seq.adapter and other.tenant == seq.tenant and
                       common_prefix(seq.prompt_ids, other.prompt_ids) - cached >= BLOCK for other, _ in prefills):
                    break  # it waits for the prompt before it to be cached rather than compute the same blocks
                seq.num_cached, kept = cached, self.prefix_cache.take(cached, entry)
                if self.pool is not None:
                    seq.blocks = kept or []
                else:
                    seq.cache = kept
            left = seq.num_tokens - seq.num_cached
            n = left if left <= budget + budget // 8 else budget  # (a prompt's last few tokens no pass of their own)
            if self.pool is not None and not self._take(seq, blocks_for(seq.num_cached + n) - len(seq.blocks)):
                break  # in turn: the next ones wait for blocks too
            if n > 0:  # (the engine admits no empty prompt; should one be here, it holds up no one)
                prefills.append((seq, n))
                budget -= n
                self._charge(seq, n * PROMPT_COST)
        return prefills, list(self.running)

    def passes(self, seqs: list[Sequence]) -> list[list[Sequence]]:
        """The prompts ``seqs`` (this step's, in turn order) grouped into forward passes: one for each
        tenant, in the order of its first turn, so that a tenant under its share gets its first tokens
        without waiting for the prompts of the tenant that floods; all in one when not fair."""
        if not self.fair:
            return [seqs] if seqs else []
        groups: dict[str | None, list[Sequence]] = {}
        for seq in seqs:
            groups.setdefault(seq.tenant, []).append(seq)
        return list(groups.values())

    def _make_room(self, seq: Sequence) -> bool:
        """A slot in the full batch for ``seq``, whose turn it is, if its tenant holds fewer slots than its
        share by weight (among the tenants with work): the sequence that joined last of the tenant served
        most of those that would still hold their share without it, and served more than ``seq``'s, is
        preempted (so none takes a slot back: no ping-pong). On the paged cache only, whose preempted
        sequences resume token for token (from the prefix cache, where it still holds their prompts)."""
        if self.pool is None or not self.fair:
            return False
        weights = {s.tenant: s.weight for s in (*self.waiting, *self.running)}
        share = {t: self.max_num_seqs * w / sum(weights.values()) for t, w in weights.items()}
        held = {t: sum(s.tenant == t for s in self.running) for t in weights}
        mine = self.served.get(seq.tenant, 0.0)
        over = [t for t in weights if held[t] - 1 >= share[t] and self.served.get(t, 0.0) > mine]
        if held[seq.tenant] >= share[seq.tenant] or not over or not self.can_start(seq):
            return False
        tenant = max(over, key=lambda t: self.served.get(t, 0.0))
        self._preempt(next(s for s in reversed(self.running) if s.tenant == tenant))
        return True

    def _take(self, seq: Sequence, n: int) -> bool:
        """``n`` more blocks for ``seq``, from the free ones or from the prefix cache's prompts."""
        while n > self.pool.num_free and self.prefix_cache is not None and self.prefix_cache.drop_oldest():
            pass
        if n > self.pool.num_free:
            return False
        seq.blocks += self.pool.allocate(max(n, 0))
        return True

    def _grow_running(self) -> None:
        """A block for each running sequence whose next token starts one, preempting others when short:
        partly prefilled waiting sequences first, then the running ones; of each, those of the tenant
        served most first, and of a tenant the one that joined last."""
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING or len(seq.blocks) > seq.num_cached // BLOCK:
                continue
            while not self._take(seq, 1):
                most = lambda s: -self.served.get(s.tenant, 0.0)  # noqa: E731 (sorted keeps ties in order)
                holders = sorted((s for s in reversed(self.waiting) if s.blocks), key=most) + \
                    sorted((s for s in reversed(self.running) if s is not seq), key=most)
                if not holders:  # (cannot happen: the context fits the pool, see LLMEngine)
                    raise MemoryError("the KV cache cannot hold one sequence")
                self._preempt(holders[0])

    def _preempt(self, seq: Sequence) -> None:
        self._free(seq)
        seq.num_cached = 0
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            seq.status = SequenceStatus.WAITING
            self.waiting.appendleft(seq)
            self.preemptions += 1

    def _free(self, seq: Sequence) -> None:
        if self.pool is not None and seq.blocks:
            self.pool.release(seq.blocks)
            seq.blocks = []

    def postprocess(self, seqs: list[Sequence], tokens: list[int]) -> None:
        """Append each sampled token: a sequence whose prompt was just prefilled joins the running
        batch (and its prompt's KV the prefix cache), one that is done finishes."""
        for seq, token in zip(seqs, tokens):
            if seq.status is SequenceStatus.WAITING:
                self.waiting.remove(seq)
                if self.prefix_cache is not None and not seq.output_ids:
                    self.prefix_cache.store(seq.prompt_ids, seq.blocks if self.pool else seq.cache, seq.adapter,
                                            seq.tenant)
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
            seq.output_ids.append(token)
            if token in seq.params.stop_token_ids:  # the sampler kept them out before min_tokens
                seq.finish("stop")
            elif seq.num_output_tokens >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len:
                seq.finish("length")
            if seq.status is SequenceStatus.FINISHED:
                self._free(seq)
        self.running = [s for s in self.running if s.status is SequenceStatus.RUNNING]

    def abort(self, request_id: str) -> Sequence | None:
        for queue in (self.waiting, self.running):
            for seq in list(queue):
                if seq.request_id == request_id:
                    queue.remove(seq)
                    seq.finish("abort")
                    self._free(seq)
                    return seq
        return None

    def drain(self) -> list[Sequence]:
        """Finish and return every sequence (a step that failed as a whole, a dead engine thread)."""
        seqs = [*self.waiting, *self.running]
        for seq in seqs:
            seq.finish("error")
            self._free(seq)
        self.waiting.clear()
        self.running = []
        return seqs


class PrefixCache:
    """Prompt KV kept after prefill, so that a later prompt starting with the same tokens (a chat
    template's system prompt, the earlier turns of a conversation, a shared instruction) skips
    prefilling them.

    Entries are whole prompts; a new prompt reuses the longest common prefix with any entry of the same
    LoRA adapter (``adapter``, None for the base model), since the keys and values of a token depend
    only on the tokens before it and the weights, and of the same ``tenant``: a prompt served faster, or
    counted as cached, would tell a tenant that another one sent the same words (as OpenAI keeps its
    cache per organisation). The cache holds at most ``max_tokens`` tokens and forgets the least recently
    used prompt first.
    """

    granularity = 1  # a reused prefix is a multiple of this many tokens

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens
        # (adapter, tenant, prompt) -> per-layer (key, value)
        self.entries: OrderedDict[tuple[object, str | None, tuple[int, ...]], list] = OrderedDict()
        self.num_tokens = 0
        self.num_bytes = 0  # of the keys and values held
        self.hits = 0  # prompt tokens not prefilled thanks to the cache

    def longest(self, prompt_ids: list[int], adapter=None, tenant: str | None = None) -> tuple[int, tuple | None]:
        """``(n, entry)``: how many of the first tokens of ``prompt_ids`` the cache would give (at most all
        but the last, whose logits are needed), and from which entry; nothing is taken."""
        best, found = 0, None
        for key in self.entries:
            n = common_prefix(key[2], prompt_ids) if key[0] is adapter and key[1] == tenant else 0
            if n > best:
                best, found = n, key
        return max(0, min(best, len(prompt_ids) - 1) // self.granularity * self.granularity), found

    def take(self, n: int, entry: tuple | None) -> list | None:
        """The keys and values of the first ``n`` tokens of ``entry`` (what :meth:`longest` found; views,
        never written to), counted as hits; None for none."""
        if n <= 0:
            return None
        self.entries.move_to_end(entry)
        self.hits += n
        return self._prefix(self.entries[entry], n)

    def lookup(self, prompt_ids: list[int], adapter=None, tenant: str | None = None) -> tuple[int, list | None]:
        """``(n, kv)``: the cached keys and values of the first ``n`` tokens of ``prompt_ids``
        (views, never written to), at most all but the last token, whose logits are needed."""
        n, entry = self.longest(prompt_ids, adapter, tenant)
        return n, self.take(n, entry)

    def _prefix(self, kv: list, n: int) -> list:
        return [(k[:, :, :n], v[:, :, :n]) for k, v in kv]

    def store(self, prompt_ids: list[int], kv: list, adapter=None, tenant: str | None = None) -> None:
        """Keep a prompt's keys and values (``[1, heads, len(prompt_ids), head_dim]`` per layer).
        The tensors are kept as they are: the caller must not write to them afterwards."""
        prompt = tuple(prompt_ids)
        key = (adapter, tenant, prompt)
        if len(prompt) > self.max_tokens:
            return
        if key in self.entries:
            self.entries.move_to_end(key)
            return
        for other in [k for k in self.entries if k[:2] == key[:2] and len(k[2]) <= len(prompt)
                      and prompt[:len(k[2])] == k[2]]:
            self._drop(other)  # the new prompt covers it
        while self.num_tokens + len(prompt) > self.max_tokens:
            self._drop(next(iter(self.entries)))
        self.entries[key] = self._keep(kv)
        self.num_tokens += len(prompt)
        self.num_bytes += self._bytes(kv)

    def _keep(self, kv: list) -> list:
        return kv

    def _bytes(self, kv: list) -> int:
        return kv_bytes(kv)

    def forget(self, adapter) -> None:
        """Drop every prompt of ``adapter`` (unloaded: its weights are gone)."""
        for key in [k for k in self.entries if k[0] is adapter]:
            self._drop(key)

    def drop_oldest(self) -> bool:
        """Forget the least recently used prompt; False when there is none."""
        if not self.entries:
            return False
        self._drop(next(iter(self.entries)))
        return True

    def _drop(self, key: tuple) -> None:
        self.num_bytes -= self._bytes(self.entries.pop(key))
        self.num_tokens -= len(key[2])


class PagedPrefixCache(PrefixCache):
    """The prefix cache on the paged cache: a prompt's whole blocks are kept (a reference each, shared
    with the sequences that reuse them), so a reused prefix is a whole number of blocks and nothing is
    copied."""

    granularity = BLOCK

    def __init__(self, max_tokens: int, pool: BlockPool):
        super().__init__(max_tokens)
        self.pool = pool

    def _prefix(self, blocks: list[int], n: int) -> list[int]:  # (a reference for the sequence)
        shared = blocks[:n // BLOCK]
        self.pool.share(shared)
        return list(shared)

    def store(self, prompt_ids: list[int], blocks: list[int], adapter=None, tenant: str | None = None) -> None:
        whole = len(prompt_ids) // BLOCK
        if whole:
            super().store(prompt_ids[:whole * BLOCK], blocks[:whole], adapter, tenant)

    def _keep(self, blocks: list[int]) -> list[int]:
        self.pool.share(blocks)
        return list(blocks)

    def _bytes(self, blocks: list[int]) -> int:
        return len(blocks) * self.pool.block_bytes

    def _drop(self, key: tuple) -> None:
        blocks = self.entries[key]
        super()._drop(key)
        self.pool.release(blocks)


def common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
