"""What the published schema says beyond the request models' types: the bounds their validators
enforce, so that a request the schema calls valid is one the server takes (schemathesis checks it in
tests/test_fuzz.py). Limits that depend on the served model or on this server's state are not here."""

from __future__ import annotations

MIN_TEMPERATURE = 1e-5  # below it (but 0, greedy), dividing the logits by it would overflow
MAX_STOPS, MAX_STOP_CHARS = 32, 1024
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's bound

NULL = {"type": "null"}
TEMPERATURE = {"anyOf": [{"const": 0}, {"type": "number", "minimum": MIN_TEMPERATURE, "maximum": 2}, NULL],
               "description": f"0 (greedy), or from {MIN_TEMPERATURE} to 2"}
_STOP = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS}
STOP = {"anyOf": [_STOP, {"type": "array", "items": _STOP, "maxItems": MAX_STOPS}, NULL]}
TOOL_NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"


def _ids(min_items: int = 1) -> dict:
    return {"type": "array", "items": {"type": "integer"}, "minItems": min_items}


PROMPT = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}, _ids(),
                    {"type": "array", "items": _ids(), "minItems": 1}]}
_TEXT = {"type": "string", "minLength": 1}
EMBEDDING_INPUT = {"anyOf": [_TEXT, {"type": "array", "items": _TEXT, "minItems": 1, "maxItems": MAX_EMBEDDING_INPUTS}],
                   "description": "text, or a list of texts (token ids are not supported)"}
UNSUPPORTED = {"description": "not supported: only leaving it out (or its default) is accepted"}


def only_with(field: str, value, given: str) -> dict:
    """A request's schema condition: ``given`` is left out (or null) unless ``field`` is ``value``."""
    return {"anyOf": [{"properties": {field: {"const": value}}, "required": [field]},
                      {"properties": {given: NULL}}]}


# a chat message: only an assistant's may leave out its content, or make tool calls
MESSAGE = {"anyOf": [{"properties": {"role": {"const": "assistant"}}},
                     {"properties": {"content": {"type": ["string", "array"]},
                                     "tool_calls": {"anyOf": [NULL, {"type": "array", "maxItems": 0}]}},
                      "required": ["content"]}]}


def function_tool(schema: dict) -> None:
    """A chat tool's schema: of type `function`, with its function."""
    function = schema["properties"]["function"]
    schema["properties"].update(type={"const": "function"}, function=next(s for s in function["anyOf"] if s != NULL))
    schema["required"] = ["type", "function"]


TOOL_CHOICE = {"anyOf": [{"enum": ["none", "auto", "required"]}, NULL, {
    "type": "object", "required": ["type", "function"], "properties": {"type": {"const": "function"}, "function": {
        "type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}}}]}
RESPONSE_FORMAT = {"anyOf": [NULL, {"type": "object", "required": ["type"], "properties": {
    "type": {"enum": ["text", "json_object", "json_schema"]}}}]}
