"""Cold adapters read off the engine thread: a loader thread reads and validates them in request order, so a step
never waits for a disk or a download, and the requests behind a cold one are not held up by it.

At most `window` loaded adapters wait for their requests to be admitted at a time (each request's claim is a
`Hold`, released when its adapter is in a slot or the request ends): a burst of thousands of distinct cold
adapters costs at most `window` host copies in memory beyond the cache's own, and the rest are read as room frees.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from backends.errors import Unavailable
from backends.lora.adapters.peft import LoRAAdapter

log = logging.getLogger(__name__)


class Hold:
    """One request's place in the window; `release` is idempotent."""

    def __init__(self, window: threading.Semaphore, on_release: Callable[[], None]):
        self._window, self._on_release = window, on_release
        self._lock = threading.Lock()
        self._released = False

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self._on_release()
        self._window.release()


@dataclass
class Loaded:
    adapter: LoRAAdapter | None
    hold: Hold

    def take(self) -> LoRAAdapter:
        """The adapter, once: the future holding this stays referenced (its callbacks form a cycle with the
        request until the garbage collector's next full pass), and must not keep the host copy alive that long."""
        adapter, self.adapter = self.adapter, None
        if adapter is None:
            raise RuntimeError("a loaded adapter was taken twice")
        return adapter


class Prefetcher:
    def __init__(self, window: int):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self._window = threading.Semaphore(window)
        self._lock = threading.Lock()
        self.held = 0  # loaded adapters whose requests wait for a slot
        self.max_held = 0  # the most at once (tests and the benchmark read it)
        self._closed = False
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="lora-loader")

    def _released(self) -> None:
        with self._lock:
            self.held -= 1

    def submit(self, load: Callable[[], LoRAAdapter]) -> "Future[Loaded]":
        """Run `load` on the loader thread once the window has room; its error is the future's."""
        def task() -> Loaded:
            while not self._window.acquire(timeout=0.5):
                if self._closed:  # never wait out a full window at exit
                    raise Unavailable("the model is shutting down; request not finished")
            with self._lock:
                self.held += 1
                self.max_held = max(self.max_held, self.held)
            hold = Hold(self._window, self._released)
            try:
                return Loaded(load(), hold)
            except BaseException:
                hold.release()
                raise

        return self._pool.submit(task)

    def shutdown(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)


def abandon(selections) -> None:
    """Give back the window places of a request refused after its adapters were selected (a bad stack, prompt or
    constraint): reads under way finish into the cache, their places return once they do."""
    for selection in selections:
        if selection.ready is not None:
            selection.ready.add_done_callback(_release_hold)


def _release_hold(future: Future) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().hold.release()
