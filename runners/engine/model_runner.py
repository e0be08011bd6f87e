"""Owns the tensors: prefill, decode, the running batch's KV cache, and sampling from the logits.

Two model-side cache forms are batched, both ``[batch, heads, length, head_dim]`` tensors per layer:
- transformers' ``DynamicCache`` made only of full-attention ``DynamicLayer``s: the running batch's
  keys and values live in a ``SlotCache``, one preallocated slot per sequence, which each decode step
  writes in place (no copy of the cache per step, none of the others when a sequence joins or leaves);
- the legacy tuple of ``(key, value)`` pairs that older remote-code models (Baichuan, early Qwen)
  return, which the model extends itself: the batch cache is left-padded so that every row ends at
  the same column and a step appends one column for all rows.
A model whose cache is anything else (sliding windows, sequence-first layouts) is run one sequence at
a time.

Each row of a forward pass runs on its sequence's own LoRA adapter, or on none (``lora.Adapters``).

Sampling is a function of logits and each sequence's own parameters (``sequence.SamplingParams``).
"""

from __future__ import annotations

import inspect
import logging
from itertools import accumulate
from typing import Any

import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.cache_utils import DynamicCache, DynamicLayer

from runners.engine.lean import LeanCausalLM, decode_width
from runners.engine.lora import Adapters
from runners.engine.scheduler import kv_bytes
from runners.engine.sequence import SamplingParams
from runners.engine.structured import GrammarError, accept, apply_masks

logger = logging.getLogger("bentochat.engine")

KV = list[tuple[torch.Tensor, torch.Tensor]]


def cache_form(cache: Any, batch: int, length: int) -> str | None:
    """``"dynamic"`` or ``"tuple"`` when the cache can be batched, else None."""
    if isinstance(cache, DynamicCache):
        form = "dynamic" if cache.layers and all(type(layer) is DynamicLayer for layer in cache.layers) else None
    elif isinstance(cache, (tuple, list)) and cache and all(isinstance(p, (tuple, list)) and len(p) == 2 for p in cache):
        form = "tuple"
    else:
        form = None
    if form is None:
        return None
    ok = all(k.dim() == 4 and v.dim() == 4 and k.shape[0] == v.shape[0] == batch
             and k.shape[2] == v.shape[2] == length for k, v in to_kv(cache))
    return form if ok else None


def to_kv(cache: Any) -> KV:
    if isinstance(cache, DynamicCache):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return [tuple(p) for p in cache]


def to_model_cache(kv: KV, form: str) -> Any:
    """Wrap the tensors in the form the model takes, without copying them."""
    if form == "tuple":
        return tuple(kv)
    cache = DynamicCache()
    cache.layers = []
    for k, v in kv:
        layer = DynamicLayer()
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
        cache.layers.append(layer)
    return cache


def left_pad_kv(kv: KV, length: int) -> KV:
    """Pad every layer on the left (the sequence axis) to ``length`` columns."""
    have = kv[0][0].shape[2]
    if have == length:
        return kv
    return [(_pad(k, length - have), _pad(v, length - have)) for k, v in kv]


def _pad(t: torch.Tensor, n: int) -> torch.Tensor:
    return torch.cat([t.new_zeros(t.shape[0], t.shape[1], n, t.shape[3]), t], dim=2)


def concat_kv(parts: list[KV]) -> KV:
    """Stack left-padded batches into one, padding the shorter ones on the left."""
    if len(parts) == 1:
        return parts[0]
    length = max(p[0][0].shape[2] for p in parts)
    parts = [left_pad_kv(p, length) for p in parts]
    return [(torch.cat([p[i][0] for p in parts]), torch.cat([p[i][1] for p in parts])) for i in range(len(parts[0]))]


def select_kv(kv: KV, rows: list[int], drop_columns: int = 0) -> KV:
    """Keep ``rows`` of the batch and drop the ``drop_columns`` leftmost columns (padding for every row)."""
    index = torch.tensor(rows, device=kv[0][0].device)
    return [(k.index_select(0, index)[:, :, drop_columns:], v.index_select(0, index)[:, :, drop_columns:])
            for k, v in kv]


class SlotLayer(DynamicLayer):
    """What the model sees of one layer of the slot cache in one decode step: ``update`` writes each
    row's new key and value in place at that row's own length, and returns views of the first
    ``width`` columns of the running rows (the longest row plus the new token; the attention mask
    hides what lies past each row's own length)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
                 width: int):
        super().__init__()
        self.keys, self.values, self.rows, self.positions, self.width = keys, values, rows, positions, width
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.keys[self.rows, :, self.positions] = key_states[:, :, 0]
        self.values[self.rows, :, self.positions] = value_states[:, :, 0]
        n = len(self.rows)
        return self.keys[:n, :, :self.width], self.values[:n, :, :self.width]

    def get_seq_length(self) -> int:
        return self.width - 1


class SlotCache:
    """The running batch's keys and values for models with transformers' ``DynamicCache``: one slot
    (row) per sequence in preallocated buffers, written in place. A decode step writes one column per
    row, at that row's own length; a sequence that joins is copied into the next slot; one that leaves
    is replaced by the sequence in the last slot, so the running rows are always slots ``0..n-1``.
    Nothing is copied per step; the buffers grow (and shrink) by whole chunks of rows and columns."""

    ROWS_CHUNK, COLUMNS_CHUNK = 8, 256  # COLUMNS_CHUNK: a multiple of lean.WIDTH_MULTIPLE

    def __init__(self):
        self.rows: list = []  # the sequence in each slot; slot i holds rows[i].num_cached columns
        self.kv: KV | None = None  # per layer, [slots, heads, columns, head_dim]

    def arrange(self, seqs: list) -> list[int]:
        """Make the running rows exactly ``seqs``; returns each one's slot, in ``seqs``' order."""
        wanted = {id(s) for s in seqs}
        i = 0
        while i < len(self.rows):
            if id(self.rows[i]) in wanted:
                i += 1
                continue
            moved = self.rows.pop()  # the last slot's sequence fills the hole (unless it is the one leaving)
            if i < len(self.rows):
                n = moved.num_cached
                for k, v in self.kv:
                    k[i, :, :n], v[i, :, :n] = k[len(self.rows), :, :n], v[len(self.rows), :, :n]
                self.rows[i] = moved
        present = {id(s) for s in self.rows}
        joining = [s for s in seqs if id(s) not in present]
        self._reserve(len(seqs), max(s.num_cached for s in seqs) + 1, joining[0].cache if joining else None)
        for seq in joining:
            slot, n = len(self.rows), seq.num_cached
            for (k, v), (sk, sv) in zip(self.kv, seq.cache):
                k[slot, :, :n], v[slot, :, :n] = sk[0], sv[0]
            seq.cache = None  # now held by the slot cache
            self.rows.append(seq)
        slot = {id(s): i for i, s in enumerate(self.rows)}
        return [slot[id(s)] for s in seqs]

    def _reserve(self, rows: int, columns: int, like: KV | None) -> None:
        """Buffers of at least ``rows`` slots and ``columns`` columns (rounded up to whole chunks), and
        at most twice that, so that one long request does not hold memory after it left; what is held
        is kept."""
        rows = -(-rows // self.ROWS_CHUNK) * self.ROWS_CHUNK
        columns = -(-columns // self.COLUMNS_CHUNK) * self.COLUMNS_CHUNK
        if self.kv is not None:
            have_rows, have_columns = self.kv[0][0].shape[0], self.kv[0][0].shape[2]
            if rows <= have_rows <= 2 * rows and columns <= have_columns <= 2 * columns:
                return
        old, template = self.kv, self.kv or like
        self.kv = [(k.new_zeros(rows, k.shape[1], columns, k.shape[3]), v.new_zeros(rows, v.shape[1], columns, v.shape[3]))
                   for k, v in template]
        if old is not None:
            n, width = len(self.rows), max((s.num_cached for s in self.rows), default=0)
            for (k, v), (ok, ov) in zip(self.kv, old):
                k[:n, :, :width], v[:n, :, :width] = ok[:n, :, :width], ov[:n, :, :width]

    def model_cache(self, lengths: torch.Tensor, width: int) -> DynamicCache:
        cache = DynamicCache()
        rows = torch.arange(len(lengths), device=lengths.device)  # one index for every layer's writes
        cache.layers = [SlotLayer(k, v, rows, lengths, width) for k, v in self.kv]
        return cache


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

    def __init__(self, model, max_loras: int = 4):
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
        return kv_bytes(self.kv) + kv_bytes(self.slots.kv)

    def reset(self) -> None:
        """Drop the batch cache (nothing running, or a failed step)."""
        self.rows, self.kv, self.slots = [], None, SlotCache()

    @torch.inference_mode()
    def prefill(self, seq, max_tokens: int) -> torch.Tensor | None:
        """Feed up to ``max_tokens`` more prompt tokens of ``seq`` into its own cache; return the
        next-token logits once the whole prompt is in, else None."""
        if self.native:
            n = min(max_tokens, seq.num_prompt_tokens - seq.num_cached)
            logits = self._prefill_native([(seq, n)])
            return logits[0] if seq.num_cached == seq.num_prompt_tokens else None
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
            return self._prefill_native([(s, s.num_prompt_tokens - s.num_cached) for s in seqs])
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

    def _prefill_native(self, work: list) -> torch.Tensor:
        """The next ``n`` prompt tokens of each ``(seq, n)`` of ``work`` in one native forward pass: row
        after row, each sequence in a slot of a cache made for this pass (its cached tokens copied in);
        returns the logits of each sequence's last new token. Each sequence keeps its slot's keys and
        values (a view where it is alone in the pass, else a copy, so that no sequence's cache holds the
        others' memory)."""
        model, device = self.model, self.device
        ends = [seq.num_cached + n for seq, n in work]
        shape = (len(work), model.kv_heads, max(ends), model.head_dim)
        kv = [(torch.empty(shape, dtype=model.norm.dtype, device=device),
               torch.empty(shape, dtype=model.norm.dtype, device=device)) for _ in model.layers]
        ids, slots, positions = [], [], []
        for i, (seq, n) in enumerate(work):
            start = seq.num_cached
            for (k, v), (ck, cv) in zip(kv, seq.cache or []):
                k[i, :, :start], v[i, :, :start] = ck[0], cv[0]
            ids += seq.prompt_ids[start:start + n]
            slots += [i] * n
            positions += range(start, start + n)
        self.adapters.select([seq for seq, n in work for _ in range(n)])
        last = [row - 1 for row in accumulate(n for _, n in work)]  # each sequence's last row
        logits = model.forward_rows(*(torch.tensor(t, device=device) for t in (ids, slots, positions)), kv,
                                    torch.tensor(last, device=device))
        for i, ((seq, _), end) in enumerate(zip(work, ends)):
            seq.cache = [(k[i:i + 1, :, :end], v[i:i + 1, :, :end]) for k, v in kv]
            if len(work) > 1:
                seq.cache = [(k.clone(), v.clone()) for k, v in seq.cache]
            seq.num_cached = end
        return logits

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
        slots = self.slots.arrange(seqs)
        rows = self.slots.rows
        lengths = torch.tensor([s.num_cached for s in rows], device=self.device)
        input_ids = torch.tensor([s.output_ids[-1] for s in rows], device=self.device)
        if self.native:
            self.adapters.select(rows)
            index = torch.arange(len(rows), device=self.device)  # row i in slot i, its logits
            logits = self.model.forward_rows(input_ids, index, lengths, self.slots.kv, index)
        else:
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


class Sampler:
    """Turns one sequence's next-token logits into a token id, with that sequence's own parameters.

    Repetition penalty, temperature, top-k and top-p are transformers' own logits processors, so a
    greedy request matches ``model.generate`` token for token. OpenAI's presence and frequency
    penalties and ``min_tokens`` have no transformers counterpart and are applied here.
    """

    def __init__(self, params: SamplingParams):
        self.params = params
        penalties = []
        if params.repetition_penalty != 1.0:
            penalties.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
        self.penalties = LogitsProcessorList(penalties)
        warpers = []
        if not params.greedy:
            if params.temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k > 0:
                warpers.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                warpers.append(TopPLogitsWarper(params.top_p))
        self.warpers = LogitsProcessorList(warpers)
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator()
            if params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(params.seed % 2**64)  # any integer; torch takes 64 bits

    def is_plain_greedy(self, num_output_tokens: int) -> bool:
        """Whether the token is simply the argmax of the logits (batched by the engine)."""
        p = self.params
        return (p.greedy and not self.penalties and not p.presence_penalty and not p.frequency_penalty
                and not (num_output_tokens < p.min_tokens and p.stop_token_ids))

    def __call__(self, logits: torch.Tensor, prompt_ids: list[int], output_ids: list[int]) -> int:
        p = self.params
        scores = logits.float().reshape(1, -1).cpu().clone()  # a normal tensor, safe to edit in place
        history = torch.tensor([prompt_ids + output_ids]) if self.penalties or self.warpers else None
        if self.penalties:
            scores = self.penalties(history, scores)
        if output_ids and (p.presence_penalty or p.frequency_penalty):
            counts = torch.bincount(torch.tensor(output_ids), minlength=scores.shape[-1])[: scores.shape[-1]]
            scores = scores - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()
        if len(output_ids) < p.min_tokens and p.stop_token_ids:
            scores[0, list(p.stop_token_ids)] = float("-inf")
        if p.greedy:
            return int(scores.argmax(dim=-1))
        probs = torch.softmax(self.warpers(history, scores), dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def sample(seqs: list, logits: torch.Tensor) -> list[int | Exception]:
    """The next token of every sequence, row i of ``logits`` for ``seqs[i]``, each with its own sampler.
    Rows that only need an argmax are done in one batched call. A sampler that fails gives its
    exception in its row instead of a token, so that only its own sequence fails. A constrained
    sequence samples from the tokens its grammar allows (its row is masked in place)."""
    apply_masks(seqs, logits)
    tokens: list[int | Exception | None] = [None] * len(seqs)
    plain = [i for i, s in enumerate(seqs) if s.sampler.is_plain_greedy(len(s.output_ids))]
    if plain:  # (every row: no copy of the logits)
        greedy = (logits if len(plain) == len(seqs) else logits[plain]).argmax(dim=-1).tolist()
        for i, token in zip(plain, greedy):
            tokens[i] = token
    for i, seq in enumerate(seqs):
        if tokens[i] is None:
            try:
                tokens[i] = seq.sampler(logits[i], seq.prompt_ids, seq.output_ids)
            except Exception as e:  # e.g. probabilities that are not finite
                tokens[i] = e
        if not isinstance(tokens[i], Exception):
            try:
                accept(seq, tokens[i])
            except GrammarError as e:
                tokens[i] = e
    return tokens


def logprobs(logits: torch.Tensor, tokens: list[int], top: list[int]) -> list[tuple[float, list[tuple[int, float]]]]:
    """The model's log-probability of each chosen token and its ``top[i]`` most likely alternatives.

    These are the model's own distribution (before penalties and temperature), as OpenAI reports them.
    """
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, torch.tensor(tokens, device=lp.device).unsqueeze(1)).squeeze(1).tolist()
    k = max(top)
    values, ids = (lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long()))
    values, ids = values.tolist(), ids.tolist()
    return [(c, list(zip(ids[i][:top[i]], values[i][:top[i]]))) for i, c in enumerate(chosen)]
