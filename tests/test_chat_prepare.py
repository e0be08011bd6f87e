"""Where a chat request's prompt is rendered and its parameters made: on the event loop for a short
plain chat (a hop to a worker thread and back costs more than the work), on a worker thread for a long
one or one with tools or an output format (the work grows with it and must not hold up other streams)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from models.config import ServedModel
from openai_api.chat import start_chat
from openai_api.protocol import ChatCompletionRequest
from runners.engine.sequence import SamplingParams


class Info:
    """A model's info, recording the thread that renders its prompts."""

    def __init__(self):
        self.served = ServedModel(id="m", model="m")
        self.tool_marker_ids, self.tool_format = frozenset(), None
        self.rendered_on: list[threading.Thread] = []

    def render_chat(self, messages, tools=None):
        self.rendered_on.append(threading.current_thread())
        return [1, 2, 3]


class Registry:
    def __init__(self, info):
        self.model = type("Model", (), {"id": "m", "info": info})()

    def get(self, model_id, kind=None):
        return self.model


def prepared_on(monkeypatch, **request) -> threading.Thread:
    info = Info()
    monkeypatch.setattr(ChatCompletionRequest, "to_sampling_params", lambda self, *a, **k: SamplingParams())
    req = ChatCompletionRequest(model="m", **request)
    asyncio.run(start_chat(Registry(info), req, request=None))
    return info.rendered_on[0]


QUESTION = [{"role": "user", "content": "How do bees make honey?"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def test_a_short_plain_chat_is_prepared_on_the_event_loop(monkeypatch):
    assert prepared_on(monkeypatch, messages=QUESTION) is threading.main_thread()


@pytest.mark.parametrize("request_", [
    {"messages": [{"role": "user", "content": "honey " * 400}]},
    {"messages": QUESTION, "tools": [TOOL]},
    {"messages": QUESTION, "response_format": {"type": "json_object"}},
    {"messages": QUESTION, "guided_regex": "[a-z]+"},
    {"messages": [*QUESTION, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"x": "' + "y" * 3000 + '"}'}}]},
        {"role": "tool", "tool_call_id": "c", "content": "ok"}]},
])
def test_a_long_or_constrained_chat_is_prepared_on_a_worker_thread(monkeypatch, request_):
    assert prepared_on(monkeypatch, **request_) is not threading.main_thread()
