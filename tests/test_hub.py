"""Hub ids (`--model ORG/NAME`): resolved offline from a hub cache laid out here, the way huggingface_hub
writes one (models--ORG--NAME/snapshots/<commit>/ + refs/main), holding the shipped tiny model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vllm_train import hub
from vllm_train.cli import main
from vllm_train.errors import VllmTrainError
from vllm_train.lora.validate import validate_adapter

COMMIT = "0123456789abcdef0123456789abcdef01234567"
HUB_ID = "test-org/tiny-llama"


def put_in_hub_cache(home: Path, repo_id: str, files_dir: Path) -> Path:
    """Lay `files_dir`'s files out as `repo_id` at COMMIT (its main revision) in the hub cache under `home`."""
    repo = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for f in Path(files_dir).iterdir():
        (snapshot / f.name).symlink_to(f.resolve())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def hub_home(tiny_model, tmp_path, monkeypatch):
    """An offline HF_HOME whose hub cache holds HUB_ID at COMMIT (its main revision)."""
    home = tmp_path / "hf_home"
    put_in_hub_cache(home, HUB_ID, Path(tiny_model))
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def test_hub_id_resolves_to_its_snapshot_offline(hub_home):
    snapshot = hub_home / "hub" / "models--test-org--tiny-llama" / "snapshots" / COMMIT
    assert Path(hub.resolve(HUB_ID)) == snapshot
    assert Path(hub.resolve(HUB_ID, revision=COMMIT)) == snapshot
    assert hub.model_reference(HUB_ID) == HUB_ID


def test_local_paths_win_and_are_recorded_absolute(tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(Path(tiny_model).parent.parent)
    relative = os.path.relpath(tiny_model)
    assert hub.resolve(relative) == relative and not hub.is_hub_id(relative)
    assert hub.model_reference(relative) == str(Path(tiny_model).resolve())


@pytest.mark.parametrize("name,revision", [("test-org/missing", None), (HUB_ID, "no-such-branch")])
def test_missing_hub_id_offline_is_one_line(hub_home, name, revision):
    with pytest.raises(VllmTrainError, match="HF_HUB_OFFLINE=1") as err:
        hub.resolve(name, revision)
    assert "\n" not in str(err.value) and name in str(err.value)


def test_cli_missing_hub_id_exits_2_with_one_line(hub_home, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1 + 1 = ", "completion": "2"}\n')
    code = main(["sft", "--model", "test-org/missing", "--data", str(data), "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--model test-org/missing" in err[0] and "hub" in err[0], err
    assert not (tmp_path / "out").exists()


def _sft(model, data, out, *extra):
    return main(["sft", "--model", model, "--data", str(data), "--output-dir", str(out), "--max-steps", "1",
                 "--batch-size", "2", "--gradient-accumulation-steps", "1", "--no-progress", *extra])


def test_sft_from_a_hub_id_records_the_id_as_base(hub_home, tmp_path, shipped):
    out = tmp_path / "out"
    assert _sft(HUB_ID, shipped("sft_train.jsonl"), out, "--revision", COMMIT) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == HUB_ID
    assert (out / "adapter_model.safetensors").is_file()
    # PEFT loads it by that id from the same (offline) cache, in a fresh process with the user's environment
    code = ("from peft import AutoPeftModelForCausalLM; import sys; "
            "m = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1]); print(type(m).__name__)")
    done = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HOME": str(hub_home), "HF_HUB_OFFLINE": "1"}, cwd=tmp_path)
    assert done.returncode == 0 and "PeftModelForCausalLM" in done.stdout, done.stderr[-2000:]
    # a server that serves the id's snapshot directory accepts it as the adapter's base; another model does not
    validate_adapter(out, hub.resolve(HUB_ID), check_base_name=True)
    other = tmp_path / "other-model"
    other.mkdir()
    for f in Path(hub.resolve(HUB_ID)).iterdir():
        (other / f.name).symlink_to(f.resolve())
    with pytest.raises(VllmTrainError, match="trained on base model 'test-org/tiny-llama'"):
        validate_adapter(out, str(other), check_base_name=True)
    # the adapter itself by hub id: --adapter ORG/NAME starts the next run from it
    put_in_hub_cache(hub_home, "test-org/tiny-adapter", out)
    again = tmp_path / "again"
    assert _sft(HUB_ID, shipped("sft_train.jsonl"), again, "--adapter", "test-org/tiny-adapter") == 0
    state = json.loads((again / "resolved_config.json").read_text())
    assert state["model"] == HUB_ID
    # the Python API: a trainer on the hub id, starting from the adapter's hub id, holds the adapter's weights
    from safetensors.torch import load_file

    from vllm_train import LoRATrainConfig, LoRATrainer

    trainer = LoRATrainer(HUB_ID, LoRATrainConfig(output_dir=str(tmp_path / "api")), revision=COMMIT)
    trainer.setup_training(adapter="test-org/tiny-adapter")
    saved, live = load_file(str(out / "adapter_model.safetensors")), trainer.injector.peft_state_dict()
    assert saved.keys() == live.keys() and all(torch.equal(saved[k], live[k]) for k in saved)
    assert trainer.model_name == HUB_ID and Path(trainer.model_path).parent.name == "snapshots"


def test_sft_from_a_relative_path_records_an_absolute_base(tiny_model, tmp_path, shipped, monkeypatch):
    monkeypatch.chdir(Path(tiny_model).parent)
    out = tmp_path / "out"
    assert _sft(Path(tiny_model).name, shipped("sft_train.jsonl"), out) == 0
    base = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str(Path(tiny_model).resolve())
    monkeypatch.chdir(tmp_path)  # AutoPeftModelForCausalLM finds the base from any working directory
    from peft import AutoPeftModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained(str(out))
    assert model.peft_config["default"].r == 8


@pytest.mark.vllm
def test_generate_serves_a_hub_id_from_the_same_snapshot(hub_home, tiny_model):
    """vLLM reads the hub id's snapshot offline, from the CLI and from the Python API alike (same answer)."""
    env = {**os.environ, "HF_HOME": str(hub_home), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "vllm_train.cli", "generate", "--model", HUB_ID, "--prompt",
                           "What is 47 + 38?", "--max-tokens", "4", "--json"], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    # The Python API resolves the id too; in its own process (one vLLM engine per process: closing a second
    # in-process engine would tear down the session engine's vLLM state)
    code = (f"import json; from vllm_train.engine.llm import VLLMEngine; e = VLLMEngine({HUB_ID!r}); "
            "text = e.generate(['What is 47 + 38?'], max_tokens=4)[0][0].text; "
            "print(json.dumps({'path': e.model_path, 'text': text})); e.close()")
    api = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert api.returncode == 0, api.stderr[-2000:]
    result = json.loads(api.stdout.strip().splitlines()[-1])
    assert Path(result["path"]) == hub_home / "hub" / "models--test-org--tiny-llama" / "snapshots" / COMMIT
    assert json.loads(done.stdout.strip().splitlines()[-1])["completion"] == result["text"]


@pytest.mark.vllm
def test_grpo_run_from_one_flat_yaml_on_a_hub_id(hub_home, tmp_path):
    """A whole RL run in one flat YAML with TRL's names (model by hub id, max_steps, num_generations, lora_r);
    a bare --use-rslora on top."""
    out = tmp_path / "grpo"
    run = tmp_path / "rl.yaml"
    run.write_text(f"model: {HUB_ID}\nprompts: {Path(__file__).parents[1] / 'vllm_train/assets/data/rl_train.jsonl'}\n"
                   f"reward: vllm_train.toy:correctness_reward\noutput_dir: {out}\nmax_steps: 1\nnum_generations: 2\n"
                   f"rollout_batch_size: 2\nmax_completion_length: 4\nlora_r: 4\nno_progress: true\n")
    done = subprocess.run([sys.executable, "-m", "vllm_train", "grpo", "--config", str(run), "--use-rslora"],
                          capture_output=True, text=True, timeout=600)  # its own process: one engine per process
    assert done.returncode == 0, done.stderr[-2000:]
    saved = json.loads((out / "adapter_config.json").read_text())
    resolved = json.loads((out / "resolved_config.json").read_text())
    assert (saved["base_model_name_or_path"], saved["r"], saved["use_rslora"]) == (HUB_ID, 4, True)
    assert (resolved["num_steps"], resolved["group_size"], resolved["max_new_tokens"]) == (1, 2, 4)
