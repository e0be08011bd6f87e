"""The engine in-process, on the tiny model: exact greedy decoding, per-request sampling, abort."""

from __future__ import annotations

import asyncio

import pytest
import torch

from runners.engine import AsyncLLMEngine, LLMEngine, ModelRunner, SamplingParams, load_causal_lm


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_causal_lm(str(tiny_model_dir))


@pytest.fixture()
def engine(model):
    return LLMEngine(ModelRunner(model), max_num_seqs=8, max_model_len=256)


PROMPT = [1, 20, 30, 40, 50]


def test_greedy_matches_model_generate(model, engine):
    ref = model.generate(torch.tensor([PROMPT]), max_new_tokens=20, do_sample=False, min_new_tokens=20)
    assert engine.generate(PROMPT, SamplingParams(max_tokens=20, temperature=0)) == ref[0, len(PROMPT):].tolist()


def test_repetition_penalty_matches_model_generate(model, engine):
    ref = model.generate(torch.tensor([PROMPT]), max_new_tokens=20, do_sample=False, repetition_penalty=1.5,
                         min_new_tokens=20)
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
            if a.num_running == 0 and a.num_waiting == 0:
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
