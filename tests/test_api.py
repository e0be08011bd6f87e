"""End to end: one `bentoml serve` for the session, driven with the official openai client."""

from __future__ import annotations

import asyncio
import base64
import struct
import time

import httpx
import openai
import pytest
import torch

from conftest import CHAT, EMBED, TINY

pytestmark = pytest.mark.slow

HELLO = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Write a short story about a cat who learns to sail."}]


def chat(client, messages=HELLO, **kw):
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=CHAT, messages=messages, **kw)


def stream_chat(client, messages=HELLO, **kw):
    kw.setdefault("temperature", 0)
    chunks = list(client.chat.completions.create(model=CHAT, messages=messages, stream=True, **kw))
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    return chunks, deltas


def test_models_lists_served_models(server):
    data = httpx.get(server.v1 + "/models").json()["data"]
    ids = {m["id"]: m for m in data}
    assert {CHAT, EMBED, TINY} <= set(ids)
    assert ids[CHAT]["context_length"] == 8192 and ids[CHAT]["kind"] == "chat"
    assert ids[EMBED]["kind"] == "embedding"


def test_chat_matches_model_generate_with_chat_template(client, chat_tokenizer):
    """Greedy output is what transformers' generate gives on the prompt the model's own template renders."""
    import bentoml
    from transformers import AutoModelForCausalLM

    r = chat(client, STORY, max_tokens=24)
    prompt = chat_tokenizer.apply_chat_template(STORY, add_generation_prompt=True, tokenize=False)
    ids = chat_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(bentoml.models.get(f"{CHAT}:latest").path)
    ref = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):]
    assert r.choices[0].message.content == chat_tokenizer.decode(ref, skip_special_tokens=True)
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == 24 and r.choices[0].finish_reason == "length"
    assert r.usage.total_tokens == len(ids) + 24


def test_chat_stops_at_eos_with_exact_usage(client):
    r = chat(client, max_tokens=200)
    assert r.choices[0].finish_reason == "stop"
    assert "Paris" in r.choices[0].message.content
    assert "<|im_end|>" not in r.choices[0].message.content
    assert 0 < r.usage.completion_tokens < 200


def test_stream_equals_non_stream_and_usage_in_last_chunk(client):
    full = chat(client, STORY, max_tokens=30)
    chunks, deltas = stream_chat(client, STORY, max_tokens=30, stream_options={"include_usage": True})
    assert "".join(deltas) == full.choices[0].message.content
    assert len([d for d in deltas if d]) > 5  # streamed token by token, not in one piece
    last = chunks[-1]
    assert last.choices == [] and last.usage.model_dump() == full.usage.model_dump()
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert all(c.usage is None for c in chunks[:-1])


def test_max_completion_tokens(client):
    r = chat(client, STORY, max_completion_tokens=7)
    assert r.usage.completion_tokens == 7 and r.choices[0].finish_reason == "length"


def test_stop_string_is_hidden_also_across_stream_chunks(client):
    _, deltas = stream_chat(client, STORY, max_tokens=40)
    text = "".join(deltas)
    # A stop string that starts in one streamed chunk and ends in the next.
    k = next(i for i in range(3, len(deltas) - 1) if len(deltas[i]) >= 2 and len(deltas[i + 1]) >= 2)
    stop = deltas[k][-2:] + deltas[k + 1][:2]
    expected = text[: text.index(stop)]

    r = chat(client, STORY, max_tokens=40, stop=[stop, "never-appears-xyz"])
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
    chunks, streamed = stream_chat(client, STORY, max_tokens=40, stop=stop)
    assert "".join(streamed) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert r.usage.completion_tokens < 40


def test_legacy_completions_stream_and_not(client):
    r = client.completions.create(model=CHAT, prompt="The capital of France is", max_tokens=12, temperature=0)
    assert r.choices[0].text.strip() and r.usage.prompt_tokens == 5
    assert r.usage.completion_tokens == 12 or r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=CHAT, prompt="The capital of France is", max_tokens=12,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_completions_default_max_tokens_is_16(client):
    r = client.completions.create(model=CHAT, prompt="Once upon a time", temperature=0)
    assert r.usage.completion_tokens <= 16


def test_seed_reproduces_and_n_gives_distinct_choices(client):
    kw = dict(messages=STORY, max_tokens=16, temperature=1.0, seed=1234)
    a, b = chat(client, **kw), chat(client, **kw)
    assert a.choices[0].message.content == b.choices[0].message.content
    many = chat(client, n=3, **kw)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert many.choices[0].message.content == a.choices[0].message.content
    assert len({c.message.content for c in many.choices}) > 1
    assert 3 <= many.usage.completion_tokens <= 3 * 16  # every choice counted, none past max_tokens


def test_top_k_1_is_greedy_whatever_the_temperature(client):
    greedy = chat(client, STORY, max_tokens=16)
    k1 = chat(client, STORY, max_tokens=16, temperature=1.5, extra_body={"top_k": 1})
    assert k1.choices[0].message.content == greedy.choices[0].message.content


def test_penalties_change_greedy_output(client):
    base = chat(client, STORY, max_tokens=48).choices[0].message.content
    for kw in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"extra_body": {"repetition_penalty": 1.8}}):
        assert chat(client, STORY, max_tokens=48, **kw).choices[0].message.content != base, kw


def test_stop_token_ids_and_min_tokens(client, chat_tokenizer):
    base = chat(client, STORY, max_tokens=10)
    ids = chat_tokenizer(base.choices[0].message.content, add_special_tokens=False)["input_ids"]
    r = chat(client, STORY, max_tokens=10, extra_body={"stop_token_ids": [ids[3]]})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 4
    short = chat(client, max_tokens=100)  # stops at EOS early
    forced = chat(client, max_tokens=short.usage.completion_tokens + 10,
                  extra_body={"min_tokens": short.usage.completion_tokens + 10})
    assert forced.usage.completion_tokens == short.usage.completion_tokens + 10


def test_concurrent_requests_are_not_mixed_up(server):
    prompts = [[{"role": "user", "content": f"Count from {i} to {i + 5}."}] for i in range(6)]

    async def run():
        async with openai.AsyncOpenAI(base_url=server.v1, api_key="x", max_retries=0, timeout=120) as c:
            async def one(p):
                r = await c.chat.completions.create(model=CHAT, messages=p, max_tokens=12, temperature=0)
                return r.choices[0].message.content
            alone = [await one(p) for p in prompts]
            together = await asyncio.gather(*[one(p) for p in prompts])
            return alone, together

    alone, together = asyncio.run(run())
    assert together == alone


def test_disconnected_stream_is_cancelled_in_the_engine(server, client):
    stream = client.chat.completions.create(model=CHAT, messages=STORY, max_tokens=2000, stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = httpx.get(server.v1 + "/stats").json()["data"][CHAT]
        if stats["running"] == 0 and stats["waiting"] == 0:
            break
        time.sleep(0.2)
    assert stats["running"] == 0 and stats["waiting"] == 0
    before = stats["tokens_generated"]
    time.sleep(1)
    assert httpx.get(server.v1 + "/stats").json()["data"][CHAT]["tokens_generated"] == before


def test_remote_code_model_imported_by_cli_serves(client):
    r = client.chat.completions.create(model=TINY, messages=HELLO, max_tokens=8, temperature=0)
    assert r.usage.completion_tokens <= 8 and r.choices[0].finish_reason in ("stop", "length")
    full = client.completions.create(model=TINY, prompt="你好，世界", max_tokens=8, temperature=0)
    s = client.completions.create(model=TINY, prompt="你好，世界", max_tokens=8, stream=True, temperature=0)
    assert "".join(c.choices[0].text for c in s if c.choices) == full.choices[0].text


def test_embeddings_normalized_batched_and_base64(server, client):
    texts = ["hello world", "a cat on a boat", "山峰很高"]
    r = client.embeddings.create(model=EMBED, input=texts)
    vecs = [d.embedding for d in r.data]
    assert [d.index for d in r.data] == [0, 1, 2] and all(len(v) == 384 for v in vecs)
    assert all(abs(sum(x * x for x in v) - 1) < 1e-4 for v in vecs)
    assert r.usage.prompt_tokens > 0

    raw = httpx.post(server.v1 + "/embeddings", json={"model": EMBED, "input": texts, "encoding_format": "base64"}).json()
    decoded = [struct.unpack(f"<{384}f", base64.b64decode(d["embedding"])) for d in raw["data"]]
    assert all(abs(a - b) < 1e-6 for v, w in zip(vecs, decoded) for a, b in zip(v, w))

    async def concurrent():
        async with openai.AsyncOpenAI(base_url=server.v1, api_key="x", max_retries=0) as c:
            rs = await asyncio.gather(*[c.embeddings.create(model=EMBED, input=t) for t in texts * 4])
            return [x.data[0].embedding for x in rs]

    for v, w in zip(asyncio.run(concurrent()), vecs * 4):
        assert max(abs(a - b) for a, b in zip(v, w)) < 1e-4


@pytest.mark.parametrize("kwargs,param", [
    ({"temperature": 5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 0}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"presence_penalty": 9}, "presence_penalty"),
    ({"max_tokens": 9000}, "max_tokens"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0]"),
    ({"messages": [{"role": "user", "content": "word " * 9000}]}, "messages"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"extra_body": {"repetition_penalty": -1}}, "repetition_penalty"),
])
def test_invalid_parameters_are_400_naming_the_parameter(client, kwargs, param):
    kwargs = {"model": CHAT, "messages": HELLO, **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**kwargs)
    err = e.value.body
    assert e.value.status_code == 400 and err["param"] == param and err["type"] == "invalid_request_error"
    assert err["message"]


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=HELLO)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-model", input="x")


def test_wrong_kind_of_model_and_long_prompt(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=CHAT, input="x")
    assert e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=CHAT, prompt="word " * 9000)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=CHAT, prompt=[1, 2, 10**9])
    assert e.value.body["param"] == "prompt"


@pytest.mark.parametrize("body", [b"{not json", b"", b"[]", b'{"model": 3}'])
def test_malformed_bodies_are_400_openai_errors(server, body):
    r = httpx.post(server.v1 + "/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in r.text
