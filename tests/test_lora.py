"""LoRA adapters in the engine, in-process: rows for the base model and for two adapters mixed in one
batch each decode as PEFT's ``PeftModel`` does alone with that adapter, on transformers' forward and on
the lean one (and the same alone and together in bfloat16); one slot shared by turns (LRU, first come
first served); the prefix cache kept apart per adapter; unloading while a request runs; adapters and
configurations that do not fit refused with a reason."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from runners.engine import LLMEngine, ModelRunner, RequestError, SamplingParams, Sequence
from runners.engine.errors import AdapterError
from runners.engine.linear import cpu_bf16
from runners.engine.loader import load_causal_lm

PROMPTS = [[1, 7], [1, 20, 30, 40, 50], [1] + list(range(100, 131))]
N = 16
GREEDY = SamplingParams(max_tokens=N, temperature=0)


@pytest.fixture(scope="module")
def adapters(lora_adapters):
    return lora_adapters


@pytest.fixture(scope="module")
def expected(tiny_llama_dir, adapters):
    """(prompt index, adapter or None) -> PeftModel's greedy answer alone."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    answers = {}
    for name in (None, *adapters):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="eager").eval()
        if name is not None:
            model = PeftModel.from_pretrained(model, adapters[name]).eval()
        for i, prompt in enumerate(PROMPTS):
            out = model.generate(torch.tensor([prompt]), max_new_tokens=N, min_new_tokens=N, do_sample=False,
                                 repetition_penalty=1.0)
            answers[i, name] = out[0, len(prompt):].tolist()
    assert len({tuple(answers[0, name]) for name in (None, *adapters)}) == 3  # the adapters change the answers
    return answers


def engine_with(tiny_llama_dir, adapters, forward: str, max_loras: int = 4, **kwargs) -> LLMEngine:
    runner = ModelRunner(load_causal_lm(str(tiny_llama_dir), dtype="float32", forward=forward), max_loras=max_loras)
    engine = LLMEngine(runner, max_num_seqs=16, max_model_len=256, **kwargs)
    for name, path in adapters.items():
        engine.add_adapter(runner.adapters.read(name, path))
    return engine


def mixed(adapters) -> list[tuple[int, str | None]]:
    return [(i, name) for i in range(len(PROMPTS)) for name in (None, *adapters)]


@pytest.mark.parametrize("forward", ["transformers", "lean"])
def test_mixed_batch_matches_peft_alone(tiny_llama_dir, adapters, expected, forward):
    """Nine requests at once (three prompts, each on the base and on both adapters): one forward pass
    per step, each row with its own adapter, each answer PEFT's alone."""
    engine = engine_with(tiny_llama_dir, adapters, forward)
    rows = mixed(adapters)
    got = engine.generate_batch([PROMPTS[i] for i, _ in rows], [GREEDY] * len(rows), [a for _, a in rows])
    assert got == [expected[row] for row in rows]
    stats = engine.stats()["adapters"]
    assert stats["all"]["tokens_generated"] == stats["qv"]["tokens_generated"] == N * len(PROMPTS)
    assert stats["all"]["resident"] and stats["all"]["rank"] == 8 and stats["qv"]["modules"] == 4


def test_an_adapter_of_the_logits_layer_too(tiny_llama_dir, tmp_path):
    """An adapter that changes lm_head as well: its rows' logits (only a prompt's last row's, at prefill)
    get its deltas, base rows beside them none; each answer PEFT's alone."""
    from peft import PeftModel
    from tiny_model import build_tiny_adapter
    from transformers import AutoModelForCausalLM

    from safetensors.torch import load_file, save_file

    path = build_tiny_adapter(tiny_llama_dir, tmp_path / "head", seed=3, rank=4, targets=("q_proj", "lm_head"))
    weights = load_file(path / "adapter_model.safetensors")  # PEFT saves the tied lm_head's own weight too
    save_file({k: v for k, v in weights.items() if "base_layer" not in k}, path / "adapter_model.safetensors")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="eager").eval()
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, attn_implementation="eager"),
                                     path).eval()
    engine = engine_with(tiny_llama_dir, {"head": path}, "lean")
    rows = [(i, name) for i in range(len(PROMPTS)) for name in (None, "head")]
    got = engine.generate_batch([PROMPTS[i] for i, _ in rows], [GREEDY] * len(rows), [a for _, a in rows])
    for (i, name), answer in zip(rows, got):
        model = peft if name else base
        out = model.generate(torch.tensor([PROMPTS[i]]), max_new_tokens=N, min_new_tokens=N, do_sample=False,
                             repetition_penalty=1.0)
        assert answer == out[0, len(PROMPTS[i]):].tolist(), (i, name)
    assert got[0] != got[1]  # the adapter changed the answer


def test_one_slot_is_shared_least_recently_used_first(tiny_llama_dir, adapters, expected):
    """With max_loras 1, requests for two adapters take turns in the slot; every answer stays right."""
    engine = engine_with(tiny_llama_dir, adapters, "lean", max_loras=1)
    rows = mixed(adapters)
    got = engine.generate_batch([PROMPTS[i] for i, _ in rows], [GREEDY] * len(rows), [a for _, a in rows])
    assert got == [expected[row] for row in rows]
    assert engine.adapters.evictions >= 1 and len(engine.adapters.resident) == 1
    assert engine.generate(PROMPTS[0], GREEDY, "all") == expected[0, "all"]  # read again from its files


def test_a_request_waiting_for_a_slot_is_not_overtaken(tiny_llama_dir, adapters):
    """max_loras 1, "all" in use: a request for "qv" waits for the slot, and a later one for "all" waits
    behind it rather than keep "all" busy for ever."""
    engine = engine_with(tiny_llama_dir, adapters, "lean", max_loras=1)
    first = Sequence("first", PROMPTS[0], GREEDY, adapter_name="all")
    other = Sequence("other", PROMPTS[0], GREEDY, adapter_name="qv")
    later = Sequence("later", PROMPTS[0], GREEDY, adapter_name="all")
    started: dict[str, int] = {}
    engine.add(first)
    engine.step()
    for seq in (other, later):
        engine.add(seq)
    step = 1
    while any(s.finish_reason is None for s in (first, other, later)):
        engine.step()
        step += 1
        for seq in (first, other, later):
            if seq.output_ids:
                started.setdefault(seq.request_id, step)
    assert started["other"] < started["later"]


def test_prefix_cache_is_kept_per_adapter(tiny_llama_dir, adapters, expected):
    engine = engine_with(tiny_llama_dir, adapters, "lean", prefix_cache_tokens=1024)
    long = len(PROMPTS) - 1
    assert engine.generate(PROMPTS[long], GREEDY) == expected[long, None]
    assert engine.generate(PROMPTS[long], GREEDY, "all") == expected[long, "all"]  # not the base's keys
    assert engine.generate(PROMPTS[long], GREEDY, "all") == expected[long, "all"]
    assert engine.scheduler.prefix_cache.hits > 0


def test_unload_lets_running_requests_finish(tiny_llama_dir, adapters, expected):
    engine = engine_with(tiny_llama_dir, adapters, "lean")
    seq = Sequence("running", PROMPTS[1], GREEDY, adapter_name="all")
    engine.add(seq)
    engine.step()
    engine.remove_adapter("all")
    with pytest.raises(RequestError, match="no adapter named 'all'"):
        engine.add(Sequence("late", PROMPTS[1], GREEDY, adapter_name="all"))
    while seq.finish_reason is None:
        engine.step()
    assert seq.output_ids == expected[1, "all"]
    engine.step()  # nothing runs: the unloaded adapter's slot is freed
    assert [a.name for a in engine.adapters.resident] == []
    assert "all" not in engine.stats()["adapters"]


def test_adapters_that_do_not_fit_are_refused(tiny_llama_dir, adapters, tmp_path):
    from safetensors.torch import load_file, save_file

    def edited(name: str, edit) -> object:
        copy = shutil.copytree(adapters["qv"], tmp_path / name)
        state = load_file(copy / "adapter_model.safetensors")
        save_file(dict(edit(k, v) for k, v in state.items()), copy / "adapter_model.safetensors")
        return copy

    runner = ModelRunner(load_causal_lm(str(tiny_llama_dir), dtype="float32", forward="lean"))
    # Trained on a model with a hidden size of 48, not 32.
    wider = edited("wider", lambda k, v: (k, torch.zeros(v.shape[0], 48) if "lora_A" in k else v))
    with pytest.raises(AdapterError, match="32x48 in the adapter but 32x32 in this model"):
        runner.adapters.read("wider", wider)
    with pytest.raises(AdapterError, match="not a directory"):
        runner.adapters.read("missing", tmp_path / "nowhere")
    broken = shutil.copytree(adapters["qv"], tmp_path / "no-weights")
    (broken / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="holds no adapter weights"):
        runner.adapters.read("no-weights", broken)
    dora = shutil.copytree(adapters["qv"], tmp_path / "dora")
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(AdapterError, match="DoRA"):
        runner.adapters.read("dora", dora)
    # An adapter of the Baichuan-like model names its fused W_pack layer, which a Llama does not have.
    baichuan = edited("baichuan", lambda k, v: (k.replace("q_proj", "W_pack"), v))
    with pytest.raises(AdapterError, match="W_pack, a linear layer this model does not have"):
        runner.adapters.read("baichuan", baichuan)


@pytest.mark.parametrize("models, words", [
    ("[{id: m, model: m, adapters: [m]}]", "repeated: m"),
    ("[{id: m, model: m, adapters: [a]}, {id: n, model: n, adapters: [./x/a]}]", "repeated: a"),
    ("[{id: e, model: e, kind: embedding, adapters: [a]}]", "adapters are served on a chat model"),
    ("[{id: r, urls: ['http://h:3000'], adapters: [a]}]", "lists its own"),
    ("[{id: m, model: m, adapters: [{source: a, name: 'x y'}]}]", "may hold only"),
    ("[{id: m, model: m, max_loras: 0}]", "max_loras"),
])
def test_adapter_configuration_errors(tmp_path, models, words):
    from models.config import ConfigError, load_config

    config = tmp_path / "bentochat.yaml"
    config.write_text(f"models: {models}\n")
    with pytest.raises(ConfigError, match=re.escape(words)):
        load_config(config)


def test_adapter_entries_name_themselves():
    from models.config import ServedModel

    served = ServedModel(id="m", model="m", adapters=["support-bot", "./adapters/sql/", {"source": "t:v2", "name": "n"}])
    assert [(a.name, a.tag) for a in served.adapters] == [("support-bot", "support-bot:latest"), ("sql", None),
                                                          ("n", "t:v2")]


def test_missing_configured_adapters_stop_the_start(adapters, tmp_path):
    """What `bentoml serve` checks before starting anything (models.embedded.ensure_available)."""
    from models.config import AdapterEntry
    from models.embedded import check_adapter_source

    check_adapter_source("m", AdapterEntry(source=str(adapters["qv"])))
    no_weights = shutil.copytree(adapters["qv"], tmp_path / "no-weights")
    (no_weights / "adapter_model.safetensors").unlink()
    with pytest.raises(RuntimeError, match="adapter 'no-weights' of model 'm': .* holds no adapter weights"):
        check_adapter_source("m", AdapterEntry(source=str(no_weights)))
    with pytest.raises(RuntimeError, match="not in the BentoML model store; import its PEFT directory"):
        check_adapter_source("m", AdapterEntry(source="never-imported"))


@pytest.mark.skipif(not cpu_bf16(), reason="this CPU has no bfloat16 instructions for oneDNN")
def test_bfloat16_rows_on_adapters_do_not_depend_on_the_batch(tiny_llama_dir, adapters):
    """The served default on such CPUs: in bfloat16 each (prompt, adapter) decodes the same alone and
    in the mixed batch."""
    runner = ModelRunner(load_causal_lm(str(tiny_llama_dir), dtype="bfloat16", forward="lean"))
    engine = LLMEngine(runner, max_num_seqs=16, max_model_len=256)
    for name, path in adapters.items():
        engine.add_adapter(runner.adapters.read(name, path))
    rows = mixed(adapters)
    alone = [engine.generate(PROMPTS[i], GREEDY, a) for i, a in rows]
    assert engine.generate_batch([PROMPTS[i] for i, _ in rows], [GREEDY] * len(rows), [a for _, a in rows]) == alone
    assert alone[1] != alone[0]  # the adapter changed the answer


def test_pickled_weights_are_read_at_start_only(tiny_llama_dir, adapters, tmp_path):
    """adapter_model.bin (a pickle): read with weights_only=True for an adapter of bentochat.yaml, refused at run time."""
    from safetensors.torch import load_file

    runner = ModelRunner(load_causal_lm(str(tiny_llama_dir), dtype="float32", forward="lean"))
    pickled = shutil.copytree(adapters["qv"], tmp_path / "pickled")
    torch.save(load_file(pickled / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    (pickled / "adapter_model.safetensors").unlink()
    assert runner.adapters.read("pickled", pickled).weights.name == "adapter_model.bin"
    with pytest.raises(AdapterError, match="is a pickle"):
        runner.adapters.read("pickled", pickled, pickles=False)


def test_adapter_dirs_confine_paths(adapters, tmp_path):
    """An absolute path without `..`, inside a root as written and once its symlinks are resolved."""
    from runners.engine.adapter_files import inside

    root = adapters["qv"].parent
    assert inside(str(adapters["qv"]), [str(root)]) == adapters["qv"].resolve()
    (tmp_path / "out").symlink_to(adapters["qv"])
    for path in ("/etc", f"{root}/../{root.name}/qv", "qv", "~/qv", f"{root}/nowhere", f"{root}/qv\0", "/"):
        assert inside(path, [str(root)]) is None, path
    assert inside(str(tmp_path / "out"), [str(tmp_path)]) is None
