"""The deployment manifests in deploy/ are parsed and checked against each other and against the
services a bento built from bentochat.yaml holds: names that do not line up fail here, not at deploy."""

from __future__ import annotations

from urllib.parse import urlparse

import yaml

from conftest import ROOT
from models.config import load_config

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
    assert gateway["environment"]["BENTOCHAT_CONFIG"] == mount
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


def test_bentocloud_config_is_a_valid_deployment_config_for_the_bento_services():
    from bentoml._internal.cloud.schemas.schemasv2 import CreateDeploymentSchema
    from bentoml._internal.utils.cattr import bentoml_cattr

    raw = yaml.safe_load((DEPLOY / "bentocloud.yaml").read_text())
    parsed = bentoml_cattr.structure({**raw, "bento": "bentochat:latest"}, CreateDeploymentSchema)
    assert set(parsed.services) == {"bentochat", *RUNNERS}
    for name, service in parsed.services.items():
        assert service.instance_type and service.scaling.min_replicas >= 1, name
