"""`engine: vllm`: the embedded SmolLM2 served by vLLM's engine in its runner (vLLM's CPU build), through the
gateway as any model, beside the same model on BentoChat's engine; both in float32, so that greedy answers
are equal. Runs where vLLM is installed (`make test` runs it in .venv-vllm); skipped elsewhere."""

from __future__ import annotations

import json
import time

import httpx
import pytest

pytest.importorskip("vllm")

from conftest import ARTIFACTS, serving  # noqa: E402
from tiny_model import build_tiny_adapter  # noqa: E402

pytestmark = pytest.mark.slow

VLLM = "smollm2-vllm"
OURS = "smollm2-bentochat"
STORY = [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}]
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def served(embedded_models, tmp_path_factory):
    import bentoml

    base = bentoml.models.get("smollm2-135m-instruct:latest").path
    adapter = build_tiny_adapter(base, tmp_path_factory.mktemp("smol-adapters") / "smol-lora", seed=3,
                                 targets=("q_proj", "v_proj"))
    config = tmp_path_factory.mktemp("vllm-config") / "bentochat.yaml"
    config.write_text(f"""models:
  - {{id: {VLLM}, model: smollm2-135m-instruct:latest, engine: vllm, dtype: float32, max_concurrency: 4,
      kv_cache_memory: 1GiB, adapters: [{{source: {adapter}, name: lora-vllm}}]}}
  - {{id: {OURS}, model: smollm2-135m-instruct:latest, engine: bentochat, dtype: float32, max_concurrency: 4,
      adapters: [{{source: {adapter}, name: lora-bentochat}}]}}
""")
    ARTIFACTS.mkdir(exist_ok=True)
    with serving("service:BentoChat", ARTIFACTS / "serve-vllm.log", env={"BENTOCHAT_CONFIG": str(config)},
                 models=(VLLM, OURS)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(served):
    import openai

    return openai.OpenAI(base_url=served.v1, api_key="unused", max_retries=0, timeout=300)


def greedy(client, model: str, messages=QUESTION, max_tokens: int = 24) -> str:
    answer = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
    return answer.choices[0].message.content


def test_chat_answers_streamed_and_not_and_greedy_equals_bentochats_engine(client):
    answer = greedy(client, VLLM)
    assert "Paris" in answer
    stream = client.chat.completions.create(model=VLLM, messages=QUESTION, max_tokens=24, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == answer
    assert greedy(client, OURS) == answer
    story = greedy(client, VLLM, STORY, 64)
    assert story == greedy(client, OURS, STORY, 64)


def test_completions_with_logprobs_match_bentochats(client):
    answers = [client.completions.create(model=model, prompt="The capital of France is", max_tokens=6,
                                         temperature=0, logprobs=3) for model in (VLLM, OURS)]
    (ours_text, ours), (theirs_text, theirs) = [(a.choices[0].text, a.choices[0].logprobs) for a in answers[::-1]]
    assert theirs_text == ours_text and theirs.tokens == ours.tokens
    assert len(theirs.token_logprobs) == 6 and all(len(top) == 3 for top in theirs.top_logprobs)
    for a, b in zip(theirs.token_logprobs, ours.token_logprobs):
        assert abs(a - b) < 0.02


def test_json_schema_response(client):
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
              "required": ["city", "population"], "additionalProperties": False}
    answer = client.chat.completions.create(
        model=VLLM, messages=[{"role": "user", "content": "Give the largest city of France and its population."}],
        max_tokens=60, temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "city",
                                                                                              "schema": schema}})
    value = json.loads(answer.choices[0].message.content)
    assert set(value) == {"city", "population"} and isinstance(value["population"], int)


def test_tool_choice_required_calls_the_tool(client):
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    answer = client.chat.completions.create(model=VLLM, messages=[{"role": "user", "content": "Weather in Paris?"}],
                                            tools=tools, tool_choice="required", max_tokens=60, temperature=0)
    calls = answer.choices[0].message.tool_calls
    assert answer.choices[0].finish_reason == "tool_calls" and calls[0].function.name == "get_weather"
    assert set(json.loads(calls[0].function.arguments)) == {"city"}


def test_lora_adapter_answers_as_on_bentochats_engine(client):
    adapted = greedy(client, "lora-vllm")
    assert adapted != greedy(client, VLLM)
    assert adapted == greedy(client, "lora-bentochat")
    assert "lora-vllm" in {m.id for m in client.models.list()}


def test_a_client_that_leaves_aborts_its_sequence(served, client):
    def stats() -> dict:
        return httpx.get(served.v1 + "/stats").json()["data"][VLLM]

    stream = client.chat.completions.create(model=VLLM, messages=STORY, max_tokens=2000, extra_body={"min_tokens": 2000},
                                            stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    deadline = time.monotonic() + 10
    while (now := stats())["running"] + now["waiting"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert now["running"] == now["waiting"] == 0
    time.sleep(1)
    assert stats()["tokens_generated"] == now["tokens_generated"] < 2000
