#!/usr/bin/env bash
# Run GPU benchmarks or tests on the lent H200 (see ../shared/gpu/README.md), after the packed vLLM 0.26
# parts have been carried to /tmp/parts/; TRL 1.16 and the packages it needs (the baseline) travel as
# wheels in a git-ignored .whl/ (carry it). Unpacks once per machine; results land in $OUT (if set).
#
#   bash benchmarks/h200.sh benchmarks/grpo_step.py --preset qwen2-0.5b
#   bash benchmarks/h200.sh -m pytest -q tests/test_rl.py
set -euo pipefail
if [ ! -d /tmp/site/vllm ]; then
  mkdir -p /tmp/site
  cat /tmp/parts/vllm-site.tar.xz.part-* | xz -d -T0 | tar -x -C /tmp/site
fi
if compgen -G ".whl/*.whl" > /dev/null && [ ! -d /tmp/site/trl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
started=$(mktemp)
status=0
python3 "$@" || status=$?
# only the results this run wrote (the committed ones would crowd what comes back out of $OUT)
if [ -n "${OUT:-}" ]; then find benchmarks/results -maxdepth 1 -name '*cuda*.json' -newer "$started" -exec cp {} "$OUT"/ \; ; fi
exit $status
