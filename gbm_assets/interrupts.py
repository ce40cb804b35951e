"""Ctrl-C and SIGTERM that reached the command, even those Dagster's run swallowed.

While `execute_in_process` runs, Dagster replaces the SIGINT/SIGTERM handlers with one that only
notes the signal, and raises it inside a step; a signal that lands between steps (while Dagster
writes its event log) is noted, then forgotten when the run ends, and the run reports success. The
command would then go on to the next plate or stage as if never told to stop. Python writes every
signal it handles to the wakeup file descriptor (`signal.set_wakeup_fd`), whichever handler runs,
so the command reads them back from there after each run.
"""

from __future__ import annotations

import os
import signal
import socket
import threading

_STOP_SIGNALS = {int(signal.SIGINT), int(signal.SIGTERM)}
_reader: socket.socket | None = None
_writer: socket.socket | None = None


def _forget_in_child() -> None:
    """A forked child must not report its own signals into the parent's record."""
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:  # not the main thread: nothing was set for it
        pass


def install() -> None:
    """Make SIGTERM stop the command as Ctrl-C does (KeyboardInterrupt), and keep a record of both.

    Call once, from the main thread, before any run (the CLI's entry point does); later calls and
    calls from other threads do nothing. Replaces any wakeup fd set before (asyncio's, if any).
    """
    global _reader, _writer
    if _reader is not None or threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    reader, writer = socket.socketpair()
    reader.setblocking(False)
    writer.setblocking(False)
    signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    os.register_at_fork(after_in_child=_forget_in_child)
    _reader, _writer = reader, writer


def raise_if_received() -> None:
    """Raise KeyboardInterrupt if SIGINT or SIGTERM reached the process since the last call.

    Reads (and so clears) the record kept since `install`; does nothing when it was never installed.
    """
    if _reader is None:
        return
    received: set[int] = set()
    while True:
        try:
            data = _reader.recv(4096)
        except (BlockingIOError, InterruptedError):
            break
        if not data:
            break
        received.update(data)
    stop = sorted(received & _STOP_SIGNALS)
    if stop:
        raise KeyboardInterrupt(f"{signal.Signals(stop[-1]).name} received")
