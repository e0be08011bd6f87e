"""Tenants sharing the batch by weight (virtual token counting, ``runners/engine/scheduler.py``): the
scheduler stepped alone (each step's prefills and decodes taken as done, as the model runner would
leave them), then the engine on the tiny Llama, whose greedy tokens must not change with the order."""

from __future__ import annotations

import asyncio

import pytest
import torch

from runners.engine import AsyncLLMEngine, LLMEngine, ModelRunner, SamplingParams, Sequence
from runners.engine.block_manager import BLOCK, BlockPool
from runners.engine.errors import RequestError
from runners.engine.lean import LeanCausalLM
from runners.engine.loader import load_causal_lm
from runners.engine.scheduler import Scheduler

TOKEN = 5  # what every simulated step samples (no stop token)


def seq(name: str, tenant: str | None, weight: float = 1.0, prompt: int = 4, max_tokens: int = 8) -> Sequence:
    return Sequence(name, [1] * prompt, SamplingParams(max_tokens=max_tokens), tenant=tenant, weight=weight)


def step(s: Scheduler) -> list[Sequence]:
    """One engine step of ``s``, every forward pass done; returns the sequences whose prefill ended."""
    prefills, decodes = s.schedule()
    for q, n in prefills:
        q.num_cached += n
    done = [q for q, _ in prefills if q.num_cached == q.num_tokens]
    s.postprocess(done, [TOKEN] * len(done))
    for q in decodes:
        q.num_cached += 1
    s.postprocess(decodes, [TOKEN] * len(decodes))
    return done


def admitted_order(fair: bool) -> list[str]:
    s = Scheduler(max_num_seqs=2, max_model_len=256, fair=fair)
    for i in range(8):
        s.add(seq(f"a{i}", "A", max_tokens=10 + i))
    order = [q.request_id for q in step(s)]
    for _ in range(3):
        order += [q.request_id for q in step(s)]
    assert len(s.running) == 2 and len(s.waiting) == 6  # the batch is full
    s.add(seq("b", "B"))
    while s.has_work:
        order += [q.request_id for q in step(s)]
    return order


def test_a_tenants_request_is_admitted_before_a_flooding_tenants_later_ones():
    assert admitted_order(fair=True) == ["a0", "a1", "b", *(f"a{i}" for i in range(2, 8))]
    assert admitted_order(fair=False) == [*(f"a{i}" for i in range(8)), "b"]  # first come, first served


def test_a_tenant_that_ties_with_the_flood_it_joins_goes_first():
    """B's request arrives when A's running sequences have all just ended: lifted to A's counter, B ties
    with A, and the tenant asking for less (1 sequence against 8) takes the first turn and its own
    prefill pass first; first come, first served, it is last."""
    def first(fair: bool) -> list[list[str]]:
        s = Scheduler(max_num_seqs=4, max_model_len=256, fair=fair)
        for i in range(8):
            s.add(seq(f"a{i}", "A"))
        s.add(seq("b", "B"))
        prefills, _ = s.schedule()
        return [[q.request_id for q in group] for group in s.passes([q for q, _ in prefills])]

    assert first(fair=True) == [["b"], ["a0", "a1", "a2"]]
    assert first(fair=False) == [["a0", "a1", "a2", "a3"]]


def served_tokens(weights: dict[str, float], steps: int, s: Scheduler | None = None) -> dict[str, int]:
    """Output tokens each tenant got in ``steps`` steps with 4 slots, every tenant flooding (its
    waiting requests topped up to 8)."""
    s = s or Scheduler(max_num_seqs=4, max_model_len=256)
    seqs: list[Sequence] = []
    tokens = dict.fromkeys(weights, 0)
    for _ in range(steps):
        for tenant, weight in weights.items():
            while sum(q.tenant == tenant for q in s.waiting) < 8:
                seqs.append(seq(f"{tenant}{len(seqs)}", tenant, weight))
                s.add(seqs[-1])
        before = {q: q.num_output_tokens for q in seqs}
        step(s)
        for q in seqs:
            tokens[q.tenant] += q.num_output_tokens - before[q]
    return tokens


@pytest.mark.parametrize("weights, share", [({"A": 3.0, "B": 1.0}, 3.0), ({"A": 1.0, "B": 1.0}, 1.0),
                                            ({"A": 1.0, None: 2.0}, 0.5)])
def test_tenants_under_contention_get_tokens_in_the_ratio_of_their_weights(weights, share):
    tokens = served_tokens(weights, 400)
    a, b = tokens.values()
    assert a / b == pytest.approx(share, rel=0.15), tokens


def test_a_lone_tenant_fills_the_batch_whatever_the_others_weights_were():
    s = Scheduler(max_num_seqs=4, max_model_len=256)
    served_tokens({"A": 1.0, "B": 50.0}, 40, s)  # B, the heavier, has been served
    while s.has_work:
        step(s)
    for i in range(8):
        s.add(seq(f"a{i}", "A"))
    step(s)
    assert len(s.running) == 4  # work-conserving: every slot is A's


def test_an_idle_tenant_banks_no_credit():
    """A tenant that asked for nothing while another was served starts level with it, not with the
    whole backlog of service it did not ask for: both get half from when it arrives."""
    s = Scheduler(max_num_seqs=4, max_model_len=256)
    served_tokens({"A": 1.0}, 200, s)  # A alone, with work all along
    tokens = served_tokens({"A": 1.0, "B": 1.0}, 400, s)
    assert tokens["A"] / tokens["B"] == pytest.approx(1.0, rel=0.2), tokens


def test_a_light_tenants_requests_never_starve():
    """B of weight 1 beside A of weight 20, which floods all the while: each of B's requests is
    admitted, the next about when A has been served 20 times B's tokens (its share, not never)."""
    tokens = served_tokens({"A": 20.0, "B": 1.0}, 1000)
    assert tokens["B"] >= 6 * 8 and tokens["A"] / tokens["B"] == pytest.approx(20.0, rel=0.3), tokens


def test_a_full_kv_cache_preempts_the_tenant_served_most():
    """8 blocks of 16 tokens, 3 sequences of A then 1 of B, each growing to 4 blocks: preemptions take
    A's sequences, whereas first come, first served takes the one that joined last, B's."""
    def preempted(fair: bool) -> set[str]:
        pool = BlockPool(layers=1, kv_heads=1, head_dim=1, dtype=torch.float32, budget=8 * 2 * BLOCK * 4)
        s = Scheduler(max_num_seqs=4, max_model_len=128, pool=pool, fair=fair)
        seqs = [seq(f"a{i}", "A", prompt=16, max_tokens=40) for i in range(3)] + [seq("b", "B", prompt=16, max_tokens=40)]
        for q in seqs:
            s.add(q)
        hit = set()
        while s.has_work:
            step(s)
            hit |= {q.tenant for q in s.waiting if q.output_ids}
        assert all(q.num_output_tokens == 40 for q in seqs) and s.preemptions > 0
        return hit

    assert preempted(fair=True) == {"A"}
    assert "B" in preempted(fair=False)


def test_on_the_paged_cache_a_tenant_under_its_share_takes_a_slot_at_once():
    """4 slots full of A's sequences (8 more waiting): B's request is prefilled at the next step, A's
    sequence that joined last preempted for it (and resumed later, to its last token); first come,
    first served, B waits for A's to end."""
    def steps_to_b(fair: bool) -> int:
        pool = BlockPool(layers=1, kv_heads=1, head_dim=1, dtype=torch.float32, budget=64 * 2 * BLOCK * 4)
        s = Scheduler(max_num_seqs=4, max_model_len=128, pool=pool, fair=fair)
        flood = [seq(f"a{i}", "A", max_tokens=30) for i in range(12)]
        for q in flood:
            s.add(q)
        step(s)
        step(s)
        late = seq("b", "B", max_tokens=30)
        s.add(late)
        n = 1
        while late not in step(s):
            n += 1
        while s.has_work:
            step(s)
        assert all(q.num_output_tokens == 30 for q in [*flood, late])
        assert s.preemptions == (1 if fair else 0)
        return n

    assert steps_to_b(fair=True) == 1
    assert steps_to_b(fair=False) > 20


@pytest.fixture(scope="module", params=["transformers", "native"])
def model(tiny_llama_dir, request):
    """The tiny Llama on transformers' forward (no preemption), or on the native forward pass in
    bfloat16, whose paged cache lets a tenant under its share preempt."""
    if request.param == "transformers":
        return load_causal_lm(str(tiny_llama_dir))
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.bfloat16, attn_implementation="eager")
    native = LeanCausalLM(hf.eval())
    if ModelRunner(native).pool is None:
        pytest.skip("no native forward pass here")
    return native


PROMPTS = [[1, 20, 30, 40, 50], [1, 7], [1, 300, 12, 9, 77, 5], [1] + list(range(100, 120))]


def test_the_engine_serves_the_late_tenant_first_and_every_token_stays_what_it_is_alone(model):
    greedy = lambda n: SamplingParams(max_tokens=n, temperature=0)  # noqa: E731
    alone = LLMEngine(ModelRunner(model), max_num_seqs=1, max_model_len=256)
    engine = LLMEngine(ModelRunner(model), max_num_seqs=2, max_model_len=256, prefix_cache_tokens=256)
    # (A's prompts share their first block: a preempted one resumes from the prefix cache on the native pass)
    flood = [Sequence(f"a{i}", PROMPTS[3] + [60 + i], greedy(6 + i), tenant="A") for i in range(6)]
    for q in flood:
        engine.add(q)
    while len(engine.scheduler.running) < 2:  # (a1 waits a step for a0's prompt to be cached)
        engine.step()
    late = Sequence("b", PROMPTS[2], greedy(5), tenant="B", weight=2.0)
    engine.add(late)
    first = []  # request ids in the order of their first tokens
    while engine.has_work:
        first += [q.request_id for q, event in engine.step() if q.num_output_tokens == 1]
    assert first[0] == "b"
    assert engine.stats()["preemptions"] == (1 if engine.model_runner.pool else 0)  # (A's, resumed)
    for q in [*flood, late]:
        assert q.output_ids == alone.generate(q.prompt_ids, q.params), q.request_id


def emitted(model, fair: bool) -> list[list[str]]:
    """The request ids of each batch of tokens the engine emits in the step where B's prompt and A's
    later one are prefilled together, A's first two running."""
    engine = LLMEngine(ModelRunner(model), max_num_seqs=4, max_model_len=256, fair=fair)
    greedy = SamplingParams(max_tokens=6, temperature=0)
    flood = [Sequence(f"a{i}", PROMPTS[i], greedy, tenant="A") for i in range(3)]
    for q in flood[:2]:
        engine.add(q)
    engine.step()
    late = Sequence("b", PROMPTS[3], greedy, tenant="B")
    engine.add(late)
    engine.add(flood[2])
    batches = []
    engine.step(lambda results: batches.append([q.request_id for q, _ in results]))
    while engine.has_work:
        engine.step()
    for q in [*flood, late]:
        assert q.output_ids == LLMEngine(ModelRunner(model), max_num_seqs=1, max_model_len=256).generate(
            q.prompt_ids, greedy), q.request_id
    return batches


def test_the_tenant_served_least_has_its_first_token_out_before_the_others_prompts_are_computed(model):
    """The tenant served least has its prompts prefilled in a pass of their own, its tokens emitted as
    soon as it ends: B's first token does not wait for A's prompt (nor A's decode step). Then each other
    tenant's prompts in turn and the decode step; on the native forward pass, all of that in one pass
    (which reads the weights once), as is the whole step when not fair."""
    if ModelRunner(model).native:
        assert emitted(model, fair=True) == [["b"], ["a0", "a1", "a2"]]
        assert emitted(model, fair=False) == [["a0", "a1", "b", "a2"]]
    else:
        assert emitted(model, fair=True) == [["b"], ["a2"], ["a0", "a1"]]
        assert emitted(model, fair=False) == [["b", "a2"], ["a0", "a1"]]  # first come, first served: one pass


def test_the_async_engine_takes_a_tenant_and_refuses_a_weight_that_is_no_share(model):
    async def run(weight):
        engine = AsyncLLMEngine(LLMEngine(ModelRunner(model), max_num_seqs=2, max_model_len=256))
        try:
            return [e.token_id async for e in engine.generate("r", PROMPTS[0], SamplingParams(max_tokens=4),
                                                              tenant="team-a", weight=weight)]
        finally:
            engine.close()

    assert len(asyncio.run(run(2.5))) == 4
    for weight in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(RequestError, match="weight"):
            asyncio.run(run(weight))
