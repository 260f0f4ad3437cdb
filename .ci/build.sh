#!/bin/sh
# .ci/build.sh [BUILD_DIR] [cmake options...] - installs what the build needs (Debian packages)
# if it is missing, then configures and builds flashmoe. Needs the CUDA toolkit (nvcc, NVRTC);
# needs no GPU.
set -eu
build=${1:-build}
[ $# -gt 0 ] && shift
need=""
for p in cmake make gcc liblua5.4-dev libsqlite3-dev; do
  dpkg -s "$p" >/dev/null 2>&1 || need="$need $p"
done
if [ -n "$need" ]; then
  echo "installing:$need"
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $need >/dev/null
fi
if ! command -v nvcc >/dev/null 2>&1 && [ -x /usr/local/cuda/bin/nvcc ]; then
  PATH=/usr/local/cuda/bin:$PATH
  export PATH
fi
if ! command -v nvcc >/dev/null 2>&1; then
  echo "the CUDA toolkit (nvcc, NVRTC) is required: install it under /usr/local/cuda" >&2
  exit 1
fi
cmake -S "$(dirname "$0")/.." -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo "$@" >/dev/null
cmake --build "$build" -j "$(nproc)"
