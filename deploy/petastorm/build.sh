#!/usr/bin/env bash
# Build petastorm 0.13.1 for current pyarrow and numpy 2 (deploy/petastorm/README.md): PyPI's
# wheel (petastorm publishes no sdist after 0.10) plus petastorm-0.13.1-pyarrow15.patch, repacked
# as version 0.13.1+instalearn1 so pip can never take the unpatched wheel in its place.
#
#   deploy/petastorm/build.sh [OUT_DIR]      # default .cache/wheels; PYTHON=python3 (any, it only runs pip)
#
# A few seconds; needs `patch` and PyPI (or a mirror) for the two wheels it downloads.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-.cache/wheels}
PY=${PYTHON:-python3}
PATCH=$PWD/deploy/petastorm/petastorm-0.13.1-pyarrow15.patch
NAME=petastorm-0.13.1+instalearn1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m pip download -q --no-deps --only-binary :all: petastorm==0.13.1 wheel==0.45.1 -d "$work"
# a pure-Python wheel is importable as it is: wheel's own unpack/pack, without installing it
WHEEL_TOOL=("$PY" -c 'import sys; sys.argv[0] = "wheel"; from wheel.cli import main; sys.exit(main())')
export PYTHONPATH="$(ls "$work"/wheel-0.45.1-*.whl)"
"${WHEEL_TOOL[@]}" unpack -d "$work" "$work"/petastorm-0.13.1-py2.py3-none-any.whl >/dev/null
src=$work/petastorm-0.13.1
patch -s -d "$src" -p1 < "$PATCH"
# the patched copy's own version; setuptools<70 (0.13.1's pin for distutils, which the patch no
# longer imports) dropped from its requirements
mv "$src"/petastorm-0.13.1.dist-info "$src/$NAME.dist-info"
sed -i -e 's/^Version: 0.13.1$/Version: 0.13.1+instalearn1/' -e '/^Requires-Dist: setuptools<70$/d' \
    "$src/$NAME.dist-info/METADATA"
mkdir -p "$OUT"
"${WHEEL_TOOL[@]}" pack -d "$OUT" "$src" >/dev/null
ls "$OUT/$NAME"-py2.py3-none-any.whl
