"""A fake `RolloutEngine` for the RL loop's unit tests (seconds, no vLLM).

It samples completions from the trainer's own HF model (`attach`) -- as vLLM would from the synced
adapter -- and reports that model's log-probs of what it sampled, so on-policy importance weights are 1.
It records every call with the thread it ran in and the weight version it served, so tests can check the
loop's ordering: no adapter sync while a generation is in flight, rollouts from the expected version.
Every engine feature is also tested against real vLLM (test_rl.py, test_sampling_seeds.py, ...).
"""

from __future__ import annotations

import copy
import itertools
import threading

import torch

from vllm_train.engine.llm import AdapterRef, Sample


class FakeEngine:
    def __init__(self):
        self.events: list[tuple[str, str, int]] = []  # (call, thread name, served version)
        self._ids = itertools.count(1)
        self._busy = threading.Lock()
        self._model = None
        self._served_model = None  # a frozen copy of the model as of the last sync
        self.version = 0

    def attach(self, trainer) -> FakeEngine:
        self._model, self._tokenizer = trainer.model, trainer.tokenizer
        return self

    def sync_adapter(self, peft_state, peft_config, family: str = "live", shards=None) -> AdapterRef:
        peft_state = peft_state() if callable(peft_state) else peft_state
        assert not self._busy.locked(), "adapter synced while a generation was in flight"
        self.version += 1
        self._served_model = copy.deepcopy(self._model).eval()
        self.events.append(("sync", threading.current_thread().name, self.version))
        i = next(self._ids)
        return AdapterRef(f"{family}-v{i}", i, "/fake")

    @torch.no_grad()
    def generate(self, prompts, adapter=None, *, n=1, temperature=0.0, top_p=1.0, max_tokens=64, seed=None,
                 logprobs=False, stop=None, affinity=None) -> list[list[Sample]]:
        assert self._busy.acquire(blocking=False), "two threads drove the engine at once"
        try:
            self.events.append(("generate", threading.current_thread().name, self.version))
            generator = torch.Generator().manual_seed(0 if seed is None else seed)
            return [[self._sample(ids, temperature, max_tokens, generator) for _ in range(n)] for ids in prompts]
        finally:
            self._busy.release()

    def _sample(self, prompt_ids, temperature, max_tokens, generator) -> Sample:
        ids, out, lps = list(prompt_ids), [], []
        for _ in range(max_tokens):
            device = next(self._served_model.parameters()).device
            logits = self._served_model(input_ids=torch.tensor([ids], device=device)).logits[0, -1].float().cpu()
            logp = torch.log_softmax(logits / max(temperature, 1e-6), -1)
            tok = int(torch.multinomial(logp.exp(), 1, generator=generator)) if temperature > 0 else int(logp.argmax())
            ids.append(tok), out.append(tok), lps.append(float(logp[tok]))
            if tok == self._tokenizer.eos_token_id:
                break
        return Sample(self._tokenizer.decode(out, skip_special_tokens=True), out, lps, "stop")

    def remove_adapter(self, ref) -> None:
        pass

    def close(self) -> None:
        pass
