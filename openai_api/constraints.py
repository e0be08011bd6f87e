"""What a request's output must match, as the one EBNF grammar the engine takes
(``SamplingParams.grammar``): from ``response_format`` (``json_object``, ``json_schema``), from vLLM's
extensions (``structured_outputs`` with ``json``, ``regex``, ``choice`` or ``grammar``; the older
``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar``), and from the tool calls a
request allows (``tool_calls.tool_grammar``).

Converting is checking: a schema, regex or grammar xgrammar cannot take, or one past
``MAX_GRAMMAR_BYTES`` as sent or as the grammar it becomes, is a 400 naming the field. Conversions are
cached, so a schema sent again costs nothing here, and its compiled form is cached by the engine.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

from openai_api.errors import OpenAIError, invalid_value

# The longest run of whitespace allowed between JSON tokens: enough to indent a few levels, too
# little for a small model to fill its answer with newlines.
MAX_WHITESPACE = 8
# The most digits of a JSON number's integer part, fraction or exponent that a schema does not bound:
# 15 is what a double holds exactly; an unbounded run lets a small model write digits until max_tokens.
MAX_DIGITS = 15
# The most bytes of one constraint as sent (a schema as JSON, a regex, a grammar) and of the grammar it
# becomes. Compiling costs time and memory that grow faster than a grammar's size (on this project's
# 2-core CPU: 250 kB of grammar 0.1-2 s and up to 70 MB; a 300 kB schema of 10,000 properties becomes
# 2.5 MB of grammar, 29 s and 50 MB), and a schema within OpenAI's own limits (5,000 properties, 120,000
# characters of names and values) is far smaller.
MAX_GRAMMAR_BYTES = 256 * 1024


def library_message(error: Exception) -> str:
    """xgrammar's message without its ``[time] /path/file.cc:line:`` prefix."""
    text = re.sub(r"^\[[\d:]+\] \S+:\d+: (Check failed: .*? is false: )?", "", str(error).strip())
    return text.split(" The JSON string is:")[0]


@functools.lru_cache(maxsize=128)
def _convert(kind: str, spec: str) -> str:
    import xgrammar as xgr

    if kind == "json_schema":
        grammar = xgr.Grammar.from_json_schema(spec, any_whitespace=True, max_whitespace_cnt=MAX_WHITESPACE)
    elif kind == "json_object":  # any object: a schema that allows every property
        grammar = xgr.Grammar.from_json_schema('{"type": "object"}', strict_mode=False, any_whitespace=True,
                                               max_whitespace_cnt=MAX_WHITESPACE)
    elif kind == "regex":
        grammar = xgr.Grammar.from_regex(spec)
    elif kind == "grammar":
        grammar = xgr.Grammar.from_ebnf(spec)
    elif kind == "structural_tag":
        grammar = xgr.Grammar.from_structural_tag(spec)
    else:
        raise ValueError(kind)
    text = str(grammar)
    if kind in ("json_schema", "json_object", "structural_tag"):
        text = bound_json(text)
    if len(text) > MAX_GRAMMAR_BYTES:
        raise ValueError(f"it becomes a grammar of {len(text):,} bytes; at most {MAX_GRAMMAR_BYTES:,} are taken")
    return text


def bound_json(ebnf: str) -> str:
    """Bound the digit runs of JSON numbers (``MAX_DIGITS``), and mend what xgrammar 0.2 writes for
    the characters of a string with maxLength or minLength: without JSON's ban on raw control
    characters, so a model could put a tab or a NUL in one."""
    ebnf = ebnf.replace("[0-9]*", f"[0-9]{{0, {MAX_DIGITS - 1}}}")
    ebnf = re.sub(r"(\w*digits\w*)\{1, -1\}", rf"\1{{1, {MAX_DIGITS}}}", ebnf)
    return ebnf.replace(r'[^\"\\\r\n]', r'[^\0-\x1f\"\\\r\n]')


def to_grammar(kind: str, spec: Any, param: str) -> str:
    """``spec`` (a schema as a dict, a regex, EBNF text, a structural tag as a dict) as EBNF; a 400
    naming ``param`` when xgrammar refuses it."""
    text = spec if isinstance(spec, str) else json.dumps(spec, sort_keys=True)
    size = len(text.encode())
    if size > MAX_GRAMMAR_BYTES:
        raise invalid_value(param, f"is {size:,} bytes; at most {MAX_GRAMMAR_BYTES:,} are taken")
    try:
        return _convert(kind, text)
    except (RuntimeError, ValueError, TypeError) as e:
        raise invalid_value(param, f"cannot be used to constrain the output: {library_message(e)}") from e


def choice_grammar(choices: list[str]) -> str:
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


def schema_of(response_format: dict) -> dict:
    """The JSON schema of a ``json_schema`` response format (400 when it holds none)."""
    spec = response_format.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise invalid_value("response_format.json_schema.schema", "must be a JSON schema (an object)")
    return schema


def response_format_grammar(response_format: dict | None) -> str | None:
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return to_grammar("json_object", "", "response_format")
    if kind == "json_schema":
        return to_grammar("json_schema", schema_of(response_format), "response_format.json_schema.schema")
    raise invalid_value("response_format.type", f"{kind!r} is not one of 'text', 'json_object', 'json_schema'")


# vLLM's names: structured_outputs.<key>, and the older top-level guided_<key>.
EXTENSION_KINDS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar"}


def extension_grammar(structured_outputs: dict | None, guided: dict[str, Any]) -> tuple[str | None, str | None]:
    """(EBNF, the field it came from) of vLLM's structured-output extensions, or (None, None)."""
    given = {f"structured_outputs.{k}": (k, v) for k, v in (structured_outputs or {}).items() if v is not None}
    given.update({f"guided_{k}": (k, v) for k, v in guided.items() if v is not None})
    unknown = [p for p, (k, _) in given.items() if k not in EXTENSION_KINDS]
    if unknown:
        raise invalid_value(unknown[0], f"unknown; use one of {', '.join(EXTENSION_KINDS)}")
    if len(given) > 1:
        raise invalid_value(sorted(given)[1], f"only one output constraint per request; {', '.join(sorted(given))} "
                                              "are given")
    if not given:
        return None, None
    param, (key, value) = next(iter(given.items()))
    kind = EXTENSION_KINDS[key]
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise invalid_value(param, "must be a non-empty list of non-empty strings")
        return choice_grammar(value), param
    if kind == "json_schema" and isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise invalid_value(param, f"is not JSON: {e}") from e
    if kind != "json_schema" and not isinstance(value, str):
        raise invalid_value(param, "must be a string")
    if kind == "json_schema" and not isinstance(value, (dict, bool)):
        raise invalid_value(param, "must be a JSON schema")
    return to_grammar(kind, value, param), param


def combine(*grammars: tuple[str | None, str | None]) -> str | None:
    """The one grammar among ``(grammar, field)`` pairs; a 400 when two fields constrain the output."""
    given = [(g, p) for g, p in grammars if g is not None]
    if len(given) > 1:
        raise OpenAIError(400, f"{given[1][1]}: cannot be combined with {given[0][1]}; give one output constraint",
                          param=given[1][1], code="invalid_value")
    return given[0][0] if given else None
