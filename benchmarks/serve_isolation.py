"""Does a push change what any other model on a `vllm-train serve` server answers? (issue #31)

One `vllm-train serve` replica on the shipped toy model (CPU: fp32; CUDA: bf16). Every weight set is first
fingerprinted alone (greedy tokens and log-probs of one chat prompt, nothing else in flight): the base
model and five random rank-8 adapters. Then C concurrent clients send N greedy requests -- every fifth to
the base model, the rest to the alias `live` -- while three new versions of `live` are pushed, and, last,
the huge-values adapter (lora_B x 1e30) is pushed twice: as is (refused by the magnitude check) and with
`--max-delta-ratio inf` (it reaches the server; the canary must refuse it). An answer is *mixed* when its
nearest fingerprint (same tokens, then the smallest mean |Δ log-prob|) is not that of the model the
response names.

    .venv/bin/python benchmarks/serve_isolation.py --requests 600              # CPU
    bash benchmarks/h200.sh benchmarks/serve_isolation.py --requests 8000      # GPU (vLLM 0.26)

Writes benchmarks/results/serve_isolation_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from adapter_cases import make_bad_adapter  # noqa: E402

from vllm_train.assets import TINY_MODEL  # noqa: E402

MESSAGES = [{"role": "user", "content": "What is 13 + 54?"}]
API_KEY = "bench-" + os.urandom(6).hex()
CLI = [sys.executable, "-m", "vllm_train.cli"]


def make_adapters(root: Path, count: int) -> list[Path]:
    import torch
    from transformers import AutoModelForCausalLM

    from vllm_train.config import LoRATrainConfig
    from vllm_train.lora.injector import LoRAInjector

    model = AutoModelForCausalLM.from_pretrained(str(TINY_MODEL))
    injector = LoRAInjector(LoRATrainConfig(rank=8, alpha=16))
    injector.inject(model)
    paths = []
    for seed in range(count):
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for lora in injector.lora_layers.values():
                lora.lora_a.copy_(torch.randn(lora.lora_a.shape, generator=gen) * 0.1)
                lora.lora_b.copy_(torch.randn(lora.lora_b.shape, generator=gen) * 0.5)
        paths.append(injector.save(root / f"w{seed}", str(TINY_MODEL)))
    return paths


def start_server(root: Path, env: dict) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(CLI + ["serve", "--model", str(TINY_MODEL), "--port", "0", "--max-lora-rank", "8",
                                   "--max-cpu-loras", "8", "--log-dir", str(root / "logs"), "--kv-cache-gib", "0.125",
                                   "--", "--max-num-seqs", "32"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    url = None
    for line in proc.stdout:
        print("serve:", line.rstrip(), flush=True)
        m = re.match(r"replica 0: (http://\S+)/v1", line)
        url = m[1] if m else url
        if line.startswith("ready in"):
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, url
    raise SystemExit("serve exited before it was ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--tag", default="", help="suffix of the result file's name")
    args = parser.parse_args()
    import torch
    from openai import OpenAI

    from vllm_train.engine.publish import AdapterPublisher

    device = "cuda" if torch.cuda.is_available() else "cpu"
    root = Path(tempfile.mkdtemp(prefix="serve-isolation-"))
    env = dict(os.environ, VLLM_TRAIN_API_KEY=API_KEY, VLLM_TRAIN_STAGE_DIR=str(root / "stage"), PYTHONUNBUFFERED="1")
    os.environ.update(VLLM_TRAIN_API_KEY=API_KEY, VLLM_TRAIN_STAGE_DIR=str(root / "stage"))
    weights = make_adapters(root, 5)
    huge = make_bad_adapter(weights[1], root / "huge", "huge_values")
    proc, url = start_server(root, env)
    client = OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=300)
    base = TINY_MODEL.name

    def ask(model: str) -> tuple[str, list[str] | None, list[float] | str]:
        """(the model the answer names, its tokens, their log-probs), or (model asked, None, the error)."""
        from openai import APIStatusError

        try:
            resp = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=6, temperature=0.0,
                                                  logprobs=True)
        except APIStatusError as exc:
            return model, None, f"HTTP {exc.status_code}: {exc.message}"[:200]
        content = resp.choices[0].logprobs.content
        return resp.model, [t.token for t in content], [t.logprob for t in content]

    try:
        publisher = AdapterPublisher([url], keep=1)
        fingerprints = {"base": ask(base)[1:]}
        for i, path in enumerate(weights):  # each weight set alone, then unloaded again
            served = publisher.publish(path, f"fp{i}")
            fingerprints[i] = ask(served)[1:]
            assert fingerprints[i][0] is not None, fingerprints[i]
            client.post("/unload_lora_adapter", body={"lora_name": served}, cast_to=object)
        content = {base: "base"}
        live = AdapterPublisher([url], keep=2)
        content[live.publish(weights[0], "live")] = 0
        answers: list[tuple[str, list[str], list[float]]] = []
        done = threading.Event()

        def one(k: int) -> None:
            answers.append(ask(base if k % 5 == 4 else "live"))

        def pusher() -> None:
            for j, w in enumerate((1, 2, 3)):
                while len(answers) < (j + 1) * args.requests // 5 and not done.is_set():
                    time.sleep(0.01)
                content[live.publish(weights[w], "live")] = w

        push_thread = threading.Thread(target=pusher)
        push_thread.start()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(one, range(args.requests)))
        elapsed = time.perf_counter() - t0
        done.set()
        push_thread.join()

        bad_pushes = {}
        during = []
        stop = threading.Event()

        def background() -> None:
            while not stop.is_set():
                during.append(ask(base))
                during.append(ask("live"))

        threads = [threading.Thread(target=background) for _ in range(4)]
        for t in threads:
            t.start()
        for label, extra in (("huge_values", []), ("huge_values_magnitude_check_off", ["--max-delta-ratio", "inf"])):
            res = subprocess.run(CLI + ["push", "--server", url, "--adapter", str(huge), "--name", "live", *extra],
                                 capture_output=True, text=True, env=env, timeout=300)
            bad_pushes[label] = {"exit": res.returncode, "stderr": res.stderr.strip()}
        stop.set()
        for t in threads:
            t.join()
        after = [ask(m) for m in (base, "live") for _ in range(5)]

        def nearest(tokens, lps):
            def distance(fp):  # differing tokens first (bf16 may flip one), then the mean log-prob gap
                differ = sum(a != b for a, b in zip(fp[0], tokens)) + abs(len(fp[0]) - len(tokens))
                return differ, sum(abs(a - b) for a, b in zip(fp[1], lps)) / max(1, min(len(lps), len(fp[1])))
            return min(fingerprints, key=lambda k: distance(fingerprints[k]))

        def mixed(group):  # answers carrying another model's weights
            return sum(toks is not None and nearest(toks, lps) != content.get(model, "?") for model, toks, lps in group)

        def errors(group):  # answers that are an HTTP error (e.g. 400 for non-finite log-probs)
            return sum(toks is None for _, toks, _ in group)

        per_model: dict[str, int] = {}
        for model, _, _ in answers:
            per_model[model] = per_model.get(model, 0) + 1
        result = {"device": device, "torch": torch.__version__, "requests": len(answers), "clients": args.clients,
                  "seconds": round(elapsed, 2), "answers_per_model": per_model,
                  "mixed_under_pushes": mixed(answers), "errors_under_pushes": errors(answers),
                  "bad_pushes": bad_pushes, "answers_during_bad_pushes": len(during),
                  "mixed_during_bad_pushes": mixed(during), "errors_during_bad_pushes": errors(during),
                  "mixed_after": mixed(after), "errors_after": errors(after),
                  "first_error": next((lps for _, toks, lps in answers + during + after if toks is None), None),
                  "fingerprints_distinct": len({json.dumps(v) for v in fingerprints.values()})}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
    print(json.dumps(result, indent=2))
    out = ROOT / "benchmarks" / "results" / f"serve_isolation_{device}{args.tag}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
