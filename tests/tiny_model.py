"""Builds a tiny Baichuan-style Hugging Face directory for tests: sentencepiece ``tokenizer.model``,
a custom tokenizer class in ``tokenization_tiny.py`` behind ``auto_map``, and a Llama-architecture
model saved as sharded pickle ``*.bin`` files with ``pytorch_model.bin.index.json``."""

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

VOCAB = 400

CORPUS = """The quick brown fox jumps over the lazy dog. Hello world, hello BentoChat.
A model answers questions. Users ask about mountains, rivers and cities.
The second highest mountain in the world is K2. Paris is the capital of France.
你好，世界。我们在测试中文分词和流式输出。山峰很高，河流很长。
"""


def build_tiny_model(out: Path, *, seed: int = 0) -> Path:
    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    corpus = out.parent / f"{out.name}-corpus.txt"
    corpus.write_text(CORPUS * 20, encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out / "tokenizer"), vocab_size=VOCAB, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, pad_id=-1, bos_id=1, eos_id=2, unk_id=0,
        user_defined_symbols=["<reserved_195>", "<reserved_196>"], minloglevel=2,
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

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(out)
    (out / "generation_config.json").write_text(json.dumps({
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "user_token_id": 195,
        "assistant_token_id": 196, "max_new_tokens": 64, "temperature": 0.3, "top_k": 5, "top_p": 0.85,
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
