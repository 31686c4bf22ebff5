"""The package's shape, read from its source with `ast`: imports run downward only, only
`vllm_train/engine/` imports vLLM, and no module grows past ~400 lines.

The layer order below is the single source of truth for "downward".

Rule 1 (between layers): a module may import modules of lower layers only.
Rule 2 (within a package): a package lists its modules in tiers, lowest first. A module may import
    modules of a lower tier of its own package only -- never a module of its own tier (sideways).
    Shared plumbing therefore lives in a bottom-tier module: `common`, or a `_`-prefixed module
    (`commands/_common.py`, `commands/_rl.py`). A package's `__init__` may import its own modules.
Rule 3: only modules under `vllm_train/engine/` import `vllm` (import statements, `__import__` and
    `importlib.import_module` with a literal name all count).
Rule 4: no module has more than MAX_LINES lines, except the SPLIT_PENDING ones.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "vllm_train"
PACKAGE = "vllm_train"

# Lowest first. Names are top-level modules or subpackages of vllm_train.
LAYERS: list[tuple[str, ...]] = [
    ("errors",),
    ("quiet",),  # vLLM / torch / transformers noise folded for library and CLI use (VLLM_TRAIN_VERBOSE=1 shows it)
    ("files",),  # users' text files: UTF-8, JSON error positions, YAML/JSON config files
    ("loading",),  # the one boundary: a library's exception about a user's file -> one VllmTrainError line
    ("distributed",),  # torchrun ranks: the process group, batch shares, reductions, who writes
    ("run_manifest",),  # what a run directory's run wrote: the paths --overwrite may remove
    ("outputs",),  # atomic, finite-checked writes of weights and text (noted in the run manifest)
    ("metrics",),  # metrics.jsonl / TensorBoard / W&B (config validates report_to against it)
    ("schedules",),  # learning-rate schedules by name (ours + transformers'), the optimizer names accepted
    ("config",),
    ("hub",),  # model / adapter names -> local directories (hub ids through huggingface_hub's cache)
    ("toy", "assets"),
    ("data",),
    ("agents",),  # multi-turn episodes as token arrays, bridge tokens, environments, tool calls (no engine)
    ("losses",),
    ("lora",),
    ("model_dir",),  # a model directory checked up front (config vs weights, tokenizer, chat template)
    ("models",),  # loading a policy / tokenizer / adapter, and the forward passes every layer above reads
    ("merging",),  # base + adapter -> one plain model directory
    ("rewards",),
    ("evaluation",),
    ("engine",),  # the only layer that imports vLLM
    ("trainers",),
    ("service",),  # the Tinker-API training service: many tenants' adapters on one base, sampled through vLLM
    ("commands",),
    ("cli", "__init__"),  # the command line and the package facade
    ("__main__",),  # `python -m vllm_train` / torchrun -m vllm_train: runs the command line
]

# Tiers of modules inside each subpackage, lowest first (Rule 2).
PACKAGE_TIERS: dict[str, list[tuple[str, ...]]] = {
    "assets": [],
    "data": [("io", "tokenize"), ("formats",), ("causal_lm",), ("preference",)],
    "agents": [("episode", "bridge", "tool_calls", "environment", "recorded"), ("turns",)],
    "losses": [("causal_lm", "ppo", "tinker"), ("grpo", "dpo")],
    "lora": [("layers", "peft_io"), ("injector", "multi"), ("validate", "tensor_parallel", "multi_model")],
    "rewards": [("loading",), ("model",)],
    "engine": [("fast_sync", "gateway", "staging", "kv_budget", "seeds"),
               ("http_client", "server_args", "cpu_lora_ops"), ("cpu_lora_worker", "llm", "replicas"),
               ("loader", "reward", "publish", "shared_base"), ("remote", "trainable_cpu_worker")],
    "trainers": [("run_files", "shared_policy"), ("common",), ("guards",), ("loop", "rl_rollouts", "rl_algorithms"),
                 ("rl_policy", "rl_sampling", "rl_rewards"), ("sft", "dpo", "rm", "rl", "trainable")],
    "service": [("protowire", "problems", "config"), ("wire", "futures", "tenants", "fields"), ("datums",),
                ("training",), ("worker", "sampling", "checkpoints"), ("core",), ("app",), ("server",)],
    "commands": [("_common", "_data", "_output"), ("_rl", "_parse", "_trl"),
                 ("demo", "sft", "dpo", "rm", "grpo", "ppo", "generate", "eval", "serve", "push", "merge",
                  "service")],
}

MAX_LINES = 400
SPLIT_PENDING = {  # split by issue #12 item 2/3
}


def package_modules() -> dict[str, Path]:
    """Dotted module name (without the `vllm_train.` prefix; "__init__" for the package) -> file."""
    out = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE_DIR).with_suffix("").parts)
        if len(parts) > 1 and parts[-1] == "__init__":
            parts = parts[:-1] + ["__init__"]
        out[".".join(parts)] = path
    return out


MODULES = package_modules()


def imported_names(tree: ast.AST, module: str) -> list[tuple[str, int]]:
    """(absolute dotted name, line) of everything `tree` imports, with `from X import Y` resolved to the
    module X.Y when that is a module of this package. Relative imports are resolved against `module`."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = [PACKAGE, *module.split(".")][:-node.level]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                inside = candidate.removeprefix(PACKAGE + ".")
                is_module = candidate.startswith(PACKAGE + ".") and (
                    inside in MODULES or f"{inside}.__init__" in MODULES)
                out.append((candidate if is_module else base, node.lineno))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if name in ("__import__", "import_module"):
                out.append((node.args[0].value, node.lineno))
    return out


def rank(module: str) -> tuple[int, int]:
    """(layer, tier inside its package) of a module named without the `vllm_train.` prefix."""
    head, _, rest = module.partition(".")
    if module == "__init__":
        head = "__init__"
    layer = next((i for i, names in enumerate(LAYERS) if head in names), None)
    assert layer is not None, f"{module}: not placed in LAYERS (tests/test_layering.py)"
    if not rest:
        return layer, 0
    leaf = rest.split(".")[0]
    tiers = PACKAGE_TIERS.get(head)
    assert tiers is not None, f"{head}: a package without PACKAGE_TIERS (tests/test_layering.py)"
    if leaf == "__init__":
        return layer, len(tiers)  # a package's facade sits on top of its own modules
    tier = next((i for i, names in enumerate(tiers) if leaf in names), None)
    assert tier is not None, f"{module}: not placed in PACKAGE_TIERS[{head!r}] (tests/test_layering.py)"
    return layer, tier


def target_module(name: str) -> str | None:
    """The package module an absolute import name refers to, without the prefix (None: not ours)."""
    if name == PACKAGE:
        return "__init__"
    if not name.startswith(PACKAGE + "."):
        return None
    inside = name.removeprefix(PACKAGE + ".")
    while inside not in MODULES and f"{inside}.__init__" not in MODULES and "." in inside:
        inside = inside.rpartition(".")[0]  # `vllm_train.x.y.Name` -> module `x.y`
    return inside if inside in MODULES else f"{inside}.__init__"


def shown(path: Path) -> str:
    return str(path.relative_to(PACKAGE_DIR.parent)) if path.is_relative_to(PACKAGE_DIR.parent) else str(path)


def layering_violations(modules: dict[str, Path] = MODULES) -> list[str]:
    found: list[str] = []
    for module, path in modules.items():
        src = rank(module)
        for name, line in imported_names(ast.parse(path.read_text()), module):
            target = target_module(name)
            if target is None or target == module:
                continue
            dst = rank(target)
            same_package = module.split(".")[0] == target.split(".")[0] and "." in module
            if dst[0] > src[0]:
                found.append(f"upward: {shown(path)}:{line} imports {name}")
            elif dst[0] == src[0] and not (same_package and dst[1] < src[1]):
                found.append(f"sideways: {shown(path)}:{line} imports {name}")
    return list(dict.fromkeys(found))  # one entry per import statement


def test_every_module_is_placed():
    for module in MODULES:
        rank(module)


def test_imports_run_downward_only():
    violations = layering_violations()
    assert not violations, "\n".join(violations)


def test_only_the_engine_imports_vllm():
    offenders = []
    for module, path in MODULES.items():
        if module.startswith("engine."):
            continue
        for name, line in imported_names(ast.parse(path.read_text()), module):
            if name == "vllm" or name.startswith("vllm."):
                offenders.append(f"{path.relative_to(PACKAGE_DIR.parent)}:{line} imports {name}")
    assert not offenders, "\n".join(offenders)


def test_modules_stay_small():
    too_long = []
    for path in MODULES.values():
        rel = str(path.relative_to(PACKAGE_DIR.parent))
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES and rel not in SPLIT_PENDING:
            too_long.append(f"{rel}: {lines} lines")
    assert not too_long, "\n".join(too_long)


@pytest.mark.parametrize("source,expected", [
    # the checker itself: an upward, a sideways and a downward import, and vLLM outside the engine
    ("from vllm_train.trainers import common\n", "upward"),
    ("from vllm_train.losses.dpo import preference_loss\n", "sideways"),
    ("from vllm_train.losses.ppo import kl_per_token\n", None),
])
def test_checker_flags_upward_and_sideways_imports(tmp_path, source, expected):
    # A fake module placed as `losses/grpo.py` (tier 1 of losses): ppo is tier 0 (below), dpo is tier 1.
    fake = tmp_path / "grpo.py"
    fake.write_text(source)
    found = layering_violations({"losses.grpo": fake})
    if expected is None:
        assert not found
    else:
        assert len(found) == 1 and found[0].startswith(expected), found
