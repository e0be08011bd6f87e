"""The image as `make image` builds it (bentofile.cpu.yaml on its Debian base, podman where installed, else
Docker's engine), run with no network: it serves both embedded models on the kernels its builder stage
compiled, its HEALTHCHECK passes, and one runner starts alone from it (docs/deploy.md); and
deploy/docker-compose.yaml brought up with it under podman-compose: the gateway alone and each runner alone,
in containers of the one image. Skipped where no container engine answers; `.ci/run` installs podman and
podman-compose from Debian's packages (`make engine`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ARTIFACTS, ROOT, _free_port

pytestmark = pytest.mark.slow

CHAT, EMBEDDING = "smollm2-135m-instruct", "all-minilm-l6-v2"
KERNELS_DIR = "/opt/bentochat/kernels"


def engine() -> str | None:
    for name in ("podman", "docker"):
        if shutil.which(name) and subprocess.run([name, "info"], capture_output=True).returncode == 0:
            return name
    return None


ENGINE = engine()
COMPOSE = ENGINE == "podman" and shutil.which("podman-compose") is not None


@pytest.fixture(scope="module")
def image(embedded_models) -> str:
    """`make image` of the CPU bento; the image's tag. The image is kept: removing it would remove the layers
    that the next build reuses (the installed packages, the compiled kernels, the models)."""
    import bentoml

    if ENGINE is None:
        pytest.skip("no container engine (podman or docker) answers here")
    if os.geteuid() != 0:
        pytest.skip("the OpenAI client reaches the container's network namespace with nsenter, as root")
    log = ARTIFACTS / "image-build.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    # -o install: `make test` has installed (and the test must not reinstall the virtualenv it runs in).
    command = ["make", "-o", "install", "image", "BENTOFILE=bentofile.cpu.yaml", "BENTO=bentochat-cpu:latest",
               f"BACKEND={ENGINE}", f"VENV={Path(sys.executable).parent.parent}"]
    with open(log, "wb") as out:
        done = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, "BENTOCHAT_CONFIG": str(ROOT / "bentochat.yaml")})
    assert done.returncode == 0, log.read_text()[-5000:]
    return str(bentoml.get("bentochat-cpu:latest").tag)


def run(image: str, name: str, *args: str) -> str:
    subprocess.run([ENGINE, "rm", "-f", name], capture_output=True)
    subprocess.run([ENGINE, "run", "-d", "--name", name, "--network", "none", image, *args], check=True,
                   capture_output=True)
    return name


def logs(name: str) -> str:
    done = subprocess.run([ENGINE, "logs", name], capture_output=True, text=True)
    return done.stdout + done.stderr


def healthy(name: str) -> bool:
    """The image's HEALTHCHECK, run now (podman), or its last result (Docker: every 30 s)."""
    if ENGINE == "podman":
        return subprocess.run(["podman", "healthcheck", "run", name], capture_output=True).returncode == 0
    status = subprocess.run(["docker", "inspect", "-f", "{{.State.Health.Status}}", name], capture_output=True,
                            text=True).stdout.strip()
    return status == "healthy"


def wait_healthy(name: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not healthy(name):
        running = subprocess.run([ENGINE, "inspect", "-f", "{{.State.Running}}", name], capture_output=True,
                                 text=True).stdout.strip()
        if running != "true" or time.monotonic() > deadline:
            pytest.fail(f"{name} not healthy ({'running' if running == 'true' else 'exited'}):\n{logs(name)[-5000:]}")
        time.sleep(2)


def in_network_of(name: str, script: str) -> str:
    """``script`` run by this test's Python (which has the OpenAI client) inside ``name``'s network namespace,
    the one way in to a container with no network; what it prints."""
    pid = subprocess.run([ENGINE, "inspect", "-f", "{{.State.Pid}}", name], capture_output=True, text=True,
                         check=True).stdout.strip()
    done = subprocess.run(["nsenter", "--target", pid, "--net", sys.executable, "-c", script], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def expected_kernels_line() -> str:
    """The log line of the kernels that this CPU runs, loaded from the library the builder stage compiled."""
    from runners.engine import native

    level = native.level_here()
    if level is None:
        return "BentoChat's native kernels: no AVX2 and FMA on this CPU"
    return f"BentoChat's native kernels: the {level} level, {KERNELS_DIR}/bentochat-kernels_{level}_"


CLIENT = f"""
import json, time, openai
client = openai.OpenAI(base_url="http://127.0.0.1:3000/v1", api_key="none", max_retries=0)
# /readyz (so the HEALTHCHECK) passes once some model has a runner up: wait for both models as well.
deadline = time.monotonic() + 600
while {{m.id for m in client.models.list()}} != {{"{CHAT}", "{EMBEDDING}"}} and time.monotonic() < deadline:
    time.sleep(1)
chat = client.chat.completions.create(model="{CHAT}", messages=[{{"role": "user", "content": "Say hello."}}],
                                      max_tokens=8, temperature=0)
embedding = client.embeddings.create(model="{EMBEDDING}", input=["hello"])
print(json.dumps({{"models": sorted(m.id for m in client.models.list()), "text": chat.choices[0].message.content,
                  "tokens": chat.usage.completion_tokens, "dimensions": len(embedding.data[0].embedding)}}))
"""


def test_image_serves_both_models_offline_on_the_prebuilt_kernels(image):
    started = time.monotonic()
    name = run(image, f"bentochat-test-image-{os.getpid()}")
    try:
        wait_healthy(name)
        answer = json.loads(in_network_of(name, CLIENT))
        size = subprocess.run([ENGINE, "image", "inspect", "-f", "{{.Size}}", image], capture_output=True,
                              text=True).stdout.strip()
        print(f"image {image}: {int(size) / 1e9:.2f} GB, both models answered {time.monotonic() - started:.0f} s "
              "after the container's start")
        assert answer["models"] == sorted([CHAT, EMBEDDING])
        assert answer["text"] and answer["tokens"] > 0
        assert answer["dimensions"] == 384
        log = logs(name)
        assert expected_kernels_line() in log, log[-5000:]
        assert "native forward" in log and "building it now" not in log and "no C++ compiler" not in log
        # No compiler, no triton (xgrammar's GPU kernel): the image runs what its builder compiled.
        assert subprocess.run([ENGINE, "exec", name, "sh", "-c", "command -v c++ || command -v gcc"],
                              capture_output=True).returncode != 0
        assert subprocess.run([ENGINE, "exec", name, "python", "-c", "import triton"],
                              capture_output=True).returncode != 0
    finally:
        (ARTIFACTS / "image-serve.log").write_text(logs(name))
        subprocess.run([ENGINE, "rm", "-f", name], capture_output=True)


@pytest.mark.skipif(COMPOSE, reason="the compose test below starts each runner alone")
def test_one_runner_starts_alone_from_the_image(image):
    """A runner host's start (docs/deploy.md): one runner service of the bento, healthy on its own."""
    name = run(image, f"bentochat-test-runner-{os.getpid()}", "start-http-server", "--service-name", f"runner-{EMBEDDING}",
               "--port", "3000")
    try:
        wait_healthy(name)
        log = logs(name)
        assert EMBEDDING in log and CHAT not in log, log[-5000:]
    finally:
        subprocess.run([ENGINE, "rm", "-f", name], capture_output=True)


COMPOSE_FILE = ROOT / "deploy" / "docker-compose.yaml"
KEYS = ("sk-compose-1", "sk-compose-2")


def project_containers(project: str) -> dict[str, tuple[str, str]]:
    """The containers podman-compose made for ``project``: service -> (container, state: running, exited...)."""
    done = subprocess.run(["podman", "ps", "-a", "--format", "json", "--filter",
                           f"label=io.podman.compose.project={project}"], capture_output=True, text=True)
    return {c["Labels"]["com.docker.compose.service"]: (c["Names"][0], c["State"]) for c in json.loads(done.stdout or "[]")}


def wait_gateway(base_url: str, project: str, timeout: float = 600) -> None:
    """Until the gateway's /readyz, at the host port compose published, answers 200: every model has a runner up."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(base_url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        containers = project_containers(project)
        if time.monotonic() > deadline or any(state != "running" for _, state in containers.values()):
            pytest.fail(f"compose project not ready: {containers}\n" +
                        "\n".join(f"{name}:\n{logs(name)[-3000:]}" for name, _ in containers.values()))
        time.sleep(1)


@pytest.mark.skipif(not COMPOSE, reason="podman-compose (Debian's 1.0.3: `make engine`) is not installed")
def test_compose_file_serves_the_image_with_the_gateway_and_each_runner_apart(image):
    """deploy/docker-compose.yaml as docs/deploy.md brings it up: under a project name and host port of
    the test's own, the API keys passed from the environment; torn down (`down -t 30`) whatever happens."""
    import openai

    project, port = f"bentochat-test-{os.getpid()}", _free_port()
    compose = ["podman-compose", "-p", project, "-f", str(COMPOSE_FILE)]
    env = {**os.environ, "BENTOCHAT_IMAGE": image, "BENTOCHAT_PORT": str(port), "BENTOCHAT_API_KEYS": ",".join(KEYS)}
    base_url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    try:
        up = subprocess.run([*compose, "up", "-d"], env=env, capture_output=True, text=True, timeout=300)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        wait_gateway(base_url, project)
        ready = time.monotonic() - started
        containers = project_containers(project)
        assert set(containers) == {"gateway", "runner-chat-0", "runner-chat-1", "runner-embed"}
        for name, _ in containers.values():  # each runner healthy on its own (its model loaded), the gateway too
            wait_healthy(name)

        with pytest.raises(openai.AuthenticationError):  # the keys reached the gateway: others are refused
            openai.OpenAI(base_url=base_url + "/v1", api_key="sk-wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=base_url + "/v1", api_key=KEYS[1], max_retries=0)
        assert sorted(m.id for m in client.models.list()) == sorted([CHAT, EMBEDDING])
        chat = client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "Say hello."}],
                                              max_tokens=8, temperature=0)
        assert chat.choices[0].message.content and chat.usage.completion_tokens > 0
        assert len(client.embeddings.create(model=EMBEDDING, input=["hello"]).data[0].embedding) == 384

        by_service = {service: logs(name) for service, (name, _) in containers.items()}
        gateway = by_service.pop("gateway")
        assert f"model {CHAT}: chat from runner" in gateway and f"model {EMBEDDING}: embedding from runner" in gateway
        for service, log in by_service.items():  # a runner loads its own model only, on the prebuilt kernels
            own, other = (EMBEDDING, CHAT) if service == "runner-embed" else (CHAT, EMBEDDING)
            assert own in log and other not in log, log[-3000:]
        assert expected_kernels_line() in by_service["runner-chat-0"], by_service["runner-chat-0"][-3000:]
        print(f"compose: the gateway ready {ready:.0f} s after `up -d`, every container healthy "
              f"{time.monotonic() - started:.0f} s after it")
    finally:
        for service, (name, _) in project_containers(project).items():
            (ARTIFACTS / f"compose-{service}.log").write_text(logs(name))
        stopping = time.monotonic()
        subprocess.run([*compose, "down", "-t", "30"], env=env, capture_output=True, timeout=300)
        print(f"compose: `down -t 30` took {time.monotonic() - stopping:.0f} s")
        # What `down` leaves (a container it could not stop; podman-compose 1.0.3 keeps the network):
        for name, _ in project_containers(project).values():
            subprocess.run(["podman", "rm", "-f", name], capture_output=True)
        subprocess.run(["podman", "network", "rm", "-f", f"{project}_default"], capture_output=True)
