"""The one thread that touches the model, the adapters and the vLLM engine: it drains a queue of jobs in
arrival order. Forward/backward jobs queued together are taken as one batch -- of any runs, as long as no
earlier job of the same run (an optimizer step, a save) is still waiting, so each run's requests keep their
order -- and computed in one pass. Sample jobs queued one after another (of any tenants) go to vLLM as one
batch.

A job's failure fails its future only; the thread never dies of one.
"""

from __future__ import annotations

import logging
import threading
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from vllm_train.errors import VllmTrainError
from vllm_train.service.datums import CheckedBatch
from vllm_train.service.futures import FutureRecord, FutureStore
from vllm_train.service.problems import ServiceProblem
from vllm_train.service.training import Trainer

log = logging.getLogger("vllm_train.service")


@dataclass
class Job:
    record: FutureRecord
    model_id: str | None  # the run whose order the job keeps (None: no run, e.g. sampling the base)
    action: Callable[[], dict | bytes] | None = None  # a job run on its own
    batch: CheckedBatch | None = None  # or a forward/backward, batched with others
    forward_only: bool = False
    sample: tuple | None = None  # or a sample request (session, spec), batched with the sample jobs after it

    @property
    def batchable(self) -> bool:
        return self.batch is not None


MAX_SAMPLE_BATCH = 256  # sample requests in one vLLM call


class Worker:
    def __init__(self, futures: FutureStore, trainer: Trainer, max_batch_tokens: int,
                 sample_many: Callable[[list], list] | None = None):
        self.futures = futures
        self.sample_many = sample_many  # Sampler.sample_many: [(session, spec)] -> [bytes | problem]
        self.trainer = trainer
        self.max_batch_tokens = max_batch_tokens
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._held = 0
        self._thread = threading.Thread(target=self._loop, name="vllm-train-service-worker", daemon=True)
        self.batches: list[int] = []  # jobs per forward/backward pass, newest last (for tests and metrics)
        self.sample_batches: list[int] = []  # sample requests per vLLM call

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        with self._cond:
            self._queue.append(job)
            self._cond.notify()

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Queue jobs without starting any until the block ends; jobs queued meanwhile batch as usual (a
        maintenance pause, and how tests make requests of several runs meet in one pass)."""
        with self._cond:
            self._held += 1
        try:
            yield
        finally:
            with self._cond:
                self._held -= 1
                self._cond.notify_all()

    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def _take(self) -> list[Job] | None:
        """The next job, or the next batch of forward/backward jobs: every queued one whose run has no
        earlier unbatchable job waiting, up to the token budget of one pass."""
        with self._cond:
            while (not self._queue or self._held) and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            first = self._queue.popleft()
            if first.sample is not None:
                taken = [first]
                while self._queue and self._queue[0].sample is not None and len(taken) < MAX_SAMPLE_BATCH:
                    taken.append(self._queue.popleft())
                return taken
            if not first.batchable:
                return [first]
            taken, kept, blocked = [first], deque(), set()
            tokens = first.batch.tokens
            while self._queue:
                job = self._queue.popleft()
                fits = (job.batchable and job.model_id not in blocked
                        and tokens + job.batch.tokens <= self.max_batch_tokens)
                if fits:
                    taken.append(job)
                    tokens += job.batch.tokens
                else:
                    kept.append(job)
                    blocked.add(job.model_id)
            self._queue = kept
            return taken

    def _loop(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            if jobs[0].batchable:
                self._run_batch(jobs)
            elif jobs[0].sample is not None:
                self._run_samples(jobs)
            else:
                self._run_one(jobs[0])

    def _run_one(self, job: Job) -> None:
        try:
            self.futures.complete(job.record.request_id, job.action())
        except Exception as exc:  # noqa: BLE001 -- a job's failure is its future's, never the thread's
            self._fail(job, exc)

    def _run_batch(self, jobs: list[Job]) -> None:
        live = []
        for job in jobs:
            run = self.trainer.runs.get(job.model_id)
            if run is None:
                self.futures.fail(job.record.request_id, f"model_id: model {job.model_id!r} was unloaded")
            else:
                live.append((job, run))
        if not live:
            return
        try:
            outputs = self.trainer.forward_backward([(run, job.batch, job.forward_only) for job, run in live])
        except Exception as exc:  # noqa: BLE001
            for job, _ in live:
                self._fail(job, exc)
            return
        self.batches.append(len(live))
        for (job, _), output in zip(live, outputs):
            if isinstance(output, ServiceProblem):
                self.futures.fail(job.record.request_id, output.message)
            else:
                self.futures.complete(job.record.request_id, output)

    def _run_samples(self, jobs: list[Job]) -> None:
        try:
            outputs = self.sample_many([job.sample for job in jobs])
        except Exception as exc:  # noqa: BLE001
            for job in jobs:
                self._fail(job, exc)
            return
        self.sample_batches.append(len(jobs))
        for job, output in zip(jobs, outputs):
            if isinstance(output, ServiceProblem):
                self.futures.fail(job.record.request_id, output.message)
            else:
                self.futures.complete(job.record.request_id, output)

    def _fail(self, job: Job, exc: Exception) -> None:
        if isinstance(exc, (ServiceProblem, VllmTrainError)):  # the caller's input: a user error
            self.futures.fail(job.record.request_id, getattr(exc, "message", str(exc)), "user")
            return
        log.error("%s %s failed:\n%s", job.record.kind, job.record.request_id, traceback.format_exc())
        self.futures.fail(job.record.request_id, f"internal error in {job.record.kind}: {type(exc).__name__}: {exc}",
                          "server")
