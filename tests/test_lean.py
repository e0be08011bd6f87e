"""The lean forward on its own: every family it runs (Llama, Mistral, Qwen2 with q/k/v biases, Qwen3 with
q/k norms) decodes greedily as transformers' ``model.generate`` does, alone and in batches; bfloat16
rows do not depend on the batch, past oneDNN's inner block and row block too; the fused decode
attention gives a row the same result at any width; int8 weights (on the native forward and on torch's
int8 matmul), LoRA adapters on them; which models stay on
transformers' forward; what ``dtype: auto`` picks. (tests/test_engine.py runs the whole engine suite
on the lean forward as well.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from runners.engine import LLMEngine, ModelRunner, SamplingParams, Sequence
from runners.engine import native
from runners.engine.lean import LeanCausalLM, decode_width, fused_decode
from runners.engine.linear import Linear, cpu_bf16
from runners.engine.loader import load_causal_lm, resolve_dtype, unsupported

MIXED = [[1, 7], [1, 20, 30, 40, 50], [1] + list(range(100, 131)), [1, 250, 12, 9, 77, 5, 61, 200, 18, 3, 90]]
N = 16
bf16_packed = pytest.mark.skipif(not cpu_bf16(), reason="this CPU has no bfloat16 instructions for oneDNN")
native_forward = pytest.mark.skipif(native.ops() is None, reason="no native kernels on this machine (CPU or compiler)")


def tiny(family: str, dtype=torch.float32, intermediate: int = 96, scale: float = 0.3, **extra):
    """A random transformers model of ``family`` (eager attention, as the lean forward computes it),
    with weights large enough that greedy choices are clear, and no end-of-sequence token (which
    ``model.generate``'s ``min_new_tokens`` would forbid, and the engine would not); ``extra`` overrides
    its config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = dict(vocab_size=300, hidden_size=64, intermediate_size=intermediate, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                 tie_word_embeddings=False, eos_token_id=None)
    config = AutoConfig.for_model(family, **{**shape, **extra})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name else torch.randn_like(p) * scale)
    return model.to(dtype).eval()


def alone(model, prompt: list[int]) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=N, min_new_tokens=N, do_sample=False)
    return out[0, len(prompt):].tolist()


def batched(lean) -> list[list[int]]:
    engine = LLMEngine(ModelRunner(lean), max_num_seqs=8, max_model_len=256)
    return engine.generate_batch(MIXED, [SamplingParams(max_tokens=N, temperature=0)] * len(MIXED))


@pytest.mark.parametrize("family,extra", [("llama", {}), ("mistral", {"sliding_window": None}),
                                          ("qwen2", {}), ("qwen3", {})])
def test_each_family_decodes_as_model_generate_alone(family, extra):
    model = tiny(family, **extra)
    lean = LeanCausalLM(model)
    if family == "qwen2":
        assert lean.layers[0].qkv.bias is not None  # q, k and v projections have biases
    if family == "qwen3":
        assert lean.layers[0].q_norm is not None
    answers = batched(lean)
    assert answers == [alone(model, p) for p in MIXED]
    assert len({tuple(a) for a in answers}) == len(MIXED)  # rows did not get mixed up


def decode_step(lean, rows: list[list[int]], native_pass: bool) -> torch.Tensor:
    """One decode step's logits for the last token of each of ``rows`` (of any lengths) after the rest
    of it (prefilled), all rows in one step on the model runner's slot cache: the native forward or the
    Python one."""
    saved = lean.native
    try:
        lean.native = saved if native_pass else None
        runner = ModelRunner(lean)
        engine = LLMEngine(runner, max_num_seqs=len(rows), max_model_len=256)
        seqs = [Sequence(f"r{i}", row[:-1], SamplingParams(max_tokens=2, temperature=0)) for i, row in enumerate(rows)]
        for seq in seqs:
            engine.add(seq)
        engine.step()  # the prompts prefilled, a first token sampled: replaced by the row's last
        for seq, row in zip(seqs, rows):
            seq.output_ids[-1] = row[-1]
        return runner.decode(seqs)
    finally:
        lean.native = saved



def random_rows() -> list[list[int]]:
    """Eight token rows of lengths from 2 to 100, the same every call."""
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(1, 300, (n,), generator=generator).tolist() for n in (2, 7, 30, 65, 16, 100, 3, 41)]


def assert_rows_alike(lean, rows: list[list[int]], together: torch.Tensor) -> list[list[int]]:
    """On the native forward, each row's decode step alone gives the bits it got in the batch
    (``together``), on one thread and on two; and the engine decodes each prompt in a batch as alone.
    Returns the batch's answers."""
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert all(torch.equal(decode_step(lean, [rows[r]], True)[0], together[r]) for r in range(len(rows)))
    finally:
        torch.set_num_threads(before)
    engine = LLMEngine(ModelRunner(lean), max_num_seqs=8, max_model_len=256)
    answers = batched(lean)
    assert answers == [engine.generate(p, SamplingParams(max_tokens=N, temperature=0)) for p in MIXED]
    return answers

@native_forward
@pytest.mark.parametrize("kernels", [
    pytest.param("bfloat16 on AMX", marks=pytest.mark.skipif(not native.amx(), reason="no AMX")),
    pytest.param("bfloat16 on AVX-512 BF16", marks=pytest.mark.skipif(not native.cpu_has_avx512_bf16(),
                                                                     reason="no AVX-512 BF16")),
    pytest.param("bfloat16 on AVX2", marks=pytest.mark.skipif(native.level() != "avx2", reason="not the AVX2 level")),
    "float32"])
@pytest.mark.parametrize("family,extra", [("llama", {}), ("qwen2", {}), ("qwen3", {}),
                                          ("llama", {"head_dim": 24}),  # (a head not in whole vectors)
                                          ("llama", {"head_dim": 64}), ("llama", {"head_dim": 96})])  # (AMX's)
def test_the_native_forward_computes_the_python_forwards_maths(family, extra, kernels, monkeypatch):
    """BentoChat's native forward pass (every layer in one C++ call, on its own matmuls), which prefills
    and decodes bfloat16 models on AMX and float32 models on AVX-512, computes what the lean forward's
    Python path does: a decode step's logits within rounding of the Python step's (in bfloat16, as far
    from them as from float32's), the same greedy choices; a row gets the same bits alone and in any
    batch, on one thread and on two; and the engine decodes each prompt alone as in a batch, and in
    float32 as ``model.generate`` does. (A CPU without AMX runs bfloat16 on AVX-512 BF16: forced here.
    Attention runs on AMX tiles where the head dimension is a multiple of 32: 64 and 96 here, the second
    in two passes of the weighted sum.)"""
    if kernels == "bfloat16 on AVX-512 BF16":
        monkeypatch.setattr(native, "amx", lambda: False)
    dtype = torch.float32 if kernels == "float32" else torch.bfloat16
    model = tiny(family, dtype, **extra)
    lean = LeanCausalLM(model)
    assert lean.native is not None
    rows = random_rows()
    own, python = decode_step(lean, rows, True), decode_step(lean, rows, False)
    assert torch.equal(own.argmax(-1), python.argmax(-1))
    if dtype == torch.bfloat16:  # two roundings of float32's logits: no further from them than the other
        reference = decode_step(LeanCausalLM(tiny(family, torch.float32, **extra)), rows, False)
        error = (python - reference).abs().mean()
        assert (own - reference).abs().mean() <= 1.25 * error and (own - python).abs().mean() <= 2 * error
    else:  # float32 sums in other orders
        assert torch.allclose(own, python, rtol=1e-4, atol=1e-4 * float(python.abs().max()))
    answers = assert_rows_alike(lean, rows, own)
    if dtype == torch.float32:
        assert answers == [alone(model, p) for p in MIXED]


@bf16_packed
def test_bfloat16_rows_do_not_depend_on_the_batch():
    """An inner dimension past oneDNN's block (2112 > 1024, as down_proj has in most models) and batches
    past its row block (40 > 32), with as many output features as a model's layer and as a LoRA adapter's
    A (32): a row's product is the same whatever else is in the batch, on one thread and on two, so
    greedy decoding is batch invariant."""
    torch.manual_seed(0)
    x = torch.randn(40, 1, 2112).bfloat16()
    before = torch.get_num_threads()
    try:
        for out, threads in ((640, 1), (640, 2), (32, 2)):
            torch.set_num_threads(threads)
            linear = Linear((torch.randn(out, 2112) * 0.05).bfloat16())
            assert linear.packed and len(linear.blocks) == 3 and linear.row_block == 32
            alone = [linear(x[j:j + 1])[0] for j in range(len(x))]
            for m in (2, 5, 8, 16, 31, 32, 33, 40):
                assert all(torch.equal(linear(x[:m])[j], alone[j]) for j in range(m)), (out, threads, m)
    finally:
        torch.set_num_threads(before)
    model = tiny("llama", torch.bfloat16, intermediate=2112)
    lean = LeanCausalLM(model)
    engine = LLMEngine(ModelRunner(lean), max_num_seqs=8, max_model_len=256)
    greedy = SamplingParams(max_tokens=N, temperature=0)
    assert batched(lean) == [engine.generate(p, greedy) for p in MIXED]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_decode_attention_gives_a_row_the_same_result_at_any_width(dtype):
    """What the fused decode attention relies on: with the width a multiple of WIDTH_MULTIPLE and a
    row's columns from column 0, the masked columns past the row (up to past the kernel's 512-column
    block) do not change its result, nor do the other rows of the batch; where the kernel's rows depend
    on the batch on this CPU (measured: then the decode step attends with eager maths), a row alone at
    any width still gets one result. In either case an engine of widely different prompt lengths
    decodes each one as it does alone."""
    torch.manual_seed(0)
    keys, values = (torch.randn(8, 2, 1104, 16, dtype=dtype) for _ in range(2))
    lengths = torch.tensor([3, 40, 511, 512, 700, 1000, 17, 1090])
    width = decode_width(int(lengths.max()) + 1)
    q = torch.randn(8, 4, 1, 16, dtype=dtype)
    seen = (torch.arange(width) <= lengths[:, None])[:, None, None, :]
    mask = torch.zeros(seen.shape, dtype=dtype).masked_fill_(~seen, float("-inf"))  # additive, as the forward's
    attention = F.scaled_dot_product_attention
    together = attention(q, keys[:, :, :width], values[:, :, :width], attn_mask=mask, enable_gqa=True)
    fused = fused_decode(dtype, torch.device("cpu"))
    for r, length in enumerate(lengths.tolist()):
        w = decode_width(length + 1)
        alone = attention(q[r:r + 1], keys[r:r + 1, :, :w], values[r:r + 1, :, :w], attn_mask=mask[r:r + 1, ..., :w],
                          enable_gqa=True)
        at_width = attention(q[r:r + 1], keys[r:r + 1, :, :width], values[r:r + 1, :, :width],
                             attn_mask=mask[r:r + 1], enable_gqa=True)
        assert torch.equal(alone, at_width)
        assert torch.equal(alone, together[r:r + 1]) or not fused
    assert not fused_decode(torch.float16, torch.device("cpu"))
    lean = LeanCausalLM(tiny("llama", dtype))
    prompts = [[1, 7], [1] + [(5 * i) % 290 + 3 for i in range(600)], [1] + list(range(100, 131))]
    engine = LLMEngine(ModelRunner(lean), max_num_seqs=8, max_model_len=1024)
    greedy = SamplingParams(max_tokens=N, temperature=0)
    assert engine.generate_batch(prompts, [greedy] * 3) == [engine.generate(p, greedy) for p in prompts]


def teacher_forced_agreement(full, int8) -> float:
    """The share of next-token choices int8 makes as ``full`` does, fed ``full``'s greedy answers."""
    agree = 0
    for prompt, answer in zip(MIXED, batched(full)):
        ids = torch.tensor([prompt + answer])
        predicted = [m(ids, logits_to_keep=0).logits[0, len(prompt) - 1:-1].argmax(-1) for m in (full, int8)]
        agree += int((predicted[0] == predicted[1]).sum())
    return agree / (N * len(MIXED))


@pytest.mark.parametrize("matmul", ["auto", "onednn"])
def test_int8_weights_decode_batch_invariant_close_to_float32(matmul):
    """int8 on BentoChat's kernel and native forward (``auto``, where it runs) and on torch's int8 matmul
    and the Python pass (``onednn``)."""
    model = tiny("llama")
    full, int8 = LeanCausalLM(model), LeanCausalLM(model, int8=True, matmul=matmul)
    layer = int8.layers[0]
    if matmul == "auto" and native.ops() is not None:
        assert int8.native is not None
        assert layer.qkv.own.dtype == layer.down.own.dtype == int8.lm_head.own.dtype == torch.int8
    else:
        assert int8.native is None
        assert layer.qkv.weight.dtype == layer.down.weight.dtype == int8.lm_head.weight.dtype == torch.int8
    engine = LLMEngine(ModelRunner(int8), max_num_seqs=8, max_model_len=256)
    greedy = SamplingParams(max_tokens=N, temperature=0)
    answers = batched(int8)
    assert answers == [engine.generate(p, greedy) for p in MIXED]
    # Teacher-forced on float32's answers: int8 rounding moves a few near choices, not most.
    assert teacher_forced_agreement(full, int8) >= 0.8


@native_forward
@pytest.mark.skipif(not native.runs(torch.bfloat16), reason="no native bfloat16 on this CPU")
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_int8_on_the_native_forward_decodes_each_prompt_as_alone_and_mostly_as_bfloat16(family):
    """quantization: int8 on a bfloat16 model: the native forward on BentoChat's int8 kernel. A row gets the
    same logits alone and in a batch, on one thread and on two; the engine decodes each prompt in a batch
    as alone; teacher-forced on bfloat16's answers, int8 chooses mostly as bfloat16 does."""
    model = tiny(family, torch.bfloat16)
    full, int8 = LeanCausalLM(model), LeanCausalLM(model, int8=True)
    assert int8.native is not None and all(w.dtype == torch.int8 for w in int8.native[0])
    rows = random_rows()
    together = decode_step(int8, rows, True)
    assert torch.equal(together.argmax(-1), decode_step(int8, rows, False).argmax(-1))  # (Python pass, same kernel)
    assert_rows_alike(int8, rows, together)
    assert teacher_forced_agreement(full, int8) >= 0.75


@native_forward
def test_int8_plan_and_lora_adapters_on_an_int8_base(tiny_llama_dir, lora_adapters):
    """``quantization: int8`` runs on the native forward where it runs (else torch's int8 matmul and the
    Python pass, as with eager attention); LoRA adapters on an int8 base keep their A and B in the model's
    dtype, change the answers, and each (prompt, adapter) decodes the same alone and in a mixed batch."""
    from transformers import AutoConfig

    from runners.engine.loader import plan

    config = AutoConfig.from_pretrained(tiny_llama_dir)
    assert str(plan(config, dtype="float32", forward="lean", quantization="int8")) == (
        "float32, native forward, int8 matmuls, native attention")
    assert plan(config, dtype="float32", forward="lean", quantization="int8", attention="eager").forward == "lean"
    assert plan(config, dtype="float16", forward="lean", quantization="int8").forward == "lean"
    dtype = "bfloat16" if native.runs(torch.bfloat16) else "float32"
    lean = load_causal_lm(str(tiny_llama_dir), dtype=dtype, forward="lean", quantization="int8")
    assert lean.native is not None
    runner = ModelRunner(lean)
    engine = LLMEngine(runner, max_num_seqs=16, max_model_len=256)
    for name, path in lora_adapters.items():
        engine.add_adapter(runner.adapters.read(name, path))
    prompts = [[1, 7], [1, 20, 30, 40, 50], [1] + list(range(100, 131))]
    rows = [(p, a) for p in prompts for a in (None, *lora_adapters)]
    greedy = SamplingParams(max_tokens=N, temperature=0)
    alone = [engine.generate(p, greedy, a) for p, a in rows]
    assert engine.generate_batch([p for p, _ in rows], [greedy] * len(rows), [a for _, a in rows]) == alone
    assert len({tuple(alone[i]) for i in range(3)}) == 3  # each adapter changed the answer
    wrapped = next(layer for layer in runner.adapters.layers.values() if layer.rank)
    assert wrapped.base.own.dtype == torch.int8 and wrapped.mm_a.own.dtype == getattr(torch, dtype)


def test_models_outside_the_families_keep_transformers_forward(tiny_model_dir, tiny_llama_dir):
    remote = load_causal_lm(str(tiny_model_dir), trust_remote_code=True, forward="lean")
    assert not isinstance(remote, LeanCausalLM)  # remote code: its own modeling file
    assert "architecture tiny_baichuan" in unsupported(remote.config)
    assert unsupported(tiny("mistral", sliding_window=8).config) == "sliding-window attention"
    assert isinstance(load_causal_lm(str(tiny_llama_dir), forward="lean"), LeanCausalLM)
    assert not isinstance(load_causal_lm(str(tiny_llama_dir)), LeanCausalLM)  # forward="transformers"
    with pytest.raises(ValueError, match="quantization: int8 runs on the lean forward"):
        load_causal_lm(str(tiny_model_dir), trust_remote_code=True, forward="lean", quantization="int8")


def test_auto_dtype_is_bfloat16_on_the_lean_forward_where_the_cpu_has_it():
    assert resolve_dtype("auto", "bfloat16", on_gpu=False, lean=True) == (torch.bfloat16 if cpu_bf16() else torch.float32)
    native_bf16 = cpu_bf16() or native.level() == "avx2"  # (the AVX2 level's native pass widens bfloat16)
    assert resolve_dtype("auto", "bfloat16", on_gpu=False, lean=True, native_pass=True) == \
        (torch.bfloat16 if native_bf16 else torch.float32)
    assert resolve_dtype("auto", "bfloat16", on_gpu=False, lean=False) == torch.float32
    assert resolve_dtype("auto", "bfloat16", on_gpu=True) == torch.bfloat16  # the checkpoint's own on a GPU
    assert resolve_dtype("float32", None, on_gpu=False, lean=True) == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_gets_the_same_result_at_one_and_two_threads(dtype):
    """What the runner's thread count (``cpu_threads``) relies on: at SmolLM2's widths, where torch, oneDNN
    and BentoChat's kernels split the work between threads, the logits do not depend on the thread count;
    an engine sets its count before each step, and decodes the same tokens on one thread as on two."""
    model = tiny("llama", dtype, intermediate=1536, scale=0.05, hidden_size=576, num_attention_heads=9,
                 num_key_value_heads=3, head_dim=64)
    lean = LeanCausalLM(model)
    before = torch.get_num_threads()
    ids = torch.randint(0, 300, (40, 12), generator=torch.Generator().manual_seed(0))
    try:
        logits = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            logits[threads] = [lean(ids[:b], logits_to_keep=0).logits for b in (1, 17, 40)]
        assert all(torch.equal(a, b) for a, b in zip(logits[1], logits[2]))
        greedy = SamplingParams(max_tokens=N, temperature=0)
        answers = {}
        for threads in (1, 2):
            engine = LLMEngine(ModelRunner(lean), max_num_seqs=8, max_model_len=256, threads=threads)
            torch.set_num_threads(3 - threads)
            answers[threads] = engine.generate_batch(MIXED, [greedy] * len(MIXED))
            assert torch.get_num_threads() == threads
        assert answers[1] == answers[2]
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not native.amx(), reason="no AMX on this CPU")
def test_a_prompt_gets_the_same_bits_in_chunks_of_any_size_on_amx_tiles():
    """Attention on AMX tiles (head dimension 64, three query heads a key-value head, as SmolLM2-135M's):
    a chunk's rows attend five at a time, over values paired once for all those passes (whole blocks of
    32 columns; each pass pairs its last, partial block), their scores transposed out of the tile. The
    prompt's first token's logits and every decode step's are the bits it gets when it is prefilled one
    token a step (one row a pass: nothing kept, the scores gathered)."""
    lean = LeanCausalLM(tiny("llama", torch.bfloat16, hidden_size=192, num_attention_heads=3, num_key_value_heads=1,
                             head_dim=64))
    prompt = [1] + [(7 * i) % 290 + 3 for i in range(150)]
    forward_rows, seen = lean.forward_rows, []
    lean.forward_rows = lambda *args: seen.append(forward_rows(*args)) or seen[-1]
    logits = []
    for budget in (1, 40, 200):
        seen.clear()
        engine = LLMEngine(ModelRunner(lean), max_num_seqs=1, max_model_len=256, max_prefill_tokens=budget)
        assert engine.model_runner.native  # (the native pass)
        engine.generate(prompt, SamplingParams(max_tokens=N, temperature=0))
        logits.append(torch.cat([y for y in seen if y.numel()]))
    assert len(logits[0]) == N and all(torch.equal(y, logits[0]) for y in logits[1:])
