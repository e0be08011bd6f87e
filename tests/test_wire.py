"""The runner wire protocol, both ends, and the gateway's side of it (``Model.generate``): retries before
the first token, aborts, OpenAI errors. The runners here are stand-ins for the transport only; the
end-to-end tests generate with real ones."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
from http import HTTPStatus

import pytest
from bentoml.exceptions import BentoMLException

from conftest import ROOT
from controller import Model, Replica
from openai_api import ids
from models.config import ServedModel
from models.info import ModelInfo
from openai_api.errors import OpenAIError
from runners.engine.sequence import SamplingParams, TokenEvent
from runners.wire import ENGINE_DEAD, INVALID_REQUEST, QUEUE_FULL, RunnerRefused, error_line, read_events, token_line


async def _chunks(*parts):
    for part in parts:
        yield part


async def _read(*parts) -> list[TokenEvent]:
    return [e async for e in read_events(_chunks(*parts))]


def test_token_lines_read_back_whatever_the_transport_chunks():
    events = [TokenEvent(5, None), TokenEvent(7, None, -0.5, [(7, -0.5), (3, -1.25)]), TokenEvent(2, "stop")]
    wire = "".join(token_line(e) for e in events)
    assert asyncio.run(_read(wire)) == events
    assert asyncio.run(_read(*wire)) == events  # one character a chunk
    assert asyncio.run(_read(wire.encode()[:7], wire.encode()[7:])) == events  # bytes, split mid-line


def test_the_first_token_line_carries_the_prompt_tokens_the_prefix_cache_gave():
    """Before, the gateway never learnt them: usage and the ledger said 0 cached tokens."""
    events = [TokenEvent(5, None, cached_tokens=12), TokenEvent(2, "stop")]
    wire = "".join(token_line(e) for e in events)
    assert '"cached_tokens": 12' in wire.splitlines()[0] and "cached_tokens" not in wire.splitlines()[1]
    assert asyncio.run(_read(wire)) == events


def test_an_error_line_raises_with_its_code_after_the_tokens_before_it():
    async def run():
        seen = []
        with pytest.raises(RunnerRefused) as e:
            async for event in read_events(_chunks(token_line(TokenEvent(5, None)), error_line(QUEUE_FULL, "full", 3))):
                seen.append(event.token_id)
        return seen, e.value

    seen, error = asyncio.run(run())
    assert seen == [5] and (error.code, error.message, error.retry_after) == (QUEUE_FULL, "full", 3)


def test_sampling_params_cross_the_wire_and_unknown_keys_are_refused():
    params = SamplingParams(max_tokens=9, temperature=0.5, stop_token_ids=(2, 3), stop=("\n\n",), seed=7, logprobs=2)
    assert SamplingParams.from_dict(params.to_dict()) == params
    with pytest.raises(ValueError, match="unknown sampling parameters: top_a"):
        SamplingParams.from_dict({**params.to_dict(), "top_a": 0.1})


def test_the_gateways_shared_types_load_no_torch():
    code = ("import sys; import openai_api.protocol, runners.engine.sequence; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


class FakeRunner:
    """A runner's client: ``script`` says how each call of ``generate`` goes."""

    def __init__(self, *script):
        self.script, self.calls, self.aborted, self.extra = list(script), [], [], []

    def generate(self, request_id, prompt_ids, params, **extra):
        self.calls.append(request_id)
        self.extra.append(extra)
        step = self.script.pop(0)

        async def stream():
            for item in step:
                if isinstance(item, Exception):
                    raise item
                yield item
        return stream()

    async def abort(self, request_id):
        self.aborted.append(request_id)
        return True


def _model(*runners) -> Model:
    served = ServedModel(id="m", model="m")
    info = ModelInfo(served=served, tag="m:1", created=0, context_length=100, tokenizer=None)
    return Model(served, [Replica(f"r{i}", client=r, ready=True) for i, r in enumerate(runners)], info=info)


async def _generate(model: Model, read: int | None = None) -> list[int]:
    out = []
    stream = model.generate([1, 2], SamplingParams())
    async for event in stream:
        out.append(event.token_id)
        if read is not None and len(out) == read:
            await stream.aclose()
            break
    await asyncio.sleep(0)  # let the background abort run
    return out


def test_a_call_that_fails_before_its_first_token_is_retried_on_another_replica_and_aborted():
    broken = FakeRunner([ConnectionResetError("pooled connection closed")])
    healthy = FakeRunner([token_line(TokenEvent(5, None)), token_line(TokenEvent(2, "stop"))])
    model = _model(broken, healthy)
    model.replicas[1].load = 1  # the broken replica has the shorter queue: it is tried first
    out = asyncio.run(_generate(model))
    assert out == [5, 2]
    assert broken.aborted == broken.calls and healthy.aborted == []  # the finished sequence needs no abort
    assert len(broken.calls) == len(healthy.calls) == 1 and broken.calls != healthy.calls  # each its own sequence


def test_a_stream_nobody_reads_is_aborted_and_one_cut_midway_is_a_503():
    runner = FakeRunner([token_line(TokenEvent(i, None)) for i in range(10)],
                        [token_line(TokenEvent(5, None)), ConnectionResetError("runner died")])
    model = _model(runner)
    assert asyncio.run(_generate(model, read=3)) == [0, 1, 2]
    assert runner.aborted == runner.calls[:1]
    with pytest.raises(OpenAIError) as e:
        asyncio.run(_generate(model))
    assert e.value.status == 503 and e.value.code == "model_unavailable"
    assert len(runner.calls) == 2  # tokens had been sent: not retried


@pytest.mark.parametrize("code, status", [(QUEUE_FULL, 429), (INVALID_REQUEST, 400), (ENGINE_DEAD, 503),
                                          ("engine_error", 500)])
def test_what_the_runner_refuses_becomes_the_openai_error_and_is_not_retried(code, status):
    runner = FakeRunner([error_line(code, "prompt: refused", 2 if code == QUEUE_FULL else None)])
    with pytest.raises(OpenAIError) as e:
        asyncio.run(_generate(_model(runner)))
    assert e.value.status == status and len(runner.calls) == 1 and runner.aborted == []
    if code == QUEUE_FULL:
        assert e.value.headers == {"Retry-After": "2"}


def test_the_requests_tenant_and_its_weight_go_to_the_runner_only_where_there_is_one():
    runner = FakeRunner(*[[token_line(TokenEvent(2, "stop"))]] * 3)
    model = _model(runner)
    model.replicas[0].adapters = {"lora": {}}

    async def generate_for(tenant):
        ids.TENANT.set(tenant)  # as the key middleware sets it (in this task's own context)
        return await _generate(model)

    assert asyncio.run(generate_for(("team-a", 3.0))) == [2]
    assert asyncio.run(generate_for(None)) == [2]

    async def on_adapter():
        ids.TENANT.set(("team-b", 0.5))
        return [e.token_id async for e in model.generate([1, 2], SamplingParams(), adapter="lora")]

    assert asyncio.run(on_adapter()) == [2]
    assert runner.extra == [{"tenant": "team-a", "weight": 3.0}, {},  # a runner without tenants gets no new argument
                            {"adapter": "lora", "tenant": "team-b", "weight": 0.5}]


class AdapterRunner:
    """A runner's client that answers ``load_adapter`` with ``answer`` (or raises it)."""

    def __init__(self, answer):
        self.answer, self.unloaded = answer, []

    async def load_adapter(self, name, source):
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer

    async def unload_adapter(self, name):
        self.unloaded.append(name)
        return {"unloaded": name}


@pytest.mark.parametrize("answer, status, code, words", [
    ({"error": "not an adapter this server may load"}, 400, "invalid_value", "not an adapter"),
    ({"error": "EngineError: the engine thread has stopped", "fault": True}, 500, "adapter_load_failed",
     "EngineError: the engine thread has stopped"),
    (BentoMLException("500: MemoryError", error_code=HTTPStatus(500)), 500, "adapter_load_failed", "MemoryError"),
    (BentoMLException("400: name: not a string", error_code=HTTPStatus(400)), 400, "invalid_value", "not a string"),
    (ConnectionRefusedError("refused"), 503, "model_unavailable", "do not answer"),
])
def test_a_failed_adapter_load_is_the_openai_error_of_its_cause(answer, status, code, words):
    """A bad adapter is a 400, a fault of the runner a 500 naming it, a runner that gives no answer a 503;
    it is loaded on no replica. Before, whatever a runner raised was a 503 saying it did not answer."""
    good = AdapterRunner({"adapter": {"rank": 4}})
    model = _model(good, AdapterRunner(answer))
    with pytest.raises(OpenAIError) as e:
        asyncio.run(model.load_adapter("x", "/adapters/x"))
    assert (e.value.status, e.value.code) == (status, code) and words in e.value.message, e.value.message
    assert good.unloaded == ["x"]


class OpenEndedRunner(FakeRunner):
    """Each call's transport stream goes on after its lines (a runner's body ends a moment after its last
    line): the gateway, done at the finishing token, stops reading before the end."""

    def generate(self, request_id, prompt_ids, params, **extra):
        lines = self.script.pop(0)

        async def stream():
            for line in lines:
                yield line
            await asyncio.Event().wait()
        return stream()


def test_streams_ended_or_refused_leave_no_garbage_for_the_collector():
    """A stream's end (its reader cancelled mid-read) and a refusal leave no reference cycles, which only
    the collector's full collections would free: under load those held the gateway for tens of ms."""
    rounds = 20
    runner = OpenEndedRunner(*([token_line(TokenEvent(5, None)), token_line(TokenEvent(2, "stop"))],
                               [error_line(QUEUE_FULL, "queue full", 1)]) * (rounds + 1))
    model = _model(runner)

    async def streams() -> int:
        async def one_of_each():
            assert await _generate(model, read=2) == [5, 2]
            with pytest.raises(OpenAIError):
                await _generate(model)
            await asyncio.sleep(0.01)  # the readers' cancellation and their streams' close run
        await one_of_each()  # first calls make what lives on (the event loop's own)
        gc.collect()
        for _ in range(rounds):
            await one_of_each()
        return gc.collect()

    gc.disable()
    try:
        assert asyncio.run(streams()) == 0
    finally:
        gc.enable()
