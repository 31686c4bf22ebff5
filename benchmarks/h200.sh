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
python3 "$@"
if [ -n "${OUT:-}" ]; then cp benchmarks/results/*cuda*.json "$OUT"/ 2>/dev/null || true; fi
