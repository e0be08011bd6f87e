"""Owns the model and its tensors: loading with the configured placement, prefill and decode."""

from __future__ import annotations

import inspect
import logging
import os

import torch

from runners.engine import kv_cache

logger = logging.getLogger("bentochat.engine")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: str, checkpoint_dtype: str | None, on_gpu: bool) -> torch.dtype:
    if dtype != "auto":
        return DTYPES[dtype]
    if not on_gpu:
        return torch.float32  # half precision on CPU is slow and often unsupported
    return DTYPES.get(str(checkpoint_dtype), torch.float16)


def load_causal_lm(path: str, *, dtype: str = "auto", gpus: list[int] | None = None,
                   max_gpu_memory: str | None = None, trust_remote_code: bool = False):
    """Load a stored causal LM onto the configured GPUs (FastChat's --gpus/--max-gpu-memory) or the CPU."""
    from transformers import AutoConfig, AutoModelForCausalLM

    gpus = list(gpus or [])
    if gpus:
        # Pin this process to the configured GPUs before CUDA initializes; they are then cuda:0..n-1.
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
        if not torch.cuda.is_available():
            raise RuntimeError(f"gpus {gpus} are configured but CUDA is not available in this process")
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    torch_dtype = resolve_dtype(dtype, getattr(config, "dtype", None), bool(gpus))
    kwargs: dict = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if len(gpus) > 1 or max_gpu_memory:
        kwargs["device_map"] = "auto"
        if max_gpu_memory:
            kwargs["max_memory"] = {i: max_gpu_memory for i in range(len(gpus))}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if len(gpus) == 1 and not max_gpu_memory:
        model.to("cuda:0")
    model.eval()
    logger.info("loaded %s as %s on %s", path, torch_dtype, "GPUs " + str(gpus) if gpus else "CPU")
    return model


def _vocab_size(model) -> int:
    """How many token ids the model can embed (and so take as input, or be told to stop at)."""
    try:
        return int(model.get_input_embeddings().weight.shape[0])
    except (AttributeError, NotImplementedError):  # remote code without the accessor
        return int(model.config.vocab_size)


class ModelRunner:
    """Runs the model for the engine: prefill of new sequences (whole prompts together, a long one
    alone in chunks), and one decode step for the whole running batch.

    The running batch shares one left-padded KV cache (see ``kv_cache``): a sequence whose prefill
    finished joins it at the next decode step, and a finished one leaves it there, so the batch
    never drains. Each row's attention mask hides its padding and its position ids count only its
    own tokens, so a row computes what it would alone. Models whose cache cannot be batched, or whose
    forward takes no ``attention_mask``/``position_ids``, are decoded one sequence at a time.
    """

    def __init__(self, model):
        self.model = model
        self.device = next(model.parameters()).device
        accepts = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in accepts else "past_key_values"
        self.can_batch = "attention_mask" in accepts and "position_ids" in accepts
        self.vocab_size = _vocab_size(model)
        self.rows: list = []  # the sequences in the batch cache, in row order
        self.kv: kv_cache.KV | None = None  # its row i holds rows[i].num_cached tokens, right-aligned
        self.form = self._probe()  # "dynamic" | "tuple" | "sequential"
        logger.info("decoding %s", f"in batches ({self.form} cache)" if self.batched else "one sequence at a time")

    @torch.inference_mode()
    def _probe(self) -> str:
        """Which cache form the model returns, from a two-token forward pass (which also warms it up)."""
        if not self.can_batch:
            return "sequential"
        _, cache = self._run(torch.tensor([[0, 0]], device=self.device), None)
        return kv_cache.cache_form(cache, 1, 2) or "sequential"

    @property
    def batched(self) -> bool:
        return self.form in ("dynamic", "tuple")

    def _run(self, input_ids: torch.Tensor, cache, **kwargs):
        out = self.model(input_ids=input_ids, use_cache=True, **{self.cache_arg: cache}, **kwargs)
        if isinstance(out, tuple):  # remote code called without return_dict support
            return out[0], out[1]
        return out.logits, out[self.cache_arg] if self.cache_arg in out else out.past_key_values

    def kv_bytes(self) -> int:
        return kv_cache.kv_bytes(self.kv)

    def reset(self) -> None:
        """Drop the batch cache (nothing running, or a failed step)."""
        self.rows, self.kv = [], None

    @torch.inference_mode()
    def prefill(self, seq, max_tokens: int) -> torch.Tensor | None:
        """Feed up to ``max_tokens`` more prompt tokens of ``seq`` into its own cache; return the
        next-token logits once the whole prompt is in, else None."""
        start = seq.num_cached
        ids = seq.prompt_ids[start:start + max_tokens]
        kwargs, cache = {}, seq.cache
        if self.batched and cache is not None:
            end = start + len(ids)
            kwargs = {"attention_mask": torch.ones(1, end, dtype=torch.long, device=self.device),
                      "position_ids": torch.arange(start, end, device=self.device).unsqueeze(0)}
            cache = kv_cache.to_model_cache(cache, self.form)
        logits, cache = self._run(torch.tensor([ids], device=self.device), cache, **kwargs)
        seq.cache = kv_cache.to_kv(cache) if self.batched else cache
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
            cache = kv_cache.to_model_cache(kv_cache.concat([s.cache or empty for s in seqs]), self.form)
        logits, cache = self._run(input_ids, cache, attention_mask=mask, position_ids=positions)
        kv = kv_cache.to_kv(cache)
        for i, seq in enumerate(seqs):
            keep = (slice(past - cached[i], past), slice(past + width - len(new[i]), None))
            seq.cache = [tuple(torch.cat([t[i:i + 1, :, cols] for cols in keep], dim=2) for t in pair) for pair in kv]
            seq.num_cached = seq.num_prompt_tokens
        return logits[:, -1]

    @torch.inference_mode()
    def decode(self, seqs: list) -> torch.Tensor:
        """One step for every sequence in ``seqs`` (each has its last sampled token not yet in the
        cache); returns their next-token logits, row i for ``seqs[i]``."""
        if not self.batched:
            logits = []
            for seq in seqs:
                out, seq.cache = self._run(torch.tensor([[seq.output_ids[-1]]], device=self.device), seq.cache)
                seq.num_cached += 1
                logits.append(out[0, -1])
            return torch.stack(logits)
        self._arrange(seqs)
        width = self.kv[0][0].shape[2]
        lengths = torch.tensor([s.num_cached for s in self.rows], device=self.device)
        columns = torch.arange(width + 1, device=self.device)
        mask = (columns >= width - lengths.unsqueeze(1)).long()
        input_ids = torch.tensor([[s.output_ids[-1]] for s in self.rows], device=self.device)
        logits, cache = self._run(input_ids, kv_cache.to_model_cache(self.kv, self.form),
                                  attention_mask=mask, position_ids=lengths.unsqueeze(1))
        self.kv = kv_cache.to_kv(cache)
        for seq in self.rows:
            seq.num_cached += 1
        return logits[:, -1]

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
            parts.append(kv_cache.select(self.kv, kept, self.kv[0][0].shape[2] - longest))  # drop shared padding
        for seq in joining:
            parts.append(seq.cache)
            seq.cache = None  # now held by the batch cache
        self.kv = kv_cache.concat(parts) if parts else None
        self.rows = list(seqs)
