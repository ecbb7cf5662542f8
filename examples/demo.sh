#!/usr/bin/env bash
# erasekit's main job on the built-in toy-world model, in about a minute on a 2-core CPU:
# erase "circle", judge the result on held-out seeds, and write the before/after picture.
#
#   bash examples/demo.sh [WORKDIR] [CONCEPT]
set -euo pipefail
py=${PYTHON:-python}
work=${1:-erasekit-demo}
concept=${2:-circle}
mkdir -p "$work"
rm -f "$work/$concept.erasepatch"
ek() { echo "+ erasekit $*" >&2; "$py" -m erasekit "$@"; }

ek erase --concept "$concept" -o "$work/$concept.erasepatch"
ek eval --patch "$work/$concept.erasepatch" --concept "$concept" -n 8 --grid "$work/$concept-before-after.png"
echo "before/after picture: $work/$concept-before-after.png"
