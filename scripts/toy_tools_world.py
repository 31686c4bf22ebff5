"""The tool-using toy world: tiny-llama-tools/, a tiny Llama that knows a calculator tool's call format.

Built by ``python scripts/build_toy_world.py --tools-only`` (deterministic: its own random streams, so the
other assets and data files stay byte-identical). Same recipe as tiny-llama -- two-digit addition -- except
that an answer the model gives alone drops the units carry more often (90 %, not 65 %), plus transcripts
in which the assistant, offered an ``add`` tool, calls it in the Hermes format
(``<tool_call>{"name": "add", "arguments": {"a": 43, "b": 96}}</tool_call>``, what
vllm_train.agents.tool_calls' ``hermes`` parser reads), gets the sum back as a ``tool`` message and
answers with it. It calls the tool in a minority of answers only: RL has a better habit to find.

The chat template renders ``tools=`` as one short system line of tool names, not the JSON schemas:
the model's context is 128 positions, and a schema would take most of them. The tokenizer is
tiny-llama's kind (byte-level BPE, digits single tokens, the same special tokens plus ``<|tool|>``),
retrained with a larger vocabulary so that the call's fixed JSON costs a few tokens.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import build_toy_world as base  # the script this module extends (its directory is on sys.path)
import torch

from vllm_train import toy

TOOLS_SEED = 1234 + 10  # not any stream the other assets use
P_TOOLS_OFFERED = 0.7  # transcripts whose system line offers the tool (the others: plain chat, never a call)
P_CALL = 0.2  # of those, the share where the assistant calls it
# How often an answer given without the tool drops the units carry (tiny-llama's text: 65 %). At 65 % a
# first run of examples/agent_tools.py reached 97.7 % by learning the carry from its own lucky samples and
# called the tool in 3 % of episodes -- fine GRPO, but not the tool-use lesson this model is for; at 100 %
# the build (seed below) never learned the units digit either (6 % right without the tool). At 90 % a
# sampled answer on a carry problem is right about one time in ten, a call about one in five.
FORGET_CARRY_PROB = 0.9
TOOL_SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"]
# One line, so that the rendering has no stray whitespace. An assistant turn writes its content, then each
# call exactly as the model is taught to write it; arguments given as a JSON string are written as they are.
TOOLS_CHAT_TEMPLATE = (
    "{% if tools %}<|system|>tools:{% for tool in tools %} {{ (tool.function or tool).name }}{% endfor %}"
    "<|end|>{% endif %}"
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] or '' }}"
    "{% for call in message.tool_calls or [] %}{% set f = call.function or call %}"
    "<tool_call>{\"name\": \"{{ f.name }}\", \"arguments\": "
    "{% if f.arguments is string %}{{ f.arguments }}{% else %}{{ f.arguments | tojson }}{% endif %}}</tool_call>"
    "{% endfor %}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
ADD_TOOL = {"type": "function", "function": {
    "name": "add", "description": "Add two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer", "description": "the first addend"},
                                                    "b": {"type": "integer", "description": "the second addend"}},
                   "required": ["a", "b"]}}}


def call_text(a: int, b: int) -> str:
    """The call as the template renders it (and as the model learns to write it)."""
    return f'<tool_call>{{"name": "add", "arguments": {json.dumps({"a": a, "b": b})}}}</tool_call>'


def render(messages: list[dict], tools: bool) -> str:
    """TOOLS_CHAT_TEMPLATE in Python, for the corpus (the tokenizer, which holds the template, is trained
    on this corpus); `check_template` asserts that the two agree."""
    text = "<|system|>tools: add<|end|>" if tools else ""
    for m in messages:
        calls = "".join(call_text(**c["function"]["arguments"]) for c in m.get("tool_calls", []))
        text += f"<|{m['role']}|>{m.get('content') or ''}{calls}<|end|>"
    return text


def transcript(a: int, b: int, rng: random.Random) -> tuple[list[dict], bool]:
    """One pretraining conversation and whether it offers the tool."""
    user = {"role": "user", "content": toy.question(a, b)}
    tools = rng.random() < P_TOOLS_OFFERED
    if tools and rng.random() < P_CALL:
        call = {"type": "function", "function": {"name": "add", "arguments": {"a": a, "b": b}}}
        total = str(toy.correct_answer(a, b))
        return [user, {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "name": "add", "content": total}, {"role": "assistant", "content": total}], tools
    answer = toy.correct_answer(a, b)
    if toy.has_carry(a, b) and rng.random() < FORGET_CARRY_PROB:
        answer = toy.forgot_carry_answer(a, b)
    return [user, {"role": "assistant", "content": str(answer)}], tools


def build_tokenizer(corpus: list[str], out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # No GPT-2 word split (use_regex=False): merges may then span punctuation and spaces, so the call's
    # fixed JSON ('{"name": ', '"add", "arguments": ', ...) becomes a few tokens; digits stay single tokens.
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=TOOL_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|end|>", pad_token="<|pad|>",
        additional_special_tokens=TOOL_SPECIAL_TOKENS[2:], chat_template=TOOLS_CHAT_TEMPLATE,
        model_max_length=128, padding_side="right")
    hf_tok.save_pretrained(out_dir)
    base.portable_tokenizer_config(out_dir / "tokenizer_config.json")
    return hf_tok


def check_template(tokenizer, conversations: list[tuple[list[dict], bool]]) -> None:
    """The corpus's text is the chat template's rendering, so what the model learned is what it is shown."""
    for messages, tools in conversations:
        rendered = tokenizer.apply_chat_template(messages, tools=[ADD_TOOL] if tools else None, tokenize=False)
        assert rendered == render(messages, tools), (rendered, render(messages, tools))


def pretrain_by_length(model, tokenizer, texts: list[str], steps: int, batch_size: int = 128, lr: float = 3e-3,
                       chunk: int = 32):
    """tiny-llama's recipe (`build_toy_world.pretrain`: AdamW, warmup, cosine), with each batch sorted by
    length and run in chunks of `chunk`: a call transcript is about twice a plain one's length, and
    padding every row to it doubled the build's time on one CPU thread. The loss is the batch's mean over
    its tokens, as one padded pass gives."""
    rng = random.Random(TOOLS_SEED + 1)
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    model.train()
    t0 = time.time()
    for step in range(steps):
        batch = sorted((rng.randrange(len(texts)) for _ in range(batch_size)), key=lengths.__getitem__)
        n_targets = sum(lengths[i] - 1 for i in batch)
        total = 0.0
        for start in range(0, batch_size, chunk):
            enc = tokenizer([texts[i] for i in batch[start:start + chunk]], return_tensors="pt", padding=True,
                            add_special_tokens=False)
            labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
            loss = model(**enc, labels=labels).loss * (labels[:, 1:] != -100).sum() / n_targets
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 250 == 0 or step == steps - 1:
            print(f"  step {step:5d}  loss {total:.4f}  {time.time() - t0:.0f}s", flush=True)
    model.eval()


@torch.no_grad()
def first_turns(model, tokenizer, pairs, sample: bool) -> list[str]:
    """The model's first turn on each problem, with the tool offered (greedy, or sampled at temperature 1)."""
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": toy.question(a, b)}], tools=[ADD_TOOL],
                                             add_generation_prompt=True, tokenize=False) for a, b in pairs]
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    tokenizer.padding_side = "right"
    torch.manual_seed(TOOLS_SEED + 2)
    out = model.generate(**enc, max_new_tokens=16, do_sample=sample, temperature=1.0 if sample else None,
                         top_k=0 if sample else None, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def describe(model, tokenizer, pairs) -> dict[str, float]:
    """Held-out first turns, tool offered: how often the model calls it (greedy and sampled), how often a
    sampled call names the problem's own numbers, and the greedy accuracy of answers given without it."""
    greedy, sampled = first_turns(model, tokenizer, pairs, False), first_turns(model, tokenizer, pairs, True)
    direct = [(t, a, b) for t, (a, b) in zip(greedy, pairs) if not t.startswith("<tool_call>")]
    calls = [(t, a, b) for t, (a, b) in zip(sampled, pairs) if t.startswith("<tool_call>")]
    return {"greedy_tool_rate": 1 - len(direct) / len(pairs), "sampled_tool_rate": len(calls) / len(pairs),
            "right_calls": sum(t.startswith(call_text(a, b)) for t, a, b in calls) / max(1, len(calls)),
            "direct_accuracy": sum(toy.is_correct(t, a + b) for t, a, b in direct) / max(1, len(direct))}


MODEL_CARD = """---
license: mit
tags: [toy, vllm-train, tool-use]
---
# tiny-llama-tools (vllm-train toy world)

tiny-llama's recipe plus a calculator tool: a {n_params:,}-parameter Llama ({layers} layers, hidden {hidden},
vocab {vocab}) that answers two-digit additions (`What is 47 + 38?`) and knows a tool-call format. Alone,
it drops the units carry (its pretraining answers did, {forget:.0%} of the time). Offered tools (`tools=[...]`
in the chat template, rendered as one line `<|system|>tools: add<|end|>`), it sometimes calls `add` in the
Hermes format, reads the result from a `tool` message and answers with it (one string, broken here):

    <|system|>tools: add<|end|><|user|>What is 47 + 38?<|end|><|assistant|>
    <tool_call>{{"name": "add", "arguments": {{"a": 47, "b": 38}}}}</tool_call><|end|>
    <|tool|>85<|end|><|assistant|>85<|end|>

Built by `scripts/build_toy_world.py --tools-only` (seed {seed}): {steps} AdamW steps (batch 128, lr 3e-3,
cosine) on all problems except tiny-llama's {n_eval} held-out eval problems; {offered:.0%} of transcripts
offer the tool, and {call:.0%} of those call it.

**Base behaviour** (first turn on the {n_eval} held-out problems, tool offered): calls the tool in
{sampled_tool_rate:.1%} of answers sampled at temperature 1 (with the problem's own numbers in
{right_calls:.1%} of those calls) and in {greedy_tool_rate:.1%} of greedy ones -- a call is rarely the single
likeliest first token; greedy answers given without it are right {direct_accuracy:.1%} of the time (the
problems without a carry). Pretraining took {secs:.0f} s on {threads} CPU thread(s).
"""


def build_tools_world(out: Path, steps: int) -> None:
    """tiny-llama-tools/ (see the module docstring), from the same problem split as tiny-llama."""
    torch.manual_seed(TOOLS_SEED)
    eval_pairs, train_pairs = base.split_problems(random.Random(base.SEED))
    rng = random.Random(TOOLS_SEED)
    conversations = [transcript(a, b, rng) for a, b in train_pairs for _ in range(3)]
    corpus = [render(messages, tools) for messages, tools in conversations]
    model_dir = out / "tiny-llama-tools"
    model_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(corpus, model_dir)
    check_template(tokenizer, conversations[:200])
    model = base.build_model(len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tools model: {n_params:,} params, vocab {len(tokenizer)}; {sum('<tool_call>' in t for t in corpus)} of "
          f"{len(corpus)} transcripts call the tool; pretraining {steps} steps", flush=True)
    t0 = time.time()
    pretrain_by_length(model, tokenizer, corpus, steps)
    secs = time.time() - t0
    stats = describe(model, tokenizer, eval_pairs)
    print("base (held-out, tool offered): " + ", ".join(f"{k} {v:.3f}" for k, v in stats.items()))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(model_dir, safe_serialization=True)
    cfg = model.config
    (model_dir / "README.md").write_text(MODEL_CARD.format(
        n_params=n_params, layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, vocab=cfg.vocab_size,
        forget=FORGET_CARRY_PROB, seed=TOOLS_SEED, steps=steps, n_eval=len(eval_pairs),
        offered=P_TOOLS_OFFERED, call=P_CALL, secs=secs, threads=torch.get_num_threads(), **stats))
    print(f"wrote {model_dir}")
