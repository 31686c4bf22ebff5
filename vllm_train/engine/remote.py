"""RL rollouts from running vLLM OpenAI servers (`vllm-train serve`, any machine): a `RolloutEngine`.

Each adapter version is published to every replica with `AdapterPublisher` (atomic: all replicas serve
it, or the publish fails and the previous version keeps serving) before anything samples from it.
Sampling goes through ``POST /v1/completions`` with the prompt's token ids, one request per prompt (each
prompt has its own seed, `request_seeds`), spread over the replicas by a thread pool. The answer carries
the sampled token ids (``return_token_ids``) and each one's log-prob (``logprobs=0`` gives exactly the
sampled token's, in ``logprobs.token_logprobs``).

Reliability: a replica that fails a request (refused, reset, timed out, a 5xx, an adapter it does not
serve, a malformed answer) is left out for the rest of that call and the request goes to the next
replica; a prompt is tried once per replica at most. A batch comes back whole or not at all: when no
replica can serve a prompt, `generate` raises `VllmTrainError` naming every replica and its error.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from vllm_train.engine.http_client import HTTPFailure, parse_urls, request
from vllm_train.engine.llm import AdapterRef, PeftState, Prompt, Sample, request_seeds
from vllm_train.engine.publish import AdapterPublisher
from vllm_train.errors import VllmTrainError

API_KEY_VARIABLES = ("VLLM_TRAIN_API_KEY", "VLLM_API_KEY")  # the serving side's variable, then vLLM's own
# Status codes that say the request itself is wrong: every replica would answer the same.
_REQUEST_ERRORS = (400, 401, 403, 413, 422)
# The server's own sampling defaults (a model's generation_config.json, e.g. top_k=20 or a repetition
# penalty) would change the sampling distribution behind the trainer's back: every field is sent.
_NEUTRAL_SAMPLING = {"top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0,
                     "frequency_penalty": 0.0}


class _BadAnswer(Exception):
    pass


def _post_json(url: str, body: dict | None, timeout: float, api_key: str | None) -> Any:
    """POST `body` (GET without one): the decoded answer, or `HTTPFailure` with a one-line reason
    (refused, reset, timed out, cut short, or the server's own error)."""
    return request("POST" if body is not None else "GET", url, body, timeout=timeout, api_key=api_key)


class ServerRolloutEngine:
    """A `RolloutEngine` on running vLLM OpenAI server replicas (`urls`) that serve `model_name`.

    `model_name`: the trainer's base model (its tokenizer encodes text and chat prompts; token-id prompts
    go as they are). `api_key`: sent to the servers (default: $VLLM_TRAIN_API_KEY, else $VLLM_API_KEY).
    `name`: the published adapter name (default: the `family` the trainer syncs, e.g. ``rl-policy``):
    versions are served as ``NAME-v1``, ``NAME-v2``, ...; two runs on the same servers need two names.
    `keep`: versions left loaded per name (see `AdapterPublisher`; the newest two by default, so a
    rollout in flight finishes on its version). `stage_dir`: where published versions are copied; the
    servers must read it (a shared filesystem, same path, for servers on other machines). `timeout`:
    seconds per request before its replica counts as failed. `max_concurrency`: requests in flight.
    """

    def __init__(self, urls: str | Sequence[str], model_name: str, api_key: str | None = None, *,
                 name: str | None = None, keep: int = 2, stage_dir: str | Path | None = None,
                 timeout: float = 300.0, max_concurrency: int = 64):
        self.urls = parse_urls(urls)
        self.model_name = str(model_name)
        self.name = name
        self.timeout = timeout
        # AdapterPublisher takes `api_key` with the serving-auth change; left out, it reads the same variables
        explicit = {"api_key": api_key} if api_key is not None else {}
        self.api_key = api_key if api_key is not None else next(
            (os.environ[v] for v in API_KEY_VARIABLES if os.environ.get(v)), None)
        self.publisher = AdapterPublisher(self.urls, keep=keep, stage_dir=stage_dir, timeout=timeout, **explicit)
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="vllm-train-remote")
        self._tokenizer = None
        self._base_name: str | None = None
        self._processed_checked: set[str] = set()  # replicas known to return processed log-probs
        self.requests_served: Counter[str] = Counter()  # replica URL -> requests it answered
        self.failed: dict[str, str] = {}  # replica URL -> its error, from the newest `generate` call

    # ---- adapters ------------------------------------------------------------------------------
    def sync_adapter(self, peft_state: PeftState, peft_config: dict, family: str = "live",
                     shards: dict[str, torch.Tensor] | None = None) -> AdapterRef:
        """Publish in-memory adapter weights (PEFT names, unscaled B) as the next version of the name on
        every replica; the handle's `name` is the served version (e.g. ``rl-policy-v3``). `shards` (a
        tensor-parallel trainer's own) are not needed: servers load the full files."""
        from vllm_train.lora.peft_io import write_adapter_dir

        peft_state = peft_state() if callable(peft_state) else peft_state
        state = {k: v.detach().float().contiguous().cpu() for k, v in peft_state.items()}
        root = "/dev/shm" if os.path.isdir("/dev/shm") else None
        tmp = Path(tempfile.mkdtemp(prefix="vllm-train-remote-", dir=root))
        try:
            write_adapter_dir(tmp, state, peft_config)
            published = self.publisher.publish_detailed(tmp, self.name or family)  # copies the files
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return AdapterRef(published.served_name, published.version, published.path)

    def remove_adapter(self, ref: AdapterRef) -> None:
        """Unload the version from every replica that answers (best effort: one already down is skipped)."""
        for url in self.urls:
            try:
                _post_json(f"{url}/v1/unload_lora_adapter", {"lora_name": ref.name}, self.timeout, self.api_key)
            except HTTPFailure as exc:
                print(f"warning: could not unload {ref.name} from {url}: {exc}", file=sys.stderr, flush=True)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    # ---- generation ----------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Prompt], adapter: AdapterRef | None = None, *, n: int = 1,
                 temperature: float = 0.0, top_p: float = 1.0, max_tokens: int = 64, seed: int | None = None,
                 logprobs: bool = False, stop: list[str] | None = None,
                 affinity: Sequence[int] | None = None) -> list[list[Sample]]:
        """`n` completions per prompt, in prompt order; the whole batch or `VllmTrainError`. `affinity`: a
        key per prompt; prompts with equal keys go to the same replica while it answers (an episode's turns:
        that replica's prefix cache holds its earlier turns), else prompts are spread by position."""
        model = adapter.name if adapter is not None else self._base_model()
        ids = [self._token_ids(p) for p in prompts]
        if logprobs and temperature not in (0.0, 1.0) and ids:
            self._check_processed_logprobs(model, ids[0], temperature)
        bodies = [{"model": model, "prompt": p, "n": n, "temperature": temperature, "top_p": top_p,
                   "max_tokens": max_tokens, "seed": s, "logprobs": 0 if logprobs else None, "stop": stop or [],
                   "return_token_ids": True, "skip_special_tokens": True, **_NEUTRAL_SAMPLING}
                  for p, s in zip(ids, request_seeds(seed, len(ids)))]
        return self._spread(bodies, lambda answer: _samples(answer, n, logprobs),
                            list(affinity) if affinity is not None else list(range(len(bodies))))

    def _spread(self, bodies: list[dict], parse, keys: list[int]) -> list:
        """One request per body over the replicas (body i to the replica its key picks); a failed replica's
        requests go to the others."""
        failed: dict[str, str] = {}
        lock = threading.Lock()

        def run(i: int):
            while True:
                with lock:
                    live = [u for u in self.urls if u not in failed]
                if not live:
                    errors = "; ".join(f"{u}: {e}" for u, e in failed.items())
                    raise VllmTrainError(f"no rollout server could answer request {i + 1} of {len(bodies)} "
                                         f"(every replica failed: {errors}); the batch was not returned")
                url = live[keys[i] % len(live)]  # spread over the replicas still answering
                try:
                    result = parse(_post_json(f"{url}/v1/completions", bodies[i], self.timeout, self.api_key))
                except HTTPFailure as exc:
                    if exc.status in _REQUEST_ERRORS:
                        raise VllmTrainError(f"rollout server {url} rejected the request: {exc}") from None
                    error = str(exc)
                except _BadAnswer as exc:
                    error = f"malformed answer ({exc})"
                else:
                    with lock:
                        self.requests_served[url] += 1
                    return result
                with lock:
                    if url not in failed:
                        failed[url] = error
                        print(f"warning: rollout server {url} failed ({error}); its requests go to the other "
                              f"replicas", file=sys.stderr, flush=True)

        futures = [self._pool.submit(run, i) for i in range(len(bodies))]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        finally:
            self.failed = failed

    def _check_processed_logprobs(self, model: str, prompt_ids: list[int], temperature: float) -> None:
        """Sampling at a temperature other than 1 needs the log-probs of the distribution sampled from,
        which vLLM returns only when started with ``--logprobs-mode processed_logprobs``. Each replica is
        probed once: the gap between two top log-probs is the logit gap divided by the temperature in
        that mode, and the raw logit gap otherwise."""
        for url in self.urls:
            if url in self._processed_checked:
                continue
            gaps = []
            for t in (1.0, temperature):
                body = {"model": model, "prompt": prompt_ids, "max_tokens": 1, "temperature": t, "top_p": 1.0,
                        "seed": 0, "logprobs": 5, "return_tokens_as_token_ids": True, **_NEUTRAL_SAMPLING}
                try:
                    top = _post_json(f"{url}/v1/completions", body, self.timeout, self.api_key)[
                        "choices"][0]["logprobs"]["top_logprobs"][0]
                except (HTTPFailure, KeyError, IndexError, TypeError):
                    break  # a replica that does not answer is the rollout's to handle
                best = sorted(top.values(), reverse=True)[:5]  # the top 5 (a sampled token outside them ranks below)
                gaps.append(best[0] - best[-1])
            if len(gaps) < 2:
                continue
            gap_at_1, gap = gaps
            if gap_at_1 < 1e-5:
                continue  # tied top tokens: nothing to tell the modes apart by
            if abs(gap - gap_at_1) < abs(gap - gap_at_1 / temperature):
                raise VllmTrainError(
                    f"rollout server {url} returns raw log-probs, but sampling at temperature {temperature} "
                    f"needs the sampled distribution's: start the servers with `vllm-train serve ... "
                    f"--logprobs-mode processed_logprobs` (vLLM: --logprobs-mode processed_logprobs), or "
                    f"train at temperature 1")
            self._processed_checked.add(url)

    # ---- prompts and the base model ------------------------------------------------------------
    def _token_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, list) and (not prompt or isinstance(prompt[0], int)):
            return list(prompt)
        if self._tokenizer is None:
            from vllm_train.models import load_tokenizer

            self._tokenizer = load_tokenizer(self.model_name)
        from vllm_train.data.tokenize import prompt_ids

        return prompt_ids(self._tokenizer, prompt)

    def _base_model(self) -> str:
        """The name the replicas serve the base model under (``GET /v1/models``)."""
        if self._base_name is None:
            errors = []
            for url in self.urls:
                try:
                    cards = _post_json(f"{url}/v1/models", None, min(self.timeout, 30.0), self.api_key)["data"]
                    self._base_name = next(c["id"] for c in cards if not c.get("parent"))
                    break
                except (HTTPFailure, KeyError, TypeError, StopIteration) as exc:
                    errors.append(f"{url}: {exc}")
            else:
                raise VllmTrainError(f"no rollout server lists its base model ({'; '.join(errors)})")
        return self._base_name


def _samples(answer: Any, n: int, logprobs: bool) -> list[Sample]:
    """The `n` samples of one completions answer, checked whole: a short or partial answer is an error."""
    try:
        choices = sorted(answer["choices"], key=lambda c: c["index"])
        if [c["index"] for c in choices] != list(range(n)):
            raise _BadAnswer(f"{len(choices)} choices for n={n}")
        samples = []
        for c in choices:
            ids = [int(t) for t in c["token_ids"]]
            lps = None
            if logprobs:
                lps = [float(x) for x in c["logprobs"]["token_logprobs"]]
                if len(lps) != len(ids):
                    raise _BadAnswer(f"{len(lps)} log-probs for {len(ids)} tokens")
            samples.append(Sample(c["text"], ids, lps, c.get("finish_reason")))
        return samples
    except (KeyError, TypeError, ValueError) as exc:
        raise _BadAnswer(f"{type(exc).__name__}: {exc}") from None
