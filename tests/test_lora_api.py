"""LoRA adapters served: a tiny Llama with an adapter imported into the store and one read from its
directory, called with the openai client by name and as ``<base>:<adapter>``; each answer is PEFT's
``PeftModel`` alone on that adapter, whatever else runs in the batch; adapters loaded and unloaded at
run time (vLLM's routes), with clear errors for what does not fit; one slot shared least recently used
first; metrics and stats per adapter. Loading at run time is off unless switched on, and then reads only
adapter directories inside the configured ones, with one answer for whatever it may not load."""

from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from conftest import LORA_ALL, LORA_BASE, LORA_ONE_SLOT, LORA_QV, listed, process_tree, serving

pytestmark = pytest.mark.slow

PROMPTS = ["The quick brown fox", "Paris is the capital", "你好，世界", "A model answers questions about rivers"]
N = 16
PLAIN = {"repetition_penalty": 1.0}  # the tiny model's generation_config asks for a penalty PeftModel is run without
NOT_LOADABLE = "lora_path: not an adapter this server may load"  # the one answer for any of it
PROBES = (f"probe-{i}" for i in itertools.count())  # a new name each time: a probe that loads takes none of the next


@pytest.fixture(scope="module")
def expected(tiny_llama_dir, lora_adapters):
    """(prompt, adapter directory name or None) -> PeftModel's greedy text alone, up to N tokens or EOS."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir, trust_remote_code=True)
    texts = {}
    for key in (None, "all", "qv"):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="eager").eval()
        if key is not None:
            model = PeftModel.from_pretrained(model, lora_adapters[key]).eval()
        for prompt in PROMPTS:
            ids = tokenizer(prompt)["input_ids"]
            out = model.generate(torch.tensor([ids]), max_new_tokens=N, do_sample=False, repetition_penalty=1.0)
            texts[prompt, key] = text(tokenizer.decode(out[0, len(ids):], skip_special_tokens=True))
    assert len({texts[PROMPTS[0], key] for key in (None, "all", "qv")}) == 3  # the adapters change the answers
    return texts


def text(answer: str) -> str:
    """The answer without an incomplete UTF-8 sequence at its end (random weights write odd bytes), which
    ``decode`` shows as U+FFFD and the server's detokenizer leaves out."""
    return answer.rstrip("\ufffd")


async def complete(server, calls: list[tuple[str, str]]) -> list[str]:
    """Each (model, prompt) at once: greedy completions of N tokens."""
    async with openai.AsyncOpenAI(base_url=server.v1, api_key="x", max_retries=0, timeout=120) as c:
        async def one(model, prompt):
            r = await c.completions.create(model=model, prompt=prompt, max_tokens=N, temperature=0, extra_body=PLAIN)
            return text(r.choices[0].text)
        return await asyncio.gather(*(one(m, p) for m, p in calls))


def post(server, route: str, body: dict) -> httpx.Response:
    """``body`` as ASCII JSON: a lone surrogate too."""
    return httpx.post(f"{server.v1}/{route}", content=json.dumps(body), timeout=60,
                      headers={"content-type": "application/json"})


def test_adapters_are_listed_with_their_parent(server, client):
    cards = {m.id: m for m in client.models.list().data}
    for name in (LORA_ALL, LORA_QV):
        assert cards[name].model_extra["parent"] == LORA_BASE
        assert cards[name].model_extra["template"] == cards[LORA_BASE].model_extra["template"]
    assert cards[LORA_BASE].model_extra["parent"] is None
    assert client.models.retrieve(f"{LORA_BASE}:{LORA_QV}").model_extra["parent"] == LORA_BASE
    assert cards["one-slot-all"].model_extra["parent"] == LORA_ONE_SLOT


def test_mixed_batch_answers_as_peft_alone(server, expected):
    """The base and both adapters, four prompts each, all at once (12 requests in one running batch)."""
    key = {LORA_BASE: None, LORA_ALL: "all", LORA_QV: "qv", f"{LORA_BASE}:{LORA_QV}": "qv"}
    calls = [(model, p) for p in PROMPTS for model in (LORA_BASE, LORA_ALL, f"{LORA_BASE}:{LORA_QV}")]
    got = asyncio.run(complete(server, calls))
    assert got == [expected[p, key[m]] for m, p in calls]
    stats = httpx.get(f"{server.v1}/stats", timeout=30).json()["data"][LORA_BASE]
    assert stats["adapters"][LORA_ALL]["tokens_generated"] >= len(PROMPTS)
    assert stats["adapters"][LORA_QV]["resident"] is True


def test_chat_on_an_adapter_streams(client):
    messages = [{"role": "user", "content": "Hello"}]
    full = client.chat.completions.create(model=LORA_ALL, messages=messages, max_tokens=8, temperature=0,
                                          extra_body=PLAIN)
    stream = client.chat.completions.create(model=LORA_ALL, messages=messages, max_tokens=8, temperature=0,
                                            extra_body=PLAIN, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == full.choices[0].message.content
    assert full.model == LORA_ALL


def test_one_slot_takes_turns(server, expected):
    """max_loras 1: requests for two adapters and the base at once; every answer is still its own."""
    key = {LORA_ONE_SLOT: None, "one-slot-all": "all", "one-slot-qv": "qv"}
    calls = [(model, p) for p in PROMPTS[:2] for model in key]
    assert asyncio.run(complete(server, calls)) == [expected[p, key[m]] for m, p in calls]
    stats = httpx.get(f"{server.v1}/stats", timeout=30).json()["data"][LORA_ONE_SLOT]
    assert stats["adapter_evictions"] >= 1
    assert sum(a["resident"] for a in stats["adapters"].values()) == 1


def test_load_and_unload_at_run_time(server, client, lora_adapters, expected):
    loaded = post(server, "load_lora_adapter", {"lora_name": "late-qv", "lora_path": str(lora_adapters["qv"]),
                                                "model": LORA_BASE})
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["parent"] == LORA_BASE and loaded.json()["rank"] == 4
    assert "late-qv" in {m.id for m in client.models.list().data}
    assert asyncio.run(complete(server, [("late-qv", PROMPTS[0])])) == [expected[PROMPTS[0], "qv"]]

    # A request running when its adapter is unloaded finishes on it.
    async def unload_during_stream():
        async with openai.AsyncOpenAI(base_url=server.v1, api_key="x", max_retries=0, timeout=120) as c:
            stream = await c.completions.create(model="late-qv", prompt=PROMPTS[1], max_tokens=200, temperature=0,
                                                stream=True, extra_body={**PLAIN, "min_tokens": 200})
            chunks = [await anext(aiter(stream))]
            unloaded = await asyncio.to_thread(post, server, "unload_lora_adapter", {"lora_name": "late-qv"})
            chunks += [c async for c in stream]
            return unloaded, chunks

    unloaded, chunks = asyncio.run(unload_during_stream())
    assert unloaded.status_code == 200, unloaded.text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].text for c in chunks if c.choices).startswith(expected[PROMPTS[1], "qv"])
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="late-qv", prompt="x", max_tokens=2)
    again = post(server, "unload_lora_adapter", {"lora_name": "late-qv"})
    assert again.status_code == 404 and again.json()["error"]["code"] == "adapter_not_found"


def crafted(lora_adapters, name: str, **config) -> Path:
    """A copy of the "qv" adapter inside the server's lora.adapter_dirs, ``config`` over its adapter_config.json."""
    copy = lora_adapters["qv"].parent / name
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(lora_adapters["qv"], copy)
    file = copy / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **config}))
    return copy


def refused(server, path) -> str:
    """The message a load of ``path`` is refused with (a 400 naming lora_path)."""
    r = post(server, "load_lora_adapter", {"lora_name": next(PROBES), "lora_path": str(path), "model": LORA_BASE})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path", (path, r.text)
    return r.json()["error"]["message"]


def test_adapters_that_do_not_fit_are_400s_and_disturb_nothing(server, client, lora_adapters, tmp_path):
    from safetensors.torch import load_file, save_file

    wider = crafted(lora_adapters, "wider")
    state = load_file(wider / "adapter_model.safetensors")
    save_file({k: torch.zeros(v.shape[0], 48) if "lora_A" in k else v for k, v in state.items()},
              wider / "adapter_model.safetensors")
    cases = [
        ({"lora_name": "wider", "lora_path": str(wider), "model": LORA_BASE}, "lora_path", "another base model"),
        ({"lora_name": "gone", "lora_path": str(tmp_path / "nowhere"), "model": LORA_BASE}, "lora_path",
         NOT_LOADABLE),
        ({"lora_name": "model", "lora_path": "all-minilm-l6-v2", "model": LORA_BASE}, "lora_path", NOT_LOADABLE),
        ({"lora_name": LORA_ALL, "lora_path": str(lora_adapters["qv"]), "model": LORA_BASE}, "lora_name",
         "served already"),
        ({"lora_name": "x", "lora_path": str(lora_adapters["qv"])}, "model", "name the base model"),
        ({"lora_name": "bad name!", "lora_path": str(lora_adapters["qv"]), "model": LORA_BASE}, "lora_name", ""),
    ]
    for body, param, words in cases:
        r = post(server, "load_lora_adapter", body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
        assert words in r.json()["error"]["message"], r.text
    r = post(server, "load_lora_adapter", {"lora_name": "x", "lora_path": "y", "model": "all-minilm-l6-v2"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_supported"
    r = client.completions.create(model=LORA_ALL, prompt=PROMPTS[0], max_tokens=4, temperature=0)
    assert r.choices[0].text and "wider" not in {m.id for m in client.models.list().data}


def test_runtime_loading_is_off_unless_switched_on(lora_in_store, lora_adapters, tmp_path):
    """vLLM serves these routes only with VLLM_ALLOW_RUNTIME_LORA_UPDATING; a default bentochat.yaml refuses them."""
    config = tmp_path / "bentochat.yaml"
    config.write_text(f"models:\n  - {{id: {LORA_BASE}, model: {LORA_BASE}:latest, kind: chat, "
                      "trust_remote_code: true, dtype: float32}\n")
    with serving("service:BentoChat", tmp_path / "serve.log", env={"BENTOCHAT_CONFIG": str(config)},
                 models=(LORA_BASE,)) as srv:
        for route in ("load_lora_adapter", "unload_lora_adapter"):
            r = post(srv, route, {"lora_name": "late", "lora_path": str(lora_adapters["qv"])})
            assert r.status_code == 403 and r.json()["error"]["code"] == "runtime_lora_off", r.text
        assert listed(srv) == {LORA_BASE}


def test_lora_path_is_confined_to_the_adapter_dirs(server, lora_adapters, tmp_path):
    """Good adapters outside lora.adapter_dirs: elsewhere, behind a symlink out of them, or named with `..`."""
    outside = shutil.copytree(lora_adapters["qv"], tmp_path / "outside")
    link = lora_adapters["qv"].parent / "link-out"
    link.unlink(missing_ok=True)
    link.symlink_to(outside)
    qv = lora_adapters["qv"]
    for path in (outside, link, f"{qv.parent}/../{qv.parent.name}/{qv.name}", f"{qv}/.."):
        assert refused(server, path).startswith(NOT_LOADABLE), path


def test_one_answer_for_whatever_may_not_be_loaded(server, lora_adapters):
    """No file-system oracle (a directory, a missing one, one that cannot be read: all alike), and nothing
    of what a crafted adapter_config.json holds in the answer."""
    xss = crafted(lora_adapters, "crafted-xss", peft_type="<script>alert(1)</script> REFLECTED")
    saved = crafted(lora_adapters, "crafted-saved", modules_to_save=["SECRET-CONTENT"])
    answers = {path: refused(server, path) for path in ("/root", "/root/.ssh", "/nowhere", "/etc/passwd", xss, saved)}
    assert len(set(answers.values())) == 1 and next(iter(answers.values())).startswith(NOT_LOADABLE), answers


def test_no_lora_path_stops_the_runner(server, client):
    """Paths that made the runner's load raise (PermissionError, RuntimeError, OSError), which the gateway
    answered 503 "its runners do not answer": each is refused at once and the model keeps answering."""
    for path in ("/proc/1/root", "~nosuchuser/x", "~\udcff", "/" + "a" * 300, "a" * 70, "/dev/zero", "~", "/"):
        started = time.monotonic()
        r = post(server, "load_lora_adapter", {"lora_name": next(PROBES), "lora_path": path, "model": LORA_BASE})
        assert r.status_code == 400 and time.monotonic() - started < 10, (path, r.text)
        assert client.completions.create(model=LORA_BASE, prompt="x", max_tokens=2).choices[0].finish_reason


def test_adapter_config_size_is_checked_before_reading(server, lora_adapters):
    """A config over 1 MiB is not read: neither a valid one padded to 2 MiB nor a sparse 1.5 GB file (read
    whole, it took 1.5 GB more of the runner's memory)."""
    padded = crafted(lora_adapters, "crafted-padded")
    with open(padded / "adapter_config.json", "a") as f:
        f.write(" " * (2 << 20))
    huge = crafted(lora_adapters, "crafted-huge")
    with open(huge / "adapter_config.json", "r+b") as f:
        f.truncate(1536 << 20)
    before = sum(p.memory_info().rss for p in process_tree(server))
    for path in (padded, huge):
        assert refused(server, path).startswith(NOT_LOADABLE)
    assert sum(p.memory_info().rss for p in process_tree(server)) - before < 256 << 20


def test_pickled_weights_are_not_read_at_run_time(server, lora_adapters):
    """adapter_model.bin is a pickle: loaded at run time only as the importer's safetensors."""
    from safetensors.torch import load_file

    pickled = crafted(lora_adapters, "crafted-bin")
    torch.save(load_file(pickled / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    (pickled / "adapter_model.safetensors").unlink()
    assert refused(server, pickled).startswith(NOT_LOADABLE)


def test_metrics_count_per_adapter(server, client):
    client.completions.create(model=LORA_QV, prompt=PROMPTS[0], max_tokens=3, temperature=0)
    metrics = httpx.get(server.base_url + "/metrics", timeout=30).text
    counted = [line for line in metrics.splitlines()
               if line.startswith("bentochat_generated_tokens_total") and f'model="{LORA_QV}"' in line]
    assert counted and float(counted[0].split()[-1]) >= 3, json.dumps(counted)
