#!/usr/bin/env bash
# Build (or confirm) the project's virtual environment in .venv.
#
# Idempotent: a .venv whose stamp matches the current requirements is reused as is.
# A .venv is trusted only once its stamp is written, which is the last step; a failed or
# interrupted build is removed, so the next run starts over instead of using it.
#
# Python 3.12 is taken from $PYTHON, else `python3.12` on PATH, else pyenv's versions.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=.venv
STAMP="$VENV/.bridge-sft-stamp"
NEEDED_GB=${BRIDGE_SFT_VENV_MIN_GB:-12}  # free disk needed while installing

say() { printf '[venv] %s\n' "$*"; }
fail() { printf '[venv] ERROR: %s\n' "$*" >&2; exit 1; }

want=$(cat requirements/lock.txt requirements/no-deps.txt pyproject.toml tools/venv.sh | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c "import bridge_sft" 2>/dev/null; then
    say ".venv is up to date ($want)"
    exit 0
fi

find_python() {
    local candidates=()
    [ -n "${PYTHON:-}" ] && candidates+=("$PYTHON")
    command -v python3.12 >/dev/null 2>&1 && candidates+=("$(command -v python3.12)")
    local root
    root=$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")
    for p in "$root"/versions/3.12*/bin/python3.12; do [ -x "$p" ] && candidates+=("$p"); done
    for p in "${candidates[@]}"; do
        if "$p" -c 'import sys, venv, ensurepip; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
            echo "$p"
            return 0
        fi
    done
    return 1
}

PY=$(find_python) || fail "no Python 3.12 with venv and ensurepip found (tried \$PYTHON, python3.12 on PATH, \
pyenv's versions). Install one (e.g. 'pyenv install 3.12', or 'apt-get install python3.12 python3.12-venv'), \
or point PYTHON=/path/to/python3.12 at it, then run this again."

free_gb=$(df -Pk . | awk 'NR==2 {print int($4 / 1024 / 1024)}')
if [ "$free_gb" -lt "$NEEDED_GB" ]; then
    fail "only ${free_gb} GB free in $(pwd); the environment needs about ${NEEDED_GB} GB while it installs \
(torch with its CUDA libraries is ~6 GB). Free some space and run this again."
fi

if [ -d "$VENV" ]; then
    say "removing stale or incomplete .venv"
    rm -rf "$VENV"
fi

cleanup_on_failure() {
    local rc=$?
    if [ $rc -ne 0 ]; then
        rm -rf "$VENV"
        printf '[venv] ERROR: setting up .venv failed (step: %s). The partial .venv was removed.\n' "$step" >&2
        printf '[venv] Look at the pip output above (network, disk space, proxy), fix it and run again.\n' >&2
    fi
}
trap cleanup_on_failure EXIT

start=$(date +%s)
step="create venv with $PY"; say "$step"
"$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
step="upgrade pip"; say "$step"
"${pip[@]}" install -q --upgrade "pip>=24"
step="install pinned dependencies (requirements/lock.txt; torch is a large download)"; say "$step"
"${pip[@]}" install -q -r requirements/lock.txt
step="install megatron-core, megatron-bridge and test tokenizers without dependencies"; say "$step"
"${pip[@]}" install -q --no-deps -r requirements/no-deps.txt
step="install bridge-sft (editable)"; say "$step"
"${pip[@]}" install -q --no-deps --no-build-isolation -e .
step="check imports"; say "$step"
"$VENV/bin/python" -c "import torch, transformers, megatron.core, bridge_sft; print('[venv] torch', torch.__version__, '| transformers', transformers.__version__, '| megatron-core', megatron.core.__version__)"
echo "$want" > "$STAMP"
say "ready in $(( $(date +%s) - start )) s; size $(du -sh "$VENV" | cut -f1)"
