#!/usr/bin/env bash
# One GPU session's measurements for benchmarks/RESULTS.md (## GPU): the card, a measured bf16
# matmul peak, then HF PyTorch/PEFT and jaxtune train steps on a Llama-3.2-1B-sized model
# (bf16 compute, float32 params and AdamW, seq 2048), each in its own process so neither
# framework's allocator starves the other. Writes everything under ${OUT:-.}/.
#   bash benchmarks/gpu_side_by_side.sh [batch] [seq_len] [attention list, e.g. cudnn,blockwise]
set -u
OUT=${OUT:-.}
B=${1:-4}
T=${2:-2048}
ATTN=${3:-}
export PYTHONUNBUFFERED=1
COMMON=(--variant llama3.2-1b --no-quickstart_shape --dtype bfloat16 --batch "$B" --seq_len "$T" --rank 8
        --steps 5 --repeats 3 --peak_tflops 989 --compare)
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 - <<'PY' | tee -a "$OUT/gpu.txt"
import torch, jax, flax, transformers, peft, optax
print("versions", dict(torch=torch.__version__, jax=jax.__version__, flax=flax.__version__,
      transformers=transformers.__version__, peft=peft.__version__, optax=optax.__version__))
a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
for _ in range(3): a @ b
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
times = []
for _ in range(10):
    start.record(); a @ b; end.record(); torch.cuda.synchronize(); times.append(start.elapsed_time(end) / 1e3)
times.sort()
print("MEASURED_PEAK_TFLOPS", round(2 * 8192**3 / times[len(times) // 2] / 1e12, 1))
PY
PEAK=$(grep MEASURED_PEAK_TFLOPS "$OUT/gpu.txt" | awk '{print $2}')
PEAK=${PEAK:-790}
echo "== torch" | tee "$OUT/torch.json"
JAX_PLATFORMS=cpu timeout 150 python3 benchmarks/train_step.py "${COMMON[@]}" --modes torch_full,torch_lora \
    --measured_peak_tflops "$PEAK" 2>"$OUT/torch.err" | tee -a "$OUT/torch.json"
tail -3 "$OUT/torch.err"
ATTN_ARGS=()
[ -n "$ATTN" ] && ATTN_ARGS=(--attention "$ATTN")
echo "== jaxtune" | tee "$OUT/jaxtune.json"
timeout 330 python3 benchmarks/train_step.py "${COMMON[@]}" --modes full,lora "${ATTN_ARGS[@]}" \
    --measured_peak_tflops "$PEAK" 2>"$OUT/jaxtune.err" | tee -a "$OUT/jaxtune.json"
tail -5 "$OUT/jaxtune.err"
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
rows = {}
for name in ("torch", "jaxtune"):
    for line in open(f"{out}/{name}.json"):
        if not line.startswith("{"):
            continue
        d = json.loads(line)
        for mode, row in d.items():
            if isinstance(row, dict) and "tokens_per_s" in row:
                rows[mode] = row
                print(f"{name:8s} {mode:22s} step {row['step_s']:.4f}s  {row['tokens_per_s']:>10.0f} tok/s  "
                      f"mfu(989) {row.get('mfu')}  mfu(measured) {row.get('mfu_measured')}  compile {row.get('compile_s')}")
for mode, row in rows.items():
    if not mode.startswith("torch"):
        ref = rows.get("torch_" + ("full" if mode.split("@")[0] == "full" else "lora"))
        if ref:
            print(f"ratio {mode} / torch: {row['tokens_per_s'] / ref['tokens_per_s']:.3f}")
PY
