#!/usr/bin/env bash
# The patch life cycle on a tiny SD1.x checkpoint, in about ten seconds on a CPU:
# make a checkpoint and an edited copy, extract the edit as a .erasepatch, inspect it,
# apply it in place, see it listed on the checkpoint, revert it, and check every byte came back.
#
#   bash examples/quickstart.sh [WORKDIR]
set -euo pipefail
py=${PYTHON:-python}
work=${1:-$(mktemp -d)}
mkdir -p "$work"
ek() { echo "+ erasekit $*" >&2; "$py" -m erasekit "$@"; }
sha() { "$py" -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' "$1"; }

rm -rf "$work/base.safetensors" "$work/edited.safetensors" "$work/edit.erasepatch" "$work/.erasekit"
"$py" -m erasekit.testing single-sd1 "$work/base.safetensors" --dtype F16 >/dev/null
"$py" -m erasekit.testing single-sd1 "$work/edited.safetensors" --dtype F16 --edit-layers 1 >/dev/null
before=$(sha "$work/base.safetensors")

ek diff "$work/base.safetensors" "$work/edited.safetensors" -o "$work/edit.erasepatch" --title "layer-1 edit" --rank 8
ek inspect "$work/edit.erasepatch" --against "$work/base.safetensors"
ek apply "$work/edit.erasepatch" --to "$work/base.safetensors" --in-place
ek inspect "$work/base.safetensors"
ek apply --revert "$work/edit.erasepatch" --to "$work/base.safetensors"

after=$(sha "$work/base.safetensors")
if [ "$before" = "$after" ]; then echo "bit-exact revert: yes ($after)"; else echo "bit-exact revert: NO"; exit 1; fi
