"""Tolerances the vLLM-vs-trainer tests share, by what the session's engine serves.

CPU (CI): the engine serves fp32, and served log-probs equal the trainer's/PEFT's to ~1e-6, so 1e-4 is
an exactness bound. CUDA: the engine serves bf16 (a bf16 mantissa has 8 bits), and the measured gaps on
the H200 were 4e-4 to 0.018 per token: 0.05 bounds bf16 noise while a stale or wrong adapter (gaps of
0.1 to 1 on these tests) still fails.
"""

import torch

SERVING_TOL = 0.05 if torch.cuda.is_available() else 1e-4
