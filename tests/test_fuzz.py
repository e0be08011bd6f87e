"""A bounded fuzz run: schemathesis generates requests from the published OpenAPI schema (valid
ones and ones that break it) for every /v1 route (the Responses API with its own input items, tools
and tool_choice), and none may get a server error, nor an answer of a content type the schema does
not name, nor leave the chat model unable to answer."""

from __future__ import annotations

import re
import zlib

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from conftest import CHAT, EMBED, TINY
from openai_api.routes import app

pytestmark = pytest.mark.slow

EXAMPLES = {"positive": 40, "negative": 20}  # per route: requests that fit the schema, and ones that do not
MODELS = [CHAT, TINY, EMBED]
# paths that once made the runner fail or read what it should not (/v1/load_lora_adapter's lora_path)
PATHS = ["/proc/1/root", "/proc/self/root", "/root", "/root/.ssh", "~", "~nosuchuser/x", "~\udcff\ud800", "/dev/zero",
         "/" + "a" * 300, "a" * 70, "/", ".", "..", "all-minilm-l6-v2", "/etc/passwd"]
# keep generation short
CAPS = {"max_tokens": 4, "max_completion_tokens": 4, "max_output_tokens": 4, "min_tokens": 4, "n": 2}


def _served(body):
    """Most generated bodies name one of the served models (so they reach tokenizing and the
    engine), and ask for few tokens; some keep the model the fuzzer made up."""
    if not isinstance(body, dict):
        return body
    body = dict(body)
    if isinstance(body.get("lora_path"), str):
        pick = zlib.crc32(body["lora_path"].encode(errors="surrogatepass")) % (len(PATHS) + 1)
        body["lora_path"] = PATHS[pick] if pick < len(PATHS) else body["lora_path"]
    if isinstance(body.get("model"), str):
        pick = zlib.crc32(repr(sorted(body, key=str)).encode()) % (len(MODELS) + 1)
        body["model"] = MODELS[pick] if pick < len(MODELS) else body["model"]
    for key, cap in CAPS.items():
        if isinstance(body.get(key), (int, float)) and not isinstance(body[key], bool) and body[key] > cap:
            body[key] = cap
    # (null is no bound: a model with no default of its own answers up to its context)
    if ("messages" in body or "prompt" in body) and body.get("max_tokens") is None:
        body["max_tokens"] = CAPS["max_tokens"]
    if ("input" in body or "instructions" in body) and body.get("max_output_tokens") is None:  # the Responses API
        body["max_output_tokens"] = CAPS["max_output_tokens"]
    if isinstance(body.get("prompts"), list):
        body["prompts"] = [_served(p) for p in body["prompts"]]
    return body


# Every route; those with a body also with bodies that break its schema.
CASES = [(method.upper(), path, mode) for path, operations in app.openapi()["paths"].items()
         for method, operation in operations.items() for mode in EXAMPLES
         if mode == "positive" or "requestBody" in operation]


# The routes whose schema says what their validators refuse; and the refusals of a schema-valid request
# that no schema can foresee, by the error's code or the field it names, and why.
AGREEING = ["/chat/completions", "/completions", "/embeddings", "/responses", "/load_lora_adapter"]
UNFORESEEABLE = {
    "model_not_found": "a model name the server does not serve", "model_not_supported": "a model of another kind",
    "context_length_exceeded": "each model's context", "queue_full": "the model's queue, under load",
    "response_not_found": "previous_response_id names a stored response, or not",
    "dimensions": "each embedding model's size",
    "lora_path": "a directory inside lora.adapter_dirs, or an adapter in the store",
    "lora_name": "a name not served already", "model": "a base model that takes adapters",
    "structured_outputs": "a JSON schema, regex or grammar that compiles: text to any schema",
    "guided_json": "the same", "guided_regex": "the same", "guided_grammar": "the same", "guided_choice": "the same",
    "response_format": "the same", "text": "the same", "tools": "the same, of each function's parameters",
}
# ... or by how its message begins
MESSAGES = {
    "prompt: token ids must be": "token ids within each model's vocabulary", "stop_token_ids:": "the same",
    "input: List should have at least 1 item": "input items that make no message (reasoning items alone)",
    # one field tied to another:
    "tool_choice:": "names a function among the tools", "tools: function names": "unique by their name",
    "min_tokens:": "at most max_tokens", "best_of:": "equal to n",
}


def unforeseeable(response) -> bool:
    error = response.json().get("error") or {}
    field = re.split(r"[.\[]", error.get("param") or "")[0]
    return (error.get("code") in UNFORESEEABLE or field in UNFORESEEABLE
            or error.get("message", "").startswith(tuple(MESSAGES)))


def content_types(operation: dict, status: int) -> set[str]:
    documented = operation["responses"].get(str(status)) or operation["responses"]["default"]
    return set(documented.get("content", {"application/json": {}}))


def test_the_responses_api_is_published_in_its_own_shapes():
    request = app.openapi()["components"]["schemas"]["ResponsesRequest"]["properties"]
    kinds = {i["properties"]["type"].get("const") for i in request["input"]["anyOf"][1]["items"]["anyOf"]}
    assert kinds == {"message", "function_call", "function_call_output", "reasoning"}
    assert request["tool_choice"]["anyOf"][1]["required"] == ["type", "name"]
    assert request["tools"]["items"]["properties"]["type"] == {"const": "function"}


@pytest.mark.parametrize("method, path, mode", CASES)
def test_no_request_gets_a_server_error(server, client, method, path, mode):
    spec = app.openapi()
    schema = schemathesis.openapi.from_dict(spec)
    schema.config.update(base_url=server.v1)
    operation = schema[path][method]

    @settings(max_examples=EXAMPLES[mode], deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=schemathesis.GenerationMode(mode)))
    def no_server_error(case):
        case.body = _served(case.body)
        response = case.call(timeout=120)
        assert response.status_code < 500, (case.as_curl_command(), response.status_code, response.text[:500])
        content_type = response.headers["content-type"][0].split(";")[0]
        assert content_type in content_types(spec["paths"][path][method.lower()], response.status_code), (
            case.as_curl_command(), response.status_code, content_type)

    no_server_error()
    assert client.completions.create(model=CHAT, prompt="Hello", max_tokens=2).choices[0].finish_reason


@pytest.mark.parametrize("path", AGREEING)
def test_a_request_the_schema_calls_valid_is_taken(server, path):
    """schemathesis's positive check: what the published schema calls valid gets no 4xx, but for what
    depends on the served models and the server's state, or ties one field to another (UNFORESEEABLE)."""
    schema = schemathesis.openapi.from_dict(app.openapi())
    schema.config.update(base_url=server.v1)

    @settings(max_examples=25, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(case=schema[path]["POST"].as_strategy(generation_mode=schemathesis.GenerationMode.POSITIVE))
    def taken(case):
        case.body = _served(case.body)
        response = case.call(timeout=120)
        assert response.status_code < 400 or unforeseeable(response), (
            case.as_curl_command(), response.status_code, response.text[:500])

    taken()
