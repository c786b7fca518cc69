"""Ctrl-C and SIGTERM while training: the first finishes the step in progress, which the loop then checkpoints
before it stops, so the interrupted run resumes exactly; a second stops at once."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from clipsnail.core import distributed as dist
from clipsnail.core.errors import Interrupted

log = logging.getLogger(__name__)


@dataclass
class StopRequest:
    requested: bool = False


# What Ctrl-C sends, and what job schedulers (Slurm, Kubernetes, systemd) send before they kill a job.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def stop_signals_finish_the_step(stop: StopRequest, interruption: Callable[[], str]) -> Iterator[None]:
    """While the block runs, a first Ctrl-C (SIGINT) or SIGTERM only sets `stop.requested`: the loop finishes the
    step in progress, checkpoints it and stops, so the interrupted run resumes exactly. A second one raises
    KeyboardInterrupt at once. Any KeyboardInterrupt leaves the block as `Interrupted(interruption())`, a message
    saying where the run stopped and what resumes it.

    A handler is installed only in the main thread of a single-process run, for a signal that has its default
    handler (Python's for SIGINT, the system's for SIGTERM); elsewhere (torchrun, a host application's own
    handler) the signal acts as before."""
    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    main_process = threading.current_thread() is threading.main_thread() and not dist.is_distributed()
    ours = [s for s in STOP_SIGNALS if main_process and signal.getsignal(s) is defaults[s]]
    pid = os.getpid()

    def handler(signum, frame):
        if stop.requested or os.getpid() != pid:  # a second signal, or a forked DataLoader worker
            raise KeyboardInterrupt
        stop.requested = True
        again = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        log.warning("%s: stopping after this step (%s again to stop at once)", signal.Signals(signum).name, again)

    previous = {s: signal.signal(s, handler) for s in ours}
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(interruption()) from None
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
