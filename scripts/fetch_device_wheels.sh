#!/usr/bin/env bash
# The wheels the GPU machine needs beside what it has, from the lists in this directory (a fresh clone
# has everything it needs to stage them): .whl/ for the machine's python3 (3.12), .whl39/ for the
# TensorRT harness's Python 3.9. Both folders are git-ignored and travel as `carry` paths.
#   bash scripts/fetch_device_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PLAT="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
fetch() {  # fetch PYVER LIST DEST
  local list
  list=$(grep -v '^#' "$2" | grep -v '^$')
  mkdir -p "$3"
  # shellcheck disable=SC2086
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$1" --implementation cp $PLAT -d "$3" $list
}
fetch 3.12 scripts/device-wheels-py312.txt .whl
fetch 3.9 scripts/device-wheels-py39.txt .whl39
du -sh .whl .whl39
