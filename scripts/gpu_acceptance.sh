#!/usr/bin/env bash
# The GPU acceptance run of issue #21, in one go (about 7 minutes on an H100/H200):
#   1. unpack the bundle `cargo xtask gpu-bundle` made (one stripped, xz-compressed vllm-server
#      built with --features cuda) and point the loader at the CUDA 13 libraries of the
#      machine's PyTorch;
#   2. `vllm-server gpu-check`: kernels against the naive reference (f32/f16/bf16, every head
#      size, GQA, windows, soft-cap), block copies and device sampling against the CPU, every
#      fixture through the engine against transformers (f32 greedy identical, bf16 within
#      bounds), CUDA graphs against eager steps, n = 2, prefix caching, chunked prefill;
#   3. a random-weight bf16 Llama of 8B shape made here with PyTorch (scripts/make_random_llama.py),
#      1,000 prompts of 256 in / 256 out offline (gpu-check --only bench) and through the server
#      (scripts/throughput_client.py).
# Everything lands in $OUT (default /tmp/gpu-acceptance): report.json, bench.json,
# server_throughput.json, the logs. Exits non-zero if a check failed.
#
# Rehearsal without a GPU: `scripts/gpu_acceptance.sh --cpu` runs every step on the CPU with a
# tiny model and 16 prompts of 32 / 32 (the bundle's CPU half runs against the link stub).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-acceptance}
mkdir -p "$OUT"
DEVICE=cuda SHAPE=${SHAPE:-8b} PROMPTS=${PROMPTS:-1000} IN_LEN=${IN_LEN:-256} OUT_LEN=${OUT_LEN:-256}
CONCURRENCY=${CONCURRENCY:-256}
if [ "${1:-}" = "--cpu" ]; then
  DEVICE=cpu SHAPE=tiny PROMPTS=16 IN_LEN=32 OUT_LEN=32 CONCURRENCY=8
fi
say() { echo "gpu_acceptance: $*" | tee -a "$OUT/summary.txt"; }
failed=0
step() { # name, then the command: runs it with its output in $OUT/<name>.log
  local name=$1; shift
  local t0=$SECONDS
  say "$name: $*"
  if "$@" >"$OUT/$name.log" 2>&1; then say "$name: ok ($((SECONDS - t0)) s)"; else
    say "$name: FAILED ($((SECONDS - t0)) s), last lines:"; tail -20 "$OUT/$name.log" | tee -a "$OUT/summary.txt"; failed=1; fi
  grep -E '^(PASS|FAIL) ' "$OUT/$name.log" >>"$OUT/checks.txt" 2>/dev/null || true
}

# 1. The binary and its libraries.
BUNDLE=${BUNDLE:-target/gpu-bundle/vllm-server.xz}
BIN="$OUT/vllm-server"
if [ -f "$BUNDLE" ]; then
  python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$BUNDLE" "$BIN"
  chmod +x "$BIN"
elif [ -x target/release/vllm-server ] && [ "$DEVICE" = cpu ]; then
  BIN=target/release/vllm-server
else
  say "no bundle at $BUNDLE (make it with: cargo xtask gpu-bundle)"; exit 2
fi
if [ "$DEVICE" = cpu ]; then
  # The CUDA binary's CPU half, here: the toolkit's libraries and the driver link stub.
  TK=${VLLM_RS_CACHE:-$HOME/.cache/vllm-rs}/cuda13/nvidia/cu13/lib
  [ -d "$TK" ] && export LD_LIBRARY_PATH="$TK:$TK/stubs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
if [ "$DEVICE" = cuda ]; then
  LIBS=$(python3 - <<'PY'
import glob, os
dirs = set()
try:
    import nvidia
    for base in nvidia.__path__:
        for lib in glob.glob(os.path.join(base, "**", "lib*.so*"), recursive=True):
            dirs.add(os.path.dirname(lib))
except ImportError:
    pass
for d in ["/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib"]:
    if os.path.isdir(d):
        dirs.add(d)
print(":".join(sorted(dirs)))
PY
)
  export LD_LIBRARY_PATH="$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$OUT/gpu.txt" 2>&1 || true
  say "GPU: $(cat "$OUT/gpu.txt")"
fi
say "binary: $("$BIN" --version 2>&1)"

# 2. Correctness.
step checks "$BIN" gpu-check --device "$DEVICE" --fixtures fixtures/models --only kernels,fixtures,engine \
  --report "$OUT/report.json"

# 3. Throughput on a random-weight Llama.
MODEL="$OUT/llama-$SHAPE"
if [ ! -f "$MODEL/model.safetensors" ]; then
  step make_model python3 scripts/make_random_llama.py --shape "$SHAPE" --out "$MODEL"
fi
VOCAB=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['vocab_size'])" "$MODEL/config.json")
step bench "$BIN" gpu-check --device "$DEVICE" --only bench --bench-model "$MODEL" --bench-prompts "$PROMPTS" \
  --bench-input-len "$IN_LEN" --bench-output-len "$OUT_LEN" --report "$OUT/bench.json"

# The server: gpu-check leaves a tokenizer beside nothing, so serve a copy with one.
SERVED="$OUT/served-$SHAPE"
mkdir -p "$SERVED"
ln -sf "$(cd "$MODEL" && pwd)/config.json" "$SERVED/config.json"
ln -sf "$(cd "$MODEL" && pwd)/model.safetensors" "$SERVED/model.safetensors"
python3 - "$SERVED/tokenizer.json" "$VOCAB" <<'PY'
import json, sys
vocab = {f"t{i}": i for i in range(int(sys.argv[2]))}
json.dump({"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
           "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None, "decoder": None,
           "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}}, open(sys.argv[1], "w"))
PY
PORT=${PORT:-8765}
"$BIN" serve "$SERVED" --device "$DEVICE" --port "$PORT" --max-num-seqs "$CONCURRENCY" \
  --served-model-name bench --disable-log-requests >"$OUT/server.log" 2>&1 &
SERVER=$!
for _ in $(seq 1 600); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null 2>&1 && break
  kill -0 $SERVER 2>/dev/null || break
  sleep 0.5
done
step server_throughput python3 scripts/throughput_client.py "http://127.0.0.1:$PORT" bench "$VOCAB" "$PROMPTS" \
  "$IN_LEN" "$OUT_LEN" "$CONCURRENCY"
kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null
tail -1 "$OUT/server_throughput.log" >"$OUT/server_throughput.json" 2>/dev/null || true

say "checks: $(grep -c '^PASS' "$OUT/checks.txt" 2>/dev/null || true) passed, $(grep -c '^FAIL' "$OUT/checks.txt" 2>/dev/null || true) failed"
[ -f "$OUT/bench.json" ] && say "offline: $(grep -E '^(PASS|FAIL) throughput' "$OUT/bench.log")"
say "server: $(cat "$OUT/server_throughput.json" 2>/dev/null)"
exit $failed
