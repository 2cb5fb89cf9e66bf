"""TDM that kills its own process between its two phases: after the fake score stepped, before the generator phase.

``TDM_KILL_AT_NIMG=<n>`` (environment) SIGKILLs the process when the generator phase of the step starting at n images
begins, so the fake-score optimizer has stepped in memory and the generator has not: a preemption that falls between
the phases. Unset, it is plain TDM (the same config resumes the killed run).
"""

from __future__ import annotations

import os
import signal

from torch import Tensor

from distill.tdm import TrajectoryDistributionMatching
from gen.train.method import Batch, Progress
from gen.utils.seed import Randomness


class KillBetweenPhases(TrajectoryDistributionMatching):
    """``TrajectoryDistributionMatching`` with the kill switch of the module docstring."""

    def loss(self, phase: str, batch: Batch, rng: Randomness, progress: Progress) -> dict[str, Tensor]:
        if phase == "net" and os.environ.get("TDM_KILL_AT_NIMG") == str(progress.nimg):
            os.kill(os.getpid(), signal.SIGKILL)
        return super().loss(phase, batch, rng, progress)
