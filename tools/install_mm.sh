#!/usr/bin/env bash
# Install mmengine / mmcv (compiled ops) / mmdet / mmseg into the Python given as $1 (default: python).
#
# mmcv 2.1.0 has no wheels for recent torch, and torch >= 2.14's headers need C++20 while mmcv's
# setup.py asks for c++14/17. Order of preference:
#   1. $MIXZOO_MMCV_WHEEL, or a prebuilt wheel in ../shared/wheels or the cache that matches this
#      torch/python (the CPU wheel built for torch 2.14.1 / CPython 3.11);
#   2. otherwise build mmcv from the PyPI sdist with the -std flags raised to c++20 (30-40 min on
#      2 cores), once per machine: the built wheel is kept in the cache. With a CUDA toolkit and
#      a GPU visible, the build includes the CUDA ops (FORCE_CUDA=1 forces them).
set -euo pipefail
py=${1:-python}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${MIXZOO_CACHE:-$HOME/.cache/mixzoo}
# (pip warns about every missing local index directory on these machines; those lines are dropped)
pip() { "$py" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v 'is ignored: it is neither a file' >&2); }
tag=$("$py" -c 'import sys, torch; v = torch.__version__.split("+")[0]; print("cp%d%d-torch%s" % (sys.version_info[0], sys.version_info[1], v))')

wheel=${MIXZOO_MMCV_WHEEL:-}
if [ -z "$wheel" ] && [ "$tag" = "cp311-torch2.14.1" ]; then
  for w in "$root/../shared/wheels/mmcv-2.1.0-cp311-cp311-linux_x86_64.whl"; do
    if [ -f "$w" ] && (cd "$(dirname "$w")" && sha256sum -c --quiet SHA256SUMS 2>/dev/null); then wheel=$w; fi
  done
fi
built="$cache/wheels/$tag"
if [ -z "$wheel" ] && ls "$built"/mmcv-2.1.0-*.whl >/dev/null 2>&1; then wheel=$(ls "$built"/mmcv-2.1.0-*.whl | head -1); fi

if [ -z "$wheel" ]; then
  cat >&2 <<EOF
[install_mm] no prebuilt mmcv wheel for $tag: building mmcv 2.1.0 from source now,
[install_mm]   30-40 min on 2 idle cores, up to ~95 min on a busy 2-core machine (MAX_JOBS=${MAX_JOBS:-2} compile jobs),
[install_mm]   once per machine: the wheel is kept in $built.
[install_mm]   To skip the build, point at a built wheel: MIXZOO_MMCV_WHEEL=path/to/mmcv-2.1.0-*.whl
[install_mm]   (pip's complaint that torch wants setuptools>=77 is expected: mmcv is built with setuptools<70,
[install_mm]   the last step puts the pinned one back)
EOF
  start=$(date +%s)
  d=$(mktemp -d)
  # mmcv's setup.py imports pkg_resources (gone from setuptools >= 81) and its build needs an older
  # setuptools: install that first and keep pip from preparing the metadata or building in an isolated
  # env with the newest setuptools (pip isolates whenever `wheel` is missing, and newer pip always does).
  pip install "setuptools<70" wheel ninja
  pip download --no-deps --no-binary :all: --no-build-isolation mmcv==2.1.0 -d "$d"
  tar xzf "$d"/mmcv-2.1.0.tar.gz -C "$d"
  sed -i 's/-std=c++14/-std=c++20/g; s/-std=c++17/-std=c++20/g' "$d/mmcv-2.1.0/setup.py"
  mkdir -p "$built"
  (cd "$d/mmcv-2.1.0" && MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-2} "$py" -m pip wheel --no-deps --no-build-isolation . -w "$built")
  wheel=$(ls "$built"/mmcv-2.1.0-*.whl | head -1)
  rm -rf "$d"
  echo "[install_mm] built $wheel in $(( ($(date +%s) - start) / 60 )) min" >&2
fi
# (mmengine 0.10 imports pkg_resources, which setuptools >= 81 no longer ships)
pip install -c "$root/constraints.txt" "$wheel" mmengine mmdet mmsegmentation ftfy regex pycocotools "setuptools<81"
"$py" -c "import mmcv, mmdet, mmseg, pkg_resources; from mmcv.ops import nms; print('[install_mm] mmcv', mmcv.__version__, 'mmdet', mmdet.__version__, 'mmseg', mmseg.__version__)"
