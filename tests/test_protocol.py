"""Request validation and how request parameters meet the model's generation_config defaults."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from models.config import ServedModel
from models.info import generation_defaults
from openai_api.errors import OpenAIError
from openai_api.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

MSG = [{"role": "user", "content": "hi"}]


class FakeModel:  # only what to_sampling_params reads of a ModelInfo: no generation is tested here
    context_length = 100
    eos_token_ids = stop_token_ids = (2,)
    stop = ()
    vocab_size = 1000

    def __init__(self, defaults, **served):
        self.defaults = defaults
        self.served = ServedModel(id="m", model="m", **served)


def chat(**kw):
    return ChatCompletionRequest(model="m", messages=MSG, **kw)


def test_generation_config_defaults_apply_and_request_values_win():
    baichuan = generation_defaults({"temperature": 0.3, "top_k": 5, "top_p": 0.85, "repetition_penalty": 1.1,
                                    "max_new_tokens": 2048, "do_sample": True, "user_token_id": 195})
    model = FakeModel(baichuan)
    p = chat().to_sampling_params(model, 10)
    assert (p.temperature, p.top_k, p.top_p, p.repetition_penalty) == (0.3, 5, 0.85, 1.1)
    assert p.max_tokens == 90  # max_new_tokens 2048 clamped to what the context leaves
    p = chat(temperature=0.9, top_k=-1, top_p=1.0, max_tokens=5, stop_token_ids=[7]).to_sampling_params(model, 10)
    assert (p.temperature, p.top_k, p.top_p, p.max_tokens) == (0.9, 0, 1.0, 5)
    assert p.stop_token_ids == (2, 7)


def test_greedy_default_when_authors_disable_sampling_and_openai_defaults_otherwise():
    assert chat().to_sampling_params(FakeModel(generation_defaults({"do_sample": False})), 10).temperature == 0
    p = CompletionRequest(model="m", prompt="x").to_sampling_params(FakeModel({}), 10)
    assert (p.temperature, p.top_p, p.max_tokens) == (1.0, 1.0, 16)


def test_max_tokens_default_caps_requests_that_set_none():
    model = FakeModel({"max_new_tokens": 50}, max_tokens_default=20)
    assert chat().to_sampling_params(model, 10).max_tokens == 20
    assert chat(max_tokens=40).to_sampling_params(model, 10).max_tokens == 40
    assert chat().to_sampling_params(FakeModel({}, max_tokens_default=500), 10).max_tokens == 90


def test_stop_token_ids_outside_the_vocabulary_are_400():
    for ids in ([-100000], [1000]):
        with pytest.raises(OpenAIError) as e:
            chat(stop_token_ids=ids).to_sampling_params(FakeModel({}), 10)
        assert e.value.status == 400 and e.value.param == "stop_token_ids"


def test_context_length_errors_name_the_parameter():
    with pytest.raises(OpenAIError) as e:
        chat().to_sampling_params(FakeModel({}), 100)
    assert e.value.status == 400 and e.value.param == "messages" and e.value.code == "context_length_exceeded"
    with pytest.raises(OpenAIError) as e:
        chat(max_tokens=95).to_sampling_params(FakeModel({}), 10)
    assert e.value.param == "max_tokens"


@pytest.mark.parametrize("kw", [{"temperature": -0.1}, {"top_p": 1.5}, {"n": 100}, {"stop": ["", "x"]},
                                {"frequency_penalty": -3}, {"min_tokens": -1}, {"top_logprobs": 2},
                                {"logprobs": True, "top_logprobs": 21}, {"tools": [{"type": "function"}]}, {"messages": []}])
def test_invalid_chat_requests_are_rejected(kw):
    with pytest.raises(ValidationError):
        ChatCompletionRequest(**{"model": "m", "messages": MSG, **kw})


def test_max_completion_tokens_wins_and_content_parts_join():
    r = ChatCompletionRequest(model="m", max_tokens=5, max_completion_tokens=9,
                              messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                     {"type": "text", "text": "b"}]}])
    assert r.max_new_tokens == 9 and r.messages[0].text == "ab"


def test_prompt_shapes():
    assert CompletionRequest(model="m", prompt="x").prompts == ["x"]
    assert CompletionRequest(model="m", prompt=[1, 2]).prompts == [[1, 2]]
    assert CompletionRequest(model="m", prompt=["a", "b"]).prompts == ["a", "b"]
    with pytest.raises(ValidationError):
        CompletionRequest(model="m", prompt="x", echo=True)
    with pytest.raises(ValidationError):
        EmbeddingRequest(model="m", input=[1, 2, 3])
    assert EmbeddingRequest(model="m", input="x").input == ["x"]


TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


@pytest.mark.parametrize("kw, param", [
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": "get_weather"}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "retrieval"}]}, "type"),
    ({"tools": [TOOL, TOOL]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "name"),
    ({"response_format": {"json_schema": {}}}, "response_format"),
])
def test_tool_and_format_mistakes_are_refused_naming_the_field(kw, param):
    with pytest.raises(ValidationError) as e:
        chat(**kw)
    assert param in str(e.value)


def test_tool_modes_and_the_tools_the_model_may_call():
    other = {"type": "function", "function": {"name": "get_time"}}
    assert chat().tool_mode == "none" and chat(tools=[TOOL]).tool_mode == "auto"
    assert chat(tools=[TOOL], tool_choice="none").active_tools == []
    named = chat(tools=[TOOL, other], tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert named.tool_mode == "required" and [t["function"]["name"] for t in named.active_tools] == ["get_time"]


def test_one_output_constraint_per_request():
    with pytest.raises(OpenAIError) as e:
        chat(response_format={"type": "json_object"}, guided_regex="a+").to_sampling_params(FakeModel({}), 10)
    assert e.value.status == 400 and e.value.param == "guided_regex"
    params = chat(extra_field=1, structured_outputs={"choice": ["a", "b"]}).to_sampling_params(FakeModel({}), 10)
    assert params.grammar == 'root ::= "a" | "b"'
    with pytest.raises(OpenAIError) as e:
        chat(structured_outputs={"json_schema": {}}).to_sampling_params(FakeModel({}), 10)
    assert e.value.param == "structured_outputs.json_schema"
