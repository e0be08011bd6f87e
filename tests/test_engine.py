"""The engine in-process, on the tiny models: exact greedy decoding alone and in continuous batches,
per-request sampling, chunked prefill, logprobs, abort; each on transformers' forward and on the lean
forward (float32, bfloat16), whose reference is ``model.generate`` in the same dtype."""

from __future__ import annotations

import asyncio

import pytest
import torch

from runners.engine import AsyncLLMEngine, LLMEngine, ModelRunner, SamplingParams, Sequence
from runners.engine.lean import LeanCausalLM
from runners.engine.loader import load_causal_lm


@pytest.fixture(scope="module", params=["transformers", "lean", "lean-bf16", "lean-bf16-fused"])
def model(tiny_llama_dir, request):
    """The tiny Llama on transformers' forward, or on the lean forward in float32 or bfloat16 with the
    transformers model it was made from (eager attention, as the lean forward computes it) as its
    ``reference``, which ``model.generate`` runs. "lean" and "lean-bf16-fused" decode with the fused
    attention kernel: in float32 its tokens are still model.generate's; in bfloat16 the reference is the
    same model run alone in the engine (no reference set), so the tests check batch invariance."""
    if request.param == "transformers":
        return load_causal_lm(str(tiny_llama_dir))
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if request.param == "lean" else torch.bfloat16
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=dtype, attn_implementation="eager").eval()
    lean = LeanCausalLM(hf, fused_attention=request.param != "lean-bf16")
    if request.param != "lean-bf16-fused":
        lean.__dict__["reference"] = hf  # not a submodule
    return lean


def reference(model):
    return model.__dict__.get("reference", model)


def hf_reference(model):
    """The transformers model to run ``model.generate`` on; skips for the bfloat16 fused path, which has none."""
    if isinstance(reference(model), LeanCausalLM):
        pytest.skip("bfloat16 with fused attention: not token for token model.generate's (docs/performance.md)")
    return reference(model)


@pytest.fixture()
def engine(model):
    return LLMEngine(ModelRunner(model), max_num_seqs=8, max_model_len=256)


@pytest.fixture(scope="module")
def remote_model(tiny_model_dir):
    return load_causal_lm(str(tiny_model_dir), trust_remote_code=True)


PROMPT = [1, 20, 30, 40, 50]
MIXED = [[1, 7], [1, 20, 30, 40, 50], [1] + list(range(100, 131)), [1, 300, 12, 9, 77, 5, 61, 200, 18, 3, 90]]


def generate_alone(model, prompt, n):
    if isinstance(reference(model), LeanCausalLM):  # the sequence alone in an engine of its own
        return LLMEngine(ModelRunner(model), max_num_seqs=1, max_model_len=256).generate(
            prompt, SamplingParams(max_tokens=n, temperature=0))
    out = reference(model).generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                    repetition_penalty=1.0)
    return out[0, len(prompt):].tolist()


def test_batch_forms(model, remote_model):
    assert ModelRunner(model).form == "dynamic"
    assert ModelRunner(remote_model).form == "tuple"  # the remote code's legacy cache


def test_greedy_is_batch_invariant(model):
    """Mixed prompt lengths prefilled together, then decoded in one left-padded batch."""
    engine = LLMEngine(ModelRunner(model), max_num_seqs=8, max_model_len=256)
    together = engine.generate_batch(MIXED, [SamplingParams(max_tokens=24, temperature=0)] * len(MIXED))
    assert together == [generate_alone(model, p, 24) for p in MIXED]


def test_greedy_is_batch_invariant_with_remote_code_tuple_cache(remote_model):
    engine = LLMEngine(ModelRunner(remote_model), max_num_seqs=8, max_model_len=256)
    greedy = SamplingParams(max_tokens=24, temperature=0)
    alone = [engine.generate(p, greedy) for p in MIXED]
    assert engine.generate_batch(MIXED, [greedy] * len(MIXED)) == alone
    assert len({tuple(a) for a in alone}) == len(MIXED)  # distinct answers: rows did not get mixed up


def test_requests_join_and_leave_a_running_batch(model):
    """A request joins at the next step, a short one leaves early; nobody's tokens change."""
    engine = LLMEngine(ModelRunner(model), max_num_seqs=8, max_model_len=256)
    long = Sequence("long", MIXED[2], SamplingParams(max_tokens=30, temperature=0))
    engine.add(long)
    for _ in range(5):
        engine.step()
    short = Sequence("short", MIXED[0], SamplingParams(max_tokens=3, temperature=0))
    late = Sequence("late", MIXED[3], SamplingParams(max_tokens=20, temperature=0))
    engine.add(short)
    engine.add(late)
    steps = 0
    while long.finish_reason is None:
        engine.step()
        steps += 1
        if short.finish_reason:
            assert engine.scheduler.running == [long, late] or late.finish_reason
    assert short.output_ids == generate_alone(model, MIXED[0], 3)
    assert late.output_ids == generate_alone(model, MIXED[3], 20)
    assert long.output_ids == generate_alone(model, MIXED[2], 30)
    assert steps == 25  # the long request never waited for the others


def test_long_prompt_is_prefilled_in_chunks_without_stalling_others(model):
    engine = LLMEngine(ModelRunner(model), max_num_seqs=8, max_model_len=256, max_prefill_tokens=8)
    running = Sequence("running", PROMPT, SamplingParams(max_tokens=20, temperature=0))
    engine.add(running)
    engine.step()
    long = Sequence("long", MIXED[2], SamplingParams(max_tokens=10, temperature=0))  # 32 tokens: 4 chunks
    engine.add(long)
    for step in range(4):
        produced = [seq.request_id for seq, _ in engine.step()]
        assert "running" in produced  # a token every step while the long prompt goes in
        assert ("long" in produced) == (step == 3)
    while engine.scheduler.has_work:
        engine.step()
    assert running.output_ids == generate_alone(model, PROMPT, 20)
    assert long.output_ids == generate_alone(model, MIXED[2], 10)


def test_a_prompt_a_few_tokens_past_the_budget_takes_one_step(model):
    """A prompt's rest that exceeds the step's prefill budget by an eighth or less goes in whole, not in a
    chunk and a pass of its few last tokens; a longer one is still chunked."""
    engine = LLMEngine(ModelRunner(model), max_num_seqs=8, max_model_len=256, max_prefill_tokens=16)
    near = Sequence("near", list(range(1, 19)), SamplingParams(max_tokens=4, temperature=0))  # 18 = 16 + 2
    far = Sequence("far", list(range(1, 20)), SamplingParams(max_tokens=4, temperature=0))  # 19: two chunks
    engine.add(near)
    assert [seq.request_id for seq, _ in engine.step()] == ["near"]
    engine.add(far)
    assert "far" not in [seq.request_id for seq, _ in engine.step()]
    while engine.scheduler.has_work:
        engine.step()
    assert near.output_ids == generate_alone(model, list(range(1, 19)), 4)
    assert far.output_ids == generate_alone(model, list(range(1, 20)), 4)


def test_the_native_pass_runs_a_whole_step_at_once(model, monkeypatch):
    """On the native forward pass, a step's decodes, a prompt that ends and another's first chunk are one
    pass (the weights read once for all of them); the ending prompt's first token comes with the running
    one's next, and every answer is as alone."""
    if not ModelRunner(model).native:
        pytest.skip("the native forward pass only")
    engine = LLMEngine(ModelRunner(model), max_num_seqs=8, max_model_len=256, max_prefill_tokens=8)
    passes = []
    real = model.forward_rows
    monkeypatch.setattr(model, "forward_rows", lambda *args: passes.append(len(args[0])) or real(*args))
    running = Sequence("running", PROMPT, SamplingParams(max_tokens=20, temperature=0))
    engine.add(running)
    engine.step()
    short = Sequence("short", MIXED[0], SamplingParams(max_tokens=5, temperature=0))  # 2 tokens
    long = Sequence("long", MIXED[2], SamplingParams(max_tokens=10, temperature=0))  # 32 tokens
    engine.add(short)
    engine.add(long)
    passes.clear()
    produced = [seq.request_id for seq, _ in engine.step()]
    assert passes == [1 + 2 + 6] and produced == ["running", "short"]
    while engine.scheduler.has_work:
        passes.clear()
        engine.step()
        assert len(passes) == 1
    assert running.output_ids == generate_alone(model, PROMPT, 20)
    assert short.output_ids == generate_alone(model, MIXED[0], 5)
    assert long.output_ids == generate_alone(model, MIXED[2], 10)


def test_the_slot_cache_grows_and_refills_slots_without_changing_tokens(model, monkeypatch):
    """Sequences of many lengths join and leave a batch whose buffers start small (2 slots, 16 columns):
    slots are refilled from the last one, buffers grow mid-decode; every answer stays what it is alone."""
    from runners.engine.kv_cache import SlotCache

    monkeypatch.setattr(SlotCache, "ROWS_CHUNK", 2)
    monkeypatch.setattr(SlotCache, "COLUMNS_CHUNK", 16)
    engine = LLMEngine(ModelRunner(model), max_num_seqs=5, max_model_len=256)
    if engine.model_runner.pool is not None:
        pytest.skip("the native forward pass's cache is paged (test_a_small_paged_cache_preempts...)")
    prompts = [MIXED[i % 4] + [60 + i] for i in range(11)]
    lengths = [3, 25, 7, 1, 18, 12, 30, 2, 9, 21, 5]
    seqs = [Sequence(f"s{i}", p, SamplingParams(max_tokens=n, temperature=0)) for i, (p, n) in enumerate(zip(prompts, lengths))]
    for seq in seqs:
        engine.add(seq)
    shapes = set()
    while engine.scheduler.has_work:
        engine.step()
        if engine.model_runner.slots.kv is not None:
            shapes.add(tuple(engine.model_runner.slots.kv[0][0].shape))
    assert [seq.output_ids for seq in seqs] == [generate_alone(model, p, n) for p, n in zip(prompts, lengths)]
    assert max(s[0] for s in shapes) == 6 and max(s[2] for s in shapes) >= 48  # grew past its first chunks


def test_a_small_paged_cache_preempts_and_resumes_without_changing_tokens(model, caplog):
    """On the native forward pass's paged cache of 12 blocks (192 tokens), 11 sequences of up to 93
    tokens, 5 at a time: the blocks never run out, sequences are preempted and resumed, every answer
    stays what it is alone, and every block is free again at the end but the prefix cache's."""
    per_block = ModelRunner(model).pool
    if per_block is None:
        pytest.skip("no native forward pass: its cache is the slot cache")
    runner = ModelRunner(model, kv_cache_memory=12 * per_block.block_bytes)
    engine = LLMEngine(runner, max_num_seqs=5, max_model_len=256, prefix_cache_tokens=64)
    assert engine.scheduler.max_model_len == 192 and "raise kv_cache_memory" in caplog.text
    prompts = [MIXED[i % 4] + [60 + i] for i in range(11)]
    lengths = [40, 25, 47, 1, 38, 12, 60, 2, 29, 41, 5]
    seqs = [Sequence(f"s{i}", p, SamplingParams(max_tokens=n, temperature=0)) for i, (p, n) in enumerate(zip(prompts, lengths))]
    for seq in seqs:
        engine.add(seq)
    most = 0
    while engine.scheduler.has_work:
        engine.step()
        most = max(most, runner.pool.num_blocks - runner.pool.num_free)
    assert [seq.output_ids for seq in seqs] == [generate_alone(model, p, n) for p, n in zip(prompts, lengths)]
    assert engine.stats()["preemptions"] > 0 and most == 12
    held = sum(len(blocks) for blocks in engine.scheduler.prefix_cache.entries.values())
    assert runner.pool.num_free == 12 - held and engine.stats()["kv_cache_bytes"] == held * runner.pool.block_bytes


SYSTEM = [1] + list(range(200, 216))  # a shared "system prompt" of 17 tokens


def check_prefix_reuse(model) -> list[list[int]]:
    """Prompts starting like an earlier one skip its tokens, alone, in a chunk and in a mixed batch
    (hits and misses prefilled together); nobody's tokens change. Returns the answers alone."""
    runner = ModelRunner(model)
    greedy = SamplingParams(max_tokens=12, temperature=0)
    plain = LLMEngine(runner, max_num_seqs=8, max_model_len=256)
    alone = [plain.generate(p, greedy) for p in PREFIXED]
    engine = LLMEngine(runner, max_num_seqs=8, max_model_len=256, max_prefill_tokens=12, prefix_cache_tokens=256)
    assert engine.generate(PREFIXED[0], greedy) == alone[0]
    assert engine.stats()["prefix_cache_hit_tokens"] == 0
    # in one step: three hits (the whole prompt is cached: all but its last token), one miss, and a
    # 37-token prompt whose uncached 20 tokens go in two chunks
    assert engine.generate_batch(PREFIXED[1:], [greedy] * 5) == alone[1:]
    whole = engine.scheduler.prefix_cache.granularity  # (the paged cache reuses whole blocks of 16)
    assert engine.stats()["prefix_cache_hit_tokens"] == sum(n // whole * whole for n in (17, 17, 16, 17))
    return alone


PREFIXED = [SYSTEM + [5, 6, 7], SYSTEM + [8, 9], SYSTEM + [8, 9, 10, 11], SYSTEM, [5, 7], SYSTEM + list(range(60, 80))]


def test_the_loaded_lean_model_keeps_nothing_of_the_checkpoint(tiny_llama_dir, tmp_path):
    """transformers maps a checkpoint's files whole; once the lean forward holds its own copies, they are
    no longer mapped, and its answers are those of transformers' model on the same weights."""
    import shutil

    from transformers import AutoModelForCausalLM

    checkpoint = shutil.copytree(tiny_llama_dir, tmp_path / "checkpoint")  # (mapped by this test's load only)
    lean = load_causal_lm(str(checkpoint), forward="lean", dtype="float32", attention="eager", matmul="onednn")
    with open("/proc/self/maps") as maps:
        assert str(checkpoint) not in maps.read()
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32,
                                              attn_implementation="eager").eval()
    engine = LLMEngine(ModelRunner(lean), max_num_seqs=4, max_model_len=256)
    greedy = SamplingParams(max_tokens=8, temperature=0)
    assert engine.generate_batch(MIXED, [greedy] * len(MIXED)) == [generate_alone(hf, p, 8) for p in MIXED]


def test_shared_prompt_prefix_is_reused_with_unchanged_output(model):
    assert check_prefix_reuse(model) == [generate_alone(model, p, 12) for p in PREFIXED]


def test_prompts_arriving_together_share_their_common_prefix(model):
    """Two prompts with a 40-token document in common after a 16-token system prompt that an earlier
    prompt left in the prefix cache, added together: the second waits for the first's prompt to be cached
    instead of computing the same blocks in the same step, then starts from it; all answer as alone."""
    runner = ModelRunner(model)
    greedy = SamplingParams(max_tokens=6, temperature=0)
    system, document = list(range(200, 216)), list(range(100, 140))
    earlier, prompts = system + [5, 6], [system + document + [7, 8], system + document + [9, 10, 11]]
    alone = [LLMEngine(runner, max_num_seqs=4, max_model_len=256).generate(p, greedy) for p in [earlier, *prompts]]
    engine = LLMEngine(runner, max_num_seqs=4, max_model_len=256, max_prefill_tokens=128, prefix_cache_tokens=256)
    assert engine.generate(earlier, greedy) == alone[0]
    assert engine.generate_batch(prompts, [greedy] * 2) == alone[1:]
    whole = engine.scheduler.prefix_cache.granularity
    assert engine.stats()["prefix_cache_hit_tokens"] == 16 + 16 + 40 // whole * whole


def test_a_sequences_first_token_says_how_much_of_its_prompt_the_prefix_cache_gave(model):
    """What usage reports as cached tokens: counted when a sequence's prefill starts (a long prompt goes
    in chunks after it), on its first token's event only. Before, no event said it."""
    engine = LLMEngine(ModelRunner(model), max_num_seqs=4, max_model_len=256, max_prefill_tokens=12,
                       prefix_cache_tokens=256)
    greedy = SamplingParams(max_tokens=3, temperature=0)
    engine.generate(SYSTEM + [5, 6, 7], greedy)
    for seq in (Sequence("hit", SYSTEM + list(range(60, 80)), greedy), Sequence("miss", [5, 7], greedy)):
        engine.add(seq)
    events: dict[str, list] = {"hit": [], "miss": []}
    while engine.scheduler.has_work:
        for seq, event in engine.step():
            events[seq.request_id].append(event.cached_tokens)
    whole = engine.scheduler.prefix_cache.granularity
    assert events == {"hit": [17 // whole * whole, None, None], "miss": [0, None, None]}


def test_shared_prompt_prefix_is_reused_with_remote_code_tuple_cache(remote_model):
    check_prefix_reuse(remote_model)


def test_prefix_cache_keeps_to_its_token_budget():
    from runners.engine.scheduler import PrefixCache

    kv = lambda n: [(torch.zeros(1, 2, n, 4), torch.zeros(1, 2, n, 4))]  # noqa: E731
    cache = PrefixCache(max_tokens=10)
    cache.store([1, 2, 3], kv(3))
    cache.store([1, 2, 3, 4, 5], kv(5))  # covers the first: replaces it
    assert list(cache.entries) == [(None, None, (1, 2, 3, 4, 5))] and cache.num_tokens == 5
    cache.store([7, 8, 9, 10], kv(4))
    n, found = cache.lookup([1, 2, 3, 9])
    assert n == 3 and found[0][0].shape[2] == 3
    cache.store([6, 6, 6], kv(3))  # over budget: the least recently used (7, 8, 9, 10) goes
    assert list(cache.entries) == [(None, None, (1, 2, 3, 4, 5)), (None, None, (6, 6, 6))] and cache.num_tokens == 8
    assert cache.lookup([1, 2, 3, 4, 5])[0] == 4  # its last token's logits are needed
    assert cache.lookup([2, 3])[0] == 0
    cache.store(list(range(11)), kv(11))  # longer than the whole budget: not kept
    assert cache.num_tokens == 8


def test_prefix_cache_gives_a_tenant_only_its_own_prompts():
    """A prompt another tenant sent is no hit: its speed, and the cached tokens usage reports, would tell
    a tenant what another one asked. Before, entries were kept per adapter only."""
    from runners.engine.scheduler import PrefixCache

    kv = lambda n: [(torch.zeros(1, 2, n, 4), torch.zeros(1, 2, n, 4))]  # noqa: E731
    cache = PrefixCache(max_tokens=20)
    cache.store([1, 2, 3, 4], kv(4), tenant="a")
    assert cache.lookup([1, 2, 3, 4, 5], tenant="b")[0] == 0 and cache.lookup([1, 2, 3, 4, 5])[0] == 0
    assert cache.lookup([1, 2, 3, 4, 5], tenant="a")[0] == 4
    cache.store([1, 2, 3, 4, 5], kv(5), tenant="b")  # covers a's prompt, but is b's: both kept
    assert len(cache.entries) == 2


def test_greedy_matches_model_generate(model, engine):
    ref = hf_reference(model).generate(torch.tensor([PROMPT]), max_new_tokens=20, do_sample=False, min_new_tokens=20,
                                    repetition_penalty=1.0)
    assert engine.generate(PROMPT, SamplingParams(max_tokens=20, temperature=0)) == ref[0, len(PROMPT):].tolist()


def test_repetition_penalty_matches_model_generate(model, engine):
    ref = hf_reference(model).generate(torch.tensor([PROMPT]), max_new_tokens=20, do_sample=False,
                                    repetition_penalty=1.5, min_new_tokens=20)
    out = engine.generate(PROMPT, SamplingParams(max_tokens=20, temperature=0, repetition_penalty=1.5))
    assert out == ref[0, len(PROMPT):].tolist()


def test_seeded_sampling_reproduces_and_differs_by_seed(engine):
    def run(seed):
        return engine.generate(PROMPT, SamplingParams(max_tokens=30, temperature=1.0, seed=seed))

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_stop_token_ids_min_tokens_and_max_tokens(engine):
    free = engine.generate(PROMPT, SamplingParams(max_tokens=12, temperature=0))
    stop = free[4]
    first = free.index(stop)
    assert engine.generate(PROMPT, SamplingParams(max_tokens=12, temperature=0, stop_token_ids=(stop,))) == free[:first + 1]
    forced = engine.generate(PROMPT, SamplingParams(max_tokens=12, temperature=0, stop_token_ids=(stop,), min_tokens=12))
    assert len(forced) == 12 and stop not in forced


def test_parameters_do_not_leak_between_sequences_of_a_batch(engine):
    params = [
        SamplingParams(max_tokens=15, temperature=0),
        SamplingParams(max_tokens=15, temperature=1.0, seed=3),
        SamplingParams(max_tokens=15, temperature=0.7, top_k=5, top_p=0.9, seed=4),
        SamplingParams(max_tokens=15, temperature=0, repetition_penalty=1.5, presence_penalty=1.0),
        SamplingParams(max_tokens=6, temperature=0),
    ]
    prompts = [PROMPT, MIXED[3], PROMPT, MIXED[1], MIXED[2]]
    alone = [engine.generate(p, sp) for p, sp in zip(prompts, params)]
    assert engine.generate_batch(prompts, params) == alone
    assert [len(a) for a in alone] == [15, 15, 15, 15, 6]


def test_logprobs_are_the_models_distribution(model, engine):
    seq = Sequence("lp", PROMPT, SamplingParams(max_tokens=3, temperature=0, logprobs=3))
    engine.add(seq)
    events = []
    while engine.scheduler.has_work:
        events += [ev for s, ev in engine.step() if s is seq]
    # the logits of the prompt's last token, from the forward pass the engine runs (the native one, where
    # it runs: its bits differ a little from the Python forward's)
    logits = ModelRunner(model).prefill(Sequence("alone", PROMPT, SamplingParams()), len(PROMPT))
    expected = torch.log_softmax(logits.float(), dim=-1)
    first = events[0]
    assert first.logprob == pytest.approx(expected[first.token_id].item(), abs=1e-4)
    assert [t for t, _ in first.top_logprobs] == expected.topk(3).indices.tolist()
    assert first.top_logprobs[0][0] == first.token_id  # greedy: the chosen token is the most likely
    assert all(len(ev.top_logprobs) == 3 for ev in events)


def test_concurrent_requests_keep_their_own_parameters(engine):
    async def run():
        a = AsyncLLMEngine(engine)

        async def one(rid, params):
            return [ev.token_id async for ev in a.generate(rid, PROMPT, params)]

        greedy = SamplingParams(max_tokens=15, temperature=0)
        sampled = SamplingParams(max_tokens=15, temperature=1.0, seed=3)
        alone = [await one("g0", greedy), await one("s0", sampled)]
        together = await asyncio.gather(one("g1", greedy), one("s1", sampled), one("g2", greedy))
        return alone, together

    (greedy, sampled), together = asyncio.run(run())
    assert together == [greedy, sampled, greedy]


def test_abandoned_request_is_aborted(engine):
    async def run():
        a = AsyncLLMEngine(engine)
        stream = a.generate("r", PROMPT, SamplingParams(max_tokens=200, temperature=0))
        await anext(stream)
        await stream.aclose()
        for _ in range(100):
            if a.stats()["running"] == 0 and a.stats()["waiting"] == 0:
                return True
            await asyncio.sleep(0.02)
        return False

    assert asyncio.run(run())


def test_abort_from_another_caller_ends_the_stream(engine):
    async def run():
        a = AsyncLLMEngine(engine)
        seen = []

        async def read():
            async for ev in a.generate("victim", PROMPT, SamplingParams(max_tokens=200, temperature=0)):
                seen.append(ev.token_id)
                if len(seen) == 2:
                    a.abort("victim")

        await asyncio.wait_for(read(), timeout=30)
        return seen

    seen = asyncio.run(run())
    assert 2 <= len(seen) < 200


def _collect(a: AsyncLLMEngine, rid: str, prompt, params):
    async def run():
        return [ev.token_id async for ev in a.generate(rid, prompt, params)]
    return run()


def test_a_request_whose_sampling_fails_fails_alone(engine):
    """A penalty that makes the probabilities infinite raises in the sampler: that request gets an
    EngineError, the greedy request beside it gives what it gives alone, and the engine goes on."""
    from runners.engine.errors import EngineError

    greedy = SamplingParams(max_tokens=12, temperature=0)
    poison = SamplingParams(max_tokens=12, temperature=0.7, repetition_penalty=1e-40)

    async def run():
        a = AsyncLLMEngine(engine)
        alone = await _collect(a, "alone", PROMPT, greedy)
        results = await asyncio.gather(_collect(a, "bad", PROMPT, poison), _collect(a, "good", PROMPT, greedy),
                                       return_exceptions=True)
        after = await _collect(a, "after", PROMPT, greedy)
        return alone, results, after, a.stats()

    alone, (bad, good), after, stats = asyncio.run(run())
    assert isinstance(bad, EngineError) and good == alone == after
    assert stats["running"] == stats["waiting"] == 0


def test_a_failing_forward_pass_fails_its_requests_only(engine, monkeypatch):
    from runners.engine.errors import EngineError

    greedy = SamplingParams(max_tokens=8, temperature=0)
    runner = engine.model_runner
    name = "run" if runner.native else "prefill_together"  # (the native pass runs a whole step at once)
    real = getattr(runner, name)
    calls = []

    def once_broken(*args):
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("injected fault")
        return real(*args)

    monkeypatch.setattr(runner, name, once_broken)

    async def run():
        a = AsyncLLMEngine(engine)
        first = await asyncio.gather(_collect(a, "a", PROMPT, greedy), return_exceptions=True)
        return first[0], await _collect(a, "b", PROMPT, greedy)

    failed, after = asyncio.run(run())
    assert isinstance(failed, EngineError) and "injected fault" in str(failed)
    assert after == generate_alone(engine.model_runner.model, PROMPT, 8)


def test_a_fault_outside_any_request_fails_that_step_and_the_thread_goes_on(engine, monkeypatch):
    from runners.engine.errors import EngineError

    greedy = SamplingParams(max_tokens=6, temperature=0)
    real, calls = engine.scheduler.postprocess, []

    def broken_once(*args):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("scheduler fault")
        return real(*args)

    monkeypatch.setattr(engine.scheduler, "postprocess", broken_once)

    async def run():
        a = AsyncLLMEngine(engine)
        failed = await asyncio.gather(_collect(a, "a", PROMPT, greedy), return_exceptions=True)
        return failed[0], await _collect(a, "b", PROMPT, greedy), a.alive

    failed, after, alive = asyncio.run(run())
    assert isinstance(failed, EngineError) and len(after) == 6 and alive


@pytest.mark.parametrize("prompt, params, field", [
    ([], SamplingParams(), "prompt"),
    ([1, 10**9], SamplingParams(), "prompt"),
    (PROMPT, SamplingParams(min_tokens=2, stop_token_ids=(-100000,)), "stop_token_ids"),
    (PROMPT, SamplingParams(temperature=float("nan")), "temperature"),
])
def test_requests_the_engine_cannot_run_are_refused_before_queuing(engine, prompt, params, field):
    from runners.engine.errors import RequestError

    async def run():
        a = AsyncLLMEngine(engine)
        with pytest.raises(RequestError, match=field):
            await _collect(a, "bad", prompt, params)
        return await _collect(a, "next", PROMPT, SamplingParams(max_tokens=4, temperature=0)), a.stats()

    after, stats = asyncio.run(run())
    assert len(after) == 4 and stats["waiting"] == 0


def test_extreme_but_valid_parameters_sample(engine):
    """A 64-bit seed and a temperature far below any useful one (greedy then) still generate."""
    greedy = engine.generate(PROMPT, SamplingParams(max_tokens=6, temperature=0))
    assert engine.generate(PROMPT, SamplingParams(max_tokens=6, temperature=1e-40, seed=2**64 - 1)) == greedy
    assert len(engine.generate(PROMPT, SamplingParams(max_tokens=6, temperature=1.0, seed=-2**63))) == 6


def test_an_empty_prompt_in_the_queue_stalls_no_one(engine):
    """Even if one got past the checks, a sequence with nothing to prefill holds up no one behind it."""
    engine.scheduler.add(Sequence("empty", [], SamplingParams()))
    assert engine.generate(PROMPT, SamplingParams(max_tokens=3, temperature=0)) != []


def test_a_dead_engine_thread_is_reported_not_silent(engine, monkeypatch):
    from runners.engine.errors import EngineError

    def die(**_):
        raise SystemExit("injected death")

    async def run():
        a = AsyncLLMEngine(engine)
        monkeypatch.setattr(engine, "step", die)
        with pytest.raises(EngineError, match="stopped"):
            await asyncio.wait_for(_collect(a, "waiting", PROMPT, SamplingParams(max_tokens=4)), 10)
        a._thread.join(5)
        with pytest.raises(EngineError):
            a.stats()
        with pytest.raises(EngineError):
            await _collect(a, "later", PROMPT, SamplingParams(max_tokens=4))
        return a.alive

    assert asyncio.run(run()) is False


def test_a_closed_engine_ends_its_thread_fails_what_it_held_and_refuses_more(engine):
    from runners.engine.errors import EngineError

    async def run():
        a = AsyncLLMEngine(engine)
        done = await _collect(a, "before", PROMPT, SamplingParams(max_tokens=4, temperature=0))
        held = asyncio.ensure_future(_collect(a, "held", PROMPT, SamplingParams(max_tokens=10_000, min_tokens=10_000)))
        while not engine.scheduler.running:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(a.close)
        with pytest.raises(EngineError, match="closed"):
            await held
        with pytest.raises(EngineError):
            await _collect(a, "later", PROMPT, SamplingParams(max_tokens=4))
        return done, a.alive, a._thread.is_alive()

    done, alive, thread = asyncio.run(run())
    assert len(done) == 4 and alive is False and thread is False
