"""Many adapters in one forward/backward (`vllm_train.lora.multi`, `multi_model`) against their oracles:
each adapter run alone through the single-adapter `TrainableLoRALinear` / `LoRAInjector`, autograd's
gradcheck, and PEFT's forward of the adapter we export."""

from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch
from torch import nn

from vllm_train.config import ALL_LINEAR_MODULES, LoRATrainConfig
from vllm_train.errors import VllmTrainError
from vllm_train.lora import multi
from vllm_train.lora.injector import LoRAInjector
from vllm_train.lora.layers import TrainableLoRALinear
from vllm_train.lora.multi import MultiLoRALinear, RowRouting, grouped_mm_works
from vllm_train.lora.multi_model import AdapterInputError, MultiLoRAModel
from vllm_train.lora.peft_io import write_adapter_dir

# slot -> (rank, alpha): ranks 2, 5 and 8 (5 is padded to 8 in the grouped path)
LAYER_ADAPTERS = {0: (2, 4.0), 3: (5, 10.0), 7: (8, 4.0)}
ROWS = [3, -1, 0, 7, 3, 0]  # a row of no adapter among them


def randomize(params, seed: int, std: float = 0.3) -> None:
    """Non-zero A and B (a fresh B is zero), so a wrong row, scaling or padding shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * std)


@pytest.fixture(params=["grouped", "loop"])
def path(request, monkeypatch):
    """Force each implementation; the grouped one must really run torch._grouped_mm."""
    if request.param == "grouped" and not grouped_mm_works("cpu", torch.float32):
        pytest.skip("this torch build has no CPU torch._grouped_mm for fp32")
    monkeypatch.setattr(multi, "GROUPED_MM", request.param == "grouped")
    calls = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    yield request.param
    assert bool(calls) == (request.param == "grouped")


def multi_layer(in_features: int, out_features: int, adapters: dict, dtype=torch.float32):
    torch.manual_seed(0)
    layer = MultiLoRALinear(nn.Linear(in_features, out_features).to(dtype), RowRouting())
    for slot, (rank, alpha) in adapters.items():
        layer.add(slot, TrainableLoRALinear(in_features, out_features, rank, alpha).to(dtype))
    randomize(layer.adapters.parameters(), seed=1)
    return layer


# ---- the layer ---------------------------------------------------------------------------------------
def test_probe_finds_the_grouped_kernel_of_this_torch_build():
    """What torch 2.13's CPU build has: torch._grouped_mm forward and backward in fp32 (and bf16), not fp64."""
    assert grouped_mm_works("cpu", torch.float32)
    assert not grouped_mm_works("cpu", torch.float64)


def test_mixed_batch_equals_each_adapter_alone(path):
    """Rows of 3 adapters of ranks 2, 5, 8 and a row of none: the output, the input's gradient and every
    adapter's gradients equal those of each adapter alone (`TrainableLoRALinear` on its rows only)."""
    layer = multi_layer(16, 12, {**LAYER_ADAPTERS, 9: (4, 8.0)})  # slot 9 in no row: no gradient
    x_BTI = torch.randn(len(ROWS), 5, 16, requires_grad=True)
    grad_BTO = torch.randn(len(ROWS), 5, 12)
    with layer.routing.rows(torch.tensor(ROWS)):
        out_BTO = layer(x_BTI)
        out_BTO.backward(grad_BTO)

    x_ref = x_BTI.detach().clone().requires_grad_(True)
    alone = {}
    expected_rows = []
    for row, slot in enumerate(ROWS):
        base_TO = layer.base_layer(x_ref[row])
        if slot == -1:
            expected_rows.append(base_TO)
            continue
        if slot not in alone:
            alone[slot] = TrainableLoRALinear(16, 12, *LAYER_ADAPTERS[slot])
            alone[slot].load_state_dict(layer.adapters[str(slot)].state_dict())
        expected_rows.append(alone[slot](x_ref[row], base_TO))
    expected_BTO = torch.stack(expected_rows)
    expected_BTO.backward(grad_BTO)

    assert (out_BTO - expected_BTO).abs().max().item() <= 1e-5
    assert (x_BTI.grad - x_ref.grad).abs().max().item() <= 1e-5
    torch.testing.assert_close(out_BTO[1], layer.base_layer(x_BTI[1]), rtol=0, atol=0)  # row of no adapter
    for slot, ref in alone.items():
        ours = layer.adapters[str(slot)]
        assert (ours.lora_a.grad - ref.lora_a.grad).abs().max().item() <= 1e-5
        assert (ours.lora_b.grad - ref.lora_b.grad).abs().max().item() <= 1e-5
    assert layer.adapters["9"].lora_a.grad is None and layer.adapters["9"].lora_b.grad is None


def test_gradcheck_loop_path(monkeypatch):
    """gradcheck (float64) with respect to the input and two adapters' A and B, rows mixed with a -1."""
    monkeypatch.setattr(multi, "GROUPED_MM", False)
    layer = multi_layer(6, 5, {1: (2, 3.0), 4: (3, 6.0)}, dtype=torch.float64)
    names = ["1.lora_a", "1.lora_b", "4.lora_a", "4.lora_b"]
    params = [layer.adapters.get_parameter(n).detach().clone().requires_grad_(True) for n in names]
    x_BTI = torch.randn(4, 3, 6, dtype=torch.float64, requires_grad=True)

    def as_function_of(x, *tensors):
        state = {f"adapters.{n}": t for n, t in zip(names, tensors)}
        return torch.func.functional_call(layer, state, (x,))

    with layer.routing.rows([4, -1, 1, 4]):
        assert torch.autograd.gradcheck(as_function_of, (x_BTI, *params))


def test_grouped_and_loop_agree_in_bf16(monkeypatch):
    """bf16 activations over fp32 adapters (a bf16 base on CUDA): both paths compute in bf16 and give
    fp32 gradients; they agree to bf16 rounding."""
    if not grouped_mm_works("cpu", torch.bfloat16):
        pytest.skip("this torch build has no CPU torch._grouped_mm for bf16")
    layer = multi_layer(32, 24, LAYER_ADAPTERS)
    layer.base_layer.to(torch.bfloat16)
    x_BTI = torch.randn(len(ROWS), 4, 32).to(torch.bfloat16)
    grad_BTO = torch.randn(len(ROWS), 4, 24).to(torch.bfloat16)
    results = []
    for grouped in (True, False):
        monkeypatch.setattr(multi, "GROUPED_MM", grouped)
        layer.zero_grad(set_to_none=True)
        with layer.routing.rows(ROWS):
            out_BTO = layer(x_BTI)
            out_BTO.backward(grad_BTO)
        results.append([out_BTO.float(), *(p.grad.clone() for p in layer.adapters.parameters())])
    assert results[0][0].dtype == torch.float32 and all(g.dtype == torch.float32 for g in results[0][1:])
    for grouped, loop in zip(*results):
        torch.testing.assert_close(grouped, loop, atol=3e-2, rtol=2e-2)


def test_forward_outside_rows_and_wrong_row_count_are_refused():
    layer = multi_layer(8, 8, {0: (2, 2.0)})
    with pytest.raises(VllmTrainError, match="rows"):
        layer(torch.randn(2, 3, 8))
    with layer.routing.rows([0, 0, -1]), pytest.raises(VllmTrainError, match="3 adapter indices for a batch of 2"):
        layer(torch.randn(2, 3, 8))


# ---- the model ---------------------------------------------------------------------------------------
def load_base(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


def injector_alone(tiny_model, rank: int, alpha: float, seed: int, targets: list[str]):
    """The single-adapter oracle: `torch.manual_seed(seed)` then `LoRAInjector.inject` on a fresh model."""
    model = load_base(tiny_model)
    torch.manual_seed(seed)
    injector = LoRAInjector(LoRATrainConfig(rank=rank, alpha=alpha, target_modules=list(targets)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lm_head ... is adapted": asked for
        injector.inject(model)
    return model, injector


def summed_nll(model, ids_BT: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy summed over every token of every row (Tinker's summed losses)."""
    logits_BTV = model(input_ids=ids_BT).logits
    return nn.functional.cross_entropy(logits_BTV[:, :-1].flatten(0, 1), ids_BT[:, 1:].flatten(), reduction="sum")


# slot -> (rank, alpha, seed, Tinker switches)
TENANTS = {0: (4, 8.0, 11, dict(train_unembed=False)), 2: (8, 16.0, 12, dict(train_mlp=False))}


def test_two_adapters_trained_together_equal_each_trained_alone(tiny_model, path):
    """Two adapters (ranks 4 and 8; attention+MLP, and attention+lm_head) and a base row, 3 AdamW steps in
    one forward/backward per step, each adapter with its own optimizer, loss summed over rows. Each ends
    where it ends when trained alone on its rows by the single-adapter LoRAInjector (which also starts
    from the same initial values: the seeded initialisation)."""
    gen = torch.Generator().manual_seed(5)
    index_B = [0, 2, -1, 2, 0]
    ids_BT = torch.randint(2, 284, (len(index_B), 12), generator=gen)
    model = load_base(tiny_model)
    tenants = MultiLoRAModel(model, max_adapters=4)
    optimizers = {}
    for slot, (rank, alpha, seed, switches) in TENANTS.items():
        tenants.add_adapter(slot, rank, alpha, seed, tenants.tinker_targets(**switches))
        optimizers[slot] = torch.optim.AdamW(tenants.parameters_of(slot), lr=1e-2, weight_decay=0.0)
    initial = {slot: [p.detach().clone() for p in tenants.parameters_of(slot)] for slot in TENANTS}
    for _ in range(3):
        with tenants.rows(index_B):
            summed_nll(model, ids_BT).backward()
        for optimizer in optimizers.values():
            optimizer.step()
            optimizer.zero_grad()

    for slot, (rank, alpha, seed, switches) in TENANTS.items():
        alone, injector = injector_alone(tiny_model, rank, alpha, seed, tenants.tinker_targets(**switches))
        params = injector.get_trainable_params()
        assert len(params) == len(initial[slot])
        for ours, theirs in zip(initial[slot], params):
            assert torch.equal(ours, theirs)  # same seed, same initial adapter
        optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
        own_rows = ids_BT[[b for b, s in enumerate(index_B) if s == slot]]
        for _ in range(3):
            summed_nll(alone, own_rows).backward()
            optimizer.step()
            optimizer.zero_grad()
        assert tenants.peft_state_dict(slot).keys() == injector.peft_state_dict().keys()
        for ours, theirs, start in zip(tenants.parameters_of(slot), params, initial[slot]):
            assert (ours - theirs).abs().max().item() <= 1e-5
            assert (ours - start).abs().max().item() > 1e-3  # it did train


def test_exported_adapter_is_the_single_adapter_format_and_peft_forward_equals_ours(tiny_model, tmp_path):
    from peft import PeftModel

    model = load_base(tiny_model)
    tenants = MultiLoRAModel(model)
    for slot, (rank, alpha, seed, switches) in TENANTS.items():
        tenants.add_adapter(slot, rank, alpha, seed, tenants.tinker_targets(**switches))
        state = tenants.peft_state_dict(slot)
        randomize([state[k] for k in state], seed=slot, std=0.05)  # copies: load them back in
        tenants.load_peft_state_dict(slot, state)
    slot = 2
    rank, alpha, seed, switches = TENANTS[slot]
    _, injector = injector_alone(tiny_model, rank, alpha, seed, tenants.tinker_targets(**switches))
    ours_state = tenants.peft_state_dict(slot)
    with torch.no_grad():
        for p, q in zip(injector.get_trainable_params(), tenants.parameters_of(slot)):
            p.copy_(q)
    theirs_state = injector.peft_state_dict()
    assert ours_state.keys() == theirs_state.keys()
    assert all(torch.equal(ours_state[k], theirs_state[k]) and ours_state[k].device.type == "cpu" for k in ours_state)
    assert tenants.peft_config(slot, tiny_model) == injector.peft_config(tiny_model)
    live = tenants.peft_state_dict(slot, live=True)
    assert all(t.data_ptr() == p.data_ptr() for t, p in zip(live.values(), tenants.parameters_of(slot)))

    write_adapter_dir(tmp_path / "adapter", ours_state, tenants.peft_config(slot, tiny_model))
    peft_model = PeftModel.from_pretrained(load_base(tiny_model), tmp_path / "adapter").eval()
    ids_BT = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64], [9, 8, 7, 6, 5, 4, 3, 2], [11, 12, 13, 14, 15, 16, 17, 18]])
    with torch.no_grad(), tenants.rows([slot, 0, slot]):
        ours_BTV = model(input_ids=ids_BT).logits
        expected_BTV = peft_model(input_ids=ids_BT).logits
        base_BTV = load_base(tiny_model)(input_ids=ids_BT).logits
    for row in (0, 2):
        assert (ours_BTV[row] - expected_BTV[row]).abs().max().item() <= 1e-4
    assert (expected_BTV - base_BTV).abs().max().item() > 1e-2  # the adapter matters
    assert (ours_BTV[1] - expected_BTV[1]).abs().max().item() > 1e-2  # row 1 is the other adapter's


def test_removed_adapter_is_freed_and_its_slot_reusable(tiny_model):
    model = load_base(tiny_model)
    tenants = MultiLoRAModel(model, max_adapters=2)
    frozen = sum(1 for _ in model.parameters())
    tenants.add_adapter(1, 4, 8, seed=3, targets=["q_proj", "v_proj"])
    first = [p.detach().clone() for p in tenants.parameters_of(1)]
    assert sum(1 for _ in model.parameters()) == frozen + 4 * 2 * 2  # 4 layers x (q, v) x (A, B)
    optimizer = torch.optim.AdamW(tenants.parameters_of(1))
    refs = [weakref.ref(p) for p in tenants.parameters_of(1)]
    tenants.remove_adapter(1)
    del optimizer
    gc.collect()
    assert all(ref() is None for ref in refs)
    assert sum(1 for _ in model.parameters()) == frozen
    assert all("1" not in layer.adapters for layer in tenants.layers.values())
    with pytest.raises(AdapterInputError, match="adapter_index"):
        with tenants.rows([1]):
            pass

    tenants.add_adapter(1, 2, 4, seed=3, targets=["q_proj", "v_proj"])  # reused, another rank
    assert tenants.parameters_of(1)[0].shape == (2, 128)
    tenants.remove_adapter(1)
    tenants.add_adapter(1, 4, 8, seed=3, targets=["q_proj", "v_proj"])
    assert all(torch.equal(a, b) for a, b in zip(first, tenants.parameters_of(1)))  # same seed, same adapter


def test_seeded_initialisation_leaves_the_global_random_state_alone(tiny_model):
    tenants = MultiLoRAModel(load_base(tiny_model))
    before = torch.random.get_rng_state()
    tenants.add_adapter(0, 4, 8, seed=7, targets=["all-linear"])
    tenants.add_adapter(1, 4, 8, seed=8, targets=["all-linear"])
    assert torch.equal(torch.random.get_rng_state(), before)
    assert not torch.equal(tenants.parameters_of(0)[0], tenants.parameters_of(1)[0])
    assert all(torch.count_nonzero(b) == 0 for b in tenants.parameters_of(0)[1::2])  # B starts at zero


@pytest.mark.parametrize("call, field", [
    (lambda t: t.add_adapter(0, 4, 8, 1, ["q_proj"]), "slot"),  # occupied
    (lambda t: t.add_adapter(3, 4, 8, 1, ["q_proj"]), "slot"),  # >= max_adapters
    (lambda t: t.add_adapter(1, 0, 8, 1, ["q_proj"]), "rank"),
    (lambda t: t.add_adapter(1, 1024, 8, 1, ["q_proj"]), "rank"),  # above vLLM's largest
    (lambda t: t.add_adapter(1, 4, float("nan"), 1, ["q_proj"]), "alpha"),
    (lambda t: t.add_adapter(1, 4, 8, -1, ["q_proj"]), "seed"),
    (lambda t: t.add_adapter(1, 4, 8, 1, ["q_proj", "bogus_proj"]), "targets"),
    (lambda t: t.add_adapter(1, 4, 8, 1, "q_proj"), "targets"),
    (lambda t: t.tinker_targets(False, False, False), "targets"),
    (lambda t: t.remove_adapter(1), "slot"),
    (lambda t: t.load_peft_state_dict(0, {}), "state"),
    (lambda t: t.load_peft_state_dict(0, {k: v[:1] for k, v in t.peft_state_dict(0).items()}), "state"),
    (lambda t: t.load_peft_state_dict(0, {k: v * float("nan") for k, v in t.peft_state_dict(0).items()}), "state"),
])
def test_bad_input_names_its_field_and_changes_nothing(tiny_model, call, field):
    tenants = MultiLoRAModel(load_base(tiny_model), max_adapters=3)
    tenants.add_adapter(0, 4, 8, 1, ["q_proj"])
    randomize(tenants.parameters_of(0), seed=0)
    before = tenants.peft_state_dict(0)
    with pytest.raises(AdapterInputError) as raised:
        call(tenants)
    assert raised.value.field == field
    assert list(tenants.adapters) == [0]
    assert all(set(layer.adapters) <= {"0"} for layer in tenants.layers.values())
    after = tenants.peft_state_dict(0)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_targets_are_the_single_adapter_injectors(tiny_model):
    """The wrapped layers are those LoRAInjector wraps for the same names: all-linear plus the head."""
    tenants = MultiLoRAModel(load_base(tiny_model))
    _, injector = injector_alone(tiny_model, 4, 8, 0, [*ALL_LINEAR_MODULES, "lm_head"])
    assert list(tenants.layers) == list(injector.lora_layers)
    assert tenants.tinker_targets() == [*ALL_LINEAR_MODULES, "lm_head"]


def test_gradient_checkpointing_recomputes_with_the_same_rows(tiny_model):
    """With activations recomputed in backward (non-reentrant checkpointing), backward inside the rows()
    block gives the gradients of a plain backward."""
    ids_BT = torch.randint(2, 284, (3, 10), generator=torch.Generator().manual_seed(2))
    grads = []
    for checkpointing in (False, True):
        model = load_base(tiny_model).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        tenants = MultiLoRAModel(model)
        tenants.add_adapter(0, 4, 8, 1, ["all-linear"])
        tenants.add_adapter(1, 8, 8, 2, ["q_proj", "v_proj"])
        with tenants.rows([1, 0, 1]):
            summed_nll(model, ids_BT).backward()
        grads.append([p.grad for slot in (0, 1) for p in tenants.parameters_of(slot)])
    assert all(g is not None for g in grads[1])
    with tenants.rows([1, 0, 1]):
        loss = summed_nll(model, ids_BT)
    with pytest.raises(VllmTrainError, match="rows"):  # so the layers did run again in backward
        loss.backward()
    for plain, recomputed in zip(*grads):
        assert (plain - recomputed).abs().max().item() <= 1e-5
