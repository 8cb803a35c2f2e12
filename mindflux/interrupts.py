"""Ctrl-C and SIGTERM that end a run cleanly, also after MindSpore has compiled a graph.

MindSpore 2.7.1 installs its own C-level SIGINT/SIGTERM handlers whenever it compiles a graph:
the process then dies with status -15 and no Python code runs. Re-installing Python's handlers
after a graph call works only until the next graph is compiled (measured: a second Cell, or a new
input shape, replaces them again), and a signal during a compile would still kill the process.

So rather than compete for the handler, `interrupt_guard()` blocks SIGINT and SIGTERM in the main
thread before MindSpore (or numpy's thread pools) start: every thread created later inherits the
mask, so no thread ever runs a handler for them. A small watcher thread takes them with sigwait and
raises `Interrupted` in the main thread (`_thread.interrupt_main`), at its next Python bytecode,
i.e. after the current op, step or compile returns. A second signal ends the process at once.

Enter the guard before importing mindspore or numpy; `Interrupted.exit_code` is 130 for SIGINT
and 143 for SIGTERM, as a shell reports a process ended by them.
"""

from __future__ import annotations

import _thread
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)
NOTICE_AFTER_S = 3.0  # a step or compile that outlasts this gets a "stopping..." notice


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; `exit_code` is what the process should end with."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + int(signum)


def exit_code(err: BaseException) -> int:
    """130 for Ctrl-C (a plain KeyboardInterrupt too), 143 for SIGTERM."""
    return getattr(err, "exit_code", 128 + int(signal.SIGINT))


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def _watch(stop: threading.Event, prog: str) -> None:
    while not stop.is_set():
        info = signal.sigtimedwait(SIGNALS, 0.2)
        if info is None:
            continue
        _thread.interrupt_main(info.si_signo)
        # wait for the main thread to stop; a second signal means "now"
        again = signal.sigtimedwait(SIGNALS, NOTICE_AFTER_S)
        if again is None and not stop.is_set():
            print(f"{prog}: {signal.Signals(info.si_signo).name} received; stopping after the current step "
                  "(send it again to quit at once)", file=sys.stderr, flush=True)
            while again is None and not stop.is_set():
                again = signal.sigtimedwait(SIGNALS, 0.2)
        if again is not None:
            print(f"{prog}: {signal.Signals(again.si_signo).name} again: quitting now", file=sys.stderr, flush=True)
            os._exit(128 + again.si_signo)


@contextmanager
def interrupt_guard(prog: str = "mindflux") -> Iterator[None]:
    """Within the block, SIGINT/SIGTERM raise `Interrupted` in the main thread (see the module's docstring).
    Outside the main thread, or where signals cannot be masked, it does nothing."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous_handlers = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, _raise_interrupted)  # what interrupt_main(signum) runs in the main thread
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(stop, prog), name="mindflux-interrupts", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
        for s, handler in previous_handlers.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
