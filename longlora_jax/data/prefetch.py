"""Background-thread prefetching for a checkpointable iterator, with exact state.

Not grain's `ThreadPrefetchIterDataset`: in grain 0.2.18 a live one aborts the interpreter at
exit once JAX is loaded ("terminate called without an active exception") and its `__del__`
raises during finalization. This one stops its thread from an `atexit` hook.
"""

from __future__ import annotations

import atexit
import queue
import threading
import weakref
from typing import Any

import grain

_LIVE: weakref.WeakSet[PrefetchIterator] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for iterator in list(_LIVE):
        iterator.close()


class PrefetchIterator(grain.DatasetIterator):
    """Yields `parent`'s elements, computing up to `size` ahead in a daemon thread.

    `get_state()` is the parent's state right after the last element returned, so
    `set_state` resumes exactly there (prefetched elements are discarded and recomputed).
    """

    def __init__(self, parent: grain.DatasetIterator, size: int):
        super().__init__(parent)
        self._size = size
        self._state = parent.get_state()
        self._queue: queue.Queue | None = None
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None
        _LIVE.add(self)

    def _work(self, out: queue.Queue, stop: threading.Event) -> None:
        def put(item) -> None:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.05)
                    return
                except queue.Full:
                    continue

        try:
            while not stop.is_set():
                put((next(self._parent), self._parent.get_state(), None))
        except BaseException as err:  # handed to the consumer, which re-raises it
            put((None, None, err))

    def __next__(self) -> Any:
        if self._thread is None:
            self._queue, self._stop = queue.Queue(self._size), threading.Event()
            self._thread = threading.Thread(target=self._work, args=(self._queue, self._stop),
                                            daemon=True, name="longlora-data-prefetch")
            self._thread.start()
        item, state, err = self._queue.get()
        if err is not None:
            self.close()
            raise err
        self._state = state
        return item

    def get_state(self) -> dict:
        return self._state

    def set_state(self, state: dict) -> None:
        self.close()
        self._parent.set_state(state)
        self._state = self._parent.get_state()

    def close(self) -> None:
        """Stops the thread; a later `next()` starts a new one from the current state."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = self._queue = self._stop = None
        self._parent.set_state(self._state)
