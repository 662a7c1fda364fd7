#!/usr/bin/env bash
# Build a Horovod 0.28.1 wheel that works with torch 2.14 (CPU, Gloo controller and operations,
# no MPI) from the PyPI sdist plus deploy/horovod/horovod-0.28.1-torch2.14.patch.
#
#   deploy/horovod/build.sh [OUT_DIR]      # default .cache/wheels; PYTHON=.venv/bin/python
#
# About 6 minutes on 2 cores. It needs cmake >= 3.13, a C++20 compiler (GCC >= 10) and the
# venv's torch (the build imports it: --no-build-isolation). For GPU clusters see README.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-.cache/wheels}
PY=${PYTHON:-.venv/bin/python}
PATCH=$PWD/deploy/horovod/horovod-0.28.1-torch2.14.patch
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m pip download -q --no-deps --no-binary :all: horovod==0.28.1 -d "$work"
tar xzf "$work"/horovod-0.28.1.tar.gz -C "$work"
patch -s -d "$work"/horovod-0.28.1 -p1 < "$PATCH"
export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_WITHOUT_MPI=1 \
       HOROVOD_WITH_GLOO=1 HOROVOD_CPU_OPERATIONS=${HOROVOD_CPU_OPERATIONS:-GLOO} \
       HOROVOD_CPU_ONLY=${HOROVOD_CPU_ONLY:-1} CMAKE_POLICY_VERSION_MINIMUM=3.5 \
       MAKEFLAGS="-j$(nproc)" HOROVOD_BUILD_ARCH_FLAGS=${HOROVOD_BUILD_ARCH_FLAGS:-}
mkdir -p "$OUT"
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" "$work"/horovod-0.28.1
ls "$OUT"/horovod-0.28.1-*.whl
