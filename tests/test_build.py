"""`bentoml build` packs the service, its configuration and every served model, offline."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

pytestmark = pytest.mark.slow


def test_bento_holds_models_and_a_complete_dockerfile(embedded_models, tmp_path):
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
    assert {"service.py", "bentochat.yaml", "models", "runners", "openai_api"} <= {p.name for p in (path / "src").iterdir()}
    assert (path / "src" / "runners" / "engine" / "llm_engine.py").is_file()

    dockerfile = (path / "env" / "docker" / "Dockerfile").read_text()
    for needed in ("FROM python:3.11", "requirements.txt", "COPY --chown=bentoml:bentoml . ./", "EXPOSE 3000", "ENTRYPOINT"):
        assert needed in dockerfile
    requirements = (path / "env" / "python" / "requirements.txt").read_text()
    assert "transformers==5.24.0" in requirements and "torch==2.13.0" in requirements

    # An exported bento (what `bentoml containerize` and a deployment receive) carries the weights.
    archive = tmp_path / "bentochat.tar"
    bento.export(str(archive), output_format="tar")
    with tarfile.open(archive) as tar:
        names = [n.removeprefix("./") for n in tar.getnames()]
    for model in models:
        assert any(n.startswith(f"models/{model}/") and n.endswith(".safetensors") for n in names), model
