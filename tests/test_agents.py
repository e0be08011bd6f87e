"""End to end, what agents need: structured outputs, tool calls and the Responses API, from the
official openai client, LangChain and the OpenAI Agents SDK against the session's `bentoml serve`."""

from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from conftest import CHAT, TINY_LONG

pytestmark = pytest.mark.slow

WEATHER_PARAMS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                   "unit": {"enum": ["celsius", "fahrenheit"]}},
                  "required": ["city", "unit"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": WEATHER_PARAMS}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
CAT = "Return a JSON object describing a cat with its name and age."
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 16},
    "age": {"type": "integer", "minimum": 20, "maximum": 30},
    "pet": {"enum": ["cat", "dog", "none"]},
    "friends": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 2},
    "home": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
             "additionalProperties": False},
}, "required": ["name", "age", "pet", "friends", "home"], "additionalProperties": False}


class City(BaseModel):
    name: str = Field(max_length=20)
    country: str = Field(max_length=20)
    population: int = Field(ge=0, le=50_000_000)


def schema_format(schema, name="person", strict=True):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": strict}}


# --- structured outputs -----------------------------------------------------------------------

def test_parse_with_a_pydantic_model(client):
    r = client.chat.completions.parse(model=CHAT, messages=[{"role": "user", "content": "Describe Paris."}],
                                      response_format=City, temperature=0)
    assert isinstance(r.choices[0].message.parsed, City)
    assert r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_streamed_and_not_honours_bounds_and_enums(client, stream):
    kw = dict(model=CHAT, messages=[{"role": "user", "content": "Invent a person."}], temperature=0.8, seed=3,
              response_format=schema_format(PERSON), max_tokens=300)
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **kw))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        reason = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    else:
        r = client.chat.completions.create(**kw)
        text, reason = r.choices[0].message.content, r.choices[0].finish_reason
    jsonschema.validate(json.loads(text), PERSON)
    assert reason == "stop"  # the answer ends with the object, not at max_tokens


def test_streamed_json_schema_is_the_non_streamed_one(client):
    kw = dict(model=CHAT, messages=[{"role": "user", "content": "Invent a person."}], temperature=0,
              response_format=schema_format(PERSON, strict=False))
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = client.chat.completions.create(stream=True, **kw)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole


def test_json_object_is_an_object(client):
    r = client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": CAT}],
                                       response_format={"type": "json_object"}, temperature=0, max_tokens=300)
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_vllm_extensions_regex_choice_grammar(client):
    def ask(**extra):
        r = client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "Is the sky blue?"}],
                                           temperature=0, extra_body=extra)
        return r.choices[0].message.content, r.choices[0].finish_reason

    assert ask(structured_outputs={"choice": ["yes", "no"]})[0] in ("yes", "no")
    text, reason = ask(structured_outputs={"regex": r"[A-Z][a-z]{2,8}-\d{3}"})
    assert __import__("re").fullmatch(r"[A-Z][a-z]{2,8}-\d{3}", text) and reason == "stop"
    assert ask(guided_grammar='root ::= "maybe" | "surely"')[0] in ("maybe", "surely")
    assert ask(guided_choice=["up", "down"])[0] in ("up", "down")


def test_eight_concurrent_requests_keep_their_own_schemas(server):
    schemas = [{"type": "object", "properties": {f"field_{i}": {"type": "integer", "minimum": i, "maximum": i}},
                "required": [f"field_{i}"], "additionalProperties": False} for i in range(8)]

    async def run():
        async with openai.AsyncOpenAI(base_url=server.v1, api_key="x", max_retries=0, timeout=120) as c:
            return await asyncio.gather(*(c.chat.completions.create(
                model=CHAT, messages=[{"role": "user", "content": "Give the object."}], temperature=1.0, seed=i,
                response_format=schema_format(s, name=f"s{i}")) for i, s in enumerate(schemas)))

    for i, r in enumerate(asyncio.run(run())):
        assert json.loads(r.choices[0].message.content) == {f"field_{i}": i}


def test_remote_code_model_answers_a_schema_and_a_named_tool_call(client):
    r = client.chat.completions.create(model=TINY_LONG, messages=ASK, temperature=0, max_tokens=200,
                                       response_format=schema_format(WEATHER_PARAMS, "weather"))
    jsonschema.validate(json.loads(r.choices[0].message.content), WEATHER_PARAMS)
    r = client.chat.completions.create(model=TINY_LONG, messages=ASK, temperature=0, max_tokens=200, tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and r.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMS)


# --- tool calls -------------------------------------------------------------------------------

def test_tool_choice_required_named_and_none(client):
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        r = client.chat.completions.create(model=CHAT, messages=ASK, tools=[WEATHER], tool_choice=choice,
                                           temperature=0, parallel_tool_calls=False)
        (call,) = r.choices[0].message.tool_calls
        assert call.id.startswith("call_") and call.function.name == "get_weather"
        assert r.choices[0].finish_reason == "tool_calls"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMS)
    r = client.chat.completions.create(model=CHAT, messages=ASK, tools=[WEATHER], tool_choice="none",
                                       temperature=0, max_tokens=30)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content


def test_tool_choice_auto_gives_text_or_valid_calls(client):
    r = client.chat.completions.create(model=CHAT, messages=ASK, tools=[WEATHER], temperature=0, max_tokens=80)
    message = r.choices[0].message
    for call in message.tool_calls or ():
        jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMS)
    assert message.tool_calls or message.content


def test_streamed_tool_calls_are_the_non_streamed_ones_with_exact_usage(client):
    kw = dict(model=CHAT, messages=ASK, tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=300,
              parallel_tool_calls=False)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    calls: dict[int, dict] = {}
    for c in chunks:
        for d in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            call = calls.setdefault(d.index, {"id": d.id, "name": d.function.name, "arguments": ""})
            if d.id is not None:  # the first fragment of a call: its id and name, no arguments yet
                assert d.function.name and not d.function.arguments
            call["arguments"] += d.function.arguments or ""
    expected = [(t.function.name, t.function.arguments) for t in whole.choices[0].message.tool_calls]
    assert [(c["name"], c["arguments"]) for c in calls.values()] == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_a_tool_result_turn_gets_an_answer(client):
    first = client.chat.completions.create(model=CHAT, messages=ASK, tools=[WEATHER], tool_choice="required",
                                           temperature=0, parallel_tool_calls=False)
    call = first.choices[0].message.tool_calls[0]
    messages = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "sunny"}'}]
    r = client.chat.completions.create(model=CHAT, messages=messages, tools=[WEATHER], tool_choice="none",
                                       temperature=0, max_tokens=40)
    assert r.choices[0].message.content and r.choices[0].message.tool_calls is None
    # The prompt holds the call and its result, as the built-in tool format writes them.
    def count(messages):
        return httpx.post(f"{client.base_url}tokenize", json={"model": CHAT, "messages": messages}).json()["count"]

    assert count(messages) > count(ASK) + len(call.function.arguments) // 4


def test_required_parallel_calls_end_at_a_repeated_call(client):
    """SmolLM2 at temperature 0.8 writes the same call again and again: the repeat ends the answer."""
    for seed in range(3):
        r = client.chat.completions.create(model=CHAT, messages=ASK, tools=[WEATHER], tool_choice="required",
                                           temperature=0.8, max_tokens=160, seed=seed)
        calls = [(t.function.name, json.loads(t.function.arguments)) for t in r.choices[0].message.tool_calls]
        assert r.choices[0].finish_reason == "tool_calls", (seed, calls)
        assert calls and len({json.dumps(c) for c in calls}) == len(calls)  # no call twice
        for _, arguments in calls:
            jsonschema.validate(arguments, WEATHER_PARAMS)
        assert r.usage.completion_tokens < 160


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streamed_parallel_calls_aggregate_in_the_openai_client(client, seed):
    """The openai client's stream helper (ChatCompletionStreamState adds up each chunk's fields) gets
    the non-streamed answer's calls: each call's chunks name its own index only, and leave out what
    they do not carry."""
    kw = dict(model=CHAT, messages=ASK, tools=[WEATHER], tool_choice="required", temperature=0.8, max_tokens=160,
              seed=seed)
    whole = client.chat.completions.create(**kw).choices[0]
    with client.chat.completions.stream(**kw) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion().choices[0]
    calls = [(t.id, t.type, t.function.name, t.function.arguments) for t in final.message.tool_calls]
    assert [c[1:] for c in calls] == [("function", t.function.name, t.function.arguments)
                                      for t in whole.message.tool_calls]
    assert all(i.startswith("call_") and len(i) == 29 for i, *_ in calls) and len({i for i, *_ in calls}) == len(calls)
    assert final.finish_reason == whole.finish_reason == "tool_calls"
    raw = httpx.post(f"{client.base_url}chat/completions", json={**kw, "stream": True}, timeout=120).text
    deltas = [d for line in raw.splitlines() if line.startswith("data: {")
              for d in (json.loads(line[6:])["choices"] or [{}])[0].get("delta", {}).get("tool_calls") or []]
    seen = -1
    for d in deltas:  # a start with index, id, type and name; then that index's fragments, nothing null
        assert None not in d.values() and None not in d["function"].values()
        if "id" in d:
            assert d["index"] == seen + 1 and d["type"] == "function" and d["function"]["arguments"] == ""
            seen = d["index"]
        else:
            assert d["index"] == seen and set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}


# --- the Responses API --------------------------------------------------------------------------

def test_responses_streamed_and_not_and_previous_response_id(server, client):
    r = client.responses.create(model=CHAT, input="Say hello.", instructions="Answer briefly.", max_output_tokens=20,
                                temperature=0)
    assert r.output_text and r.usage.output_tokens <= 20 and r.status in ("completed", "incomplete")
    assert client.responses.retrieve(r.id).output_text == r.output_text
    follow = client.responses.create(model=CHAT, input="Again.", previous_response_id=r.id, max_output_tokens=10,
                                     temperature=0)
    assert follow.usage.input_tokens > r.usage.input_tokens  # the earlier turn is in the prompt
    with client.responses.stream(model=CHAT, input="Say hello.", instructions="Answer briefly.", max_output_tokens=20,
                                 temperature=0) as stream:
        events = list(stream)
    kinds = [e.type for e in events]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
    assert kinds[:2] == ["response.created", "response.in_progress"] and "response.output_text.done" in kinds
    assert kinds[-1] == ("response.completed" if r.status == "completed" else "response.incomplete")
    for _ in range(4):  # the test server keeps 4: the first one is gone
        client.responses.create(model=CHAT, input="Hi.", max_output_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)


def test_responses_with_a_function_tool_streamed_and_not(client):
    tool = {"type": "function", "name": "get_weather", "parameters": WEATHER_PARAMS, "strict": True}
    r = client.responses.create(model=CHAT, input="What is the weather in Paris?", tools=[tool], tool_choice="required",
                                parallel_tool_calls=False, temperature=0)
    (call,) = [o for o in r.output if o.type == "function_call"]
    jsonschema.validate(json.loads(call.arguments), WEATHER_PARAMS)
    with client.responses.stream(model=CHAT, input="What is the weather in Paris?", tools=[tool],
                                 tool_choice="required", parallel_tool_calls=False, temperature=0) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    assert [o.arguments for o in final.output if o.type == "function_call"] == [call.arguments]
    answer = client.responses.create(model=CHAT, previous_response_id=r.id, tools=[tool], max_output_tokens=30,
                                     input=[{"type": "function_call_output", "call_id": call.call_id,
                                             "output": '{"temperature": 21}'}], temperature=0)
    assert answer.output_text


def test_responses_tool_choice_in_the_responses_shape(client):
    tool = {"type": "function", "name": "get_weather", "parameters": WEATHER_PARAMS, "strict": True}
    kw = dict(model=CHAT, input="What is the weather in Paris?", tools=[tool], temperature=0, max_output_tokens=100,
              tool_choice={"type": "function", "name": "get_weather"})
    r = client.responses.create(**kw)
    (call,) = r.output
    assert r.status == "completed" and call.type == "function_call" and call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER_PARAMS)
    with client.responses.stream(**kw) as stream:
        final = stream.get_final_response()
    assert [(o.type, o.name, o.arguments) for o in final.output] == [("function_call", "get_weather", call.arguments)]
    for wrong in ({"type": "function"}, {"type": "function", "function": {"name": "get_weather"}}):
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(**{**kw, "tool_choice": wrong})
        assert e.value.body["param"] == "tool_choice" and '{"type": "function", "name": ...}' in e.value.message


def test_responses_cut_by_max_output_tokens_end_as_openai_ends_them(client):
    """OpenAI's server ends such a stream with `response.incomplete` (the openai client's
    get_final_response() takes only `response.completed`), its message `incomplete`."""
    kw = dict(model=CHAT, input="Tell me a long story.", max_output_tokens=6, temperature=0)
    r = client.responses.create(**kw)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert [o.status for o in r.output] == ["incomplete"] and r.output_text
    with client.responses.stream(**kw) as stream:
        events = list(stream)
    last = events[-1]
    assert last.type == "response.incomplete" and last.response.status == "incomplete"
    assert last.response.incomplete_details.reason == "max_output_tokens" and last.response.output_text == r.output_text
    done = [e.item for e in events if e.type == "response.output_item.done"]
    assert [o.status for o in done] == [o.status for o in last.response.output] == ["incomplete"]
    assert client.responses.retrieve(last.response.id).status == "incomplete"


@pytest.mark.parametrize("stream", [False, True])
def test_responses_a_function_call_output_turn_gets_a_status_and_text(client, stream):
    tool = {"type": "function", "name": "get_weather", "parameters": WEATHER_PARAMS}
    first = client.responses.create(model=CHAT, input="What is the weather in Paris?", tools=[tool], temperature=0,
                                    tool_choice="required", parallel_tool_calls=False)
    (call,) = first.output
    kw = dict(model=CHAT, previous_response_id=first.id, tools=[tool], max_output_tokens=40, temperature=0,
              input=[{"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature": 21}'}])
    if stream:
        with client.responses.stream(**kw) as s:
            answer = [e for e in s][-1].response
    else:
        answer = client.responses.create(**kw)
    assert answer.status in ("completed", "incomplete") and answer.output_text
    assert answer.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens


def test_responses_text_format_json_schema(client):
    r = client.responses.create(model=CHAT, input="Invent a person.", temperature=0,
                                text={"format": {"type": "json_schema", "name": "person", "schema": PERSON,
                                                 "strict": True}})
    jsonschema.validate(json.loads(r.output_text), PERSON)


# --- client libraries ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def langchain_llm(server):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model=CHAT, base_url=server.v1, api_key="x", temperature=0, max_tokens=300, max_retries=0,
                      timeout=120)


def test_langchain_bind_tools(langchain_llm):
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return "sunny"

    message = langchain_llm.bind_tools([get_weather], tool_choice="get_weather").invoke("Weather in Paris?")
    assert message.tool_calls[0]["name"] == "get_weather" and isinstance(message.tool_calls[0]["args"]["city"], str)


@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
def test_langchain_with_structured_output(langchain_llm, method):
    if method == "json_mode":  # any object; the schema is the caller's to check
        out = langchain_llm.with_structured_output(None, method="json_mode").invoke(CAT)
        assert isinstance(out, dict)
        return
    kw = {} if method == "json_schema" else {"method": method}  # json_schema is the default
    out = langchain_llm.with_structured_output(City, **kw).invoke("Describe Paris.")
    assert isinstance(out, City)


def test_openai_agents_sdk_runs_an_agent_with_a_function_tool(server):
    from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)  # no network: nothing is exported
    called = []

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        called.append(city)
        return f"It is sunny in {city}."

    async def run():
        async with openai.AsyncOpenAI(base_url=server.v1, api_key="x", max_retries=0, timeout=120) as c:
            agent = Agent(name="weather", instructions="Answer with the weather.", tools=[get_weather],
                          model=OpenAIResponsesModel(model=CHAT, openai_client=c),
                          model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=60,
                                                       parallel_tool_calls=False))
            return await Runner.run(agent, "What is the weather in Paris?", max_turns=4)

    result = asyncio.run(run())
    assert called and isinstance(result.final_output, str) and result.final_output
