#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks to build and run belljar: the belljar-worker user
# (workers run as it by default), cmake and libclang (llama.cpp's build and bindgen), python3-venv
# and python3-pip (the tests' venv, scripts/pyenv; the model fetcher, scripts/fetch-models).
# Idempotent: does nothing when all are present.
set -euo pipefail
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
# Workers run as belljar-worker by default (packaging/belljar.sysusers).
if ! id -u belljar-worker >/dev/null 2>&1; then
    echo "creating the user belljar-worker (packaging/belljar.sysusers)" >&2
    $sudo systemd-sysusers "$(dirname "$0")/../packaging/belljar.sysusers" 2>/dev/null \
        || $sudo useradd --system --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin --comment "belljar model worker" belljar-worker
fi
have_libclang() { compgen -G '/usr/lib/llvm-*/lib/libclang*.so*' >/dev/null || compgen -G '/usr/lib/x86_64-linux-gnu/libclang*.so*' >/dev/null; }
need=()
command -v cmake >/dev/null && have_libclang || need+=(cmake libclang-dev)
# The tests' Python venv (scripts/pyenv) needs ensurepip; scripts/fetch-models needs pip.
python3 -c 'import ensurepip' 2>/dev/null || need+=(python3-venv)
python3 -c 'import pip' 2>/dev/null || need+=(python3-pip)
if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi
echo "installing build dependencies: ${need[*]}" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
