#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks to build belljar: cmake and libclang (llama.cpp's
# build and bindgen). Idempotent: does nothing when both are present.
set -euo pipefail
have_libclang() { compgen -G '/usr/lib/llvm-*/lib/libclang*.so*' >/dev/null || compgen -G '/usr/lib/x86_64-linux-gnu/libclang*.so*' >/dev/null; }
if command -v cmake >/dev/null && have_libclang; then
    exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing build dependencies: cmake libclang-dev" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq cmake libclang-dev >/dev/null
