#!/usr/bin/env bash
# Create (once) and use the zoo's Python environment, cached outside the clone.
#
#   bash tools/env.sh [--mm] [command ...]
#
# The venv lives in ${MIXZOO_CACHE:-~/.cache/mixzoo}/venv-<hash of constraints.txt>, so it is
# built once per machine and rebuilt only when constraints.txt changes. --mm adds the
# detection/segmentation stack (mmengine, mmcv with compiled ops, mmdet, mmseg). The command
# (if any) runs inside the venv from the repository root; the zoo is installed editable.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${MIXZOO_CACHE:-$HOME/.cache/mixzoo}
want_mm=0
if [ "${1:-}" = "--mm" ]; then want_mm=1; shift; fi

key=$( (cat "$root/constraints.txt"; echo "${MIXZOO_PYTHON:-python3}") | sha256sum | cut -c1-12)
venv=$cache/venv-$key
# (pip warns about every missing local index directory on these machines; those lines are dropped)
pip() { "$venv/bin/python" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v 'is ignored: it is neither a file' >&2); }
log() { echo "[env] $*" >&2; }

mkdir -p "$cache"
exec 9>"$cache/.lock-$key"; flock 9    # one installer at a time per environment

if [ ! -f "$venv/.core-ok" ]; then
  log "creating $venv (first run on this machine or constraints changed)"
  rm -rf "$venv"
  "${MIXZOO_PYTHON:-python3}" -m venv "$venv"
  pip install -c "$root/constraints.txt" torch torchvision timm safetensors numpy triton pytest pytest-xdist
  touch "$venv/.core-ok"
  # drop environments of older constraints
  for old in "$cache"/venv-*; do [ "$old" = "$venv" ] || rm -rf "$old"; done
fi

if [ "$want_mm" = 1 ] && [ ! -f "$venv/.mm-ok" ]; then
  log "installing the mm stack into $venv"
  bash "$root/tools/install_mm.sh" "$venv/bin/python"
  touch "$venv/.mm-ok"
fi

# the zoo itself: editable, so the clone's code is what runs (cheap; redone for each clone)
if [ "$(cat "$venv/.zoo-path" 2>/dev/null)" != "$root" ]; then
  pip install --no-deps --no-build-isolation -e "$root" >/dev/null
  echo "$root" > "$venv/.zoo-path"
fi
exec 9>&-

[ $# -eq 0 ] && { echo "$venv"; exit 0; }
cd "$root"
export PATH="$venv/bin:$PATH" VIRTUAL_ENV="$venv"
exec "$@"
