"""Micro-batching: requests that arrive within a few milliseconds run as one mixed-adapter batch.

Each request carries its rows and one adapter name per row; the worker waits `window_ms` after the first
request, joins everything that arrived (up to `max_rows`), and runs each group of requests that can share a
forward pass (same kind, same sampling settings) through `AttachedModel.predict` with per-row adapters.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from peftkit.deploy.attach import AttachedModel


@dataclass
class Request:
    rows: list[dict]
    adapters: list[str]
    max_new_tokens: list[int] | None = None  # generation only: one limit per row
    sampling: tuple = ()  # requests batch together only with equal sampling settings, e.g. (("temperature", 0.7),)
    streamer: Any = None  # a `TokenStream` for a streamed (one-row) generation
    answer: asyncio.Future = field(default=None)

    @property
    def alone(self) -> bool:
        """A streamed or seeded request runs as a batch of its own: its tokens (or random draws) are its own."""
        return self.streamer is not None or dict(self.sampling).get("seed") is not None


@dataclass
class BatchStats:
    batches: int = 0
    rows: int = 0
    largest_batch: int = 0
    mixed_batches: int = 0  # batches whose rows used more than one adapter
    requests_per_batch: list[int] = field(default_factory=list)

    def record(self, requests: list[Request]) -> None:
        rows = sum(len(request.rows) for request in requests)
        self.batches += 1
        self.rows += rows
        self.largest_batch = max(self.largest_batch, rows)
        self.mixed_batches += len({name for request in requests for name in request.adapters}) > 1
        self.requests_per_batch = (self.requests_per_batch + [len(requests)])[-100:]


class MicroBatcher:
    def __init__(self, attached: AttachedModel, window_ms: float = 5.0, max_rows: int = 32):
        self.attached = attached
        self.window = window_ms / 1000
        self.max_rows = max_rows
        self.stats = BatchStats()
        self._queue: asyncio.Queue[Request] = asyncio.Queue()
        self._worker: asyncio.Task | None = None

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()

    async def submit(self, request: Request) -> list[dict]:
        request.answer = asyncio.get_running_loop().create_future()
        await self._queue.put(request)
        return await request.answer

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            deadline = asyncio.get_running_loop().time() + self.window
            while sum(len(r.rows) for r in batch) < self.max_rows:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            for group in _groups(batch):
                await self._run_group(group)

    async def _run_group(self, group: list[Request]) -> None:
        rows = [row for request in group for row in request.rows]
        adapters = [name for request in group for name in request.adapters]
        options: dict[str, Any] = dict(group[0].sampling)
        if group[0].max_new_tokens is not None:
            options["max_new_tokens"] = [limit for request in group for limit in request.max_new_tokens]
        if group[0].streamer is not None:
            options["streamer"] = group[0].streamer
        try:
            answers = await asyncio.to_thread(self.attached.predict, rows, adapters, **options)
        except Exception as exc:  # the worker keeps serving; only the request that caused the error gets it
            if len(group) > 1:  # one bad request must not fail the others it was batched with
                for request in group:
                    await self._run_group([request])
            elif not group[0].answer.done():
                group[0].answer.set_exception(exc)
            return
        self.stats.record(group)
        start = 0
        for request in group:
            if not request.answer.done():  # the client may have gone away
                request.answer.set_result(answers[start:start + len(request.rows)])
            start += len(request.rows)


def _groups(batch: list[Request]) -> list[list[Request]]:
    """Requests that can share one forward pass: classification with classification, generation by sampling."""
    groups: dict[tuple, list[Request]] = {}
    for request in batch:
        key = (id(request),) if request.alone else (request.max_new_tokens is None, request.sampling)
        groups.setdefault(key, []).append(request)
    return list(groups.values())
