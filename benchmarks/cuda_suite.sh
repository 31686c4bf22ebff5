#!/usr/bin/env bash
# The test files that start vLLM, on the lent H200 (issue #15 item 6), through benchmarks/h200.sh (the packed
# vLLM 0.26 parts must be in /tmp/parts/, see ../shared/gpu/README.md). What each test compares on CUDA, and
# how closely, is decided in tests/tolerances.py (bf16 engines with LoRA against bf16 references; fp32 where
# the engine has no LoRA).
#
#   bash benchmarks/cuda_suite.sh                                  # the four default files
#   bash benchmarks/cuda_suite.sh tests/test_merge.py tests/test_trainable_engine.py
#   FILE_TIMEOUT=400 bash benchmarks/cuda_suite.sh tests/test_rl.py
#
# Each file is its own pytest (its own session engine) under `timeout` (FILE_TIMEOUT s, default 300), all of
# them within SUITE_BUDGET s (default 560, under the 10-minute call): a hanging file cannot eat the call, and
# files the budget no longer fits are listed as not run (run them in the next call; the machine stays warm).
# No -x: every failure is listed. Logs go to $OUT (or ./cuda-suite-logs): FILE.log per file and summary.txt,
# the short report: each file's exit status and time, its -rA result lines and pytest's last line. Exit
# status 1 when a file failed, timed out or did not run.
set -uo pipefail
LOGS=${OUT:-cuda-suite-logs}
mkdir -p "$LOGS"
FILE_TIMEOUT=${FILE_TIMEOUT:-300}
SUITE_BUDGET=${SUITE_BUDGET:-560}
FILES=("$@")
[ ${#FILES[@]} -gt 0 ] || FILES=(tests/test_vllm_serving.py tests/test_fast_sync.py tests/test_lora.py tests/test_rl.py)
SUMMARY="$LOGS/summary.txt"
failed=0

# unpack vLLM once per machine (outside the files' timeouts) and say what runs
bash benchmarks/h200.sh -c 'import torch, vllm; print("vllm", vllm.__version__, "torch", torch.__version__)' \
  > "$LOGS/setup.log" 2>&1 || { echo "setup failed:"; tail -20 "$LOGS/setup.log"; exit 1; }
tail -2 "$LOGS/setup.log" > "$SUMMARY"

for f in "${FILES[@]}"; do
  name=$(basename "$f" .py)
  left=$((SUITE_BUDGET - SECONDS))
  if [ "$left" -lt 60 ]; then
    echo "== $f: NOT RUN (${left} s of the suite budget left)" >> "$SUMMARY"
    failed=1
    continue
  fi
  limit=$((left < FILE_TIMEOUT ? left : FILE_TIMEOUT))
  t0=$SECONDS
  # timeout signals its whole process group: pytest and the vLLM processes the tests started
  timeout -k 10 "$limit" bash benchmarks/h200.sh -m pytest -q -rA "$f" > "$LOGS/$name.log" 2>&1
  rc=$?
  [ "$rc" -eq 0 ] || failed=1
  status="exit $rc"
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && status="TIMED OUT after ${limit} s"
  {
    echo "== $f: $status, $((SECONDS - t0)) s"
    grep -E "^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) " "$LOGS/$name.log" | cut -c1-400
    grep -E "(passed|failed|errors?|skipped|no tests ran).* in [0-9.]+s" "$LOGS/$name.log" | tail -1
  } >> "$SUMMARY"
done
cat "$SUMMARY"
exit "$failed"
