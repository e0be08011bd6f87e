"""The code's shape: layers without import cycles (imports inside functions and under TYPE_CHECKING
counted), deferred project imports only where they keep torch out of the gateway, no product module
past ~400 lines; and the request walk of docs/architecture.md, which lists exactly the files that run
for one streamed chat request, traced in a real `bentoml serve`."""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from conftest import CHAT, ROOT, process_tree, start_serving, stop, wait_ready

PRODUCT_DIRS = ("models", "openai_api", "runners", "ui")
MAX_LINES = 420


def product_modules() -> dict[str, Path]:
    """Module name -> file, for the product's Python (not tests, benchmarks or the venv)."""
    files = [p for p in ROOT.glob("*.py")] + [p for d in PRODUCT_DIRS for p in (ROOT / d).rglob("*.py")]
    modules = {}
    for path in files:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def project_imports(name: str, path: Path, modules: dict) -> list[tuple[str, int, bool]]:
    """(imported project module, line, deferred) for every import in ``path``: deferred when inside a
    function or class, or under ``if TYPE_CHECKING``."""
    found = []

    def target(dotted: str) -> str | None:
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    def visit(node, deferred: bool):
        for child in ast.iter_child_nodes(node):
            inner = deferred or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or (
                isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test))
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and not child.level:
                names = [f"{child.module}.{alias.name}" for alias in child.names]
            else:
                names = []
            for dotted in names:
                module = target(dotted)
                if module and module != name:
                    found.append((module, child.lineno, inner))
            visit(child, inner)

    visit(ast.parse(path.read_text()), False)
    return found


def test_no_import_cycles_counting_deferred_imports():
    modules = product_modules()
    graph = {name: {m for m, _, _ in project_imports(name, path, modules)} for name, path in modules.items()}

    def reaches(start: str, goal: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            node, route = stack.pop()
            for nxt in graph[node]:
                if nxt == goal:
                    return route + [nxt]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, route + [nxt]))
        return None

    cycles = [" -> ".join(route) for name in graph if (route := reaches(name, name))]
    assert cycles == []


def test_deferred_project_imports_only_keep_torch_out_of_the_gateway():
    """The runner services are declared in the gateway's process too (service.py composes them): their
    engine is imported where they run; and the importer (imported by the gateway for the embedded models)
    takes the engine's quantization and loading rules only while it converts weights. Every such import
    says so in a comment."""
    modules = product_modules()
    for name, path in modules.items():
        lines = path.read_text().splitlines()
        for module, line, deferred in project_imports(name, path, modules):
            if deferred:
                assert (name.startswith("runners.") or name == "models.importer") and \
                    module.startswith(("runners.engine", "runners.vllm_engine")), (name, module)
                block = [lines[line - 1]]  # the import's own line, and the imports and comments above it
                for text in reversed(lines[:line - 1]):
                    if not text.strip().startswith(("#", "from ", "import ")):
                        break
                    block.append(text)
                assert any("# torch" in text for text in block), f"{path.name}:{line} needs its reason"


def test_no_product_module_is_past_about_400_lines():
    sizes = {name: len(path.read_text().splitlines()) for name, path in product_modules().items()}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def documented_walk() -> list[str]:
    """The files docs/architecture.md's request walk lists, in its order."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## One streamed chat request, file by file", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\d+\. `([^`]+)`", section, flags=re.M)


@pytest.mark.slow
def test_the_request_walk_lists_exactly_the_files_one_streamed_chat_request_runs(tmp_path, embedded_models):
    """Every process of the server (gateway and runner, every thread) records the project files whose
    code runs while one streamed chat completion is answered (tests/request_walk/sitecustomize.py)."""
    from runners.engine import native

    if native.ops() is None:
        pytest.skip("the documented walk is that of a CPU where BentoChat's native kernels run")
    walk = documented_walk()
    assert len(walk) == len(set(walk)) and all((ROOT / f).is_file() for f in walk)
    config = tmp_path / "bentochat.yaml"
    config.write_text(f"models:\n  - {{id: {CHAT}, model: {CHAT}:latest, kind: chat}}\n")
    traces = tmp_path / "traces"
    traces.mkdir()
    env = {"BENTOCHAT_CONFIG": str(config), "BENTOCHAT_TRACE_DIR": str(traces), "BENTOCHAT_TRACE_ROOT": str(ROOT),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "request_walk"), os.environ.get("PYTHONPATH", "")])}
    srv = start_serving("service:BentoChat", tmp_path / "serve.log", env=env)
    try:
        wait_ready(srv, (CHAT,))
        import openai

        client = openai.OpenAI(base_url=srv.v1, api_key="unused", max_retries=0, timeout=120)

        def one_request() -> int:
            stream = client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "Tell me a story"}],
                                                    stream=True, max_tokens=16, temperature=0)
            return sum(1 for _ in stream)

        assert one_request() > 2  # warm: what the first request does once is not the walk
        processes = process_tree(srv)
        for process in processes:
            process.send_signal(signal.SIGUSR1)
        time.sleep(0.5)
        assert one_request() > 2
        for process in processes:
            process.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + 30
        while len(list(traces.glob("*.json"))) < len(processes) and time.monotonic() < deadline:
            time.sleep(0.2)
        ran = set()
        for dump in traces.glob("*.json"):
            ran |= set(json.loads(dump.read_text()))
    finally:
        stop(srv)
    assert sorted(ran) == sorted(walk), f"files that ran: {sorted(ran)}"
