#!/usr/bin/env bash
# Create (once) and use the zoo's Python environment, cached outside the clone.
#
#   bash tools/env.sh [--mm] [command ...]
#
# The venv lives in ${MIXZOO_CACHE:-~/.cache/mixzoo}/venv-<hash of constraints.txt>, so it is
# built once per machine and rebuilt only when constraints.txt changes. --mm adds the
# detection/segmentation stack (mmengine, mmcv with compiled ops, mmdet, mmseg). The command
# (if any) runs inside the venv from the repository root; the zoo is installed editable.
# Without a command it prints the venv path on stdout; every message goes to stderr.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${MIXZOO_CACHE:-$HOME/.cache/mixzoo}
want_mm=0
if [ "${1:-}" = "--mm" ]; then want_mm=1; shift; fi

key=$( (cat "$root/constraints.txt"; echo "${MIXZOO_PYTHON:-python3}") | sha256sum | cut -c1-12)
venv=$cache/venv-$key
# pip's own output (its download progress bars included) goes to stderr, so that stdout carries only
# the venv path or the command's output; pip warns about every missing local index directory on
# these machines: those lines are dropped.
pip() { "$venv/bin/python" -m pip --disable-pip-version-check "$@" >&2 \
          2> >(grep --line-buffered -v 'is ignored: it is neither a file' >&2); }
log() { echo "[env] $*" >&2; }
pinned() { grep -i "^$1==" "$root/constraints.txt" | cut -d= -f3; }
took() { local s=$(( $(date +%s) - $1 )); echo "$((s / 60)) min $((s % 60)) s"; }

mkdir -p "$cache"
if ! flock -n 9 9>"$cache/.lock-$key" 2>/dev/null; then
  log "waiting for another tools/env.sh installing into $venv to finish"
fi
exec 9>"$cache/.lock-$key"; flock 9    # one installer at a time per environment

if [ ! -f "$venv/.core-ok" ]; then
  t0=$(date +%s)
  log "building the zoo's environment in $venv (first run on this machine, or constraints.txt changed);"
  log "  later runs reuse it"
  log "step 1/3: creating the venv with ${MIXZOO_PYTHON:-python3} (seconds)"
  rm -rf "$venv"
  "${MIXZOO_PYTHON:-python3}" -m venv "$venv"
  log "step 2/3: torch $(pinned torch), torchvision $(pinned torchvision), timm $(pinned timm), triton, numpy, pytest, onnx / onnxruntime (tools/export.py):"
  log "  about 5.6 GB on disk (torch's CUDA build and its nvidia-* libraries, also on CPU-only machines),"
  log "  about 3 GB to download: a few minutes on a fast link, pip shows each file's progress; unpacking"
  log "  afterwards takes 1-3 min more without output"
  t=$(date +%s)
  pip install --progress-bar on -c "$root/constraints.txt" torch torchvision timm safetensors numpy triton pytest pytest-xdist onnx onnxscript onnxruntime
  touch "$venv/.core-ok"
  log "step 2/3 done in $(took "$t") ($(du -sh "$venv" 2>/dev/null | cut -f1) on disk)"
  # drop environments of older constraints
  for old in "$cache"/venv-*; do
    if [ "$old" != "$venv" ]; then log "removing the older environment $old"; rm -rf "$old"; fi
  done
fi

if [ "$want_mm" = 1 ] && [ ! -f "$venv/.mm-ok" ]; then
  log "installing the detection/segmentation stack into $venv (tools/install_mm.sh)"
  bash "$root/tools/install_mm.sh" "$venv/bin/python" >&2
  touch "$venv/.mm-ok"
fi

# the zoo itself: editable, so the clone's code is what runs (cheap; redone for each clone)
if [ "$(cat "$venv/.zoo-path" 2>/dev/null)" != "$root" ]; then
  if [ -n "${t0:-}" ]; then log "step 3/3: the zoo itself, editable from $root (seconds)"
  else log "installing the zoo, editable from $root, into $venv (seconds)"; fi
  pip install -q --no-deps --no-build-isolation -e "$root" >/dev/null
  echo "$root" > "$venv/.zoo-path"
  [ -z "${t0:-}" ] || log "environment ready in $(took "$t0"): $venv"
fi
exec 9>&-

[ $# -eq 0 ] && { echo "$venv"; exit 0; }
cd "$root"
export PATH="$venv/bin:$PATH" VIRTUAL_ENV="$venv"
exec "$@"
