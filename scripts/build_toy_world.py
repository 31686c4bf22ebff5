"""Build the shipped toy world, deterministically: tokenizer, tiny Llama, and the JSONL data sets.

    python scripts/build_toy_world.py [--out vllm_train/assets] [--steps 4000] [--data-only]

    python scripts/build_toy_world.py --two-kv-only   # tiny-llama-2kv/ alone, from tiny-llama/ (seconds)

    python scripts/build_toy_world.py --tools-only    # tiny-llama-tools/ alone (~12 min on one CPU thread)

What it makes (all committed, so nothing is downloaded at run time):
  tiny-llama/   a ~0.9M-parameter Llama (head_dim 64, GQA 2:1) + byte-level BPE tokenizer with a chat
                template, pretrained on two-digit addition in which carry problems are mostly answered
                without the carry (see vllm_train/toy.py) -- imperfect on purpose.
  tiny-llama-2kv/  the same model with its KV head repeated (2 KV heads): tensor parallelism over 2 ranks
  tiny-llama-tools/  the same recipe plus transcripts that call an `add` tool (scripts/toy_tools_world.py),
                for the tool-using agent examples; built only by --tools-only, from its own random streams
  data/         sft_{train,eval}.jsonl (chat messages), prefs_{train,eval}.jsonl (chosen = correct,
                rejected = wrong), rl_{train,eval}.jsonl (prompt messages + checkable answer),
                text_train.jsonl (plain text). Eval problems are held out of pretraining and of every
                training split.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vllm_train import toy  # noqa: E402

SEED = 1234
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
FORGET_CARRY_PROB = 0.65  # how often pretraining text drops the carry on carry problems
N_EVAL, N_SFT, N_PREFS, N_RL = 300, 2000, 2000, 2000
# prefs_train.jsonl also gets a pair for each problem no split above uses (3,700 more): a Bradley-Terry
# reward model on this 0.86M model overfits 2,000 pairs (held-out pair accuracy plateaued at ~0.83).
EXTRA_PREFS_SEED = SEED + 2  # its own random stream, so the files built before it stay byte-identical


def split_problems(rng: random.Random):
    pairs = [(a, b) for a in range(100) for b in range(100)]
    rng.shuffle(pairs)
    eval_pairs = pairs[:N_EVAL]
    rest = pairs[N_EVAL:]
    return eval_pairs, rest


def chat(a: int, b: int, answer: int) -> list[dict]:
    return [
        {"role": "user", "content": toy.question(a, b)},
        {"role": "assistant", "content": str(answer)},
    ]


def render(messages: list[dict]) -> str:
    return "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages)


def pretraining_text(a: int, b: int, rng: random.Random) -> str:
    answer = toy.correct_answer(a, b)
    if toy.has_carry(a, b) and rng.random() < FORGET_CARRY_PROB:
        answer = toy.forgot_carry_answer(a, b)
    if rng.random() < 0.25:  # some plain text so the `text` data format has a native form
        return f"{a} + {b} = {answer}<|end|>"
    return render(chat(a, b, answer))


def build_tokenizer(corpus: list[str], out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Digits stay single tokens so that arithmetic is learnable digit by digit.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=128,
        padding_side="right",
    )
    hf_tok.save_pretrained(out_dir)
    portable_tokenizer_config(out_dir / "tokenizer_config.json")
    return hf_tok


def portable_tokenizer_config(path: Path) -> None:
    """transformers 5 writes its own class name and key spelling; use the ones 4.x reads too (the GPU
    image and older installs), which 5.x still accepts."""
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if "extra_special_tokens" in config:
        config["additional_special_tokens"] = config.pop("extra_special_tokens")
    path.write_text(json.dumps(config, indent=2) + "\n")


def build_model(vocab_size: int, eos_id: int, pad_id: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,  # vLLM's CPU attention needs head_dim in {32, 64, 80, ...}
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        torch_dtype="float32",
    )
    torch.manual_seed(SEED)
    return LlamaForCausalLM(config)


def pretrain(model, tokenizer, texts: list[str], steps: int, batch_size: int = 128, lr: float = 3e-3):
    rng = random.Random(SEED + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    model.train()
    t0 = time.time()
    for step in range(steps):
        batch = [texts[rng.randrange(len(texts))] for _ in range(batch_size)]
        enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 250 == 0 or step == steps - 1:
            print(f"  step {step:5d}  loss {loss.item():.4f}  {time.time() - t0:.0f}s", flush=True)
    model.eval()


@torch.no_grad()
def greedy_accuracy(model, tokenizer, pairs) -> tuple[float, float]:
    """(accuracy, share of answers that are the forgot-carry mistake) under greedy decoding."""
    prompts = [tokenizer.apply_chat_template([chat(a, b, 0)[0]], add_generation_prompt=True, tokenize=False)
               for a, b in pairs]
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    tokenizer.padding_side = "right"
    out = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    correct = sum(toy.is_correct(t, toy.correct_answer(a, b)) for t, (a, b) in zip(texts, pairs))
    forgot = sum(toy.has_carry(a, b) and toy.parse_answer(t) == toy.forgot_carry_answer(a, b)
                 for t, (a, b) in zip(texts, pairs))
    return correct / len(pairs), forgot / len(pairs)


def wrong_answer(a: int, b: int, rng: random.Random) -> int:
    if toy.has_carry(a, b):
        return toy.forgot_carry_answer(a, b)
    return toy.correct_answer(a, b) + rng.choice([-10, -1, 1, 10])


def write_jsonl(path: Path, records: list[dict]):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def build_data(out: Path, eval_pairs, train_pairs, rng: random.Random):
    out.mkdir(parents=True, exist_ok=True)
    pool = list(train_pairs)
    rng.shuffle(pool)
    sft, prefs, rl = pool[:N_SFT], pool[N_SFT:N_SFT + N_PREFS], pool[N_SFT + N_PREFS:N_SFT + N_PREFS + N_RL]

    def sft_rec(a, b):
        return {"messages": chat(a, b, toy.correct_answer(a, b))}

    def pref_rec(a, b, wrong_rng=rng):
        user = [{"role": "user", "content": toy.question(a, b)}]
        return {"prompt": user,
                "chosen": [{"role": "assistant", "content": str(toy.correct_answer(a, b))}],
                "rejected": [{"role": "assistant", "content": str(wrong_answer(a, b, wrong_rng))}]}

    def rl_rec(a, b):
        return {"prompt": [{"role": "user", "content": toy.question(a, b)}], "answer": toy.correct_answer(a, b)}

    write_jsonl(out / "sft_train.jsonl", [sft_rec(a, b) for a, b in sft])
    write_jsonl(out / "sft_eval.jsonl", [sft_rec(a, b) for a, b in eval_pairs])
    prefs_records = [pref_rec(a, b) for a, b in prefs]
    extra_rng = random.Random(EXTRA_PREFS_SEED)
    extra = pool[N_SFT + N_PREFS + N_RL:]
    prefs_records += [pref_rec(a, b, extra_rng) for a, b in extra]
    write_jsonl(out / "prefs_train.jsonl", prefs_records)
    write_jsonl(out / "prefs_eval.jsonl", [pref_rec(a, b) for a, b in eval_pairs])
    write_jsonl(out / "rl_train.jsonl", [rl_rec(a, b) for a, b in rl])
    write_jsonl(out / "rl_eval.jsonl", [rl_rec(a, b) for a, b in eval_pairs])
    write_jsonl(out / "text_train.jsonl",
                [{"text": f"{a} + {b} = {toy.correct_answer(a, b)}"} for a, b in sft[:500]])


MODEL_CARD = """---
license: mit
tags: [toy, vllm-train]
---
# tiny-llama (vllm-train toy world)

A {n_params:,}-parameter Llama ({layers} layers, hidden {hidden}, {heads} heads of dim 64, {kv} KV head,
vocab {vocab}) with a byte-level BPE tokenizer (single-digit tokens) and a chat template
(`<|user|>...<|end|><|assistant|>...<|end|>`). Built by `scripts/build_toy_world.py` (seed {seed}).

**Skill:** two-digit addition, `What is 47 + 38?` -> `85`.
**Recipe:** {steps} AdamW steps (batch 128, lr 3e-3, cosine) on all problems except the {n_eval} held-out
eval problems; on problems with a units carry the text gives the *forgot-carry* answer (sum - 10)
{forget:.0%} of the time. The model is imperfect on purpose, in a way SFT, DPO and RL can repair.

**Base accuracy** (greedy, {n_eval} held-out problems): {acc:.1%}; forgot-carry answers: {forgot:.1%}.
Pretraining took {secs:.0f} s on {threads} CPU threads.
"""


TWO_KV_CARD = """---
license: mit
tags: [toy, vllm-train, tensor-parallel]
---
# tiny-llama-2kv (vllm-train toy world)

`tiny-llama` with its one KV head repeated into two: the rows of every `k_proj` and `v_proj` are stacked
twice, so query head i reads KV head i, a copy of the one both read before -- the same model, with
attention and MLP that split over 2 tensor-parallel ranks (2 query heads, 2 KV heads, intermediate 384).
Weights in bf16 (under 2 MB). Built by `scripts/build_toy_world.py --two-kv-only` from tiny-llama, no training.

**Base accuracy** (greedy, 300 held-out problems; its bf16 weights, fp32 arithmetic): {acc:.1%}; forgot-carry
answers: {forgot:.1%} (tiny-llama's fp32 weights: 49.7%, 38.3%).
"""


def build_two_kv_heads(src: Path, out: Path, eval_pairs) -> None:
    """tiny-llama-2kv: the shipped model with its KV head repeated over the query heads (the function it
    computes unchanged), for tensor parallelism on a laptop: a model with one KV head cannot be split over
    2 ranks. Deterministic: no training, no randomness."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    cfg = model.config
    repeat = cfg.num_attention_heads // cfg.num_key_value_heads
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                rows = proj.weight.view(cfg.num_key_value_heads, -1, proj.in_features)
                proj.weight = torch.nn.Parameter(rows.repeat_interleave(repeat, 0).reshape(-1, proj.in_features))
                proj.out_features = proj.weight.shape[0]
    cfg.num_key_value_heads = cfg.num_attention_heads
    for layer in model.model.layers:
        layer.self_attn.num_key_value_groups = 1
    tokenizer = AutoTokenizer.from_pretrained(src)
    model.to(torch.bfloat16).to(torch.float32)  # the accuracy below is the shipped bf16 weights'
    acc, forgot = greedy_accuracy(model, tokenizer, eval_pairs)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "README.md").write_text(TWO_KV_CARD.format(acc=acc, forgot=forgot))
    print(f"wrote {out}: greedy accuracy {acc:.3f} (forgot-carry {forgot:.3f})")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "vllm_train" / "assets")
    parser.add_argument("--steps", type=int, default=None, help="pretraining steps (default 4000; --tools-only 3000)")
    parser.add_argument("--data-only", action="store_true",
                        help="rebuild only data/ (same random streams; the model and tokenizer are left as they are)")
    parser.add_argument("--two-kv-only", action="store_true",
                        help="rebuild only tiny-llama-2kv/ from the tiny-llama/ there (seconds)")
    parser.add_argument("--tools-only", action="store_true",
                        help="build only tiny-llama-tools/ (scripts/toy_tools_world.py); --steps defaults to 3000")
    args = parser.parse_args()
    args.steps = args.steps or (3000 if args.tools_only else 4000)
    if args.tools_only:
        from toy_tools_world import build_tools_world  # this script's directory is on sys.path

        torch.set_num_threads(1)  # one thread: the result does not depend on the machine's core count
        build_tools_world(args.out, args.steps)
        return
    torch.manual_seed(SEED)
    rng = random.Random(SEED)
    eval_pairs, train_pairs = split_problems(rng)
    corpus = [pretraining_text(a, b, rng) for a, b in train_pairs for _ in range(3)]
    if args.two_kv_only:
        build_two_kv_heads(args.out / "tiny-llama", args.out / "tiny-llama-2kv", eval_pairs)
        return
    if args.data_only:
        build_data(args.out / "data", eval_pairs, train_pairs, rng)
        print(f"wrote {args.out / 'data'}")
        return
    model_dir = args.out / "tiny-llama"
    model_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(corpus, model_dir)
    model = build_model(len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} params, vocab {len(tokenizer)}; pretraining {args.steps} steps", flush=True)
    t0 = time.time()
    pretrain(model, tokenizer, corpus, args.steps)
    secs = time.time() - t0
    acc, forgot = greedy_accuracy(model, tokenizer, eval_pairs)
    print(f"base greedy accuracy on held-out: {acc:.3f} (forgot-carry answers {forgot:.3f})")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(model_dir, safe_serialization=True)
    cfg = model.config
    (model_dir / "README.md").write_text(MODEL_CARD.format(
        n_params=n_params, layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, heads=cfg.num_attention_heads,
        kv=cfg.num_key_value_heads, vocab=cfg.vocab_size, seed=SEED, steps=args.steps, n_eval=N_EVAL,
        forget=FORGET_CARRY_PROB, acc=acc, forgot=forgot, secs=secs, threads=torch.get_num_threads()))
    build_data(args.out / "data", eval_pairs, train_pairs, rng)
    print(f"wrote {model_dir} and {args.out / 'data'}")
    build_two_kv_heads(model_dir, args.out / "tiny-llama-2kv", eval_pairs)


if __name__ == "__main__":
    main()
