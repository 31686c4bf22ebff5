"""`vllm-train serve`: vLLM OpenAI-compatible server replicas with runtime LoRA loading."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from vllm_train.commands._common import add_model_args

DESCRIPTION = """\
Start vLLM's OpenAI-compatible server (one or more replicas on consecutive ports) with runtime LoRA
loading enabled, wait until every replica answers /health, print the base URLs, and run until Ctrl-C or
SIGTERM; then stop every replica and its engine process (SIGTERM, SIGKILL after a grace period).

CPU-safe defaults: eager mode, fp32, a fixed KV cache (--kv-cache-gib); on GPU: bf16, CUDA graphs, one
GPU per replica when there are enough. --tensor-parallel-size K spans each replica over K GPUs (replica i
gets GPUs iK..iK+K-1; R replicas need R*K GPUs) or, on CPU, K ranks with cores of their own. Any other
vLLM api_server argument goes after a literal `--` and reaches every replica as is; the flags this command
sets itself (--port, --host, --model, --dtype, ...) are refused there: use this command's own.

Adapters given with --adapter are published as NAME-v1; publish new versions while the servers run with
`vllm-train push` (or `vllm-train sft --push-to URL`). Query with any OpenAI client: model = NAME (always
the newest published version; the answer names it), a version such as "sft-v3", or the base model's name.

Security: the servers listen on 127.0.0.1 only unless --host says otherwise. With an API key
(--api-key or, better, $VLLM_TRAIN_API_KEY: command lines are visible to every local user) every route
needs "Authorization: Bearer KEY", runtime LoRA loading included; without one, any local process can
load, unload and query adapters, and a --host beyond loopback is refused. Only `vllm-train push` (the
publisher) should load adapters: it refuses to publish next to versions it did not load. Answers carry
no absolute server paths.
"""

EXAMPLE = """\
example:
  vllm-train serve --model vllm_train/assets/tiny-llama --adapter sft=runs/sft --port 8000 --replicas 2
  vllm-train serve --model $M --replicas 2 --tensor-parallel-size 4 -- --enable-chunked-prefill --max-num-seqs 64
  vllm-train push --server http://127.0.0.1:8000,http://127.0.0.1:8001 --adapter runs/sft2 --name sft
  curl -H "Authorization: Bearer $VLLM_TRAIN_API_KEY" http://127.0.0.1:8000/v1/models
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run vLLM OpenAI server replicas with runtime LoRA loading",
                       description=DESCRIPTION, epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, chat_template=False)  # vLLM's own: -- --chat-template FILE
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="publish this PEFT adapter (a directory or a hub id) as NAME-v1 once the servers are up "
                   "(repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--api-key", metavar="KEY", help="require this key on every route (default: "
                   "$VLLM_TRAIN_API_KEY; prefer the variable, command lines are visible to local users)")
    p.add_argument("--port", type=int, default=8000,
                   help="port of replica 0; replica i uses port+i; 0 = any free ports (default: 8000)")
    p.add_argument("--replicas", type=int, default=1, metavar="R", help="server processes (default: 1)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, metavar="K",
                   help="GPUs (on CPU: ranks) each replica spans; R replicas need R*K GPUs (default: 1)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="weights and activations (default: auto = float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=None,
                   help="no CUDA graphs / torch.compile (default: eager on CPU and with --tensor-parallel-size > 1)")
    p.add_argument("--max-lora-rank", type=int, default=16, metavar="R",
                   help="largest adapter rank the servers accept: 1, 8, 16, 32, 64, ... (default: 16)")
    p.add_argument("--max-loras", type=int, default=2, help="different adapters in one batch (default: 2)")
    p.add_argument("--max-cpu-loras", type=int, default=4,
                   help="adapters cached per replica; keep >= push --keep + 1 (default: 4)")
    p.add_argument("--served-model-name", metavar="NAME", help="name of the base model in the API "
                   "(default: the hub id, or the model directory's name)")
    p.add_argument("--max-model-len", type=int, metavar="N", help="context length (default: the model's)")
    p.add_argument("--logprobs-mode", choices=["raw_logprobs", "processed_logprobs"],
                   help="log-probs the servers return: processed_logprobs = of the distribution sampled from, "
                        "after temperature and top-p (RL rollouts at --temperature != 1 need it; default: "
                        "vLLM's raw_logprobs)")
    p.add_argument("--kv-cache-gib", type=float, default=0.25, help="CPU only: KV cache per replica (default: 0.25)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85,
                   help="GPU only: memory share per GPU (default: 0.85)")
    p.add_argument("--log-dir", metavar="DIR", help="replica logs (default: a temporary directory)")
    p.add_argument("--startup-timeout", type=float, default=600, metavar="S",
                   help="seconds to wait for /health (default: 600)")
    p.add_argument("vllm_args", nargs="*", metavar="-- VLLM_ARG",
                   help="after a literal --: arguments for every replica's vLLM api_server, as is "
                        "(e.g. -- --enable-chunked-prefill --max-num-seqs 64)")
    p.set_defaults(run=run)


class _Stop(Exception):
    pass


def _raise_stop(signum, frame):  # SIGTERM -> leave the wait loop and clean up
    raise _Stop()


def watch_replicas(replicas) -> None:
    """Until every replica has exited: warn once, with its log's tail, for each one that exits."""
    from vllm_train.errors import VllmTrainError

    reported: set[int] = set()
    while True:
        for r in replicas:
            if not r.alive() and r.index not in reported:
                reported.add(r.index)
                print(f"warning: replica {r.index} ({r.url}) exited with code {r.process.returncode}; "
                      f"log tail: {r.log_tail(4)}", file=sys.stderr, flush=True)
        if len(reported) == len(replicas):
            raise VllmTrainError("every server replica has exited")
        time.sleep(0.5)


def run(args: argparse.Namespace) -> int:
    from vllm_train import hub
    from vllm_train.engine.gateway import API_KEY_ENV
    from vllm_train.engine.publish import AdapterPublisher
    from vllm_train.engine.replicas import ServerConfig, start_servers
    from vllm_train.errors import VllmTrainError
    from vllm_train.model_dir import check_model_dir
    from vllm_train.models import check_model_path

    check_model_path(args.model)  # before any replica starts: a broken model fails here, in one line
    check_model_dir(hub.resolve(args.model, args.revision))  # config vs weights, tokenizer, chat template
    adapters = []
    for item in args.adapter:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise VllmTrainError(f"--adapter {item!r}: expected NAME=DIR")
        adapters.append((name, hub.resolve(path, what="--adapter")))
    model = hub.resolve(args.model, args.revision)
    served_name = args.served_model_name or (args.model if hub.is_hub_id(args.model) else None)
    config = ServerConfig(model=model, host=args.host, port=args.port, replicas=args.replicas,
                          tensor_parallel_size=args.tensor_parallel_size, dtype=args.dtype,
                          enforce_eager=args.enforce_eager, extra_args=args.vllm_args,
                          max_lora_rank=args.max_lora_rank, max_loras=args.max_loras,
                          max_cpu_loras=args.max_cpu_loras, served_model_name=served_name,
                          max_model_len=args.max_model_len, logprobs_mode=args.logprobs_mode,
                          kv_cache_gib=args.kv_cache_gib,
                          gpu_memory_utilization=args.gpu_memory_utilization, log_dir=args.log_dir,
                          startup_timeout=args.startup_timeout, api_key=args.api_key or os.environ.get(API_KEY_ENV))
    if config.api_key is None:
        if not config.loopback:
            raise VllmTrainError(f"--host {config.host} without an API key would let anyone who reaches it load "
                                 f"adapters from this machine's disk: set ${API_KEY_ENV} (or --api-key)")
        print(f"warning: no API key: any local process can load, unload and query adapters (set ${API_KEY_ENV})",
              file=sys.stderr, flush=True)
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    group = None
    try:
        print(f"starting {config.replicas} vLLM server replica(s) for {args.model} ...", flush=True)
        t0 = time.perf_counter()
        group = start_servers(config)
        for r in group.replicas:
            print(f"replica {r.index}: {r.url}/v1  (pid {r.pid}, log {r.log_path})", flush=True)
        publisher = AdapterPublisher(group.urls, max_lora_rank=config.max_lora_rank, api_key=config.api_key)
        for name, path in adapters:
            print(f"adapter {name}: served as {publisher.publish(path, name)} (model '{name}': the newest version)",
                  flush=True)
        urls = ",".join(group.urls)
        print(f"ready in {time.perf_counter() - t0:.0f}s. Publish a version: vllm-train push --server {urls} "
              f"--adapter DIR --name NAME", flush=True)
        print("Ctrl-C or SIGTERM stops the servers.", flush=True)
        watch_replicas(group.replicas)
    except (KeyboardInterrupt, _Stop):
        print("stopping servers ...", flush=True)
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not cut the cleanup short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if group is not None:
            group.stop()
            print("servers stopped", flush=True)
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, signal.default_int_handler)
