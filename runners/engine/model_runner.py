"""Owns the tensors: prefill (whole prompts together, a long one alone in chunks) and one decode step
for the whole running batch, on the batch's KV cache (the native forward pass's is paged,
``block_manager.py``; the others' ``kv_cache.py``); on the native forward pass, a whole engine step (the
decodes and the prompts' chunks) in one pass (``ModelRunner.run``). Each row of a forward pass runs on
its sequence's own LoRA adapter, or on none (``lora.Adapters``). The next token of each row is the
sampler's (``sampler.py``)."""

from __future__ import annotations

import inspect
import logging
from itertools import accumulate

import torch

from runners.engine.block_manager import BlockPool, blocks_for
from runners.engine.kv_cache import KV, SlotCache, cache_form, concat_kv, kv_bytes, select_kv, to_kv, to_model_cache
from runners.engine.lean import LeanCausalLM, decode_width
from runners.engine.lora import Adapters

logger = logging.getLogger("bentochat.engine")

def _vocab_size(model) -> int:
    """How many token ids the model can embed (and so take as input, or be told to stop at)."""
    try:
        return int(model.get_input_embeddings().weight.shape[0])
    except (AttributeError, NotImplementedError):  # remote code without the accessor
        return int(model.config.vocab_size)


class ModelRunner:
    """Runs the model for the engine: prefill of new sequences (whole prompts together, a long one
    alone in chunks), and one decode step for the whole running batch.

    The running batch shares one KV cache (see above): a sequence whose prefill finished joins it at
    the next decode step, and a finished one leaves it there, so the batch never drains. Each row's
    attention mask hides what is not its own and its position ids count only its own tokens, so a
    row computes what it would alone. Models whose cache cannot be batched, or whose
    forward takes no ``attention_mask``/``position_ids``, are decoded one sequence at a time.
    """

    def __init__(self, model, max_loras: int = 4, kv_cache_memory: int = 4 << 30):
        self.model = model
        self.adapters = Adapters(model, max_loras)  # LoRA adapters, each row its own (lora.py)
        self.device = next(model.parameters()).device
        accepts = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in accepts else "past_key_values"
        self.can_batch = "attention_mask" in accepts and "position_ids" in accepts
        self.vocab_size = _vocab_size(model)
        self.lean = isinstance(model, LeanCausalLM)
        self.rows: list = []  # "tuple" form: the sequences in the batch cache, in row order
        self.kv: KV | None = None  # its row i holds rows[i].num_cached tokens, right-aligned
        self.slots = SlotCache()  # "dynamic" form: the batch cache, one slot per sequence
        self.form = self._probe()  # "dynamic" | "tuple" | "sequential"
        # BentoChat's native forward pass prefills and decodes (lean.LeanCausalLM.forward_rows)
        self.native = self.lean and model.native is not None and self.form == "dynamic"
        # its paged KV cache, within kv_cache_memory bytes; the scheduler hands out the blocks
        self.pool = BlockPool.for_model(model, kv_cache_memory) if self.native else None
        logger.info("decoding %s", f"in batches ({self.form} cache)" if self.batched else "one sequence at a time")

    @torch.inference_mode()
    def _probe(self) -> str:
        """Which cache form the model returns, from a two-token forward pass (which also warms it up)."""
        if not self.can_batch:
            return "sequential"
        _, cache = self._run(torch.tensor([[0, 0]], device=self.device), None, [])
        return cache_form(cache, 1, 2) or "sequential"

    @property
    def batched(self) -> bool:
        return self.form in ("dynamic", "tuple")

    def _run(self, input_ids: torch.Tensor, cache, rows: list, **kwargs):
        """The model on ``input_ids``, row i for sequence ``rows[i]`` (its adapter)."""
        self.adapters.select(rows)
        out = self.model(input_ids=input_ids, use_cache=True, **{self.cache_arg: cache}, **kwargs)
        if isinstance(out, tuple):  # remote code called without return_dict support
            return out[0], out[1]
        return out.logits, out[self.cache_arg] if self.cache_arg in out else out.past_key_values

    def kv_bytes(self) -> int:
        """Bytes of the batch's keys and values (on the paged cache, the prefix cache's blocks too)."""
        if self.pool is not None:
            return self.pool.used_bytes
        return kv_bytes(self.kv) + kv_bytes(self.slots.kv)

    def reset(self) -> None:
        """Drop the batch cache (nothing running, or a failed step)."""
        self.rows, self.kv = [], None
        if self.pool is None:  # (the paged cache's blocks are the scheduler's to free)
            self.slots = SlotCache()

    @torch.inference_mode()
    def prefill(self, seq, max_tokens: int) -> torch.Tensor | None:
        """Feed up to ``max_tokens`` more prompt tokens of ``seq`` into its own cache; return the
        next-token logits once the whole prompt is in, else None."""
        if self.native:
            n = min(max_tokens, seq.num_tokens - seq.num_cached)
            ending = seq.num_cached + n == seq.num_tokens
            logits = self._prefill_native([(seq, n)], [ending])  # (no logits for a chunk before the last)
            return logits[0] if ending else None
        start = seq.num_cached
        ids = seq.prompt_ids[start:start + max_tokens]
        kwargs, cache = {}, seq.cache
        if self.batched and cache is not None:
            end = start + len(ids)
            kwargs = {"attention_mask": torch.ones(1, end, dtype=torch.long, device=self.device),
                      "position_ids": torch.arange(start, end, device=self.device).unsqueeze(0)}
            cache = to_model_cache(cache, self.form)
        logits, cache = self._run(torch.tensor([ids], device=self.device), cache, [seq], **kwargs)
        seq.cache = to_kv(cache) if self.batched else cache
        seq.num_cached += len(ids)
        return logits[0, -1] if seq.num_cached == seq.num_prompt_tokens else None

    @torch.inference_mode()
    def prefill_together(self, seqs: list) -> torch.Tensor:
        """Prefill the rest of several sequences' prompts in one forward pass (batched forms only);
        returns their next-token logits, row i for ``seqs[i]``.

        A sequence may already have part of its prompt cached (a reused prefix, earlier chunks). Row i
        is ``[padding][its cached tokens][padding][its new tokens]``: the cached parts and the new
        parts are each right-aligned, and the mask hides both paddings.
        """
        if self.native:
            return self._prefill_native([(s, s.num_tokens - s.num_cached) for s in seqs])
        cached = [s.num_cached for s in seqs]
        new = [s.prompt_ids[s.num_cached:] for s in seqs]
        past, width = max(cached), max(map(len, new))
        input_ids = torch.tensor([[0] * (width - len(ids)) + ids for ids in new], device=self.device)
        c = torch.tensor(cached, device=self.device).unsqueeze(1)
        n = torch.tensor([len(ids) for ids in new], device=self.device).unsqueeze(1)
        columns = torch.arange(past + width, device=self.device)
        mask = (((columns >= past - c) & (columns < past)) | (columns >= past + width - n)).long()
        positions = (torch.arange(width, device=self.device) - (width - n)).clamp(min=0) + c
        cache = None
        if past:
            like = next(s.cache for s in seqs if s.cache is not None)
            empty = [(k[:, :, :0], v[:, :, :0]) for k, v in like]
            cache = to_model_cache(concat_kv([s.cache or empty for s in seqs]), self.form)
        logits, cache = self._run(input_ids, cache, seqs, attention_mask=mask, position_ids=positions)
        kv = to_kv(cache)
        for i, seq in enumerate(seqs):
            keep = (slice(past - cached[i], past), slice(past + width - len(new[i]), None))
            seq.cache = [tuple(torch.cat([t[i:i + 1, :, cols] for cols in keep], dim=2) for t in pair) for pair in kv]
            seq.num_cached = seq.num_prompt_tokens
        return logits[:, -1]

    @torch.inference_mode()
    def run(self, decodes: list, prefills: list) -> torch.Tensor:
        """A whole engine step in one native forward pass: a row for each of ``decodes`` (running
        sequences, each its last sampled token) and the next ``n`` prompt tokens of each ``(seq, n)`` of
        ``prefills``, so that the weights are read once for all of them. Returns the logits of each of
        ``decodes``, then of each prefilled sequence whose prompt ends in this pass, in order."""
        work = [(seq, 1) for seq in decodes] + prefills
        ending = [True] * len(decodes) + [seq.num_cached + n == seq.num_tokens for seq, n in prefills]
        return self._prefill_native(work, ending)

    def _prefill_native(self, work: list, wanted: list[bool] | None = None) -> torch.Tensor:
        """The next ``n`` tokens of each ``(seq, n)`` of ``work`` in one native forward pass, each
        sequence into its own blocks of the paged cache (which the scheduler gave it); returns the logits
        of each sequence's last new token (of those ``wanted`` names, where given)."""
        ids, slots, positions = [], [], []
        for i, (seq, n) in enumerate(work):
            start = seq.num_cached
            self._hold(seq, start + n)
            ids += seq.prefill_ids[start:start + n]
            slots += [i] * n
            positions += range(start, start + n)
        self.adapters.select([seq for seq, n in work for _ in range(n)])
        ends = accumulate(n for _, n in work)  # each sequence's last row, plus one
        last = [row - 1 for row, want in zip(ends, wanted or [True] * len(work)) if want]
        seqs = [seq for seq, _ in work]
        logits = self.model.forward_rows(*(torch.tensor(t, device=self.device) for t in (ids, slots)),
                                         self.pool.table(seqs, self.device), torch.tensor(positions, device=self.device),
                                         self.pool.kv, torch.tensor(last, dtype=torch.long, device=self.device))
        for seq, n in work:
            seq.num_cached += n
        return logits

    def _hold(self, seq, tokens: int) -> None:
        """Blocks for the first ``tokens`` of ``seq``: the scheduler gave them; a caller that runs the
        model runner without one (a test, a benchmark) gets them here."""
        seq.blocks += self.pool.allocate(max(0, blocks_for(tokens) - len(seq.blocks)))

    @torch.inference_mode()
    def decode(self, seqs: list) -> torch.Tensor:
        """One step for every sequence in ``seqs`` (each has its last sampled token not yet in the
        cache); returns their next-token logits, row i for ``seqs[i]``."""
        if not self.batched:
            logits = []
            for seq in seqs:
                out, seq.cache = self._run(torch.tensor([[seq.output_ids[-1]]], device=self.device), seq.cache, [seq])
                seq.num_cached += 1
                logits.append(out[0, -1])
            return torch.stack(logits)
        return self._decode_slots(seqs) if self.form == "dynamic" else self._decode_padded(seqs)

    def _decode_padded(self, seqs: list) -> torch.Tensor:
        """The legacy tuple form: the model appends to the left-padded batch cache itself."""
        self._arrange(seqs)
        width = self.kv[0][0].shape[2]
        lengths = torch.tensor([s.num_cached for s in self.rows], device=self.device)
        columns = torch.arange(width + 1, device=self.device)
        mask = (columns >= width - lengths.unsqueeze(1)).long()
        input_ids = torch.tensor([[s.output_ids[-1]] for s in self.rows], device=self.device)
        logits, cache = self._run(input_ids, to_model_cache(self.kv, self.form), self.rows,
                                  attention_mask=mask, position_ids=lengths.unsqueeze(1))
        self.kv = to_kv(cache)
        for seq in self.rows:
            seq.num_cached += 1
        return logits[:, -1]

    def _decode_slots(self, seqs: list) -> torch.Tensor:
        if self.native:  # row i is seqs[i], its last token, in its own blocks
            return self._prefill_native([(seq, 1) for seq in seqs])
        slots = self.slots.arrange(seqs)
        rows = self.slots.rows
        lengths = torch.tensor([s.num_cached for s in rows], device=self.device)
        input_ids = torch.tensor([s.output_ids[-1] for s in rows], device=self.device)
        width = int(lengths.max()) + 1
        kwargs = {}
        if self.lean:  # every row's columns start at 0: a width in whole multiples lets it attend fused
            width = decode_width(width)  # (within the buffers: COLUMNS_CHUNK is a multiple of it)
            kwargs["aligned"] = True
        mask = (torch.arange(width, device=self.device) <= lengths.unsqueeze(1)).long()
        logits, _ = self._run(input_ids[:, None], self.slots.model_cache(lengths, width), rows, attention_mask=mask,
                              position_ids=lengths.unsqueeze(1), **kwargs)
        logits = logits[:, -1]
        for seq in rows:
            seq.num_cached += 1
        if slots == list(range(len(rows))):  # the rows in their slots' order: no gather
            return logits
        return logits[torch.tensor(slots, device=self.device)]

    def _arrange(self, seqs: list) -> None:
        """Make the batch cache's rows exactly ``seqs``: drop rows that left, join new sequences.

        Sequences already in the batch keep their relative order and newly prefilled ones follow them,
        as the scheduler keeps its running list.
        """
        if self.rows == seqs:
            return
        position = {id(s): i for i, s in enumerate(self.rows)}
        kept = [position[id(s)] for s in seqs if id(s) in position]
        joining = seqs[len(kept):]
        if any(id(s) in position for s in joining):
            raise RuntimeError("sequences joining the batch must follow those already in it")
        parts = []
        if kept:
            longest = max(self.rows[i].num_cached for i in kept)
            parts.append(select_kv(self.kv, kept, self.kv[0][0].shape[2] - longest))  # drop shared padding
        for seq in joining:
            parts.append(seq.cache)
            seq.cache = None  # now held by the batch cache
        self.kv = concat_kv(parts) if parts else None
        self.rows = list(seqs)
