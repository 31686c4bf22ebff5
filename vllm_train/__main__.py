"""`python -m vllm_train <command>`: the command line, also as torchrun's module
(``torchrun --nproc-per-node N -m vllm_train sft ...``)."""

import sys

from vllm_train.cli import main

sys.exit(main())
