#!/usr/bin/env bash
# Install mmengine / mmcv (compiled ops) / mmdet / mmseg into the environment of a Python that has torch.
#
#   bash tools/install_mm.sh [PYTHON]        # default: python; the zoo's venv: "$(bash tools/env.sh)/bin/python"
#   bash tools/env.sh --mm                   # the same, into the zoo's venv, once
#
# mmcv 2.1.0 has no wheels for recent torch, and torch >= 2.14's headers need C++20 while mmcv's
# setup.py asks for c++14/17. Order of preference:
#   1. $MIXZOO_MMCV_WHEEL, or a verified prebuilt wheel for this torch/python (the CPU wheel built for
#      torch 2.14.1 / CPython 3.11, where this project's machines keep one), or one built here before
#      (kept in the cache);
#   2. otherwise build mmcv from the PyPI sdist with the -std flags raised to c++20 (30-40 min on
#      2 cores), once per machine: the built wheel is kept in the cache. With a CUDA toolkit and
#      a GPU visible, the build includes the CUDA ops (FORCE_CUDA=1 forces them). Every minute
#      the build reports how many of its object files are compiled.
# Every message goes to stderr.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${MIXZOO_CACHE:-$HOME/.cache/mixzoo}
log() { echo "[install_mm] $*" >&2; }

usage() {
  cat >&2 <<'EOF'
usage: bash tools/install_mm.sh [PYTHON]
  Installs mmengine, mmcv 2.1.0 (with its compiled ops), mmdet and mmsegmentation into the environment
  of PYTHON (default: python), which must already have torch. For the zoo's environment:
      bash tools/install_mm.sh "$(bash tools/env.sh)/bin/python"
  or let tools/env.sh do it once:  bash tools/env.sh --mm
  MIXZOO_MMCV_WHEEL=path/to/mmcv-2.1.0-*.whl skips the mmcv build (30-40 min) with a wheel built before.
EOF
}

# One line a minute while the mmcv build runs: object files compiled so far out of the total (ninja's
# build file lists them), the newest one and the minutes so far. $1: the source folder being built,
# $2: the build's pid, $3: its start (epoch seconds). MIXZOO_PROGRESS_S sets the interval.
watch_build() {
  local src=$1 pid=$2 start=$3 every=${MIXZOO_PROGRESS_S:-60} waited ninja n total last
  while kill -0 "$pid" 2>/dev/null; do
    waited=0
    while [ "$waited" -lt "$every" ] && kill -0 "$pid" 2>/dev/null; do sleep 1; waited=$((waited + 1)); done
    kill -0 "$pid" 2>/dev/null || break
    # (files come and go while the build runs: a failed look is no error)
    ninja=$(find "$src" -name build.ninja -print -quit 2>/dev/null || true)
    n=$( (find "$src" -name '*.o' 2>/dev/null || true) | wc -l)
    total=$( ([ -n "$ninja" ] && grep -c '^build [^:]*\.o:' "$ninja") 2>/dev/null || true)
    [ "${total:-0}" -gt 0 ] 2>/dev/null || total=
    last=$( (find "$src" -name '*.o' -printf '%T@ %f\n' 2>/dev/null || true) | sort -n | tail -1 | cut -d' ' -f2)
    if [ -z "$ninja" ] && [ "$n" = 0 ]; then
      log "mmcv build: preparing (setup.py), $(( ($(date +%s) - start) / 60 )) min so far"
    elif [ -n "$total" ] && [ "$n" -ge "$total" ]; then
      log "mmcv build: all $total object files compiled, linking / packing the wheel, $(( ($(date +%s) - start) / 60 )) min so far"
    else
      log "mmcv build: $n/${total:-?} object files compiled${total:+ ($((100 * n / total))%)}, $(( ($(date +%s) - start) / 60 )) min so far${last:+, last: $last}"
    fi
  done
}

main() {
  case "${1:-}" in -h|--help) usage; exit 0;; esac
  local py=${1:-python}
  local why=
  if ! command -v "$py" >/dev/null 2>&1; then why="no Python '$py' here"
  elif ! "$py" -c 'import torch' >/dev/null 2>&1; then why="$py ($(command -v "$py")) has no torch"; fi
  if [ -n "$why" ]; then
    log "error: $why: the mm stack goes into the environment of a Python that has torch."
    log "usage: bash tools/install_mm.sh PYTHON, e.g. the zoo's environment (tools/env.sh prints its path):"
    log "    bash tools/install_mm.sh \"\$(bash tools/env.sh)/bin/python\""
    log "  or, the same once through tools/env.sh:  bash tools/env.sh --mm      (--help: more)"
    exit 2
  fi
  # (pip's output, progress bars included, to stderr; pip warns about every missing local index
  # directory on these machines: those lines are dropped)
  pip() { "$py" -m pip --disable-pip-version-check "$@" >&2 \
            2> >(grep --line-buffered -v 'is ignored: it is neither a file' >&2); }
  local tag
  tag=$("$py" -c 'import sys, torch; v = torch.__version__.split("+")[0]; print("cp%d%d-torch%s" % (sys.version_info[0], sys.version_info[1], v))')

  local wheel=${MIXZOO_MMCV_WHEEL:-} w
  if [ -z "$wheel" ] && [ "$tag" = "cp311-torch2.14.1" ]; then
    # the CPU wheel this project's machines keep beside the repository, used when its checksum holds
    for w in "$root/../shared/wheels/mmcv-2.1.0-cp311-cp311-linux_x86_64.whl"; do
      if [ -f "$w" ] && (cd "$(dirname "$w")" && sha256sum -c --quiet SHA256SUMS 2>/dev/null); then wheel=$w; fi
    done
  fi
  local built="$cache/wheels/$tag"
  if [ -z "$wheel" ] && ls "$built"/mmcv-2.1.0-*.whl >/dev/null 2>&1; then wheel=$(ls "$built"/mmcv-2.1.0-*.whl | head -1); fi

  if [ -n "$wheel" ]; then
    log "step 1/2: mmcv 2.1.0 from the prebuilt wheel $(basename "$wheel") (no build)"
  else
    cat >&2 <<EOF
[install_mm] step 1/2: no prebuilt mmcv wheel for $tag: building mmcv 2.1.0 from source now,
[install_mm]   30-40 min on 2 idle cores, up to ~95 min on a busy 2-core machine (MAX_JOBS=${MAX_JOBS:-2} compile jobs),
[install_mm]   once per machine: the wheel is kept in $built.
[install_mm]   A line a minute says how many of the build's object files are compiled.
[install_mm]   To skip the build, point at a built wheel: MIXZOO_MMCV_WHEEL=path/to/mmcv-2.1.0-*.whl
[install_mm]   (pip's complaint that torch wants setuptools>=77 is expected: mmcv is built with setuptools<70,
[install_mm]   the last step puts the pinned one back)
EOF
    local start d rc=0 bpid
    start=$(date +%s)
    d=$(mktemp -d)
    # mmcv's setup.py imports pkg_resources (gone from setuptools >= 81) and its build needs an older
    # setuptools: install that first and keep pip from preparing the metadata or building in an isolated
    # env with the newest setuptools (pip isolates whenever `wheel` is missing, and newer pip always does).
    log "  build tools: setuptools<70, wheel, ninja"
    pip install -q "setuptools<70" wheel ninja
    log "  the mmcv 2.1.0 source (PyPI sdist, ~0.5 MB)"
    pip download -q --no-deps --no-binary :all: --no-build-isolation mmcv==2.1.0 -d "$d"
    tar xzf "$d"/mmcv-2.1.0.tar.gz -C "$d"
    sed -i 's/-std=c++14/-std=c++20/g; s/-std=c++17/-std=c++20/g' "$d/mmcv-2.1.0/setup.py"
    mkdir -p "$built"
    log "  compiling (pip wheel; pip itself only says 'still running...')"
    (cd "$d/mmcv-2.1.0" && MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-2} "$py" -m pip wheel --no-deps --no-build-isolation . -w "$built") &
    bpid=$!
    watch_build "$d/mmcv-2.1.0" "$bpid" "$start"
    wait "$bpid" || rc=$?
    if [ "$rc" != 0 ]; then log "error: the mmcv build failed (exit $rc); its sources are in $d"; exit "$rc"; fi
    wheel=$(ls "$built"/mmcv-2.1.0-*.whl | head -1)
    rm -rf "$d"
    log "  built $wheel in $(( ($(date +%s) - start) / 60 )) min"
  fi
  # (mmengine 0.10 imports pkg_resources, which setuptools >= 81 no longer ships)
  log "step 2/2: installing mmcv, mmengine, mmdet, mmsegmentation and their dependencies (~150 MB, a minute or two)"
  pip install -c "$root/constraints.txt" "$wheel" mmengine mmdet mmsegmentation ftfy regex pycocotools "setuptools<81"
  "$py" -W ignore -c "import mmcv, mmdet, mmseg, pkg_resources; from mmcv.ops import nms; print('[install_mm] done: mmcv', mmcv.__version__, 'mmdet', mmdet.__version__, 'mmseg', mmseg.__version__)" >&2
}

# run when executed; sourcing the file only defines the functions (the tests use watch_build)
if [ "${BASH_SOURCE[0]}" = "$0" ]; then main "$@"; fi
