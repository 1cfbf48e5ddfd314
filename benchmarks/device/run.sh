#!/usr/bin/env bash
# One device check for the kernels: correctness against the torch references, then
# torch vs Triton timings with measured ceilings (HBM copy, bf16 matmul), for
#   exit_confidence: d=4096, V=128256, bf16, n=16 and n=256 (+ gate, + a tile sweep)
#   compact:         d=4096, bf16, n=16, 256, 4096
# Budget: < 5 minutes on one H200. Results (text + JSON) go to $OUT.
#
# The device image has torch and Triton but no vLLM and no install of this project,
# so `vllm_e3.kernels` is served from a temporary `vllm_e3` shim package whose
# `kernels` is a link to this checkout's kernels/ (relative imports keep working).
# Run from the repository root:  bash benchmarks/device/run.sh
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-$(mktemp -d)}"; echo "results: $OUT"
mkdir -p "$OUT"

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "run.sh: no CUDA device visible to torch; this script needs a GPU." \
         "On CPU run benchmarks/bench_exit_confidence.py and benchmarks/bench_compact.py." | tee "$OUT/NO_CUDA.txt"
    exit 2
fi

SHIM="$(mktemp -d)"
trap 'rm -rf "$SHIM"' EXIT
mkdir -p "$SHIM/vllm_e3"
: > "$SHIM/vllm_e3/__init__.py"
ln -s "$REPO/kernels" "$SHIM/vllm_e3/kernels"
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET VLLM_E3_KERNELS

{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv || true
  "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/env.txt"

status=0
# Scripts run by path (not -m), so the repo's own vllm_e3/ never shadows the shim.
timeout 200 "$PYTHON" "$REPO/benchmarks/bench_exit_confidence.py" --device cuda --check --sweep \
    --json "$OUT/exit_confidence.json" 2>&1 | tee "$OUT/exit_confidence.txt"
rc=${PIPESTATUS[0]}; [ "$rc" -ne 0 ] && { echo "exit_confidence: rc=$rc" | tee -a "$OUT/errors.txt"; status=1; }

timeout 70 "$PYTHON" "$REPO/benchmarks/bench_compact.py" --device cuda --check \
    --json "$OUT/compact.json" 2>&1 | tee "$OUT/compact.txt"
rc=${PIPESTATUS[0]}; [ "$rc" -ne 0 ] && { echo "compact: rc=$rc" | tee -a "$OUT/errors.txt"; status=1; }

exit $status
