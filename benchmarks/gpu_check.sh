#!/usr/bin/env bash
# GPU check, for a machine with an NVIDIA GPU and no network. Serves the benchmark ResNet-18 with
# --providers cuda,cpu and prints served vs raw onnxruntime-CUDA throughput, with the CPU figures
# beside them. Needs: this checkout's .venv (or PYTHON), onnxruntime-gpu installed in it (the
# `gpu` extra of nnserve-server: pip install ./server[gpu], or a wheel carried to the machine),
# the CUDA runtime libraries onnxruntime-gpu was built for, and perf_analyzer if available
# (benchmarks/install_perf_analyzer.sh; else the SDK load generator is used).
# Usage: benchmarks/gpu_check.sh [SECONDS]   (default 10 per cell)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
SECONDS_PER_CELL=${1:-10}
OUT=${OUT:-.cache/gpu-check}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$PY" - <<'PY'
import onnxruntime as ort
print("onnxruntime", ort.__version__, "providers:", ort.get_available_providers())
if "CUDAExecutionProvider" not in ort.get_available_providers():
    raise SystemExit("onnxruntime has no CUDAExecutionProvider: install onnxruntime-gpu (pip install ./server[gpu])")
PY
"$PY" -m benchmarks.models --out .cache/bench-models >/dev/null
REPO="$OUT/repository"
rm -rf "$REPO"; mkdir -p "$REPO"; cp -r .cache/bench-models/bench-resnet18 "$REPO/"
MODEL_PATH="$REPO/bench-resnet18/1/model.onnx"

echo "== raw onnxruntime (in-process), batch 1 and 8"
"$PY" - "$MODEL_PATH" "$SECONDS_PER_CELL" <<'PY'
import sys, time
import numpy as np
import onnxruntime as ort
path, seconds = sys.argv[1], float(sys.argv[2])
for providers in (["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"]):
    session = ort.InferenceSession(path, providers=providers)
    for batch in (1, 8):
        x = {"input": np.random.rand(batch, 3, 224, 224).astype(np.float32)}
        for _ in range(5):
            session.run(None, x)
        runs, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds / 2:
            session.run(None, x)
            runs += 1
        rate = runs * batch / (time.perf_counter() - started)
        print(f"raw {providers[0]:24} batch {batch}: {rate:8.1f} images/s")
PY

serve() {  # serve PROVIDERS -> sets PORT and SERVER_PID
  "$PY" -m nnserve_server.process.cli serve --model-repository "$REPO" --port 0 --metrics-port -1 \
      --providers "$1" --log-level WARNING > "$OUT/server-$1.log" 2>&1 &
  SERVER_PID=$!
  for _ in $(seq 600); do grep -q "listening on" "$OUT/server-$1.log" && break; sleep 0.1; done
  PORT=$(grep -o 'listening on [0-9.]*:[0-9]*' "$OUT/server-$1.log" | cut -d: -f2)
  [ -n "$PORT" ] || { cat "$OUT/server-$1.log"; exit 1; }
}
PA=$(benchmarks/install_perf_analyzer.sh .cache/perf_analyzer 2>/dev/null | tail -n1 || true)
for providers in cuda,cpu cpu; do
  serve "$providers"
  for concurrency in 1 4 16; do
    if [ -n "$PA" ] && [ -x "$PA" ]; then
      printf "served %-9s perf_analyzer c=%-2s: " "$providers" "$concurrency"
      "$PA" -m bench-resnet18 -i grpc -u "127.0.0.1:$PORT" --concurrency-range "$concurrency" \
          -p $((SECONDS_PER_CELL * 500)) -s 100 --max-trials 4 2>&1 | grep -E "Throughput|p99" | tr -s ' ' | tr '\n' ' '
      echo
    else
      printf "served %-9s sdk c=%-2s: " "$providers" "$concurrency"
      "$PY" -m benchmarks.load sdk --target "127.0.0.1:$PORT" --model bench-resnet18 --model-path "$MODEL_PATH" \
          --concurrency "$concurrency" --seconds "$SECONDS_PER_CELL"
    fi
  done
  kill "$SERVER_PID"; wait "$SERVER_PID" || true
done
