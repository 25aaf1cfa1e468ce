#!/usr/bin/env bash
# One GPU session's measurements for benchmarks/RESULTS.md (## GPU), one command on one H100/H200:
#   bash benchmarks/gpu_side_by_side.sh              # everything below (estimated 20-25 minutes: not yet run)
#   PIECES="unpacked packed" bash benchmarks/gpu_side_by_side.sh   # a subset, to fit a session's device time
#   SMOKE=1 bash benchmarks/gpu_side_by_side.sh      # tiny shapes, any machine (CPU too): every piece runs
# Writes under ${OUT:-gpu_results}/: gpu.txt (card, versions, measured bf16 matmul peak), one
# <piece>.json (+ .err) per piece, and summary.txt (each piece's exit status and figures).
#   1 unpacked   HF PyTorch/PEFT vs jaxtune full + LoRA SFT, Llama-3.2-1B shape, batch 4 x 2048,
#                every row one full segment (cuDNN attention), attention cudnn and pallas_gpu
#   2 packed_*   packed SFT on realistic length spreads (benchmarks/packed_sft.py): jaxtune packed
#                (Pallas flash attention) vs jaxtune full rows (cuDNN) vs jaxtune padded vs HF
#                PyTorch padded vs TRL SFTTrainer packing (padding-free), full and LoRA, per real token
#   3 dpo_*      DPO per real token and per pair (benchmarks/dpo_side_by_side.py): jaxtune padded and
#                packed pairs vs TRL DPOTrainer (padded), same synthetic pairs and tokenizer, full and LoRA
#   4 grpo       jaxtune GRPO step (benchmarks/grpo_step.py, larger shape): rollout + learner tokens/s
#                and seconds per step (no MFU yet: grpo_step.py does not count FLOPs)
# Each framework runs in its own process (neither allocator starves the other). TRL is used when
# importable (the `bench` extra; carry its wheel onto an offline device: pip download trl --no-deps);
# otherwise its rows say "skipped". MFU is against --peak_tflops 989 (H100/H200 SXM bf16 dense
# datasheet) and against the matmul peak measured here.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
SMOKE=${SMOKE:-0}
PIECES=${PIECES:-unpacked packed dpo grpo}
wanted() { case " $PIECES " in *" $1 "*) return 0 ;; esac; return 1; }
LIMIT_SCALE=1
[ "$SMOKE" = 1 ] && LIMIT_SCALE=4  # smoke runs compile every mode on whatever CPU it is given
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-$PWD} HF_DATASETS_DISABLE_PROGRESS_BARS=1
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"

# piece NAME SECONDS CMD...: runs CMD with a time limit, stdout -> NAME.json, stderr -> NAME.err,
# and records its exit status and last JSON line in the summary (a failed piece never stops the rest).
piece() {
    local name=$1 limit=$(($2 * LIMIT_SCALE))
    shift 2
    echo "== $name: $*" | tee -a "$SUMMARY"
    timeout "$limit" "$@" >"$OUT/$name.json" 2>"$OUT/$name.err"
    local rc=$?
    echo "   exit $rc" | tee -a "$SUMMARY"
    grep '^{' "$OUT/$name.json" | tail -1 >>"$SUMMARY"
    [ "$rc" = 0 ] || tail -5 "$OUT/$name.err" | sed 's/^/   /' | tee -a "$SUMMARY"
}

python3 benchmarks/gpu_peak.py >"$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt" | tee -a "$SUMMARY"
PEAK=$(grep MEASURED_PEAK_TFLOPS "$OUT/gpu.txt" | awk '{print $2}')
PEAK=${PEAK:-0}

if [ "$SMOKE" = 1 ]; then
    MODEL=(--variant tiny --dtype float32)
    SHAPE_UNPACKED=(--batch 2 --seq_len 128 --steps 1 --repeats 1)
    PACKED=(--smoke)
    DPO=(--smoke)
    GRPO=(--shape quickstart --steps 3 --prompts 2 --generations 2 --completion 8 --batch 4)
    ATTN=blockwise
else
    MODEL=(--variant llama3.2-1b --no-quickstart_shape --dtype bfloat16)
    SHAPE_UNPACKED=(--batch 4 --seq_len 2048 --steps 5 --repeats 3)
    PACKED=(--variant llama3.2-1b --dtype bfloat16 --batch 8 --seq_len 2048 --steps 5 --repeats 3)
    DPO=(--variant llama3.2-1b --dtype bfloat16 --batch 8 --seq_len 1024 --steps 5 --repeats 3)
    GRPO=(--shape large --steps 6 --prompts 16 --generations 8 --completion 64 --batch 128)
    ATTN=cudnn,pallas_gpu
fi
PEAKS=(--peak_tflops 989 --measured_peak_tflops "$PEAK")

# 1: unpacked rows, the figures RESULTS.md already has, now with the Pallas kernel beside cuDNN
wanted unpacked && piece unpacked_torch 200 env JAX_PLATFORMS=cpu python3 benchmarks/train_step.py "${MODEL[@]}" "${SHAPE_UNPACKED[@]}" \
    --rank 8 --compare --modes torch_full,torch_lora "${PEAKS[@]}"
wanted unpacked && piece unpacked_jaxtune 330 python3 benchmarks/train_step.py "${MODEL[@]}" "${SHAPE_UNPACKED[@]}" \
    --rank 8 --compare --modes full,lora --attention "$ATTN" "${PEAKS[@]}"

# 2: packed SFT per real token, two length spreads, full and LoRA
wanted packed && for spread in hh_rlhf long_chat; do
    for peft in none lora; do
        piece "packed_${spread}_${peft}" 330 python3 benchmarks/packed_sft.py "${PACKED[@]}" --spread "$spread" \
            --peft "$peft" "${PEAKS[@]}"
        [ "$SMOKE" = 1 ] && break 2  # one packed piece covers every mode's code path
    done
done

# 3: DPO, jaxtune padded + packed vs TRL, full and LoRA
wanted dpo && for peft in none lora; do
    piece "dpo_${peft}" 400 python3 benchmarks/dpo_side_by_side.py "${DPO[@]}" --peft "$peft" "${PEAKS[@]}"
    [ "$SMOKE" = 1 ] && break
done

# 4: GRPO step
wanted grpo && piece grpo 300 python3 benchmarks/grpo_step.py "${GRPO[@]}"

echo "== done: $OUT" | tee -a "$SUMMARY"
