"""Fair, cancellable request execution: the heavy lane, client calls and their outcomes.

Long generations (``generate`` requests whose rows x characters exceed ``HEAVY_COST``) used to
share one Session, and so one inter-op thread pool, with everything else: two batch-64 x
10,000-character requests made a 20-character one wait 35 s (issue 15, item 7). They now run
in the *heavy lane*: a few Sessions of their own, one request per Session at a time, each with
a one-thread inter-op pool (``ConfigProto.session_inter_op_thread_pool``, as TF Serving gives
its batch threads a pool of their own), while short requests keep the version's main Session.
Heavy requests beyond the lane's slots wait in a bounded queue; past it they are refused with
RESOURCE_EXHAUSTED, so that waiting long requests cannot take every gRPC worker thread.

A running ``Session.run`` cannot be cancelled on its own: TensorFlow's only handles are
``RunOptions.timeout_in_ms`` and ``Session.close()``, which cancels every step running in that
Session. One heavy request per lane Session makes ``close()`` a per-request cancel: when a
client goes away (or its deadline passes), its lane Session is closed and loaded again.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable

import grpc
import tensorflow as tf

log = logging.getLogger(__name__)

# Rows x (characters to generate + prime bytes) above which a generate request is heavy: about
# a third of a second of a 2x128 LSTM on one core, far above interactive requests.
HEAVY_COST = 4096


class RequestError(Exception):
    """A request the server refuses, with the gRPC status code to answer."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class Call:
    """Whether the client of one RPC is still waiting; ``on_cancel`` hooks run when it leaves.

    The server makes one per RPC with ``Call.of(context)``: gRPC runs the callback when the RPC
    ends for any reason (client gone, deadline passed, or answered), so hooks are removed
    before the answer is sent.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._cancelled = False
        self._hooks: dict[int, Callable[[], None]] = {}

    @classmethod
    def of(cls, context) -> Call:
        """Returns the Call of a gRPC servicer context.

        Args:
            context: the servicer context of the RPC.

        Returns:
            A Call, already cancelled if the RPC has ended (its client left while it waited
            for a worker thread).
        """
        call = cls()
        if not context.add_callback(call.cancel):
            call.cancel()
        return call

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        """Marks the client gone and runs the hooks (from gRPC's thread)."""
        with self._lock:
            self._cancelled = True
            hooks, self._hooks = list(self._hooks.values()), {}
        for hook in hooks:
            hook()

    @contextlib.contextmanager
    def on_cancel(self, hook: Callable[[], None]):
        """Runs ``hook`` if the client leaves while the ``with`` block runs (at once if gone).

        Args:
            hook: a function of no arguments, called at most once, from gRPC's thread.
        """
        key = id(hook)
        with self._lock:
            gone = self._cancelled
            if not gone:
                self._hooks[key] = hook
        if gone:
            hook()
        try:
            yield
        finally:
            with self._lock:
                self._hooks.pop(key, None)


class Outcomes:
    """Counts how requests ended: completed, failed, deadline, cancelled, dropped, refused."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counts: collections.Counter = collections.Counter()

    def add(self, outcome: str) -> None:
        with self._lock:
            self._counts[outcome] += 1

    def snapshot(self) -> dict[str, int]:
        """Returns {outcome: count} so far."""
        with self._lock:
            return dict(self._counts)


class _Slot:
    """One lane Session; ``cancel`` closes it if the request it runs has lost its client."""

    def __init__(self, session):
        self.session = session
        self._lock = threading.Lock()
        self.running = False
        self.closed_for_cancel = False

    def cancel(self) -> None:
        with self._lock:
            if self.running and not self.closed_for_cancel:
                self.closed_for_cancel = True
                self.session.close()  # cancels the running step with CancelledError


class HeavyLane:
    """Runs heavy requests, one per Session, at most ``slots`` at once, ``queue`` waiting.

    Args:
        load: returns a new Session on the version (graph, variables restored, warmed up).
        slots: heavy requests running at once.
        queue: heavy requests waiting at most; more are refused with RESOURCE_EXHAUSTED.
        outcomes: where each request's outcome is counted.
    """

    def __init__(self, load: Callable[[], tf.compat.v1.Session], slots: int, queue: int,
                 outcomes: Outcomes):  # fmt: skip
        self._load, self._queue, self._outcomes = load, queue, outcomes
        self._cond = threading.Condition()
        self._free = [_Slot(load()) for _ in range(slots)]
        self._size = slots
        self.waiting = self.running = 0
        self._closed = False

    def run(self, fetches, feed, call: Call, options=None, deadline: float | None = None):
        """Runs one request in a lane Session once a slot is free; raises RequestError.

        Args:
            fetches: what ``Session.run`` fetches (graph tensor names).
            feed: the feed dict.
            call: the client's Call: waiting or running stops when the client leaves.
            options: RunOptions (the deadline's timeout).
            deadline: ``time.monotonic()`` after which waiting for a slot stops.

        Returns:
            What ``Session.run`` returns.
        """
        slot = self._take(call, deadline)
        try:
            with slot._lock:
                slot.running = True
            with call.on_cancel(slot.cancel):
                try:
                    if not slot.closed_for_cancel:  # else the client left as the slot was taken
                        return slot.session.run(fetches, feed, options=options)
                except (tf.errors.CancelledError, RuntimeError):  # RuntimeError: closed first
                    if not slot.closed_for_cancel:
                        raise
                self._outcomes.add("cancelled")
                log.info("stopped a long generation: its client left")
                raise RequestError(grpc.StatusCode.CANCELLED, "the client left")
        finally:
            self._give_back(slot)

    def _take(self, call: Call, deadline: float | None) -> _Slot:
        def wake():
            with self._cond:
                self._cond.notify_all()

        with self._cond:
            if self._size == 0 or self._closed:
                raise RequestError(
                    grpc.StatusCode.UNAVAILABLE, "this version can no longer run long generations"
                )
            if not self._free and self.waiting >= self._queue:
                self._outcomes.add("refused")
                raise RequestError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{self.running} long generations are running and {self.waiting} waiting; "
                    f"try again later, or ask for fewer rows or characters",
                )
            self.waiting += 1
            try:
                with call.on_cancel(wake):
                    while not self._free and not call.cancelled and not self._closed:
                        left = None if deadline is None else deadline - time.monotonic()
                        if left is not None and left <= 0:
                            break
                        self._cond.wait(left)
            finally:
                self.waiting -= 1
            if call.cancelled or self._closed:
                self._outcomes.add("dropped")
                raise RequestError(
                    grpc.StatusCode.CANCELLED, "the client left before the request started"
                )
            if not self._free:  # our clock reached the deadline before gRPC's did
                self._outcomes.add("deadline")
                raise RequestError(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    "deadline exceeded while waiting for the long generations before it",
                )
            self.running += 1
            return self._free.pop()

    def _give_back(self, slot: _Slot) -> None:
        if slot.closed_for_cancel and not self._closed:
            try:  # the closed Session is gone; the slot needs a fresh one
                slot = _Slot(self._load())
            except Exception:
                log.exception("cannot reload a Session for long generations; one slot fewer")
                slot = None
        with self._cond:
            self.running -= 1
            if slot is None:
                self._size -= 1
            elif self._closed or slot.closed_for_cancel:
                slot.session.close()
            else:
                slot.running = False
                self._free.append(slot)
            self._cond.notify_all()

    def close(self) -> None:
        """Closes the free Sessions; those running close when their request ends."""
        with self._cond:
            self._closed = True
            free, self._free = self._free, []
            self._cond.notify_all()
        for slot in free:
            slot.session.close()
