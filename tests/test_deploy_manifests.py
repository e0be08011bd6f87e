"""The deployment manifests in deploy/ are parsed and checked against each other and against the
services a bento built from bentochat.yaml holds: names that do not line up fail here, not at deploy."""

from __future__ import annotations

import os
import shutil
import subprocess
from urllib.parse import urlparse

import pytest
import yaml

from conftest import CHAT, EMBED, ROOT
from models.config import load_config
from models.kubernetes import GATEWAY_FIELDS, IN_FLIGHT, SECRET, manifests

DEPLOY = ROOT / "deploy"
CONFIG = load_config(ROOT / "bentochat.yaml")
RUNNERS = {m.runner_name: m for m in CONFIG.models}  # the runner services of a bento built from it


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yaml").read_text())


def served_by(service: dict) -> str:
    command = service["command"]
    return command[command.index("--service-name") + 1]


def test_compose_runners_are_services_of_the_bento_and_the_gateway_names_them():
    services = compose()["services"]
    gateway = services.pop("gateway")
    assert all(served_by(s) in RUNNERS for s in services.values())
    assert all(s["command"][0] == "start-http-server" for s in services.values())  # the image's entrypoint verb

    mount = next(v.split(":")[1] for v in gateway["volumes"] if v.startswith("./gateway.yaml:"))
    assert f"BENTOCHAT_CONFIG={mount}" in gateway["environment"]
    assert set(gateway["depends_on"]) == set(services)

    config = load_config(DEPLOY / "gateway.yaml")
    assert all(m.remote for m in config.models)
    urls = {url for m in config.models for url in m.urls}
    assert {urlparse(u).hostname for u in urls} == set(services)  # every runner container is named, no other
    for model in config.models:
        for url in model.urls:
            runner = RUNNERS[served_by(services[urlparse(url).hostname])]
            assert (runner.id, runner.kind) == (model.id, model.kind), url
            assert urlparse(url).port == int(services[urlparse(url).hostname]["command"][-1])
    for model in config.models:  # what the gateway applies itself: as the bento's bentochat.yaml says
        runner = next(r for r in RUNNERS.values() if r.id == model.id)
        assert model.model_dump(include=set(GATEWAY_FIELDS)) == runner.model_dump(include=set(GATEWAY_FIELDS))


def test_compose_file_is_read_alike_by_compose_v1_v2_and_podman_compose():
    """No top-level `name:` (docker-compose 1.29 refuses the file), and the API keys passed through by name
    (podman-compose 1.0.3 left `${BENTOCHAT_API_KEYS:-}` as it is: every call got 401)."""
    assert set(compose()) == {"services"}
    gateway = compose()["services"]["gateway"]
    assert "BENTOCHAT_API_KEYS" in gateway["environment"] and not any("${" in e for e in gateway["environment"])


@pytest.mark.skipif(not shutil.which("docker-compose"), reason="Debian's docker-compose (1.29) is not installed")
def test_docker_compose_v1_reads_the_file_and_passes_the_keys():
    out = subprocess.run(["docker-compose", "-f", "docker-compose.yaml", "config"], cwd=DEPLOY, check=True,
                         capture_output=True, text=True, env={**os.environ, "BENTOCHAT_API_KEYS": "sk-1,sk-2"}).stdout
    assert yaml.safe_load(out)["services"]["gateway"]["environment"]["BENTOCHAT_API_KEYS"] == "sk-1,sk-2"


@pytest.mark.skipif(not shutil.which("podman-compose"), reason="podman-compose is not installed")
def test_podman_compose_passes_the_keys_to_the_gateway_container():
    # podman-compose 1.0.3 creates the project's network even with --dry-run: a project of the test's own,
    # its network removed.
    project = f"bentochat-dry-run-{os.getpid()}"
    try:
        out = subprocess.run(["podman-compose", "--dry-run", "-p", project, "-f", "docker-compose.yaml", "up", "-d"],
                             cwd=DEPLOY, check=True, capture_output=True, text=True, timeout=60,
                             env={**os.environ, "BENTOCHAT_API_KEYS": "sk-1,sk-2"}).stdout
    finally:
        subprocess.run(["podman", "network", "rm", "-f", f"{project}_default"], capture_output=True)
    gateway = next(line for line in out.splitlines() if "BENTOCHAT_CONFIG" in line)
    assert "${" not in gateway  # `-e BENTOCHAT_API_KEYS`: podman takes the value from the environment
    assert "-e BENTOCHAT_API_KEYS " in gateway or "-e BENTOCHAT_API_KEYS=sk-1,sk-2 " in gateway, gateway


def test_bentocloud_config_is_a_valid_deployment_config_for_the_bento_services():
    from bentoml._internal.cloud.schemas.schemasv2 import CreateDeploymentSchema
    from bentoml._internal.utils.cattr import bentoml_cattr

    raw = yaml.safe_load((DEPLOY / "bentocloud.yaml").read_text())
    parsed = bentoml_cattr.structure({**raw, "bento": "bentochat:latest"}, CreateDeploymentSchema)
    assert set(parsed.services) == {"bentochat", *RUNNERS}
    for name, service in parsed.services.items():
        assert service.instance_type and service.scaling.min_replicas >= 1, name
        assert "traffic" not in (service.config_overrides or {}), name  # the bento's own, below
    # The gateway's budgets, ledger and Responses store are its process's: one replica, or each has its own.
    assert parsed.services["bentochat"].scaling.max_replicas == 1
    # Closed by default: BentoCloud's tokens in front, the gateway's keys from a secret, none in the file.
    assert parsed.access_authorization is True and parsed.secrets
    assert "BENTOCHAT_API_KEYS" not in (DEPLOY / "bentocloud.yaml").read_text().split("secrets:")[0]


def test_each_runner_service_is_scaled_on_its_batch_by_bentocloud():
    """BentoCloud scales a service on ``traffic.concurrency``, requests in flight per replica (else on CPU use,
    which says nothing of an LLM's queue): each runner's is its model's ``max_concurrency``."""
    from runners.base import service_options

    for runner in RUNNERS.values():
        assert service_options(runner, runner.kind)["traffic"]["concurrency"] == runner.max_concurrency


KUBERNETES = DEPLOY / "kubernetes" / "bentochat.yaml"


def kube_objects(text: str) -> dict[tuple[str, str], dict]:
    return {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(text)}


def test_kubernetes_manifests_are_generated_from_bentochat_yaml():
    assert KUBERNETES.read_text() == manifests(ROOT / "bentochat.yaml"), \
        "regenerate: python -m models kubernetes > deploy/kubernetes/bentochat.yaml"


def test_kubernetes_manifests_are_valid_objects_for_kubernetes():
    """Against Kubernetes' own OpenAPI schemas (strict: no unknown fields), offline, as
    `kubectl apply --dry-run=client` would need a cluster to do."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="make install installs the test extra")
    for obj in yaml.safe_load_all(KUBERNETES.read_text()):
        kubernetes_validate.validate(obj, "1.30.0", strict=True)
    with pytest.raises(kubernetes_validate.ValidationError):  # the check can fail
        kubernetes_validate.validate({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "x"},
                                      "spec": {"replicas": "two"}}, "1.30.0", strict=True)


def test_kubernetes_gateway_names_every_runner_pod_and_each_runner_is_placed_as_configured(tmp_path, monkeypatch):
    config = tmp_path / "bentochat.yaml"  # the repository's, with the chat model on a GPU and 4 CPU threads
    raw = yaml.safe_load((ROOT / "bentochat.yaml").read_text())
    raw["models"][0].update(gpus=[0], cpu_threads=4, kv_cache_memory="2GiB")
    config.write_text(yaml.safe_dump(raw))
    objects = kube_objects(manifests(config, image="registry.example/bentochat:1", max_replicas=3))

    gateway = objects["Deployment", "bentochat"]["spec"]["template"]["spec"]["containers"][0]
    digest = objects["Deployment", "bentochat"]["spec"]["template"]["metadata"]["annotations"]
    assert digest != kube_objects(manifests(ROOT / "bentochat.yaml"))["Deployment", "bentochat"]["spec"]["template"][
        "metadata"]["annotations"]  # another configuration: another pod template, so the gateway restarts with it
    assert gateway["image"] == "registry.example/bentochat:1" and "args" not in gateway  # the bento's own command
    env = {e["name"]: e for e in gateway["env"]}
    assert env["BENTOCHAT_API_KEYS"]["valueFrom"]["secretKeyRef"] == {"name": SECRET, "key": "keys"}
    assert (gateway["readinessProbe"]["httpGet"]["path"], gateway["livenessProbe"]["httpGet"]["path"]) == \
        ("/readyz", "/livez")
    gateway_yaml = tmp_path / "gateway.yaml"
    gateway_yaml.write_text(objects["ConfigMap", "bentochat-gateway"]["data"]["gateway.yaml"])
    monkeypatch.delenv("BENTOCHAT_API_KEYS", raising=False)
    served = load_config(gateway_yaml)
    assert served.gateway.api_keys == [] and served.gateway.health == CONFIG.gateway.health
    assert {m.id for m in served.models} == {m.id for m in CONFIG.models}
    for model in served.models:
        runner = RUNNERS[next(r for r in RUNNERS if RUNNERS[r].id == model.id)]
        assert model.remote and (model.kind, model.defaults, model.max_tokens_default) == \
            (runner.kind, runner.defaults, runner.max_tokens_default)  # what the gateway applies itself
        assert [urlparse(u).hostname for u in model.urls] == \
            [f"{runner.runner_name}-{i}.{runner.runner_name}" for i in range(3)]  # pod N of the StatefulSet
        assert objects["Service", runner.runner_name]["spec"]["clusterIP"] == "None"
        statefulset = objects["StatefulSet", runner.runner_name]["spec"]
        assert statefulset["serviceName"] == runner.runner_name
        container = statefulset["template"]["spec"]["containers"][0]
        assert container["args"][:3] == ["start-http-server", "--service-name", runner.runner_name]
        assert (container["readinessProbe"]["httpGet"]["path"], container["livenessProbe"]["httpGet"]["path"]) == \
            ("/readyz", "/livez")
        autoscaler = objects["HorizontalPodAutoscaler", runner.runner_name]["spec"]
        assert autoscaler["scaleTargetRef"]["name"] == runner.runner_name and autoscaler["maxReplicas"] == 3

    chat = objects["StatefulSet", f"runner-{CHAT}"]["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert chat == {"requests": {"cpu": "4", "memory": f"{2048 + 1024}Mi"}, "limits": {"nvidia.com/gpu": 1}}
    embed = objects["StatefulSet", f"runner-{EMBED}"]["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert "limits" not in embed
    metric = objects["HorizontalPodAutoscaler", f"runner-{CHAT}"]["spec"]["metrics"][0]["pods"]
    assert metric == {"metric": {"name": IN_FLIGHT}, "target": {"type": "AverageValue", "averageValue": "64"}}
    adapter_rules = yaml.safe_load((DEPLOY / "kubernetes" / "prometheus-adapter.yaml").read_text())
    assert [r["name"]["as"] for r in adapter_rules["rules"]["custom"]] == [IN_FLIGHT]
