"""Preemption: signal handlers that only raise a flag, which the training loop reads at its step boundaries.

A cluster warns a job before it ends it. SLURM sends SIGTERM when it preempts or cancels a job (and SIGKILL after
the partition's grace time), and with ``--signal=USR2@N`` it sends SIGUSR2 N seconds before the time limit; Hydra's
submitit launcher asks for exactly that (``signal_delay_s``; submitit's ``SlurmJobEnvironment.USR_SIG``, changed by
``SUBMITIT_PREEMPT_SIGNAL``). Some sites use SIGUSR1 instead. The handlers here do nothing but record the signal:
the loop finishes the optimizer step it is in, all processes agree on the flag at the step boundary (one
all-reduce), and the training state is written there, as NVlabs/edm2 training/training_loop.py suspends at its
boundaries (``should_suspend``) and dumps its state before exiting.

The handlers stay installed until the state is written, so a second signal during the write is recorded and
ignored: it cannot cut the file (every state is written atomically anyway). Afterwards the previous handlers come
back, and the one that was installed for the received signal is called with it (:meth:`PreemptionSignals.pass_on`).
A process that exits right after a stop (``hold_after_stop=True``, train.py's entry point) ignores from then on the
signals whose previous action was the default or "ignore": a repeated SIGTERM in the moment between the written state
and the exit would otherwise kill it and turn its "preempted, resume me" status (75) into a death by signal. It is
SIG_IGN rather than a recording handler because the interpreter's shutdown resets the Python-level handlers it
installed to the default action (CPython ``_PySignal_Fini``), and a process with torch loaded takes a while to shut
down; an ignored signal stays ignored until the exit.
Under submitit that is submitit's own handler, which pickles the job (Hydra's launcher is checkpointable: it
resubmits the same overrides, see submitit.helpers.Checkpointable / DelayedSubmission) and requeues it.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Sequence
from types import FrameType, TracebackType
from typing import Any

DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")

_Handler = Callable[[int, FrameType | None], Any] | int | None


def signal_number(name: str) -> int:
    """The number of a signal given by name (``SIGUSR2`` or ``USR2``).

    Raises:
        ValueError: not a signal this platform has, or one that cannot be caught (SIGKILL, SIGSTOP).
    """
    full = name if name.upper().startswith("SIG") else f"SIG{name}"
    num = getattr(signal, full.upper(), None)
    if not isinstance(num, signal.Signals) or full.upper() in ("SIGKILL", "SIGSTOP"):
        raise ValueError(f"{name!r} is not a signal that can be caught here; use e.g. SIGTERM, SIGUSR1 or SIGUSR2")
    return int(num)


class PreemptionSignals:
    """A context in which the given signals only set a flag (``received``); the previous handlers come back at exit.

    Install it only in the process that trains, in its main thread (Python runs handlers there), around training.
    With ``hold_after_stop``, after a received signal the signals whose previous action was not a Python function
    are ignored from then on; use it only where the process exits right after the context.
    """

    def __init__(self, names: Sequence[str] = DEFAULT_SIGNALS, hold_after_stop: bool = False) -> None:
        self.numbers = [signal_number(n) for n in names]
        self.hold_after_stop = hold_after_stop
        self.received: int | None = None
        self.count = 0
        self.previous: dict[int, _Handler] = {}  # while installed
        self.replaced: dict[int, _Handler] = {}  # after exit: what was there before, for pass_on

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        if self.received is None:
            self.received = signum

    def requested(self) -> bool:
        """True once one of the signals has arrived."""
        return self.received is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""

    def __enter__(self) -> PreemptionSignals:
        for num in self.numbers:
            self.previous[num] = signal.getsignal(num)
            signal.signal(num, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for num, old in self.previous.items():
            if self.hold_after_stop and self.received is not None and not callable(old):
                signal.signal(num, signal.SIG_IGN)  # the process exits next: a repeated signal is not fatal
                continue
            signal.signal(num, old if old is not None else signal.SIG_DFL)
        self.replaced = dict(self.previous)
        self.previous = {}

    def pass_on(self) -> None:
        """After exit: call the handler that was installed before for the received signal, if it was a Python
        function (submitit's requeue handler under submitit); the default action and "ignore" are not repeated."""
        old = self.replaced.get(self.received) if self.received is not None else None
        if callable(old):
            old(self.received, None)
