#!/usr/bin/env bash
# One-shot GPU check (bench/gpu_check.py) on a machine that may start bare: finds a Python whose torch sees a
# CUDA device, makes the project's dependencies importable there, then runs the check with these arguments.
#
#   bash bench/gpu_check.sh                  # < 8 min: outputs/gpu_check/gpu_check.json and gpu_check.md
#   bash bench/gpu_check.sh --budget-s 300   # any gpu_check.py option (python bench/gpu_check.py --help)
#   bash bench/gpu_check.sh --dry-run        # no GPU needed: tiny sizes on the CPU, the same code path
#
# Python, in this order: $PYTHON, $VENV/bin/python (VENV defaults to .venv, what `make install` makes), python3,
# python. A system Python with a CUDA torch gets a fresh $VENV made with --system-site-packages (its torch stays
# in use; pip installs only what is missing). Exit status: gpu_check.py's (0 all ran, 1 a section failed),
# 2 when no CUDA torch was found.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

check='import torch; assert torch.cuda.is_available()'
for arg in "$@"; do
    if [ "$arg" = --dry-run ]; then check='import torch'; fi
done
usable() { command -v "$1" >/dev/null 2>&1 && "$1" -c "$check" >/dev/null 2>&1; }

py=""
tried="${PYTHON:+$PYTHON }$VENV/bin/python python3 python"
for candidate in $tried; do
    if usable "$candidate"; then py=$candidate; break; fi
done
if [ -z "$py" ]; then
    cat >&2 <<EOF
error: no Python here has a torch that sees a CUDA device (tried: $tried).
Install a CUDA build of torch, then run this again, e.g.
    make install TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
(nvidia-smi shows the driver's CUDA version; pick the wheel index that fits it), or point PYTHON= at a Python
that has one. Without a GPU, \`bash bench/gpu_check.sh --dry-run\` checks the same code on the CPU.
EOF
    exit 2
fi

if [ "$py" != "${PYTHON:-}" ] && [ "$py" != "$VENV/bin/python" ]; then
    if [ -e "$VENV" ]; then
        echo "error: $VENV exists but its torch sees no CUDA device; remove it, or run with VENV=<new folder>" \
            "or PYTHON=$(command -v "$py")" >&2
        exit 2
    fi
    echo "gpu_check: making $VENV from $(command -v "$py") (its CUDA torch stays in use)"
    if "$py" -m venv --system-site-packages "$VENV"; then
        py="$VENV/bin/python"
    else  # e.g. no ensurepip (Debian's python3-venv missing): install into that Python itself
        rm -rf "$VENV"
        echo "gpu_check: no venv possible; using $(command -v "$py") as it is"
    fi
fi

needed="pytorch_lightning hydra omegaconf peft safetensors transformers webdataset yaml"
if ! "$py" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in sys.argv[1:]))" \
    $needed; then
    echo "gpu_check: installing the project into $("$py" -c 'import sys; print(sys.prefix)')"
    # [optim] brings bitsandbytes (8-bit AdamW); without it the check skips that variant and says why
    "$py" -m pip install -q -e ".[optim]" || "$py" -m pip install -q -e .
fi

exec "$py" bench/gpu_check.py "$@"
