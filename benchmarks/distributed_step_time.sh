#!/usr/bin/env bash
# Time the quickstart recipe for 12 steps in 1 process (2 BLAS threads) and in 2 processes
# (ring backend on loopback, 1 BLAS thread each), and print the step lines of both.
# Usage: bash benchmarks/distributed_step_time.sh [OUTPUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-$(mktemp -d)}
mkdir -p "$OUT"
MLXLORA=${MLXLORA:-.venv/bin/mlxlora}
PYTHON=${PYTHON:-.venv/bin/python}
FLAGS=(--recipe recipes/quickstart.yaml --iters 12 --steps-per-report 4 --steps-per-eval 0
       --save-every 100 --overwrite)

echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
start=$(date +%s)
"$MLXLORA" train "${FLAGS[@]}" --adapter-path "$OUT/one" 2> "$OUT/one.log"
echo "1 process: $(( $(date +%s) - start )) s"

"$PYTHON" - "$OUT/hosts.json" <<'PY'
import json, socket, sys
sockets = [socket.socket() for _ in range(2)]
for s in sockets:
    s.bind(("127.0.0.1", 0))
json.dump([[f"127.0.0.1:{s.getsockname()[1]}"] for s in sockets], open(sys.argv[1], "w"))
for s in sockets:
    s.close()
PY

start=$(date +%s)
for rank in 0 1; do
    MLX_HOSTFILE="$OUT/hosts.json" MLX_RANK=$rank OPENBLAS_NUM_THREADS=1 \
        "$MLXLORA" train "${FLAGS[@]}" --adapter-path "$OUT/two" 2> "$OUT/two-$rank.log" &
done
wait
echo "2 processes: $(( $(date +%s) - start )) s"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
grep -h "train loss" "$OUT/one.log" "$OUT/two-0.log"
