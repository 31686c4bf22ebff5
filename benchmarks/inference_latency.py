"""vLLM vs Hugging Face `generate`: same model, same prompts (token ids), same batch and lengths.

Both greedy, every sequence forced to exactly --new-tokens tokens (vLLM `ignore_eos`, HF
`min_new_tokens`), timed --repeats times after one warm-up each; the median counts. Two settings:
the base model, and the base + a rank-8 LoRA adapter on all linear layers (vLLM LoRARequest vs PEFT).

  python benchmarks/inference_latency.py                       # CPU: the shipped tiny model
  python benchmarks/inference_latency.py --model qwen2-small --batch 16 --prompt-len 64 --new-tokens 64
Prints a ratio table; writes JSON to benchmarks/results/inference_latency.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adapter_sync import ALL_LINEAR, SHAPES, build_model_dir  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def random_adapter(model_dir: str, out: Path, rank: int) -> Path:
    """A PEFT-format adapter with non-zero random A and B (so LoRA really runs)."""
    import torch
    from transformers import AutoModelForCausalLM

    from vllm_train.config import LoRATrainConfig
    from vllm_train.lora.injector import LoRAInjector

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    injector = LoRAInjector(LoRATrainConfig(rank=rank, alpha=2 * rank, target_modules=ALL_LINEAR))
    injector.inject(model)
    with torch.no_grad():
        for lora in injector.lora_layers.values():
            lora.lora_b.normal_(0, 0.01)
    return injector.save(out, model_dir)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", choices=["tiny", *SHAPES])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "inference_latency.json"))
    args = parser.parse_args()

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    dtype = "bfloat16" if cuda else "float32"
    model_dir = build_model_dir(args.model, dtype)
    tmp = Path(tempfile.mkdtemp(prefix="bench-infer-"))
    adapter_dir = random_adapter(model_dir, tmp / "adapter", 8)
    g = torch.Generator().manual_seed(0)
    vocab = AutoModelForCausalLM.from_pretrained(model_dir).config.vocab_size
    prompts = torch.randint(10, vocab, (args.batch, args.prompt_len), generator=g)
    new_tokens = args.batch * args.new_tokens
    rows = []

    # --- Hugging Face generate (base, then PEFT) ---
    device = "cuda" if cuda else "cpu"
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
    ids = prompts.to(device)

    def hf_generate(model):
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=0)
        assert out.shape[1] == args.prompt_len + args.new_tokens

    hf_base_s = timed(lambda: hf_generate(hf), args.repeats)
    peft_model = PeftModel.from_pretrained(hf, adapter_dir).eval()
    hf_lora_s = timed(lambda: hf_generate(peft_model), args.repeats)

    # --- vLLM (one engine, LoRA enabled; base requests carry no adapter) ---
    from vllm_train.engine.llm import EngineOptions, VLLMEngine

    engine = VLLMEngine(model_dir, EngineOptions(max_lora_rank=8, max_loras=1, max_model_len=
                                                 args.prompt_len + args.new_tokens + 8))
    adapter = engine.load_adapter(adapter_dir, family="bench")
    sampling = {"max_tokens": args.new_tokens, "temperature": 0.0, "ignore_eos": True}
    token_prompts = [p.tolist() for p in prompts]

    def vllm_generate(ref):
        outs = engine.generate_raw(token_prompts, sampling, ref)
        assert all(len(o.outputs[0].token_ids) == args.new_tokens for o in outs)

    vllm_base_s = timed(lambda: vllm_generate(None), args.repeats)
    vllm_lora_s = timed(lambda: vllm_generate(adapter), args.repeats)

    for setting, hf_s, vl_s in (("base", hf_base_s, vllm_base_s), ("lora r8", hf_lora_s, vllm_lora_s)):
        rows.append({"setting": setting, "hf_s": hf_s, "vllm_s": vl_s, "hf_tok_s": new_tokens / hf_s,
                     "vllm_tok_s": new_tokens / vl_s, "speedup": hf_s / vl_s})
    import vllm

    result = {"benchmark": "inference_latency", "device": "cuda" if cuda else "cpu", "model": args.model,
              "vllm": vllm.__version__, "torch": torch.__version__, "batch": args.batch,
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats, "rows": rows}
    print(f"\ninference: {args.model}, batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"{result['device']}")
    print(f"{'setting':10s} {'HF tok/s':>10s} {'vLLM tok/s':>11s} {'vLLM/HF':>8s}")
    for r in rows:
        print(f"{r['setting']:10s} {r['hf_tok_s']:10.0f} {r['vllm_tok_s']:11.0f} {r['speedup']:7.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
