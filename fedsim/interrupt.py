"""Ctrl-C and SIGTERM: stop a run after its current round/step, resumably.

`fedsim run` and `fedsim compare` install `handling()` in the main thread of the CLI process.
While a training loop runs (`deferred()`), the first SIGINT or SIGTERM only sets a flag: the
loop (`fedsim/loop.py`, in whichever thread it runs: the main one, or Flower's ServerApp
thread on the Ray backend) finishes its round/step, writes its metrics and a checkpoint and
raises `RunInterrupted`; the CLI prints one line naming the command that resumes it and exits
130. Outside a loop (model building, planning) the first signal raises KeyboardInterrupt as
Python would. A second signal ends the process at once (exit 130, no traceback): the ledger
is still consistent, since a release is recorded (fsync'ed) before its noise is drawn, and
every process it started (a local Ray's) is killed with it.

Without `handling()` (the Python API, a sweep's worker processes) signals keep Python's
defaults; only a Ray run's waiting main thread turns a first KeyboardInterrupt into a stop
request (`wait_for`), as it cannot stop Flower's threads otherwise.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_CODE = 130

_requested = threading.Event()
_lock = threading.Lock()
_state = {"installed": False, "signals": 0, "deferring": 0}
_resume: list[str] = []  # commands that continue what is running, outermost first


class RunInterrupted(KeyboardInterrupt):
    """A run stopped on request after `key` `step`, its checkpoint written."""

    def __init__(self, key: str, step: int):
        super().__init__(f"interrupted after {key} {step}")
        self.key, self.step = key, int(step)
        self.resume = resume_command()


def message(exc: KeyboardInterrupt) -> str:
    """The one console line of an interruption: what stopped and, when known, the command that
    resumes it (`resumable` sets `exc.resume`)."""
    what = str(exc) if isinstance(exc, RunInterrupted) else "interrupted"
    command = getattr(exc, "resume", None)
    return what + (f"; resume with: {command}" if command else "")


def requested() -> bool:
    """Whether a stop was requested (the loop checks this between rounds/steps)."""
    return _requested.is_set()


def request() -> None:
    """Ask the running loop to stop after its round/step."""
    _requested.set()


def installed() -> bool:
    return _state["installed"]


def resume_command() -> str | None:
    """The outermost registered command that continues the current work (see `resumable`); after
    an interruption has left every `resumable` block, the command it carried out of them: a second
    signal in the last milliseconds before exit still prints how to resume."""
    return _resume[0] if _resume else _state.get("interrupted_resume")


@contextlib.contextmanager
def resumable(command: str):
    """While inside, an interruption is resumed with `command` (an outer one wins: a comparison
    is resumed as a comparison, not as its ULS run)."""
    _resume.append(command)
    try:
        yield
    except KeyboardInterrupt as exc:  # the outermost command wins: it is set last
        exc.resume = command
        _state["interrupted_resume"] = command
        raise
    finally:
        _resume.remove(command)


@contextlib.contextmanager
def deferred():
    """While inside, a first signal is a stop request for a loop that checks `requested()`."""
    with _lock:
        _state["deferring"] += 1
    try:
        yield
    finally:
        with _lock:
            _state["deferring"] -= 1


def _kill_descendants() -> None:
    """SIGKILL every process this one started, and theirs (a local Ray: GCS, raylet, its agents
    and workers). Ray's own fate-sharing kills the GCS and the raylet with their parent, but the
    raylet's agents would outlive them for minutes, retrying the dead GCS."""
    try:
        import psutil  # a dependency of peft and accelerate
    except ImportError:
        return
    with contextlib.suppress(psutil.Error, OSError):
        for proc in psutil.Process().children(recursive=True):  # all listed before any dies
            with contextlib.suppress(psutil.Error, OSError):
                proc.kill()


def _hard_exit() -> None:
    """The second signal: out at once. Buffered console output is flushed; the line is written
    with os.write (a handler may run in the middle of a print)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, RuntimeError):  # e.g. a reentrant flush: the line still goes out
            stream.flush()
    command = resume_command()
    line = "interrupted again: stopped at once" + (f"; resume with: {command}" if command else "")
    try:
        _kill_descendants()
        os.write(2, (line + "\n").encode())
    finally:
        os._exit(EXIT_CODE)


def _handler(signum, frame) -> None:
    _state["signals"] += 1
    if _state["signals"] > 1:
        _hard_exit()
    _requested.set()
    if not _state["deferring"]:  # nothing to stop gracefully yet: the usual KeyboardInterrupt
        raise KeyboardInterrupt


def _quiet_exit() -> None:
    """At interpreter exit after an interruption: ignore further signals. Python resets its
    handlers to the default before tearing its modules down, and a signal then would kill the
    process (no exit code 130) instead of letting it end."""
    if _state["signals"] and threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


@contextlib.contextmanager
def handling():
    """Install the SIGINT/SIGTERM handlers for the duration (main thread only; elsewhere a no-op),
    then restore the previous ones, unless a signal came: the process is then ending, and
    another signal must still exit 130 at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    _requested.clear()
    _state.update(signals=0, installed=True)
    if not _state.get("atexit"):
        atexit.register(_quiet_exit)
        _state["atexit"] = True
    try:
        for sig in SIGNALS:
            signal.signal(sig, _handler)
        yield
    finally:
        if not _state["signals"]:  # else the handler stays: another signal while the process winds down exits 130
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        _state["installed"] = False
        _requested.clear()


@contextlib.contextmanager
def keeping_handlers():
    """Restore this process's SIGINT/SIGTERM handlers after the block: `ray.init` replaces
    SIGTERM's with sys.exit when called in the main thread."""
    main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS} if main else {}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            if handler is not None and signal.getsignal(sig) is not handler:
                signal.signal(sig, handler)


def wait_for(thread: threading.Thread, poll: float = 0.2) -> None:
    """Join `thread` from the main thread without blocking signals: a process-directed signal may
    be delivered to any thread (Ray's and Flower's included), and Python runs its handler only
    when the main thread executes bytecode, so an unbounded join would hold it back until the
    thread ended. Without `handling()` (the Python API) a first KeyboardInterrupt requests the
    stop and keeps waiting; a second one is raised."""
    interrupts = 0
    try:
        while thread.is_alive():
            try:
                thread.join(poll)
            except KeyboardInterrupt:
                interrupts += 1
                if interrupts > 1:
                    raise
                request()
    finally:
        if interrupts and not installed():
            _requested.clear()
