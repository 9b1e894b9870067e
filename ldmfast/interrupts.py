"""Ctrl-C and SIGTERM in the long-running commands (train, synthesize, demo): both unwind, so that
`finally` blocks run and the files being written are completed or removed, and the command then
says how to go on instead of printing a traceback."""
from __future__ import annotations

import signal
import sys


class Terminated(BaseException):
    """SIGTERM (torchrun stopping a worker, a scheduler's time limit), raised where the process is
    so that it unwinds like Ctrl-C (a BaseException, as KeyboardInterrupt: `except Exception`
    handlers let it through)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


#: what a command catches to report a stop
INTERRUPTIONS = (KeyboardInterrupt, Terminated)


def _raise_terminated(signum, frame):
    raise Terminated(signum)


def stop_on_sigterm() -> None:
    """From now on SIGTERM raises Terminated in the main thread."""
    signal.signal(signal.SIGTERM, _raise_terminated)


def report_interruption(command: str, err: BaseException, how_to_go_on: str) -> int:
    """Say on stderr that `command` stopped and how to go on; returns the exit status (128 + the
    signal's number, as a shell reports a process the signal ended)."""
    what = "terminated" if isinstance(err, Terminated) else "interrupted"
    print(f"\n{command}: {what}: {how_to_go_on}", file=sys.stderr)
    return 128 + (err.signum if isinstance(err, Terminated) else int(signal.SIGINT))
