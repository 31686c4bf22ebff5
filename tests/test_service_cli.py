"""`vllm-train service` on the command line: bad settings exit 2 with one `error:` line; a started service
(a subprocess, training only) answers the unmodified tinker SDK and stops on SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from vllm_train.cli import main

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402

KEY = "tml-cli-key-0123456789"


@pytest.mark.parametrize("flags,named", [
    (["--max-adapters", "0"], "--max-adapters"),
    (["--api-key", "not-tml"], "--api-key"),
    (["--host", "0.0.0.0"], "--host"),
    (["--max-lora-rank", "12"], "--max-lora-rank"),
    (["--port", "70000"], "--port"),
])
def test_bad_settings_exit_2_with_one_line(tiny_model, capsys, monkeypatch, flags, named):
    monkeypatch.delenv("VLLM_TRAIN_API_KEY", raising=False)
    assert main(["service", "--model", tiny_model, *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and named in err[0], err


def test_a_started_service_answers_the_sdk_and_stops_on_sigterm(tiny_model, tmp_path):
    env = dict(os.environ, VLLM_TRAIN_API_KEY=KEY)
    proc = subprocess.Popen([sys.executable, "-m", "vllm_train", "service", "--model", tiny_model, "--port", "0",
                             "--sampling", "false", "--state-dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, proc.stderr.read()[-2000:]
            match = re.search(r"at (http://127\.0\.0\.1:\d+)", line)
            url = match.group(1) if match else None
        assert url, "the service did not print its address"
        client = tinker.ServiceClient(base_url=url, api_key=KEY)
        for _ in range(100):  # the address is printed just before uvicorn binds it
            try:
                tc = client.create_lora_training_client(base_model=tiny_model, rank=8, train_unembed=False).result()
                break
            except Exception:  # noqa: BLE001
                time.sleep(0.1)
        ids = tc.get_tokenizer().encode("What is 2 + 2? 4")
        datum = types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                            loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)})
        out = tc.forward([datum], "cross_entropy").result()
        assert len(out.loss_fn_outputs[0]["logprobs"].tolist()) == len(ids) - 1
        assert tc.save_state("first").result().path.endswith("/weights/first")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert proc.returncode == 0, proc.stderr.read()[-2000:]
