#!/usr/bin/env bash
# A wheelhouse for building the image with no package index in reach (make image WHEELS=dir):
# every wheel the bento's requirements.txt resolves to here, plus BentoML's uv, downloaded with this
# machine's pip (its index, find-links and certificates), for this machine's platform and Python 3.11.
# triton is left out: xgrammar requires it on Linux x86-64 for a GPU kernel, and the image excludes it (UV_EXCLUDE).
#   deploy/wheelhouse.sh REQUIREMENTS_TXT DIR
set -euo pipefail
REQUIREMENTS=$1 DIR=$2
PIP=${PIP:-.venv/bin/pip}
mkdir -p "$DIR"
report=$(mktemp)
trap 'rm -f "$report"' EXIT
# Resolve without installing (PyPI serves the metadata apart from the wheels), then fetch each pin alone.
$PIP install -q --dry-run --ignore-installed --report "$report" -r "$REQUIREMENTS" "uv==0.13.4"
python3 -c '
import json, sys
for item in json.load(open(sys.argv[1]))["install"]:
    if item["metadata"]["name"].lower() != "triton":
        print("%s==%s" % (item["metadata"]["name"], item["metadata"]["version"]))
' "$report" > "$DIR/requirements.txt"
$PIP download -q --no-deps -d "$DIR" -r "$DIR/requirements.txt"
