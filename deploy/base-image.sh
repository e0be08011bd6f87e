#!/usr/bin/env bash
# The image's two base images, made from Debian's archive with mmdebstrap and imported into podman
# (or Docker) as local images, for machines that reach Debian's archive but no container registry:
#   bentochat-base:bookworm     Debian bookworm's Python 3.11 with pip and venv, for BentoML's Dockerfile
#                               (docker.base_image in bentofile.cpu.yaml); stands in for python:3.11-slim
#   bentochat-builder:bookworm  the same plus g++: the image's builder stage, where BentoChat's native
#                               kernels are compiled (`python -m runners.engine.native`); no compiler
#                               reaches the image
# An image already there is kept (FORCE=1 makes it again). ENGINE=docker imports into Docker instead.
set -euo pipefail
ENGINE=${ENGINE:-podman}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
# pip and venv for BentoML's Dockerfile (it pip-installs uv), passwd for its useradd, libgomp1 for the
# kernels' OpenMP; no documentation or locales.
RUNTIME=python3,python3-pip,python3-venv,ca-certificates,passwd,libgomp1
BUILDER=$RUNTIME,g++

make_image() {  # make_image NAME PACKAGES
    if [ -z "${FORCE:-}" ] && $ENGINE image inspect "$1" >/dev/null 2>&1; then
        echo "$1: already there"
        return
    fi
    # Debian's pip refuses to install outside a virtualenv (PEP 668) unless EXTERNALLY-MANAGED is gone:
    # BentoML's Dockerfile installs uv with the system's pip.
    mmdebstrap --variant=apt --include="$2" \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --customize-hook='rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED' \
        --customize-hook='ln -sf python3 "$1"/usr/bin/python' \
        "$SUITE" - "$MIRROR" \
        | $ENGINE import --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "$1"
}

make_image bentochat-base:$SUITE "$RUNTIME"
make_image bentochat-builder:$SUITE "$BUILDER"
