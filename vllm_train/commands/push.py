"""`vllm-train push`: publish a new version of a LoRA adapter to running vLLM OpenAI servers."""

from __future__ import annotations

import argparse
import math
import sys

from vllm_train.config import MAX_DELTA_RATIO

DESCRIPTION = """\
Publish a PEFT adapter directory to every replica of a running vLLM OpenAI server (started by
`vllm-train serve`, or any vLLM server with VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 and --enable-lora) as a
new version NAME-vN, and print that served name.

Before any replica is touched the directory is validated, by value: config sane (rank, finite alpha,
target modules), tensors floating point and finite, shapes those of the base model the servers serve,
rank within the servers' --max-lora-rank, each module's update (scaling * B A) at most --max-delta-ratio
times the norm of the base weight it adds to; and every replica must serve only versions of NAME that
this publisher loaded for these --server URLs. The files are copied to this server group's immutable staging
directory (under --stage-dir; the servers must be able to read it), loaded on the first replica, then
on the others, each replica answering a short greedy completion through it with finite log-probs (a
canary); then NAME (the stable alias clients may query) points at the new version. If any replica
fails, the new version is unloaded from those that loaded it and the previous version keeps serving;
the exit status is then non-zero. After success, versions older than the --keep newest are unloaded,
and every replica is checked to serve exactly the expected versions. Names are never reused for new
weights (vLLM's prefix cache is keyed by the adapter name).
"""

EXAMPLE = """\
example:
  vllm-train push --server http://127.0.0.1:8000,http://127.0.0.1:8001 --adapter runs/sft --name sft
  # -> sft-v2 ; then: client.completions.create(model="sft", ...)   (or model="sft-v2")
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("push", help="publish an adapter version to running vLLM servers",
                       description=DESCRIPTION, epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", required=True, metavar="URL[,URL...]",
                   help="base URL of each replica, e.g. http://127.0.0.1:8000 (a trailing /v1 is fine)")
    p.add_argument("--adapter", required=True, metavar="DIR", help="PEFT adapter directory, or a hub id ORG/NAME")
    p.add_argument("--name", required=True, help="adapter name; versions are served as NAME-v1, NAME-v2, ...")
    p.add_argument("--keep", type=int, default=2, metavar="N",
                   help="versions of NAME that stay loaded, the new one included (default: 2)")
    p.add_argument("--max-lora-rank", type=int, metavar="R", help="the servers' max LoRA rank (default: what "
                   "`vllm-train serve` recorded; otherwise vLLM checks it while loading)")
    p.add_argument("--stage-dir", metavar="DIR", help="where versions are copied (one subdirectory per server "
                   "group); yours, not writable by others, readable by the servers (default: $VLLM_TRAIN_STAGE_DIR "
                   "or /dev/shm/vllm-train-adapters-UID)")
    p.add_argument("--api-key", metavar="KEY", help="the servers' API key (default: $VLLM_TRAIN_API_KEY; prefer "
                   "the variable, command lines are visible to local users)")
    p.add_argument("--max-delta-ratio", type=float, default=MAX_DELTA_RATIO, metavar="R",
                   help="refuse an adapter whose update of a module is more than R times the base weight's norm "
                        f"(default: {MAX_DELTA_RATIO:g}; inf: no magnitude check, the canary still runs)")
    p.add_argument("--timeout", type=float, default=120, metavar="S", help="per HTTP call (default: 120)")
    p.add_argument("--verbose", action="store_true", help="also print timings and unloaded versions (stderr)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from vllm_train import hub
    from vllm_train.engine.publish import AdapterPublisher
    from vllm_train.errors import VllmTrainError
    from vllm_train.lora.validate import validate_adapter

    if not (math.isfinite(args.timeout) and args.timeout > 0):  # nan/inf/0 would fail or hang inside the HTTP client
        raise VllmTrainError(f"--timeout: {args.timeout} is invalid (a finite number of seconds > 0)")
    validate_adapter(args.adapter)  # the files first (against the served base once the servers answer)
    publisher = AdapterPublisher(args.server, keep=args.keep, max_lora_rank=args.max_lora_rank,
                                 stage_dir=args.stage_dir, timeout=args.timeout, api_key=args.api_key,
                                 max_delta_ratio=args.max_delta_ratio)
    result = publisher.publish_detailed(hub.resolve(args.adapter, what="--adapter"), args.name)
    print(result.served_name, flush=True)
    if args.verbose:
        timings = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in result.timings.items())
        print(f"published on {len(result.urls)} replica(s): {timings}; unloaded: "
              f"{', '.join(result.unloaded) or 'none'}", file=sys.stderr)
    return 0
