"""Constrained decoding in the engine, in-process on a tiny model with random weights: what it writes
at temperature 1 always matches the grammar, whatever else is in the batch; and the tool-call and
reasoning parsers, streamed in arbitrary splits, give what the whole text gives."""

from __future__ import annotations

import json
import random
import time

import jsonschema
import pytest
from transformers import AutoTokenizer

from models.tool_formats import FORMATS
from openai_api.constraints import choice_grammar, to_grammar
from openai_api.errors import OpenAIError
from openai_api.tool_calls import ReasoningParser, ToolCallParser, tool_grammar
from runners.engine import LLMEngine, ModelRunner, SamplingParams
from runners.engine.loader import load_causal_lm
from tests.tiny_model import build_tiny_bpe_model

# Free strings are bounded by a pattern: a random model at temperature 1 would not end one of its own
# accord. (Its bytes may also form no UTF-8, which xgrammar 0.2 lets through; maxLength is checked on a
# real model in test_agents.py.)
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z ]{1,12}$"},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string", "pattern": "^[a-z]{2,10}$"},
                                                     "zip": {"type": "integer", "minimum": 0, "maximum": 99999}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "role", "address"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "pattern": "^[A-Z][a-z]{1,11}$"},
                                     "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET", "PST"]}}, "required": ["zone"],
    "additionalProperties": False}}}


@pytest.fixture(scope="module")
def bpe_llama(tmp_path_factory):
    """A tiny Llama with a byte-level BPE fast tokenizer and a context long enough for what a random
    model writes at temperature 1."""
    return build_tiny_bpe_model(tmp_path_factory.mktemp("hf") / "tiny-bpe-llama", context=1024)


@pytest.fixture(scope="module")
def tokenizer(bpe_llama):
    return AutoTokenizer.from_pretrained(bpe_llama)


@pytest.fixture(scope="module")
def engine(bpe_llama, tokenizer):
    return LLMEngine(ModelRunner(load_causal_lm(str(bpe_llama))), max_num_seqs=16, max_model_len=1024,
                     tokenizer=tokenizer)


def sampled(engine, tokenizer, grammars: list[str], seeds) -> list[str]:
    eos = tokenizer.eos_token_id
    params = [SamplingParams(max_tokens=900, temperature=1.0, seed=seed, grammar=g, stop_token_ids=(eos,))
              for g, seed in zip(grammars, seeds)]
    outs = engine.generate_batch([tokenizer("Hello world")["input_ids"]] * len(params), params)
    assert all(o[-1] == eos for o in outs), "every answer ends where its grammar does, with its stop token"
    return [tokenizer.decode(o, skip_special_tokens=True) for o in outs]


def test_json_schema_holds_for_50_seeds_at_temperature_1(engine, tokenizer):
    grammar = to_grammar("json_schema", SCHEMA, "response_format")
    before = engine.stats()["grammars_compiled"]
    texts = []
    for start in range(0, 50, 10):
        texts += sampled(engine, tokenizer, [grammar] * 10, range(start, start + 10))
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len(set(texts)) > 40  # they are samples, not one answer
    assert engine.stats()["grammars_compiled"] - before == 1  # the same grammar compiled once


def test_required_tool_call_arguments_validate(engine, tokenizer):
    fmt = FORMATS["builtin"]
    grammar = tool_grammar(fmt, [WEATHER, CLOCK], "required", parallel=False)
    for text in sampled(engine, tokenizer, [grammar] * 16, range(16)):
        parser = ToolCallParser(fmt)
        parser.feed(text)
        parser.finish()
        assert parser.calls and not parser.content.strip()
        for call in parser.calls:
            schema = {"get_weather": WEATHER, "get_time": CLOCK}[call.name]["function"]["parameters"]
            jsonschema.validate(json.loads(call.arguments), schema)


def test_rows_keep_their_own_constraints(engine, tokenizer):
    """Eight sequences in one batch, each with another grammar (and one with none)."""
    schemas = [{"type": "object", "properties": {f"k{i}": {"type": "integer", "minimum": i, "maximum": i}},
                "required": [f"k{i}"], "additionalProperties": False} for i in range(5)]
    grammars = [to_grammar("json_schema", s, "x") for s in schemas]
    grammars += [to_grammar("regex", r"[a-c]{3}-\d{2}", "x"), choice_grammar(["yes", "no"]), None]
    texts = sampled(engine, tokenizer, grammars[:7], range(7))
    for i in range(5):
        assert json.loads(texts[i]) == {f"k{i}": i}
    assert __import__("re").fullmatch(r"[a-c]{3}-\d{2}", texts[5])
    assert texts[6] in ("yes", "no")


def test_a_schema_the_library_refuses_is_a_400_naming_the_field():
    with pytest.raises(OpenAIError) as e:
        to_grammar("json_schema", {"type": "strin"}, "response_format.json_schema.schema")
    assert e.value.status == 400 and e.value.param == "response_format.json_schema.schema"
    assert "strin" in e.value.message and ".cc" not in e.value.message


def test_compiled_grammars_are_kept_within_their_byte_budget(engine, monkeypatch):
    from runners.engine import structured

    grammars = [to_grammar("json_schema", {"type": "object", "properties": {f"k{i}": {"type": "integer"}}}, "x")
                for i in range(3)]
    grammars_of = engine.grammars
    one = grammars_of.compile(grammars[0]).memory_size_bytes
    monkeypatch.setattr(structured, "GRAMMAR_CACHE_BYTES", int(2.5 * one))  # room for two of them
    for g in grammars[1:]:
        grammars_of.compile(g)
    assert grammars_of.cached_bytes <= structured.GRAMMAR_CACHE_BYTES
    assert engine.stats()["grammar_cache_bytes"] == grammars_of.cached_bytes
    compiled = grammars_of.compiled_count
    grammars_of.compile(grammars[2])  # the newest is kept
    assert grammars_of.compiled_count == compiled
    grammars_of.compile(grammars[0])  # the oldest was dropped
    assert grammars_of.compiled_count == compiled + 1


def test_a_tokenizer_of_remote_code_takes_grammars(tiny_model_dir):
    model = load_causal_lm(str(tiny_model_dir), trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir, trust_remote_code=True)
    engine = LLMEngine(ModelRunner(model), max_num_seqs=4, max_model_len=256, tokenizer=tok)
    grammar = to_grammar("json_schema", WEATHER["function"]["parameters"], "x")
    out = engine.generate([1, 20, 30], SamplingParams(max_tokens=200, temperature=0, grammar=grammar,
                                                      stop_token_ids=(2,)))
    jsonschema.validate(json.loads(tok.decode(out, skip_special_tokens=True)), WEATHER["function"]["parameters"])


# --- parsers ---------------------------------------------------------------------------------

# Each family's documented output (Hermes 2 Pro / Qwen; Llama 3.1 JSON tool calling; Mistral v0.3).
LITERAL = {
    "hermes": ('I will look both up.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
               '"unit": "celsius"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n'
               '</tool_call>'),
    "llama3": '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
              '{"name": "get_time", "parameters": {"zone": "CET"}}',
    "mistral": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris {1}", "unit": "celsius"}}, '
               '{"name": "get_time", "arguments": {"zone": "C\\"ET"}}]',
    "builtin": '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>',
}


def parse(fmt: str, text: str, cuts: list[int]) -> tuple[str, list[tuple[str, str, str]]]:
    parser, content, calls = ToolCallParser(FORMATS[fmt]), "", {}
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    for delta in [parser.feed(p) for p in pieces] + [parser.finish()]:
        content += delta.content
        for d in delta.calls:  # a call's start, then its fragments
            if d.id is not None:
                assert d.index == len(calls) and not d.arguments
                calls[d.index] = [d.id, d.name, ""]
            calls[d.index][2] += d.arguments
    assert [c.arguments for c in parser.calls] == [c[2] for c in calls.values()]
    return content, [(name, args, call_id[:5]) for call_id, name, args in calls.values()]


@pytest.mark.parametrize("fmt", sorted(LITERAL))
def test_each_parser_streamed_in_any_split_gives_the_whole_texts_calls(fmt):
    text = LITERAL[fmt]
    whole = parse(fmt, text, [])
    assert [json.loads(args) for _, args, _ in whole[1]][0]["city" if fmt != "builtin" else "zone"]
    assert all(prefix == "call_" for *_, prefix in whole[1])
    for seed in range(300):
        rng = random.Random(seed)
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, min(40, len(text) - 1))))
        assert parse(fmt, text, cuts) == whole
    if fmt == "hermes":
        assert whole[0] == "I will look both up.\n" and [n for n, *_ in whole[1]] == ["get_weather", "get_time"]


def test_text_that_only_looks_like_a_call_is_text():
    assert parse("hermes", "a < b, and <tool is no tag", [3, 12]) == ("a < b, and <tool is no tag", [])
    assert parse("llama3", "Use {braces} freely", [5]) == ("Use {braces} freely", [])


@pytest.mark.parametrize("thinking", [False, True])
def test_reasoning_split_in_any_split(thinking):
    text = ("" if thinking else "<think>") + "Let me think: 2 < 3.\n</think>\n\nThe answer is 3."
    for seed in range(100):
        rng = random.Random(seed)
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, 10)))
        parser, reasoning, content = ReasoningParser(thinking), "", ""
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        for i, piece in enumerate(pieces):
            r, c = parser.feed(piece, final=i == len(pieces) - 1)
            reasoning, content = reasoning + r, content + c
        assert (reasoning, content) == ("Let me think: 2 < 3.\n", "The answer is 3.")


# --- tools in the prompt ---------------------------------------------------------------------

def test_a_template_without_tools_gets_them_described(tokenizer):
    from models.templates import describe_tools

    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    out = describe_tools(messages, [WEATHER], FORMATS["builtin"].call_text)
    assert out[0]["role"] == "system" and '"name": "get_weather"' in out[0]["content"] and "<tools>" in out[0]["content"]
    assert out[2]["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert out[3] == {"role": "user", "content": "<tool_response>\nsunny\n</tool_response>"}
    parser = ToolCallParser(FORMATS["builtin"])
    parser.feed(out[2]["content"])
    parser.finish()
    assert [(c.name, json.loads(c.arguments)) for c in parser.calls] == [("get_weather", {"city": "Paris"})]


def test_a_template_that_takes_tools_renders_them(tokenizer):
    from models.templates import _jinja

    tokenizer.chat_template = ("{% for t in tools or [] %}TOOL {{ t.function.name }}\n{% endfor %}"
                               "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    try:
        fmt = _jinja(tokenizer)
        assert fmt.takes_tools
        ids = fmt.render([{"role": "user", "content": "hi"}], [WEATHER])
        assert tokenizer.decode(ids).startswith("TOOL get_weather\nuser: hi")
    finally:
        tokenizer.chat_template = None


def test_an_answer_with_reasoning_then_a_call():
    from openai_api.tool_calls import AnswerParser

    parser = AnswerParser(FORMATS["hermes"], reasoning=True)
    text = '<think>I need the weather.</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>'
    pieces = [parser.feed(text[i:i + 7], final=i + 7 >= len(text)) for i in range(0, len(text), 7)]
    assert "".join(p.reasoning for p in pieces) == parser.reasoning_text == "I need the weather."
    assert parser.content == "" and [(c.name, c.arguments) for c in parser.calls] == [("get_weather", "{}")]
    assert parser.finish_reason("stop") == "tool_calls" and parser.finish_reason("length") == "length"


def test_auto_tools_with_a_response_format_give_calls_or_that_format(engine, tokenizer):
    fmt = FORMATS["builtin"]
    grammar = tool_grammar(fmt, [WEATHER], "auto", parallel=False, answer=to_grammar("json_schema", SCHEMA, "x"))
    kinds = set()
    for text in sampled(engine, tokenizer, [grammar] * 16, range(16)):
        parser = ToolCallParser(fmt)
        parser.feed(text)
        parser.finish()
        if parser.calls:
            kinds.add("call")
            jsonschema.validate(json.loads(parser.calls[0].arguments), WEATHER["function"]["parameters"])
        else:
            kinds.add("answer")
            jsonschema.validate(json.loads(text), SCHEMA)
    assert kinds == {"call", "answer"}  # a random model takes both ways


CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_a_repeated_call_ends_the_answer_and_a_later_call_cut_short_is_dropped():
    from openai_api.tool_calls import AnswerParser

    parser = AnswerParser(FORMATS["hermes"])
    again = CALL.replace('{"city": "Paris"}', '{\n  "city":  "Paris"\n}')  # the same call, other whitespace
    for piece in (CALL, "\n", again[:30], again[30:], "\n<tool_call>\n{"):
        parser.feed(piece)
        assert not parser.ended or piece is not CALL
    assert parser.ended and [json.loads(c.arguments) for c in parser.calls] == [{"city": "Paris"}]
    parser = AnswerParser(FORMATS["hermes"])
    streamed = parser.feed(CALL + '\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lo')
    streamed.calls += parser.feed("", final=True).calls
    assert [(d.index, d.name) for d in streamed.calls if d.id] == [(0, "get_weather")]  # the cut call: dropped
    assert len(parser.calls) == 1 and parser.finish_reason("length") == "tool_calls" and not parser.ended
    parser = AnswerParser(FORMATS["hermes"])
    parser.feed(CALL[:40], final=True)  # the first call cut short: no complete call
    assert parser.finish_reason("length") == "length"


def test_the_parser_reads_each_character_once():
    """A long call costs no more per token than a short one (it was parsed whole on every token)."""
    parser = ToolCallParser(FORMATS["hermes"])
    parser.feed('<tool_call>\n{"name": "write", "arguments": {"text": "')

    def feed(n):
        start = time.perf_counter()
        for _ in range(n):
            parser.feed("word ")
        return time.perf_counter() - start

    first = feed(300)
    feed(4_000)
    assert feed(300) < 3 * first + 0.01
    parser.feed('"}}\n</tool_call>')
    parser.finish()
    assert len(json.loads(parser.calls[0].arguments)["text"]) == 4_600 * 5
