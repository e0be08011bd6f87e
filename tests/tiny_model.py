"""Builds tiny Baichuan-style Hugging Face directories for tests: sentencepiece ``tokenizer.model``,
a custom tokenizer class in ``tokenization_tiny.py`` behind ``auto_map``, weights saved as sharded
pickle ``*.bin`` files with ``pytorch_model.bin.index.json``, and either custom modeling code
(``configuration_tiny.py``/``modeling_tiny.py``, a fused ``W_pack`` projection and a legacy tuple KV
cache, as Baichuan-7B ships) or transformers' own Llama."""

from __future__ import annotations

import json
from pathlib import Path

TOKENIZER_CODE = '''
import os
import shutil

import sentencepiece as spm
from transformers import PreTrainedTokenizer


class TinyTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>", **kwargs):
        self.vocab_file = vocab_file
        self.sp_model = spm.SentencePieceProcessor()
        self.sp_model.Load(vocab_file)
        super().__init__(bos_token=bos_token, eos_token=eos_token, unk_token=unk_token, pad_token=pad_token, **kwargs)

    @property
    def vocab_size(self):
        return self.sp_model.get_piece_size()

    def get_vocab(self):
        vocab = {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text):
        return self.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token):
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index):
        return self.sp_model.id_to_piece(index)

    def convert_tokens_to_string(self, tokens):
        return self.sp_model.decode(tokens)

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        ids = [self.bos_token_id] + token_ids_0
        return ids if token_ids_1 is None else ids + token_ids_1

    def save_vocabulary(self, save_directory, filename_prefix=None):
        out = os.path.join(save_directory, (filename_prefix or "") + "tokenizer.model")
        if os.path.abspath(self.vocab_file) != os.path.abspath(out):
            shutil.copyfile(self.vocab_file, out)
        return (out,)
'''

CONFIG_CODE = '''
from transformers import PretrainedConfig


class TinyBaichuanConfig(PretrainedConfig):
    model_type = "tiny_baichuan"

    def __init__(self, vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1,
                 eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
'''

MODELING_CODE = '''
import math

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_tiny import TinyBaichuanConfig


class RMSNorm(nn.Module):
    def __init__(self, size, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.heads
        self.W_pack = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x, mask, cos, sin, past):
        b, n, h = x.shape
        q, k, v = self.W_pack(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + mask
        out = torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v
        return self.o_proj(out.transpose(1, 2).reshape(b, n, h)), (k, v)


class Layer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x, mask, cos, sin, past):
        attn, present = self.self_attn(self.input_layernorm(x), mask, cos, sin, past)
        x = x + attn
        y = self.post_attention_layernorm(x)
        return x + self.down_proj(nn.functional.silu(self.gate_proj(y)) * self.up_proj(y)), present


class TinyBaichuanForCausalLM(PreTrainedModel):
    config_class = TinyBaichuanConfig
    base_model_prefix = "model"

    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([Layer(config) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=True, return_dict=True, **kwargs):
        b, n = input_ids.shape
        past_len = past_key_values[0][0].shape[2] if past_key_values else 0
        total = past_len + n
        if position_ids is None:
            position_ids = torch.arange(past_len, total, device=input_ids.device).expand(b, n)
        if attention_mask is None:
            attention_mask = torch.ones(b, total, dtype=torch.long, device=input_ids.device)
        x = self.embed_tokens(input_ids)
        low = torch.finfo(x.dtype).min
        causal = torch.full((n, total), low, device=x.device).triu(past_len + 1)
        mask = (causal[None, None] + (1 - attention_mask[:, None, None, :].to(x.dtype)) * low).clamp(min=low)
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=x.device).float() / head_dim))
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        presents = []
        for i, layer in enumerate(self.layers):
            x, present = layer(x, mask, cos, sin, past_key_values[i] if past_key_values else None)
            presents.append(present)
        logits = self.lm_head(self.norm(x))
        cache = tuple(presents) if use_cache else None
        if not return_dict:
            return logits, cache
        return CausalLMOutputWithPast(logits=logits, past_key_values=cache)
'''

# Baichuan's role tokens are reserved pieces at ids 195 and 196; here too: pieces <reserved_3> ..
# <reserved_196> follow <unk> <s> </s>, so <reserved_N> has id N.
RESERVED = [f"<reserved_{i}>" for i in range(3, 197)]
USER_TOKEN_ID, ASSISTANT_TOKEN_ID = 195, 196
VOCAB = 400 + len(RESERVED) - 2

CORPUS = """The quick brown fox jumps over the lazy dog. Hello world, hello BentoChat.
A model answers questions. Users ask about mountains, rivers and cities.
The second highest mountain in the world is K2. Paris is the capital of France.
你好，世界。我们在测试中文分词和流式输出。山峰很高，河流很长。
"""


BAICHUAN_CHAT = [
    {"role": "system", "content": "You answer about mountains."},
    {"role": "user", "content": "Which is the second highest mountain?"},
    {"role": "assistant", "content": "K2."},
    {"role": "user", "content": "你好，山峰很高"},
]


def baichuan_ids_by_hand(sp, messages) -> list[int]:
    """Baichuan's build_chat_input: system text, each message's text after its role id, the assistant's id
    last; encoded with the sentencepiece model itself, not the tokenizer class."""
    ids = []
    for m in messages:
        if m["role"] == "system":
            ids += sp.encode(m["content"])
        else:
            ids += [USER_TOKEN_ID if m["role"] == "user" else ASSISTANT_TOKEN_ID] + sp.encode(m["content"])
    return ids + [ASSISTANT_TOKEN_ID]


def build_tiny_model(out: Path, *, remote_code: bool = True, seed: int = 0, context: int = 256) -> Path:
    import sentencepiece as spm
    import torch

    out.mkdir(parents=True, exist_ok=True)
    corpus = out.parent / f"{out.name}-corpus.txt"
    corpus.write_text(CORPUS * 20, encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out / "tokenizer"), vocab_size=VOCAB, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, pad_id=-1, bos_id=1, eos_id=2, unk_id=0,
        user_defined_symbols=RESERVED, minloglevel=2,
    )
    (out / "tokenizer.vocab").unlink()
    (out / "tokenization_tiny.py").write_text(TOKENIZER_CODE)
    (out / "tokenizer_config.json").write_text(json.dumps({
        "auto_map": {"AutoTokenizer": ["tokenization_tiny.TinyTokenizer", None]},
        "tokenizer_class": "TinyTokenizer", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": "<unk>", "model_max_length": 256,
        "clean_up_tokenization_spaces": False,
    }, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}))

    dims = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=context, bos_token_id=1, eos_token_id=2,
                pad_token_id=0, tie_word_embeddings=False)
    if remote_code:
        from transformers import AutoConfig, AutoModelForCausalLM

        (out / "configuration_tiny.py").write_text(CONFIG_CODE)
        (out / "modeling_tiny.py").write_text(MODELING_CODE)
        (out / "config.json").write_text(json.dumps({
            **dims, "model_type": "tiny_baichuan", "torch_dtype": "float32", "architectures": ["TinyBaichuanForCausalLM"],
            "auto_map": {"AutoConfig": "configuration_tiny.TinyBaichuanConfig",
                         "AutoModelForCausalLM": "modeling_tiny.TinyBaichuanForCausalLM"},
        }, indent=2))
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out, trust_remote_code=True),
                                                 trust_remote_code=True)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(num_key_value_heads=2, **dims)
        config.architectures = ["LlamaForCausalLM"]
        config.save_pretrained(out)
        model = LlamaForCausalLM(config)
    torch.manual_seed(seed)
    with torch.no_grad():  # weights large enough that greedy choices are clear, not near-ties
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name else torch.randn_like(p) * 0.3)
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "user_token_id": USER_TOKEN_ID,
        "assistant_token_id": ASSISTANT_TOKEN_ID, "max_new_tokens": 64, "temperature": 0.3, "top_k": 5, "top_p": 0.85,
        "repetition_penalty": 1.1, "do_sample": True,
    }, indent=2))

    # Two pickle shards and their index, as Baichuan ships them.
    state = model.state_dict()
    names = list(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    weight_map = {}
    for file, keys in shards.items():
        torch.save({k: state[k] for k in keys}, out / file)
        weight_map.update({k: file for k in keys})
    total = sum(v.numel() * v.element_size() for v in state.values())
    (out / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return out


def build_tiny_bpe_model(out: Path, *, context: int = 1024, seed: int = 0) -> Path:
    """A tiny Llama with random weights and a byte-level BPE fast tokenizer (GPT-2 style, as SmolLM2,
    Qwen and Llama 3 have), trained here on the corpus. Token ids: <s> 0, </s> 1, <unk> 2."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([CORPUS] * 20, vocab_size=600, min_frequency=1, special_tokens=["<s>", "</s>", "<unk>"])
    PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(out)
    config = LlamaConfig(vocab_size=bpe.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                         bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name else torch.randn_like(p) * 0.3)
    model.save_pretrained(out)
    return out


def build_tiny_adapter(base_dir: Path, out: Path, *, seed: int, rank: int = 8,
                       targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj")) -> Path:
    """A PEFT LoRA adapter of the model in ``base_dir``, saved with PEFT itself: random A and B, large
    enough that greedy answers differ from the base model's."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, trust_remote_code=True)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), init_lora_weights=False,
                        lora_dropout=0.0)
    peft_model = get_peft_model(model, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    peft_model.save_pretrained(out)
    return out
