#!/usr/bin/env bash
# erasekit's main job on the built-in toy-world model, in about a minute on a 2-core CPU:
# erase "circle", judge the result on held-out seeds, and write the before/after picture.
#
#   bash examples/demo.sh [WORKDIR] [CONCEPT] [MODEL]
#
# MODEL: a built-in model: toy-sd (the default), toy-sdxl or toy-flux (the same world in SDXL's and FLUX.1's
# architectures).
# README_PICTURE=docs/images/demo-circle-before-after.png bash examples/demo.sh  also renders the README's picture
# (three prompts before and after, six held-out seeds; about 15 s more) and copies it there.
set -euo pipefail
py=${PYTHON:-python}
work=${1:-erasekit-demo}
concept=${2:-circle}
model=${3:-toy-sd}
mkdir -p "$work"
rm -f "$work/$concept.erasepatch"
ek() { echo "+ erasekit $*" >&2; "$py" -m erasekit "$@"; }

ek erase --model "$model" --concept "$concept" -o "$work/$concept.erasepatch"
ek eval --model "$model" --patch "$work/$concept.erasepatch" --concept "$concept" -n 8 --grid "$work/$concept-before-after.png"
echo "before/after picture: $work/$concept-before-after.png"
if [[ -n "${README_PICTURE:-}" ]]; then
  ek generate --model "$model" --patch "$work/$concept.erasepatch" --compare "a red $concept" "one $concept" "a blue star" \
    -n 6 --seed 1000 -o "$work/readme-picture"
  cp "$work/readme-picture/grid.png" "$README_PICTURE"
  echo "README picture: $README_PICTURE"
fi
