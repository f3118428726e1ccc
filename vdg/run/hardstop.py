"""A stop signal that always ends the process: the graceful SIGINT/SIGTERM handling gets a few seconds, then a hard
exit. Plumbing only: imports nothing from vdg and has no opinion on what a graceful stop does.

Why: Python runs a signal handler (Lightning's graceful SIGTERM, the KeyboardInterrupt of SIGINT) only when the
main thread is back in the interpreter. A main thread stuck inside a native operation (oneDNN once spun forever in
a convolution's backward pass) never gets there, so the process ignored SIGTERM and `timeout` could not stop it.
Python's C-level handler still writes the signal number to the wakeup fd (`signal.set_wakeup_fd`) at once, from
any thread; a watchdog thread reading that fd ends the process when the Python-level handler has not run within
`grace_s` seconds (the stop was never acknowledged) or when a second signal arrives (the user insists). Native
operations release the GIL, so the watchdog runs while the main thread is stuck in one.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import NoReturn

GRACE_S = 10.0  # one native op of a training step is far shorter; checkpoint writes happen after acknowledgement
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _Watchdog:
    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.acknowledged = threading.Event()
        self.reader, self.writer = socket.socketpair()
        self.writer.setblocking(False)  # the C-level handler must never block on it
        self.thread = threading.Thread(target=self._watch, name="vdg-hardstop", daemon=True)
        self.previous: dict[int, object] = {}

    def handler(self, signum: int, frame: FrameType | None) -> None:
        """The Python-level handler: the main thread is alive, so the graceful stop goes ahead. Lightning chains
        this handler under its own during `fit`; where it is the only one, the signal's usual action follows."""
        self.acknowledged.set()
        if signal.getsignal(signum) != self.handler:  # chained: the handler on top stops the run
            return
        previous = self.previous.get(signum)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:  # SIGTERM's default: end the process as without this guard
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def _watch(self) -> None:
        first: int | None = None
        deadline = 0.0
        while True:
            if first is not None and not self.acknowledged.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._exit(first, f"was not acknowledged within {self.grace_s:g} s: the main thread is stuck "
                                      "inside a native operation")
                self.reader.settimeout(min(remaining, 0.25))
            else:
                self.reader.settimeout(None)
            try:
                data = self.reader.recv(64)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:  # the guard closed: the block is over
                return
            for signum in data:
                if signum not in SIGNALS:
                    continue
                if first is not None:
                    self._exit(signum, "arrived a second time")
                first, deadline = signum, time.monotonic() + self.grace_s

    def _exit(self, signum: int, why: str) -> NoReturn:
        name = signal.Signals(signum).name
        try:
            sys.stderr.write(f"vdg: {name} {why}; ending the process now (exit {128 + signum}). "
                             "Where each thread was:\n")
            sys.stderr.flush()
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        finally:
            os._exit(128 + signum)


@contextmanager
def hard_stop(grace_s: float = GRACE_S) -> Iterator[None]:
    """Within this block a SIGINT/SIGTERM whose graceful handling has not started within `grace_s` seconds, or a
    second one, ends the process with exit status 128 + signal number and a stack dump on stderr.

    Enter it before Lightning registers its handlers (before `trainer.fit`): Lightning chains the handler it finds.
    Outside the main thread (where signals cannot be handled) it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    dog = _Watchdog(grace_s)
    try:
        old_fd = signal.set_wakeup_fd(dog.writer.fileno(), warn_on_full_buffer=False)
    except ValueError:  # not the main interpreter
        yield
        return
    for signum in SIGNALS:
        dog.previous[signum] = signal.getsignal(signum)
        signal.signal(signum, dog.handler)
    dog.thread.start()
    try:
        yield
    finally:
        for signum, previous in dog.previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        signal.set_wakeup_fd(old_fd)
        dog.writer.close()  # the watchdog reads EOF and returns
        dog.thread.join(timeout=5)
        dog.reader.close()
