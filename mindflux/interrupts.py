"""Ctrl-C and SIGTERM that end a run cleanly, also after MindSpore has compiled a graph.

MindSpore 2.7.1 installs its own C-level SIGINT/SIGTERM handlers whenever it compiles a graph:
the process then dies with status -15 and no Python code runs. Re-installing Python's handlers
after a graph call works only until the next graph is compiled (measured: a second Cell, or a new
input shape, replaces them again), and a signal during a compile would still kill the process.

So rather than compete for the handler, `interrupt_guard()` blocks SIGINT and SIGTERM in the main
thread before MindSpore (or numpy's thread pools) start: every thread created later inherits the
mask, so no thread ever runs a handler for them. A small watcher thread takes them with sigwait and
raises `Interrupted` in the main thread (`_thread.interrupt_main`) at its next Python bytecode
outside MindSpore: raised inside MindSpore's graph parser (MindSpore code, or Python that its C++
calls back) it is reported as a compile error with a page of C++ log (measured), so there the
handler only arms a trace function that raises it as soon as the main thread runs a line of code
outside MindSpore again (tracing costs nothing until a signal arrives).
A second signal ends the process at once.

Limit: the watcher needs the GIL. A MindSpore call that holds it for long (msrun's `init()`
waiting for its cluster does) delays both signals until it returns; SIGKILL still works.

Enter the guard before importing mindspore or numpy; `Interrupted.exit_code` is 130 for SIGINT
and 143 for SIGTERM, as a shell reports a process ended by them.
"""

from __future__ import annotations

import _thread
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)
NOTICE_AFTER_S = 3.0  # a step or compile that outlasts this gets a "stopping..." notice
_MINDSPORE_CODE = f"{os.sep}mindspore{os.sep}"
_pending: list = [None]  # the signal waiting for the main thread to leave MindSpore's code
_root: list = [None]  # the outermost frame when the guard was entered: frames not reaching it are C++ callbacks


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; `exit_code` is what the process should end with."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.exit_code = 128 + int(signum)


def exit_code(err: BaseException) -> int:
    """130 for Ctrl-C (a plain KeyboardInterrupt too), 143 for SIGTERM."""
    return getattr(err, "exit_code", 128 + int(signal.SIGINT))


def _outermost(frame):
    while frame.f_back is not None:
        frame = frame.f_back
    return frame


def _outside_mindspore(frame) -> bool:
    """Whether `frame` is our code, reached from the guard's outermost frame without passing through MindSpore."""
    outer = frame
    while frame is not None:
        if _MINDSPORE_CODE in frame.f_code.co_filename:
            return False
        outer, frame = frame, frame.f_back
    return _root[0] is None or outer is _root[0]


def _trace(frame, event, arg):
    if _pending[0] is None or _MINDSPORE_CODE in frame.f_code.co_filename:
        return None
    if _outside_mindspore(frame):
        signum, _pending[0] = _pending[0], None
        sys.settrace(None)
        raise Interrupted(signum)
    return _trace


def _raise_interrupted(signum, frame):
    if _outside_mindspore(frame):
        raise Interrupted(signum)
    _pending[0] = signum  # raise it when the main thread next runs a line of our code
    while frame is not None:
        if _MINDSPORE_CODE not in frame.f_code.co_filename:
            frame.f_trace = _trace
        frame = frame.f_back
    sys.settrace(_trace)


def _watch(stop: threading.Event, prog: str) -> None:
    first, since, noticed = None, 0.0, False
    while not stop.is_set():
        info = signal.sigtimedwait(SIGNALS, 0.2)
        if info is not None and first is not None:  # a second signal means "now"
            print(f"{prog}: {signal.Signals(info.si_signo).name} again: quitting now", file=sys.stderr, flush=True)
            os._exit(128 + info.si_signo)
        if info is not None:
            first, since = info.si_signo, time.monotonic()
            _thread.interrupt_main(first)
        elif first is not None and not stop.is_set():
            if not noticed and time.monotonic() - since > NOTICE_AFTER_S:
                noticed = True
                print(f"{prog}: {signal.Signals(first).name} received; stopping after the current step "
                      "(send it again to quit at once)", file=sys.stderr, flush=True)


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
    _pending[0] = None
    _root[0] = _outermost(sys._getframe())
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(stop, prog), name="mindflux-interrupts", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
        _root[0] = _pending[0] = None
        sys.settrace(None)
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
        for s, handler in previous_handlers.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
