"""`vllm-train service`: a training service speaking the Tinker API (the `tinker` SDK runs against it
unmodified), many tenants' LoRA adapters on one base, each sampled through vLLM the moment it steps."""

from __future__ import annotations

import argparse
import os
import sys

from vllm_train.commands._common import add_config_args, add_model_args, config_from_args

DESCRIPTION = """\
Serve the Tinker API on one base model: clients create LoRA training runs, send forward_backward and
optim_step (AdamW), save weights for sampling (written into the run's vLLM LoRA slot in place, about a
millisecond), sample through vLLM, and save or load checkpoints (PEFT directories + optimizer state under
--state-dir). forward_backward requests of different runs that are queued together run as one batched pass
over a multi-adapter LoRA model. Point the SDK at it:

  tinker.ServiceClient(base_url="http://127.0.0.1:8000", api_key="tml-...")   (or $TINKER_BASE_URL /
  $TINKER_API_KEY) and use --model's text as base_model.

Security: listens on 127.0.0.1 only unless --host says otherwise. Each API key (--api-key, repeatable, or
$VLLM_TRAIN_API_KEY, comma-separated; the SDK sends only keys starting with 'tml-') is a tenant that sees
only its own runs, checkpoints and samplers. Without a key any 'tml-' key is accepted (each still sees only
its own runs), and a --host beyond loopback is refused.
"""

EXAMPLE = """\
example:
  export VLLM_TRAIN_API_KEY=tml-$(python -c 'import secrets; print(secrets.token_hex(16))')
  vllm-train service --model vllm_train/assets/tiny-llama --max-adapters 4 --state-dir runs/service
"""

API_KEY_ENV = "VLLM_TRAIN_API_KEY"


def register(sub: argparse._SubParsersAction) -> None:
    from vllm_train.service.config import ServiceConfig

    p = sub.add_parser("service", help="a Tinker-API training service: many LoRA tenants on one base, sampled by "
                       "vLLM", description=DESCRIPTION, epilog=EXAMPLE,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, chat_template=False)
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help=f"accept this key, a tenant of its own (repeatable; default: ${API_KEY_ENV}, comma-separated; "
                        "prefer the variable, command lines are visible to local users)")
    add_config_args(p, ServiceConfig, skip=("model", "api_keys", "extra_engine"))
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from vllm_train import hub
    from vllm_train.models import check_model_path
    from vllm_train.service.config import ServiceConfig
    from vllm_train.service.server import build_service, free_port, serve_forever

    keys = args.api_key or [k.strip() for k in os.environ.get(API_KEY_ENV, "").split(",") if k.strip()]
    config = config_from_args(args, ServiceConfig, fixed={"model": args.model, "api_keys": keys})
    check_model_path(args.model, args.revision)  # before anything loads: a broken model fails in one line
    hub.resolve(args.model, args.revision)
    if not config.api_keys:
        print(f"warning: no API key: any 'tml-' key is accepted (set ${API_KEY_ENV})", file=sys.stderr, flush=True)
    if config.port == 0:
        config.port = free_port(config.host)
    print(f"loading {args.model} (training copy{' and vLLM engine' if config.sampling else ''}) ...", flush=True)
    service = build_service(config)
    print(f"serving the Tinker API for {config.model!r} at http://{config.host}:{config.port} "
          f"(max {config.max_adapters} adapters, state dir {config.state_dir or 'none'}); Ctrl-C stops it",
          flush=True)
    serve_forever(service)
    return 0
