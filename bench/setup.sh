#!/usr/bin/env bash
# Install what bench/run.py needs: wrk and nginx (Debian packages) and lumen-proxy itself.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
command -v taskset >/dev/null || missing+=(util-linux)
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    # another apt-get may hold the lock (e.g. a parallel install): wait for it rather than fail
    $sudo apt-get -o DPkg::Lock::Timeout=300 update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get -o DPkg::Lock::Timeout=300 install -y -qq "${missing[@]}"
fi

python=${PYTHON:-$(command -v python || command -v python3)}
if ! "$python" -c "import lumen_proxy, aiohttp, uvloop" 2>/dev/null; then
    "$python" -m pip install -q -e .
fi
echo "bench ready: wrk $(command -v wrk), nginx $(command -v nginx || echo /usr/sbin/nginx), $("$python" -m lumen_proxy --version)"
