"""Results of queued requests, by request id, as the SDK's ``retrieve_future`` polls them.

A request is answered at once with its id; the worker thread later completes it with a JSON object or
protobuf bytes, or fails it (``{"error", "category"}``). A poll waits on the event loop up to a time limit
for the result (so the SDK's poll loop, which re-asks immediately on "try again", does not spin) and is
answered ``try_again`` if still pending. Each future belongs to the API key that created it.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class FutureRecord:
    request_id: str
    owner: str
    kind: str  # "ForwardBackward", "OptimStep", ... (for error messages)
    created: float = field(default_factory=time.monotonic)
    done: bool = False
    result: dict | bytes | None = None  # JSON object or protobuf bytes
    error: str | None = None
    category: str = "user"  # the SDK's RequestErrorCategory: "user", "server", "unknown"
    event: asyncio.Event | None = None


class FutureStore:
    """Thread-safe: the HTTP loop creates and polls, the worker thread completes."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None, keep: int = 10_000):
        self._records: dict[str, FutureRecord] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._loop = loop
        self._keep = keep  # finished records kept for polling; older ones are dropped first

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def create(self, owner: str, kind: str) -> FutureRecord:
        record = FutureRecord(f"req-{next(self._ids)}", owner, kind)
        if self._loop is not None:
            record.event = asyncio.Event()
        with self._lock:
            self._records[record.request_id] = record
            self._trim()
        return record

    def get(self, request_id: str, owner: str) -> FutureRecord | None:
        with self._lock:
            record = self._records.get(request_id)
        return record if record is not None and record.owner == owner else None

    def complete(self, request_id: str, result: dict | bytes) -> None:
        self._finish(request_id, result=result)

    def fail(self, request_id: str, error: str, category: str = "user") -> None:
        self._finish(request_id, error=error, category=category)

    def _finish(self, request_id: str, **values: Any) -> None:
        with self._lock:
            record = self._records.get(request_id)
            if record is None or record.done:
                return
            for name, value in values.items():
                setattr(record, name, value)
            record.done = True
        if record.event is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(record.event.set)

    async def wait(self, record: FutureRecord, timeout: float) -> bool:
        """True once `record` is done; False if still pending after `timeout` seconds."""
        if record.done or record.event is None:
            return record.done
        try:
            await asyncio.wait_for(record.event.wait(), timeout)
        except TimeoutError:
            pass
        return record.done

    def _trim(self) -> None:
        if len(self._records) <= self._keep:
            return
        finished = [rid for rid, r in self._records.items() if r.done]
        for rid in finished[: len(self._records) - self._keep]:
            del self._records[rid]
