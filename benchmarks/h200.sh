#!/usr/bin/env bash
# Run GPU benchmarks on the lent H200 (see ../shared/gpu/README.md), after the packed vLLM 0.26 parts
# have been carried to /tmp/parts/ and, optionally, .gpu/trl-site.tar.xz (TRL 1.16 + datasets, the
# baseline) to /tmp/parts/trl-site.tar.xz. Unpacks once per machine; results land in $OUT (if set).
#
#   bash benchmarks/h200.sh benchmarks/grpo_step.py --preset qwen2-0.5b
set -euo pipefail
if [ ! -d /tmp/site/vllm ]; then
  mkdir -p /tmp/site
  cat /tmp/parts/vllm-site.tar.xz.part-* | xz -d -T0 | tar -x -C /tmp/site
fi
if [ -f /tmp/parts/trl-site.tar.xz ] && [ ! -d /tmp/site/trl ]; then
  xz -d -T0 < /tmp/parts/trl-site.tar.xz | tar -x -C /tmp/site
fi
export PYTHONPATH=/tmp/site:$PWD VLLM_USE_FLASHINFER_SAMPLER=0
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
python "$@"
if [ -n "${OUT:-}" ]; then cp benchmarks/results/*cuda*.json "$OUT"/ 2>/dev/null || true; fi
