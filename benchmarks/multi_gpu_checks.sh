#!/usr/bin/env bash
# Multi-GPU correctness and end-to-end checks for torchrun runs (issue #18 items 3-4, issue #14 item 7),
# on a machine with >= 2 GPUs, after benchmarks/h200.sh has unpacked vLLM (run through it):
#
#   bash benchmarks/h200.sh -c 'import subprocess,sys; sys.exit(subprocess.call(["bash","benchmarks/multi_gpu_checks.sh"]))'
#
# Arguments pick sections (default: all): equality sft grpo pytest; SFT_RANKS / GRPO_RANKS pick the
# torchrun sizes (default "2 1"), PLAIN=0 skips the plain-command runs.
#
# 1. NCCL equality: N-rank vs 1-rank adapters (benchmarks/dp_equality.py, bf16 with its bound, fp32 at 1e-6).
# 2. The data-parallel / tensor-parallel test file on NCCL (tests/test_data_parallel.py).
# 3. vllm-train sft and grpo under torchrun on 2 GPUs on the toy world (accuracy before -> after).
# 4. torchrun --nproc-per-node 1 vs the plain command (same numbers, within noise).
# Logs go to $OUT (or ./multi-gpu-logs).
set -uo pipefail
LOGS=${OUT:-multi-gpu-logs}
mkdir -p "$LOGS"
M=vllm_train/assets/tiny-llama
D=vllm_train/assets/data
TORCHRUN="python3 -m torch.distributed.run --standalone"
# the demo's SFT settings; global batch 32 in every run (16 per rank on 2 GPUs)
SFT_FLAGS="--data $D/sft_train.jsonl --eval-data $D/sft_eval.jsonl --max-steps 300 --rank 8 --alpha 16
  --learning-rate 3e-3 --gradient-accumulation-steps 1 --warmup-ratio 0.05 --max-length 64 --no-progress
  --target-modules q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
GRPO_FLAGS="--prompts $D/rl_train.jsonl --eval-prompts $D/rl_eval.jsonl --reward vllm_train.toy:correctness_reward
  --num-steps 20 --rank 8 --learning-rate 2e-3 --batch-size 128 --max-new-tokens 8 --rollout-batch-size 16
  --group-size 8 --warmup-ratio 0 --lr-scheduler constant --no-progress
  --target-modules q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
SECTIONS=${*:-equality sft grpo pytest}
want_plain() { [ "${PLAIN:-1}" = 1 ]; }
want() { [[ " $SECTIONS " == *" $1 "* ]]; }
step() { echo "== $1"; shift; local t0=$SECONDS; "$@"; echo "   (exit $?, $((SECONDS - t0)) s)"; }

if want equality; then
  step "dp_equality bf16" python3 benchmarks/dp_equality.py --ranks 2 --precision bf16 2>&1 | tail -6
  step "dp_equality fp32" python3 benchmarks/dp_equality.py --ranks 2 --precision fp32 2>&1 | tail -6
  cp benchmarks/results/dp_equality_*_cuda.json "$LOGS"/ 2>/dev/null
fi

if want sft; then
  for n in ${SFT_RANKS:-2 1}; do
    step "sft torchrun x$n" $TORCHRUN --nproc-per-node $n -m vllm_train sft --model $M $SFT_FLAGS \
      --batch-size $((32 / n)) --output-dir /tmp/sft-x$n > "$LOGS/sft-x$n.log" 2>&1
    tail -3 "$LOGS/sft-x$n.log"
    python3 -m vllm_train eval --model $M --adapter /tmp/sft-x$n --data $D/sft_eval.jsonl 2>&1 | tail -6
  done
  want_plain && step "sft plain" python3 -m vllm_train sft --model $M $SFT_FLAGS --batch-size 32 --output-dir /tmp/sft-plain > "$LOGS/sft-plain.log" 2>&1
  want_plain && tail -3 "$LOGS/sft-plain.log"
fi

if want grpo; then
  for n in ${GRPO_RANKS:-2 1}; do
    step "grpo torchrun x$n" $TORCHRUN --nproc-per-node $n -m vllm_train grpo --model $M $GRPO_FLAGS \
      --output-dir /tmp/grpo-x$n > "$LOGS/grpo-x$n.log" 2>&1
    grep -A3 "adapter written" "$LOGS/grpo-x$n.log"
  done
  want_plain && step "grpo plain" python3 -m vllm_train grpo --model $M $GRPO_FLAGS --output-dir /tmp/grpo-plain > "$LOGS/grpo-plain.log" 2>&1
  want_plain && grep -A3 "adapter written" "$LOGS/grpo-plain.log"
fi
for d in sft-x2 sft-x1 sft-plain grpo-x2 grpo-x1 grpo-plain; do
  [ -f /tmp/$d/metrics.jsonl ] && cp /tmp/$d/metrics.jsonl "$LOGS/metrics-$d.jsonl"
done


if want pytest; then
  step "tests/test_data_parallel.py on NCCL" python3 -m pytest -q -s -x tests/test_data_parallel.py -k "not killed" \
    > "$LOGS/pytest-data-parallel.log" 2>&1
  grep -E "max \||dlogp|eval greedy|passed|failed|skipped|Error" "$LOGS/pytest-data-parallel.log" | tail -20
fi
