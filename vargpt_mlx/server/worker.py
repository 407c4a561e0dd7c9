"""One thread owns the model (MLX is not re-entrant): requests are jobs on a FIFO queue.

The thread loads the model itself, so every MLX call of the server happens on it. A job is a
function ``fn(job, pipeline)`` run on that thread; it reports to the request's event loop through
``job.emit(kind, value)`` (read with ``await job.next(request)``), and ends with a ``"done"`` event
holding its return value or an ``"error"`` event holding the exception it raised. A client that
goes away cancels its job: a queued job is skipped, a running one raises ``Cancelled`` from
``job.check()``, which the chat and image jobs call at every token and every scale.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from .errors import Cancelled, QueueFull

log = logging.getLogger("vargpt_mlx.server")


class Job:
    def __init__(self, fn: Callable[["Job", Any], Any], loop: asyncio.AbstractEventLoop):
        self.fn = fn
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self._cancel = threading.Event()

    # ---- worker side
    def emit(self, kind: str, value: Any = None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed (server shutting down)
            pass

    def check(self) -> None:
        """Raise ``Cancelled`` if the client went away (called at every token / scale)."""
        if self._cancel.is_set():
            raise Cancelled()

    # ---- request side
    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    async def next(self, request=None, poll_s: float = 0.25) -> tuple[str, Any]:
        """The next event; while waiting, a disconnected client cancels the job (``Cancelled``)."""
        while True:
            if request is None:
                return await self.events.get()
            try:
                return await asyncio.wait_for(self.events.get(), poll_s)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    self.cancel()
                    raise Cancelled() from None


class ModelWorker:
    """The model's thread and its queue.

    ``loader()`` runs on the thread and returns the pipeline (``wait_ready`` re-raises its
    error). ``max_queue``: most requests waiting behind the running one (``None``: no limit);
    beyond it ``submit`` raises ``QueueFull`` (503).
    """

    def __init__(self, loader: Callable[[], Any], max_queue: int | None = None):
        self.max_queue = max_queue
        self.pipeline = None
        self.waiting = 0
        self.busy = False
        self.served = 0
        self._q: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._current: Job | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._main, args=(loader,), name="vargpt-model", daemon=True)
        self._thread.start()

    def wait_ready(self, timeout: float | None = None):
        """Block until the model is loaded; returns the pipeline or raises the loader's error."""
        if not self._ready.wait(timeout):
            raise TimeoutError("the model did not load in time")
        if self._load_error is not None:
            raise self._load_error
        return self.pipeline

    def _main(self, loader) -> None:
        import mlx.core as mx

        try:
            self._serve(loader)
        finally:
            # MLX's advice for threads that used it: destroy this thread's streams before it ends
            # (otherwise the process may abort at exit, "terminate called without an active exception")
            self.pipeline = None
            mx.clear_streams()

    def _serve(self, loader) -> None:
        try:
            self.pipeline = loader()
        except BaseException as e:  # reported by wait_ready
            self._load_error = e
            self._ready.set()
            return
        self._ready.set()
        while True:
            job = self._q.get()
            if job is None:
                return
            with self._lock:
                self.waiting -= 1
                self.busy = True
                self._current = job
            try:
                if job.cancelled or self._stopping:
                    raise Cancelled()
                outcome = ("done", job.fn(job, self.pipeline))
            except BaseException as e:  # noqa: BLE001 - every failure goes back to its request
                if not isinstance(e, (Cancelled, ValueError)):
                    log.exception("job failed")
                outcome = ("error", e)
            # idle before the answer leaves: a client that reads its answer and then asks /health
            # must not see this finished job as still running
            with self._lock:
                self.busy = False
                self._current = None
                self.served += 1
            job.emit(*outcome)

    def submit(self, fn: Callable[[Job, Any], Any]) -> Job:
        """Queue ``fn`` (call from the event loop); ``QueueFull`` past ``max_queue``."""
        job = Job(fn, asyncio.get_running_loop())
        with self._lock:
            would_wait = self.waiting + (1 if self.busy else 0)
            if self.max_queue is not None and would_wait > self.max_queue:
                raise QueueFull(self.max_queue)
            self.waiting += 1
        self._q.put(job)
        return job

    def stop(self, timeout: float = 10.0) -> None:
        """End the thread: the running job stops at its next token or scale, queued ones are refused."""
        with self._lock:
            self._stopping = True
            if self._current is not None:
                self._current.cancel()
        self._q.put(None)
        self._thread.join(timeout)
