"""Shared fixtures. Every test session gets a BentoML model store of its own (never the user's),
and the end-to-end tests share one `bentoml serve` started on a free port."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"
os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="bentochat-test-store-")
os.environ["HF_HUB_OFFLINE"] = "1"  # like the machines BentoChat runs on: no model hub
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from tiny_model import build_tiny_adapter, build_tiny_model  # noqa: E402

CHAT = "smollm2-135m-instruct"
EMBED = "all-minilm-l6-v2"
TINY = "tiny-remote"
TINY_LONG = "tiny-remote-long"  # the same with a context of 1024: room for tool descriptions
ONE_SLOT = "smollm2-one-slot"  # the chat model again, with room for one running and one waiting request
LORA_BASE = "tiny-llama"  # transformers' Llama (tiny), served with two LoRA adapters
LORA_ONE_SLOT = "tiny-llama-one-slot"  # the same with the same adapters, one resident at a time
LORA_ALL = "tiny-lora-all"  # an adapter of every linear layer, imported into the store by the CLI
LORA_QV = "qv"  # an adapter of q_proj and v_proj, served from its directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Baichuan-like: custom tokenizer and modeling code (legacy tuple KV cache), needs trust_remote_code."""
    return build_tiny_model(tmp_path_factory.mktemp("hf") / "tiny-baichuan-like")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """The same tokenizer with transformers' own Llama, which ``model.generate`` can run."""
    return build_tiny_model(tmp_path_factory.mktemp("hf") / "tiny-llama", remote_code=False)


@pytest.fixture(scope="session")
def lora_adapters(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    """Two PEFT adapters of the tiny Llama: every linear layer at rank 8 ("all"); q and v at rank 4 ("qv")."""
    root = tmp_path_factory.mktemp("adapters")
    return {"all": build_tiny_adapter(tiny_llama_dir, root / "all", seed=1),
            "qv": build_tiny_adapter(tiny_llama_dir, root / LORA_QV, seed=2, rank=4, targets=("q_proj", "v_proj"))}


@pytest.fixture(scope="session")
def lora_in_store(tiny_llama_dir, lora_adapters) -> str:
    """The tiny Llama and its "all" adapter imported through the CLI; the adapter's store name."""
    subprocess.run([sys.executable, "-m", "models", "import", str(tiny_llama_dir), "--name", LORA_BASE,
                    "--trust-remote-code"], cwd=ROOT, check=True)
    subprocess.run([sys.executable, "-m", "models", "import", str(lora_adapters["all"]), "--name", LORA_ALL,
                    "--base", LORA_BASE], cwd=ROOT, check=True)
    return LORA_ALL


@pytest.fixture(scope="session")
def sentencepiece(tiny_model_dir):
    """The tiny models' sentencepiece model itself, to build prompt ids by hand."""
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(tiny_model_dir / "tokenizer.model"))


@pytest.fixture(scope="session")
def embedded_models():
    """The embedded defaults imported into this session's store (as the first `bentoml serve` does)."""
    from models.config import load_config
    from models.embedded import ensure_available

    ensure_available(load_config(ROOT / "bentochat.yaml"))


_ports_given: set[int] = set()


def _free_port() -> int:
    """A free loopback port below the kernel's ephemeral range. A port from ``bind(0)`` would be free
    only until the next one asks: the `bentoml serve` started on it asks the kernel for ports of its own
    (circus's control socket) before it binds its HTTP port, and can be handed the same one."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    while True:
        port = random.randrange(10000, low) if low > 11000 else 0
        if port in _ports_given:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            port = s.getsockname()[1]
        _ports_given.add(port)
        return port


@dataclass
class Server:
    base_url: str
    log: Path
    process: subprocess.Popen
    ui_log_dir: Path | None = None  # the chat page's conversation log (ui.log_dir), when configured
    log_start: int = 0  # where this server's lines begin in ``log`` (appended to across runs)

    def log_text(self) -> str:
        """What this server wrote to its log."""
        return self.log.read_bytes()[self.log_start:].decode(errors="replace")

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"


def listed(srv: Server, headers: dict | None = None) -> set[str]:
    import httpx

    return {m["id"] for m in httpx.get(srv.v1 + "/models", headers=headers, timeout=5).json()["data"]}


def own_home() -> str:
    """A BENTOML_HOME for one server that shares this session's model store. Every `bentoml serve`
    empties its home's Prometheus directory at start, so servers sharing a home would wipe each
    other's /metrics."""
    home = Path(tempfile.mkdtemp(prefix="bentochat-test-home-"))
    store = Path(os.environ["BENTOML_HOME"]) / "models"
    store.mkdir(parents=True, exist_ok=True)
    (home / "models").symlink_to(store)
    return str(home)


def start_serving(target: str, log: Path, *, env: dict | None = None, cwd: Path = ROOT,
                  port: int | None = None, command: list[str] | None = None) -> Server:
    """`bentoml serve TARGET` (or ``command``) on a free loopback port (or ``port``), in a process group
    of its own, with a BentoML home of its own unless ``env`` names one."""
    port = port or _free_port()
    command = command or [str(Path(sys.executable).parent / "bentoml"), "serve", target]
    env = {"BENTOML_HOME": own_home(), **(env or {})}
    log.parent.mkdir(parents=True, exist_ok=True)
    start = log.stat().st_size if log.exists() else 0
    with open(log, "ab") as out:
        proc = subprocess.Popen([*command, "--host", "127.0.0.1", "--port", str(port)],
                                cwd=cwd, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return Server(f"http://127.0.0.1:{port}", log, proc, log_start=start)


def wait_ready(srv: Server, models: tuple[str, ...] = (), timeout: float = 600, headers: dict | None = None) -> None:
    """Until /readyz answers 200 and /v1/models lists ``models``."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if srv.process.poll() is not None:
            pytest.fail(f"bentoml serve exited with {srv.process.returncode}:\n{srv.log.read_text()[-5000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"bentoml serve not ready in time:\n{srv.log.read_text()[-5000:]}")
        try:
            if httpx.get(srv.base_url + "/readyz", timeout=2).status_code == 200 and (
                    not models or set(models) <= listed(srv, headers)):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)


def process_tree(srv: Server) -> list:
    """The `bentoml serve` process and its workers (which run in sessions of their own)."""
    import psutil

    try:
        root = psutil.Process(srv.process.pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def signal_tree(srv: Server, sig: int) -> None:
    import psutil

    for proc in process_tree(srv):
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(sig)


def stop(srv: Server, sig: int = signal.SIGTERM) -> None:
    """SIGTERM: a graceful shutdown. SIGKILL: a crash, of the workers too (killing the process group
    would leave them serving)."""
    import psutil

    tree = process_tree(srv)
    signal_tree(srv, signal.SIGCONT)  # a stopped one could not shut down
    if sig == signal.SIGKILL:
        signal_tree(srv, sig)
    elif tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            tree[0].send_signal(sig)
    try:
        srv.process.wait(30)
    except subprocess.TimeoutExpired:
        for proc in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        srv.process.wait(30)
    psutil.wait_procs(tree, timeout=30)


@contextlib.contextmanager
def serving(target: str, log: Path, *, env: dict | None = None, cwd: Path = ROOT, models: tuple[str, ...] = ()):
    srv = start_serving(target, log, env=env, cwd=cwd)
    try:
        wait_ready(srv, models)
        yield srv
    finally:
        stop(srv)


@pytest.fixture(scope="session")
def tiny_in_store(tiny_model_dir) -> str:
    """The tiny remote-code model imported through the CLI with --trust-remote-code; its store name."""
    subprocess.run([sys.executable, "-m", "models", "import", str(tiny_model_dir), "--name", TINY,
                    "--trust-remote-code"], cwd=ROOT, check=True)
    return TINY


@pytest.fixture(scope="session")
def tiny_long_in_store(tmp_path_factory) -> str:
    path = build_tiny_model(tmp_path_factory.mktemp("hf") / "tiny-baichuan-like-long", context=1024)
    subprocess.run([sys.executable, "-m", "models", "import", str(path), "--name", TINY_LONG, "--trust-remote-code"],
                   cwd=ROOT, check=True)
    return TINY_LONG


@pytest.fixture(scope="session")
def server(tmp_path_factory, tiny_in_store, tiny_long_in_store, lora_in_store, lora_adapters) -> Server:
    """`bentoml serve` with the two embedded models, tiny remote-code models imported by the CLI, and a
    tiny Llama with two LoRA adapters (twice: with room for both, and for one at a time); adapters in
    the directory of ``lora_adapters`` may be loaded at run time."""
    qv = lora_adapters["qv"]
    ui_log_dir = tmp_path_factory.mktemp("ui-log")
    config = tmp_path_factory.mktemp("config") / "bentochat.yaml"
    config.write_text(f"""models:
  - {{id: {CHAT}, model: {CHAT}:latest, kind: chat}}
  - {{id: {EMBED}, model: {EMBED}:latest, kind: embedding}}
  - {{id: {TINY}, model: {TINY}:latest, kind: chat, trust_remote_code: true, max_concurrency: 4, max_tokens_default: 5}}
  - {{id: {ONE_SLOT}, model: {CHAT}:latest, kind: chat, max_concurrency: 1, max_queue: 1}}
  - {{id: {TINY_LONG}, model: {TINY_LONG}:latest, kind: chat, trust_remote_code: true, max_concurrency: 4}}
  - {{id: {LORA_BASE}, model: {LORA_BASE}:latest, kind: chat, trust_remote_code: true, dtype: float32,
      adapters: [{lora_in_store}, {qv}]}}
  - {{id: {LORA_ONE_SLOT}, model: {LORA_BASE}:latest, kind: chat, trust_remote_code: true, dtype: float32,
      max_loras: 1, adapters: [{{source: {lora_in_store}, name: one-slot-all}}, {{source: {qv}, name: one-slot-qv}}]}}
ui: {{model_list_mode: reload, log_dir: {ui_log_dir}}}
responses: {{store_size: 4}}
lora: {{runtime_loading: true, adapter_dirs: [{qv.parent}]}}
""")
    ARTIFACTS.mkdir(exist_ok=True)
    with serving("service:BentoChat", ARTIFACTS / "serve.log", env={"BENTOCHAT_CONFIG": str(config)},
                 models=(CHAT, EMBED, TINY, ONE_SLOT, TINY_LONG, LORA_BASE, LORA_ONE_SLOT)) as srv:
        srv.ui_log_dir = ui_log_dir
        yield srv


@pytest.fixture(scope="session")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def chat_tokenizer(server):
    import bentoml
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bentoml.models.get(f"{CHAT}:latest").path)


def pytest_sessionfinish(session, exitstatus):
    """The session's model store goes with it (up to 1.6 GB: the embedded models, the tiny ones, imports)."""
    shutil.rmtree(os.environ["BENTOML_HOME"], ignore_errors=True)
